//! The fast path's head parser: what it takes, what it declines, and — the deterministic twin of
//! `fuzz/fuzz_targets/h1_framing.rs` — that every request it takes is one hyper takes alike,
//! for a corpus of smuggling shapes and for generated and mutated pipelines.

use proptest::prelude::*;

use super::*;
use crate::h1::differential::{LIMITS, check, fast_path, hyper};

fn parsed(s: &str) -> Parsed {
    parse(s.as_bytes(), LIMITS)
}

fn declined(s: &str) -> bool {
    matches!(parsed(s), Parsed::Decline(_))
}

#[test]
fn a_clean_head_is_taken_with_its_body_length() {
    let Parsed::Head(h) =
        parsed("POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET")
    else {
        panic!("not taken")
    };
    assert_eq!(h.method, Method::POST);
    assert_eq!(h.uri, "/a?b=1");
    assert_eq!(h.body_len, 5);
    assert!(h.has_content_length && h.keep_alive);
    assert_eq!(
        h.len,
        "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n".len()
    );
    let Parsed::Head(h) = parsed("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n") else {
        panic!("not taken")
    };
    assert!(!h.keep_alive && !h.has_content_length && h.body_len == 0);
    assert!(matches!(
        parsed("GET / HTTP/1.1\r\nHost: x\r\n"),
        Parsed::Partial
    ));
    assert!(matches!(parsed(""), Parsed::Partial));
}

#[test]
fn everything_ambiguous_is_declined() {
    for s in [
        "GET / HTTP/1.0\r\n\r\n",
        "GET http://x/ HTTP/1.1\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\n\r\n",
        "CONNECT x:443 HTTP/1.1\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "\r\nGET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\n\r\n",
        "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        "GET / HTTP/1.1\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n\r\n",
        "POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        "GET  / HTTP/1.1\r\n\r\n",
        "G@T / HTTP/1.1\r\n\r\n",
    ] {
        assert!(declined(s), "{s:?}: {:?}", parsed(s));
    }
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(LIMITS.max_uri));
    assert!(declined(&long));
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
    assert!(declined(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
    let big = format!("GET / HTTP/1.1\r\nX: {}", "v".repeat(LIMITS.max_buf));
    assert!(declined(&big), "a head over the buffer limit");
}

/// Smuggling and framing shapes (the corpus of tests/security.rs and then some), each followed
/// by a second request.
const CORPUS: &[&str] = &[
    "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 007\r\n\r\nabcdefg",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /smuggled HTTP/1.1\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3 \r\n\r\nabc",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length:\t3\r\n\r\nabc",
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc",
    "GET /a HTTP/1.1\r\nHost: x\r\nX: 1\r\n\tContent-Length: 3\r\n\r\nabc",
    "GET /a HTTP/1.1\nHost: x\n\n",
    "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /a HTTP/1.1\r\nHost: x\r\nX: caf\u{e9}\r\n\r\n",
    "GET /a HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
    "GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /a?x=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /a HTTP/1.1\r\nHost: x\r\n\r\n\r\n",
];

#[test]
fn the_corpus_frames_alike_on_both_sides() {
    let next = "GET /second HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut taken = 0;
    for case in CORPUS {
        let bytes = format!("{case}{next}");
        if let Err(e) = check(bytes.as_bytes()) {
            panic!("{e}");
        }
        taken += fast_path(bytes.as_bytes()).len();
    }
    assert!(
        taken >= 10,
        "the corpus exercises the fast path ({taken} requests taken)"
    );
}

#[test]
fn the_harness_sees_a_disagreement_when_there_is_one() {
    // Not vacuous: hyper's view of a pipeline is what the fast path's must match.
    let bytes =
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
    let slow = hyper(bytes);
    assert_eq!(slow.len(), 2, "{slow:?}");
    assert_eq!(slow[0].body, Some(3));
    assert_eq!(slow[1].target, "/b");
    assert_eq!(fast_path(bytes), slow);
}

fn header_line() -> impl Strategy<Value = String> {
    let names = prop_oneof![
        6 => prop::sample::select(vec!["Host", "X-A", "Content-Length", "content-length", "Connection"]),
        1 => prop::sample::select(vec![
            "Transfer-Encoding",
            "Expect",
            "Upgrade",
            "Content-Length ",
            "X_B",
            "Trailer",
        ]),
    ];
    let values = prop_oneof![
        6 => prop::sample::select(vec!["3", "0", "10", "x", "keep-alive", "close", "007"]),
        1 => prop::sample::select(vec![
            " 3", "3 ", "+3", "3,3", "chunked", "", "a\tb", "ok\u{1}", "100-continue", "-1",
        ]),
    ];
    let ends = prop_oneof![8 => Just("\r\n"), 1 => Just("\n"), 1 => Just("\r\n "), 1 => Just("\r")];
    (names, values, ends).prop_map(|(n, v, e)| format!("{n}: {v}{e}"))
}

fn request() -> impl Strategy<Value = String> {
    let methods = prop_oneof![
        6 => prop::sample::select(vec!["GET", "POST", "HEAD", "PUT", "DELETE"]),
        1 => prop::sample::select(vec!["G T", "get", "CONNECT", ""]),
    ];
    let targets = prop_oneof![
        6 => prop::sample::select(vec!["/", "/a?b", "/%41", "/a/../b"]),
        1 => prop::sample::select(vec!["*", "http://x/", "/a b", "a", "/\u{e9}"]),
    ];
    let versions = prop_oneof![
        8 => Just("HTTP/1.1"),
        1 => prop::sample::select(vec!["HTTP/1.0", "HTTP/2", "HTTP/1.1 ", "http/1.1"]),
    ];
    (
        methods,
        targets,
        versions,
        prop::collection::vec(header_line(), 0..5),
        prop::sample::select(vec![
            "",
            "abc",
            "abcdefghij",
            "0\r\n\r\n",
            "3\r\nabc\r\n0\r\n\r\n",
        ]),
    )
        .prop_map(|(m, t, v, hs, body)| format!("{m} {t} {v}\r\n{}\r\n{body}", hs.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_pipelines_frame_alike(reqs in prop::collection::vec(request(), 1..4)) {
        let bytes = reqs.concat();
        if let Err(e) = check(bytes.as_bytes()) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn mutated_pipelines_frame_alike(
        reqs in prop::collection::vec(request(), 1..3),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = reqs.concat().into_bytes();
        for (at, b) in flips {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
        }
        if let Err(e) = check(&bytes) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn generated_pipelines_exercise_the_fast_path() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(request(), 1..4);
    let mut taken = 0;
    for _ in 0..500 {
        let bytes = strategy.new_tree(&mut runner).unwrap().current().concat();
        if !fast_path(bytes.as_bytes()).is_empty() {
            taken += 1;
        }
    }
    assert!(
        taken >= 100,
        "only {taken} of 500 generated pipelines reach the fast path"
    );
}
