//! Canonical request paths (SPEC §5): the one string that authorisation and the upstream both see.
//!
//! Owns: [`canonicalise`] and its errors, [`percent_encode`]. Pure: must never import anything
//! of ours.

use std::cmp::Ordering;

/// The canonical form of a request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// The canonical path, always starting with `/`.
    pub path: String,
    /// True when the path carried (valid, percent-encoded) non-ASCII characters.
    pub has_non_ascii: bool,
}

/// Why a path was refused. `reason()` gives a short stable snake_case string for logs/audit.
///
/// Every variant is a client error (400 in the gateway). The `Display` text is for logs; it never
/// echoes more than one offending byte or character of the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is the empty string.
    #[error("empty request path")]
    Empty,
    /// The path does not start with `/` (this includes the OPTIONS asterisk-form `*`).
    #[error("request path does not start with '/'")]
    NotAbsolute,
    /// A segment is `.` or `..` (raw or percent-encoded), or consists only of dots.
    #[error("'.' or '..' path segment")]
    DotSegment,
    /// A segment ending in `.` or a space (`%20`) after decoding (`..%20`, `x.`, `%2e%20`):
    /// Windows and IIS trim them, so `..%20` is `..` and `admin.` is `admin` there.
    #[error("path segment ends in '.' or a space")]
    TrailingDotOrSpace,
    /// An empty segment (`//`) anywhere but as the single trailing slash.
    #[error("empty path segment")]
    EmptySegment,
    /// A raw `;` (path parameters are read differently by different backends).
    #[error("';' in path")]
    Semicolon,
    /// A raw `\` (some backends treat it as `/`).
    #[error("'\\' in path")]
    Backslash,
    /// A raw control character (0x00-0x1F, 0x7F).
    #[error("control character 0x{byte:02X} in path")]
    ControlChar {
        /// The offending byte.
        byte: u8,
    },
    /// A raw ASCII character that is not an RFC 3986 `pchar` or `/` (space, `"`, `<`, `?`, `#`, ...).
    #[error("character {ch:?} is not allowed unencoded in a path")]
    ForbiddenChar {
        /// The offending character.
        ch: char,
    },
    /// A raw (not percent-encoded) non-ASCII character; refused even on routes that allow non-ASCII.
    #[error("unencoded non-ASCII character U+{:04X} in path", u32::from(*ch))]
    RawNonAscii {
        /// The offending character.
        ch: char,
    },
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-escape in path")]
    MalformedPercent,
    /// `%25`, an encoded `%`: the building block of double encoding, refused outright.
    #[error("encoded '%' (%25) in path: double encoding is refused")]
    DoubleEncoding,
    /// An encoded delimiter: `%2F` (`/`), `%5C` (`\`), `%3B` (`;`), `%3F` (`?`) or `%23` (`#`).
    #[error("encoded delimiter %{byte:02X} in path")]
    EncodedDelimiter {
        /// The decoded byte.
        byte: u8,
    },
    /// An encoded control character: `%00`-`%1F` or `%7F`.
    #[error("encoded control character %{byte:02X} in path")]
    EncodedControl {
        /// The decoded byte.
        byte: u8,
    },
    /// An encoded non-ASCII byte on a route that does not allow non-ASCII paths.
    #[error("encoded non-ASCII byte %{byte:02X} in path, not allowed on this route")]
    NonAscii {
        /// The first decoded byte >= 0x80.
        byte: u8,
    },
    /// The decoded bytes of a segment are not valid UTF-8 (overlong forms, surrogates, truncation).
    #[error("percent-encoded bytes in path are not valid UTF-8")]
    InvalidUtf8,
    /// A non-ASCII character that a backend could read as a delimiter or as ASCII (`．`, `／`, `＼`,
    /// `∕`, `Ａ`, ...).
    #[error("confusable character U+{:04X} in path", u32::from(*ch))]
    ConfusableChar {
        /// The offending character.
        ch: char,
    },
    /// A non-ASCII control, separator, bidi or default-ignorable character, which backends may
    /// silently drop (turning `.<ZWSP>.` into `..`) and which can disguise a path in logs.
    #[error("invisible character U+{:04X} in path", u32::from(*ch))]
    InvisibleChar {
        /// The offending character.
        ch: char,
    },
}

impl PathError {
    /// A short, stable snake_case name for logs and the audit `reason` detail.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty_path",
            Self::NotAbsolute => "not_absolute",
            Self::DotSegment => "dot_segment",
            Self::TrailingDotOrSpace => "trailing_dot_or_space",
            Self::EmptySegment => "empty_segment",
            Self::Semicolon => "semicolon",
            Self::Backslash => "backslash",
            Self::ControlChar { .. } => "control_char",
            Self::ForbiddenChar { .. } => "forbidden_char",
            Self::RawNonAscii { .. } => "raw_non_ascii",
            Self::MalformedPercent => "malformed_percent",
            Self::DoubleEncoding => "double_encoding",
            Self::EncodedDelimiter { .. } => "encoded_delimiter",
            Self::EncodedControl { .. } => "encoded_control",
            Self::NonAscii { .. } => "non_ascii",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::ConfusableChar { .. } => "confusable_char",
            Self::InvisibleChar { .. } => "invisible_char",
        }
    }
}

