//! Admin API (`/v1/...`) and web UI sessions, against a real gateway on 127.0.0.1:0 with a temp
//! SQLite store and audit log, in front of the recording upstream (which must never see an admin
//! request).

mod support;

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    Options, TestGateway, assert_error_message, challenge, client, get_bearer, get_bearer_expect,
    get_with, post_session, sign_in_session,
};

struct Admin<'a> {
    tg: &'a TestGateway,
    c: reqwest::Client,
}

impl<'a> Admin<'a> {
    fn new(tg: &'a TestGateway) -> Self {
        Admin { tg, c: client() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.tg.admin_addr, path)
    }

    async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut rb = self.c.request(method, self.url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let (s, h) = (r.status(), r.headers().clone());
        let text = r.text().await.unwrap();
        (s, h, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Some(token), Method::GET, path, None).await;
        (s, v)
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Some(token), Method::POST, path, Some(body)).await;
        (s, v)
    }

    /// [`Admin::get`] that checks the answer's status; returns the body.
    async fn get_expect(&self, token: &str, path: &str, status: u16) -> Value {
        let (s, v) = self.get(token, path).await;
        assert_eq!(s, status, "GET {path}: {v}");
        v
    }

    /// [`Admin::post`] that checks the answer's status; returns the body.
    async fn post_expect(&self, token: &str, path: &str, body: Value, status: u16) -> Value {
        let (s, v) = self.post(token, path, body).await;
        assert_eq!(s, status, "POST {path}: {v}");
        v
    }
}

/// The `Set-Cookie` header of `r` (which must have one).
fn set_cookie(r: &reqwest::Response) -> &str {
    r.headers()["set-cookie"].to_str().unwrap()
}

