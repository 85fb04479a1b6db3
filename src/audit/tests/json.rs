//! The hand-written audit line encoder (`line/json.rs`) against serde_json: the same bytes for
//! every request and completion record, whatever their strings hold.

use std::borrow::Cow;

use proptest::prelude::*;

use super::*;

/// Strings that stress the escaping: quotes, backslashes, every control character, DEL, and
/// multi-byte UTF-8, mixed with plain text; and fully arbitrary strings.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\\x00-\\x1f\"\\\\/\\x7f a-zA-Z0-9\u{80}-\u{7ff}\u{800}-\u{ffff}\u{10000}-\u{10ffff}]{0,24}",
        any::<String>(),
        Just(String::new()),
    ]
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(text())
}

fn cow() -> impl Strategy<Value = Cow<'static, str>> {
    text().prop_map(Cow::Owned)
}

fn opt_cow() -> impl Strategy<Value = Option<Cow<'static, str>>> {
    prop::option::of(cow())
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        (0u64..10_000_000).prop_map(|n| n as f64 / 1000.0),
        Just(0.0),
        Just(-0.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(1e300),
        Just(f64::MIN_POSITIVE),
    ]
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![Just(0u16), Just(200u16), any::<u16>()]
}

fn request_record() -> impl Strategy<Value = RequestRecord> {
    let ids = (
        text(),
        text(),
        cow(),
        opt_text(),
        opt_text(),
        opt_text(),
        opt_text(),
    );
    let what = (
        cow(),
        text(),
        status(),
        cow(),
        cow(),
        opt_text(),
        opt_text(),
    );
    let rest = (
        opt_cow(),
        text(),
        opt_text(),
        opt_text(),
        float(),
        opt_cow(),
        opt_cow(),
        opt_text(),
    );
    (ids, what, rest).prop_map(|(ids, what, rest)| {
        let (timestamp, request_id, auth_type, api_token_id, api_token_name, token_prefix, account) =
            ids;
        let (method, path, status_code, rbac_decision, reason, permission, rule) = what;
        let (shadow_decision, client_ip, user_agent, upstream, duration_ms, mode, phase, trace_id) =
            rest;
        RequestRecord {
            timestamp,
            request_id,
            auth_type,
            api_token_id,
            api_token_name,
            token_prefix,
            account,
            method,
            path,
            status_code,
            rbac_decision,
            reason,
            permission,
            rule,
            shadow_decision,
            client_ip,
            user_agent,
            upstream,
            duration_ms,
            mode,
            phase,
            trace_id,
        }
    })
}

fn completion_record() -> impl Strategy<Value = CompletionRecord> {
    (
        text(),
        text(),
        status(),
        cow(),
        cow(),
        any::<u64>(),
        float(),
    )
        .prop_map(
            |(timestamp, request_id, status_code, reason, outcome, bytes, duration_ms)| {
                CompletionRecord {
                    timestamp,
                    request_id,
                    status_code,
                    reason,
                    outcome,
                    bytes,
                    duration_ms,
                }
            },
        )
}

fn assert_same(entry: &Entry) {
    let ours = entry_json(entry);
    let serde = serde_json::to_vec(entry).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&serde)
    );
    assert_eq!(ours, serde);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn request_lines_are_serde_json_byte_for_byte(r in request_record()) {
        assert_same(&Entry::Request(r));
    }

    #[test]
    fn completion_lines_are_serde_json_byte_for_byte(c in completion_record()) {
        assert_same(&Entry::Completion(c));
    }
}

#[test]
fn every_single_character_below_0x80_and_some_beyond_escape_as_serde_does() {
    let mut r = req("chars");
    for c in (0u32..0x80).chain([0x80, 0x7ff, 0x800, 0x2028, 0x2029, 0xfeff, 0xffff, 0x10ffff]) {
        let c = char::from_u32(c).unwrap();
        r.path = format!("a{c}b{c}{c}");
        r.user_agent = Some(c.to_string());
        assert_same(&Entry::Request(r.clone()));
    }
}

#[test]
fn the_documented_records_and_a_sealed_line_match_serde() {
    let mut decision = req("d");
    decision.status_code = 0;
    decision.phase = Some("decision".into());
    decision.mode = Some("proxy".into());
    decision.trace_id = Some("0af7651916cd43dd8448eb211c80319c".into());
    assert_same(&Entry::Request(decision.clone()));
    assert_same(&Entry::Request(req("r")));
    assert_same(&Entry::Completion(CompletionRecord {
        timestamp: now_rfc3339(),
        request_id: "d".into(),
        status_code: 499,
        reason: "client_closed".into(),
        outcome: "client_closed".into(),
        bytes: u64::MAX,
        duration_ms: 442.87,
    }));
    // Admin records go through serde itself.
    assert_same(&Entry::Admin(AdminRecord {
        event: "token.revoked".into(),
        details: Some(serde_json::json!({"a": [1, "\u{1}"]})),
        ..Default::default()
    }));
    // A whole sealed line: serde's object, then seq and chain.
    let entry = Entry::Request(decision);
    let (line, chain) = encode(&entry, 42, GENESIS_CHAIN);
    let mut head = serde_json::to_vec(&entry).unwrap();
    head.pop();
    head.extend_from_slice(b",\"seq\":42}");
    assert_eq!(chain, chain_hex(GENESIS_CHAIN.as_bytes(), &[&head]));
    head.pop();
    head.extend_from_slice(format!(",\"chain\":\"{chain}\"}}\n").as_bytes());
    assert_eq!(line, head);
}