/// Canonicalise `raw`, which is `uri.path()` exactly as received (no query, no fragment).
/// `allow_non_ascii`: whether valid UTF-8 non-ASCII is allowed (a route can opt in).
///
/// The result is the only form of the path the gateway uses: rules match on it and the upstream
/// request line is built from it, so the check and the backend cannot read two different paths.
/// Anything that could be read two ways is refused rather than repaired (fail closed).
///
/// Refused:
/// - the empty string, and anything not starting with `/` (including the asterisk-form `*`);
/// - raw `;` and `\`, raw control characters (0x00-0x1F, 0x7F), raw non-ASCII, and every other
///   raw byte that is neither an RFC 3986 §3.3 `pchar` nor `/` (space, `"`, `<`, `>`, `` ` ``,
///   `{`, `}`, `|`, `^`, `[`, `]`, `#`, `?`);
/// - a `%` not followed by two hex digits (RFC 3986 §2.1);
/// - `%25`, in any case: an encoded `%` is how double encoding (`%252e`) reaches a backend that
///   decodes twice, so it is refused outright; no legitimate API path needs it;
/// - encoded delimiters `%2F`, `%5C`, `%3B`, `%3F`, `%23` and encoded controls `%00`-`%1F`, `%7F`,
///   in any case;
/// - encoded bytes >= 0x80 unless `allow_non_ascii`; when allowed, each segment's decoded bytes
///   must be valid UTF-8 (no overlong `%C0%AE`, surrogates or truncated sequences) and must not
///   contain a confusable character (one whose NFKC form contains ASCII, such as U+FF0E `．`,
///   U+FF0F `／`, U+FF3C `＼`, U+2024 `․`, U+FE52, U+FE68, fullwidth letters; or a look-alike that
///   best-fit or IDNA mappings turn into a delimiter, such as U+2215 `∕`, U+2044 `⁄`, U+2216,
///   U+29F5, U+00A5 `¥`, U+3002 `。`) or an invisible one (C1 controls, line separators, bidi
///   controls, default-ignorable code points);
/// - a segment that is `.` or `..` once unreserved escapes are decoded (`%2e`, `.%2E`, ...), and
///   any segment made only of dots (RFC 3986 §6.2.2.3 would remove dot segments; we refuse them
///   so the rule and the backend never resolve them differently);
/// - an empty segment (`//`), except the path `/` itself and one trailing slash, which is kept
///   because it is significant.
///
/// Normalised (RFC 3986 §6.2.2): escapes of unreserved characters (ALPHA / DIGIT / `-` / `.` /
/// `_` / `~`, §2.3) are decoded to the character (`/%61pps` becomes `/apps`, §6.2.2.2); every other
/// escape is kept and written with uppercase hex (`%3a` becomes `%3A`, §2.1 and §6.2.2.1). The case
/// of the path itself is preserved: paths are case-sensitive.
///
/// Guarantees for an accepted path: it contains only `pchar`s, `/` and uppercase escapes; none of
/// `%25`, `%2F`, `%5C`, `%3B`, `%00`, a `.`/`..` segment or `//`; decoding it once yields the same
/// segments (no new `/`, `\`, `;`, `%` or dot segment can appear); and canonicalising it again
/// returns it unchanged (idempotence).
pub fn canonicalise(raw: &str, allow_non_ascii: bool) -> Result<CanonicalPath, PathError> {
    let bytes = raw.as_bytes();
    match bytes.first() {
        None => return Err(PathError::Empty),
        Some(b'/') => {}
        Some(_) => return Err(PathError::NotAbsolute),
    }

    let mut out = String::with_capacity(raw.len());
    out.push('/');
    let mut has_non_ascii = false;
    // Where the current segment starts in `out`, and whether it carries encoded non-ASCII bytes.
    let mut seg_start = out.len();
    let mut seg_non_ascii = false;

    let mut i = 1;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'/' => {
                check_segment(&out[seg_start..], false, seg_non_ascii)?;
                out.push('/');
                seg_start = out.len();
                seg_non_ascii = false;
                i += 1;
            }
            b'%' => {
                let value = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&hi), Some(&lo)) => match (hex_value(hi), hex_value(lo)) {
                        (Some(hi), Some(lo)) => (hi << 4) | lo,
                        _ => return Err(PathError::MalformedPercent),
                    },
                    _ => return Err(PathError::MalformedPercent),
                };
                i += 3;
                match value {
                    b'%' => return Err(PathError::DoubleEncoding),
                    b'/' | b'\\' | b';' | b'?' | b'#' => {
                        return Err(PathError::EncodedDelimiter { byte: value });
                    }
                    0x00..=0x1F | 0x7F => return Err(PathError::EncodedControl { byte: value }),
                    0x80..=0xFF => {
                        if !allow_non_ascii {
                            return Err(PathError::NonAscii { byte: value });
                        }
                        has_non_ascii = true;
                        seg_non_ascii = true;
                        push_escape(&mut out, value);
                    }
                    _ if is_unreserved(value) => out.push(char::from(value)),
                    _ => push_escape(&mut out, value),
                }
            }
            b';' => return Err(PathError::Semicolon),
            b'\\' => return Err(PathError::Backslash),
            0x00..=0x1F | 0x7F => return Err(PathError::ControlChar { byte: b }),
            0x80..=0xFF => {
                // Every byte before `i` was ASCII, so `i` is on a character boundary.
                let ch = raw[i..]
                    .chars()
                    .next()
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(PathError::RawNonAscii { ch });
            }
            _ if is_pchar_literal(b) => {
                out.push(char::from(b));
                i += 1;
            }
            _ => return Err(PathError::ForbiddenChar { ch: char::from(b) }),
        }
    }
    check_segment(&out[seg_start..], true, seg_non_ascii)?;

    Ok(CanonicalPath {
        path: out,
        has_non_ascii,
    })
}

/// Splits a canonical path into segments: "/" -> [], "/a/b" -> ["a","b"], "/a/" -> ["a",""].
pub fn segments(canonical: &str) -> impl Iterator<Item = &str> {
    let rest = canonical.strip_prefix('/').unwrap_or(canonical);
    (!rest.is_empty())
        .then(|| rest.split('/'))
        .into_iter()
        .flatten()
}

/// Percent-encodes every byte of `s` but the unreserved characters (RFC 3986 §2.3), uppercase:
/// a path segment or a query value that reads back as exactly `s`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks one finished segment, already in canonical form (unreserved escapes decoded, other
/// escapes uppercase and valid).
fn check_segment(segment: &str, is_last: bool, non_ascii: bool) -> Result<(), PathError> {
    if segment.is_empty() {
        // Only the segment after a trailing slash (or the root `/`) may be empty.
        return if is_last {
            Ok(())
        } else {
            Err(PathError::EmptySegment)
        };
    }
    // `.` and `..` are dot segments (RFC 3986 §3.3); longer runs of dots are refused too, since
    // some platforms (Win32 path handling) trim trailing dots and would read them as `..`.
    if segment.bytes().all(|b| b == b'.') {
        return Err(PathError::DotSegment);
    }
    if non_ascii {
        check_non_ascii_segment(segment)?;
    }
    // Win32 path handling (IIS, ASP.NET, Windows file servers) trims trailing dots and spaces:
    // `..%20` is `..`, `admin.` is `admin`. Refused, as nothing legitimate ends that way.
    if segment.ends_with('.') || segment.ends_with("%20") {
        return Err(PathError::TrailingDotOrSpace);
    }
    Ok(())
}

