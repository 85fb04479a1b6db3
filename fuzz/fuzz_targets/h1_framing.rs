//! Differential fuzzing of the HTTP/1 fast path's framing against hyper's (issue 18): the same
//! bytes go to the fast path's head parser, request after request, and to a hyper HTTP/1 server
//! over an in-memory duplex (`tokengate::h1::differential`). Fails when a request the fast path
//! takes is not one hyper takes alike (method, target, header fields, body length, where it
//! ends), or hyper refuses it. Where the fast path declines, hyper decides: nothing to compare.
//!
//! Run from the repository root (nightly, or `RUSTC_BOOTSTRAP=1` on stable):
//! `cargo +nightly fuzz run h1_framing -- -dict=fuzz/h1.dict -max_total_time=600`

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = tokengate::h1::differential::check(data) {
        panic!("{e}");
    }
});
