//! Web UI sessions live in the store: a session survives a gateway restart on SQLite, and on
//! PostgreSQL a second replica sees it (and its revocation) at once. Also the OpenID provider's
//! key cache: an unknown `kid` refetches the JWKS, at most once a minute on the gateway's clock.
//!
//! The PostgreSQL test needs `TOKENGATE_TEST_PG_URL` (`eval "$(bash tests/support/services.sh
//! start)"`, which `.ci/run` does) and fails when it is missing: it never skips.

#[path = "support/services.rs"]
mod services;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// One gateway process-in-a-task on a config file; stopped on drop.
struct Gw {
    run: support::Running,
}

impl Gw {
    /// `audit` is the audit file's name: a restarted gateway takes a new one, as the old
    /// writer may still hold its lock while it finishes.
    async fn start(dir: &Path, store: &str, audit: &str) -> Gw {
        let o = support::Options {
            store: Some(store.into()),
            audit_path: Some(audit.into()),
            sections: support::failed_auth_limit(1_000_000),
            rules: String::new(),
            ..support::Options::default()
        };
        let config = support::write_config(dir, "127.0.0.1:9", &o);
        Gw {
            run: support::Running::start(&config).await,
        }
    }

    async fn stop(self) {
        self.run.stop().await
    }

    /// Signs in with `token`; returns (cookie header value, CSRF token).
    async fn sign_in(&self, token: &str) -> (String, String) {
        let origin = format!("http://{}", self.run.admin);
        support::sign_in_session(&support::client(), &origin, token).await
    }

    /// `GET /v1/whoami` with the session `cookie` and `csrf` token: (status, body).
    async fn whoami(&self, cookie: &str, csrf: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, "/v1/whoami", cookie, csrf)
            .await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        cookie: &str,
        csrf: &str,
    ) -> (u16, Value) {
        let r = support::client()
            .request(method, format!("http://{}{path}", self.run.admin))
            .header("cookie", cookie)
            .header("x-csrf-token", csrf)
            .header("origin", format!("http://{}", self.run.admin))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    fn token(&self, account: &str) -> String {
        let store = self.run.gw.store();
        let now = tokengate::store::system_now_ms();
        let _ = store.create_account(account, None, "test", now);
        let spec = support::token_spec(account, "ui", &["tokengate:self"], Some(now + 86_400_000));
        store
            .create_token(&spec, "tg", 100, now)
            .unwrap()
            .1
            .plaintext
    }
}

#[tokio::test]
async fn a_session_survives_a_restart_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = "path = \"tokengate.db\"";
    let a = Gw::start(dir.path(), store, "audit.log").await;
    let token = a.token("alice");
    let (cookie, csrf) = a.sign_in(&token).await;
    assert_eq!(a.whoami(&cookie, &csrf).await.0, 200);
    a.stop().await;

    let b = Gw::start(dir.path(), store, "audit-2.log").await;
    let (s, me) = b.whoami(&cookie, &csrf).await;
    assert_eq!((s, me["account"].as_str()), (200, Some("alice")), "{me}");
    let (s, l) = b
        .call(reqwest::Method::GET, "/v1/sessions", &cookie, &csrf)
        .await;
    assert_eq!(s, 200);
    assert_eq!(l["sessions"][0]["current"], true);
    // The CSRF token survived too: a mutation works, and signs out everywhere.
    let (s, r) = b
        .call(
            reqwest::Method::POST,
            "/v1/sessions/revoke-all",
            &cookie,
            &csrf,
        )
        .await;
    assert_eq!((s, r["revoked"].as_u64()), (200, Some(1)), "{r}");
    assert_eq!(b.whoami(&cookie, &csrf).await.0, 401);
    // The store never held the cookie's value.
    let db = std::fs::read(dir.path().join("tokengate.db")).unwrap();
    let id = cookie.split_once('=').unwrap().1;
    assert!(!db.windows(id.len()).any(|w| w == id.as_bytes()));
    b.stop().await;
}

