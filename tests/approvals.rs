//! Approval-gated rules, MFA step-up and approval notifications (issue 19), against a real
//! gateway on 127.0.0.1:0 with a temp SQLite store and audit log, in front of the recording
//! upstream. Time moves on the gateway's clock (`advance_ms`), never by sleeping.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Options, TestGateway, client, get_bearer_expect, permission_rule, sign_in_session};
use tokengate::mfa;

/// A rule named `name` letting holders of `permission` POST to `path` once `approvers` approved.
fn gated_post(path: &str, permission: &str, name: &str, approvers: &str) -> String {
    permission_rule(&["POST"], path, permission)
        + &format!(
            "name = {name:?}\napproval = {{ window = \"15m\", approvers = [{approvers:?}] }}\n"
        )
}

/// Deploy gated on an admin's approval, restart on the account `ops`'s, and an ungated read.
fn rules() -> String {
    [
        gated_post("/apps/{app}/deploy", "apps:deploy", "deploy", "role:admin"),
        gated_post(
            "/apps/{app}/restart",
            "apps:restart",
            "restart",
            "account:ops",
        ),
        permission_rule(&[], "/apps/{app}", "apps:read") + "name = \"read-app\"\n",
    ]
    .concat()
}

const MIN: i64 = 60_000;

/// A gateway with `[admin.mfa]` (key in its own temp folder) and the gated rules.
async fn start(extra: &str) -> (TestGateway, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("mfa.key");
    std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
    let tg = TestGateway::start_with(Options {
        sections: format!(
            "[admin.mfa]\nkey_file = \"{}\"\nstep_up_ttl = \"10m\"\n\n[rate_limit]\nfailed_auth_per_minute = 1000\n\n{extra}\n",
            key.display()
        ),
        rules: rules(),
        ..Options::default()
    })
    .await;
    (tg, keys)
}

/// A person in the web UI: cookie + CSRF token.
struct Person {
    c: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
    secret: Vec<u8>,
}

async fn sign_in(tg: &TestGateway, token: &str) -> Person {
    let c = client();
    let base = format!("http://{}", tg.admin_addr);
    let (cookie, csrf) = sign_in_session(&c, &base, token).await;
    Person {
        c,
        base,
        cookie,
        csrf,
        secret: Vec::new(),
    }
}

impl Person {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        csrf: bool,
    ) -> (StatusCode, Value) {
        let mut rb = self
            .c
            .request(method, format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("origin", &self.base);
        if csrf {
            rb = rb.header("x-csrf-token", &self.csrf);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let s = r.status();
        (
            s,
            serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body), true).await
    }

    /// Enrols TOTP and confirms it; keeps the secret.
    async fn enrol(&mut self, tg: &TestGateway) -> Value {
        let (s, v) = self.call(Method::POST, "/v1/mfa/enroll", None, true).await;
        assert_eq!(s, 201, "{v}");
        self.secret = base32_decode(v["secret"].as_str().unwrap());
        let (s, c) = self
            .post("/v1/mfa/confirm", json!({"code": self.code(tg, 0)}))
            .await;
        assert_eq!(s, 200, "{c}");
        next_step(tg);
        v
    }

    /// The TOTP code `delta` steps from the gateway's now.
    fn code(&self, tg: &TestGateway, delta: i64) -> String {
        mfa::code_at(&self.secret, mfa::step_of(tg.gw.now_ms() / 1000) + delta)
    }

    /// Decides (`approve` or `reject`) the approval request `id` with the current TOTP code and
    /// the `note`, if any.
    async fn decide(
        &self,
        tg: &TestGateway,
        id: &str,
        verdict: &str,
        note: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut body = json!({"totp": self.code(tg, 0)});
        if let Some(n) = note {
            body["note"] = json!(n);
        }
        self.post(&format!("/v1/approvals/{id}/{verdict}"), body)
            .await
    }
}

