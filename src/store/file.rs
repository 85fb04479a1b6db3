//! The identity of a SQLite store's file (issue 16): what the engine checks before every call,
//! so that a file deleted, replaced or truncated under a running process is refused instead of
//! read from the old inode, from a new file, or past its end.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// The file a store opened: its device and inode, and an open handle on it to read its header
/// (through `pread`, whatever the path names now).
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    handle: File,
    /// Set once the file was seen truncated or overwritten, with what was seen: whatever is
    /// written into the same inode afterwards (a copy over it, a new schema) is not the store
    /// the connections' caches and the WAL index describe, so it stays refused until a restart.
    damaged: Mutex<Option<String>>,
}

impl FileIdentity {
    pub(crate) fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let handle = File::open(path)?;
        let m = handle.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            handle,
            damaged: Mutex::new(None),
        })
    }

    /// [`FileIdentity::inspect`], remembering damage for good.
    pub(crate) fn problem(&self, path: &Path) -> Option<String> {
        let mut damaged = self.damaged.lock().expect("damaged poisoned");
        if let Some(seen) = damaged.as_ref() {
            return Some(seen.clone());
        }
        let (problem, is_damage) = self.inspect(path)?;
        if is_damage {
            *damaged = Some(problem.clone());
        }
        Some(problem)
    }

    /// What is wrong with the file at `path` now, if anything: gone, another file, or no longer a
    /// whole SQLite database (empty, its header overwritten, or shorter than its header says).
    /// A file shorter than its header says is looked at again (after 10, 50 and 250 ms) before
    /// it counts: our own connections grow the file before a checkpoint writes into it (the
    /// chunk size set in `open_conn`), but another program's checkpoint (the `sqlite3` shell)
    /// writes page 1, with the new page count, before the pages that extend the file.
    /// The bool is true for damage to the file itself (truncated, overwritten).
    fn inspect(&self, path: &Path) -> Option<(String, bool)> {
        const LOOK_AGAIN_MS: [u64; 3] = [10, 50, 250];
        for ms in LOOK_AGAIN_MS {
            match self.look(path) {
                Look::Short { .. } => std::thread::sleep(Duration::from_millis(ms)),
                Look::Whole => return None,
                Look::Problem(problem, damage) => return Some((problem, damage)),
            }
        }
        match self.look(path) {
            Look::Whole => None,
            Look::Problem(problem, damage) => Some((problem, damage)),
            Look::Short { len, header_says } => Some((
                format!("was truncated (now {len} bytes, its header says {header_says} bytes)"),
                true,
            )),
        }
    }

    /// One look at the file: two syscalls, a 100-byte `pread` of the header and then a `stat`
    /// of the path. In that order: a checkpoint grows the file before it writes the header
    /// that counts the new pages, so a length taken after the header is never older than it.
    pub(super) fn look(&self, path: &Path) -> Look {
        let mut header = [0u8; 100];
        let header_read = self.handle.read_exact_at(&mut header, 0);
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Look::Problem("was deleted or moved away".into(), false);
            }
            Err(e) => return Look::Problem(format!("cannot be inspected ({e})"), false),
        };
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Look::Problem("was replaced by another file".into(), false);
        }
        let len = m.len();
        if len < header.len() as u64 || header_read.is_err() {
            return Look::Problem(format!("was truncated (now {len} bytes)"), true);
        }
        if &header[..16] != b"SQLite format 3\0" {
            return Look::Problem("was overwritten (no SQLite header)".into(), true);
        }
        let page_size = match u16::from_be_bytes([header[16], header[17]]) {
            1 => 65536,
            n => u64::from(n),
        };
        let word = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4"));
        // The page count is valid when the change counter matches "version-valid-for".
        let pages = if word(24) == word(92) {
            u64::from(word(28))
        } else {
            0
        };
        if len >= pages * page_size {
            Look::Whole
        } else {
            Look::Short {
                len,
                header_says: pages * page_size,
            }
        }
    }
}

/// What one look at a store's file saw.
#[derive(Debug, PartialEq)]
pub(super) enum Look {
    Whole,
    /// Shorter than its header says: truncated, or a checkpoint half way through growing it.
    Short {
        len: u64,
        header_says: u64,
    },
    /// The problem, and whether it is damage to the file itself.
    Problem(String, bool),
}
