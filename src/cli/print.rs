//! The one printer of the CLI, for local and remote output alike: both hand it the JSON view of
//! a token ([`crate::lifecycle::token_json`], which is also what the admin API answers) or of an
//! account, so a command prints the same whether it ran on the local store or remotely.
//!
//! Tokens appear in plaintext only in [`new_token`] (stdout's first line, or `token` in JSON),
//! once, at creation or rotation.
//!
//! Owns: every line the CLI prints about tokens and accounts. Must never import `admin`, `gateway`
//! or `store` internals; nothing outside `cli` and `main.rs` imports it.

use std::io::Write;

use serde_json::Value;

/// `println!` for the CLI's stdout: a reader that went away (`tokengate token list | head -1`)
/// ends the command quietly with exit 0 instead of a panic; see [`write_out`].
macro_rules! outln {
    () => { $crate::cli::print::write_out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::print::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}
pub(crate) use outln;

/// Writes to stdout. A closed pipe (EPIPE) means the reader has all it wanted: the process ends
/// at once with exit 0, silently. Any other write error ends it with exit 1 and a message.
/// Every line the CLI prints on stdout goes through here, so no command panics on `| head -1`.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.flush()) {
        exit_on_write_error(&e);
    }
}

/// Ends the process after a failed write to stdout: quietly with 0 when the reader closed the
/// pipe, else with 1 and the cause on stderr.
pub fn exit_on_write_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "error: cannot write to stdout: {e}");
    std::process::exit(i32::from(super::EXIT_FAILURE));
}

/// Stdout as an `io::Write` for code that writes streams (`tokengate audit`): write errors end
/// the process as in [`write_out`].
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout()
            .write(buf)
            .or_else(|e| exit_on_write_error(&e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout()
            .flush()
            .or_else(|e| exit_on_write_error(&e))
    }
}

/// Pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) {
    outln!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// `v` as pretty JSON with `--json`, else `text(v)`.
fn json_or<T: serde::Serialize + ?Sized>(v: &T, json: bool, text: impl FnOnce(&T)) {
    if json {
        print_json(&v);
    } else {
        text(v);
    }
}

/// A duration in the largest unit that divides it exactly: `1h`, `90m`, `2d`, `45s`, as a user
/// would type it (`--grace 1h` is echoed as `1h`, not `3600s`).
pub fn human_secs(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `1 rule`, `3 rules`.
pub fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `2026-01-02 03:04` from an RFC 3339 string; `-` for none.
pub fn short_time(s: Option<&str>) -> String {
    s.map(|t| t.get(..16).unwrap_or(t).replace('T', " "))
        .unwrap_or_else(|| "-".into())
}

/// A string field, `-` when absent.
pub fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or("-").to_string()
}

/// A list of strings as `a, b, c`.
pub fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// A new token (its JSON view with `token` holding the plaintext): the plaintext alone on
/// stdout's first line (or the whole view with `--json`); the reminder on stderr.
pub fn new_token(v: &Value, json: bool, verb: &str) {
    if json {
        outln!("{v}");
    } else {
        outln!("{}", str_of(v, "token"));
    }
    eprintln!(
        "{verb} token {} ({}) for account {}, expires {}. Copy it now: it will not be shown again.",
        str_of(v, "id"),
        str_of(v, "prefix"),
        str_of(v, "account"),
        v["expires_at"].as_str().unwrap_or("never")
    );
}

/// After a rotation: how long the old token keeps working (stderr).
pub fn rotated(old: &str, grace_seconds: u64) {
    eprintln!(
        "the old token {old} keeps working until the new one is first used, or for {} at most",
        human_secs(grace_seconds)
    );
}

/// `token list`: the JSON array of views, or the table.
pub fn token_list(rows: &[Value], json: bool) {
    json_or(rows, json, token_table);
}

/// `token show`, `token identify`: the view as JSON, or one `key value` line per field.
pub fn token_show(v: &Value, json: bool) {
    json_or(v, json, token_detail);
}

/// `account list`: the JSON array of account views (the admin API's shape, RFC 3339 times and
/// `status`), or the table; the same whether the list came from the local store or remotely.
pub fn account_list(list: &[Value], json: bool) {
    json_or(list, json, account_table);
}

/// `account create`: the account view as JSON, or one line.
pub fn account_created(v: &Value, json: bool) {
    json_or(v, json, |v| {
        outln!(
            "created account {} ({})",
            str_of(v, "name"),
            str_of(v, "id")
        )
    });
}

/// Tokens (JSON views) as a table.
pub fn token_table(rows: &[Value]) {
    outln!(
        "{:<21} {:<20} {:<12} {:<14} {:<9} {:<20} {:<16} {:<16} {:<16} STATUS",
        "ID",
        "NAME",
        "PREFIX",
        "ACCOUNT",
        "ROLE",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "LAST USED"
    );
    for t in rows {
        let scopes = match t["scopes"].as_object() {
            Some(m) if !m.is_empty() => m
                .iter()
                .map(|(k, v)| {
                    let vals: Vec<&str> = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    format!("{k}={}", vals.join(","))
                })
                .collect::<Vec<_>>()
                .join(";"),
            _ => "-".to_string(),
        };
        outln!(
            "{:<21} {:<20} {:<12} {:<14} {:<9} {:<20} {:<16} {:<16} {:<16} {}",
            str_of(t, "id"),
            str_of(t, "name"),
            str_of(t, "prefix"),
            str_of(t, "account"),
            t["role"].as_str().unwrap_or("-"),
            scopes,
            short_time(t["created_at"].as_str()),
            t["expires_at"]
                .as_str()
                .map(|e| short_time(Some(e)))
                .unwrap_or_else(|| "never".into()),
            short_time(t["last_used_at"].as_str()),
            str_of(t, "status")
        );
    }
}

/// One token (JSON view), a `key value` line per field.
pub fn token_detail(v: &Value) {
    if let Some(m) = v.as_object() {
        for (k, v) in m {
            let s = match v {
                Value::Null => "-".to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            outln!("{k:<18} {s}");
        }
    }
}

/// Accounts (JSON views: name, id, email, created_at, status) as a table.
pub fn account_table(list: &[Value]) {
    outln!(
        "{:<24} {:<22} {:<28} {:<17} STATUS",
        "NAME",
        "ID",
        "EMAIL",
        "CREATED"
    );
    for a in list {
        outln!(
            "{:<24} {:<22} {:<28} {:<17} {}",
            str_of(a, "name"),
            str_of(a, "id"),
            a["email"].as_str().unwrap_or("-"),
            short_time(a["created_at"].as_str()),
            str_of(a, "status"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_short() {
        assert_eq!(
            short_time(Some("2026-01-02T03:04:05.678Z")),
            "2026-01-02 03:04"
        );
        assert_eq!(short_time(None), "-");
    }
}
