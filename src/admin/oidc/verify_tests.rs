//! ID tokens signed here with test-only keys (testdata/), each defect refused.

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use super::*;

const RSA: &str = include_str!("testdata/rsa.pem");
const RSA_OTHER: &str = include_str!("testdata/rsa2.pem");
const EC: &str = include_str!("testdata/ec.pem");
const RSA_N: &str = "p6fRyCM7SYvSyZ9JRFqqIacn1WGR_E6afx9fH5lXctr0vUp64VdTODjp5xNp9wrQ1rMJOtmvlsN7Hxk7oyFCleYNaB_9dFGSbLhKMJZ92cK_Yaz1oOzTe4vNwVfJiwqytzLhn_il9VsR34ExnK5E_Toth7CcbCBEoO3fFpagwlLm3vwtS6UT1Y7Uv1kiboFRRtAbdt-rv0Gt6TzOhsc0CIoheHDF2wwjuQ08aNGQwspSxt9pMdu-anD1CFGs8CNWA2j7e7uYjwxNwGY0ZT8nml39bqcXnd-JpgV53cfmVoEEjTOnX30JWauuLr149pPOl-b9oafFCRZovFvPoFnWJw";
const EC_X: &str = "Q-oX_W-3D_2zJwUzXHHb9cBo8gKZReJilVz_cWOH8m0";
const EC_Y: &str = "jn_msv9tAV9B32sye5J3mJEYE3lYOx1STxAHb_a2tu0";
const NOW: i64 = 1_800_000_000;

fn jwks() -> JwkSet {
    serde_json::from_value(json!({"keys": [
        {"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256", "n": RSA_N, "e": "AQAB"},
        {"kty": "EC", "kid": "ec1", "use": "sig", "alg": "ES256", "crv": "P-256", "x": EC_X, "y": EC_Y},
    ]}))
    .unwrap()
}

fn expect() -> Expect<'static> {
    Expect {
        issuer: "https://idp.example.com",
        client_id: "tokengate",
        nonce: "n-123",
        now: NOW,
        leeway: 60,
    }
}

fn claims() -> Value {
    json!({
        "iss": "https://idp.example.com",
        "aud": "tokengate",
        "sub": "person-1",
        "email": "ada@example.com",
        "nonce": "n-123",
        "iat": NOW - 10,
        "exp": NOW + 300,
    })
}

fn sign(alg: Algorithm, kid: &str, pem: &str, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    encode(&h, claims, &key).unwrap()
}

fn rs(c: &Value) -> String {
    sign(Algorithm::RS256, "rsa1", RSA, c)
}

fn with(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims();
    f(c.as_object_mut().unwrap());
    c
}

