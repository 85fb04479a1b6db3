//! The on-disk format of the audit log: one JSON object per line, `kind` first, then the
//! record, then `seq` and the hash `chain` (SHA-256 over the previous line's chain and this line
//! without its chain) — how a line is sealed, parsed back, how the last record of a file is
//! found, how the files of a rotated set are named, and reading a log file line by line.
//!
//! Owns no thread and no state; its only change to the file system is shifting the rotated set
//! (`audit.log` → `.1` → ... → `.5`). Never imports `config`, nor the writer, verifier or reader
//! (they import it).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuditError, Entry};
use crate::token::hex;

mod json;

/// How many size-rotated files are kept (`audit.log.1` ..= `audit.log.5`).
pub const ROTATE_KEEP: u32 = 5;
/// The `prev` of the first line of a brand-new log.
pub const GENESIS_CHAIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `open` scans back at most this far for the last complete record before refusing the file.
pub(super) const TAIL_SCAN_LIMIT: u64 = 16 * 1024 * 1024;
/// `,"chain":"` + 64 hex + `"}`.
const CHAIN_SUFFIX_LEN: usize = 76;
const CHAIN_PREFIX: &[u8] = b",\"chain\":\"";

pub(super) fn rotated_name(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Appends the JSON object of `entry`: the hand-written encoder for request and completion
/// records, serde_json for the others. False when nothing usable was written.
fn write_object(buf: &mut Vec<u8>, entry: &Entry) -> bool {
    json::write_entry(buf, entry)
        || (serde_json::to_writer(&mut *buf, entry).is_ok() && buf.last() == Some(&b'}'))
}

/// The JSON object of `entry` as [`encode`] writes it (for the property test that holds the
/// hand-written encoder to serde_json's output).
#[cfg(test)]
pub(super) fn entry_json(entry: &Entry) -> Vec<u8> {
    let mut buf = Vec::new();
    write_object(&mut buf, entry);
    buf
}

/// Seals `entry` as line `seq` of the chain whose last link is `prev` (hex):
/// `{"kind":...,...,"seq":N,"chain":"<hex>"}\n`. Returns the line and its chain.
pub(super) fn encode(entry: &Entry, seq: u64, prev: &str) -> (Vec<u8>, String) {
    let mut line = Vec::with_capacity(512);
    if !write_object(&mut line, entry) {
        // Unreachable for these types; keep the seq continuous rather than drop a record.
        tracing::error!("an audit record could not be serialized");
        line.clear();
        line.extend_from_slice(br#"{"kind":"unencodable"}"#);
    }
    line.pop();
    line.extend_from_slice(b",\"seq\":");
    json::integer(&mut line, seq);
    line.push(b'}');
    let chain = chain_hex(prev.as_bytes(), &[&line]);
    line.pop();
    line.extend_from_slice(CHAIN_PREFIX);
    line.extend_from_slice(chain.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, chain)
}

/// The chain of a line: SHA-256 (hex) of the previous line's chain (hex) followed by this line
/// without its `chain` field (`unchained`, given in parts).
pub(super) fn chain_hex(prev_hex: &[u8], unchained: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hex);
    for part in unchained {
        h.update(part);
    }
    hex(&h.finalize())
}

// ---------------------------------------------------------------------------------------------
// Parsing lines (shared by open, verify)
// ---------------------------------------------------------------------------------------------

pub(super) enum Parsed<'a> {
    NotJson,
    NoChain,
    Record {
        seq: u64,
        chain: &'a [u8],
        /// The line without `,"chain":"..."}`; the chain covers `head` + `}`.
        head: &'a [u8],
    },
}

