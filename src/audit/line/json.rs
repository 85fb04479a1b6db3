//! The hot-path JSON encoder of the request and completion records: the same bytes
//! `serde_json::to_writer` produces for them (field order, `null` for `None`, skipped fields,
//! string escapes, floats in the form of `zmij`, serde_json's own formatter), written straight
//! into the line buffer without going through serde. A property test (`audit::tests::json`)
//! holds it to serde's output byte for byte over arbitrary records. Admin records (free-form
//! `details`) keep going through serde.

use crate::audit::{CompletionRecord, Entry, RequestRecord};

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
    buf.extend_from_slice(b"{\"kind\":\"request\",\"timestamp\":");
    string(buf, &r.timestamp);
    buf.extend_from_slice(b",\"request_id\":");
    string(buf, &r.request_id);
    buf.extend_from_slice(b",\"auth_type\":");
    string(buf, &r.auth_type);
    buf.extend_from_slice(b",\"api_token_id\":");
    opt_string(buf, r.api_token_id.as_deref());
    buf.extend_from_slice(b",\"api_token_name\":");
    opt_string(buf, r.api_token_name.as_deref());
    buf.extend_from_slice(b",\"token_prefix\":");
    opt_string(buf, r.token_prefix.as_deref());
    buf.extend_from_slice(b",\"account\":");
    opt_string(buf, r.account.as_deref());
    buf.extend_from_slice(b",\"method\":");
    string(buf, &r.method);
    buf.extend_from_slice(b",\"path\":");
    string(buf, &r.path);
    // `skip_serializing_if = "status_pending"`: a decision line has no status.
    if r.status_code != 0 {
        buf.extend_from_slice(b",\"status_code\":");
        integer(buf, u64::from(r.status_code));
    }
    buf.extend_from_slice(b",\"rbac_decision\":");
    string(buf, &r.rbac_decision);
    buf.extend_from_slice(b",\"reason\":");
    string(buf, &r.reason);
    buf.extend_from_slice(b",\"permission\":");
    opt_string(buf, r.permission.as_deref());
    buf.extend_from_slice(b",\"rule\":");
    opt_string(buf, r.rule.as_deref());
    buf.extend_from_slice(b",\"shadow_decision\":");
    opt_string(buf, r.shadow_decision.as_deref());
    buf.extend_from_slice(b",\"client_ip\":");
    string(buf, &r.client_ip);
    buf.extend_from_slice(b",\"user_agent\":");
    opt_string(buf, r.user_agent.as_deref());
    buf.extend_from_slice(b",\"upstream\":");
    opt_string(buf, r.upstream.as_deref());
    buf.extend_from_slice(b",\"duration_ms\":");
    float(buf, r.duration_ms);
    buf.extend_from_slice(b",\"mode\":");
    opt_string(buf, r.mode.as_deref());
    // `skip_serializing_if = "Option::is_none"`.
    if let Some(phase) = &r.phase {
        buf.extend_from_slice(b",\"phase\":");
        string(buf, phase);
    }
    buf.extend_from_slice(b",\"trace_id\":");
    opt_string(buf, r.trace_id.as_deref());
    buf.push(b'}');
}

fn completion(buf: &mut Vec<u8>, c: &CompletionRecord) {
    buf.extend_from_slice(b"{\"kind\":\"completion\",\"timestamp\":");
    string(buf, &c.timestamp);
    buf.extend_from_slice(b",\"request_id\":");
    string(buf, &c.request_id);
    buf.extend_from_slice(b",\"status_code\":");
    integer(buf, u64::from(c.status_code));
    buf.extend_from_slice(b",\"reason\":");
    string(buf, &c.reason);
    buf.extend_from_slice(b",\"outcome\":");
    string(buf, &c.outcome);
    buf.extend_from_slice(b",\"bytes\":");
    integer(buf, c.bytes);
    buf.extend_from_slice(b",\"duration_ms\":");
    float(buf, c.duration_ms);
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
