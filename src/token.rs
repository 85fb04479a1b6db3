//! Token format (SPEC §2): `<prefix>_<32 base62 random><6 base62 CRC32>`, display prefix, SHA-256.
//!
//! The checksum lets the gateway (and secret scanners) refuse a mistyped or made-up token without
//! touching the store. It is not a secret: the 32 random characters (≈190 bits) are.
//!
//! Owns: the token format and hashing. Pure: must never import anything of ours.

use rand::TryRngCore;
use sha2::{Digest, Sha256};

/// Base62 alphabet, in ASCII order.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters in a token.
pub const RANDOM_LEN: usize = 32;
/// Checksum characters in a token.
pub const CHECKSUM_LEN: usize = 6;
/// Random characters shown in the display prefix.
pub const DISPLAY_RANDOM_LEN: usize = 8;

/// The regex secret scanners can use (any configured prefix).
pub const SCANNER_REGEX: &str = r"\b[a-z][a-z0-9]{1,9}_[0-9A-Za-z]{38}\b";

/// SHA-256 of a full token: the only form stored.
pub type TokenHash = [u8; 32];

/// Why a string is not a well-formed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Wrong shape: prefix, separator, length or alphabet.
    #[error("not a tokengate token")]
    Format,
    /// Right shape, wrong checksum: mistyped or made up.
    #[error("token checksum does not match")]
    Checksum,
}

impl TokenError {
    /// Audit `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Format => "bad_format",
            TokenError::Checksum => "bad_checksum",
        }
    }
}

/// A well-formed token that passed its checksum.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    raw: &'a str,
    prefix_len: usize,
}

impl std::fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret part.
        write!(f, "ParsedToken({}…)", self.display_prefix())
    }
}

impl<'a> ParsedToken<'a> {
    /// `<prefix>_` plus the first 8 random characters.
    pub fn display_prefix(&self) -> &'a str {
        &self.raw[..self.prefix_len + 1 + DISPLAY_RANDOM_LEN]
    }
    /// SHA-256 of the whole token.
    pub fn hash(&self) -> TokenHash {
        hash(self.raw)
    }
}

/// `[a-z][a-z0-9]{1,9}`.
pub fn valid_prefix(p: &str) -> bool {
    let b = p.as_bytes();
    (2..=10).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Checks shape and checksum. Does not touch the store.
pub fn parse(raw: &str) -> Result<ParsedToken<'_>, TokenError> {
    let b = raw.as_bytes();
    let sep = b
        .iter()
        .position(|&c| c == b'_')
        .ok_or(TokenError::Format)?;
    if !valid_prefix(&raw[..sep]) || b.len() != sep + 1 + RANDOM_LEN + CHECKSUM_LEN {
        return Err(TokenError::Format);
    }
    let tail = &b[sep + 1..];
    if !tail.iter().all(|&c| is_base62(c)) {
        return Err(TokenError::Format);
    }
    let (body, sum) = b.split_at(b.len() - CHECKSUM_LEN);
    if checksum(body) != sum {
        return Err(TokenError::Checksum);
    }
    Ok(ParsedToken {
        raw,
        prefix_len: sep,
    })
}

/// SHA-256 of a token string.
pub fn hash(raw: &str) -> TokenHash {
    Sha256::digest(raw.as_bytes()).into()
}

/// A freshly generated token. The plaintext exists only in this value.
pub struct NewToken {
    /// Full token: show once, never store.
    pub plaintext: String,
    /// SHA-256 of the plaintext.
    pub hash: TokenHash,
    /// Display prefix.
    pub display_prefix: String,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewToken({}…)", self.display_prefix)
    }
}