pub(super) fn parse_line(line: &[u8]) -> Parsed<'_> {
    #[derive(Deserialize)]
    struct SeqChain {
        seq: Option<u64>,
        chain: Option<String>,
    }
    if line.first() != Some(&b'{') {
        return Parsed::NotJson;
    }
    let Ok(v) = serde_json::from_slice::<SeqChain>(line) else {
        return Parsed::NotJson;
    };
    let (Some(seq), Some(chain)) = (v.seq, v.chain) else {
        return Parsed::NoChain;
    };
    if line.len() < CHAIN_SUFFIX_LEN + 1 {
        return Parsed::NoChain;
    }
    let (head, suffix) = line.split_at(line.len() - CHAIN_SUFFIX_LEN);
    let hex = &suffix[CHAIN_PREFIX.len()..CHAIN_SUFFIX_LEN - 2];
    if !suffix.starts_with(CHAIN_PREFIX)
        || !suffix.ends_with(b"\"}")
        || hex != chain.as_bytes()
        || !hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Parsed::NoChain;
    }
    Parsed::Record {
        seq,
        chain: hex,
        head,
    }
}

#[derive(Default)]
pub(super) struct Tail {
    /// (seq, chain) of the last complete record.
    pub(super) last: Option<(u64, String)>,
    /// The file does not end with `\n`.
    pub(super) torn: bool,
    /// Complete lines after the last record that are not records (torn remnants of old crashes).
    pub(super) skipped: u64,
}

pub(super) fn shift_rotated(path: &Path) -> io::Result<()> {
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    ignore_missing(fs::remove_file(rotated_name(path, ROTATE_KEEP)))?;
    for n in (1..ROTATE_KEEP).rev() {
        ignore_missing(fs::rename(rotated_name(path, n), rotated_name(path, n + 1)))?;
    }
    // NotFound: the live file was deleted behind our back; just start a fresh one.
    ignore_missing(fs::rename(path, rotated_name(path, 1)))
}

pub(super) fn ends_with_newline(path: &Path) -> io::Result<bool> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    Ok(b[0] == b'\n')
}

/// Finds the last complete record by reading backwards in growing windows.
pub(super) fn read_tail(path: &Path) -> Result<Tail, AuditError> {
    let io_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(e) => return Err(io_err(e)),
    };
    let len = f.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok(Tail::default());
    }
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start)).map_err(io_err)?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        (&mut f)
            .take(len - start)
            .read_to_end(&mut buf)
            .map_err(io_err)?;
        let torn = buf.last() != Some(&b'\n');
        // Only lines that end with '\n' are complete; a window not at the file start begins mid-line.
        let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let body = &buf[..end];
        let first_complete = if start == 0 {
            0
        } else {
            body.iter()
                .position(|&b| b == b'\n')
                .map_or(body.len(), |i| i + 1)
        };
        let mut skipped = 0;
        let lines = body[first_complete..].strip_suffix(b"\n").unwrap_or(&[]);
        if !body[first_complete..].is_empty() {
            for line in lines.rsplit(|&b| b == b'\n') {
                if let Parsed::Record { seq, chain, .. } = parse_line(line) {
                    let chain = String::from_utf8_lossy(chain).into_owned();
                    return Ok(Tail {
                        last: Some((seq, chain)),
                        torn,
                        skipped,
                    });
                }
                skipped += 1;
            }
        }
        if start == 0 {
            return Ok(Tail {
                last: None,
                torn,
                skipped,
            });
        }
        if window >= TAIL_SCAN_LIMIT {
            return Err(AuditError::NotAuditLog {
                path: path.to_owned(),
            });
        }
        window *= 4;
    }
}

/// Opens a log file for reading.
pub(super) fn open_log(path: &Path) -> Result<File, AuditError> {
    File::open(path).map_err(|source| AuditError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Streams `path` line by line (never loading it whole): `each(line_no, line, terminated)`
/// gets the 1-based line number and the line without its `\n` (`terminated` is false only for an
/// unterminated last line). Stops early when `each` returns `Ok(false)`. `buf` is reused.
pub(super) fn read_lines(
    path: &Path,
    buf: &mut Vec<u8>,
    mut each: impl FnMut(u64, &[u8], bool) -> Result<bool, AuditError>,
) -> Result<(), AuditError> {
    let mut r = BufReader::with_capacity(64 * 1024, open_log(path)?);
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = r.read_until(b'\n', buf).map_err(|source| AuditError::Io {
            path: path.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let terminated = buf.last() == Some(&b'\n');
        if terminated {
            buf.pop();
        }
        if !each(line_no, buf, terminated)? {
            return Ok(());
        }
    }
}
