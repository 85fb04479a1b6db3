//! Store-scale benchmark (issue 9): a fresh SQLite store with 1,000,000 tokens.
//!
//! Reports: creation time, file size, cold lookup latency (token-cache miss, `Store::lookup_hash`
//! on a freshly opened store), gateway start time and RSS with that store (`tokengate::app::start`
//! to bound listeners), and RSS per 100k cached tokens (cache filled through real lookups on one
//! thread), then the same for the cache alone (synthetic rows of the same shape, no store, in a
//! child process so its heap starts empty). Cache memory is the growth of `RssAnon` (heap), not
//! `VmRSS`; both are printed. (The store's readers mapped the database file until issue 16, which
//! counted the pages a fill touched in `VmRSS` as `RssFile`; they read with `pread` now.)
//!
//! Usage:
//!   cargo run --release --example store_scale -- [--tokens N] [--lookups N] [--cache N] [--dir DIR]
//! Defaults: 1,000,000 tokens, 10,000 lookups, 500,000 cached tokens, a temp dir (removed at the
//! end; with `--dir` the files are kept, and a later run with the same `--dir` measures that
//! store again without re-creating it). Tokens are spread over accounts of 5 tokens each (the
//! default per-account cap). Rows are written with the store's own schema (migrations run by
//! `Store::open`) through rusqlite in transactions of 10,000, with the store's pragmas (WAL,
//! synchronous=FULL). No plaintext token is kept or printed: only hashes are used.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rusqlite::{Connection, params};
use tokengate::cache::{CachedToken, Grants};
use tokengate::config::Config;
use tokengate::store::Store;
use tokengate::token::{self, TokenHash};

/// The allocator the `tokengate` binary runs with (src/main.rs), so the memory figures are the
/// binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKENS_PER_ACCOUNT: usize = 5;
const BATCH: usize = 10_000;

struct Args {
    tokens: usize,
    lookups: usize,
    cache: usize,
    dir: Option<PathBuf>,
    /// Internal: run only the cache-alone measurement (in a fresh process, so its heap starts
    /// empty) and exit.
    cache_alone: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        tokens: 1_000_000,
        lookups: 10_000,
        cache: 500_000,
        dir: None,
        cache_alone: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = || -> usize {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| usage(&flag))
        };
        match flag.as_str() {
            "--tokens" => a.tokens = num(),
            "--lookups" => a.lookups = num(),
            "--cache" => a.cache = num(),
            "--cache-alone" => a.cache_alone = Some(num()),
            "--dir" => {
                a.dir = Some(
                    it.next()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| usage("--dir")),
                )
            }
            _ => usage(&flag),
        }
    }
    a.cache = a.cache.min(a.tokens);
    a.lookups = a.lookups.min(a.tokens);
    a
}

fn usage(flag: &str) -> ! {
    eprintln!(
        "store_scale: bad argument {flag}\nusage: store_scale [--tokens N] [--lookups N] [--cache N] [--dir DIR]"
    );
    std::process::exit(64)
}

/// Bytes this process made the kernel read from storage (`/proc/self/io`).
fn read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("read_bytes:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A `/proc/self/status` figure of this process, in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    status_kib("VmRSS")
}

