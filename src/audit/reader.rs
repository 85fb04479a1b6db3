//! The operator reader behind `tokengate audit`: filters, `query` (stream the log, print
//! matching lines as a table or JSON) and `follow` (like `tail -f`, across rotation).
//!
//! Owns [`Filter`], [`OutputFormat`], the table layout and time arguments. Never imports
//! `config`, `cli` (the CLI calls in, not the other way round), the writer or the verifier.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::line::{ROTATE_KEEP, open_log, read_lines, rotated_name};
use super::{AuditError, CompletionRecord, Entry, RequestRecord};

/// `follow` polls the file this often.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Filters of `tokengate audit`; all set filters must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// matches api_token_name, api_token_id or token_prefix (exact, or prefix for token_prefix);
    /// admin lines also match on `target`.
    pub token: Option<String>,
    /// Exact account.
    pub account: Option<String>,
    /// allow|deny (request lines only).
    pub decision: Option<String>,
    /// Exact reason.
    pub reason: Option<String>,
    /// "403" exact or "4xx" class (request lines only).
    pub status: Option<String>,
    /// Inclusive lower bound on `timestamp`.
    pub since: Option<OffsetDateTime>,
    /// Exclusive upper bound on `timestamp`.
    pub until: Option<OffsetDateTime>,
    /// Admin event, exact or `token.*` (admin lines only).
    pub event: Option<String>,
}

/// How `query` and `follow` print matching lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Fixed columns for people.
    Table,
    /// The original JSON lines, byte for byte — except a forwarded request, whose decision and
    /// completion lines are printed as one object (the decision line's fields, then the
    /// completion's `status_code`, `reason`, `outcome`, `bytes`, `duration_ms`; no `phase`).
    Json,
}

/// Parse "1h", "30m", "7d", "45s" (relative to now) or an RFC 3339 instant.
pub fn parse_time_arg(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "expected a duration like 45s, 30m, 1h, 7d or an RFC 3339 time like 2026-11-23T05:01:02Z, got {s:?}"
        )
    };
    let (num, unit) = match s.char_indices().last() {
        Some((i, unit)) => (&s[..i], unit),
        None => return Err(bad()),
    };
    if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = num.parse().map_err(|_| bad())?;
        let secs = match unit {
            's' => Some(n),
            'm' => n.checked_mul(60),
            'h' => n.checked_mul(3600),
            'd' => n.checked_mul(86_400),
            'w' => n.checked_mul(7 * 86_400),
            _ => return Err(bad()),
        };
        return secs
            .and_then(|secs| now.checked_sub(time::Duration::seconds(secs)))
            .ok_or_else(|| format!("duration {s:?} is too large"));
    }
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())
}

/// The fields the reader looks at; anything else in the line is ignored.
#[derive(Debug, Default, Clone, Deserialize)]
pub(super) struct View {
    pub(super) kind: Option<String>,
    pub(super) phase: Option<String>,
    pub(super) request_id: Option<String>,
    pub(super) outcome: Option<String>,
    pub(super) timestamp: Option<String>,
    pub(super) event: Option<String>,
    pub(super) target: Option<String>,
    pub(super) api_token_id: Option<String>,
    pub(super) api_token_name: Option<String>,
    pub(super) token_prefix: Option<String>,
    pub(super) account: Option<String>,
    pub(super) method: Option<String>,
    pub(super) path: Option<String>,
    pub(super) status_code: Option<u16>,
    pub(super) rbac_decision: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) client_ip: Option<String>,
}

impl View {
    fn is_admin(&self) -> bool {
        self.kind.as_deref() == Some("admin")
    }
}

enum StatusMatch {
    Exact(u16),
    Class(u16),
}

struct Matcher<'a> {
    f: &'a Filter,
    status: Option<StatusMatch>,
}