/// Decodes a canonical segment and checks its non-ASCII characters.
fn check_non_ascii_segment(segment: &str) -> Result<(), PathError> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = if bytes[i] == b'%' {
            bytes
                .get(i + 1..i + 3)
                .and_then(|pair| Some((hex_value(pair[0])? << 4) | hex_value(pair[1])?))
        } else {
            None
        };
        match escaped {
            Some(value) => {
                decoded.push(value);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    // `from_utf8` refuses overlong encodings, surrogates, code points past U+10FFFF and
    // truncated sequences, so `%C0%AE` can never become `.` here or in a lenient backend.
    let text = std::str::from_utf8(&decoded).map_err(|_| PathError::InvalidUtf8)?;
    for ch in text.chars().filter(|ch| !ch.is_ascii()) {
        if in_ranges(INVISIBLE, ch) {
            return Err(PathError::InvisibleChar { ch });
        }
        if in_ranges(NFKC_TO_ASCII, ch) || in_ranges(LOOKALIKES, ch) {
            return Err(PathError::ConfusableChar { ch });
        }
    }
    Ok(())
}

/// RFC 3986 §2.3 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §3.3 `pchar` minus `%` (handled as an escape) and minus `;` (refused), i.e.
/// unreserved / sub-delims without ";" / ":" / "@".
fn is_pchar_literal(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Writes `%XX` with uppercase hex digits (RFC 3986 §2.1, §6.2.2.1).
fn push_escape(out: &mut String, value: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(value >> 4)]));
    out.push(char::from(HEX[usize::from(value & 0x0F)]));
}

/// Whether `ch` lies in one of the sorted, disjoint, inclusive ranges of `table`.
fn in_ranges(table: &[(u32, u32)], ch: char) -> bool {
    let c = u32::from(ch);
    table
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                Ordering::Less
            } else if lo > c {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

/// Non-ASCII characters that backends may drop or treat as line breaks: C1 controls, line and
/// paragraph separators, bidi controls and the other Default_Ignorable_Code_Point ranges
/// (Unicode DerivedCoreProperties), plus the interlinear annotation characters.
const INVISIBLE: &[(u32, u32)] = &[
    (0x0080, 0x009F),
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFFB),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
];

/// Look-alikes of `.`, `/` and `\` that NFKC leaves alone but that other mappings turn into the
/// ASCII delimiter: Windows best-fit code pages (U+2215, U+2216, U+00A5 and U+20A9 are `\` in
/// the Japanese and Korean code pages), IDNA/UTS #46 full stops (U+3002, U+FF61, U+FE12), and
/// mathematical slashes (U+2044, U+29F5, U+29F8, U+29F9).
const LOOKALIKES: &[(u32, u32)] = &[
    (0x00A5, 0x00A5),
    (0x2044, 0x2044),
    (0x20A9, 0x20A9),
    (0x2215, 0x2216),
    (0x29F5, 0x29F5),
    (0x29F8, 0x29F9),
    (0x3002, 0x3002),
    (0xFE12, 0xFE12),
    (0xFF61, 0xFF61),
];

/// Every assigned code point >= U+0080 whose NFKC form contains an ASCII character (Unicode 14,
/// computed with Python's `unicodedata`, plus the Unicode 16 outlined letters U+1CCD6-U+1CCF9).
/// A backend that applies compatibility normalisation would read these as ASCII: U+FF0E `．` as
/// `.`, U+FF0F `／` as `/`, U+FF3C `＼` as `\`, U+2024/U+FE52 as `.`, U+2025 as `..`, U+FE68 as
/// `\`, U+037E as `;`, U+FF05 as `%`, U+FF21 `Ａ` as `A`, U+212A (Kelvin) as `K`, spaces as ` `.
const NFKC_TO_ASCII: &[(u32, u32)] = &[
    (0x00A0, 0x00A0),
    (0x00A8, 0x00A8),
    (0x00AA, 0x00AA),
    (0x00AF, 0x00AF),
    (0x00B2, 0x00B4),
    (0x00B8, 0x00BA),
    (0x00BC, 0x00BE),
    (0x0132, 0x0133),
    (0x013F, 0x0140),
    (0x0149, 0x0149),
    (0x017F, 0x017F),
    (0x01C4, 0x01CC),
    (0x01F1, 0x01F3),
    (0x02B0, 0x02B0),
    (0x02B2, 0x02B3),
    (0x02B7, 0x02B8),
    (0x02D8, 0x02DD),
    (0x02E1, 0x02E3),
    (0x037A, 0x037A),
    (0x037E, 0x037E),
    (0x0384, 0x0385),
    (0x1D2C, 0x1D2C),
    (0x1D2E, 0x1D2E),
    (0x1D30, 0x1D31),
    (0x1D33, 0x1D3A),
    (0x1D3C, 0x1D3C),
    (0x1D3E, 0x1D43),
    (0x1D47, 0x1D49),
    (0x1D4D, 0x1D4D),
    (0x1D4F, 0x1D50),
    (0x1D52, 0x1D52),
    (0x1D56, 0x1D58),
    (0x1D5B, 0x1D5B),
    (0x1D62, 0x1D65),
    (0x1D9C, 0x1D9C),
    (0x1DA0, 0x1DA0),
    (0x1DBB, 0x1DBB),
    (0x1E9A, 0x1E9A),
    (0x1FBD, 0x1FBD),
    (0x1FBF, 0x1FC1),
    (0x1FCD, 0x1FCF),
    (0x1FDD, 0x1FDF),
    (0x1FED, 0x1FEF),
    (0x1FFD, 0x1FFE),
    (0x2000, 0x200A),
    (0x2017, 0x2017),
    (0x2024, 0x2026),
    (0x202F, 0x202F),
    (0x203C, 0x203C),
    (0x203E, 0x203E),
    (0x2047, 0x2049),
    (0x205F, 0x205F),
    (0x2070, 0x2071),
    (0x2074, 0x207A),
    (0x207C, 0x208A),
    (0x208C, 0x208E),
    (0x2090, 0x2093),
    (0x2095, 0x209C),
    (0x20A8, 0x20A8),
    (0x2100, 0x2103),
    (0x2105, 0x2106),
    (0x2109, 0x210E),
    (0x2110, 0x2113),
    (0x2115, 0x2116),
    (0x2119, 0x211D),
    (0x2120, 0x2122),
    (0x2124, 0x2124),
    (0x2128, 0x2128),
    (0x212A, 0x212A),
    (0x212C, 0x212D),
    (0x212F, 0x2131),
    (0x2133, 0x2134),
    (0x2139, 0x2139),
    (0x213B, 0x213B),
    (0x2145, 0x2149),
    (0x2150, 0x217F),
    (0x2189, 0x2189),
    (0x2460, 0x24EA),
    (0x2A74, 0x2A76),
    (0x2C7C, 0x2C7D),
    (0x3000, 0x3000),
    (0x309B, 0x309C),
    (0x3200, 0x321E),
    (0x3220, 0x3243),
    (0x3250, 0x325F),
    (0x32B1, 0x32CF),
    (0x3358, 0x337A),
    (0x3380, 0x33FF),
    (0xA7F2, 0xA7F4),
    (0xFB00, 0xFB06),
    (0xFB29, 0xFB29),
    (0xFC5E, 0xFC63),
    (0xFDFA, 0xFDFB),
    (0xFE10, 0xFE10),
    (0xFE13, 0xFE16),
    (0xFE19, 0xFE19),
    (0xFE30, 0xFE30),
    (0xFE33, 0xFE38),
    (0xFE47, 0xFE50),
    (0xFE52, 0xFE52),
    (0xFE54, 0xFE57),
    (0xFE59, 0xFE5C),
    (0xFE5F, 0xFE66),
    (0xFE68, 0xFE6B),
    (0xFE70, 0xFE70),
    (0xFE72, 0xFE72),
    (0xFE74, 0xFE74),
    (0xFE76, 0xFE76),
    (0xFE78, 0xFE78),
    (0xFE7A, 0xFE7A),
    (0xFE7C, 0xFE7C),
    (0xFE7E, 0xFE7E),
    (0xFF01, 0xFF5E),
    (0xFFE3, 0xFFE3),
    (0x107A5, 0x107A5),
    (0x1CCD6, 0x1CCF9),
    (0x1D400, 0x1D454),
    (0x1D456, 0x1D49C),
    (0x1D49E, 0x1D49F),
    (0x1D4A2, 0x1D4A2),
    (0x1D4A5, 0x1D4A6),
    (0x1D4A9, 0x1D4AC),
    (0x1D4AE, 0x1D4B9),
    (0x1D4BB, 0x1D4BB),
    (0x1D4BD, 0x1D4C3),
    (0x1D4C5, 0x1D505),
    (0x1D507, 0x1D50A),
    (0x1D50D, 0x1D514),
    (0x1D516, 0x1D51C),
    (0x1D51E, 0x1D539),
    (0x1D53B, 0x1D53E),
    (0x1D540, 0x1D544),
    (0x1D546, 0x1D546),
    (0x1D54A, 0x1D550),
    (0x1D552, 0x1D6A3),
    (0x1D7CE, 0x1D7FF),
    (0x1F100, 0x1F10A),
    (0x1F110, 0x1F12E),
    (0x1F130, 0x1F14F),
    (0x1F16A, 0x1F16C),
    (0x1F190, 0x1F190),
    (0x1FBF0, 0x1FBF9),
];