fn refused(token: &str) -> &'static str {
    match verify(token, &jwks(), &expect()) {
        Err(Refused::Invalid(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[test]
fn good_rs256_and_es256_tokens_pass() {
    let c = verify(&rs(&claims()), &jwks(), &expect()).unwrap();
    assert_eq!(c["sub"], "person-1");
    let t = sign(Algorithm::ES256, "ec1", EC, &claims());
    assert_eq!(
        verify(&t, &jwks(), &expect()).unwrap()["email"],
        "ada@example.com"
    );
}

/// A change to the good claims.
type Change = fn(&mut serde_json::Map<String, Value>);

/// Asserts, for each `(change, reason)`, that an RS256 token over the changed claims is refused
/// for that reason.
fn expect_refusals(cases: &[(Change, &str)]) {
    for (i, (change, want)) in cases.iter().enumerate() {
        assert_eq!(refused(&rs(&with(change))), *want, "case {i}");
    }
}

/// True when an RS256 token over the changed claims verifies.
fn accepted(change: Change) -> bool {
    verify(&rs(&with(change)), &jwks(), &expect()).is_ok()
}

#[test]
fn wrong_issuer_audience_nonce_and_party_are_refused() {
    expect_refusals(&[
        (
            |c| c["iss"] = "https://evil.example.com".into(),
            "wrong_issuer",
        ),
        (
            |c| c["iss"] = "https://idp.example.com/".into(),
            "wrong_issuer",
        ),
        (|c| c["aud"] = "other-client".into(), "wrong_audience"),
        (|c| c["aud"] = json!(["a", "b"]), "wrong_audience"),
        // Several audiences need azp = our client id.
        (
            |c| c["aud"] = json!(["tokengate", "other"]),
            "wrong_authorized_party",
        ),
        (|c| c["nonce"] = "n-124".into(), "wrong_nonce"),
        (|c| drop(c.remove("nonce")), "wrong_nonce"),
        (|c| drop(c.remove("sub")), "no_subject"),
    ]);
    assert!(accepted(|c| {
        c["aud"] = json!(["tokengate", "other"]);
        c.insert("azp".into(), "tokengate".into());
    }));
}

#[test]
fn expiry_and_issue_time_are_judged_on_the_given_clock_with_leeway() {
    expect_refusals(&[
        (|c| c["exp"] = (NOW - 61).into(), "expired"),
        (|c| c["iat"] = (NOW + 120).into(), "issued_in_the_future"),
        (
            |c| drop(c.insert("nbf".into(), (NOW + 120).into())),
            "not_yet_valid",
        ),
        (|c| drop(c.remove("exp")), "no_expiry"),
    ]);
    assert!(
        accepted(|c| c["exp"] = (NOW - 59).into()),
        "within the leeway"
    );
}

#[test]
fn unknown_key_bad_signature_and_key_type_mismatch_are_refused() {
    let t = sign(Algorithm::RS256, "rsa-rotated", RSA_OTHER, &claims());
    assert_eq!(
        verify(&t, &jwks(), &expect()),
        Err(Refused::UnknownKey("rsa-rotated".into()))
    );
    let forged = sign(Algorithm::RS256, "rsa1", RSA_OTHER, &claims());
    assert_eq!(refused(&forged), "bad_signature");
    let t = sign(Algorithm::ES256, "rsa1", EC, &claims());
    assert_eq!(refused(&t), "key_type_mismatch");
    // A valid signature over other claims: the payload swapped under the signature.
    let good = rs(&claims());
    let parts: Vec<&str> = good.split('.').collect();
    let evil = format!(
        "{}.{}.{}",
        parts[0],
        b64(&with(|c| {
            c["sub"] = "admin".into();
        })),
        parts[2]
    );
    assert_eq!(refused(&evil), "bad_signature");
}

#[test]
fn alg_none_and_hs256_with_the_public_key_are_refused() {
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "rsa1"})),
        b64(&claims())
    );
    assert_eq!(refused(&none), "malformed");
    let none2 = format!("{}.{}.", b64(&json!({"alg": "None"})), b64(&claims()));
    assert_eq!(refused(&none2), "malformed");
    // HS256 "signed" with the provider's public key (as the JWK's modulus and as PEM).
    for secret in [
        RSA_N.as_bytes().to_vec(),
        b"-----BEGIN PUBLIC KEY-----".to_vec(),
    ] {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa1".into());
        let t = encode(&h, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        assert_eq!(refused(&t), "algorithm_not_allowed");
    }
    let mut h = Header::new(Algorithm::HS256);
    h.kid = None;
    let t = encode(&h, &claims(), &EncodingKey::from_secret(b"x")).unwrap();
    assert_eq!(refused(&t), "algorithm_not_allowed");
}

#[test]
fn a_key_whose_alg_differs_from_the_header_is_refused() {
    let keys: JwkSet = serde_json::from_value(json!({"keys": [
        {"kty": "RSA", "kid": "rsa1", "alg": "RS512", "n": RSA_N, "e": "AQAB"},
    ]}))
    .unwrap();
    assert_eq!(
        verify(&rs(&claims()), &keys, &expect()),
        Err(Refused::Invalid("key_algorithm_mismatch"))
    );
}
