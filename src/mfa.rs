//! MFA for people (issue 19): TOTP (RFC 6238: HMAC-SHA1, 6 digits, 30 s steps), its enrolment
//! artefacts (base32 secret, `otpauth://` URI, the QR code as SVG, recovery codes), and the
//! sealing of secrets at rest with AES-256-GCM under a key read from a file.
//!
//! Pure functions over bytes and times: the caller passes the current Unix time, so every check
//! is tested on a fixed clock. The replay check is the store's (it keeps the last step used and
//! refuses a step not above it); the rate limit of failures is [`Failures`].
//!
//! Owns: TOTP, base32, [`Sealer`], recovery codes, [`Failures`]. Must never import `config`,
//! `gateway`, `pipeline`, `admin` or `cli`.

use std::sync::Mutex;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// TOTP step length (seconds).
pub const STEP_SECS: i64 = 30;
/// Digits of a code.
pub const DIGITS: u32 = 6;
/// Steps accepted either side of the current one (clock drift).
pub const DRIFT_STEPS: i64 = 1;
/// Secret length in bytes (160 bits, RFC 4226's recommendation).
pub const SECRET_BYTES: usize = 20;
/// Recovery codes issued at enrolment.
pub const RECOVERY_CODES: usize = 10;
/// Failed checks allowed per account within [`FAILURE_WINDOW_MS`] before checks are refused.
pub const MAX_FAILURES: u32 = 5;
/// The failure window (5 minutes).
pub const FAILURE_WINDOW_MS: i64 = 5 * 60 * 1000;

/// HOTP (RFC 4226) of `counter` with HMAC-SHA1, truncated to `digits` digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let h = tag.as_ref();
    let off = (h[h.len() - 1] & 0x0f) as usize;
    let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
    bin % 10u32.pow(digits)
}

/// The TOTP step of a Unix time (seconds).
pub fn step_of(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(STEP_SECS)
}

/// The 6-digit code of `step`, zero-padded.
pub fn code_at(secret: &[u8], step: i64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step as u64, DIGITS),
        width = DIGITS as usize
    )
}

/// Checks `code` against the steps around `unix_secs` (±[`DRIFT_STEPS`]); returns the step it
/// matched. Steps at or below `last_step` are never accepted (a code is used once). Compares in
/// constant time per candidate.
pub fn verify(secret: &[u8], code: &str, unix_secs: i64, last_step: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(unix_secs);
    let mut found = None;
    for step in now - DRIFT_STEPS..=now + DRIFT_STEPS {
        let expect = code_at(secret, step);
        let same: bool = subtle::ConstantTimeEq::ct_eq(expect.as_bytes(), code.as_bytes()).into();
        if same && step > last_step && found.is_none() {
            found = Some(step);
        }
    }
    found
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32, without padding (as authenticator apps expect).
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            out.push(B32[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(B32[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random source failed");
    b
}

/// A new TOTP secret.
pub fn new_secret() -> [u8; SECRET_BYTES] {
    random_bytes()
}

/// The `otpauth://totp/...` URI an authenticator app reads from the QR code.
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        enc(issuer),
        enc(account),
        base32(secret),
        enc(issuer)
    )
}

/// The URI as a QR code, an SVG document (rendered here: the page loads no third-party code).
pub fn qr_svg(uri: &str) -> Option<String> {
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build(),
    )
}

/// New recovery codes (shown once): `xxxxx-xxxxx`, 50 bits each.
pub fn new_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let b: [u8; 7] = random_bytes();
            let s = base32(&b).to_ascii_lowercase();
            format!("{}-{}", &s[0..5], &s[5..10])
        })
        .collect()
}

/// The stored form of a recovery code: SHA-256 of its normalised text, hex.
pub fn hash_recovery(code: &str) -> String {
    let norm: String = code
        .trim()
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    crate::token::hex(&Sha256::digest(norm.as_bytes()))
}

/// Is `code` shaped like a recovery code (rather than a TOTP code)?
pub fn looks_like_recovery(code: &str) -> bool {
    code.trim().len() == 11 && code.trim().as_bytes().get(5) == Some(&b'-')
}

/// Seals and opens TOTP secrets with AES-256-GCM. The stored form is nonce ‖ ciphertext ‖ tag;
/// the account id is bound as associated data, so a sealed secret moved to another account's
/// row does not open.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unreadable.
    #[error("cannot read the MFA key file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Wrong content.
    #[error(
        "the MFA key file {path} must hold 32 random bytes, raw or as 64 hex digits (make one with `openssl rand -hex 32`)"
    )]
    Shape {
        /// File.
        path: String,
    },
}

