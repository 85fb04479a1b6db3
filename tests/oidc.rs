//! Sign-in with OpenID Connect against a real provider: the certified `oidc-provider` package,
//! run by node from tests/oidc (`run.sh` installs it from the committed lock file). The test plays
//! the browser over HTTP: it follows redirects by hand, keeps the cookies of each host, and types
//! a login name into the provider's page.
//!
//! Covered: the whole code flow with PKCE; a person issuing tokens for their own account within
//! their policy and the cap; an admin by group; the sessions API (list, revoke one, sign out
//! everywhere) and idle expiry on the gateway's clock; and the attacks: forged or replayed
//! `state`, a callback in another browser, a replayed code, a mismatched PKCE verifier, session
//! fixation, an open redirect in the return path, an email domain that is not allowed, an
//! unverified email. Every refusal leaves no session and is audited; nothing reaches upstream.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use reqwest::Method;
use serde_json::Value;
use support::{Options, TestGateway};

/// The provider of tests/oidc, killed on drop.
struct Provider {
    child: tokio::process::Child,
    issuer: String,
}

impl Provider {
    async fn start() -> Provider {
        // No skip: CI installs node (.ci/run); a machine without it fails here, saying so.
        let (child, port) = support::start_listening_script(
            "tests/oidc/run.sh",
            std::time::Duration::from_secs(180),
            "the OpenID provider (is node installed? .ci/run installs it)",
        )
        .await;
        Provider {
            child,
            issuer: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn oidc_section(issuer: &str, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    let secret = dir.join("client-secret");
    std::fs::write(&secret, "tokengate-test-secret\n").unwrap();
    format!(
        r#"[tokens]
max_active_per_account = 2

[admin.oidc]
issuer = "{issuer}"
client_id = "tokengate"
client_secret_file = "{secret}"
allowed_email_domains = ["example.com"]
admin_groups = ["platform-admins"]
create_accounts = true
self_role = "viewer"
{extra}
"#,
        secret = secret.display()
    )
}

async fn gateway(p: &Provider, extra: &str) -> TestGateway {
    TestGateway::start_with(Options {
        sections: oidc_section(&p.issuer, extra),
        ..Options::default()
    })
    .await
}

/// A fresh provider (kept alive by the caller) and a [`gateway`] signing in with it.
async fn provider_and_gateway() -> (Provider, TestGateway) {
    let p = Provider::start().await;
    let tg = gateway(&p, "").await;
    (p, tg)
}

/// A browser: cookies per host (name → value), redirects followed by hand.
struct Browser {
    c: reqwest::Client,
    jar: BTreeMap<String, BTreeMap<String, String>>,
}

/// One answer: status, headers, body, and the URL it came from.
struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
    url: String,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            c: support::client(),
            jar: BTreeMap::new(),
        }
    }

    /// A new browser signed in (200) as `login`.
    async fn signed_in(tg: &TestGateway, login: &str) -> Browser {
        let mut b = Browser::new();
        assert_eq!(b.sign_in(tg, login).await.status, 200, "{login} signs in");
        b
    }

    fn host(url: &str) -> String {
        url.split('/').nth(2).unwrap_or("").to_string()
    }

    fn cookie_header(&self, url: &str) -> String {
        self.jar
            .get(&Self::host(url))
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    }

