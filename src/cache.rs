//! In-memory token cache keyed by SHA-256(token), with race-free invalidation.
//!
//! The promise (SPEC §2): once `invalidate_*` returns, no request is allowed from a stale entry,
//! and a fill whose store read began before the invalidation never lands. The mechanism is an
//! epoch counter: a filler reads the epoch *before* its store read and inserts only if the epoch
//! is unchanged, checked while holding the map shard's lock; an invalidation bumps the epoch
//! *before* removing entries (which takes the same shard lock). Either the fill is refused, or it
//! landed before the removal and is removed. For an invalidation by token id to find the entry,
//! the filler writes the id → key link *before* that check, and links are never removed (a
//! token's hash never changes, so a link is never wrong).
//!
//! Memory (issue 9, ≤ 300 bytes per cached token): an entry keeps only what the request path
//! reads ([`CachedToken`], 88 bytes plus one allocation holding its four strings); role and
//! permission lists are interned ([`Grants`], shared by every token with the same list); scopes,
//! CIDRs, rate overrides and rotation state are boxed behind one pointer that is null for most
//! tokens. Both indexes are keyed by 8-byte keys: the map by the first 8 bytes of the token hash
//! (the entry keeps the other 24 and a lookup compares all 32), the id index by a keyed hash of
//! the token id. A key collision never gives a wrong answer: the newcomer is simply not cached.
//! The full [`TokenRow`] (last use, creator, revocation details) is read from the store by the
//! few callers that print it (admin API and web UI).
//!
//! Owns: [`TokenCache`], [`CachedToken`] and [`Grants`]. Must never import `config`, `gateway`,
//! `pipeline`, `admin` or `cli`; it knows the store's row type only.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ipnet::IpNet;

use crate::store::{RateOverride, TokenRow};
use crate::token::TokenHash;

/// Most distinct permission lists kept interned; beyond it, unused ones are dropped first, and a
/// list that still does not fit is allocated for its token alone (correct, just not shared).
pub const MAX_INTERNED_GRANTS: usize = 1024;

/// A role name and permission list, shared by every cached token that has the same pair.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Grants {
    role: Option<Box<str>>,
    permissions: Box<[String]>,
    /// The list joined with `,`, as forwarded in `X-Tokengate-Permissions` (built once).
    header: Box<str>,
}

impl Grants {
    fn new(role: Option<String>, permissions: Vec<String>) -> Grants {
        let header = permissions.join(",").into_boxed_str();
        Grants {
            role: role.map(String::into_boxed_str),
            permissions: permissions.into_boxed_slice(),
            header,
        }
    }
}

/// What few tokens have: scopes, an IP allowlist, a rate override, rotation state, and (only for
/// strings too long for 16-bit offsets) wide offsets into the text.
#[derive(Debug, Default)]
struct Extras {
    scopes: BTreeMap<String, Vec<String>>,
    allowed_cidrs: Box<[IpNet]>,
    rate: Option<RateOverride>,
    rotated_from: Option<Box<str>>,
    rotation_deadline: Option<i64>,
    wide_cuts: Option<[u32; 3]>,
}

impl Extras {
    fn is_empty(&self) -> bool {
        self.scopes.is_empty()
            && self.allowed_cidrs.is_empty()
            && self.rate.is_none()
            && self.rotated_from.is_none()
            && self.rotation_deadline.is_none()
            && self.wide_cuts.is_none()
    }
}

const REVOKED: u8 = 1;
const ACCOUNT_DISABLED: u8 = 2;
const HAS_EXPIRY: u8 = 4;

static NO_SCOPES: BTreeMap<String, Vec<String>> = BTreeMap::new();

/// A cached token: exactly the fields of its [`TokenRow`] that the request path reads (judgement,
/// authorisation, rate limit, identity headers, audit, whoami), plus per-process state.
#[derive(Debug)]
pub struct CachedToken {
    /// Bytes 8..32 of the token hash; bytes 0..8 are the map key.
    hash_tail: [u8; 24],
    /// Id, display prefix, name and account name, back to back.
    text: Box<str>,
    grants: Arc<Grants>,
    extras: Option<Box<Extras>>,
    created_at: i64,
    /// Meaningful when `state & HAS_EXPIRY`.
    expires_at: i64,
    /// [`account_key`] of the owning account, for `invalidate_account`.
    account_key: u64,
    /// Ends of id, prefix and name in `text` (see `Extras::wide_cuts` when they do not fit).
    cuts: [u16; 3],
    state: u8,
    /// Set once this process has retired the rotation predecessor (first use of a rotated token).
    pub predecessor_retired: AtomicBool,
}