fn realm_challenge(h: &reqwest::header::HeaderMap) -> String {
    h.get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_route_works_for_an_admin_token_and_each_mutation_is_audited() {
    let (tg, root, root_id) = TestGateway::with_admin().await;
    let a = Admin::new(&tg);

    let me = a.get_expect(&root, "/v1/whoami", 200).await;
    assert_eq!(
        (
            me["id"].as_str(),
            me["access"].as_str(),
            me["auth_type"].as_str()
        ),
        (Some(root_id.as_str()), Some("admin"), Some("api_token"))
    );
    assert!(
        me.get("token").is_none() && !me.to_string().contains(&root),
        "whoami never echoes the token"
    );

    let pol = a.get_expect(&root, "/v1/policy", 200).await;
    assert!(
        pol["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "viewer" && r["grantable"] == true)
    );
    assert_eq!(pol["expiry"]["default"], "90d");

    let acc = a
        .post_expect(
            &root,
            "/v1/accounts",
            json!({"name": "ci", "email": "ci@example.com"}),
            201,
        )
        .await;
    assert_eq!(acc["status"], "active");
    a.post_expect(&root, "/v1/accounts", json!({"name": "ci"}), 409)
        .await;
    let list = a.get_expect(&root, "/v1/accounts", 200).await;
    let names: BTreeSet<&str> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["ci", "ops"]));

    let created = a.post_expect(&root, "/v1/tokens", json!({"account": "ci", "name": "deploy", "role": "viewer", "expires": "30d", "scopes": {"app": ["billing"]}}), 201).await;
    let plain = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(
        plain.starts_with("tg_")
            && created["prefix"]
                .as_str()
                .is_some_and(|p| plain.starts_with(p))
    );
    assert_eq!(created["scopes"]["app"][0], "billing");

    // The new token works on the public listener.
    let pc = client();
    get_bearer_expect(&pc, tg.url("/apps/billing/x"), &plain, 200).await;

    let shown = a.get_expect(&root, &format!("/v1/tokens/{id}"), 200).await;
    assert!(
        shown.get("token").is_none(),
        "the plaintext is returned once, at creation"
    );
    let (s, by_prefix) = a
        .get(
            &root,
            &format!("/v1/tokens/{}", created["prefix"].as_str().unwrap()),
        )
        .await;
    assert_eq!(
        (s, by_prefix["id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );

    let list = a.get_expect(&root, "/v1/tokens?account=ci", 200).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&plain));

    let (s, found) = a
        .post(&root, "/v1/tokens/identify", json!({"token": plain}))
        .await;
    assert_eq!(
        (s, found["id"].as_str(), found["revoked_now"].as_bool()),
        (StatusCode::OK, Some(id.as_str()), Some(false))
    );

    let rotated = a
        .post_expect(
            &root,
            &format!("/v1/tokens/{id}/rotate"),
            json!({"grace": "1h"}),
            201,
        )
        .await;
    let new_plain = rotated["token"].as_str().unwrap().to_string();
    let new_id = rotated["id"].as_str().unwrap().to_string();
    assert_eq!(rotated["rotated_from"].as_str(), Some(id.as_str()));
    assert_eq!(rotated["grace_seconds"], 3600);
    get_bearer_expect(&pc, tg.url("/apps/billing/x"), &new_plain, 200).await;

    let revoked = a
        .post_expect(
            &root,
            &format!("/v1/tokens/{new_id}/revoke"),
            json!({"reason": "test over"}),
            200,
        )
        .await;
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["revoke_reason"], "test over");
    // Revocation is instant on this process's public listener.
    let r = get_bearer_expect(&pc, tg.url("/apps/billing/x"), &new_plain, 401).await;
    assert!(challenge(&r).contains("revoked"));
    let (s, _) = a
        .post(&root, &format!("/v1/tokens/{new_id}/revoke"), json!({}))
        .await;
    assert_eq!(s, 409, "already revoked");

    let (s, dis) = a.post(&root, "/v1/accounts/ci/disable", json!({})).await;
    assert_eq!(
        (s, dis["status"].as_str()),
        (StatusCode::OK, Some("disabled"))
    );

    // Every mutation left an admin event naming the acting token.
    for ev in [
        "account.created",
        "token.created",
        "token.identified",
        "token.rotated",
        "token.revoked",
        "account.disabled",
    ] {
        let lines = tg.admin_events(ev).await;
        assert!(!lines.is_empty(), "{ev} missing");
        // (The rotation's automatic retirement of the old token is the gateway's own act.)
        for l in lines.iter().filter(|l| l["actor"] != "tokengate") {
            assert_eq!(l["actor"], root_id.as_str(), "{l}");
            assert_eq!(l["client_ip"], "127.0.0.1");
            assert_eq!(l["details"]["actor_name"], "root");
        }
    }
    // Account events name the account by id in `target` and by name in `account`, as the CLI's do.
    for ev in ["account.created", "account.disabled"] {
        let l = &tg.admin_events(ev).await[0];
        assert_eq!(
            (l["target"].as_str(), l["account"].as_str()),
            (acc["id"].as_str(), Some("ci")),
            "{l}"
        );
    }
    let created_ev = &tg.admin_events("token.created").await[0];
    assert_eq!(
        (
            created_ev["target"].as_str(),
            created_ev["account"].as_str()
        ),
        (Some(id.as_str()), Some("ci"))
    );
    // Request lines for the admin API carry the caller and never a token.
    let line = tg.last_line_for("/v1/tokens").await;
    assert_eq!(
        (line["auth_type"].as_str(), line["api_token_id"].as_str()),
        (Some("api_token"), Some(root_id.as_str()))
    );
    let log = std::fs::read_to_string(tg.dir.path().join("audit.log")).unwrap();
    for secret in [&root, &plain, &new_plain] {
        assert!(
            !log.contains(secret.as_str()),
            "a plaintext token reached the audit log"
        );
    }
    // Only the two public calls reached the upstream; no admin request ever does.
    assert_eq!(tg.upstream.count(), 2);
    tg.stop().await;
}

