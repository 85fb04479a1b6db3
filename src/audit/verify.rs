//! Verification of an audit log or a rotated set (`tokengate audit verify`): every line a
//! record, `seq` continuous, the chain intact across files; the first problem is named with
//! its file and line, and a crash remnant is told apart from an edit.
//!
//! Owns [`verify`], its options and its report (the text `Display` prints is a contract).
//! Never imports `config`, the writer or the reader.

use std::fmt;
use std::path::{Path, PathBuf};

use super::AuditError;
use super::line::{GENESIS_CHAIN, Parsed, chain_hex, parse_line, read_lines};

/// The first problem `verify` found. Line numbers are 1-based, per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyProblem {
    /// The line is not a JSON object (edited or corrupted).
    BadJson {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
    /// The file ends without a newline (truncated mid-line, or a crash mid-write).
    TornLastLine {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
    /// JSON, but `seq` and `chain` are missing or `chain` is not the last member.
    MissingChain {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
    /// The first line of the set does not have seq 1: earlier lines (or files) are missing.
    TruncatedStart {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
        /// The seq found.
        found: u64,
    },
    /// seq jumped forward: lines were deleted.
    SeqGap {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
        /// seq expected here.
        expected: u64,
        /// seq found.
        found: u64,
    },
    /// seq went backward or lines were swapped: reordered or replayed.
    OutOfOrder {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
        /// seq expected here.
        expected: u64,
        /// seq found.
        found: u64,
    },
    /// seq is right but the chain does not match: the line's content was edited.
    ChainMismatch {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyProblem::BadJson { file, line_no } => write!(
                f,
                "{}:{line_no}: not a valid audit record (not JSON): the line was edited or corrupted",
                file.display()
            ),
            VerifyProblem::TornLastLine { file, line_no } => write!(
                f,
                "{}:{line_no}: the last line is incomplete (no newline): the file was truncated or the writer crashed mid-line",
                file.display()
            ),
            VerifyProblem::MissingChain { file, line_no } => write!(
                f,
                "{}:{line_no}: the line has no seq/chain at its end: it was not written by the audit writer or was edited",
                file.display()
            ),
            VerifyProblem::TruncatedStart {
                file,
                line_no,
                found,
            } => write!(
                f,
                "{}:{line_no}: the set starts at seq {found}, not 1: the first {} line(s) are missing (pass every rotated file, oldest first)",
                file.display(),
                found.saturating_sub(1)
            ),
            VerifyProblem::SeqGap {
                file,
                line_no,
                expected,
                found,
            } => write!(
                f,
                "{}:{line_no}: expected seq {expected}, found {found}: {} line(s) were deleted",
                file.display(),
                found - expected
            ),
            VerifyProblem::OutOfOrder {
                file,
                line_no,
                expected,
                found,
            } => write!(
                f,
                "{}:{line_no}: expected seq {expected}, found {found}: lines were reordered or replayed",
                file.display()
            ),
            VerifyProblem::ChainMismatch { file, line_no } => write!(
                f,
                "{}:{line_no}: the chain does not match: the line was edited",
                file.display()
            ),
        }
    }
}

/// Result of [`verify`]: `Display` prints `OK: N lines, chain intact` or the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records verified (before the problem, if any).
    pub lines: u64,
    /// The first problem, None when the chain is intact.
    pub problem: Option<VerifyProblem>,
    /// seq of the first record (1 unless `allow_partial_start`).
    pub first_seq: Option<u64>,
    /// Incomplete lines left by a crash and terminated by the next writer start: tolerated
    /// because the record after each one continues the chain exactly, so nothing was lost.
    pub torn_skipped: Vec<(PathBuf, u64)>,
    /// Forwarded requests whose decision line has no completion line after it (request ids, in
    /// log order): in flight when the gateway stopped (killed, crashed), or still running when
    /// a live log was read. The chain itself may still be intact.
    pub unfinished: Vec<String>,
}

impl VerifyReport {
    /// True when no problem was found in the chain.
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }

    /// True when the chain is intact and every forwarded request has its completion.
    pub fn is_complete(&self) -> bool {
        self.problem.is_none() && self.unfinished.is_empty()
    }
}

