//! Adversarial suite for the admin plane (issue 14, items 1, 3, 8): every token operation
//! (create, rotate, revoke, DELETE) by every kind of caller (admin token, `tokengate:self` token,
//! web UI session, remote CLI binary) against every attribute that could widen (permissions,
//! scopes, allowed networks, expiry, rate, `tokengate:*`). Each attempt is either refused with a
//! 403 `forbidden` naming the attribute and a `token.refused` audit event, leaving the store
//! unchanged, or its result is narrowed to the caller. A real gateway on 127.0.0.1:0 with a temp
//! SQLite store and audit log; the recording upstream never sees an admin call.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{TestGateway, assert_error_message, client, sign_in_session};
use tokengate::store::{RateOverride, TokenRow};
use tokio::io::AsyncWriteExt;

const DAY: i64 = 86_400_000;

fn rate(rps: f64, burst: u32) -> RateOverride {
    RateOverride {
        requests_per_second: rps,
        burst,
    }
}

/// The acting `tokengate:self` token's limits: apps:read on app=billing, from 127.0.0.0/8,
/// expiring in 7 days, 2 requests/s (burst 4).
fn me_spec(tg: &TestGateway, s: &mut tokengate::store::NewTokenSpec) {
    s.scopes = BTreeMap::from([("app".to_string(), vec!["billing".to_string()])]);
    s.allowed_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    s.expires_at = Some(tg.gw.now_ms() + 7 * DAY);
    s.rate = Some(rate(2.0, 4));
}

/// A token of alice's that is within the caller in everything (apps:read, app=billing,
/// 127.0.0.0/8, 1 day, 1/s), then `widen` makes one attribute wider.
fn alice_token(
    tg: &TestGateway,
    name: &str,
    widen: impl FnOnce(&mut tokengate::store::NewTokenSpec),
) -> String {
    tg.token_with("alice", name, &["apps:read"], |s| {
        s.scopes = BTreeMap::from([("app".to_string(), vec!["billing".to_string()])]);
        s.allowed_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
        s.expires_at = Some(tg.gw.now_ms() + DAY);
        s.rate = Some(rate(1.0, 2));
        widen(s);
    })
    .1
}

struct World {
    tg: TestGateway,
    root: String,
    me: String,
    me_id: String,
    /// Tokens of alice's, each wider than `me` in the named attribute.
    wide: Vec<(&'static str, String)>,
    /// A token of alice's within `me` in everything.
    narrow: String,
}

async fn world() -> World {
    let tg = TestGateway::with_sections(
        "[tokens]\nallowed_expiry = [\"7d\", \"30d\", \"90d\", \"never\"]\ndefault_expiry = \"90d\"\nmax_active_per_account = 100\n",
    )
    .await;
    let (root, _) = tg.token("ops", "root", &["tokengate:admin"]);
    let (me, me_id) = tg.token_with("alice", "me", &["tokengate:self", "apps:read"], |s| {
        me_spec(&tg, s)
    });
    let wide = vec![
        (
            "tokengate",
            alice_token(&tg, "star", |s| s.permissions = vec!["*".into()]),
        ),
        (
            "tokengate",
            alice_token(&tg, "admin", |s| {
                s.permissions = vec!["tokengate:admin".into()]
            }),
        ),
        (
            "permissions",
            alice_token(&tg, "apps-all", |s| s.permissions = vec!["apps:*".into()]),
        ),
        (
            "permissions",
            alice_token(&tg, "env", |s| s.permissions.push("env:read".into())),
        ),
        ("scopes", alice_token(&tg, "any-app", |s| s.scopes.clear())),
        (
            "scopes",
            alice_token(&tg, "web-app", |s| {
                s.scopes.insert("app".into(), vec!["*".into()]);
            }),
        ),
        (
            "allowed_cidrs",
            alice_token(&tg, "any-net", |s| s.allowed_cidrs.clear()),
        ),
        (
            "allowed_cidrs",
            alice_token(&tg, "wide-net", |s| {
                s.allowed_cidrs = vec!["0.0.0.0/0".parse().unwrap()]
            }),
        ),
        (
            "expiry",
            alice_token(&tg, "forever", |s| s.expires_at = None),
        ),
        (
            "expiry",
            alice_token(&tg, "longer", |s| {
                s.expires_at = Some(tg.gw.now_ms() + 30 * DAY)
            }),
        ),
        ("rate", alice_token(&tg, "fast", |s| s.rate = None)),
        (
            "rate",
            alice_token(&tg, "burst", |s| s.rate = Some(rate(1.0, 1000))),
        ),
    ];
    let narrow = alice_token(&tg, "narrow", |_| {});
    World {
        tg,
        root,
        me,
        me_id,
        wide,
        narrow,
    }
}

/// What a caller got back.
#[derive(Debug)]
enum Outcome {
    /// Success; the JSON answer (Null for 204 or a CLI without output).
    Ok(Value),
    /// 403 `forbidden`: the message.
    Refused(String),
}

/// One kind of caller.
enum Kind {
    Bearer(String),
    Session {
        cookie: String,
        csrf: String,
        origin: String,
    },
    Cli {
        token: String,
        home: tempfile::TempDir,
    },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Bearer(_) => "bearer",
            Kind::Session { .. } => "session",
            Kind::Cli { .. } => "remote-cli",
        }
    }
}