#[tokio::test]
async fn a_self_token_cannot_see_or_touch_another_account() {
    let tg = TestGateway::start().await;
    let (alice, alice_id) = tg.token(
        "alice",
        "alice-ui",
        &["tokengate:self", "apps:read", "logs:read"],
    );
    let (_, alice_ci) = tg.token("alice", "alice-ci", &["apps:read"]);
    let (bob_plain, bob_id) = tg.token("bob", "bob-ci", &["apps:read"]);
    let a = Admin::new(&tg);

    let (s, me) = a.get(&alice, "/v1/whoami").await;
    assert_eq!((s, me["access"].as_str()), (StatusCode::OK, Some("self")));

    // Lists are filtered to the own account.
    let list = a.get_expect(&alice, "/v1/tokens", 200).await;
    let ids: BTreeSet<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([alice_id.as_str(), alice_ci.as_str()]));
    let accounts = a.get_expect(&alice, "/v1/accounts", 200).await;
    assert_eq!(accounts["accounts"].as_array().unwrap().len(), 1);
    assert_eq!(accounts["accounts"][0]["name"], "alice");
    let (s, body) = a.get(&alice, "/v1/tokens?account=bob").await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("other_account"))
    );

    // Another account's token does not exist for a self token: show, revoke, rotate, identify → 404.
    let bob_prefix = tg.gw.store().get_token(&bob_id).unwrap().prefix;
    for path in [
        format!("/v1/tokens/{bob_id}"),
        format!("/v1/tokens/{bob_prefix}"),
    ] {
        let (s, body) = a.get(&alice, &path).await;
        assert_eq!(
            (s, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}"
        );
    }
    for verb in ["revoke", "rotate"] {
        let (s, _) = a
            .post(&alice, &format!("/v1/tokens/{bob_id}/{verb}"), json!({}))
            .await;
        assert_eq!(s, 404, "{verb}");
    }
    let body = a
        .post_expect(
            &alice,
            "/v1/tokens/identify",
            json!({"token": bob_plain, "revoke": true}),
            404,
        )
        .await;
    assert!(
        !body.to_string().contains("bob"),
        "nothing about bob's token leaks: {body}"
    );
    let r = get_bearer(&client(), tg.url("/apps/x/y"), &bob_plain).await;
    assert_eq!(r.status(), 200, "bob's token still works");
    assert!(
        tg.gw
            .store()
            .get_token(&bob_id)
            .unwrap()
            .revoked_at
            .is_none()
    );

    // Accounts belong to admins.
    let body = a
        .post_expect(&alice, "/v1/accounts", json!({"name": "mallory"}), 403)
        .await;
    assert_eq!(body["required_permission"], "tokengate:admin");
    a.post_expect(&alice, "/v1/accounts/bob/disable", json!({}), 403)
        .await;
    a.post_expect(&alice, "/v1/accounts/alice/disable", json!({}), 403)
        .await;
    let (s, body) = a
        .post(
            &alice,
            "/v1/tokens",
            json!({"account": "bob", "name": "x", "permissions": ["apps:read"]}),
        )
        .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("other_account"))
    );
    assert!(tg.gw.store().get_account("mallory").is_err());

    // Its own account: create (defaults to the own account), show, rotate, revoke.
    let t = a
        .post_expect(
            &alice,
            "/v1/tokens",
            json!({"name": "mine", "role": "viewer"}),
            201,
        )
        .await;
    assert_eq!(t["account"], "alice");
    a.get_expect(&alice, &format!("/v1/tokens/{alice_ci}"), 200)
        .await;
    a.post_expect(
        &alice,
        &format!("/v1/tokens/{alice_ci}/revoke"),
        json!({}),
        200,
    )
    .await;
    let audit = tg.admin_events("token.revoked").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0]["actor"].as_str(), audit[0]["target"].as_str()),
        (Some(alice_id.as_str()), Some(alice_ci.as_str()))
    );
    assert_eq!(tg.upstream.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn a_self_token_never_mints_a_stronger_token() {
    let tg = TestGateway::start().await;
    let (alice, _) = tg.token_with("alice", "ui", &["tokengate:self", "apps:read"], |s| {
        s.scopes.insert("app".into(), vec!["web-*".into()]);
    });
    let a = Admin::new(&tg);
    for body in [
        json!({"name": "x", "permissions": ["*"]}),
        json!({"name": "x", "permissions": ["tokengate:admin"]}),
        json!({"name": "x", "permissions": ["tokengate:*"]}),
        json!({"name": "x", "role": "admin"}),
        json!({"name": "x", "role": "deployer"}),
        json!({"name": "x", "permissions": ["apps:read"], "scopes": {"app": ["*"]}}),
    ] {
        let (s, r) = a.post(&alice, "/v1/tokens", body.clone()).await;
        assert_eq!(
            (s, r["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{body}"
        );
    }
    let pol = a.get_expect(&alice, "/v1/policy", 200).await;
    let admin_role = pol["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "admin")
        .unwrap()
        .clone();
    assert_eq!(admin_role["grantable"], false);
    // A narrower token is fine, and inherits the scope when none is asked for.
    let t = a
        .post_expect(
            &alice,
            "/v1/tokens",
            json!({"name": "ok", "permissions": ["apps:read"]}),
            201,
        )
        .await;
    assert_eq!(t["scopes"]["app"][0], "web-*");
    assert_eq!(
        tg.gw
            .store()
            .list_tokens(Some("alice"), false, tg.gw.now_ms())
            .unwrap()
            .len(),
        2
    );
    tg.stop().await;
}

#[tokio::test]
async fn rejections_are_the_public_listeners_and_are_audited() {
    let (tg, root, _) = TestGateway::with_admin().await;
    let (viewer, viewer_id) = tg.token("ops", "viewer", &["apps:read"]);
    let (gone, gone_id) = tg.token("ops", "gone", &["tokengate:admin"]);
    tg.gw.revoke(&gone_id, "test", "test").await.unwrap();
    let (old, _) = tg.token_with("ops", "old", &["tokengate:admin"], |s| {
        s.expires_at = Some(tg.gw.now_ms() + 1000)
    });
    tg.gw.clock().advance_ms(2000);
    let a = Admin::new(&tg);
    let pc = client();
    let mut bad = root.clone();
    bad.pop();
    bad.push(if root.ends_with('A') { 'B' } else { 'A' });

    struct Case {
        header: Option<String>,
        status: u16,
        error: &'static str,
        challenge: &'static str,
        reason: &'static str,
    }
    let cases = [
        Case {
            header: None,
            status: 401,
            error: "unauthorized",
            challenge: "Bearer realm=\"tokengate\"",
            reason: "missing_token",
        },
        Case {
            header: Some("Basic dXNlcjpwdw==".into()),
            status: 401,
            error: "unauthorized",
            challenge: "Bearer realm=\"tokengate\"",
            reason: "unsupported_scheme",
        },
        Case {
            header: Some("Bearer a b".into()),
            status: 400,
            error: "invalid_request",
            challenge: "error=\"invalid_request\"",
            reason: "malformed",
        },
        Case {
            header: Some(format!("Bearer {bad}")),
            status: 401,
            error: "invalid_token",
            challenge: "error=\"invalid_token\"",
            reason: "bad_checksum",
        },
        Case {
            header: Some(format!("Bearer {gone}")),
            status: 401,
            error: "invalid_token",
            challenge: "was revoked",
            reason: "revoked",
        },
        Case {
            header: Some(format!("Bearer {old}")),
            status: 401,
            error: "invalid_token",
            challenge: "expired",
            reason: "expired",
        },
        Case {
            header: Some(format!("Bearer {viewer}")),
            status: 403,
            error: "insufficient_scope",
            challenge: "error=\"insufficient_scope\"",
            reason: "insufficient_permission",
        },
    ];
    for c in &cases {
        for method in [Method::GET, Method::POST] {
            let path = if method == Method::GET {
                "/v1/tokens"
            } else {
                "/v1/accounts"
            };
            let mut rb = a.c.request(method.clone(), a.url(path));
            if let Some(h) = &c.header {
                rb = rb.header("authorization", h);
            }
            let r = rb
                .json(&json!({"name": "never-created"}))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status().as_u16(),
                c.status,
                "{} {path} {:?}",
                method,
                c.header
            );
            let ch = realm_challenge(r.headers());
            assert!(ch.contains(c.challenge), "{ch}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"], c.error);
            assert!(body["request_id"].is_string());
            let line = tg.last_line_for(path).await;
            assert_eq!(
                (line["status_code"].as_u64(), line["reason"].as_str()),
                (Some(c.status as u64), Some(c.reason)),
                "{line}"
            );
            assert_eq!(line["rbac_decision"], "deny");
        }
        // The same credential on the public listener gets the same status and challenge (a 403
        // there is about the route's permission, so compare 401/400 only).
        if c.status != 403 {
            let mut rb = pc.get(tg.url("/apps/x/y"));
            if let Some(h) = &c.header {
                rb = rb.header("authorization", h);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status().as_u16(), c.status);
            assert!(realm_challenge(r.headers()).contains(c.challenge));
        }
    }
    let (s, b) = a.get(&viewer, "/v1/whoami").await;
    assert_eq!(
        (s, b["required_permission"].as_str()),
        (StatusCode::FORBIDDEN, Some("tokengate:self"))
    );
    let line = tg.last_line_for("/v1/whoami").await;
    assert_eq!(line["api_token_id"], viewer_id.as_str());
    // A token in the query string is refused, as on the public side.
    let (s, _, b) = a
        .call(
            Some(&root),
            Method::GET,
            &format!("/v1/tokens?access_token={root}"),
            None,
        )
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    // Nothing was created by any refused request, and the upstream saw none of the admin calls.
    assert!(tg.gw.store().get_account("never-created").is_err());
    assert!(tg.admin_events("account.created").await.is_empty());
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn bodies_are_json_size_limited_and_validated() {
    let (tg, root, _) = TestGateway::with_admin().await;
    let a = Admin::new(&tg);
    let send = |ct: &'static str, body: Vec<u8>| {
        a.c.post(a.url("/v1/tokens"))
            .bearer_auth(&root)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = send("application/json", vec![b' '; 70 * 1024])
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = send(
        "application/x-www-form-urlencoded",
        b"name=x&role=viewer".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 415);
    let r = send("application/json", b"{not json".to_vec())
        .await
        .unwrap();
    assert_error_message(r, 400, "Invalid JSON").await;
    for (body, needle) in [
        (
            json!({"name": "x", "role": "viewer", "colour": "red"}),
            "unknown field",
        ),
        (json!({"role": "viewer"}), "missing field `name`"),
        (json!({"name": "x"}), "role"),
        (json!({"name": "x", "role": "nope"}), "no role `nope`"),
        (
            json!({"name": "x", "role": "viewer", "expires": "3d"}),
            "not allowed",
        ),
        (
            json!({"name": "x", "permissions": ["bad perm"]}),
            "permission",
        ),
        (
            json!({"name": "x", "role": "viewer", "allowed_cidrs": ["nope"]}),
            "CIDR",
        ),
        (
            json!({"name": "x", "role": "viewer", "rate": "fast"}),
            "RPS/BURST",
        ),
        (
            json!({"name": "x", "role": "viewer", "scopes": {"App!": ["a"]}}),
            "key",
        ),
    ] {
        let (s, b) = a.post(&root, "/v1/tokens", body.clone()).await;
        assert_eq!(s, 400, "{body}");
        assert!(
            b["message"].as_str().unwrap().contains(needle),
            "{body}: {b}"
        );
    }
    let (s, b) = a
        .post(&root, "/v1/accounts", json!({"name": "bad name"}))
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (s, _, _) = a
        .call(Some(&root), Method::DELETE, "/v1/tokens", None)
        .await;
    assert_eq!(s, 405);
    let r =
        a.c.delete(a.url("/v1/tokens"))
            .bearer_auth(&root)
            .send()
            .await
            .unwrap();
    assert_eq!(r.headers()["allow"], "GET, POST");
    let (s, _, _) = a.call(Some(&root), Method::GET, "/v1/nope", None).await;
    assert_eq!(s, 404);
    assert_eq!(
        tg.gw
            .store()
            .list_tokens(None, true, tg.gw.now_ms())
            .unwrap()
            .len(),
        1,
        "nothing was created"
    );
    tg.stop().await;
}

#[tokio::test]
async fn the_per_account_cap_is_a_clear_409() {
    let (tg, root, _) = TestGateway::with_admin().await;
    let a = Admin::new(&tg);
    tg.account("ci");
    for i in 0..5 {
        a.post_expect(
            &root,
            "/v1/tokens",
            json!({"account": "ci", "name": format!("t{i}"), "role": "viewer"}),
            201,
        )
        .await;
    }
    let (s, b) = a
        .post(
            &root,
            "/v1/tokens",
            json!({"account": "ci", "name": "t5", "role": "viewer"}),
        )
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::CONFLICT, Some("token_limit"))
    );
    let m = b["message"].as_str().unwrap();
    assert!(
        m.contains("5 active tokens") && m.contains("revoke") && m.contains("t0"),
        "{m}"
    );
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Web UI sessions: cookies, CSRF, Origin, idle timeout.

struct Browser<'a> {
    a: Admin<'a>,
    cookie: String,
    csrf: String,
    origin: String,
}

async fn sign_in<'a>(tg: &'a TestGateway, token: &str) -> Browser<'a> {
    let a = Admin::new(tg);
    let origin = format!("http://{}", tg.admin_addr);
    let (cookie, csrf) = sign_in_session(&a.c, &origin, token).await;
    Browser {
        a,
        cookie,
        csrf,
        origin,
    }
}