/// The 8-byte key of the map: the first 8 bytes of the token hash (uniformly distributed).
fn hash_key(hash: &TokenHash) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// Fingerprint of an account id: entries of an account are found by it when it is disabled. Two
/// accounts sharing one only makes disabling one also drop the other's entries (refilled on use).
pub fn account_key(account_id: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(account_id.as_bytes());
    h.finish()
}

impl CachedToken {
    /// Builds the entry of the token whose hash is `hash` from its store row (its permission
    /// list not shared; [`TokenCache::entry`] interns it).
    pub fn new(hash: &TokenHash, row: TokenRow) -> Self {
        Self::build(hash, row, |role, permissions| {
            Arc::new(Grants::new(role, permissions))
        })
    }

    fn build(
        hash: &TokenHash,
        row: TokenRow,
        intern: impl FnOnce(Option<String>, Vec<String>) -> Arc<Grants>,
    ) -> Self {
        let mut text = String::with_capacity(
            row.id.len() + row.prefix.len() + row.name.len() + row.account.len(),
        );
        let mut ends = [0usize; 3];
        for (end, s) in ends.iter_mut().zip([&row.id, &row.prefix, &row.name]) {
            text.push_str(s);
            *end = text.len();
        }
        text.push_str(&row.account);
        let narrow: Option<[u16; 3]> = (|| {
            Some([
                u16::try_from(ends[0]).ok()?,
                u16::try_from(ends[1]).ok()?,
                u16::try_from(ends[2]).ok()?,
            ])
        })();
        let extras = Extras {
            scopes: row.scopes,
            allowed_cidrs: row.allowed_cidrs.into_boxed_slice(),
            rate: row.rate,
            rotated_from: row.rotated_from.map(String::into_boxed_str),
            rotation_deadline: row.rotation_deadline,
            wide_cuts: match narrow {
                Some(_) => None,
                None => Some(ends.map(|e| e as u32)),
            },
        };
        let mut state = 0;
        if row.revoked_at.is_some() {
            state |= REVOKED;
        }
        if row.account_disabled_at.is_some() {
            state |= ACCOUNT_DISABLED;
        }
        if row.expires_at.is_some() {
            state |= HAS_EXPIRY;
        }
        let retired = extras.rotated_from.is_none() || row.last_used_at.is_some();
        CachedToken {
            hash_tail: hash[8..].try_into().expect("24 bytes"),
            text: text.into_boxed_str(),
            grants: intern(row.role, row.permissions),
            extras: (!extras.is_empty()).then(|| Box::new(extras)),
            created_at: row.created_at,
            expires_at: row.expires_at.unwrap_or(0),
            account_key: account_key(&row.account_id),
            cuts: narrow.unwrap_or([0; 3]),
            state,
            predecessor_retired: AtomicBool::new(retired),
        }
    }

    /// Whether this is the entry of the token hashing to `hash` (compares the bytes the map key
    /// does not hold).
    pub fn is_for(&self, hash: &TokenHash) -> bool {
        self.hash_tail[..] == hash[8..]
    }

    fn cut(&self, i: usize) -> usize {
        match self.extras.as_deref().and_then(|e| e.wide_cuts) {
            Some(w) => w[i] as usize,
            None => usize::from(self.cuts[i]),
        }
    }

    /// Token id (`tok_...`).
    pub fn id(&self) -> &str {
        &self.text[..self.cut(0)]
    }

    /// Display prefix (`tg_` + 8 chars).
    pub fn prefix(&self) -> &str {
        &self.text[self.cut(0)..self.cut(1)]
    }

    /// Human label.
    pub fn name(&self) -> &str {
        &self.text[self.cut(1)..self.cut(2)]
    }

    /// Owning account's name.
    pub fn account(&self) -> &str {
        &self.text[self.cut(2)..]
    }

    /// Fingerprint of the owning account's id (see [`account_key`]).
    pub fn account_key(&self) -> u64 {
        self.account_key
    }