impl<'a> Matcher<'a> {
    fn new(f: &'a Filter) -> Result<Self, AuditError> {
        let status = match f.status.as_deref().map(str::trim) {
            None => None,
            Some(s) => {
                let b = s.as_bytes();
                if b.len() == 3
                    && (b'1'..=b'5').contains(&b[0])
                    && b[1..].eq_ignore_ascii_case(b"xx")
                {
                    Some(StatusMatch::Class(u16::from(b[0] - b'0')))
                } else {
                    match s.parse::<u16>() {
                        Ok(code) if (100..=599).contains(&code) => Some(StatusMatch::Exact(code)),
                        _ => {
                            return Err(AuditError::Filter(format!(
                                "status must be a code like 403 or a class like 4xx, got {s:?}"
                            )));
                        }
                    }
                }
            }
        };
        if let Some(d) = f.decision.as_deref() {
            if d != "allow" && d != "deny" {
                return Err(AuditError::Filter(format!(
                    "decision must be allow or deny, got {d:?}"
                )));
            }
        }
        if f.token.as_deref().is_some_and(str::is_empty) {
            return Err(AuditError::Filter("token must not be empty".into()));
        }
        Ok(Matcher { f, status })
    }

    fn matches(&self, v: &View) -> bool {
        let f = self.f;
        let eq = |field: &Option<String>, want: &str| field.as_deref() == Some(want);
        if let Some(t) = f.token.as_deref() {
            let hit = eq(&v.api_token_name, t)
                || eq(&v.api_token_id, t)
                || v.token_prefix.as_deref().is_some_and(|p| p.starts_with(t))
                || (v.is_admin() && eq(&v.target, t));
            if !hit {
                return false;
            }
        }
        if f.account.as_deref().is_some_and(|a| !eq(&v.account, a)) {
            return false;
        }
        if f.decision
            .as_deref()
            .is_some_and(|d| v.is_admin() || !eq(&v.rbac_decision, d))
        {
            return false;
        }
        if f.reason.as_deref().is_some_and(|r| !eq(&v.reason, r)) {
            return false;
        }
        if let Some(s) = &self.status {
            let Some(code) = v.status_code.filter(|_| !v.is_admin()) else {
                return false;
            };
            let ok = match s {
                StatusMatch::Exact(c) => code == *c,
                StatusMatch::Class(c) => code / 100 == *c,
            };
            if !ok {
                return false;
            }
        }
        if f.since.is_some() || f.until.is_some() {
            let Some(t) = v
                .timestamp
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            else {
                return false;
            };
            if f.since.is_some_and(|s| t < s) || f.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        if let Some(e) = f.event.as_deref() {
            let Some(ev) = v.event.as_deref().filter(|_| v.is_admin()) else {
                return false;
            };
            let ok = match e.strip_suffix('*') {
                Some(prefix) => ev.starts_with(prefix),
                None => ev == e,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// Stream the log (never loading it whole), writing matching lines to `out` as a table (fixed columns: time, status, decision, reason, method, path, token, account, client_ip; admin lines show the event in place of method/path) or as the original JSON lines. Torn/bad lines are reported to `err` with the line number, not silently skipped.
pub fn query(
    paths: &[PathBuf],
    filter: &Filter,
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u64, AuditError> {
    let m = Matcher::new(filter)?;
    if format == OutputFormat::Table {
        write_table_header(out).map_err(AuditError::Output)?;
    }
    let mut matched = 0;
    let mut buf = Vec::with_capacity(1024);
    let mut merger = Merger::default();
    for path in paths {
        read_lines(path, &mut buf, |line_no, line, terminated| {
            if !terminated {
                skipped(err, path, line_no, INCOMPLETE)?;
                return Ok(false);
            }
            matched += emit(&m, &mut merger, path, line_no, line, format, out, err)?;
            Ok(true)
        })?;
    }
    // Forwarded requests with no completion (still running, or the gateway was killed).
    for (view, line) in merger.unfinished() {
        matched += print(&m, view, &line, format, out)?;
    }
    out.flush().map_err(AuditError::Output)?;
    Ok(matched)
}

/// Holds the decision line of a forwarded request until its completion arrives, so a request
/// is one row (SPEC §7: one request, one line for the reader).
#[derive(Default)]
struct Merger {
    /// request_id → (order, view, the decision line).
    pending: HashMap<String, (u64, View, Vec<u8>)>,
    order: u64,
}

/// A decision line as written: the record, then its place in the chain.
#[derive(Deserialize)]
struct Sealed {
    #[serde(flatten)]
    record: RequestRecord,
    seq: u64,
    chain: String,
}

impl Merger {
    /// What to print for this line now: nothing (a decision, held), the merged request, or the
    /// line itself.
    fn take(&mut self, view: View, line: &[u8]) -> Option<(View, Cow<'static, [u8]>)> {
        let id = view.request_id.clone().unwrap_or_default();
        match (view.kind.as_deref(), view.phase.as_deref()) {
            (Some("request"), Some("decision")) => {
                self.order += 1;
                self.pending.insert(id, (self.order, view, line.to_vec()));
                None
            }
            (Some("completion"), _) => match self.pending.remove(&id) {
                Some((_, mut merged, decision)) => {
                    let done = serde_json::from_slice::<CompletionRecord>(line).ok();
                    merged.status_code = view.status_code;
                    merged.reason = view.reason;
                    merged.outcome = view.outcome;
                    let line = merge_line(&decision, done.as_ref());
                    Some((merged, Cow::Owned(line)))
                }
                // Its decision is in an earlier file not read: print the completion as it is.
                None => Some((view, Cow::Owned(line.to_vec()))),
            },
            _ => Some((view, Cow::Owned(line.to_vec()))),
        }
    }

    /// Decisions never completed, in log order, marked `outcome: no_completion`.
    fn unfinished(&mut self) -> Vec<(View, Vec<u8>)> {
        let mut rest: Vec<_> = self.pending.drain().map(|(_, v)| v).collect();
        rest.sort_by_key(|(order, _, _)| *order);
        rest.into_iter()
            .map(|(_, mut view, decision)| {
                view.outcome = Some("no_completion".into());
                view.reason = Some("no_completion".into());
                (view, merge_line(&decision, None))
            })
            .collect()
    }
}

/// One request as one JSON line: the decision's record (in its field order, without `phase`)
/// with the completion's status, reason and duration, then `outcome`, `bytes` and the decision
/// line's `seq` and `chain`. No completion: `outcome` is `no_completion`, no status.
fn merge_line(decision: &[u8], done: Option<&CompletionRecord>) -> Vec<u8> {
    let Ok(mut d) = serde_json::from_slice::<Sealed>(decision) else {
        return decision.to_vec();
    };
    d.record.phase = None;
    if let Some(c) = done {
        d.record.status_code = c.status_code;
        d.record.reason = c.reason.clone();
        d.record.duration_ms = c.duration_ms;
    }
    let Ok(mut out) = serde_json::to_vec(&Entry::Request(d.record)) else {
        return decision.to_vec();
    };
    out.pop();
    let (outcome, bytes) = done.map_or(("no_completion", 0), |c| (c.outcome.as_ref(), c.bytes));
    out.extend_from_slice(b",\"outcome\":");
    out.extend_from_slice(serde_json::Value::from(outcome).to_string().as_bytes());
    if done.is_some() {
        out.extend_from_slice(format!(",\"bytes\":{bytes}").as_bytes());
    }
    out.extend_from_slice(format!(",\"seq\":{},\"chain\":\"{}\"}}", d.seq, d.chain).as_bytes());
    out
}

const INCOMPLETE: &str = "incomplete last line (no newline)";

/// Reports a line the reader passed over, with its place: `<file>:<line>: skipped: <why>`.
fn skipped(err: &mut dyn Write, path: &Path, line_no: u64, why: &str) -> Result<(), AuditError> {
    writeln!(err, "{}:{line_no}: skipped: {why}", path.display()).map_err(AuditError::Output)
}

/// Prints one line (or the request it completes) if it matches; reports it to `err` if it is
/// not a record. Returns how many rows were printed (0 or 1).
#[allow(clippy::too_many_arguments)]
fn emit(
    m: &Matcher<'_>,
    merger: &mut Merger,
    path: &Path,
    line_no: u64,
    line: &[u8],
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u64, AuditError> {
    let view = match serde_json::from_slice::<View>(line) {
        Ok(v) if line.first() == Some(&b'{') => v,
        _ => {
            skipped(err, path, line_no, "not a JSON audit record")?;
            return Ok(0);
        }
    };
    if view.kind.as_deref() == Some("request") && view.phase.is_none() {
        // The common case (a single-line request, an admin line): no copy.
        return print(m, view, line, format, out);
    }
    match merger.take(view, line) {
        Some((view, line)) => print(m, view, &line, format, out),
        None => Ok(0),
    }
}

fn print(
    m: &Matcher<'_>,
    view: View,
    line: &[u8],
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    if !m.matches(&view) {
        return Ok(0);
    }
    match format {
        OutputFormat::Json => {
            out.write_all(line)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(AuditError::Output)?;
        }
        OutputFormat::Table => write_table_row(out, &view).map_err(AuditError::Output)?,
    }
    Ok(1)
}

fn write_table_header(out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<6} {:<8} {:<24} {:<7} {:<36} {:<20} {:<16} CLIENT_IP",
        "TIME", "STATUS", "DECISION", "REASON", "METHOD", "PATH", "TOKEN", "ACCOUNT"
    )
}

/// A cell for people: "-" when empty; control characters (a tampered log could carry terminal
/// escapes) shown as `?`.
fn cell(s: Option<&str>) -> Cow<'_, str> {
    match s {
        None | Some("") => Cow::Borrowed("-"),
        Some(s) if s.chars().any(char::is_control) => Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        ),
        Some(s) => Cow::Borrowed(s),
    }
}

pub(super) fn write_table_row(out: &mut dyn Write, v: &View) -> io::Result<()> {
    let token = v
        .api_token_name
        .as_deref()
        .or(v.token_prefix.as_deref())
        .or(v.api_token_id.as_deref());
    let time = cell(v.timestamp.as_deref());
    let reason = cell(v.reason.as_deref());
    let token = cell(token);
    let account = cell(v.account.as_deref());
    let ip = cell(v.client_ip.as_deref());
    if v.is_admin() {
        let what = match v.target.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => format!("{} {}", cell(v.event.as_deref()), cell(Some(t))),
            None => cell(v.event.as_deref()).into_owned(),
        };
        writeln!(
            out,
            "{time:<24} {:<6} {:<8} {reason:<24} {what:<44} {token:<20} {account:<16} {ip}",
            "-", "-"
        )
    } else {
        let status = v
            .status_code
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        let decision = cell(v.rbac_decision.as_deref());
        let method = cell(v.method.as_deref());
        let path = cell(v.path.as_deref());
        writeln!(
            out,
            "{time:<24} {status:<6} {decision:<8} {reason:<24} {method:<7} {path:<36} {token:<20} {account:<16} {ip}"
        )
    }
}

/// Like `tail -f`: after printing existing matching lines, keep printing new ones; survives rotation (file replaced → reopen from the new file's start; file truncated → start over). Poll every 200 ms. Runs until `stop` returns true (checked every poll) — the CLI passes `|| false`, tests pass a flag.
///
/// Lines that are not records are reported on stderr with their line number.
pub fn follow(
    path: &Path,
    filter: &Filter,
    format: OutputFormat,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<(), AuditError> {
    follow_with(path, filter, format, out, &mut io::stderr(), stop)
}

pub(super) fn follow_with(
    path: &Path,
    filter: &Filter,
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<(), AuditError> {
    let m = Matcher::new(filter)?;
    if format == OutputFormat::Table {
        write_table_header(out).map_err(AuditError::Output)?;
    }
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = open_log(path)?;
    let mut id = file_id(&file.metadata().map_err(io_err)?);
    let mut t = Tailer {
        pos: 0,
        line_no: 0,
        partial: Vec::new(),
        buf: vec![0; 64 * 1024],
        merger: Merger::default(),
    };
    loop {
        t.read_available(&mut file, path, &m, format, out, err)?;
        out.flush().map_err(AuditError::Output)?;
        if stop() {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        match fs::metadata(path) {
            Ok(meta) if file_id(&meta) != id => {
                // Rotated: finish the old file (still open), then start the new one from its start.
                t.read_available(&mut file, path, &m, format, out, err)?;
                t.finish(path, err)?;
                let new = match open_log(path) {
                    Ok(f) => f,
                    Err(_) => continue, // replaced again in between; retry at the next poll
                };
                let new_id = file_id(&new.metadata().map_err(io_err)?);
                // Size rotation may have run more than once since the last poll: the files
                // rotated after ours come before the new one, or their lines would be skipped.
                for between in rotated_between(path, id, new_id) {
                    let Ok(mut f) = File::open(&between) else {
                        continue;
                    };
                    t.restart();
                    t.read_available(&mut f, &between, &m, format, out, err)?;
                    t.finish(&between, err)?;
                }
                file = new;
                id = new_id;
                t.restart();
            }
            Ok(meta) if meta.len() < t.pos => {
                // Truncated in place (copytruncate): start over.
                file.seek(SeekFrom::Start(0)).map_err(io_err)?;
                t.restart();
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // between rename and create
            Err(e) => return Err(io_err(e)),
        }
    }
}

struct Tailer {
    /// Bytes consumed from the current file (including `partial`).
    pos: u64,
    line_no: u64,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    buf: Vec<u8>,
    /// Decisions waiting for their completion (kept across rotation).
    merger: Merger,
}

impl Tailer {
    fn restart(&mut self) {
        self.pos = 0;
        self.line_no = 0;
        self.partial.clear();
    }

    /// The file is left for another: a line without its newline is reported, not dropped silently.
    fn finish(&mut self, path: &Path, err: &mut dyn Write) -> Result<(), AuditError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        skipped(err, path, self.line_no + 1, INCOMPLETE)
    }

    fn read_available(
        &mut self,
        file: &mut File,
        path: &Path,
        m: &Matcher<'_>,
        format: OutputFormat,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<(), AuditError> {
        loop {
            let n = match file.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(AuditError::Io {
                        path: path.to_owned(),
                        source,
                    });
                }
            };
            self.pos += n as u64;
            let mut chunk = &self.buf[..n];
            while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                self.partial.extend_from_slice(&chunk[..i]);
                chunk = &chunk[i + 1..];
                self.line_no += 1;
                emit(
                    m,
                    &mut self.merger,
                    path,
                    self.line_no,
                    &self.partial,
                    format,
                    out,
                    err,
                )?;
                self.partial.clear();
            }
            self.partial.extend_from_slice(chunk);
        }
    }
}

/// The size-rotated files written after `old` and before `new`, oldest first: `path.k-1` ..=
/// `path.1` when `old` is now `path.k`. Empty when `old` is not among them (renamed away by
/// logrotate, deleted) or was rotated only once.
fn rotated_between(path: &Path, old: Option<(u64, u64)>, new: Option<(u64, u64)>) -> Vec<PathBuf> {
    let mut between = Vec::new();
    for n in 1..=ROTATE_KEEP {
        let p = rotated_name(path, n);
        let Ok(meta) = fs::metadata(&p) else {
            return Vec::new();
        };
        let id = file_id(&meta);
        if id == old {
            between.reverse();
            return between;
        }
        if id == new {
            // The file just opened was rotated too: only files older than it are in between.
            between.clear();
        } else {
            between.push(p);
        }
    }
    Vec::new()
}

#[cfg(unix)]
fn file_id(m: &fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_m: &fs::Metadata) -> Option<(u64, u64)> {
    None
}