/// Anonymous (heap) resident memory of this process, in KiB: what the token cache occupies.
fn anon_kib() -> u64 {
    status_kib("RssAnon")
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Writes `n` tokens (and their accounts) with the store's schema; returns every token's hash.
fn create(db: &Path, n: usize) -> rusqlite::Result<Vec<TokenHash>> {
    let mut c = Connection::open(db)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    let now = tokengate::store::system_now_ms();
    let expires = now + 90 * 86_400_000;
    let mut hashes = Vec::with_capacity(n);
    let mut account_id = String::new();
    let mut done = 0;
    while done < n {
        let tx = c.transaction()?;
        {
            let mut acc = tx.prepare_cached(
                "INSERT INTO accounts (id, name, email, created_at, created_by) VALUES (?1, ?2, NULL, ?3, 'store_scale')",
            )?;
            let mut tok = tx.prepare_cached(
                "INSERT INTO tokens (id, account_id, name, display_prefix, hash, role, permissions, scopes, \
                 allowed_cidrs, rate_rps, rate_burst, created_at, created_by, expires_at, rotated_from) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'viewer', '[\"apps:read\",\"logs:read\"]', '{}', '[]', NULL, NULL, ?6, \
                 'store_scale', ?7, NULL)",
            )?;
            for i in done..(done + BATCH).min(n) {
                if i % TOKENS_PER_ACCOUNT == 0 {
                    account_id = token::new_id("acc");
                    acc.execute(params![
                        account_id,
                        format!("account-{:07}", i / TOKENS_PER_ACCOUNT),
                        now
                    ])?;
                }
                let new = token::generate("tg");
                tok.execute(params![
                    token::new_id("tok"),
                    account_id,
                    format!("ci-token-{}", i % TOKENS_PER_ACCOUNT),
                    new.display_prefix,
                    &new.hash[..],
                    now,
                    expires
                ])?;
                hashes.push(new.hash);
                // `new` (with the plaintext) is dropped here; nothing else ever sees it.
            }
        }
        tx.commit()?;
        done = (done + BATCH).min(n);
        if done % 100_000 == 0 || done == n {
            eprintln!("  created {done} tokens");
        }
    }
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(hashes)
}

/// Fills the gateway's token cache through real store lookups, printing `RssAnon` every 100k
/// tokens. Returns (tokens filled, `RssAnon` before, `RssAnon` after) in KiB.
fn fill_cache(gw: &tokengate::gateway::Gateway, hashes: &[TokenHash]) -> (usize, u64, u64) {
    let base = anon_kib();
    let mut last = base;
    let mut filled = 0;
    for step in hashes.chunks(100_000) {
        for h in step {
            let epoch = gw.cache().epoch();
            let row = gw.store().lookup_hash(h).expect("lookup").expect("found");
            let entry = gw.cache().entry(h, row);
            assert!(gw.cache().fill(*h, entry, epoch));
        }
        filled += step.len();
        let now = anon_kib();
        println!(
            "cache {:>7} tokens  RssAnon {} KiB  (+{} KiB for these {}: {:.0} bytes/token)  VmRSS {} KiB",
            filled,
            now,
            now.saturating_sub(last),
            step.len(),
            now.saturating_sub(last) as f64 * 1024.0 / step.len() as f64,
            rss_kib()
        );
        last = now;
    }
    (filled, base, last)
}

/// The cache alone, without a store: `n` entries from rows shaped like the ones `create` writes
/// (same id, prefix, name and account formats, role `viewer`, two permissions, an expiry).
/// Separates what the cache holds from what SQLite and the lookups leave on the heap.
fn cache_alone(n: usize) {
    let cache = tokengate::cache::TokenCache::new();
    let base = anon_kib();
    let mut last = base;
    let now = tokengate::store::system_now_ms();
    let mut rng = rand::rng();
    for i in 0..n {
        let hash: TokenHash = rng.random();
        let row = tokengate::store::TokenRow {
            id: token::new_id("tok"),
            account_id: token::new_id("acc"),
            account: format!("account-{:07}", i / TOKENS_PER_ACCOUNT),
            name: format!("ci-token-{}", i % TOKENS_PER_ACCOUNT),
            prefix: format!("tg_{}", &token::new_id("x")[2..10]),
            role: Some("viewer".into()),
            permissions: vec!["apps:read".into(), "logs:read".into()],
            scopes: Default::default(),
            allowed_cidrs: vec![],
            rate: None,
            created_at: now,
            created_by: "store_scale".into(),
            expires_at: Some(now + 90 * 86_400_000),
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            rotated_from: None,
            rotation_deadline: None,
            account_disabled_at: None,
        };
        let entry = cache.entry(&hash, row);
        assert!(cache.fill(hash, entry, cache.epoch()));
        if (i + 1) % 100_000 == 0 || i + 1 == n {
            let now = anon_kib();
            println!(
                "cache alone {:>7}  +{} KiB for the last step ({:.0} bytes/token), {:.0} bytes/token on average",
                i + 1,
                now.saturating_sub(last),
                now.saturating_sub(last) as f64 * 1024.0 / ((i % 100_000) + 1) as f64,
                now.saturating_sub(base) as f64 * 1024.0 / (i + 1) as f64,
            );
            last = now;
        }
    }
}

fn main() {
    let a = args();
    if let Some(n) = a.cache_alone {
        cache_alone(n);
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("create dir");
    let db = dir.join("tokengate.db");
    let hashes = if db.exists() {
        // A store made by an earlier run (`--dir`): measure it again without re-creating it.
        let c = Connection::open(&db).expect("open existing store");
        let mut st = c.prepare("SELECT hash FROM tokens").expect("select");
        let hashes: Vec<TokenHash> = st
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .expect("hashes")
            .filter_map(|h| h.ok().and_then(|h| h.try_into().ok()))
            .collect();
        println!(
            "# store_scale: reusing {} ({} tokens)",
            db.display(),
            hashes.len()
        );
        hashes
    } else {
        println!("# store_scale: {} tokens", a.tokens);
        // Schema exactly as the gateway makes it.
        drop(Store::open(&db, Duration::from_millis(250)).expect("store"));
        let t = Instant::now();
        let hashes = create(&db, a.tokens).expect("bulk insert");
        let took = t.elapsed();
        println!(
            "creation            {:.1} s ({:.0} tokens/s, transactions of {BATCH}, synchronous=FULL)",
            took.as_secs_f64(),
            a.tokens as f64 / took.as_secs_f64()
        );
        hashes
    };
    // Shared with the fill thread without a copy.
    let hashes = Arc::new(hashes);
    let a = Args {
        cache: a.cache.min(hashes.len()),
        lookups: a.lookups.min(hashes.len()),
        ..a
    };
    println!(
        "# {} cold lookups per pass, {} cached tokens",
        a.lookups, a.cache
    );
    let size = file_len(&db) + file_len(&dir.join("tokengate.db-wal"));
    println!(
        "file size           {} ({:.0} bytes/token incl. accounts and indexes)",
        mib(size),
        size as f64 / hashes.len() as f64
    );

    {
        let c = Connection::open(&db).expect("open");
        let mut st = c
            .prepare(
                "EXPLAIN QUERY PLAN SELECT t.id, t.permissions, a.name, a.disabled_at FROM tokens t \
                 JOIN accounts a ON a.id = t.account_id WHERE t.hash = ?1",
            )
            .expect("explain");
        let plan: Vec<String> = st
            .query_map([&[0u8; 32][..]], |r| r.get::<_, String>(3))
            .expect("plan")
            .filter_map(Result::ok)
            .collect();
        println!("lookup query plan   {}", plan.join("; "));
    }

    // Cold lookups: a freshly opened store (empty SQLite page cache, new reader connection), no
    // token cache. The OS page cache is warm from the creation (it cannot be dropped here).
    let store = Store::open(&db, Duration::from_millis(250)).expect("store");
    let mut rng = rand::rng();
    let first = Instant::now();
    store
        .lookup_hash(&hashes[rng.random_range(0..hashes.len())])
        .expect("lookup");
    let first = first.elapsed();
    println!(
        "first lookup        {} (opens a reader connection)",
        us(first)
    );
    // Two passes over different random tokens: the first after opening (SQLite page cache
    // empty), the second with whatever the first left in it. `read_bytes` shows whether the
    // kernel had to go to the disk.
    for pass in 1..=2 {
        let io_before = read_bytes();
        let mut times = Vec::with_capacity(a.lookups);
        for _ in 0..a.lookups {
            let h = &hashes[rng.random_range(0..hashes.len())];
            let t = Instant::now();
            let row = store.lookup_hash(h).expect("lookup");
            times.push(t.elapsed());
            assert!(row.is_some(), "every created token is found");
        }
        times.sort();
        println!(
            "cold lookup pass {pass}  p50 {}  p99 {}  p99.9 {}  max {}  (disk reads {} KiB)",
            us(pct(&times, 0.50)),
            us(pct(&times, 0.99)),
            us(pct(&times, 0.999)),
            us(*times.last().unwrap_or(&Duration::ZERO)),
            read_bytes().saturating_sub(io_before) / 1024
        );
    }
    let mut misses = Vec::with_capacity(a.lookups);
    for _ in 0..a.lookups {
        let h: TokenHash = rng.random();
        let t = Instant::now();
        assert!(store.lookup_hash(&h).expect("lookup").is_none());
        misses.push(t.elapsed());
    }
    misses.sort();
    println!(
        "unknown token       p50 {}  p99 {}  (hash not in the store)",
        us(pct(&misses, 0.50)),
        us(pct(&misses, 0.99))
    );
    drop(store);

    // Where a lookup's time goes: the bare SQL (same query, no row decoding) on a connection
    // with SQLite's default 2 MiB page cache, and on one that maps the file (`mmap_size`), which
    // turns each page read from a `pread` syscall into a memory access.
    // The third adds what the store's readers also set: the query planner stability guarantee,
    // without which SQLite re-prepares this join on every new bound hash.
    for (label, mmap, qpsg) in [
        ("sql only, default", 0i64, false),
        ("sql only, mmap 1 GiB", 1 << 30, false),
        ("sql only, mmap + QPSG", 1 << 30, true),
        // What the store's readers run since issue 16: QPSG, the file not mapped.
        ("sql only, QPSG", 0, true),
    ] {
        let c = Connection::open(&db).expect("open");
        c.pragma_update(None, "mmap_size", mmap).expect("mmap_size");
        c.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            qpsg,
        )
        .expect("qpsg");
        let mut st = c
            .prepare(
                "SELECT t.id, t.permissions, a.name, a.disabled_at FROM tokens t \
                 JOIN accounts a ON a.id = t.account_id WHERE t.hash = ?1",
            )
            .expect("prepare");
        let mut times = Vec::with_capacity(a.lookups);
        for _ in 0..a.lookups {
            let h = &hashes[rng.random_range(0..hashes.len())];
            let t = Instant::now();
            let id: String = st.query_row([&h[..]], |r| r.get(0)).expect("row");
            times.push(t.elapsed());
            assert!(!id.is_empty());
        }
        times.sort();
        println!(
            "{label:<22}p50 {}  p99 {}",
            us(pct(&times, 0.50)),
            us(pct(&times, 0.99))
        );
    }

    // Gateway start with that store.
    let audit = dir.join("audit.log");
    let cfg_path = dir.join("tokengate.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{}\"\n[audit]\npath = \"{}\"\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n\
             [[routes.rules]]\nmethods = [\"GET\"]\npath = \"/apps/{{app}}/**\"\npermission = \"apps:read\"\n",
            db.display(),
            audit.display()
        ),
    )
    .expect("write config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let rss_before = rss_kib();
        let t = Instant::now();
        let cfg = Config::load(&cfg_path).expect("config");
        let started = tokengate::app::start(cfg).await.map_err(|e| e.message).expect("start");
        let start_time = t.elapsed();
        let rss_started = rss_kib();
        println!(
            "gateway start       {} ms (config, store open + ping, audit log, bind; listening on {})",
            start_time.as_millis(),
            started.server.public_addr()
        );
        println!(
            "RSS                 {} KiB before start, {} KiB after start (+{} KiB; includes the 32 MiB of hashes this tool holds)",
            rss_before,
            rss_started,
            rss_started.saturating_sub(rss_before)
        );

        // Fill the token cache through real lookups, 100k at a time, and watch RSS grow.
        println!(
            "entry sizes         CachedToken {} B (+16 B Arc counts, one allocation), Grants {} B (interned), map slots 16 B (key + Arc) and 16 B (id key + map key) per token",
            std::mem::size_of::<CachedToken>(),
            std::mem::size_of::<Grants>(),
        );
        // One blocking thread does every lookup and fill, so the figures are not blurred by
        // allocator arenas of several threads or by copies this tool makes.
        let gw = started.gateway.clone();
        let (rss_base, file_base) = (rss_kib(), status_kib("RssFile"));
        let (filled, base, last) = {
            let (gw, hashes, cache) = (gw.clone(), hashes.clone(), a.cache);
            tokio::task::spawn_blocking(move || fill_cache(&gw, &hashes[..cache]))
                .await
                .expect("fill")
        };
        if filled > 0 {
            println!(
                "cache memory        {:.0} bytes per cached token on average (RssAnon growth; {} tokens, {} KiB; cache len {}, {} interned permission lists)",
                last.saturating_sub(base) as f64 * 1024.0 / filled as f64,
                filled,
                last.saturating_sub(base),
                gw.cache().len(),
                gw.cache().interned_grants()
            );
            println!(
                "VmRSS growth        {} KiB, of which RssFile (mapped store pages, OS page cache) +{} KiB",
                rss_kib().saturating_sub(rss_base),
                status_kib("RssFile").saturating_sub(file_base)
            );
        }
        drop(started);
    });
    // In a child process: freed memory of the gateway's cache would otherwise be reused.
    let status = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--cache-alone", &a.cache.to_string()])
        .status()
        .expect("cache-alone run");
    assert!(status.success(), "cache-alone run failed");
    if a.dir.is_some() {
        println!("files kept in {}", dir.display());
    } else {
        drop(tmp);
    }
}