/// Moves the gateway clock to the middle of the next TOTP step (a code is used once per step).
fn next_step(tg: &TestGateway) {
    let now = tg.gw.now_ms();
    let into = now.rem_euclid(30_000);
    tg.gw.clock().advance_ms(30_000 - into + 10_000);
}

fn base32_decode(s: &str) -> Vec<u8> {
    let (mut buf, mut bits, mut out) = (0u32, 0u32, Vec::new());
    for ch in s.bytes() {
        let v = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
            .iter()
            .position(|&c| c == ch)
            .unwrap() as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            out.push((buf >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

async fn bearer(
    tg: &TestGateway,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut rb = client()
        .request(method, format!("http://{}{path}", tg.admin_addr))
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let s = r.status();
    (
        s,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn public(tg: &TestGateway, token: &str, path: &str) -> (StatusCode, Value) {
    let r = client()
        .post(tg.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (
        s,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

/// Asserts the gateway's audit log verifies (chain intact).
fn assert_audit_verifies(tg: &TestGateway) {
    let report = tokengate::audit::verify(std::slice::from_ref(&tg.audit_path())).unwrap();
    assert!(report.is_ok(), "{report}");
}

/// [`public`], which must be refused for want of an approval (403 `approval_required`): the body.
async fn refused_for_approval(tg: &TestGateway, token: &str, path: &str) -> Value {
    let (s, v) = public(tg, token, path).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("approval_required")),
        "{path}"
    );
    v
}

/// `POST /v1/approvals` with `body`, as the holder of `token`.
async fn ask_approval(tg: &TestGateway, token: &str, body: Value) -> (StatusCode, Value) {
    bearer(tg, token, Method::POST, "/v1/approvals", Some(body)).await
}

/// [`ask_approval`] for `rule` with the path parameters `params` (no message).
async fn ask(tg: &TestGateway, token: &str, rule: &str, params: Value) -> (StatusCode, Value) {
    ask_approval(tg, token, json!({"rule": rule, "params": params})).await
}

async fn request(tg: &TestGateway, token: &str, rule: &str, app: &str) -> Value {
    let (s, v) = ask_approval(
        tg,
        token,
        json!({"rule": rule, "params": {"app": app}, "message": "release 4.2"}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"], "pending");
    v
}

// ------------------------------------------------------------------------------------------------
// MFA

#[tokio::test]
async fn totp_enrolment_step_up_replay_drift_rate_limit_and_a_sealed_secret() {
    let (tg, _keys) = start("").await;
    let (admin, _) = tg.token("ops", "ana", &["tokengate:admin"]);
    // A token alone never enrols: MFA belongs to a person's session.
    let (s, v) = bearer(&tg, &admin, Method::POST, "/v1/mfa/enroll", None).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("session_required"))
    );

    let mut p = sign_in(&tg, &admin).await;
    let (s, v) = p.call(Method::POST, "/v1/mfa/enroll", None, false).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("csrf_failed"))
    );
    let e = p.enrol(&tg).await;
    assert!(
        e["otpauth_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/tokengate:ops?secret=")
    );
    assert!(e["qr_svg"].as_str().unwrap().contains("<svg"));
    let recovery: Vec<String> = serde_json::from_value(e["recovery_codes"].clone()).unwrap();
    assert_eq!(recovery.len(), 10);
    let (s, _) = p.call(Method::POST, "/v1/mfa/enroll", None, true).await;
    assert_eq!(s, 409, "an active enrolment is kept");

    // Step-up with the current code; the same code again (same step) is refused.
    let code = p.code(&tg, 0);
    let (s, v) = p.post("/v1/mfa/verify", json!({"code": code})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = p.post("/v1/mfa/verify", json!({"code": code})).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("mfa_failed")),
        "replay"
    );
    // Drift: one step ahead is accepted, two steps are not.
    next_step(&tg);
    let (s, _) = p
        .post("/v1/mfa/verify", json!({"code": p.code(&tg, 1)}))
        .await;
    assert_eq!(s, 200, "+1 step");
    next_step(&tg);
    next_step(&tg);
    let (s, _) = p
        .post("/v1/mfa/verify", json!({"code": p.code(&tg, -2)}))
        .await;
    assert_eq!(s, 403, "-2 steps");
    let (s, _) = p
        .post("/v1/mfa/verify", json!({"code": p.code(&tg, 2)}))
        .await;
    assert_eq!(s, 403, "+2 steps");
    // A recovery code works once.
    let (s, v) = p.post("/v1/mfa/verify", json!({"code": recovery[0]})).await;
    assert_eq!(
        (s.as_u16(), v["method"].as_str()),
        (200, Some("recovery_code"))
    );
    let (s, _) = p.post("/v1/mfa/verify", json!({"code": recovery[0]})).await;
    assert_eq!(s, 403);
    // Failures are rate-limited per account: after 5 within 5 minutes (a success clears them)
    // even a good code waits.
    for _ in 0..4 {
        let (s, _) = p.post("/v1/mfa/verify", json!({"code": "000000"})).await;
        assert_eq!(s, 403);
    }
    let (s, v) = p
        .post("/v1/mfa/verify", json!({"code": p.code(&tg, 0)}))
        .await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (429, Some("mfa_locked")),
        "{v}"
    );
    tg.gw.clock().advance_ms(5 * MIN + 1);
    let (s, _) = p
        .post("/v1/mfa/verify", json!({"code": p.code(&tg, 0)}))
        .await;
    assert_eq!(s, 200, "the lock ends");

    let (s, v) = p.call(Method::GET, "/v1/mfa", None, false).await;
    assert_eq!(s, 200);
    assert_eq!(
        (v["enrolled"].as_bool(), v["recovery_codes_left"].as_u64()),
        (Some(true), Some(9))
    );
    assert!(v["step_up_until"].is_string());

    assert_eq!(tg.admin_events("mfa.enrolled").await.len(), 1);
    assert!(tg.admin_events("mfa.verified").await.len() >= 4);
    let failed = tg.admin_events("mfa.failed").await;
    assert_eq!(failed.len(), 9, "{failed:?}");
    assert!(failed.iter().any(|l| l["reason"] == "locked"));
    assert!(
        failed
            .iter()
            .all(|l| l["account"] == "ops" || l["target"] == "ops")
    );

    // The secret is sealed at rest: neither its bytes nor its base32 are in the store files.
    let secret_b32 = e["secret"].as_str().unwrap().to_string();
    for f in std::fs::read_dir(tg.dir.path()).unwrap() {
        let path = f.unwrap().path();
        if path.to_string_lossy().contains("tokengate.db") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes
                    .windows(p.secret.len())
                    .any(|w| w == p.secret.as_slice()),
                "{path:?}"
            );
            assert!(
                !bytes
                    .windows(secret_b32.len())
                    .any(|w| w == secret_b32.as_bytes())
            );
            assert!(
                !bytes
                    .windows(recovery[1].len())
                    .any(|w| w == recovery[1].as_bytes())
            );
        }
    }
    let log = std::fs::read_to_string(tg.audit_path()).unwrap();
    assert!(!log.contains(&secret_b32) && !log.contains(&recovery[1]));

    // A lost phone: an operator resets the enrolment on the store; the person enrols again.
    let out = support::cli(&tg.config_path, &["account", "reset-mfa", "ops"]);
    support::assert_success(&out);
    let (_, v) = p.call(Method::GET, "/v1/mfa", None, false).await;
    assert_eq!(v["enrolled"], false);
    support::eventually(
        "mfa.reset in the audit log",
        std::time::Duration::from_secs(20),
        || async { tg.admin_events("mfa.reset").await.into_iter().next() },
    )
    .await;
    let again = support::cli(&tg.config_path, &["account", "reset-mfa", "ops"]);
    assert_eq!(again.status.code(), Some(1), "nothing to reset");
    p.enrol(&tg).await;
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn required_for_admin_asks_a_session_for_a_fresh_step_up_and_leaves_tokens_alone() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("mfa.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let tg = TestGateway::with_sections(format!(
        "[admin.mfa]\nkey_file = \"{}\"\nrequired_for_admin = true\nstep_up_ttl = \"5m\"\n",
        key.display()
    ))
    .await;
    let (admin, _) = tg.token("ops", "ana", &["tokengate:admin"]);
    let mut p = sign_in(&tg, &admin).await;
    let (s, v) = p.post("/v1/accounts", json!({"name": "one"})).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("mfa_required"))
    );
    let (s, _) = p.call(Method::GET, "/v1/accounts", None, false).await;
    assert_eq!(s, 200, "reading needs no step-up");
    // Enrolling (confirming) steps the session up.
    p.enrol(&tg).await;
    let (s, _) = p.post("/v1/accounts", json!({"name": "two"})).await;
    assert_eq!(s, 201);
    // The step-up ends; a fresh code renews it.
    tg.gw.clock().advance_ms(5 * MIN + 1);
    let (s, _) = p.post("/v1/accounts", json!({"name": "three"})).await;
    assert_eq!(s, 403);
    let (s, _) = p
        .post("/v1/mfa/verify", json!({"code": p.code(&tg, 0)}))
        .await;
    assert_eq!(s, 200);
    let (s, _) = p.post("/v1/accounts", json!({"name": "three"})).await;
    assert_eq!(s, 201);
    // A Bearer admin token (automation, break-glass) is not a session and is not asked.
    let (s, _) = bearer(
        &tg,
        &admin,
        Method::POST,
        "/v1/accounts",
        Some(json!({"name": "four"})),
    )
    .await;
    assert_eq!(s, 201);
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// The whole story: refused, requested, approved, used, expired.

