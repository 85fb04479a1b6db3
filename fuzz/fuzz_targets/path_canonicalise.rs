//! Fuzzes `tokengate::path::canonicalise` (SPEC §5): idempotence, the output invariants, and
//! that a backend decoding the output once sees the same segments.
//!
//! Run from the repository root (nightly, or `RUSTC_BOOTSTRAP=1` on stable):
//! `cargo fuzz run path_canonicalise -- -dict=fuzz/path.dict -max_total_time=600`

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::path::canonicalise;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let strict = canonicalise(raw, false);
    let lenient = canonicalise(raw, true);
    for (allow, result) in [(false, &strict), (true, &lenient)] {
        match result {
            Ok(c) => {
                let again = canonicalise(&c.path, allow);
                assert_eq!(again.as_ref(), Ok(c), "not idempotent: {raw:?}");
                if let Err(why) = check(&c.path, allow) {
                    panic!("{raw:?} -> {:?}: {why}", c.path);
                }
                assert_eq!(c.has_non_ascii, has_high_escape(&c.path), "{raw:?}");
            }
            Err(e) => assert!(!e.reason().is_empty()),
        }
    }
    // Allowing non-ASCII only widens what is accepted; an ASCII path is treated identically.
    match (&strict, &lenient) {
        (Ok(s), l) => assert_eq!(Ok(s), l.as_ref(), "{raw:?}"),
        (Err(_), Ok(l)) => assert!(l.has_non_ascii, "{raw:?}"),
        (Err(_), Err(_)) => {}
    }
});

fn has_high_escape(path: &str) -> bool {
    path.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && matches!(w[1], b'8'..=b'9' | b'A'..=b'F'))
}

/// The output invariants, written independently of the module under test.
fn check(path: &str, allow_non_ascii: bool) -> Result<(), String> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err("does not start with /".into());
    }
    // Character level: pchar literals, '/', and uppercase escapes that are neither unreserved,
    // nor delimiters, nor controls, nor '%'.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("truncated escape")?;
            let digit = |h: u8| match h {
                b'0'..=b'9' => Ok(h - b'0'),
                b'A'..=b'F' => Ok(h - b'A' + 10),
                _ => Err(format!("escape digit {:?} is not uppercase hex", h as char)),
            };
            let v = (digit(hex[0])? << 4) | digit(hex[1])?;
            if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                return Err(format!("unreserved byte {v:#04x} left encoded"));
            }
            if b"%/\\;?#".contains(&v) || v < 0x20 || v == 0x7F {
                return Err(format!("forbidden escape {v:#04x}"));
            }
            if v >= 0x80 && !allow_non_ascii {
                return Err(format!("non-ASCII escape {v:#04x}"));
            }
            decoded.push(v);
            i += 3;
        } else {
            if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b)) {
                return Err(format!("raw byte {b:#04x} not allowed"));
            }
            decoded.push(b);
            i += 1;
        }
    }
    // Segment level, on the path as the gateway matches it and as a backend decodes it once.
    for view in [bytes, decoded.as_slice()] {
        let segs: Vec<&[u8]> = view[1..].split(|&b| b == b'/').collect();
        for (n, seg) in segs.iter().enumerate() {
            if seg.is_empty() && n + 1 != segs.len() {
                return Err("empty inner segment".into());
            }
            if !seg.is_empty() && seg.iter().all(|&b| b == b'.') {
                return Err("dot segment".into());
            }
            // Win32 trims trailing dots and spaces (`..%20` is `..` there).
            if seg.ends_with(b".") || seg.ends_with(b" ") {
                return Err("segment ends in '.' or a space".into());
            }
        }
    }
    if bytes.iter().filter(|&&b| b == b'/').count()
        != decoded.iter().filter(|&&b| b == b'/').count()
    {
        return Err("decoding changed the number of '/'".into());
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err("decoded path is not UTF-8".into());
    }
    Ok(())
}
