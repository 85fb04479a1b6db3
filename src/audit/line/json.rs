//! The hot-path JSON encoder of the request and completion records: the same bytes
//! `serde_json::to_writer` produces for them (field order, `null` for `None`, skipped fields,
//! string escapes, floats in the form of `zmij`, serde_json's own formatter), written straight
//! into the line buffer without going through serde. A property test (`audit::tests::json`)
//! holds it to serde's output byte for byte over arbitrary records. Admin records (free-form
//! `details`) keep going through serde.

use crate::audit::{CompletionRecord, Entry, RequestRecord};

/// Appends `,"name":` and the value, written by `write` (`string`, `opt_string`, `integer` or
/// `float`).
macro_rules! field {
    ($buf:expr, $name:literal, $write:ident($value:expr)) => {{
        $buf.extend_from_slice(concat!(",\"", $name, "\":").as_bytes());
        $write($buf, $value);
    }};
}

/// Appends the JSON object of `entry` (`{"kind":...}`) to `buf`; false (nothing written) for
/// the kinds it does not encode (admin records), which the caller serializes with serde.
pub(in crate::audit) fn write_entry(buf: &mut Vec<u8>, entry: &Entry) -> bool {
    match entry {
        Entry::Request(r) => request(buf, r),
        Entry::Completion(c) => completion(buf, c),
        Entry::Admin(_) => return false,
    }
    true
}

fn request(buf: &mut Vec<u8>, r: &RequestRecord) {
    buf.extend_from_slice(b"{\"kind\":\"request\"");
    field!(buf, "timestamp", string(&r.timestamp));
    field!(buf, "request_id", string(&r.request_id));
    field!(buf, "auth_type", string(&r.auth_type));
    field!(buf, "api_token_id", opt_string(r.api_token_id.as_deref()));
    field!(
        buf,
        "api_token_name",
        opt_string(r.api_token_name.as_deref())
    );
    field!(buf, "token_prefix", opt_string(r.token_prefix.as_deref()));
    field!(buf, "account", opt_string(r.account.as_deref()));
    field!(buf, "method", string(&r.method));
    field!(buf, "path", string(&r.path));
    // `skip_serializing_if = "status_pending"`: a decision line has no status.
    if r.status_code != 0 {
        field!(buf, "status_code", integer(u64::from(r.status_code)));
    }
    field!(buf, "rbac_decision", string(&r.rbac_decision));
    field!(buf, "reason", string(&r.reason));
    field!(buf, "permission", opt_string(r.permission.as_deref()));
    field!(buf, "rule", opt_string(r.rule.as_deref()));
    field!(
        buf,
        "shadow_decision",
        opt_string(r.shadow_decision.as_deref())
    );
    field!(buf, "client_ip", string(&r.client_ip));
    field!(buf, "user_agent", opt_string(r.user_agent.as_deref()));
    field!(buf, "upstream", opt_string(r.upstream.as_deref()));
    field!(buf, "duration_ms", float(r.duration_ms));
    field!(buf, "mode", opt_string(r.mode.as_deref()));
    // `skip_serializing_if = "Option::is_none"`.
    if let Some(phase) = &r.phase {
        field!(buf, "phase", string(phase));
    }
    field!(buf, "trace_id", opt_string(r.trace_id.as_deref()));
    buf.push(b'}');
}

fn completion(buf: &mut Vec<u8>, c: &CompletionRecord) {
    buf.extend_from_slice(b"{\"kind\":\"completion\"");
    field!(buf, "timestamp", string(&c.timestamp));
    field!(buf, "request_id", string(&c.request_id));
    field!(buf, "status_code", integer(u64::from(c.status_code)));
    field!(buf, "reason", string(&c.reason));
    field!(buf, "outcome", string(&c.outcome));
    field!(buf, "bytes", integer(c.bytes));
    field!(buf, "duration_ms", float(c.duration_ms));
    buf.push(b'}');
}

fn opt_string(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(buf, s),
        None => buf.extend_from_slice(b"null"),
    }
}

pub(super) fn integer(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// serde_json: a finite float in the shortest form of `zmij` (the formatter serde_json uses),
/// anything else as `null`.
fn float(buf: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        buf.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        buf.extend_from_slice(b"null");
    }
}

/// A JSON string as serde_json writes it: `"` and `\` escaped, the control characters below
/// 0x20 as `\b \t \n \f \r` or `\u00xx` (lowercase hex), everything else (DEL, non-ASCII) as is.
fn string(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[usize::from(b >> 4)]);
            buf.push(HEX[usize::from(b & 0xf)]);
        } else {
            buf.extend_from_slice(short);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
}