#[tokio::test]
async fn a_gated_call_is_refused_until_a_person_approves_and_again_after_the_window() {
    let (tg, _keys) = start("").await;
    let (ci, ci_id) = tg.token(
        "ci",
        "deployer",
        &["apps:deploy", "apps:restart", "apps:read"],
    );
    let (admin, _) = tg.token("ops", "ana", &["tokengate:admin"]);

    // 1. No approval: 403 approval_required, audited, nothing forwarded.
    let (s, v) = public(&tg, &ci, "/apps/billing/deploy").await;
    assert_eq!(s, 403);
    assert_eq!(v["error"], "approval_required");
    assert_eq!(v["rule"], "deploy");
    assert!(v["approval_id"].is_null());
    let line = tg.last_request_line().await;
    support::assert_rejection_line(&line, 403, "approval_required");
    assert_eq!(line["api_token_id"], ci_id);
    assert_eq!(tg.upstream.count(), 0);
    // A named rule without `approval` is an ordinary rule.
    get_bearer_expect(&client(), tg.url("/apps/billing"), &ci, 200).await;
    tg.upstream.clear();

    // 2. The CI token asks; the refusal now names the pending request.
    let a = request(&tg, &ci, "deploy", "billing").await;
    let id = a["id"].as_str().unwrap().to_string();
    let (s, again) = ask(&tg, &ci, "deploy", json!({"app": "billing"})).await;
    assert_eq!(
        (s.as_u16(), again["id"].as_str()),
        (200, Some(id.as_str())),
        "not duplicated"
    );
    let (s, v) = public(&tg, &ci, "/apps/billing/deploy").await;
    assert_eq!(
        (s.as_u16(), v["approval_id"].as_str()),
        (403, Some(id.as_str()))
    );
    assert_eq!(tg.upstream.count(), 0);
    let (s, v) = bearer(&tg, &ci, Method::GET, &format!("/v1/approvals/{id}"), None).await;
    assert_eq!((s.as_u16(), v["status"].as_str()), (200, Some("pending")));

    // 3. A person approves with a TOTP code.
    let mut p = sign_in(&tg, &admin).await;
    p.enrol(&tg).await;
    let (s, list) = p
        .call(Method::GET, "/v1/approvals?status=pending", None, false)
        .await;
    assert_eq!(s, 200);
    assert_eq!(list["approvals"][0]["id"], id.as_str());
    assert_eq!(list["approvals"][0]["message"], "release 4.2");
    let (s, v) = p.decide(&tg, &id, "approve", Some("go")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "approved");
    assert_eq!(v["window_seconds"], 900);

    // 4. The call goes through, audited approval.used.
    let (s, _) = public(&tg, &ci, "/apps/billing/deploy").await;
    assert_eq!(s, 200);
    assert_eq!(tg.upstream.count(), 1);
    let used = tg.admin_events("approval.used").await;
    assert_eq!(used.len(), 1);
    assert_eq!(used[0]["target"], id.as_str());
    assert_eq!(used[0]["api_token_id"], ci_id);

    // 5. After the window: 403 again, the approval audited as expired.
    tg.gw.clock().advance_ms(15 * MIN + 1);
    let v = refused_for_approval(&tg, &ci, "/apps/billing/deploy").await;
    assert!(v["approval_id"].is_null());
    assert_eq!(tg.upstream.count(), 1);
    let expired = tg.admin_events("approval.expired").await;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["target"], id.as_str());
    let (_, v) = bearer(&tg, &ci, Method::GET, &format!("/v1/approvals/{id}"), None).await;
    assert_eq!(v["status"], "expired");

    // The story is in the audit log, in order, and the chain verifies.
    let names: Vec<String> = tg
        .audit_lines()
        .await
        .iter()
        .filter(|l| {
            l["kind"] == "admin"
                && l["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("approval."))
        })
        .map(|l| l["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "approval.requested",
            "approval.approved",
            "approval.used",
            "approval.expired"
        ]
    );
    let approved = &tg.admin_events("approval.approved").await[0];
    assert_eq!(approved["auth_type"], "session");
    assert_eq!(approved["details"]["decided_by_account"], "ops");
    assert_audit_verifies(&tg);
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Adversarial decisions

#[tokio::test]
async fn only_a_person_other_than_the_requester_with_a_fresh_totp_code_decides() {
    let (tg, _keys) = start("").await;
    let (ci, _) = tg.token("ci", "deployer", &["apps:deploy", "apps:restart"]);
    let (admin, _) = tg.token("ops", "ana", &["tokengate:admin"]);
    let (ops_deployer, _) = tg.token("ops", "ops-deployer", &["apps:deploy"]);
    let (dev, _) = tg.token("dev", "bob", &["tokengate:self"]);
    let a = request(&tg, &ci, "deploy", "billing").await;
    let id = a["id"].as_str().unwrap().to_string();
    let approve = format!("/v1/approvals/{id}/approve");

    // Bearer tokens never decide: the requesting token, nor an admin token alone.
    for t in [&ci, &admin] {
        let (s, v) = bearer(
            &tg,
            t,
            Method::POST,
            &approve,
            Some(json!({"totp": "123456"})),
        )
        .await;
        assert_eq!(
            (s.as_u16(), v["error"].as_str()),
            (403, Some("session_required")),
            "{v}"
        );
    }
    let mut p = sign_in(&tg, &admin).await;
    p.enrol(&tg).await;
    // CSRF missing.
    let (s, v) = p
        .call(
            Method::POST,
            &approve,
            Some(json!({"totp": p.code(&tg, 0)})),
            false,
        )
        .await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("csrf_failed"))
    );
    // Without, with a wrong, with a replayed code.
    let (s, v) = p.post(&approve, json!({"note": "x"})).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("mfa_required"))
    );
    let (s, v) = p.post(&approve, json!({"totp": "000000"})).await;
    assert_eq!((s.as_u16(), v["error"].as_str()), (403, Some("mfa_failed")));
    let code = p.code(&tg, 0);
    let (s, _) = p.post("/v1/mfa/verify", json!({"code": code})).await;
    assert_eq!(s, 200);
    let (s, v) = p.post(&approve, json!({"totp": code})).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("mfa_failed")),
        "replayed code"
    );
    // Not an approver: a person whose account the rule does not name.
    let bob = sign_in(&tg, &dev).await;
    let (s, _) = bob.post(&approve, json!({"totp": "123456"})).await;
    assert_eq!(s, 404, "a non-approver does not even see the request");
    // Self-approval: the requester's own account (ops asks with its deploy token).
    let own = request(&tg, &ops_deployer, "deploy", "web").await;
    next_step(&tg);
    let (s, v) = p
        .post(
            &format!("/v1/approvals/{}/approve", own["id"].as_str().unwrap()),
            json!({"totp": p.code(&tg, 0)}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("self_approval"))
    );
    // Nothing got approved by any of that.
    assert!(tg.admin_events("approval.approved").await.is_empty());
    let (s, _) = public(&tg, &ci, "/apps/billing/deploy").await;
    assert_eq!(s, 403);

    // Reject, then the token asks again.
    next_step(&tg);
    let (s, v) = p.decide(&tg, &id, "reject", Some("not today")).await;
    assert_eq!(
        (s.as_u16(), v["status"].as_str()),
        (200, Some("rejected")),
        "{v}"
    );
    let v = refused_for_approval(&tg, &ci, "/apps/billing/deploy").await;
    assert!(v["approval_id"].is_null());
    next_step(&tg);
    let (s, v) = p.post(&approve, json!({"totp": p.code(&tg, 0)})).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (409, Some("not_pending"))
    );
    let again = request(&tg, &ci, "deploy", "billing").await;
    assert_ne!(again["id"], id.as_str());
    let rejected = tg.admin_events("approval.rejected").await;
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["details"]["note"], "not today");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn an_approval_is_bound_to_its_token_rule_and_parameters() {
    let (tg, _keys) = start("").await;
    let perms = ["apps:deploy", "apps:restart"];
    let (ci, _) = tg.token("ci", "deployer", &perms);
    let (other, _) = tg.token("ci2", "other", &perms);
    let (admin, _) = tg.token("ops", "ana", &["tokengate:admin"]);
    let a = request(&tg, &ci, "deploy", "billing").await;
    let mut p = sign_in(&tg, &admin).await;
    p.enrol(&tg).await;
    let (s, _) = p
        .post(
            &format!("/v1/approvals/{}/approve", a["id"].as_str().unwrap()),
            json!({"totp": p.code(&tg, 0)}),
        )
        .await;
    assert_eq!(s, 200);
    // Rule A's approval on rule B; app=billing's on app=web; another token's (confused deputy).
    for (token, path) in [
        (&ci, "/apps/billing/restart"),
        (&ci, "/apps/web/deploy"),
        (&other, "/apps/billing/deploy"),
    ] {
        refused_for_approval(&tg, token, path).await;
        let line = tg.last_request_line().await;
        support::assert_rejection_line(&line, 403, "approval_required");
    }
    assert_eq!(tg.upstream.count(), 0);
    // The other token does not even see the approval.
    let (s, _) = bearer(
        &tg,
        &other,
        Method::GET,
        &format!("/v1/approvals/{}", a["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(s, 404);
    // Parameters must be exactly the rule's; a token without the permission cannot ask.
    let (s, _) = ask(&tg, &ci, "deploy", json!({"env": "prod"})).await;
    assert_eq!(s, 400);
    let (reader, _) = tg.token("ci", "reader", &["apps:read"]);
    let (s, v) = ask(&tg, &reader, "deploy", json!({"app": "billing"})).await;
    assert_eq!(
        (s.as_u16(), v["error"].as_str()),
        (403, Some("insufficient_scope"))
    );
    let (s, _) = ask(&tg, &ci, "read-app", json!({"app": "billing"})).await;
    assert_eq!(s, 400, "a rule without approval");
    // The right token, rule and parameters go through.
    let (s, _) = public(&tg, &ci, "/apps/billing/deploy").await;
    assert_eq!(s, 200);
    assert_eq!(tg.upstream.count(), 1);
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// The CLI

fn cli_request(tg: &TestGateway, token: &str, wait: &str) -> std::process::Child {
    std::process::Command::new(support::bin())
        .args([
            "--url",
            &format!("http://{}", tg.admin_addr),
            "approval",
            "request",
            "--rule",
            "deploy",
            "--param",
            "app=billing",
            "--message",
            "release",
            "--wait",
            wait,
        ])
        .env("TOKENGATE_TOKEN", token)
        .env("HOME", tg.dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

async fn pending_id(tg: &TestGateway, token: &str) -> String {
    support::eventually(
        "the CLI's request",
        std::time::Duration::from_secs(20),
        || async {
            let (_, v) = bearer(tg, token, Method::GET, "/v1/approvals?status=pending", None).await;
            v["approvals"][0]["id"].as_str().map(str::to_string)
        },
    )
    .await
}

async fn exit_of(child: std::process::Child) -> (i32, String) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn cli_approval_request_wait_exits_by_outcome() {
    let (tg, _keys) = start("").await;
    let (ci, _) = tg.token("ci", "deployer", &["apps:deploy"]);
    let (admin, _) = tg.token("ops", "ana", &["tokengate:admin"]);
    let mut p = sign_in(&tg, &admin).await;
    p.enrol(&tg).await;

    // Approved: exit 0.
    let child = cli_request(&tg, &ci, "60s");
    let id = pending_id(&tg, &ci).await;
    let (s, _) = p.decide(&tg, &id, "approve", None).await;
    assert_eq!(s, 200);
    let (code, err) = exit_of(child).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("approved by ops"), "{err}");
    let (s, _) = public(&tg, &ci, "/apps/billing/deploy").await;
    assert_eq!(s, 200);

    // Asked again inside the window: the live approval is answered at once, exit 0.
    let (code, err) = exit_of(cli_request(&tg, &ci, "60s")).await;
    assert_eq!(code, 0, "{err}");

    // Rejected: exit 10 (after the window, a new request).
    tg.gw.clock().advance_ms(16 * MIN);
    let child = cli_request(&tg, &ci, "60s");
    let id = pending_id(&tg, &ci).await;
    next_step(&tg);
    let (s, _) = p.decide(&tg, &id, "reject", Some("no")).await;
    assert_eq!(s, 200);
    let (code, err) = exit_of(child).await;
    assert_eq!(code, tokengate::cli::EXIT_REJECTED as i32, "{err}");
    assert!(err.contains("rejected"), "{err}");

    // Nobody decides: exit 11 when the wait runs out.
    let child = cli_request(&tg, &ci, "1s");
    let (code, err) = exit_of(child).await;
    assert_eq!(code, tokengate::cli::EXIT_TIMED_OUT as i32, "{err}");
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Notifications

#[derive(Clone, Default)]
struct Hook {
    seen: Arc<Mutex<Vec<(http::HeaderMap, String)>>>,
    fail_first: usize,
}

async fn webhook_server(fail_first: usize) -> (SocketAddr, Hook) {
    use http_body_util::BodyExt;
    let hook = Hook {
        seen: Arc::default(),
        fail_first,
    };
    let (l, addr) = support::loopback_listener().await;
    let h = hook.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let h = h.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let n = {
                                let mut seen = h.seen.lock().unwrap();
                                seen.push((parts.headers, String::from_utf8_lossy(&body).into()));
                                seen.len()
                            };
                            let status = if n <= h.fail_first { 500 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hook)
}

fn secret_file(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("webhook.secret");
    std::fs::write(&p, "s3cr3t-webhook-key-0123456789\n").unwrap();
    p
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_a_final_failure_is_audited() {
    let (addr, hook) = webhook_server(2).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path());
    let (tg, _keys) = start(&format!(
        "[approvals.webhook]\nurl = \"http://{addr}/hook\"\nsecret_file = \"{}\"\nmax_attempts = 4\nretry_backoff = \"10ms\"\n",
        secret.display()
    ))
    .await;
    let (ci, _) = tg.token("ci", "deployer", &["apps:deploy"]);
    let a = request(&tg, &ci, "deploy", "billing").await;
    // Two failures, then delivered on the third attempt.
    support::wait_until("three webhook attempts", || {
        hook.seen.lock().unwrap().len() >= 3
    })
    .await;
    let seen = hook.seen.lock().unwrap().clone();
    for (headers, body) in &seen {
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(
            v["text"].as_str().unwrap().contains("deploy"),
            "Slack-compatible text"
        );
        assert_eq!(v["event"], "approval.requested");
        assert_eq!(v["approval"]["id"], a["id"]);
        let ts: i64 = headers["x-tokengate-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let sig = headers["x-tokengate-signature"].to_str().unwrap();
        assert_eq!(
            sig,
            tokengate::approval::signature(b"s3cr3t-webhook-key-0123456789", ts, body.as_bytes())
        );
    }
    assert!(tg.admin_events("webhook.failed").await.is_empty());
    tg.stop().await;

    // A webhook that never answers well: the failure is audited, the request path unaffected.
    let (addr, hook) = webhook_server(usize::MAX).await;
    let (tg, _keys) = start(&format!(
        "[approvals.webhook]\nurl = \"http://{addr}/hook\"\nsecret_file = \"{}\"\nmax_attempts = 2\nretry_backoff = \"10ms\"\n",
        secret.display()
    ))
    .await;
    let (ci, _) = tg.token("ci", "deployer", &["apps:deploy"]);
    request(&tg, &ci, "deploy", "billing").await;
    let failed = support::eventually(
        "webhook.failed",
        std::time::Duration::from_secs(20),
        || async { tg.admin_events("webhook.failed").await.into_iter().next() },
    )
    .await;
    assert_eq!(hook.seen.lock().unwrap().len(), 2);
    assert_eq!(failed["details"]["attempts"], 2);
    assert_eq!(failed["details"]["notification"], "approval.requested");
    assert_audit_verifies(&tg);
    tg.stop().await;
}

#[tokio::test]
async fn config_refuses_an_approval_without_a_name_or_without_mfa() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).unwrap();
        tokengate::config::Config::load(&p)
            .err()
            .map(|e| e.to_string())
    };
    let base = "[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\n[[routes.rules]]\npath = \"/x\"\npermission = \"a:b\"\n";
    let e = write(&format!(
        "{base}approval = {{ window = \"15m\", approvers = [\"role:admin\"] }}\n"
    ))
    .unwrap();
    assert!(
        e.contains("routes[0].rules[0].approval") && e.contains("name"),
        "{e}"
    );
    let e = write(&format!(
        "{base}name = \"x\"\napproval = {{ window = \"15m\", approvers = [\"role:admin\"] }}\n"
    ))
    .unwrap();
    assert!(e.contains("[admin.mfa]"), "{e}");
    let e = write(&format!(
        "{base}name = \"x\"\napproval = {{ window = \"15m\", approvers = [\"admins\"] }}\n"
    ))
    .unwrap();
    assert!(e.contains("approvers"), "{e}");
    assert!(write(&format!("{base}name = \"x\"\n")).is_none());
}