/// `verify` names at most this many unfinished requests (and counts the rest).
const UNFINISHED_NAMED: usize = 100;

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Some(p) => write!(f, "FAILED: {p} ({} line(s) before it verified)", self.lines),
            None => {
                let head = if self.unfinished.is_empty() {
                    "OK"
                } else {
                    "INCOMPLETE"
                };
                write!(f, "{head}: {} lines, chain intact", self.lines)?;
                if let Some(first) = self.first_seq.filter(|&s| s != 1) {
                    write!(f, " from seq {first} (earlier lines not checked)")?;
                }
                if !self.torn_skipped.is_empty() {
                    let at: Vec<String> = self
                        .torn_skipped
                        .iter()
                        .map(|(p, n)| format!("{}:{n}", p.display()))
                        .collect();
                    write!(
                        f,
                        "; skipped {} incomplete line(s) left by a crash: {}",
                        at.len(),
                        at.join(", ")
                    )?;
                }
                if !self.unfinished.is_empty() {
                    let named = self.unfinished.len().min(UNFINISHED_NAMED);
                    write!(
                        f,
                        "; {} forwarded request(s) have no completion line (in flight when the gateway stopped, or still running): {}",
                        self.unfinished.len(),
                        self.unfinished[..named].join(", ")
                    )?;
                    if self.unfinished.len() > named {
                        write!(f, " and {} more", self.unfinished.len() - named)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Options for [`verify_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Accept a set whose first line is not seq 1 (older files deleted by retention): the first
    /// line is trusted as the anchor, and everything after it is checked.
    pub allow_partial_start: bool,
}

/// Verify one file or a rotated set given oldest-first; the chain must continue across files.
pub fn verify(paths: &[PathBuf]) -> Result<VerifyReport, AuditError> {
    verify_with(paths, VerifyOptions::default())
}

/// [`verify`] with options.
pub fn verify_with(paths: &[PathBuf], opts: VerifyOptions) -> Result<VerifyReport, AuditError> {
    let mut v = Verifier {
        opts,
        prev: GENESIS_CHAIN.as_bytes().to_vec(),
        expected: 1,
        started: false,
        pending: None,
        report: VerifyReport {
            lines: 0,
            problem: None,
            first_seq: None,
            torn_skipped: Vec::new(),
            unfinished: Vec::new(),
        },
        open: Default::default(),
        order: 0,
    };
    let mut buf = Vec::with_capacity(1024);
    for (i, path) in paths.iter().enumerate() {
        let last_file = i + 1 == paths.len();
        let mut problem = None;
        read_lines(path, &mut buf, |line_no, line, terminated| {
            let end = match (terminated, last_file) {
                (true, _) => LineEnd::Newline,
                (false, true) => LineEnd::TornLast,
                // A rotated file was not terminated after a crash: judged like a crash remnant.
                (false, false) => LineEnd::TornRotated,
            };
            problem = v.line(path, line_no, line, end);
            Ok(problem.is_none())
        })?;
        if problem.is_some() {
            v.report.problem = problem;
            return Ok(v.report);
        }
    }
    v.report.problem = match v.pending.take() {
        Some(Pending::Bad {
            file,
            line_no,
            torn,
        }) => Some(bad_line(file, line_no, torn)),
        Some(Pending::Gap {
            file,
            line_no,
            expected,
            found,
        }) => Some(VerifyProblem::SeqGap {
            file,
            line_no,
            expected,
            found,
        }),
        None => None,
    };
    let mut open: Vec<(u64, String)> = v.open.into_iter().map(|(id, n)| (n, id)).collect();
    open.sort_unstable();
    v.report.unfinished = open.into_iter().map(|(_, id)| id).collect();
    Ok(v.report)
}

/// How a physical line ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LineEnd {
    Newline,
    /// No newline at the end of the last file.
    TornLast,
    /// No newline at the end of an earlier (rotated) file.
    TornRotated,
}

fn bad_line(file: PathBuf, line_no: u64, torn: bool) -> VerifyProblem {
    if torn {
        VerifyProblem::TornLastLine { file, line_no }
    } else {
        VerifyProblem::BadJson { file, line_no }
    }
}

/// A line whose verdict depends on the next one.
enum Pending {
    /// Not a record: a torn remnant (fine) if the next record continues the chain, else an edit.
    Bad {
        file: PathBuf,
        line_no: u64,
        /// It was the unterminated end of a rotated file.
        torn: bool,
    },
    /// seq jumped: a reorder if the next seq is smaller, else a deletion.
    Gap {
        file: PathBuf,
        line_no: u64,
        expected: u64,
        found: u64,
    },
}

struct Verifier {
    opts: VerifyOptions,
    prev: Vec<u8>,
    expected: u64,
    started: bool,
    pending: Option<Pending>,
    report: VerifyReport,
    /// Decision lines not yet followed by their completion: request_id → order.
    open: std::collections::HashMap<String, u64>,
    order: u64,
}

impl Verifier {
    fn line(
        &mut self,
        file: &Path,
        line_no: u64,
        bytes: &[u8],
        end: LineEnd,
    ) -> Option<VerifyProblem> {
        let parsed = match end {
            LineEnd::Newline => Some(parse_line(bytes)),
            LineEnd::TornLast | LineEnd::TornRotated => None,
        };
        match self.pending.take() {
            Some(Pending::Gap {
                file,
                line_no,
                expected,
                found,
            }) => {
                return Some(match parsed {
                    Some(Parsed::Record { seq, .. }) if seq < found => VerifyProblem::OutOfOrder {
                        file,
                        line_no,
                        expected,
                        found,
                    },
                    _ => VerifyProblem::SeqGap {
                        file,
                        line_no,
                        expected,
                        found,
                    },
                });
            }
            Some(Pending::Bad {
                file: bad_file,
                line_no: bad_no,
                torn,
            }) => {
                let continues = match &parsed {
                    Some(Parsed::Record { seq, chain, head }) => {
                        let start_ok = self.started || *seq == 1;
                        start_ok && *seq == self.expected && self.chain_ok(head, chain)
                    }
                    _ => false,
                };
                if !continues {
                    return Some(bad_line(bad_file, bad_no, torn));
                }
                self.report.torn_skipped.push((bad_file, bad_no));
            }
            None => {}
        }
        let file = file.to_owned();
        let (seq, chain, head) = match parsed {
            None if end == LineEnd::TornLast => {
                return Some(VerifyProblem::TornLastLine { file, line_no });
            }
            None => {
                self.pending = Some(Pending::Bad {
                    file,
                    line_no,
                    torn: true,
                });
                return None;
            }
            Some(Parsed::NotJson) => {
                self.pending = Some(Pending::Bad {
                    file,
                    line_no,
                    torn: false,
                });
                return None;
            }
            Some(Parsed::NoChain) => return Some(VerifyProblem::MissingChain { file, line_no }),
            Some(Parsed::Record { seq, chain, head }) => (seq, chain, head),
        };
        if !self.started {
            self.started = true;
            self.report.first_seq = Some(seq);
            if seq != 1 {
                if !self.opts.allow_partial_start {
                    return Some(VerifyProblem::TruncatedStart {
                        file,
                        line_no,
                        found: seq,
                    });
                }
                // Trust this line as the anchor: its own chain cannot be recomputed.
                self.track(head);
                self.accept(seq, chain);
                return None;
            }
        }
        if seq < self.expected {
            return Some(VerifyProblem::OutOfOrder {
                file,
                line_no,
                expected: self.expected,
                found: seq,
            });
        }
        if seq > self.expected {
            self.pending = Some(Pending::Gap {
                file,
                line_no,
                expected: self.expected,
                found: seq,
            });
            return None;
        }
        if !self.chain_ok(head, chain) {
            return Some(VerifyProblem::ChainMismatch { file, line_no });
        }
        self.track(head);
        self.accept(seq, chain);
        None
    }

    fn chain_ok(&self, head: &[u8], chain: &[u8]) -> bool {
        chain_hex(&self.prev, &[head, b"}"]).as_bytes() == chain
    }

    /// Pairs the decision and completion lines of forwarded requests.
    fn track(&mut self, head: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Ids {
            kind: Option<String>,
            phase: Option<String>,
            request_id: Option<String>,
        }
        const DECISION: &[u8] = b"\"phase\":\"decision\"";
        let completion = head.starts_with(b"{\"kind\":\"completion\"");
        if !completion && !head.windows(DECISION.len()).any(|w| w == DECISION) {
            return;
        }
        let mut line = head.to_vec();
        line.push(b'}');
        let Ok(ids) = serde_json::from_slice::<Ids>(&line) else {
            return;
        };
        let Some(id) = ids.request_id else { return };
        match (ids.kind.as_deref(), ids.phase.as_deref()) {
            (Some("request"), Some("decision")) => {
                self.order += 1;
                self.open.insert(id, self.order);
            }
            (Some("completion"), _) => {
                self.open.remove(&id);
            }
            _ => {}
        }
    }

    fn accept(&mut self, seq: u64, chain: &[u8]) {
        self.prev.clear();
        self.prev.extend_from_slice(chain);
        self.expected = seq + 1;
        self.report.lines += 1;
    }
}
