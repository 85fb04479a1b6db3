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

/// Pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
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
        println!("{v}");
    } else {
        println!("{}", str_of(v, "token"));
    }
    let _ = std::io::stdout().flush();
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
        "the old token {old} keeps working until the new one is first used, or for {grace_seconds}s at most"
    );
}

/// Tokens (JSON views) as a table.
pub fn token_table(rows: &[Value]) {
    println!(
        "{:<21} {:<20} {:<12} {:<14} {:<9} {:<20} {:<16} {:<16} {:<16} STATUS",
        "ID", "NAME", "PREFIX", "ACCOUNT", "ROLE", "SCOPES", "CREATED", "EXPIRES", "LAST USED"
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
        println!(
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
            println!("{k:<18} {s}");
        }
    }
}

/// Accounts (JSON views: name, id, email, created_at, status) as a table.
pub fn account_table(list: &[Value]) {
    println!(
        "{:<24} {:<22} {:<28} {:<17} STATUS",
        "NAME", "ID", "EMAIL", "CREATED"
    );
    for a in list {
        println!(
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
