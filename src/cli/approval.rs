//! `tokengate approval request|list|show` (issue 19): ask for, and wait on, a person's approval
//! of an approval-gated rule, against a gateway's admin API (always remote: `--url` /
//! `TOKENGATE_URL` or a saved login, with the token from `TOKENGATE_TOKEN` or the profile).
//!
//! `request --wait` polls `GET /v1/approvals/{id}` with backoff (1 s, doubling, at most 15 s) and
//! exits 0 once approved, [`EXIT_REJECTED`] when rejected, [`EXIT_TIMED_OUT`] when the wait ran
//! out or the request expired unanswered. There is no `approve` command on purpose: deciding
//! needs a person in the web UI with a TOTP code, which a token alone never is.
//!
//! Must never import `cli::local`, `admin` or `gateway`.

use std::time::{Duration, Instant};

use http::Method;

use super::print::{print_json, str_of};
use super::remote::{Client, Target};
use super::{ApprovalCmd, CliError};
use crate::path::percent_encode as enc;

/// Exit code of `approval request --wait` when a person rejected the request.
pub const EXIT_REJECTED: u8 = 10;
/// Exit code of `approval request --wait` when nobody decided in time (or it expired).
pub const EXIT_TIMED_OUT: u8 = 11;

/// First poll interval; doubled up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_secs(1);
/// Longest pause between two polls.
const MAX_POLL: Duration = Duration::from_secs(15);

/// Runs an `approval` command.
pub fn run(t: &Target, cmd: &ApprovalCmd) -> Result<(), CliError> {
    let c = t.client()?;
    match cmd {
        ApprovalCmd::Request {
            rule,
            param,
            message,
            wait,
            json,
        } => {
            let mut params = serde_json::Map::new();
            for p in param {
                let Some((k, v)) = p.split_once('=') else {
                    return Err(CliError::usage(format!(
                        "--param `{p}`: use NAME=VALUE, like `--param app=billing`"
                    )));
                };
                params.insert(k.to_string(), v.into());
            }
            let wait = match wait {
                None => None,
                Some(w) => Some(
                    crate::config::parse_duration(w)
                        .map_err(|m| CliError::usage(format!("--wait: {m}")))?,
                ),
            };
            let v = c.call(
                Method::POST,
                "/v1/approvals",
                Some(serde_json::json!({
                    "rule": rule,
                    "params": params,
                    "message": message.clone().unwrap_or_default(),
                })),
            )?;
            let id = str_of(&v, "id");
            eprintln!("approval {id} for rule `{rule}`: {}", str_of(&v, "status"));
            let Some(wait) = wait else {
                if *json {
                    print_json(&v);
                } else {
                    println!("{id}");
                }
                return Ok(());
            };
            let end = wait_for(&c, &id, wait, v)?;
            if *json {
                print_json(&end);
            } else {
                println!("{id}");
            }
            match end["status"].as_str() {
                Some("approved") => {
                    eprintln!(
                        "approved by {} until {}",
                        str_of(&end, "decided_by"),
                        str_of(&end, "expires_at")
                    );
                    Ok(())
                }
                Some("rejected") => Err(CliError {
                    code: EXIT_REJECTED,
                    message: format!(
                        "approval {id} was rejected by {}: {}",
                        str_of(&end, "decided_by"),
                        end["note"].as_str().unwrap_or("")
                    ),
                }),
                Some(s) => Err(CliError {
                    code: EXIT_TIMED_OUT,
                    message: format!("approval {id} is still {s} after waiting {wait:?}"),
                }),
                None => Err(CliError::failure("unexpected answer from the admin API")),
            }
        }
        ApprovalCmd::List { pending, json } => {
            let path = if *pending {
                "/v1/approvals?status=pending"
            } else {
                "/v1/approvals"
            };
            let v = c.call(Method::GET, path, None)?;
            let list = v["approvals"].as_array().cloned().unwrap_or_default();
            if *json {
                print_json(&list);
            } else {
                println!(
                    "{:<26} {:<10} {:<16} {:<24} MESSAGE",
                    "ID", "STATUS", "RULE", "PARAMS"
                );
                for a in &list {
                    println!(
                        "{:<26} {:<10} {:<16} {:<24} {}",
                        str_of(a, "id"),
                        str_of(a, "status"),
                        str_of(a, "rule"),
                        a["params"].to_string(),
                        str_of(a, "message")
                    );
                }
            }
            Ok(())
        }
        ApprovalCmd::Show { id, json } => {
            let v = c.call(Method::GET, &format!("/v1/approvals/{}", enc(id)), None)?;
            if *json {
                print_json(&v);
            } else {
                for k in [
                    "id",
                    "rule",
                    "status",
                    "message",
                    "requested_at",
                    "decided_by",
                    "decided_at",
                    "note",
                    "expires_at",
                ] {
                    println!("{k:<13} {}", v[k].as_str().unwrap_or("-"));
                }
                println!("{:<13} {}", "params", v["params"]);
            }
            Ok(())
        }
    }
}

/// Polls until the request is decided or expired, or `wait` has passed; returns its last view.
fn wait_for(
    c: &Client,
    id: &str,
    wait: Duration,
    mut v: serde_json::Value,
) -> Result<serde_json::Value, CliError> {
    let start = Instant::now();
    let mut pause = FIRST_POLL;
    loop {
        if v["status"].as_str() != Some("pending") {
            return Ok(v);
        }
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(v);
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_POLL);
        v = c.call(Method::GET, &format!("/v1/approvals/{}", enc(id)), None)?;
    }
}
