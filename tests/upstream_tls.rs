//! TLS to upstreams (issue 17): a real rustls upstream with certificates made here (a CA, server
//! certificates, a client certificate). Verified requests go through; a wrong CA, a wrong name or a
//! missing client certificate answer 502 `upstream_tls_error` with nothing reaching the handler;
//! HTTP/2 through ALPN when the route asks for it; connections and sessions reused (counted at the
//! upstream); config errors; a reload reading new files.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokengate::config::{Config, UpstreamConnector, UpstreamTlsOptions};
use tokengate::pool::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

// ---------------------------------------------------------------- certificates

/// A CA that signs leaf certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses), server or client.
    fn leaf(&self, cn: &str, names: &[&str], client: bool) -> Leaf {
        self.leaf_with(cn, names, client, |_| {})
    }

    /// [`leaf`](Self::leaf), its parameters adjusted by `adjust` (validity dates).
    fn leaf_with(
        &self,
        cn: &str,
        names: &[&str],
        client: bool,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        adjust(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }
}

// ---------------------------------------------------------------- the TLS upstream

/// One request as the TLS upstream's handler saw it.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    method: String,
    path: String,
    /// `Host` header on HTTP/1.1, `:authority` on HTTP/2.
    authority: String,
    /// The peer presented a client certificate.
    client_cert: bool,
}

/// A rustls upstream (HTTP/1.1 and h2 through ALPN) counting TCP connections, completed and
/// resumed handshakes, and recording what reached its handler.
#[derive(Clone)]
struct TlsUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
    resumed: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct UpstreamSetup<'a> {
    leaf: &'a Leaf,
    /// Require a client certificate signed by this CA.
    client_ca: Option<&'a Ca>,
    /// Answer `Connection: close` (each request on a new connection).
    close: bool,
}

impl TlsUpstream {
    /// An upstream serving `leaf`, asking no client certificate, keeping connections open.
    async fn serving(leaf: &Leaf) -> TlsUpstream {
        TlsUpstream::start(UpstreamSetup {
            leaf,
            client_ca: None,
            close: false,
        })
        .await
    }

    /// An upstream serving `leaf` that requires a client certificate signed by `client_ca`.
    async fn requiring_client_certs(leaf: &Leaf, client_ca: &Ca) -> TlsUpstream {
        TlsUpstream::start(UpstreamSetup {
            leaf,
            client_ca: Some(client_ca),
            close: false,
        })
        .await
    }

    /// `https://{host}:{port}`: this upstream, reached by the name `host`.
    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    async fn start(s: UpstreamSetup<'_>) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match s.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.cert.der().clone()).unwrap();
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let chain = CertificateDer::pem_slice_iter(s.leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(s.leaf.key_pem.as_bytes()).unwrap();
        let mut cfg = builder.with_single_cert(chain, key).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));

        let (listener, addr) = loopback_listener().await;
        let up = TlsUpstream {
            addr,
            accepted: Arc::default(),
            handshakes: Arc::default(),
            resumed: Arc::default(),
            failed: Arc::default(),
            seen: Arc::default(),
        };
        let close = s.close;
        let me = up.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                me.accepted.fetch_add(1, Ordering::SeqCst);
                let me = me.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move { me.serve(acceptor, tcp, close).await });
            }
        });
        up
    }

    async fn serve(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: tokio::net::TcpStream,
        close: bool,
    ) {
        let tls = match acceptor.accept(tcp).into_fallible().await {
            Ok(tls) => tls,
            Err((e, mut tcp)) => {
                // rustls already sent its alert: close our side cleanly (FIN, not RST) so the
                // client reads the alert, and drain what it sent meanwhile.
                self.failed.lock().unwrap().push(e.to_string());
                let _ = tcp.shutdown().await;
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return;
            }
        };
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        let (_, conn) = tls.get_ref();
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::SeqCst);
        }
        let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
        let seen = self.seen.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let authority = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| req.uri().authority().map(|a| a.to_string()))
                    .unwrap_or_default();
                seen.lock().unwrap().push(Seen {
                    version: req.version(),
                    method: req.method().to_string(),
                    path: req.uri().path().to_string(),
                    authority,
                    client_cert,
                });
                let _ = req.into_body().collect().await;
                let mut resp = Response::new(Full::new(Bytes::from_static(b"tls upstream ok")));
                if close {
                    resp.headers_mut()
                        .insert(http::header::CONNECTION, "close".parse().unwrap());
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), svc)
            .await;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.accepted.load(Ordering::SeqCst),
            self.handshakes.load(Ordering::SeqCst),
        )
    }
}