impl Browser<'_> {
    /// `GET path` with the session cookie.
    async fn get(&self, path: &str) -> reqwest::Response {
        self.req(Method::GET, path).send().await.unwrap()
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.a
            .c
            .request(method, self.a.url(path))
            .header("cookie", &self.cookie)
    }
}

#[tokio::test]
async fn sign_in_sets_a_strict_httponly_session_cookie_and_is_audited() {
    let tg = TestGateway::start().await;
    let (alice, alice_id) = tg.token("alice", "ui", &["tokengate:self", "apps:read", "logs:read"]);
    let a = Admin::new(&tg);
    let origin = format!("http://{}", tg.admin_addr);

    // The page without a session: the sign-in form, a strict CSP, no CSRF token.
    let r = a.c.get(a.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<meta name=\"csrf-token\" content=\"\">")
            && html.contains("id=\"signin-form\"")
    );
    for asset in ["/assets/app.js", "/assets/app.css", "/assets/icon.svg"] {
        let r = a.c.get(a.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
    }

    // Wrong tokens are refused like Bearer calls.
    let r = post_session(&a.c, a.url("/session"), &origin, "tg_nope").await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let (viewer, _) = tg.token("alice", "viewer", &["apps:read"]);
    let r = post_session(&a.c, a.url("/session"), &origin, &viewer).await;
    assert_eq!(
        r.status(),
        403,
        "a token without tokengate:self/admin cannot sign in"
    );
    // A sign-in posted from another site is refused.
    let r = post_session(&a.c, a.url("/session"), "http://evil.example", &alice).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "foreign_origin");

    let r = post_session(&a.c, a.url("/session"), &origin, &alice).await;
    assert_eq!(r.status(), 200);
    let set = set_cookie(&r).to_string();
    assert!(set.starts_with("tokengate_session="), "{set}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(
        !set.contains("Secure"),
        "plain HTTP: no Secure flag ({set})"
    );
    let id = set
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string();
    assert_eq!(id.len(), 64, "256-bit session id");
    let body: Value = r.json().await.unwrap();
    assert!(!body.to_string().contains(&alice));
    // The session holds the token's id, never the token.
    assert!(!format!("{:?}", tg.sessions).contains(&alice));

    let login = tg.admin_events("session.login").await;
    assert_eq!(login.len(), 1);
    assert_eq!(
        (login[0]["auth_type"].as_str(), login[0]["actor"].as_str()),
        (Some("session"), Some(alice_id.as_str()))
    );
    let log = std::fs::read_to_string(tg.dir.path().join("audit.log")).unwrap();
    assert!(
        !log.contains(&alice) && !log.contains(&id),
        "neither the token nor the session id is logged"
    );

    // The page now carries the CSRF token in its meta tag.
    let r = get_with(
        &a.c,
        a.url("/"),
        None,
        &[("cookie", &format!("tokengate_session={id}"))],
    )
    .await;
    let html = r.text().await.unwrap();
    assert!(html.contains(&format!(
        "content=\"{}\"",
        body["csrf_token"].as_str().unwrap()
    )));
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn session_mutations_need_the_csrf_token_and_a_same_origin() {
    let tg = TestGateway::start().await;
    let (alice, alice_id) = tg.token("alice", "ui", &["tokengate:self", "apps:read", "logs:read"]);
    let b = sign_in(&tg, &alice).await;
    let count = || {
        tg.gw
            .store()
            .list_tokens(Some("alice"), false, tg.gw.now_ms())
            .unwrap()
            .len()
    };
    let body = json!({"name": "from-ui", "role": "viewer"});

    // Reads work with the cookie alone.
    let r = b.get("/v1/whoami").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["auth_type"], "session");

    // No CSRF header; a wrong one; a right one from a foreign Origin; a cross-site fetch.
    let attempts = [
        (
            b.req(Method::POST, "/v1/tokens")
                .header("origin", &b.origin),
            "csrf_failed",
        ),
        (
            b.req(Method::POST, "/v1/tokens")
                .header("origin", &b.origin)
                .header("x-csrf-token", "0".repeat(64)),
            "csrf_failed",
        ),
        (
            b.req(Method::POST, "/v1/tokens")
                .header("origin", "http://evil.example")
                .header("x-csrf-token", &b.csrf),
            "foreign_origin",
        ),
        (
            b.req(Method::POST, "/v1/tokens")
                .header("origin", "null")
                .header("x-csrf-token", &b.csrf),
            "foreign_origin",
        ),
        (
            b.req(Method::POST, "/v1/tokens")
                .header("sec-fetch-site", "cross-site")
                .header("x-csrf-token", &b.csrf),
            "foreign_origin",
        ),
    ];
    for (rb, code) in attempts {
        let r = rb.json(&body).send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], code);
        let line = tg.last_line_for("/v1/tokens").await;
        assert_eq!(
            (line["reason"].as_str(), line["auth_type"].as_str()),
            (Some(code), Some("session"))
        );
    }
    assert_eq!(count(), 1, "nothing was created");
    // Revoke and logout need it too.
    let r = b
        .req(Method::POST, &format!("/v1/tokens/{alice_id}/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = b.req(Method::POST, "/session/logout").send().await.unwrap();
    assert_eq!(r.status(), 403);

    // With the token and the page's own origin it works, audited as a session action.
    let r = b
        .req(Method::POST, "/v1/tokens")
        .header("origin", &b.origin)
        .header("x-csrf-token", &b.csrf)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(count(), 2);
    let ev = tg.admin_events("token.created").await;
    assert_eq!(
        (ev[0]["auth_type"].as_str(), ev[0]["actor"].as_str()),
        (Some("session"), Some(alice_id.as_str()))
    );

    // Logout ends the session and clears the cookie.
    let r = b
        .req(Method::POST, "/session/logout")
        .header("x-csrf-token", &b.csrf)
        .header("origin", &b.origin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(set_cookie(&r).contains("Max-Age=0"));
    let r = b.get("/v1/whoami").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        tg.admin_events("session.logout").await[0]["auth_type"],
        "session"
    );
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn sessions_end_when_idle_or_when_their_token_is_revoked() {
    let tg = TestGateway::start().await;
    let (alice, alice_id) = tg.token("alice", "ui", &["tokengate:self"]);
    let idle = tg.gw.config().admin.session_idle_timeout.as_millis() as i64;
    let b = sign_in(&tg, &alice).await;
    tg.gw.clock().advance_ms(idle - 1000);
    assert_eq!(
        b.get("/v1/whoami").await.status(),
        200,
        "use restarts the idle timer"
    );
    tg.gw.clock().advance_ms(idle - 1000);
    assert_eq!(b.get("/v1/whoami").await.status(), 200);
    tg.gw.clock().advance_ms(idle);
    let r = b.get("/v1/whoami").await;
    assert_eq!(r.status(), 401, "idle past the timeout");
    assert!(realm_challenge(r.headers()).starts_with("Bearer realm="));
    // The page drops a dead cookie.
    let r = b.get("/").await;
    assert!(set_cookie(&r).contains("Max-Age=0"));

    let b = sign_in(&tg, &alice).await;
    tg.gw.revoke(&alice_id, "test", "test").await.unwrap();
    let r = b.get("/v1/tokens").await;
    assert_eq!(r.status(), 401, "the sign-in token was revoked");
    assert!(realm_challenge(r.headers()).contains("revoked"));
    tg.stop().await;
}

#[tokio::test]
async fn under_tls_the_cookie_is_secure_and_host_prefixed() {
    let certs = support::LocalhostCert::new();
    let tg = TestGateway::start_with(Options {
        sections: certs.admin_tls(),
        ..Options::default()
    })
    .await;
    let (root, _) = tg.token("ops", "root", &["tokengate:admin"]);
    let c = reqwest::Client::builder()
        .add_root_certificate(certs.reqwest_root())
        .tls_built_in_root_certs(false)
        .resolve("localhost", tg.admin_addr)
        .no_proxy()
        .build()
        .unwrap();
    let origin = format!("https://localhost:{}", tg.admin_addr.port());
    let r = post_session(&c, format!("{origin}/session"), &origin, &root).await;
    assert_eq!(r.status(), 200);
    let set = set_cookie(&r).to_string();
    assert!(
        set.starts_with("__Host-tokengate_session=")
            && set.contains("; Secure")
            && set.contains("HttpOnly"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = r.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    // An http:// Origin is foreign to an https listener.
    let r = c
        .post(format!("{origin}/v1/accounts"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .header(
            "origin",
            format!("http://localhost:{}", tg.admin_addr.port()),
        )
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(format!("{origin}/v1/accounts"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .header("origin", &origin)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// The OpenAPI file matches the routes.

#[tokio::test]
async fn openapi_documents_every_route_and_each_answers_as_documented() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    // The file is JSON-compatible YAML (YAML 1.2 is a superset of JSON), so serde_json reads it.
    let spec: Value = serde_json::from_str(&text).expect("docs/openapi.yaml parses");
    assert_eq!(
        spec["openapi"].as_str().map(|v| v.starts_with("3.1")),
        Some(true)
    );
    let paths = spec["paths"].as_object().unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        for (method, _) in item
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "parameters")
        {
            documented.insert((path.clone(), method.to_uppercase()));
        }
    }
    let implemented: BTreeSet<(String, String)> = tokengate::admin::api::ROUTES
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(move |m| (p.to_string(), m.to_string())))
        .collect();
    assert_eq!(
        documented, implemented,
        "docs/openapi.yaml and admin::api::ROUTES differ"
    );

    // One unauthenticated call per operation: more than the default failed-auth quota.
    let tg = TestGateway::failed_auth_limited(100).await;
    let (root, _) = tg.token("ops", "root", &["tokengate:admin"]);
    let (victim, victim_id) = tg.token("ci", "victim", &["apps:read"]);
    let (_, rot_id) = tg.token("ci", "rotate-me", &["apps:read"]);
    let (_, del_id) = tg.token("ci", "delete-me", &["apps:read"]);
    tg.account("spare");
    let a = Admin::new(&tg);
    for (path, method) in &documented {
        let op = &paths[path][method.to_lowercase()];
        let codes: BTreeSet<String> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        // A session to revoke: signed in with the root token just before (revoke-all, which
        // sorts first, ended the earlier ones).
        let session_id = if path.starts_with("/v1/sessions/{") {
            let origin = format!("http://{}", tg.admin_addr);
            let r = support::post_session(&a.c, a.url("/session"), &origin, &root).await;
            assert_eq!(r.status(), 200);
            let (_, l) = a.get(&root, "/v1/sessions").await;
            l["sessions"][0]["id"].as_str().unwrap().to_string()
        } else {
            String::new()
        };
        let concrete = path.replace("{name}", "spare").replace(
            "{id}",
            if path.ends_with("rotate") {
                &rot_id
            } else if path.starts_with("/v1/sessions/") {
                &session_id
            } else if method == "DELETE" {
                &del_id
            } else {
                &victim_id
            },
        );
        let body = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/accounts") => Some(json!({"name": "new-account"})),
            ("POST", "/v1/tokens") => {
                Some(json!({"account": "ops", "name": "doc", "role": "viewer"}))
            }
            ("POST", "/v1/tokens/identify") => Some(json!({"token": victim})),
            ("POST", _) => Some(json!({})),
            _ => None,
        };
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        // Unauthenticated: a documented 401.
        let (s, h, _) = a.call(None, m.clone(), &concrete, body.clone()).await;
        assert_eq!(s, 401, "{method} {path}");
        assert!(
            codes.contains("401"),
            "{method} {path} does not document 401"
        );
        assert!(h.contains_key("www-authenticate"));
        let (s, _, v) = a.call(Some(&root), m, &concrete, body).await;
        // Approvals and MFA need a rule, a request or a person (tests/approvals.rs): here only
        // that what they answer a Bearer admin token is documented.
        let people = path.starts_with("/v1/approvals") || path.starts_with("/v1/mfa");
        assert!(people || s.is_success(), "{method} {path}: {s} {v}");
        assert!(
            codes.contains(s.as_str()),
            "{method} {path} answered {s}, documented {codes:?}"
        );
        // Every documented operation names its required permission.
        assert!(
            op["security"].is_array() && op["operationId"].is_string(),
            "{method} {path}"
        );
    }
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn the_failed_auth_limiter_refuses_bad_bearer_tokens_not_a_valid_one() {
    let tg = TestGateway::failed_auth_limited(3).await;
    let (root, root_id) = tg.token("ops", "root", &["tokengate:admin"]);
    let a = Admin::new(&tg);
    let good = tokengate::token::generate("tg").plaintext;
    let mut bad = good.into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    // Three failures that cost no lookup (bad checksum): the address is blocked.
    for _ in 0..3 {
        assert_eq!(a.get(&bad, "/v1/whoami").await.0, 401);
    }
    let body = a.get_expect(&bad, "/v1/whoami", 429).await;
    assert_eq!(body["error"], "too_many_failures");
    // A valid token from the blocked address is served (one lookup, then cached).
    let lookups = tg.gw.store().lookup_count();
    let me = a.get_expect(&root, "/v1/whoami", 200).await;
    assert_eq!(me["id"], root_id.as_str());
    assert_eq!(tg.gw.store().lookup_count(), lookups + 1);
    // Unknown tokens: looked up until the address's unknown-token quota (3) is used, then
    // refused without a lookup; all of them 429 while blocked.
    let lookups = tg.gw.store().lookup_count();
    for _ in 0..20 {
        let unknown = tokengate::token::generate("tg").plaintext;
        assert_eq!(a.get(&unknown, "/v1/whoami").await.0, 429);
    }
    assert_eq!(tg.gw.store().lookup_count(), lookups + 3);
    // The cached valid token is still served.
    assert_eq!(a.get(&root, "/v1/whoami").await.0, 200);
    assert_eq!(tg.gw.store().lookup_count(), lookups + 3);
    tg.stop().await;
}