/// Generates a token from the OS CSPRNG. Rejection sampling keeps base62 unbiased.
pub fn generate(prefix: &str) -> NewToken {
    assert!(valid_prefix(prefix), "prefix validated by config");
    let mut rng = rand::rngs::OsRng;
    let mut s = String::with_capacity(prefix.len() + 1 + RANDOM_LEN + CHECKSUM_LEN);
    s.push_str(prefix);
    s.push('_');
    let mut buf = [0u8; 64];
    let mut have = 0;
    while have < RANDOM_LEN {
        rng.try_fill_bytes(&mut buf)
            .expect("the OS random source failed");
        for &byte in &buf {
            // 248 = 4 * 62: values above would bias the first characters.
            if byte < 248 && have < RANDOM_LEN {
                s.push(BASE62[(byte % 62) as usize] as char);
                have += 1;
            }
        }
    }
    let sum = checksum(s.as_bytes());
    s.push_str(std::str::from_utf8(&sum).expect("ascii"));
    let display_prefix = s[..prefix.len() + 1 + DISPLAY_RANDOM_LEN].to_string();
    NewToken {
        hash: hash(&s),
        plaintext: s,
        display_prefix,
    }
}

/// Random base62 identifier with a kind prefix, e.g. `tok_3hT9...`.
pub fn new_id(kind: &str) -> String {
    let mut rng = rand::rngs::OsRng;
    let mut buf = [0u8; 32];
    let mut s = String::with_capacity(kind.len() + 17);
    s.push_str(kind);
    s.push('_');
    let mut have = 0;
    while have < 16 {
        rng.try_fill_bytes(&mut buf)
            .expect("the OS random source failed");
        for &byte in &buf {
            if byte < 248 && have < 16 {
                s.push(BASE62[(byte % 62) as usize] as char);
                have += 1;
            }
        }
    }
    s
}

/// Lower-case hex encoding (audit chains, request ids, logs of hashes, the store copy).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        // As the request id uses it: `{:016x}{:08x}` of the boot id and the sequence number.
        let (boot, n) = (0x5eed_0000_00ab_cdefu64, 42u32);
        let mut raw = [0u8; 12];
        raw[..8].copy_from_slice(&boot.to_be_bytes());
        raw[8..].copy_from_slice(&n.to_be_bytes());
        assert_eq!(hex(&raw), format!("{boot:016x}{n:08x}"));
    }
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_tokens_parse_and_match_the_regex_shape() {
        for prefix in ["tg", "acme", "a1234567890"[..10].as_ref()] {
            let t = generate(prefix);
            assert_eq!(t.plaintext.len(), prefix.len() + 1 + 38);
            let p = parse(&t.plaintext).unwrap();
            assert_eq!(p.hash(), t.hash);
            assert_eq!(p.display_prefix(), t.display_prefix);
            assert!(t.display_prefix.starts_with(&format!("{prefix}_")));
            assert!(!format!("{p:?}").contains(&t.plaintext[prefix.len() + 10..]));
        }
    }

    #[test]
    fn tokens_are_distinct() {
        let a = generate("tg");
        let b = generate("tg");
        assert_ne!(a.plaintext, b.plaintext);
    }

    #[test]
    fn every_single_character_change_is_caught() {
        let t = generate("tg");
        let raw = t.plaintext.clone();
        for i in 3..raw.len() {
            for &c in b"0aZ" {
                let mut b = raw.clone().into_bytes();
                if b[i] == c {
                    continue;
                }
                b[i] = c;
                let s = String::from_utf8(b).unwrap();
                assert!(parse(&s).is_err(), "{i}");
            }
        }
    }

    #[test]
    fn shapes_are_rejected_as_format() {
        for bad in [
            "",
            "tg",
            "tg_",
            "TG_0123456789012345678901234567890123456",
            "t_01234567890123456789012345678901234567",
            "tg-01234567890123456789012345678901234567",
            "tg_0123456789012345678901234567890123456",
            "tg_012345678901234567890123456789012345678",
            "tg_0123456789012345678901234567890123456+",
        ] {
            assert_eq!(parse(bad), Err(TokenError::Format), "{bad}");
        }
    }

    #[test]
    fn checksum_is_fixed_width_base62() {
        assert_eq!(checksum(b"").len(), 6);
        let c = checksum(b"tg_abc");
        assert!(c.iter().all(|b| b.is_ascii_alphanumeric()));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = parse(&s);
        }

        #[test]
        fn random_bodies_rarely_pass(body in "[0-9A-Za-z]{38}") {
            let s = format!("tg_{body}");
            // A random 38-char body passes the CRC32 with probability ~2^-32.
            if let Ok(p) = parse(&s) {
                prop_assert_eq!(p.display_prefix(), &s[..11]);
            }
        }
    }
}