// ---------------------------------------------------------------- the gateway

/// A route `/tls` to `upstream` with `[routes.upstream_tls]` = `tls_table` (TOML lines).
fn tls_route(upstream: &str, tls_table: &str) -> Options {
    Options {
        extra_routes: format!(
            r#"
[[routes]]
name = "secure"
prefix = "/tls"
upstream = "{upstream}"

[routes.upstream_tls]
{tls_table}

[[routes.rules]]
methods = ["GET", "POST"]
path = "/tls/**"
permission = "apps:read"
"#
        ),
        ..Options::default()
    }
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

/// Sends `GET /tls/hello` with a valid token.
async fn get(tg: &TestGateway, tok: &str) -> (u16, String) {
    let r = get_bearer(&client(), tg.url("/tls/hello"), tok).await;
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// [`assert_tls_refusal`], and nothing reached `up`'s handler.
async fn assert_refused_unseen(tg: &TestGateway, tok: &str, up: &TlsUpstream) {
    assert_tls_refusal(tg, tok).await;
    assert!(up.seen().is_empty(), "nothing reached the handler");
}

/// `n` GETs through the TLS route, each answered 200.
async fn get_ok_times(tg: &TestGateway, tok: &str, n: usize) {
    for i in 0..n {
        assert_eq!(get(tg, tok).await.0, 200, "request {i}");
    }
}

/// Sends `GET /tls/hello` with `tok` and checks a 502 `upstream_tls_error`: body, audit line
/// (allowed, then failed upstream).
async fn assert_tls_refusal(tg: &TestGateway, tok: &str) {
    let (status, body) = get(tg, tok).await;
    assert_eq!(status, 502, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "bad_gateway", "{body}");
    assert!(
        v["message"].as_str().unwrap().contains("TLS"),
        "{body}: the client learns the TLS connection failed"
    );
    let line = tg.last_request_line().await;
    assert_eq!(line["status_code"], 502, "{line}");
    assert_eq!(line["reason"], "upstream_tls_error", "{line}");
    assert_eq!(line["upstream"], "secure", "{line}");
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tokengate test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    Pki { dir, ca, ca_file }
}

impl Pki {
    /// The `[routes.upstream_tls]` line that trusts this CA.
    fn ca_line(&self) -> String {
        format!("ca_file = \"{}\"", toml_path(&self.ca_file))
    }

    /// An upstream serving a leaf of the test CA for `names` (no client certificate asked), and
    /// its URL by the name `host`.
    async fn serve(&self, names: &[&str], host: &str) -> (TlsUpstream, String) {
        let up = TlsUpstream::serving(&self.ca.leaf("upstream", names, false)).await;
        let url = up.url(host);
        (up, url)
    }
}

/// `GET uri` straight through a pool and a connector for `host` with the options `tls`, which
/// must fail: the error.
async fn refused_via(
    host: &str,
    tls: &UpstreamTlsOptions,
    uri: String,
) -> tokengate::pool::PoolError {
    let connector = Arc::new(UpstreamConnector::new(host, tls).unwrap());
    let req = Request::get(uri).body(tokengate::body::full("x")).unwrap();
    Pool::default()
        .request_via(req, Some(&connector))
        .await
        .unwrap_err()
}

/// A gateway with one TLS route (see [`tls_route`]) and a token that may read through it.
async fn gateway_to(upstream: &str, tls_table: &str) -> (TestGateway, String) {
    let tg = TestGateway::start_with(tls_route(upstream, tls_table)).await;
    let (tok, _) = tg.token("ci", "bot", &["apps:read"]);
    (tg, tok)
}

/// [`verified_pair`] with an upstream whose certificate for `names` another CA, `other_name`,
/// signed, reached by the last of `names`: (that CA, upstream, gateway, token).
async fn pair_signed_by_another_ca(
    pki: &Pki,
    other_name: &str,
    names: &[&str],
) -> (Ca, TlsUpstream, TestGateway, String) {
    let other = Ca::new(other_name);
    let leaf = other.leaf("upstream", names, false);
    let (up, tg, tok) = verified_pair(pki, &leaf, names.last().unwrap(), false).await;
    (other, up, tg, tok)
}

/// An upstream serving `leaf` (no client certificate asked; `close` answers each request with
/// `Connection: close`) and a gateway whose secure route reaches it at `https://{host}:{port}`
/// trusting the test CA, with a token for `ci` that may read.
async fn verified_pair(
    pki: &Pki,
    leaf: &Leaf,
    host: &str,
    close: bool,
) -> (TlsUpstream, TestGateway, String) {
    let up = TlsUpstream::start(UpstreamSetup {
        leaf,
        client_ca: None,
        close,
    })
    .await;
    let (tg, tok) = gateway_to(&up.url(host), &pki.ca_line()).await;
    (up, tg, tok)
}

/// [`verified_pair`] with a leaf of the test CA for `localhost`, reached as `localhost`.
async fn localhost_pair(pki: &Pki, close: bool) -> (TlsUpstream, TestGateway, String) {
    let leaf = pki.ca.leaf("upstream", &["localhost"], false);
    verified_pair(pki, &leaf, "localhost", close).await
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_verified_upstream_gets_the_request_and_sni_comes_from_the_host() {
    let pki = pki();
    // `localhost`: the certificate's only name, checked against the upstream host (no
    // server_name configured).
    let (up, tg, tok) = localhost_pair(&pki, false).await;
    let (status, body) = get(&tg, &tok).await;
    assert_eq!((status, body.as_str()), (200, "tls upstream ok"));
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/tls/hello")
    );
    // The upstream's own authority (issue 14: Host belongs to the gateway), as with a plain
    // upstream; the client's Host travels as X-Forwarded-Host.
    assert_eq!(seen[0].authority, format!("localhost:{}", up.addr.port()));
    let line = tg.last_request_line().await;
    assert_eq!(
        (line["status_code"].as_u64(), line["reason"].as_str()),
        (Some(200), Some("ok"))
    );
    assert_eq!(line["upstream"], "secure");
    assert_eq!(
        tg.upstream.count(),
        0,
        "the plain route's upstream saw nothing"
    );
    tg.stop().await;
}

#[tokio::test]
async fn an_upstream_signed_by_another_ca_is_a_502_and_nothing_is_sent() {
    let pki = pki();
    let names = ["localhost", "127.0.0.1"];
    let (_, up, tg, tok) = pair_signed_by_another_ca(&pki, "somebody else's CA", &names).await;
    assert_refused_unseen(&tg, &tok, &up).await;
    assert_eq!(up.counts().1, 0, "no handshake completed");
    tg.stop().await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_a_502_and_server_name_fixes_it() {
    let pki = pki();
    let (up, url) = pki.serve(&["api.internal"], "127.0.0.1").await;
    let ca = pki.ca_line();
    let (tg, tok) = gateway_to(&url, &ca).await;
    assert_refused_unseen(&tg, &tok, &up).await;
    tg.stop().await;

    // The same upstream reached by address, with the name its certificate carries.
    let (tg, tok) = gateway_to(&url, &format!("{ca}\nserver_name = \"api.internal\"")).await;
    assert_eq!(get(&tg, &tok).await.0, 200);
    assert_eq!(up.seen().len(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn the_log_says_why_a_handshake_failed() {
    // The pool on its own: the words the operational log gets for each failure.
    let pki = pki();
    let other = Ca::new("somebody else's CA");
    let good = pki.ca.leaf("upstream", &["localhost"], false);
    let foreign = other.leaf("upstream", &["localhost"], false);
    let expired = pki.ca.leaf_with("upstream", &["localhost"], false, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let cases = [
        (&foreign, "localhost", "unknown CA"),
        (&good, "api.internal", "name mismatch"),
        (&expired, "localhost", "expired"),
    ];
    for (leaf, name, want) in cases {
        let up = TlsUpstream::serving(leaf).await;
        let tls = UpstreamTlsOptions {
            ca_file: Some(pki.ca_file.clone()),
            server_name: Some(name.into()),
            ..UpstreamTlsOptions::default()
        };
        let e = refused_via("127.0.0.1", &tls, format!("https://{}/x", up.addr)).await;
        let why = e.tls_failure().expect("a TLS failure");
        assert!(why.contains(want), "{want}: {why}");
        assert!(e.to_string().contains(want), "{e}");
    }

    // mTLS required, no client certificate: the upstream's alert, in words.
    let leaf = pki.ca.leaf("upstream", &["localhost"], false);
    let up = TlsUpstream::requiring_client_certs(&leaf, &pki.ca).await;
    // On HTTP/1.1 and on HTTP/2 (where the alert arrives on the h2 connection).
    for http2 in [false, true] {
        let tls = UpstreamTlsOptions {
            ca_file: Some(pki.ca_file.clone()),
            http2,
            ..UpstreamTlsOptions::default()
        };
        let uri = format!("https://localhost:{}/x", up.addr.port());
        let e = refused_via("localhost", &tls, uri).await;
        let why = e
            .tls_failure()
            .unwrap_or_else(|| panic!("http2 = {http2}: not a TLS failure: {e:?}"));
        assert!(why.contains("client certificate"), "http2 = {http2}: {why}");
    }

    // An https URI without TLS settings is refused, never sent in clear.
    let req = Request::get(format!("https://localhost:{}/x", up.addr.port()))
        .body(tokengate::body::full("x"))
        .unwrap();
    assert!(Pool::default().request(req).await.is_err());
    assert_eq!(up.counts(), (2, 0), "only the two mTLS attempts connected");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn mtls_upstream_refuses_without_a_client_certificate_and_accepts_with_one() {
    let pki = pki();
    let leaf = pki.ca.leaf("upstream", &["localhost"], false);
    let up = TlsUpstream::requiring_client_certs(&leaf, &pki.ca).await;
    let url = up.url("localhost");
    let ca = pki.ca_line();

    let (tg, tok) = gateway_to(&url, &ca).await;
    assert_refused_unseen(&tg, &tok, &up).await;
    assert_eq!(up.counts().1, 0, "the upstream completed no handshake");
    tg.stop().await;

    let (cert, key) = pki
        .ca
        .leaf("tokengate", &["tokengate.client"], true)
        .write(pki.dir.path(), "client");
    let (tg, tok) = gateway_to(
        &url,
        &format!(
            "{ca}\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            toml_path(&cert),
            toml_path(&key)
        ),
    )
    .await;
    assert_eq!(get(&tg, &tok).await, (200, "tls upstream ok".to_string()));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].client_cert,
        "the upstream saw our client certificate"
    );
    tg.stop().await;
}

#[tokio::test]
async fn http2_through_alpn_when_the_route_asks_and_http1_otherwise() {
    let pki = pki();
    let (up, url) = pki.serve(&["localhost"], "localhost").await;
    let ca = pki.ca_line();

    // http2 = false (the default): HTTP/1.1 though the upstream offers h2.
    let (tg, tok) = gateway_to(&url, &format!("{ca}\nhttp2 = false")).await;
    assert_eq!(get(&tg, &tok).await.0, 200);
    assert_eq!(up.seen()[0].version, Version::HTTP_11);
    tg.stop().await;

    // http2 = true: h2, and concurrent requests share the one connection.
    let before = up.counts();
    let (tg, tok) = gateway_to(&url, &format!("{ca}\nhttp2 = true")).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = tg.url("/tls/hello");
        let tok = tok.clone();
        tasks.push(tokio::spawn(async move {
            let r = get_bearer(&client(), url, tok).await;
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "tls upstream ok".to_string()));
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 11);
    for s in &seen[1..] {
        assert_eq!(s.version, Version::HTTP_2, "{s:?}");
        // `:authority` carries what HTTP/1.1 sends as Host: the upstream's own authority.
        assert_eq!(s.authority, format!("localhost:{}", up.addr.port()));
        assert_eq!(s.path, "/tls/hello");
    }
    let after = up.counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "one shared HTTP/2 connection"
    );
    tg.stop().await;
}

#[tokio::test]
async fn twenty_sequential_requests_use_one_connection_and_one_handshake() {
    let pki = pki();
    let (up, tg, tok) = localhost_pair(&pki, false).await;
    get_ok_times(&tg, &tok, 20).await;
    assert_eq!(up.seen().len(), 20);
    assert_eq!(up.counts(), (1, 1), "(TCP connections, TLS handshakes)");
    tg.stop().await;
}

#[tokio::test]
async fn a_new_connection_resumes_the_tls_session() {
    let pki = pki();
    // `Connection: close` on every answer: each request needs a new connection.
    let (up, tg, tok) = localhost_pair(&pki, true).await;
    get_ok_times(&tg, &tok, 3).await;
    assert_eq!(up.counts(), (3, 3));
    assert_eq!(
        up.resumed.load(Ordering::SeqCst),
        2,
        "the second and third handshakes resumed the first session"
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_reload_reads_the_tls_files_again() {
    let pki = pki();
    let new_ca = "the CA the upstream moves to";
    let (other, up, tg, tok) = pair_signed_by_another_ca(&pki, new_ca, &["localhost"]).await;
    assert_tls_refusal(&tg, &tok).await;

    // The operator installs the new CA and sends SIGHUP.
    std::fs::write(&pki.ca_file, other.pem()).unwrap();
    let tls = tg.tls.as_ref().unwrap();
    assert!(tokengate::app::reload(&tg.gw, tls, &tg.config_path).await);
    assert_eq!(get(&tg, &tok).await.0, 200);
    assert_eq!(up.seen().len(), 1);

    // A CA file gone bad: the reload is refused and the working config kept.
    std::fs::write(&pki.ca_file, "not a certificate").unwrap();
    assert!(!tokengate::app::reload(&tg.gw, tls, &tg.config_path).await);
    assert_eq!(get(&tg, &tok).await.0, 200);
    tg.stop().await;
}

// ---------------------------------------------------------------- config

/// Writes `tokengate.toml` with one route (upstream `upstream`, then `extra` lines) into `dir`.
fn config_file(dir: &Path, upstream: &str, extra: &str) -> PathBuf {
    let p = dir.join("tokengate.toml");
    std::fs::write(
        &p,
        format!(
            "[store]\npath = \"tg.db\"\n[audit]\npath = \"audit.log\"\n\n\
             [[routes]]\nname = \"secure\"\nupstream = \"{upstream}\"\n{extra}\n\
             [[routes.rules]]\npath = \"/**\"\npermission = \"apps:read\"\n"
        ),
    )
    .unwrap();
    p
}

fn config_check(path: &Path) -> (i32, String) {
    let out = cli(path, &["config", "check"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn config_check_reads_the_files_relative_to_the_config() {
    let pki = pki();
    let dir = pki.dir.path();
    pki.ca
        .leaf("tokengate", &["tokengate.client"], true)
        .write(dir, "client");
    let p = config_file(
        dir,
        "https://api.internal:8443",
        "[routes.upstream_tls]\nca_file = \"ca.pem\"\nserver_name = \"api.internal\"\n\
         client_cert_file = \"client.crt\"\nclient_key_file = \"client.key\"\nhttp2 = true\n",
    );
    let (code, out) = config_check(&p);
    assert_eq!(code, 0, "{out}");
    let cfg = Config::load(&p).unwrap();
    let tls = cfg.routes[0].upstream_tls.as_ref().unwrap();
    assert_eq!(
        tls.options().ca_file.as_deref(),
        Some(dir.join("ca.pem").as_path())
    );
    assert!(tls.http2());

    // An https upstream without the table: the system roots, HTTP/1.1.
    let p = config_file(dir, "https://api.internal:8443", "");
    let cfg = Config::load(&p).unwrap();
    let tls = cfg.routes[0].upstream_tls.as_ref().unwrap();
    assert_eq!(tls.options(), &UpstreamTlsOptions::default());
    let p = config_file(dir, "http://127.0.0.1:5000", "");
    assert!(Config::load(&p).unwrap().routes[0].upstream_tls.is_none());
}

#[test]
fn config_check_reports_bad_tls_settings_with_exit_64() {
    let pki = pki();
    let dir = pki.dir.path();
    let (cert, key) = pki
        .ca
        .leaf("tokengate", &["tokengate.client"], true)
        .write(dir, "client");
    let (other_cert, _) = pki
        .ca
        .leaf("someone", &["someone.client"], true)
        .write(dir, "other");
    std::fs::write(dir.join("garbage.pem"), "not a pem").unwrap();
    let https = "https://api.internal:8443";
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "http://127.0.0.1:5000",
            "[routes.upstream_tls]\nca_file = \"ca.pem\"\n".into(),
            "upstream_tls",
            "https:// upstreams only",
        ),
        (
            https,
            "[routes.upstream_tls]\nca_file = \"missing.pem\"\n".into(),
            "upstream_tls.ca_file",
            "missing.pem",
        ),
        (
            https,
            "[routes.upstream_tls]\nca_file = \"garbage.pem\"\n".into(),
            "upstream_tls.ca_file",
            "garbage.pem",
        ),
        (
            https,
            "[routes.upstream_tls]\nserver_name = \"not a name!\"\n".into(),
            "upstream_tls.server_name",
            "not a name!",
        ),
        (
            https,
            format!(
                "[routes.upstream_tls]\nclient_cert_file = \"{}\"\n",
                toml_path(&cert)
            ),
            "upstream_tls.client_key_file",
            "required with client_cert_file",
        ),
        (
            https,
            format!(
                "[routes.upstream_tls]\nclient_key_file = \"{}\"\n",
                toml_path(&key)
            ),
            "upstream_tls.client_cert_file",
            "required with client_key_file",
        ),
        (
            https,
            format!(
                "[routes.upstream_tls]\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                toml_path(&other_cert),
                toml_path(&key)
            ),
            "upstream_tls.client_key_file",
            "does not go with",
        ),
        (
            https,
            "[routes.upstream_tls]\nverify = false\n".into(),
            "verify",
            "unknown field",
        ),
        (
            "ftp://api.internal",
            String::new(),
            "upstream",
            "http:// or https://",
        ),
    ];
    for (upstream, extra, key, words) in cases {
        let p = config_file(dir, upstream, &extra);
        let (code, out) = config_check(&p);
        assert_eq!(code, 64, "{extra}: {out}");
        assert!(out.contains(key), "{extra}: wants {key}: {out}");
        assert!(out.contains(words), "{extra}: wants {words}: {out}");
    }
}
