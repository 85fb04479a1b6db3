//! In-memory token cache keyed by SHA-256(token), with race-free invalidation.
//!
//! The promise (SPEC §2): once `invalidate_*` returns, no request is allowed from a stale entry,
//! and a fill whose store read began before the invalidation never lands. The mechanism is an
//! epoch counter: a filler reads the epoch *before* its store read and inserts only if the epoch
//! is unchanged, checked while holding the map shard's lock; an invalidation bumps the epoch
//! *before* removing entries (which takes the same shard lock). Either the fill is refused, or it
//! landed before the removal and is removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::store::TokenRow;
use crate::token::TokenHash;

/// A cached token: the store row plus per-process state.
#[derive(Debug)]
pub struct CachedToken {
    /// The row as read from the store.
    pub row: TokenRow,
    /// Set once this process has retired the rotation predecessor (first use of a rotated token).
    pub predecessor_retired: AtomicBool,
}

impl CachedToken {
    /// Wraps a row.
    pub fn new(row: TokenRow) -> Self {
        let retired = row.rotated_from.is_none() || row.last_used_at.is_some();
        CachedToken {
            row,
            predecessor_retired: AtomicBool::new(retired),
        }
    }
}

/// The cache. Lock choice: DashMap (sharded RwLocks) so concurrent lookups of different tokens
/// never contend; the shard lock is also what makes fill-versus-invalidate atomic.
#[derive(Default)]
pub struct TokenCache {
    map: DashMap<TokenHash, Arc<CachedToken>>,
    /// token id → hash, so a revocation by id finds its entry without a scan.
    by_id: DashMap<String, TokenHash>,
    epoch: AtomicU64,
    /// Set while changes may go unannounced (PostgreSQL notification connection lost): nothing
    /// is cached then, every lookup reads the store. Inverted so `Default` starts trusted.
    untrusted: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl TokenCache {
    /// Empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks an entry up, counting hits and misses.
    pub fn get(&self, hash: &TokenHash) -> Option<Arc<CachedToken>> {
        match self.map.get(hash) {
            Some(e) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.value().clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Current epoch: read it before a store lookup and pass it to `fill`.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Inserts `entry` unless an invalidation happened since `epoch_before`. Returns whether it
    /// was inserted; when false, the caller must read the store again.
    pub fn fill(&self, hash: TokenHash, entry: Arc<CachedToken>, epoch_before: u64) -> bool {
        // The id → hash link is written first and never removed (a token's hash never changes),
        // so an invalidation that bumps the epoch after our check below always finds the entry.
        if !self.by_id.contains_key(&entry.row.id) {
            self.by_id.insert(entry.row.id.clone(), hash);
        }
        let stale = || {
            self.epoch.load(Ordering::SeqCst) != epoch_before
                || self.untrusted.load(Ordering::SeqCst)
        };
        match self.map.entry(hash) {
            Entry::Occupied(mut o) => {
                if stale() {
                    return false;
                }
                o.insert(entry);
            }
            Entry::Vacant(v) => {
                if stale() {
                    return false;
                }
                v.insert(entry);
            }
        }
        true
    }

    /// Stops caching and drops everything: changes may be going unannounced. The flag is set
    /// before the epoch bump, so a fill that read the epoch after the bump sees the flag, and
    /// one that read it before sees a changed epoch.
    pub fn distrust(&self) {
        self.untrusted.store(true, Ordering::SeqCst);
        self.clear();
    }

    /// Caches again (call only once the change log has been read up to date after `distrust`).
    pub fn trust(&self) {
        self.untrusted.store(false, Ordering::SeqCst);
    }

    /// False between `distrust` and `trust`: lookups must read the store and not fill.
    pub fn is_trusted(&self) -> bool {
        !self.untrusted.load(Ordering::SeqCst)
    }

    /// Drops the entry of one token (revoked, rotated, edited).
    pub fn invalidate_token(&self, token_id: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let hash = self.by_id.get(token_id).map(|h| *h.value());
        if let Some(hash) = hash {
            self.map.remove(&hash);
        }
    }

    /// Drops every entry of one account (disabled).
    pub fn invalidate_account(&self, account_id: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.map.retain(|_, v| v.row.account_id != account_id);
    }

    /// Drops everything (used when changes may have been missed).
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.map.clear();
        self.by_id.clear();
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(id: &str, account: &str) -> TokenRow {
        TokenRow {
            id: id.into(),
            account_id: account.into(),
            account: account.into(),
            name: "n".into(),
            prefix: "tg_abcdefgh".into(),
            role: None,
            permissions: vec![],
            scopes: BTreeMap::new(),
            allowed_cidrs: vec![],
            rate: None,
            created_at: 0,
            created_by: "t".into(),
            expires_at: None,
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            rotated_from: None,
            rotation_deadline: None,
            account_disabled_at: None,
        }
    }

    #[test]
    fn fill_after_invalidation_is_refused() {
        let c = TokenCache::new();
        let e = c.epoch();
        c.invalidate_token("tok_a");
        assert!(!c.fill([1; 32], Arc::new(CachedToken::new(row("tok_a", "acc"))), e));
        assert!(c.get(&[1; 32]).is_none());
    }

    #[test]
    fn invalidation_removes_filled_entries() {
        let c = TokenCache::new();
        assert!(c.fill(
            [1; 32],
            Arc::new(CachedToken::new(row("tok_a", "acc1"))),
            c.epoch()
        ));
        assert!(c.fill(
            [2; 32],
            Arc::new(CachedToken::new(row("tok_b", "acc2"))),
            c.epoch()
        ));
        c.invalidate_token("tok_a");
        assert!(c.get(&[1; 32]).is_none());
        assert!(c.get(&[2; 32]).is_some());
        c.invalidate_account("acc2");
        assert!(c.get(&[2; 32]).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn an_untrusted_cache_refuses_fills_until_trusted_again() {
        let c = TokenCache::new();
        assert!(c.is_trusted());
        assert!(c.fill(
            [1; 32],
            Arc::new(CachedToken::new(row("tok_a", "acc"))),
            c.epoch()
        ));
        c.distrust();
        assert!(!c.is_trusted());
        assert!(c.get(&[1; 32]).is_none(), "distrust drops what was cached");
        assert!(!c.fill(
            [1; 32],
            Arc::new(CachedToken::new(row("tok_a", "acc"))),
            c.epoch()
        ));
        c.trust();
        assert!(c.fill(
            [1; 32],
            Arc::new(CachedToken::new(row("tok_a", "acc"))),
            c.epoch()
        ));
        assert!(c.get(&[1; 32]).is_some());
    }

    #[test]
    fn racing_fills_never_survive_an_invalidation() {
        // Many threads fill with an epoch read before a concurrent invalidation; afterwards the
        // entry must be absent unless its fill read the epoch after the invalidation.
        for _ in 0..200 {
            let c = Arc::new(TokenCache::new());
            let start = Arc::new(std::sync::Barrier::new(5));
            let mut hs = Vec::new();
            for _ in 0..4 {
                let (c, start) = (c.clone(), start.clone());
                hs.push(std::thread::spawn(move || {
                    let e = c.epoch();
                    start.wait();
                    c.fill([9; 32], Arc::new(CachedToken::new(row("tok_x", "acc"))), e);
                }));
            }
            start.wait();
            c.invalidate_token("tok_x");
            let after = c.epoch();
            for h in hs {
                h.join().unwrap();
            }
            // Every filler read its epoch before the barrier, hence before the bump.
            assert!(c.get(&[9; 32]).is_none());
            assert!(after >= 1);
        }
    }
}
