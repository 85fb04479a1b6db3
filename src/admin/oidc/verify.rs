//! ID token verification (OpenID Connect Core §3.1.3.7), pure: the token, the provider's keys and
//! what to expect in, the claims or the reason for refusing out.
//!
//! Checked: the algorithm is an asymmetric one we accept (RS256/384/512, PS256/384/512,
//! ES256/384) and matches the key (so `alg=none` and an HS256 token "signed" with the public key
//! are refused); the signature against the provider's key with that `kid`; `iss` equals the
//! issuer exactly; `aud` contains the client id (and `azp`, when there are several audiences or
//! when present, is the client id); `exp` is in the future and `iat`/`nbf` not in the future,
//! each within the leeway, on the caller's clock; `nonce` equals the one sent.
//!
//! Owns: nothing but this check. Never imports anything of ours but `session::same_secret`.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// What the ID token must say.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// The issuer, exactly.
    pub issuer: &'a str,
    /// Our client id.
    pub client_id: &'a str,
    /// The nonce sent in the authorization request.
    pub nonce: &'a str,
    /// Now, in seconds since the epoch (the gateway's clock).
    pub now: i64,
    /// Leeway on the times, in seconds.
    pub leeway: i64,
}

/// Why an ID token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No key with this `kid` (the caller may refetch the keys once and retry).
    #[error("no provider key with kid `{0}`")]
    UnknownKey(String),
    /// Any other failure: the reason, for the audit log.
    #[error("{0}")]
    Invalid(&'static str),
}

const ACCEPTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// The verified claims (all of them, as JSON).
pub type Claims = serde_json::Map<String, serde_json::Value>;

fn key_for<'a>(keys: &'a JwkSet, kid: Option<&str>, alg: Algorithm) -> Result<&'a Jwk, Refused> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    let fits = |k: &Jwk| {
        matches!(
            (&k.algorithm, alg),
            (
                P::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
        )
    };
    match kid {
        Some(kid) => keys
            .keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .ok_or_else(|| Refused::UnknownKey(kid.to_string()))
            .and_then(|k| {
                if fits(k) {
                    Ok(k)
                } else {
                    Err(Refused::Invalid("key_type_mismatch"))
                }
            }),
        None => {
            let mut fit = keys.keys.iter().filter(|k| fits(k));
            match (fit.next(), fit.next()) {
                (Some(k), None) => Ok(k),
                (None, _) => Err(Refused::UnknownKey(String::new())),
                _ => Err(Refused::Invalid("no_kid_and_several_keys")),
            }
        }
    }
}

/// Verifies `token` against `keys` and `expect`; returns its claims.
pub fn verify(token: &str, keys: &JwkSet, expect: &Expect<'_>) -> Result<Claims, Refused> {
    // `decode_header` refuses `alg: none` (not an algorithm it knows).
    let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::Invalid("malformed"))?;
    if !ACCEPTED.contains(&header.alg) {
        return Err(Refused::Invalid("algorithm_not_allowed"));
    }
    let jwk = key_for(keys, header.kid.as_deref(), header.alg)?;
    if let Some(ka) = jwk.common.key_algorithm {
        if format!("{ka:?}") != format!("{:?}", header.alg) {
            return Err(Refused::Invalid("key_algorithm_mismatch"));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| Refused::Invalid("bad_key"))?;
    // The library checks the signature and the algorithm against the key; the claims are
    // checked below, on our clock rather than the system's.
    let mut v = Validation::new(header.alg);
    v.algorithms = vec![header.alg];
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        Refused::Invalid(match e.kind() {
            K::InvalidSignature => "bad_signature",
            K::InvalidAlgorithm => "algorithm_not_allowed",
            _ => "malformed",
        })
    })?;
    let c = data.claims;
    let s = |k: &str| c.get(k).and_then(|v| v.as_str());
    let n = |k: &str| c.get(k).and_then(|v| v.as_i64());
    if s("iss") != Some(expect.issuer) {
        return Err(Refused::Invalid("wrong_issuer"));
    }
    let aud: Vec<&str> = match c.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.as_str()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => vec![],
    };
    if !aud.contains(&expect.client_id) {
        return Err(Refused::Invalid("wrong_audience"));
    }
    if (aud.len() > 1 || c.contains_key("azp")) && s("azp") != Some(expect.client_id) {
        return Err(Refused::Invalid("wrong_authorized_party"));
    }
    let Some(exp) = n("exp") else {
        return Err(Refused::Invalid("no_expiry"));
    };
    if expect.now >= exp.saturating_add(expect.leeway) {
        return Err(Refused::Invalid("expired"));
    }
    let Some(iat) = n("iat") else {
        return Err(Refused::Invalid("no_issued_at"));
    };
    if iat > expect.now.saturating_add(expect.leeway) {
        return Err(Refused::Invalid("issued_in_the_future"));
    }
    if n("nbf").is_some_and(|nbf| nbf > expect.now.saturating_add(expect.leeway)) {
        return Err(Refused::Invalid("not_yet_valid"));
    }
    if s("sub").is_none_or(str::is_empty) {
        return Err(Refused::Invalid("no_subject"));
    }
    match s("nonce") {
        Some(got) if super::super::session::same_secret(got, expect.nonce) => Ok(c),
        _ => Err(Refused::Invalid("wrong_nonce")),
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