/// Signs in through the web UI endpoint (as the browser does) and keeps cookie and CSRF token.
async fn session(tg: &TestGateway, token: &str) -> Kind {
    let origin = format!("http://{}", tg.admin_addr);
    let (cookie, csrf) = sign_in_session(&client(), &origin, token).await;
    Kind::Session {
        cookie,
        csrf,
        origin,
    }
}

async fn http(tg: &TestGateway, k: &Kind, method: Method, path: &str, body: Value) -> Outcome {
    let url = format!("http://{}{path}", tg.admin_addr);
    let mut rb = client().request(method, url).json(&body);
    match k {
        Kind::Bearer(t) => rb = rb.bearer_auth(t),
        Kind::Session {
            cookie,
            csrf,
            origin,
        } => {
            rb = rb
                .header("cookie", cookie)
                .header("x-csrf-token", csrf)
                .header("origin", origin)
        }
        Kind::Cli { .. } => unreachable!(),
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == StatusCode::FORBIDDEN {
        assert_eq!(v["error"], "forbidden", "{v}");
        assert!(v["request_id"].is_string(), "{v}");
        return Outcome::Refused(v["message"].as_str().unwrap().to_string());
    }
    assert!(status.is_success(), "{status} {text}");
    Outcome::Ok(v)
}

/// Runs the real binary against the admin API with TOKENGATE_TOKEN (never argv).
async fn cli(tg: &TestGateway, home: &Path, token: &str, args: &[String]) -> Outcome {
    let url = format!("http://{}", tg.admin_addr);
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"));
    cmd.arg("--url")
        .arg(&url)
        .args(args)
        .current_dir(home)
        .env("HOME", home)
        .env("TOKENGATE_TOKEN", token)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TOKENGATE_URL")
        .env_remove("TOKENGATE_PROFILE")
        .env_remove("TOKENGATE_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().shutdown().await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    if out.status.success() {
        return Outcome::Ok(serde_json::from_str(&stdout).unwrap_or(Value::Null));
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("(403 forbidden)"), "{stderr}");
    Outcome::Refused(stderr)
}

/// A token operation.
enum Op<'a> {
    Create(Value),
    Rotate(&'a str, Value),
    Revoke(&'a str),
    Delete(&'a str),
}

async fn perform(tg: &TestGateway, k: &Kind, op: &Op<'_>) -> Outcome {
    if let Kind::Cli { token, home } = k {
        let args: Vec<String> = match op {
            Op::Create(b) => {
                let mut a = vec!["token".into(), "create".into(), "--json".into()];
                a.extend(["--account".into(), "alice".into()]);
                a.extend(["--name".into(), b["name"].as_str().unwrap().into()]);
                for p in b["permissions"].as_array().into_iter().flatten() {
                    a.extend(["--permission".into(), p.as_str().unwrap().into()]);
                }
                for (k, v) in b["scopes"].as_object().into_iter().flatten() {
                    let vals: Vec<&str> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap())
                        .collect();
                    a.extend(["--scope".into(), format!("{k}={}", vals.join(","))]);
                }
                for c in b["allowed_cidrs"].as_array().into_iter().flatten() {
                    a.extend(["--allow-ip".into(), c.as_str().unwrap().into()]);
                }
                for key in ["expires", "rate"] {
                    if let Some(v) = b[key].as_str() {
                        a.extend([format!("--{key}"), v.into()]);
                    }
                }
                a
            }
            Op::Rotate(id, b) => {
                let mut a = vec!["token".into(), "rotate".into(), id.to_string()];
                a.push("--json".into());
                if let Some(e) = b["expires"].as_str() {
                    a.extend(["--expires".into(), e.into()]);
                }
                a
            }
            // The CLI's revoke is the API's POST .../revoke; DELETE is the same operation.
            Op::Revoke(id) | Op::Delete(id) => {
                vec!["token".into(), "revoke".into(), id.to_string()]
            }
        };
        return cli(tg, home.path(), token, &args).await;
    }
    let (method, path, body) = match op {
        Op::Create(b) => (Method::POST, "/v1/tokens".to_string(), b.clone()),
        Op::Rotate(id, b) => (Method::POST, format!("/v1/tokens/{id}/rotate"), b.clone()),
        Op::Revoke(id) => (Method::POST, format!("/v1/tokens/{id}/revoke"), json!({})),
        Op::Delete(id) => (Method::DELETE, format!("/v1/tokens/{id}"), json!({})),
    };
    http(tg, k, method, &path, body).await
}

async fn refused_events(tg: &TestGateway) -> Vec<Value> {
    tg.admin_events("token.refused").await
}

/// Asserts a refusal naming `attribute`, with its audit event, and that the store is unchanged.
async fn assert_refused(w: &World, k: &Kind, op: &Op<'_>, attribute: &str, what: &str) {
    let store = w.tg.gw.store();
    let before: Vec<TokenRow> = store.list_tokens(None, true, w.tg.gw.now_ms()).unwrap();
    let seen = refused_events(&w.tg).await.len();
    let out = perform(&w.tg, k, op).await;
    let Outcome::Refused(msg) = out else {
        panic!("{} {what}: not refused: {out:?}", k.name());
    };
    assert!(
        msg.contains(&format!("{attribute}:")),
        "{} {what}: the message names `{attribute}`: {msg}",
        k.name()
    );
    let events = refused_events(&w.tg).await;
    assert_eq!(
        events.len(),
        seen + 1,
        "{} {what}: one audit event",
        k.name()
    );
    let e = events.last().unwrap();
    assert_eq!(e["reason"], "escalation", "{e}");
    assert_eq!(e["actor"], w.me_id.as_str(), "{e}");
    assert_eq!(e["details"]["attribute"], attribute, "{e}");
    let after: Vec<TokenRow> = store.list_tokens(None, true, w.tg.gw.now_ms()).unwrap();
    assert_eq!(
        format!("{before:?}"),
        format!("{after:?}"),
        "{} {what}: nothing changed",
        k.name()
    );
}

fn base(name: &str) -> Value {
    json!({"account": "alice", "name": name, "permissions": ["apps:read"]})
}

fn with(name: &str, key: &str, v: Value) -> Value {
    let mut b = base(name);
    b[key] = v;
    b
}

/// Every widening creation, rotation and revocation by a `tokengate:self` caller of kind `k`.
async fn self_caller_is_never_stronger(w: &World, k: &Kind) {
    let tg = &w.tg;
    // create × every attribute, asked for explicitly → refused.
    let creates = [
        ("permissions", with("p1", "permissions", json!(["apps:*"]))),
        (
            "permissions",
            with("p2", "permissions", json!(["env:read"])),
        ),
        ("tokengate", with("t1", "permissions", json!(["*"]))),
        (
            "tokengate",
            with("t2", "permissions", json!(["tokengate:admin"])),
        ),
        (
            "tokengate",
            with("t3", "permissions", json!(["tokengate:*"])),
        ),
        ("scopes", with("s1", "scopes", json!({"app": ["*"]}))),
        (
            "scopes",
            with("s2", "scopes", json!({"app": ["billing", "web"]})),
        ),
        (
            "allowed_cidrs",
            with("c1", "allowed_cidrs", json!(["0.0.0.0/0"])),
        ),
        (
            "allowed_cidrs",
            with("c2", "allowed_cidrs", json!(["10.0.0.0/8"])),
        ),
        ("expiry", with("e1", "expires", json!("never"))),
        ("expiry", with("e2", "expires", json!("30d"))),
        ("rate", with("r1", "rate", json!("100000/4"))),
        ("rate", with("r2", "rate", json!("1/1000"))),
    ];
    for (attr, body) in creates {
        let what = format!("create {body}");
        assert_refused(w, k, &Op::Create(body), attr, &what).await;
    }
    // create with nothing said → narrowed to the caller.
    let Outcome::Ok(t) = perform(tg, k, &Op::Create(base(&format!("{}-ok", k.name())))).await
    else {
        panic!("{}: a narrower token is refused", k.name());
    };
    let row = tg.gw.store().find_token(t["id"].as_str().unwrap()).unwrap();
    let me = tg.gw.store().get_token(&w.me_id).unwrap();
    assert_eq!(row.permissions, vec!["apps:read"]);
    assert_eq!(row.scopes, me.scopes, "scopes inherited");
    assert_eq!(row.allowed_cidrs, me.allowed_cidrs, "networks inherited");
    assert_eq!(row.expires_at, me.expires_at, "default 90d narrowed to 7d");
    assert_eq!(row.rate, Some(rate(2.0, 4)), "default rate narrowed");
    // And the very token of issue 14 item 3 is refused.
    let item3 = json!({"account": "alice", "name": "forever", "permissions": ["tokengate:self"],
        "expires": "never", "rate": "100000/100000"});
    assert_refused(w, k, &Op::Create(item3), "expiry", "create item 3").await;

    // rotate × every attribute: the successor would be as wide as the old token → refused.
    for (attr, id) in &w.wide {
        let what = format!("rotate {id} ({attr})");
        assert_refused(w, k, &Op::Rotate(id, json!({})), attr, &what).await;
    }
    // Rotating asking for a new lifetime: admins only.
    let body = json!({"expires": "7d"});
    assert_refused(
        w,
        k,
        &Op::Rotate(&w.narrow, body),
        "expiry",
        "rotate --expires",
    )
    .await;
    // revoke and DELETE of a token with powers the caller lacks → refused.
    for (attr, id) in w
        .wide
        .iter()
        .filter(|(a, _)| *a == "tokengate" || *a == "permissions")
    {
        for op in [Op::Revoke(id), Op::Delete(id)] {
            assert_refused(w, k, &op, attr, &format!("revoke {id}")).await;
        }
    }
    assert_eq!(tg.upstream.count(), 0);
}

#[tokio::test]
async fn a_self_token_bearer_is_never_stronger() {
    let w = world().await;
    let k = Kind::Bearer(w.me.clone());
    self_caller_is_never_stronger(&w, &k).await;
    w.tg.stop().await;
}

#[tokio::test]
async fn a_web_ui_session_is_never_stronger() {
    let w = world().await;
    let k = session(&w.tg, &w.me).await;
    self_caller_is_never_stronger(&w, &k).await;
    w.tg.stop().await;
}

#[tokio::test]
async fn the_remote_cli_is_never_stronger() {
    let w = world().await;
    let k = Kind::Cli {
        token: w.me.clone(),
        home: tempfile::tempdir().unwrap(),
    };
    self_caller_is_never_stronger(&w, &k).await;
    w.tg.stop().await;
}

/// What a self caller may do: rotate (expiry kept), revoke and DELETE tokens no stronger than it,
/// and revoke tokens that are only wider in scopes, networks, expiry or rate (revoking takes away).
#[tokio::test]
async fn a_self_token_may_rotate_and_revoke_what_is_no_stronger() {
    let w = world().await;
    let tg = &w.tg;
    for k in [Kind::Bearer(w.me.clone()), session(tg, &w.me).await] {
        let id = alice_token(tg, &format!("{}-rot", k.name()), |_| {});
        let old = tg.gw.store().get_token(&id).unwrap();
        let Outcome::Ok(v) = perform(tg, &k, &Op::Rotate(&id, json!({}))).await else {
            panic!("{}: rotate refused", k.name());
        };
        let new = tg.gw.store().find_token(v["id"].as_str().unwrap()).unwrap();
        assert_eq!(new.expires_at, old.expires_at, "rotation keeps the expiry");
        assert_eq!(new.permissions, old.permissions);
        let id = alice_token(tg, &format!("{}-del", k.name()), |_| {});
        let Outcome::Ok(v) = perform(tg, &k, &Op::Delete(&id)).await else {
            panic!("{}: DELETE refused", k.name());
        };
        assert_eq!(v, Value::Null, "204 has no body");
        assert!(tg.gw.store().get_token(&id).unwrap().revoked_at.is_some());
    }
    let k = Kind::Bearer(w.me.clone());
    for (attr, id) in w
        .wide
        .iter()
        .filter(|(a, _)| *a != "tokengate" && *a != "permissions")
    {
        let Outcome::Ok(v) = perform(tg, &k, &Op::Revoke(id)).await else {
            panic!("revoking a token wider in {attr} is refused");
        };
        assert_eq!(v["status"], "revoked", "{attr}");
    }
    w.tg.stop().await;
}

/// An admin may exceed itself, but only within policy; its rotation keeps the expiry unless it
/// asks for a new lifetime explicitly.
#[tokio::test]
async fn an_admin_may_exceed_itself_within_policy() {
    let w = world().await;
    let tg = &w.tg;
    let k = Kind::Bearer(w.root.clone());
    let Outcome::Ok(t) = perform(
        tg,
        &k,
        &Op::Create(
            json!({"account": "alice", "name": "big", "permissions": ["*", "env:read"],
            "expires": "never", "rate": "100000/100000", "allowed_cidrs": ["0.0.0.0/0"]}),
        ),
    )
    .await
    else {
        panic!("admin refused");
    };
    assert_eq!(t["expires_at"], Value::Null);
    // Policy still binds: 365d is not in tokens.allowed_expiry (400, not 403).
    let r = client()
        .post(format!("http://{}/v1/tokens", tg.admin_addr))
        .bearer_auth(&w.root)
        .json(&with("too-long", "expires", json!("365d")))
        .send()
        .await
        .unwrap();
    assert_error_message(r, 400, "not allowed by policy").await;
    // Rotating the strongest token keeps its expiry; a new lifetime only when asked.
    let star = &w.wide[0].1;
    let old = tg.gw.store().get_token(star).unwrap();
    let Outcome::Ok(v) = perform(tg, &k, &Op::Rotate(star, json!({}))).await else {
        panic!()
    };
    let new = tg.gw.store().find_token(v["id"].as_str().unwrap()).unwrap();
    assert_eq!(new.expires_at, old.expires_at);
    let Outcome::Ok(v) = perform(tg, &k, &Op::Rotate(&new.id, json!({"expires": "30d"}))).await
    else {
        panic!()
    };
    let newer = tg.gw.store().find_token(v["id"].as_str().unwrap()).unwrap();
    assert_eq!(newer.expires_at, Some(newer.created_at + 30 * DAY));
    // Revoke and DELETE work on anything.
    assert!(matches!(
        perform(tg, &k, &Op::Delete(&w.wide[1].1)).await,
        Outcome::Ok(_)
    ));
    assert!(matches!(
        perform(tg, &k, &Op::Revoke(&w.me_id)).await,
        Outcome::Ok(_)
    ));
    assert!(refused_events(tg).await.is_empty());
    w.tg.stop().await;
}

/// Issue 14 item 1, exactly: a `tokengate:self` token rotates a token of its own account that
/// holds `*` and would receive the successor's plaintext. Now: 403, nothing issued.
#[tokio::test]
async fn issue_14_item_1_repro() {
    let tg = TestGateway::start().await;
    let (me, _) = tg.token("alice", "me", &["tokengate:self"]);
    let (_, star) = tg.token("alice", "star", &["*"]);
    let r = client()
        .post(format!("http://{}/v1/tokens/{star}/rotate", tg.admin_addr))
        .bearer_auth(&me)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "forbidden");
    assert!(
        v["message"].as_str().unwrap().contains("tokengate: "),
        "{v}"
    );
    assert!(v.get("token").is_none(), "no plaintext: {v}");
    let rows = tg
        .gw
        .store()
        .list_tokens(Some("alice"), true, tg.gw.now_ms())
        .unwrap();
    assert_eq!(rows.len(), 2, "no successor");
    assert!(rows.iter().all(|t| t.rotation_deadline.is_none()));
    let e = refused_events(&tg).await;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["target"], star.as_str());
    assert_eq!(e[0]["details"]["operation"], "rotate");
    tg.stop().await;
}