    /// Role the permissions were expanded from (informational).
    pub fn role(&self) -> Option<&str> {
        self.grants.role.as_deref()
    }

    /// Explicit permission list.
    pub fn permissions(&self) -> &[String] {
        &self.grants.permissions
    }

    /// The permission list joined with `,` (the `X-Tokengate-Permissions` value).
    pub fn permissions_header(&self) -> &str {
        &self.grants.header
    }

    /// The shared role and permission list (tokens with equal lists share one).
    pub fn grants(&self) -> &Arc<Grants> {
        &self.grants
    }

    /// Scopes on captured names (empty = unrestricted).
    pub fn scopes(&self) -> &BTreeMap<String, Vec<String>> {
        self.extras.as_deref().map_or(&NO_SCOPES, |e| &e.scopes)
    }

    /// Client CIDRs allowed (empty = any).
    pub fn allowed_cidrs(&self) -> &[IpNet] {
        self.extras.as_deref().map_or(&[], |e| &e.allowed_cidrs)
    }

    /// Rate-limit override.
    pub fn rate(&self) -> Option<RateOverride> {
        self.extras.as_deref().and_then(|e| e.rate)
    }

    /// Predecessor in a rotation.
    pub fn rotated_from(&self) -> Option<&str> {
        self.extras
            .as_deref()
            .and_then(|e| e.rotated_from.as_deref())
    }

    /// When this token (the old one of a rotation) stops working at the latest.
    pub fn rotation_deadline(&self) -> Option<i64> {
        self.extras.as_deref().and_then(|e| e.rotation_deadline)
    }

    /// Created (ms).
    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// Expiry (ms), None = never.
    pub fn expires_at(&self) -> Option<i64> {
        (self.state & HAS_EXPIRY != 0).then_some(self.expires_at)
    }

    /// Revoked when read from the store.
    pub fn revoked(&self) -> bool {
        self.state & REVOKED != 0
    }

    /// The owning account was disabled when read from the store.
    pub fn account_disabled(&self) -> bool {
        self.state & ACCOUNT_DISABLED != 0
    }
}

/// Hasher for keys that are already uniform 64-bit hashes (SHA-256 bytes, SipHash fingerprints):
/// uses them as they are. Only tokens present in the store are ever inserted, so a client cannot
/// choose the keys of the table.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Keyed = BuildHasherDefault<KeyHasher>;

/// Interned [`Grants`], by a hash of their content; `len` counts them.
#[derive(Default)]
struct Interner {
    by_hash: HashMap<u64, Vec<Arc<Grants>>>,
    len: usize,
}

/// The cache. Lock choice: DashMap (sharded RwLocks) so concurrent lookups of different tokens
/// never contend; the shard lock is also what makes fill-versus-invalidate atomic. The interner
/// is a std Mutex: taken only on a fill (after a store read), never across `.await`.
#[derive(Default)]
pub struct TokenCache {
    /// First 8 bytes of the token hash → entry (which holds the other 24).
    map: DashMap<u64, Arc<CachedToken>, Keyed>,
    /// Keyed hash of the token id → map key, so a revocation by id finds its entry without a
    /// scan. Never removed (see the module header), not even by `clear`.
    by_id: DashMap<u64, u64, Keyed>,
    /// Keys of the id hashes (random per process).
    id_hasher: RandomState,
    grants: Mutex<Interner>,
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

    /// Builds the entry for a store row, sharing its permission list with other entries.
    pub fn entry(&self, hash: &TokenHash, row: TokenRow) -> Arc<CachedToken> {
        Arc::new(CachedToken::build(hash, row, |role, permissions| {
            self.intern(role, permissions)
        }))
    }