#[tokio::test]
async fn a_second_replica_on_postgresql_sees_sessions_and_their_revocation() {
    let db = services::PgDb::create().expect(
        "TOKENGATE_TEST_PG_URL is not set: this test needs a real PostgreSQL; start one with \
         `eval \"$(bash tests/support/services.sh start)\"`",
    );
    let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = format!("url = \"{}\"", db.url);
    let a = Gw::start(da.path(), &store, "audit.log").await;
    let b = Gw::start(dbb.path(), &store, "audit.log").await;
    let token = a.token("alice");
    let (cookie, csrf) = a.sign_in(&token).await;
    let (s, me) = b.whoami(&cookie, &csrf).await;
    assert_eq!(
        (s, me["account"].as_str()),
        (200, Some("alice")),
        "replica b: {me}"
    );
    let (_, l) = b
        .call(reqwest::Method::GET, "/v1/sessions", &cookie, &csrf)
        .await;
    let id = l["sessions"][0]["id"].as_str().unwrap().to_string();
    // Revoked on b: a refuses it at once.
    let (s, _) = b
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/sessions/{id}"),
            &cookie,
            &csrf,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(a.whoami(&cookie, &csrf).await.0, 401);
    let log = std::fs::read_to_string(dbb.path().join("audit.log")).unwrap();
    assert!(log.contains("\"session.revoked\""));
    let store = b.run.gw.store().clone();
    tokio::task::spawn_blocking(move || sign_ins_are_taken_once_and_bounded(&store))
        .await
        .unwrap();
    a.stop().await;
    b.stop().await;
}

/// Sign-ins in progress: taken once, bounded, swept when expired.
fn sign_ins_are_taken_once_and_bounded(store: &tokengate::store::Store) {
    let l = |n: u8, expires_at: i64| tokengate::store::LoginState {
        state_hash: format!("{n:064x}"),
        binding_hash: "b".repeat(64),
        nonce: "n".into(),
        verifier: "v".into(),
        return_to: "/".into(),
        expires_at,
    };
    assert!(store.login_put(&l(1, 1_000), 2).unwrap());
    assert!(store.login_put(&l(2, 5_000), 2).unwrap());
    assert!(
        !store.login_put(&l(3, 5_000), 2).unwrap(),
        "the table is bounded"
    );
    assert_eq!(
        store
            .login_take(&l(1, 0).state_hash)
            .unwrap()
            .unwrap()
            .expires_at,
        1_000
    );
    assert!(
        store.login_take(&l(1, 0).state_hash).unwrap().is_none(),
        "taken once"
    );
    assert!(store.login_put(&l(3, 5_000), 2).unwrap(), "room again");
    store.session_purge(5_000, 0).unwrap();
    assert!(
        store.login_take(&l(2, 0).state_hash).unwrap().is_none(),
        "expired: swept"
    );
    assert!(store.login_take(&l(3, 0).state_hash).unwrap().is_none());
}

#[test]
fn sign_ins_in_progress_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = tokengate::store::Store::open(
        &dir.path().join("t.db"),
        std::time::Duration::from_millis(250),
    )
    .unwrap();
    sign_ins_are_taken_once_and_bounded(&store);
}

/// A JWKS endpoint that counts its fetches.
async fn jwks_server(hits: Arc<AtomicUsize>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    support::tcp_server(move |mut s| {
        let hits = hits.clone();
        async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let n = hits.fetch_add(1, Ordering::SeqCst);
                let body = format!(
                    "{{\"keys\":[{{\"kty\":\"EC\",\"kid\":\"k{n}\",\"crv\":\"P-256\",\"x\":\"Q-oX_W-3D_2zJwUzXHHb9cBo8gKZReJilVz_cWOH8m0\",\"y\":\"jn_msv9tAV9B32sye5J3mJEYE3lYOx1STxAHb_a2tu0\"}}]}}"
                );
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
        }
    })
    .await
}

#[tokio::test]
async fn an_unknown_key_refetches_the_jwks_at_most_once_a_minute() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = jwks_server(hits.clone()).await;
    let m: tokengate::admin::oidc::Metadata = serde_json::from_value(serde_json::json!({
        "issuer": format!("http://{addr}"),
        "authorization_endpoint": format!("http://{addr}/auth"),
        "token_endpoint": format!("http://{addr}/token"),
        "jwks_uri": format!("http://{addr}/jwks"),
    }))
    .unwrap();
    let cache = tokengate::admin::oidc::ProviderCache::default();
    let kid = |k: &jsonwebtoken::jwk::JwkSet| k.keys[0].common.key_id.clone().unwrap();
    let t0 = 1_000_000;
    assert_eq!(kid(&cache.keys(&m, t0, false).await.unwrap()), "k0");
    assert_eq!(
        kid(&cache.keys(&m, t0 + 5, false).await.unwrap()),
        "k0",
        "cached"
    );
    // Unknown kid right after a fetch: no new fetch (a flood of bad kids cannot hammer the IdP).
    assert_eq!(kid(&cache.keys(&m, t0 + 10, true).await.unwrap()), "k0");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // A minute later: the rotated keys are fetched.
    let later = t0 + tokengate::admin::oidc::JWKS_REFETCH_MS;
    assert_eq!(kid(&cache.keys(&m, later, true).await.unwrap()), "k1");
    assert_eq!(kid(&cache.keys(&m, later + 1, true).await.unwrap()), "k1");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