/// Issue 14 item 3, exactly: a self token expiring in 7 days with 2 requests/s creates a child
/// that never expires, has 100000/s and holds `tokengate:self`; and rotation restarted the full
/// lifetime. Now: the child is refused (expiry, then rate), a child leaving them unsaid gets the
/// caller's, and rotating itself keeps its expiry.
#[tokio::test]
async fn issue_14_item_3_repro() {
    let tg = TestGateway::start().await;
    let (me, me_id) = tg.token_with("alice", "me", &["tokengate:self"], |s| {
        s.expires_at = Some(tg.gw.now_ms() + 7 * DAY);
        s.rate = Some(rate(2.0, 2));
    });
    let a = client();
    let post = |path: String, body: Value| {
        a.post(format!("http://{}{path}", tg.admin_addr))
            .bearer_auth(&me)
            .json(&body)
            .send()
    };
    let child = json!({"name": "child", "permissions": ["tokengate:self"], "expires": "never",
        "rate": "100000/100000"});
    let r = post("/v1/tokens".into(), child).await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().starts_with("expiry: "),
        "{v}"
    );
    let child =
        json!({"name": "child", "permissions": ["tokengate:self"], "rate": "100000/100000"});
    let r = post("/v1/tokens".into(), child).await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().starts_with("rate: "), "{v}");
    let r = post(
        "/v1/tokens".into(),
        json!({"name": "child", "permissions": ["tokengate:self"]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let me_row = tg.gw.store().get_token(&me_id).unwrap();
    let child = tg.gw.store().get_token(v["id"].as_str().unwrap()).unwrap();
    assert_eq!(child.expires_at, me_row.expires_at);
    assert_eq!(child.rate, Some(rate(2.0, 2)));
    // Rotation keeps the expiry, so holding a token never extends it.
    tg.gw.clock().advance_ms(3 * DAY);
    let r = post(format!("/v1/tokens/{me_id}/rotate"), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let succ = tg.gw.store().get_token(v["id"].as_str().unwrap()).unwrap();
    assert_eq!(succ.expires_at, me_row.expires_at);
    let r = post(
        format!("/v1/tokens/{me_id}/rotate"),
        json!({"expires": "7d"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403, "a new lifetime is for admins only");
    tg.stop().await;
}