    /// The shared [`Grants`] equal to (role, permissions). A list already interned is found
    /// without allocating (allocations on a fill that are freed again fragment the heap around
    /// the entries that stay: measured at ~50 bytes per cached token).
    fn intern(&self, role: Option<String>, permissions: Vec<String>) -> Arc<Grants> {
        let h = self.id_hasher.hash_one((role.as_deref(), &permissions[..]));
        let mut i = self.grants.lock().expect("grants interner poisoned");
        let same = |g: &&Arc<Grants>| {
            g.role.as_deref() == role.as_deref() && g.permissions[..] == permissions[..]
        };
        if let Some(shared) = i.by_hash.get(&h).and_then(|v| v.iter().find(same)) {
            return shared.clone();
        }
        if i.len >= MAX_INTERNED_GRANTS {
            i.by_hash.retain(|_, v| {
                v.retain(|g| Arc::strong_count(g) > 1);
                !v.is_empty()
            });
            i.len = i.by_hash.values().map(Vec::len).sum();
            if i.len >= MAX_INTERNED_GRANTS {
                return Arc::new(Grants::new(role, permissions));
            }
        }
        let shared = Arc::new(Grants::new(role, permissions));
        i.by_hash.entry(h).or_default().push(shared.clone());
        i.len += 1;
        shared
    }

    /// Number of distinct permission lists interned.
    pub fn interned_grants(&self) -> usize {
        self.grants.lock().expect("grants interner poisoned").len
    }

    fn id_key(&self, token_id: &str) -> u64 {
        self.id_hasher.hash_one(token_id)
    }