#[cfg(test)]
mod tests {
    use super::*;
    use PathError as E;
    use proptest::prelude::*;

    const ASCII: bool = false;
    const UTF8: bool = true;

    /// (input, allow_non_ascii, expected canonical path or error).
    fn cases() -> Vec<(&'static str, bool, Result<&'static str, PathError>)> {
        vec![
            // Accepted, unchanged.
            ("/", ASCII, Ok("/")),
            ("/apps/billing", ASCII, Ok("/apps/billing")),
            ("/apps/", ASCII, Ok("/apps/")),
            ("/a/b/", ASCII, Ok("/a/b/")),
            ("/A/b/C", ASCII, Ok("/A/b/C")),
            ("/v1/apps/web-1/deploy", ASCII, Ok("/v1/apps/web-1/deploy")),
            ("/a/b/c/d/e/f", ASCII, Ok("/a/b/c/d/e/f")),
            ("/0/9", ASCII, Ok("/0/9")),
            ("/a:b@c", ASCII, Ok("/a:b@c")),
            ("/a!$&'()*+,=", ASCII, Ok("/a!$&'()*+,=")),
            ("/*", ASCII, Ok("/*")),
            ("/a*b", ASCII, Ok("/a*b")),
            ("/-", ASCII, Ok("/-")),
            ("/_", ASCII, Ok("/_")),
            ("/~user", ASCII, Ok("/~user")),
            ("/.a", ASCII, Ok("/.a")),
            ("/a.", ASCII, Err(E::TrailingDotOrSpace)),
            ("/..a", ASCII, Ok("/..a")),
            ("/a..b", ASCII, Ok("/a..b")),
            ("/.well-known/x", ASCII, Ok("/.well-known/x")),
            ("/apps/billing", UTF8, Ok("/apps/billing")),
            // Accepted, unreserved escapes decoded.
            ("/apps/%62illing", ASCII, Ok("/apps/billing")),
            ("/%61pps", ASCII, Ok("/apps")),
            ("/%41%42", ASCII, Ok("/AB")),
            ("/%7e%7E", ASCII, Ok("/~~")),
            ("/%2D%5f%5F", ASCII, Ok("/-__")),
            ("/%7euser", ASCII, Ok("/~user")),
            ("/%30%39", ASCII, Ok("/09")),
            ("/%2Ewell-known", ASCII, Ok("/.well-known")),
            ("/%2ea", ASCII, Ok("/.a")),
            ("/a%2E", ASCII, Err(E::TrailingDotOrSpace)),
            ("/%61/%62/", ASCII, Ok("/a/b/")),
            // Accepted, other escapes kept with uppercase hex.
            ("/a%3ab", ASCII, Ok("/a%3Ab")),
            ("/a%3Ab", ASCII, Ok("/a%3Ab")),
            ("/a%20b", ASCII, Ok("/a%20b")),
            ("/a%2bb", ASCII, Ok("/a%2Bb")),
            ("/a%40b", ASCII, Ok("/a%40b")),
            ("/a%22b", ASCII, Ok("/a%22b")),
            ("/a%3cb%3e", ASCII, Ok("/a%3Cb%3E")),
            ("/a/%7B%7d", ASCII, Ok("/a/%7B%7D")),
            ("/a%5B0%5d", ASCII, Ok("/a%5B0%5D")),
            ("/%2A", ASCII, Ok("/%2A")),
            ("/%60", ASCII, Ok("/%60")),
            ("/%7c", ASCII, Ok("/%7C")),
            ("/%5e", ASCII, Ok("/%5E")),
            // Accepted non-ASCII on routes that opt in.
            ("/caf%C3%A9", UTF8, Ok("/caf%C3%A9")),
            ("/caf%c3%a9", UTF8, Ok("/caf%C3%A9")),
            ("/%c3%a9/", UTF8, Ok("/%C3%A9/")),
            ("/%e6%97%a5%e6%9c%ac", UTF8, Ok("/%E6%97%A5%E6%9C%AC")),
            ("/%F0%9F%A6%80", UTF8, Ok("/%F0%9F%A6%80")),
            ("/stra%c3%9fe", UTF8, Ok("/stra%C3%9Fe")),
            ("/%D0%BF%D1%80%D0%B8", UTF8, Ok("/%D0%BF%D1%80%D0%B8")),
            ("/a/%e3%83%8e", UTF8, Ok("/a/%E3%83%8E")),
            ("/%c3%a9/%61", UTF8, Ok("/%C3%A9/a")),
            // Empty or not absolute.
            ("", ASCII, Err(E::Empty)),
            ("", UTF8, Err(E::Empty)),
            ("*", ASCII, Err(E::NotAbsolute)),
            ("a/b", ASCII, Err(E::NotAbsolute)),
            ("apps", ASCII, Err(E::NotAbsolute)),
            ("%2fa", ASCII, Err(E::NotAbsolute)),
            ("http://x/a", ASCII, Err(E::NotAbsolute)),
            (" /a", ASCII, Err(E::NotAbsolute)),
            // Dot segments, raw and encoded, any case.
            ("/a/..%20/b", ASCII, Err(E::TrailingDotOrSpace)),
            ("/x./y", ASCII, Err(E::TrailingDotOrSpace)),
            ("/a/%2e%20", ASCII, Err(E::TrailingDotOrSpace)),
            ("/admin%20", ASCII, Err(E::TrailingDotOrSpace)),
            ("/a/.../b", ASCII, Err(E::DotSegment)),
            ("/a/.x/b%20c", ASCII, Ok("/a/.x/b%20c")),
            ("/a/./b", ASCII, Err(E::DotSegment)),
            ("/a/../b", ASCII, Err(E::DotSegment)),
            ("/.", ASCII, Err(E::DotSegment)),
            ("/..", ASCII, Err(E::DotSegment)),
            ("/./", ASCII, Err(E::DotSegment)),
            ("/../", ASCII, Err(E::DotSegment)),
            ("/a/.", ASCII, Err(E::DotSegment)),
            ("/a/..", ASCII, Err(E::DotSegment)),
            ("/...", ASCII, Err(E::DotSegment)),
            ("/%2e", ASCII, Err(E::DotSegment)),
            ("/%2E", ASCII, Err(E::DotSegment)),
            ("/%2e%2e", ASCII, Err(E::DotSegment)),
            ("/%2e%2e%2e", ASCII, Err(E::DotSegment)),
            ("/a/%2E%2e/b", ASCII, Err(E::DotSegment)),
            ("/a/.%2e/b", ASCII, Err(E::DotSegment)),
            ("/a/%2e./b", ASCII, Err(E::DotSegment)),
            ("/a/.%2E", ASCII, Err(E::DotSegment)),
            ("/a/%2E/", UTF8, Err(E::DotSegment)),
            // Double encoding: any %25.
            ("/a/%252e%252e/b", ASCII, Err(E::DoubleEncoding)),
            ("/a/%252E/b", ASCII, Err(E::DoubleEncoding)),
            ("/%25", ASCII, Err(E::DoubleEncoding)),
            ("/a%25b", ASCII, Err(E::DoubleEncoding)),
            ("/%2525", ASCII, Err(E::DoubleEncoding)),
            ("/a%252fb", UTF8, Err(E::DoubleEncoding)),
            // Empty segments.
            ("/a//b", ASCII, Err(E::EmptySegment)),
            ("//", ASCII, Err(E::EmptySegment)),
            ("//a", ASCII, Err(E::EmptySegment)),
            ("/a//", ASCII, Err(E::EmptySegment)),
            ("///", ASCII, Err(E::EmptySegment)),
            // Semicolons, raw and encoded.
            ("/a;b", ASCII, Err(E::Semicolon)),
            ("/a;jsessionid=1", ASCII, Err(E::Semicolon)),
            ("/;", ASCII, Err(E::Semicolon)),
            ("/a/..;/b", ASCII, Err(E::Semicolon)),
            ("/a%3Bb", ASCII, Err(E::EncodedDelimiter { byte: b';' })),
            ("/a%3bb", ASCII, Err(E::EncodedDelimiter { byte: b';' })),
            // Backslashes, raw and encoded.
            ("/a\\b", ASCII, Err(E::Backslash)),
            ("/\\", ASCII, Err(E::Backslash)),
            ("/a%5cb", ASCII, Err(E::EncodedDelimiter { byte: b'\\' })),
            ("/a%5Cb", ASCII, Err(E::EncodedDelimiter { byte: b'\\' })),
            // Other encoded delimiters.
            ("/a%2fb", ASCII, Err(E::EncodedDelimiter { byte: b'/' })),
            ("/a%2Fb", ASCII, Err(E::EncodedDelimiter { byte: b'/' })),
            ("/%2F", UTF8, Err(E::EncodedDelimiter { byte: b'/' })),
            ("/a%3fb", ASCII, Err(E::EncodedDelimiter { byte: b'?' })),
            ("/a%3F", ASCII, Err(E::EncodedDelimiter { byte: b'?' })),
            ("/a%23b", ASCII, Err(E::EncodedDelimiter { byte: b'#' })),
            // Encoded controls.
            ("/a%00b", ASCII, Err(E::EncodedControl { byte: 0x00 })),
            ("/a%0d%0ab", ASCII, Err(E::EncodedControl { byte: 0x0D })),
            ("/a%0A", ASCII, Err(E::EncodedControl { byte: 0x0A })),
            ("/a%09", ASCII, Err(E::EncodedControl { byte: 0x09 })),
            ("/a%01", ASCII, Err(E::EncodedControl { byte: 0x01 })),
            ("/a%1f", ASCII, Err(E::EncodedControl { byte: 0x1F })),
            ("/a%1F", UTF8, Err(E::EncodedControl { byte: 0x1F })),
            ("/a%7f", ASCII, Err(E::EncodedControl { byte: 0x7F })),
            // Raw controls.
            ("/a\0b", ASCII, Err(E::ControlChar { byte: 0x00 })),
            ("/a\tb", ASCII, Err(E::ControlChar { byte: 0x09 })),
            ("/a\r\nb", ASCII, Err(E::ControlChar { byte: 0x0D })),
            ("/a\u{1b}", ASCII, Err(E::ControlChar { byte: 0x1B })),
            ("/a\u{7f}", ASCII, Err(E::ControlChar { byte: 0x7F })),
            // Raw characters outside pchar.
            ("/a b", ASCII, Err(E::ForbiddenChar { ch: ' ' })),
            ("/a\"b", ASCII, Err(E::ForbiddenChar { ch: '"' })),
            ("/a<b", ASCII, Err(E::ForbiddenChar { ch: '<' })),
            ("/a>b", ASCII, Err(E::ForbiddenChar { ch: '>' })),
            ("/a`b", ASCII, Err(E::ForbiddenChar { ch: '`' })),
            ("/a{b", ASCII, Err(E::ForbiddenChar { ch: '{' })),
            ("/a}b", ASCII, Err(E::ForbiddenChar { ch: '}' })),
            ("/a|b", ASCII, Err(E::ForbiddenChar { ch: '|' })),
            ("/a^b", ASCII, Err(E::ForbiddenChar { ch: '^' })),
            ("/a[b", ASCII, Err(E::ForbiddenChar { ch: '[' })),
            ("/a]b", ASCII, Err(E::ForbiddenChar { ch: ']' })),
            ("/a#b", ASCII, Err(E::ForbiddenChar { ch: '#' })),
            ("/a?b", ASCII, Err(E::ForbiddenChar { ch: '?' })),
            // Malformed escapes.
            ("/a%", ASCII, Err(E::MalformedPercent)),
            ("/a%4", ASCII, Err(E::MalformedPercent)),
            ("/a%zz", ASCII, Err(E::MalformedPercent)),
            ("/a%4g", ASCII, Err(E::MalformedPercent)),
            ("/a%g4", ASCII, Err(E::MalformedPercent)),
            ("/%%", ASCII, Err(E::MalformedPercent)),
            ("/%%41", ASCII, Err(E::MalformedPercent)),
            ("/a%-1", ASCII, Err(E::MalformedPercent)),
            ("/a% 41", ASCII, Err(E::MalformedPercent)),
            ("/a%\u{e9}", UTF8, Err(E::MalformedPercent)),
            // Raw non-ASCII, refused even when the route allows non-ASCII.
            ("/caf\u{e9}", ASCII, Err(E::RawNonAscii { ch: '\u{e9}' })),
            ("/caf\u{e9}", UTF8, Err(E::RawNonAscii { ch: '\u{e9}' })),
            (
                "/\u{65e5}\u{672c}",
                UTF8,
                Err(E::RawNonAscii { ch: '\u{65e5}' }),
            ),
            // Encoded non-ASCII without the route's opt-in.
            ("/caf%C3%A9", ASCII, Err(E::NonAscii { byte: 0xC3 })),
            ("/%c0%ae%c0%ae/", ASCII, Err(E::NonAscii { byte: 0xC0 })),
            (
                "/%ef%bc%8e%ef%bc%8e/",
                ASCII,
                Err(E::NonAscii { byte: 0xEF }),
            ),
            ("/a/%ff", ASCII, Err(E::NonAscii { byte: 0xFF })),
            // Invalid UTF-8 even when allowed.
            ("/%c0%ae%c0%ae/", UTF8, Err(E::InvalidUtf8)),
            ("/%c0%af", UTF8, Err(E::InvalidUtf8)),
            ("/%C1%9C", UTF8, Err(E::InvalidUtf8)),
            ("/%e0%80%ae", UTF8, Err(E::InvalidUtf8)),
            ("/%f0%80%80%ae", UTF8, Err(E::InvalidUtf8)),
            ("/%ed%a0%80", UTF8, Err(E::InvalidUtf8)),
            ("/%f4%90%80%80", UTF8, Err(E::InvalidUtf8)),
            ("/%c3", UTF8, Err(E::InvalidUtf8)),
            ("/%a9", UTF8, Err(E::InvalidUtf8)),
            ("/%ff", UTF8, Err(E::InvalidUtf8)),
            ("/%c3a%a9", UTF8, Err(E::InvalidUtf8)),
            ("/%c3/%a9", UTF8, Err(E::InvalidUtf8)),
            // Confusables of `.`, `/`, `\` and friends.
            (
                "/%ef%bc%8e%ef%bc%8e/",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FF0E}' }),
            ),
            (
                "/a%ef%bc%8fb",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FF0F}' }),
            ),
            (
                "/a%EF%BC%BCb",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FF3C}' }),
            ),
            (
                "/%e2%80%a4",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{2024}' }),
            ),
            (
                "/%e2%80%a5",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{2025}' }),
            ),
            (
                "/%e2%88%95",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{2215}' }),
            ),
            (
                "/%e2%81%84",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{2044}' }),
            ),
            (
                "/%ef%b9%92",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FE52}' }),
            ),
            (
                "/%e2%a7%b5",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{29F5}' }),
            ),
            (
                "/%e2%88%96",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{2216}' }),
            ),
            (
                "/%ef%b9%a8",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FE68}' }),
            ),
            (
                "/%e3%80%82",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{3002}' }),
            ),
            (
                "/%ef%bd%a1",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FF61}' }),
            ),
            ("/%cd%be", UTF8, Err(E::ConfusableChar { ch: '\u{037E}' })),
            (
                "/%ef%bc%85",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FF05}' }),
            ),
            (
                "/%ef%bc%a1",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{FF21}' }),
            ),
            (
                "/%e2%84%aa",
                UTF8,
                Err(E::ConfusableChar { ch: '\u{212A}' }),
            ),
            ("/%c5%bf", UTF8, Err(E::ConfusableChar { ch: '\u{017F}' })),
            ("/%c2%a5", UTF8, Err(E::ConfusableChar { ch: '\u{00A5}' })),
            ("/%c2%a0", UTF8, Err(E::ConfusableChar { ch: '\u{00A0}' })),
            // Invisible characters.
            ("/%e2%80%8b", UTF8, Err(E::InvisibleChar { ch: '\u{200B}' })),
            (
                "/.%e2%80%8b.",
                UTF8,
                Err(E::InvisibleChar { ch: '\u{200B}' }),
            ),
            ("/%c2%ad", UTF8, Err(E::InvisibleChar { ch: '\u{00AD}' })),
            ("/%e2%80%ae", UTF8, Err(E::InvisibleChar { ch: '\u{202E}' })),
            ("/%ef%bb%bf", UTF8, Err(E::InvisibleChar { ch: '\u{FEFF}' })),
            ("/%c2%85", UTF8, Err(E::InvisibleChar { ch: '\u{0085}' })),
            ("/%e2%80%a8", UTF8, Err(E::InvisibleChar { ch: '\u{2028}' })),
        ]
    }

    #[test]
    fn table() {
        let cases = cases();
        assert!(cases.len() >= 120, "only {} cases", cases.len());
        for (input, allow, want) in cases {
            let got = canonicalise(input, allow);
            match want {
                Ok(path) => {
                    let got = got.unwrap_or_else(|e| panic!("{input:?} ({allow}): {e:?}"));
                    assert_eq!(got.path, path, "{input:?} ({allow})");
                    assert_eq!(got.has_non_ascii, has_high_escape(path), "{input:?}");
                    assert_eq!(canonicalise(&got.path, allow), Ok(got.clone()), "{input:?}");
                    assert_eq!(check_invariants(&got.path, allow), Ok(()), "{input:?}");
                }
                Err(e) => assert_eq!(got, Err(e), "{input:?} ({allow})"),
            }
        }
    }

    #[test]
    fn has_non_ascii_flag() {
        let c = canonicalise("/caf%c3%a9", true).unwrap();
        assert!(c.has_non_ascii);
        let c = canonicalise("/cafe", true).unwrap();
        assert!(!c.has_non_ascii);
        let c = canonicalise("/cafe%20x", false).unwrap();
        assert!(!c.has_non_ascii);
    }

    #[test]
    fn every_named_confusable_is_refused() {
        for ch in [
            '\u{FF0E}', '\u{FF0F}', '\u{FF3C}', '\u{2024}', '\u{2215}', '\u{2044}', '\u{FE52}',
            '\u{29F5}', '\u{2216}', '\u{FE68}', '\u{3002}',
        ] {
            let mut buf = [0u8; 4];
            let mut raw = String::from("/a");
            for b in ch.encode_utf8(&mut buf).bytes() {
                raw.push_str(&format!("%{b:02x}"));
            }
            assert_eq!(
                canonicalise(&raw, true),
                Err(E::ConfusableChar { ch }),
                "{raw}"
            );
            assert!(matches!(canonicalise(&raw, false), Err(E::NonAscii { .. })));
        }
    }

    #[test]
    fn segments_split() {
        let split = |p| segments(p).collect::<Vec<_>>();
        assert_eq!(split("/"), Vec::<&str>::new());
        assert_eq!(split("/a"), ["a"]);
        assert_eq!(split("/a/b"), ["a", "b"]);
        assert_eq!(split("/a/"), ["a", ""]);
        assert_eq!(split("/a%3Ab/c%C3%A9"), ["a%3Ab", "c%C3%A9"]);
    }

    #[test]
    fn reasons_are_stable_snake_case_and_distinct() {
        let all = [
            E::Empty,
            E::NotAbsolute,
            E::DotSegment,
            E::EmptySegment,
            E::Semicolon,
            E::Backslash,
            E::ControlChar { byte: 0 },
            E::ForbiddenChar { ch: ' ' },
            E::RawNonAscii { ch: '\u{e9}' },
            E::MalformedPercent,
            E::DoubleEncoding,
            E::EncodedDelimiter { byte: b'/' },
            E::EncodedControl { byte: 0 },
            E::NonAscii { byte: 0xC3 },
            E::InvalidUtf8,
            E::ConfusableChar { ch: '\u{FF0E}' },
            E::InvisibleChar { ch: '\u{200B}' },
        ];
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            let r = e.reason();
            assert!(
                r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{r}"
            );
            assert!(seen.insert(r), "duplicate reason {r}");
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(
            E::ConfusableChar { ch: '\u{FF0E}' }.to_string(),
            "confusable character U+FF0E in path"
        );
        assert_eq!(
            E::EncodedDelimiter { byte: b'/' }.to_string(),
            "encoded delimiter %2F in path"
        );
    }

    #[test]
    fn tables_are_sorted_and_disjoint() {
        for table in [INVISIBLE, LOOKALIKES, NFKC_TO_ASCII] {
            for &(lo, hi) in table {
                assert!(lo <= hi && lo >= 0x80);
            }
            for pair in table.windows(2) {
                assert!(pair[0].1 < pair[1].0, "{pair:x?}");
            }
        }
        // Spot checks of the lookup at range edges.
        assert!(in_ranges(NFKC_TO_ASCII, '\u{FF01}'));
        assert!(in_ranges(NFKC_TO_ASCII, '\u{FF5E}'));
        assert!(!in_ranges(NFKC_TO_ASCII, '\u{FF5F}'));
        assert!(!in_ranges(NFKC_TO_ASCII, '\u{e9}'));
        assert!(in_ranges(INVISIBLE, '\u{E0FFF}'));
    }

    // ---- Independent checkers shared by the property tests ----

    fn has_high_escape(path: &str) -> bool {
        path.as_bytes()
            .windows(3)
            .any(|w| w[0] == b'%' && matches!(w[1], b'8'..=b'9' | b'A'..=b'F'))
    }

    /// Checks an accepted path without using the module's helpers.
    fn check_invariants(path: &str, allow_non_ascii: bool) -> Result<(), String> {
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'/') {
            return Err("does not start with /".into());
        }
        let segs: Vec<&str> = path[1..].split('/').collect();
        for (n, seg) in segs.iter().enumerate() {
            if seg.is_empty() && n + 1 != segs.len() {
                return Err("empty inner segment".into());
            }
            if *seg == "." || *seg == ".." {
                return Err("dot segment".into());
            }
            if seg.ends_with('.') || seg.ends_with("%20") {
                return Err("segment ends in '.' or a space".into());
            }
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'%' {
                let hex = path
                    .get(i + 1..i + 3)
                    .ok_or_else(|| "truncated escape".to_string())?;
                if !hex
                    .bytes()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
                {
                    return Err(format!("escape not uppercase hex: %{hex}"));
                }
                let v = u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    return Err(format!("unreserved left encoded: %{hex}"));
                }
                if b"%/\\;?#".contains(&v) || v < 0x20 || v == 0x7F {
                    return Err(format!("forbidden escape %{hex}"));
                }
                if v >= 0x80 && !allow_non_ascii {
                    return Err(format!("non-ASCII escape %{hex}"));
                }
                i += 3;
            } else {
                let ok = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b);
                if !ok {
                    return Err(format!("byte {b:#04x} not allowed"));
                }
                i += 1;
            }
        }
        Ok(())
    }

    /// What a backend sees after decoding once.
    fn decode_once(path: &str) -> Vec<u8> {
        let b = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let hex = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            if let (b'%', Some(hex)) = (b[i], hex) {
                let hex = std::str::from_utf8(hex).unwrap_or_default();
                out.push(u8::from_str_radix(hex, 16).unwrap_or_default());
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        out
    }

    fn backend_view_agrees(path: &str) -> Result<(), String> {
        let decoded = decode_once(path);
        let count = |bytes: &[u8]| bytes.iter().filter(|&&b| b == b'/').count();
        if count(&decoded) != count(path.as_bytes()) {
            return Err("decoding changed the number of '/'".into());
        }
        for bad in [b'\\', b';', b'%', b'?', b'#', 0] {
            if decoded.contains(&bad) {
                return Err(format!("decoding produced {bad:#04x}"));
            }
        }
        let segs: Vec<&[u8]> = decoded[1..].split(|&b| b == b'/').collect();
        for (n, seg) in segs.iter().enumerate() {
            if *seg == b"." || *seg == b".." {
                return Err("decoding produced a dot segment".into());
            }
            if seg.ends_with(b".") || seg.ends_with(b" ") {
                return Err("decoding produced a segment ending in '.' or a space".into());
            }
            if seg.is_empty() && n + 1 != segs.len() {
                return Err("decoding produced an empty segment".into());
            }
        }
        if std::str::from_utf8(&decoded).is_err() {
            return Err("decoded path is not UTF-8".into());
        }
        Ok(())
    }

    // ---- Strategies ----

    const PIECES: &[&str] = &[
        "/",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%25",
        "a",
        "B",
        "~",
        "%41",
        ";",
        "\\",
        "%c3%a9",
        "%",
        "//",
        "%3a",
        "%7e",
        "%20",
        ":",
        "@",
        "%ef%bc%8e",
        "%e2%80%8b",
        "%c0%ae",
        "%C3",
        "%a9",
        "%5C",
        "%00",
        "-",
        "_",
    ];

    fn piece_path() -> impl Strategy<Value = String> {
        (
            prop::bool::weighted(0.9),
            prop::collection::vec(prop::sample::select(PIECES), 0..16),
        )
            .prop_map(|(lead, pieces)| {
                let mut s = if lead {
                    String::from("/")
                } else {
                    String::new()
                };
                s.push_str(&pieces.concat());
                s
            })
    }

    /// Mostly valid paths: segments of safe-ish pieces joined by single slashes.
    fn segment_path() -> impl Strategy<Value = String> {
        const SAFE: &[&str] = &[
            "a",
            "Z",
            "0",
            "-",
            "_",
            "~",
            ".",
            "%2e",
            "%2E",
            "%61",
            "%7E",
            "%3a",
            "%3A",
            "%20",
            "%c3%a9",
            "%C3%A9",
            "%e6%97%a5",
            "!",
            "*",
            "@",
            ":",
            "=",
            "+",
            "%2B",
            "%e2%80%a4",
        ];
        (
            prop::collection::vec(
                prop::collection::vec(prop::sample::select(SAFE), 1..4),
                0..6,
            ),
            any::<bool>(),
        )
            .prop_map(|(segs, trailing)| {
                let mut s = String::new();
                for seg in segs {
                    s.push('/');
                    s.push_str(&seg.concat());
                }
                if trailing || s.is_empty() {
                    s.push('/');
                }
                s
            })
    }

    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![
            piece_path(),
            segment_path(),
            "(/|%[0-9a-fA-F]{2}|%|[aB.~;:@ ])*",
            any::<String>(),
        ]
    }

    /// Guards against vacuous properties: the generators must produce accepted paths often.
    #[test]
    fn strategies_reach_accepted_paths() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        for (name, strategy, min_percent) in [
            ("pieces", piece_path().boxed(), 5),
            ("segments", segment_path().boxed(), 40),
            ("any", any_path().boxed(), 10),
        ] {
            let accepted = (0..1000)
                .filter(|_| {
                    let raw = strategy.new_tree(&mut runner).unwrap().current();
                    canonicalise(&raw, true).is_ok()
                })
                .count();
            assert!(
                accepted * 100 >= min_percent * 1000,
                "{name}: {accepted}/1000"
            );
            eprintln!("{name}: {accepted}/1000 accepted");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// (1) Canonicalising a canonical path returns it unchanged.
        #[test]
        fn idempotent(raw in any_path(), allow in any::<bool>()) {
            if let Ok(c) = canonicalise(&raw, allow) {
                prop_assert_eq!(canonicalise(&c.path, allow), Ok(c.clone()));
            }
        }

        /// (2) Every accepted output passes the independent checker.
        #[test]
        fn output_passes_checker(raw in any_path(), allow in any::<bool>()) {
            if let Ok(c) = canonicalise(&raw, allow) {
                prop_assert_eq!(check_invariants(&c.path, allow), Ok(()), "{:?} -> {:?}", raw, c.path);
                prop_assert_eq!(c.has_non_ascii, has_high_escape(&c.path));
            }
        }

        /// (3) A backend that decodes once sees the same segment structure.
        #[test]
        fn decoding_once_keeps_structure(raw in any_path(), allow in any::<bool>()) {
            if let Ok(c) = canonicalise(&raw, allow) {
                prop_assert_eq!(backend_view_agrees(&c.path), Ok(()), "{:?} -> {:?}", raw, c.path);
            }
        }

        /// (4) Equivalent spellings (unreserved characters percent-encoded, hex in either case)
        /// give the same canonical path.
        #[test]
        fn equivalent_spellings_agree(
            raw in segment_path(),
            flips in prop::collection::vec(any::<(bool, bool)>(), 64),
        ) {
            if let Ok(c) = canonicalise(&raw, true) {
                let mut respelled = String::new();
                let mut i = 0;
                for (n, b) in c.path.bytes().enumerate() {
                    let (encode, lower) = flips[n % flips.len()];
                    if b == b'%' {
                        i = 2;
                        respelled.push('%');
                    } else if i > 0 {
                        i -= 1;
                        respelled.push(if lower { b.to_ascii_lowercase() } else { b } as char);
                    } else if encode && (b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                        let esc = format!("%{b:02X}");
                        respelled.push_str(&if lower { esc.to_ascii_lowercase() } else { esc });
                    } else {
                        respelled.push(b as char);
                    }
                }
                prop_assert_eq!(canonicalise(&respelled, true), Ok(c), "{}", respelled);
            }
        }

        /// (5) `allow_non_ascii` only widens: an ASCII-only path is treated identically.
        #[test]
        fn allow_flag_only_widens(raw in any_path()) {
            let strict = canonicalise(&raw, false);
            let lenient = canonicalise(&raw, true);
            match (&strict, &lenient) {
                (Ok(s), _) => prop_assert_eq!(Ok(s.clone()), lenient),
                (Err(_), Ok(l)) => prop_assert!(l.has_non_ascii),
                (Err(_), Err(_)) => {}
            }
        }
    }
}
