//! The readiness types: a probe's result and the public endpoint's probe bookkeeping, which the
//! gateway's state holds. Kept apart from the checks so that the gateway can hold them without
//! importing the checks (which run on the gateway).
//!
//! Imports nothing of ours.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

/// The result of one readiness probe: each check by name, `Err` with why it failed.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// `store`, `audit`, `listeners`, in this order.
    pub checks: [(&'static str, Result<(), String>); 3],
}

impl Readiness {
    /// Every check passed.
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|(_, r)| r.is_ok())
    }
}

/// Bounds the cost of probes the public listener can trigger: at most one probe runs at a time;
/// a health request arriving while one runs gets the last finished result instead of opening
/// another store connection. No lock is held across `.await`: an atomic flag marks the running
/// probe and a std mutex (held only to copy) keeps the last result.
#[derive(Debug, Default)]
pub struct ProbeState {
    pub(crate) running: AtomicBool,
    pub(crate) last: Mutex<Option<Readiness>>,
}