    /// Looks an entry up, counting hits and misses.
    pub fn get(&self, hash: &TokenHash) -> Option<Arc<CachedToken>> {
        let found = self
            .map
            .get(&hash_key(hash))
            .filter(|e| e.value().is_for(hash))
            .map(|e| e.value().clone());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Current epoch: read it before a store lookup and pass it to `fill`.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Inserts `entry` (the token hashing to `hash`) unless an invalidation happened since
    /// `epoch_before`. Returns false when it did: the read may be stale and the caller must read
    /// the store again. True means the read is current; the entry is then cached, except in the
    /// (astronomically rare) case that another cached token shares its map or id key, where it
    /// is used for this request only.
    pub fn fill(&self, hash: TokenHash, entry: Arc<CachedToken>, epoch_before: u64) -> bool {
        assert!(
            entry.is_for(&hash),
            "entry filled under another token's hash"
        );
        let key = hash_key(&hash);
        // The link is written first and never removed, so an invalidation that bumps the epoch
        // after our check below always finds the entry.
        let linked = match self.by_id.entry(self.id_key(entry.id())) {
            Entry::Occupied(o) => *o.get() == key,
            Entry::Vacant(v) => {
                v.insert(key);
                true
            }
        };
        let stale = || {
            self.epoch.load(Ordering::SeqCst) != epoch_before
                || self.untrusted.load(Ordering::SeqCst)
        };
        match self.map.entry(key) {
            Entry::Occupied(mut o) => {
                if stale() {
                    return false;
                }
                if linked && o.get().is_for(&hash) {
                    o.insert(entry);
                }
            }
            Entry::Vacant(v) => {
                if stale() {
                    return false;
                }
                if linked {
                    v.insert(entry);
                }
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
        let key = self.by_id.get(&self.id_key(token_id)).map(|k| *k.value());
        if let Some(key) = key {
            // The entry under that key is this token's, or (after a key collision) another
            // token's that its own link finds; this token is then not cached at all.
            self.map.remove_if(&key, |_, e| e.id() == token_id);
        }
    }

    /// Drops every entry of one account (disabled).
    pub fn invalidate_account(&self, account_id: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let k = account_key(account_id);
        self.map.retain(|_, v| v.account_key != k);
    }

    /// Drops every entry (used when changes may have been missed). The id links stay: removing
    /// them would race with a fill that read the epoch after this bump and found its link
    /// present, leaving an entry that a later revocation by id could not find. They are 16
    /// bytes each and never wrong.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.map.clear();
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
        TokenRow::test(id, account)
    }

    fn entry(c: &TokenCache, hash: [u8; 32], id: &str, account: &str) -> Arc<CachedToken> {
        c.entry(&hash, row(id, account))
    }

    /// Every field the gateway reads, from the entry and from the row, side by side.
    fn assert_same(e: &CachedToken, r: &TokenRow) {
        assert_eq!(e.id(), r.id);
        assert_eq!(e.prefix(), r.prefix);
        assert_eq!(e.name(), r.name);
        assert_eq!(e.account(), r.account);
        assert_eq!(e.account_key(), account_key(&r.account_id));
        assert_eq!(e.role(), r.role.as_deref());
        assert_eq!(e.permissions(), &r.permissions[..]);
        assert_eq!(e.permissions_header(), r.permissions.join(","));
        assert_eq!(e.scopes(), &r.scopes);
        assert_eq!(e.allowed_cidrs(), &r.allowed_cidrs[..]);
        assert_eq!(e.rate(), r.rate);
        assert_eq!(e.rotated_from(), r.rotated_from.as_deref());
        assert_eq!(e.rotation_deadline(), r.rotation_deadline);
        assert_eq!(e.created_at(), r.created_at);
        assert_eq!(e.expires_at(), r.expires_at);
        assert_eq!(e.revoked(), r.revoked_at.is_some());
        assert_eq!(e.account_disabled(), r.account_disabled_at.is_some());
    }

    #[test]
    fn the_compact_entry_keeps_every_field_the_gateway_reads() {
        let hash: TokenHash = std::array::from_fn(|i| i as u8);
        let plain = row("tok_aaaaaaaaaaaaaaaa", "acc_bbbbbbbbbbbbbbbb");
        let e = CachedToken::new(&hash, plain.clone());
        assert_same(&e, &plain);
        assert!(e.extras.is_none(), "a plain token has no extras box");
        assert!(e.predecessor_retired.load(Ordering::Relaxed));
        assert!(e.is_for(&hash));
        let mut other = hash;
        other[31] ^= 1;
        assert!(!e.is_for(&other));

        let mut full = row("tok_cccccccccccccccc", "acc_dddddddddddddddd");
        full.account = "billing-team".into();
        full.name = "ci deploy ü".into();
        full.role = Some("deployer".into());
        full.permissions = vec!["apps:read".into(), "apps:deploy".into()];
        full.scopes = BTreeMap::from([("app".into(), vec!["billing".into(), "web-*".into()])]);
        full.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        full.rate = Some(RateOverride {
            requests_per_second: 2.5,
            burst: 7,
        });
        full.created_at = 1_700_000_000_000;
        full.expires_at = Some(i64::MAX);
        full.revoked_at = Some(5);
        full.account_disabled_at = Some(6);
        full.rotated_from = Some("tok_eeeeeeeeeeeeeeee".into());
        full.rotation_deadline = Some(1_800_000_000_000);
        let e = CachedToken::new(&hash, full.clone());
        assert_same(&e, &full);
        assert!(
            !e.predecessor_retired.load(Ordering::Relaxed),
            "an unused rotated token still has to retire its predecessor"
        );
        full.last_used_at = Some(1);
        let e = CachedToken::new(&hash, full.clone());
        assert!(e.predecessor_retired.load(Ordering::Relaxed));

        // Strings too long for 16-bit offsets still come back exactly.
        let mut long = row("tok_ffffffffffffffff", "acc_gggggggggggggggg");
        long.name = "x".repeat(70_000);
        long.account = "a".repeat(100);
        let e = CachedToken::new(&hash, long.clone());
        assert_same(&e, &long);
    }

    #[test]
    fn the_entry_stays_small() {
        // 88 bytes + 16 for the Arc counts = 104: glibc's 112-byte size class. Growing this
        // moves every cached token to the next class (see docs/performance.md).
        assert!(
            std::mem::size_of::<CachedToken>() <= 88,
            "CachedToken is {} bytes",
            std::mem::size_of::<CachedToken>()
        );
    }

    #[test]
    fn equal_permission_lists_are_shared() {
        let c = TokenCache::new();
        let mut a = row("tok_a", "acc");
        a.role = Some("viewer".into());
        a.permissions = vec!["apps:read".into()];
        let mut b = row("tok_b", "acc");
        b.role = Some("viewer".into());
        b.permissions = vec!["apps:read".into()];
        let mut d = row("tok_d", "acc");
        d.role = Some("ops".into());
        d.permissions = vec!["apps:read".into()];
        let (ea, eb, ed) = (
            c.entry(&[1; 32], a),
            c.entry(&[2; 32], b),
            c.entry(&[3; 32], d),
        );
        assert!(Arc::ptr_eq(ea.grants(), eb.grants()));
        assert!(
            !Arc::ptr_eq(ea.grants(), ed.grants()),
            "the role is part of the pair"
        );
        assert_eq!(ed.role(), Some("ops"));
        assert_eq!(c.interned_grants(), 2);
    }

    #[test]
    fn the_interner_is_bounded_and_drops_unused_lists_first() {
        let c = TokenCache::new();
        let distinct = |i: usize| {
            let mut r = row(&format!("tok_{i}"), "acc");
            r.permissions = vec![format!("res{i}:read")];
            r
        };
        let held: Vec<_> = (0..MAX_INTERNED_GRANTS + 10)
            .map(|i| c.entry(&[0; 32], distinct(i)))
            .collect();
        assert_eq!(c.interned_grants(), MAX_INTERNED_GRANTS);
        // Past the bound a list is still exact, just not shared.
        let last = held.last().unwrap();
        assert_eq!(
            last.permissions(),
            [format!("res{}:read", MAX_INTERNED_GRANTS + 9)]
        );
        drop(held);
        let e = c.entry(&[0; 32], distinct(99_999));
        assert_eq!(
            c.interned_grants(),
            1,
            "unused lists were dropped to make room"
        );
        assert_eq!(e.permissions(), ["res99999:read"]);
    }

    #[test]
    fn tokens_sharing_a_map_key_are_told_apart() {
        let c = TokenCache::new();
        let first = [7; 32];
        let mut second = [7; 32];
        second[20] = 8; // same first 8 bytes, different hash
        assert!(c.fill(first, entry(&c, first, "tok_a", "acc"), c.epoch()));
        assert!(c.get(&second).is_none(), "a key match is not a hash match");
        // The newcomer's read is current (true) but it is not cached: the slot is taken.
        assert!(c.fill(second, entry(&c, second, "tok_b", "acc"), c.epoch()));
        assert!(c.get(&second).is_none());
        assert_eq!(c.get(&first).unwrap().id(), "tok_a");
        c.invalidate_token("tok_b");
        assert_eq!(c.get(&first).unwrap().id(), "tok_a");
        c.invalidate_token("tok_a");
        assert!(c.get(&first).is_none());
    }

    #[test]
    fn a_token_whose_id_key_is_taken_is_not_cached() {
        let c = TokenCache::new();
        // Pretend another token's id hashed to tok_b's id key.
        c.by_id.insert(c.id_key("tok_b"), hash_key(&[5; 32]));
        assert!(c.fill([5; 32], entry(&c, [5; 32], "tok_a", "acc"), c.epoch()));
        assert!(c.get(&[5; 32]).is_some(), "tok_a has its own link");
        assert!(c.fill([6; 32], entry(&c, [6; 32], "tok_b", "acc"), c.epoch()));
        assert!(
            c.get(&[6; 32]).is_none(),
            "without its own link a revocation by id could not find it"
        );
        // Revoking tok_b leaves tok_a alone; revoking tok_a still finds it.
        c.invalidate_token("tok_b");
        assert!(c.get(&[5; 32]).is_some());
        c.invalidate_token("tok_a");
        assert!(c.get(&[5; 32]).is_none());
    }

    #[test]
    fn clear_keeps_the_id_links() {
        let c = TokenCache::new();
        assert!(c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc"), c.epoch()));
        c.clear();
        assert!(c.get(&[1; 32]).is_none());
        assert_eq!(c.by_id.len(), 1, "a link is never removed");
        assert!(c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc"), c.epoch()));
        c.invalidate_token("tok_a");
        assert!(c.get(&[1; 32]).is_none());
    }

    #[test]
    fn fill_after_invalidation_is_refused() {
        let c = TokenCache::new();
        let e = c.epoch();
        c.invalidate_token("tok_a");
        assert!(!c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc"), e));
        assert!(c.get(&[1; 32]).is_none());
    }

    #[test]
    fn invalidation_removes_filled_entries() {
        let c = TokenCache::new();
        assert!(c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc1"), c.epoch()));
        assert!(c.fill([2; 32], entry(&c, [2; 32], "tok_b", "acc2"), c.epoch()));
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
        assert!(c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc"), c.epoch()));
        c.distrust();
        assert!(!c.is_trusted());
        assert!(c.get(&[1; 32]).is_none(), "distrust drops what was cached");
        assert!(!c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc"), c.epoch()));
        c.trust();
        assert!(c.fill([1; 32], entry(&c, [1; 32], "tok_a", "acc"), c.epoch()));
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
                    c.fill([9; 32], entry(&c, [9; 32], "tok_x", "acc"), e);
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