    fn keep(&mut self, url: &str, h: &reqwest::header::HeaderMap) {
        for v in h.get_all("set-cookie") {
            let s = v.to_str().unwrap();
            let (kv, attrs) = s.split_once(';').unwrap_or((s, ""));
            let (k, v) = kv.split_once('=').unwrap();
            let m = self.jar.entry(Self::host(url)).or_default();
            if attrs.contains("Max-Age=0") || attrs.contains("expires=Thu, 01 Jan 1970") {
                m.remove(k.trim());
            } else {
                m.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }

    /// The gateway's session cookie value, if any.
    fn session(&self, tg: &TestGateway) -> Option<String> {
        self.jar
            .get(&tg.admin_addr.to_string())
            .and_then(|m| m.get("tokengate_session").cloned())
    }

    async fn send(&mut self, method: Method, url: &str, form: Option<&str>) -> Page {
        let mut r = self.c.request(method, url);
        let ck = self.cookie_header(url);
        if !ck.is_empty() {
            r = r.header("cookie", ck);
        }
        if let Some(f) = form {
            r = r
                .header("content-type", "application/x-www-form-urlencoded")
                .body(f.to_string());
        }
        let resp = r.send().await.unwrap();
        let headers = resp.headers().clone();
        self.keep(url, &headers);
        Page {
            status: resp.status().as_u16(),
            headers,
            body: resp.text().await.unwrap(),
            url: url.to_string(),
        }
    }

    /// GET, following redirects until one leaves `stop_at_host` untouched (not followed).
    async fn follow(&mut self, url: &str, stop_before: Option<&str>) -> Page {
        let mut url = url.to_string();
        for _ in 0..10 {
            let p = self.send(Method::GET, &url, None).await;
            let Some(loc) = p
                .headers
                .get("location")
                .map(|v| v.to_str().unwrap().to_string())
            else {
                return p;
            };
            if !(300..400).contains(&p.status) {
                return p;
            }
            let next = if loc.starts_with('/') {
                format!("http://{}{loc}", Self::host(&url))
            } else {
                loc
            };
            if stop_before.is_some_and(|s| next.contains(s)) {
                return Page { url: next, ..p };
            }
            url = next;
        }
        panic!("too many redirects");
    }

    /// Starts a sign-in at the gateway and signs in at the provider as `login`; returns the
    /// callback URL the provider sends the browser to (not yet visited).
    async fn sign_in_at_provider(
        &mut self,
        tg: &TestGateway,
        login: &str,
        return_to: &str,
    ) -> String {
        let start = format!(
            "http://{}/oidc/login?return_to={}",
            tg.admin_addr,
            pct(return_to)
        );
        let page = self.follow(&start, None).await;
        assert_eq!(
            page.status, 200,
            "the provider's sign-in page: {}",
            page.body
        );
        let uid = page.url.rsplit('/').next().unwrap().to_string();
        let host = Self::host(&page.url);
        let posted = self
            .send(
                Method::POST,
                &format!("http://{host}/interaction/{uid}/login"),
                Some(&format!("login={login}")),
            )
            .await;
        assert_eq!(posted.status, 303, "{}", posted.body);
        let loc = posted.headers["location"].to_str().unwrap().to_string();
        let p = self.follow(&loc, Some("/oidc/callback")).await;
        assert!(p.url.contains("/oidc/callback?"), "{}", p.url);
        p.url
    }

    /// A full sign-in; returns the gateway's answer to the callback.
    async fn sign_in(&mut self, tg: &TestGateway, login: &str) -> Page {
        let cb = self.sign_in_at_provider(tg, login, "/").await;
        self.send(Method::GET, &cb, None).await
    }

    /// Issues a token through the API (`POST /v1/tokens` with `spec`).
    async fn issue(&mut self, tg: &TestGateway, spec: Value) -> (u16, Value) {
        self.api(tg, Method::POST, "/v1/tokens", Some(spec)).await
    }

    async fn api(
        &mut self,
        tg: &TestGateway,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("http://{}{path}", tg.admin_addr);
        let mut r = self
            .c
            .request(method.clone(), &url)
            .header("cookie", self.cookie_header(&url));
        if method != Method::GET {
            let csrf = self.page_csrf(tg).await;
            r = r
                .header("x-csrf-token", csrf)
                .header("origin", format!("http://{}", tg.admin_addr));
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        self.keep(&url, &headers);
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The CSRF token the page carries for this session.
    async fn page_csrf(&mut self, tg: &TestGateway) -> String {
        let p = self
            .send(Method::GET, &format!("http://{}/", tg.admin_addr), None)
            .await;
        let marker = "name=\"csrf-token\" content=\"";
        let at = p.body.find(marker).unwrap() + marker.len();
        p.body[at..].split('"').next().unwrap().to_string()
    }
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn query(url: &str, name: &str) -> String {
    url.split_once('?')
        .unwrap()
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap()
        .to_string()
}

async fn request_reason(tg: &TestGateway, path: &str) -> String {
    tg.last_line_for(path).await["reason"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_person_signs_in_and_issues_tokens_for_their_own_account_within_policy() {
    let (_provider, tg) = provider_and_gateway().await;
    // The page offers the provider's button.
    let mut b = Browser::new();
    let page = b
        .send(Method::GET, &format!("http://{}/", tg.admin_addr), None)
        .await;
    assert!(page.body.contains("name=\"oidc\" content=\"on\""));

    let r = b.sign_in(&tg, "ada").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("url=/\""), "back to the page: {}", r.body);
    let set: Vec<_> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        set.iter().any(|c| c.starts_with("tokengate_session=")
            && c.contains("HttpOnly")
            && c.contains("SameSite=Strict")),
        "{set:?}"
    );
    let cookie = b.session(&tg).expect("a session cookie");
    assert_eq!(cookie.len(), 64);

    let (s, me) = b.api(&tg, Method::GET, "/v1/whoami", None).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(
        (
            me["account"].as_str(),
            me["access"].as_str(),
            me["auth_type"].as_str()
        ),
        (Some("ada@example.com"), Some("self"), Some("session"))
    );
    assert_eq!(me["id"], "oidc:ada@example.com");
    assert_eq!(me["person"]["sub"], "ada");

    // Their policy is the `viewer` role: a viewer token is fine, a deployer token is stronger.
    let (s, t) = b
        .issue(&tg, serde_json::json!({"name": "laptop", "role": "viewer"}))
        .await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["account"], "ada@example.com");
    assert_eq!(t["created_by"], "oidc:ada@example.com");
    let (s, e) = b
        .issue(
            &tg,
            serde_json::json!({"name": "deploy", "role": "deployer"}),
        )
        .await;
    assert_eq!((s, e["error"].as_str()), (403, Some("forbidden")), "{e}");
    let (s, e) = b
        .issue(
            &tg,
            serde_json::json!({"name": "other", "account": "someone-else"}),
        )
        .await;
    assert_eq!(s, 403, "another account: {e}");
    // Up to the cap (2 in this test), then 409 token_limit.
    let (s, _) = b
        .issue(&tg, serde_json::json!({"name": "ci", "role": "viewer"}))
        .await;
    assert_eq!(s, 201);
    let (s, e) = b
        .issue(&tg, serde_json::json!({"name": "third", "role": "viewer"}))
        .await;
    assert_eq!((s, e["error"].as_str()), (409, Some("token_limit")), "{e}");
    let (s, list) = b.api(&tg, Method::GET, "/v1/tokens", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["tokens"].as_array().unwrap().len(), 2);
    // The issued token works on the public listener, within viewer.
    let tok = t["token"].as_str().unwrap();
    // The browser's gateway cookies (session and sign-in binding) never reach the upstream.
    let r = support::client()
        .get(tg.url("/apps/billing/status"))
        .bearer_auth(tok)
        .header(
            "cookie",
            format!("tokengate_session={cookie}; tokengate_oidc=x; theme=dark"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(tg.upstream.received()[0].headers["cookie"], "theme=dark");

    // Audited: the account's creation, the session, and the token, all naming the person.
    let created = tg.admin_events("session.created").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["auth_type"], "session");
    assert_eq!(created[0]["actor"], "oidc:ada@example.com");
    assert_eq!(created[0]["details"]["sub"], "ada");
    assert_eq!(created[0]["details"]["email"], "ada@example.com");
    // The target is the account id (as for the CLI and the admin API), the name is `account`.
    let acc_created = &tg.admin_events("account.created").await[0];
    assert_eq!(acc_created["account"], "ada@example.com");
    assert_eq!(acc_created["target"], acc_created["details"]["account_id"]);
    assert!(
        acc_created["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("acc_")),
        "{acc_created}"
    );
    let tc = tg.admin_events("token.created").await;
    assert_eq!(tc[0]["actor"], "oidc:ada@example.com");
    assert_eq!(tc[0]["details"]["email"], "ada@example.com");
    let log = std::fs::read_to_string(tg.dir.path().join("audit.log")).unwrap();
    assert!(
        !log.contains(&cookie) && !log.contains(tok),
        "no session id or token in the log"
    );

    // An admin by group sees every account.
    let mut root = Browser::signed_in(&tg, "root").await;
    let (s, me) = root.api(&tg, Method::GET, "/v1/whoami", None).await;
    assert_eq!((s, me["access"].as_str()), (200, Some("admin")));
    let (s, all) = root
        .api(&tg, Method::GET, "/v1/tokens?account=ada@example.com", None)
        .await;
    assert_eq!(
        (s, all["tokens"].as_array().map(Vec::len)),
        (200, Some(2)),
        "{all}"
    );
    assert_eq!(
        tg.upstream.count(),
        1,
        "only the token's own call went upstream"
    );

    // Disabling the person's account ends their session, and they cannot sign in again.
    tg.gw
        .store()
        .disable_account("ada@example.com", "test", tg.gw.now_ms())
        .unwrap();
    let (s, e) = b.api(&tg, Method::GET, "/v1/whoami", None).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (401, Some("not_signed_in")),
        "{e}"
    );
    assert_eq!(b.sign_in(&tg, "ada").await.status, 403);
    assert_eq!(
        request_reason(&tg, "/oidc/callback").await,
        "account_disabled"
    );
    tg.stop().await;
}

#[tokio::test]
async fn sessions_are_listed_revoked_signed_out_everywhere_and_expire() {
    let (_provider, tg) = provider_and_gateway().await;
    let (mut one, mut two) = (Browser::new(), Browser::new());
    assert_eq!(one.sign_in(&tg, "ada").await.status, 200);
    assert_eq!(two.sign_in(&tg, "ada").await.status, 200);
    let (s, l) = one.api(&tg, Method::GET, "/v1/sessions", None).await;
    assert_eq!(s, 200);
    let list = l["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{l}");
    assert_eq!(list.iter().filter(|s| s["current"] == true).count(), 1);
    assert!(
        !l.to_string().contains(&one.session(&tg).unwrap()),
        "no session id in the list"
    );
    let other = list.iter().find(|s| s["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Revoke the other browser's session: it is signed out at once.
    let (s, _) = one
        .api(&tg, Method::DELETE, &format!("/v1/sessions/{other}"), None)
        .await;
    assert_eq!(s, 204);
    assert_eq!(two.api(&tg, Method::GET, "/v1/whoami", None).await.0, 401);
    let rev = tg.admin_events("session.revoked").await;
    assert_eq!(
        (rev[0]["target"].as_str(), rev[0]["auth_type"].as_str()),
        (Some(other.as_str()), Some("session"))
    );
    assert_eq!(rev[0]["details"]["email"], "ada@example.com");
    // A session of someone else is not found for a person (they see only their own).
    let mut root = Browser::signed_in(&tg, "root").await;
    let (_, rl) = root.api(&tg, Method::GET, "/v1/sessions", None).await;
    let root_sess = rl["sessions"][0]["id"].as_str().unwrap().to_string();
    let (s, _) = one
        .api(
            &tg,
            Method::DELETE,
            &format!("/v1/sessions/{root_sess}"),
            None,
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(root.api(&tg, Method::GET, "/v1/whoami", None).await.0, 200);

    // Sign out everywhere.
    assert_eq!(two.sign_in(&tg, "ada").await.status, 200);
    let (s, r) = one
        .api(&tg, Method::POST, "/v1/sessions/revoke-all", None)
        .await;
    assert_eq!((s, r["revoked"].as_u64()), (200, Some(2)), "{r}");
    assert_eq!(one.api(&tg, Method::GET, "/v1/whoami", None).await.0, 401);
    assert_eq!(two.api(&tg, Method::GET, "/v1/whoami", None).await.0, 401);

    // Idle expiry on the gateway's clock, audited.
    assert_eq!(one.sign_in(&tg, "ada").await.status, 200);
    let idle = tg.gw.config().admin.session_idle_timeout.as_millis() as i64;
    tg.gw.clock().advance_ms(idle + 1);
    assert_eq!(one.api(&tg, Method::GET, "/v1/whoami", None).await.0, 401);
    let exp = tg.admin_events("session.expired").await;
    assert_eq!(
        (exp[0]["reason"].as_str(), exp[0]["auth_type"].as_str()),
        (Some("idle_timeout"), Some("session"))
    );
    assert_eq!(exp[0]["actor"], "oidc:ada@example.com");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn the_absolute_lifetime_ends_a_busy_session() {
    let (_provider, tg) = provider_and_gateway().await;
    let mut b = Browser::signed_in(&tg, "ada").await;
    let abs = tg.gw.config().admin.session_absolute_timeout.as_millis() as i64;
    let idle = tg.gw.config().admin.session_idle_timeout.as_millis() as i64;
    let mut t = 0;
    while t + idle / 2 < abs {
        tg.gw.clock().advance_ms(idle / 2);
        t += idle / 2;
        assert_eq!(
            b.api(&tg, Method::GET, "/v1/whoami", None).await.0,
            200,
            "used within the idle time at +{t} ms"
        );
    }
    tg.gw.clock().advance_ms(abs - t);
    assert_eq!(b.api(&tg, Method::GET, "/v1/whoami", None).await.0, 401);
    assert_eq!(
        tg.admin_events("session.expired").await[0]["reason"],
        "absolute_timeout"
    );
    tg.stop().await;
}

#[tokio::test]
async fn forged_replayed_and_foreign_callbacks_are_refused() {
    let (_provider, tg) = provider_and_gateway().await;
    let cb_path = "/oidc/callback";

    // A forged state (never issued): 400, no session.
    let mut b = Browser::new();
    let cb = b.sign_in_at_provider(&tg, "ada", "/").await;
    let forged = cb.replace(&query(&cb, "state"), &"f".repeat(64));
    let r = b.send(Method::GET, &forged, None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("invalid_state"));
    assert!(b.session(&tg).is_none());
    assert_eq!(request_reason(&tg, cb_path).await, "oidc_invalid_state");

    // The right state from another browser (no binding cookie): refused, and the state is spent.
    let mut thief = Browser::new();
    let r = thief.send(Method::GET, &cb, None).await;
    assert_eq!(r.status, 400);
    assert!(thief.session(&tg).is_none());
    let r = b.send(Method::GET, &cb, None).await;
    assert_eq!(
        r.status, 400,
        "a state is taken once, even by a refused callback"
    );

    // A good sign-in, then the same callback replayed: refused.
    let mut b = Browser::new();
    let cb = b.sign_in_at_provider(&tg, "ada", "/").await;
    assert_eq!(b.send(Method::GET, &cb, None).await.status, 200);
    let first = b.session(&tg).unwrap();
    let r = b.send(Method::GET, &cb, None).await;
    assert_eq!(r.status, 400, "replayed callback");
    assert_eq!(b.session(&tg).unwrap(), first);

    // A used code under a fresh state of the same browser: the provider refuses the code.
    let cb2 = b.sign_in_at_provider(&tg, "ada", "/").await;
    let replay = cb2.replace(&query(&cb2, "code"), &query(&cb, "code"));
    let r = b.send(Method::GET, &replay, None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(request_reason(&tg, cb_path).await, "oidc_code_refused");

    // Mismatched PKCE: two sign-ins started; A's fresh code redeemed under B's state (and so
    // with B's verifier) is refused by the provider.
    let mut c = Browser::new();
    let cb_a = c.sign_in_at_provider(&tg, "ada", "/").await;
    let cb_b = c.sign_in_at_provider(&tg, "ada", "/").await;
    let mixed = cb_b.replace(&query(&cb_b, "code"), &query(&cb_a, "code"));
    let r = c.send(Method::GET, &mixed, None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(request_reason(&tg, cb_path).await, "oidc_code_refused");
    assert!(c.session(&tg).is_none());

    assert_eq!(
        tg.admin_events("session.created").await.len(),
        1,
        "only the one good sign-in"
    );
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn sign_in_starts_a_new_session_and_never_redirects_off_site() {
    let (_provider, tg) = provider_and_gateway().await;
    // Session fixation: a session cookie planted before sign-in is not the one after it, and a
    // session the browser held ends.
    let mut b = Browser::new();
    let host = tg.admin_addr.to_string();
    b.jar
        .entry(host.clone())
        .or_default()
        .insert("tokengate_session".into(), "a".repeat(64));
    assert_eq!(b.sign_in(&tg, "ada").await.status, 200);
    let s1 = b.session(&tg).unwrap();
    assert_ne!(s1, "a".repeat(64));
    assert_eq!(b.sign_in(&tg, "ada").await.status, 200);
    let s2 = b.session(&tg).unwrap();
    assert_ne!(s1, s2, "each sign-in gets a new id");
    let mut old = Browser::new();
    old.jar
        .entry(host)
        .or_default()
        .insert("tokengate_session".into(), s1);
    assert_eq!(
        old.api(&tg, Method::GET, "/v1/whoami", None).await.0,
        401,
        "the replaced session ended"
    );

    // Open redirect: the return path stays on this listener.
    for evil in [
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
    ] {
        let mut b = Browser::new();
        let cb = b.sign_in_at_provider(&tg, "ada", evil).await;
        let r = b.send(Method::GET, &cb, None).await;
        assert_eq!(r.status, 200);
        assert!(
            r.body.contains("url=/\"") && !r.body.contains("evil"),
            "{evil}: {}",
            r.body
        );
    }
    let mut b = Browser::new();
    let cb = b.sign_in_at_provider(&tg, "ada", "/#sessions-h").await;
    assert!(
        b.send(Method::GET, &cb, None)
            .await
            .body
            .contains("url=/#sessions-h\"")
    );
    tg.stop().await;
}

#[tokio::test]
async fn people_outside_the_policy_cannot_sign_in() {
    let (p, tg) = provider_and_gateway().await;
    for (login, reason) in [
        ("mallory", "oidc_domain_not_allowed"),
        ("unverified", "oidc_email_unverified"),
    ] {
        let mut b = Browser::new();
        let r = b.sign_in(&tg, login).await;
        assert_eq!(r.status, 403, "{login}: {}", r.body);
        assert!(r.body.contains("sign_in_refused"));
        assert!(b.session(&tg).is_none());
        assert_eq!(request_reason(&tg, "/oidc/callback").await, reason);
    }
    assert!(tg.admin_events("session.created").await.is_empty());
    assert!(
        tg.gw.store().get_account("mallory@evil.example").is_err(),
        "no account made"
    );
    tg.stop().await;

    // Without create_accounts, a person with no account is refused; with default_access = "none"
    // only admins get in.
    let tg = TestGateway::start_with(Options {
        sections: oidc_section(&p.issuer, "")
            .replace("create_accounts = true", "default_access = \"none\""),
        ..Options::default()
    })
    .await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&tg, "ada").await.status, 403);
    assert_eq!(
        request_reason(&tg, "/oidc/callback").await,
        "oidc_no_access"
    );
    let mut r = Browser::new();
    assert_eq!(
        r.sign_in(&tg, "root").await.status,
        403,
        "admins need an account too"
    );
    assert_eq!(
        request_reason(&tg, "/oidc/callback").await,
        "oidc_no_account"
    );
    tg.account("root@example.com");
    assert_eq!(r.sign_in(&tg, "root").await.status, 200);
    tg.stop().await;
}

#[tokio::test]
async fn without_admin_oidc_the_routes_are_not_found() {
    let tg = TestGateway::start().await;
    let addr: SocketAddr = tg.admin_addr;
    let r = support::client()
        .get(format!("http://{addr}/oidc/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let page = support::client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap();
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("name=\"oidc\" content=\"\"")
    );
    tg.stop().await;
}
