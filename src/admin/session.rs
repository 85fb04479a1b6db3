//! Web UI sessions: random 256-bit ids kept in memory, an idle timeout, and a CSRF token each.
//!
//! A session remembers which token signed in (its id), never the token itself. The map is keyed by
//! SHA-256(session id), so a memory dump holds no usable cookie. Every request through a session
//! re-reads the token row, so revoking or expiring the sign-in token ends its sessions at once.
//!
//! Owns: the session map, ids, CSRF tokens and idle expiry (the cookie names are `hygiene`'s, which
//! strips them upstream). Must never import `gateway`, `config` or `pipeline`:
//! sessions belong to the admin side alone.

use dashmap::DashMap;
use rand::TryRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::token::hex;

/// Most sessions kept at once; past this the least recently used one is dropped.
pub const MAX_SESSIONS: usize = 10_000;

/// Cookie names on plain HTTP and under TLS (`__Host-` prefix): named in `hygiene`, which strips
/// them from everything forwarded upstream and must not import the admin side.
pub use crate::hygiene::{SESSION_COOKIE as COOKIE, SESSION_COOKIE_TLS as COOKIE_TLS};

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token that signed in (its id, never its plaintext).
    pub token_id: String,
    /// The CSRF token the page must echo in `X-CSRF-Token` on every mutation.
    pub csrf: String,
    /// Sign-in time (ms, gateway clock).
    pub created_ms: i64,
    /// Last request (ms, gateway clock); the idle timeout counts from here.
    pub last_seen_ms: i64,
    /// MFA step-up: a TOTP check in this session counts until then (ms, gateway clock).
    pub step_up_until_ms: Option<i64>,
}

/// The session store. Lock choice: DashMap (sharded), as each request touches one session and
/// sessions rarely share a shard; no lock is held across an `.await`.
#[derive(Debug, Default)]
pub struct Sessions {
    map: DashMap<[u8; 32], Session>,
}

/// 32 bytes from the OS CSPRNG, hex-encoded.
pub fn random_hex() -> String {
    let mut buf = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .expect("the OS random source failed");
    hex(&buf)
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// Constant-time string comparison (CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a session for `token_id`; returns (session id for the cookie, the session).
    pub fn create(&self, token_id: &str, now_ms: i64, idle_ms: i64) -> (String, Session) {
        if self.map.len() >= MAX_SESSIONS {
            self.purge(now_ms, idle_ms);
        }
        if self.map.len() >= MAX_SESSIONS {
            let oldest = self
                .map
                .iter()
                .min_by_key(|e| e.value().last_seen_ms)
                .map(|e| *e.key());
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        let id = random_hex();
        let s = Session {
            token_id: token_id.to_string(),
            csrf: random_hex(),
            created_ms: now_ms,
            last_seen_ms: now_ms,
            step_up_until_ms: None,
        };
        self.map.insert(key(&id), s.clone());
        (id, s)
    }

    /// The live session for this cookie value, touched (its idle timer restarts); an idle one is
    /// removed and `None` returned.
    pub fn touch(&self, id: &str, now_ms: i64, idle_ms: i64) -> Option<Session> {
        let k = key(id);
        let mut e = self.map.get_mut(&k)?;
        if now_ms - e.last_seen_ms >= idle_ms {
            drop(e);
            self.map.remove(&k);
            return None;
        }
        e.last_seen_ms = now_ms;
        Some(e.clone())
    }

    /// Marks a session step-up verified until `until_ms` (a TOTP check just passed in it);
    /// false when there is no such session.
    pub fn set_step_up(&self, id: &str, until_ms: i64) -> bool {
        match self.map.get_mut(&key(id)) {
            Some(mut e) => {
                e.step_up_until_ms = Some(until_ms);
                true
            }
            None => false,
        }
    }

    /// Ends a session; returns it when it existed.
    pub fn remove(&self, id: &str) -> Option<Session> {
        self.map.remove(&key(id)).map(|(_, s)| s)
    }

    /// Ends every session signed in with this token (it was revoked).
    pub fn remove_token(&self, token_id: &str) {
        self.map.retain(|_, s| s.token_id != token_id);
    }

    /// Drops sessions idle for `idle_ms` or more.
    pub fn purge(&self, now_ms: i64, idle_ms: i64) {
        self.map.retain(|_, s| now_ms - s.last_seen_ms < idle_ms);
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No sessions held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_sessions_end_and_touch_extends() {
        let s = Sessions::new();
        let (id, sess) = s.create("tok_1", 1_000, 100);
        assert_eq!(id.len(), 64);
        assert_ne!(id, sess.csrf);
        assert!(s.touch(&id, 1_050, 100).is_some());
        assert!(
            s.touch(&id, 1_149, 100).is_some(),
            "touch restarts the idle timer"
        );
        assert!(s.touch(&id, 1_249, 100).is_none());
        assert!(s.is_empty(), "an idle session is removed");
    }

    #[test]
    fn ids_are_not_stored_in_clear_and_revocation_ends_sessions() {
        let s = Sessions::new();
        let (id, _) = s.create("tok_1", 0, 1_000);
        let (id2, _) = s.create("tok_2", 0, 1_000);
        assert!(
            s.map.iter().all(|e| hex(e.key()) != id),
            "only a hash of the id is kept"
        );
        assert!(!format!("{s:?}").contains(&id));
        s.remove_token("tok_1");
        assert!(s.touch(&id, 1, 1_000).is_none());
        assert!(s.touch(&id2, 1, 1_000).is_some());
        assert!(s.remove(&id2).is_some());
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn store_is_bounded() {
        let s = Sessions::new();
        for i in 0..MAX_SESSIONS + 5 {
            s.create("t", i as i64, i64::MAX / 2);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }

    #[test]
    fn csrf_compare() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