impl Sealer {
    /// A sealer from 32 key bytes.
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key")),
        }
    }

    /// Reads a key file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Sealer, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let shape = || KeyError::Shape {
            path: path.display().to_string(),
        };
        let key: [u8; 32] = if bytes.len() == 32 {
            bytes.try_into().map_err(|_| shape())?
        } else {
            let text = std::str::from_utf8(&bytes).map_err(|_| shape())?.trim();
            if text.len() != 64 {
                return Err(shape());
            }
            let mut k = [0u8; 32];
            for (i, k) in k.iter_mut().enumerate() {
                *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| shape())?;
            }
            k
        };
        Ok(Sealer::new(&key))
    }

    /// Seals `plain` for `account_id`.
    pub fn seal(&self, account_id: &str, plain: &[u8]) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes();
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(account_id.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM seal");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// Opens a sealed secret; None when it was not sealed by this key for this account.
    pub fn open(&self, account_id: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + 16 {
            return None;
        }
        let (n, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(account_id.as_bytes()), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Failed MFA checks per account in a sliding window (in process; bounded).
#[derive(Debug, Default)]
pub struct Failures {
    map: Mutex<std::collections::HashMap<String, Vec<i64>>>,
}

impl Failures {
    /// Most accounts tracked at once.
    const MAX: usize = 10_000;

    /// Is `account` locked out at `now_ms`? Returns the milliseconds until it may try again.
    pub fn locked(&self, account: &str, now_ms: i64) -> Option<i64> {
        let map = self.map.lock().expect("failures poisoned");
        let v = map.get(account)?;
        let recent: Vec<i64> = v
            .iter()
            .copied()
            .filter(|t| now_ms - t < FAILURE_WINDOW_MS)
            .collect();
        if recent.len() as u32 >= MAX_FAILURES {
            recent.iter().min().map(|t| t + FAILURE_WINDOW_MS - now_ms)
        } else {
            None
        }
    }

    /// Records a failed check.
    pub fn record(&self, account: &str, now_ms: i64) {
        let mut map = self.map.lock().expect("failures poisoned");
        if map.len() >= Self::MAX {
            map.retain(|_, v| v.iter().any(|t| now_ms - t < FAILURE_WINDOW_MS));
        }
        let v = map.entry(account.to_string()).or_default();
        v.retain(|t| now_ms - t < FAILURE_WINDOW_MS);
        v.push(now_ms);
    }

    /// A success clears the account's failures.
    pub fn clear(&self, account: &str) {
        self.map.lock().expect("failures poisoned").remove(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B (SHA-1), 8 digits.
        for (t, want) in [
            (59i64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(RFC_SECRET, step_of(t) as u64, 8), want, "t={t}");
            assert_eq!(
                code_at(RFC_SECRET, step_of(t)),
                format!("{:06}", want % 1_000_000)
            );
        }
    }

    #[test]
    fn drift_of_one_step_is_accepted_two_refused() {
        let now = 1_700_000_000;
        let s = step_of(now);
        for d in [-1, 0, 1] {
            assert_eq!(
                verify(RFC_SECRET, &code_at(RFC_SECRET, s + d), now, 0),
                Some(s + d)
            );
        }
        for d in [-2, 2] {
            assert_eq!(
                verify(RFC_SECRET, &code_at(RFC_SECRET, s + d), now, 0),
                None
            );
        }
        assert_eq!(verify(RFC_SECRET, "12345", now, 0), None);
        assert_eq!(verify(RFC_SECRET, "abcdef", now, 0), None);
    }

    #[test]
    fn a_used_step_is_refused() {
        let now = 1_700_000_000;
        let s = step_of(now);
        let code = code_at(RFC_SECRET, s);
        assert_eq!(verify(RFC_SECRET, &code, now, s - 1), Some(s));
        assert_eq!(
            verify(RFC_SECRET, &code, now, s),
            None,
            "replay in the step"
        );
        let earlier = code_at(RFC_SECRET, s - 1);
        assert_eq!(verify(RFC_SECRET, &earlier, now, s), None, "older step");
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(RFC_SECRET), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    }

    #[test]
    fn sealing_round_trips_and_binds_the_account() {
        let s = Sealer::new(&[7u8; 32]);
        let sealed = s.seal("acc_1", RFC_SECRET);
        assert!(!sealed.windows(RFC_SECRET.len()).any(|w| w == RFC_SECRET));
        assert_eq!(s.open("acc_1", &sealed).unwrap(), RFC_SECRET);
        assert!(s.open("acc_2", &sealed).is_none());
        assert!(Sealer::new(&[8u8; 32]).open("acc_1", &sealed).is_none());
        assert_ne!(sealed, s.seal("acc_1", RFC_SECRET), "fresh nonce");
    }

    #[test]
    fn key_files_raw_or_hex() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(Sealer::from_file(&p).is_ok());
        std::fs::write(&p, [1u8; 32]).unwrap();
        assert!(Sealer::from_file(&p).is_ok());
        std::fs::write(&p, "short").unwrap();
        assert!(Sealer::from_file(&p).is_err());
    }

    #[test]
    fn uri_qr_and_recovery_codes() {
        let uri = otpauth_uri("tokengate", "ana@example", RFC_SECRET);
        assert!(uri.starts_with("otpauth://totp/tokengate:ana@example?secret=GEZDG"));
        let svg = qr_svg(&uri).unwrap();
        assert!(svg.contains("<svg"));
        let codes = new_recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        assert!(codes.iter().all(|c| looks_like_recovery(c)));
        assert_eq!(
            hash_recovery(&codes[0]),
            hash_recovery(&codes[0].to_uppercase())
        );
        assert!(!looks_like_recovery("123456"));
    }

    #[test]
    fn failures_lock_out_then_expire() {
        let f = Failures::default();
        for i in 0..MAX_FAILURES {
            assert!(f.locked("a", i as i64).is_none());
            f.record("a", i as i64);
        }
        assert!(f.locked("a", 10).is_some());
        assert!(f.locked("b", 10).is_none());
        assert!(f.locked("a", FAILURE_WINDOW_MS + 10).is_none());
        f.record("a", 20);
        f.clear("a");
        assert!(f.locked("a", 21).is_none());
    }
}
