//! TLS from PEM files (rustls, ring provider): the listeners' server configuration, and the
//! client side of `https://` upstreams ([`UpstreamConnector`], used by [`crate::pool`]). Never
//! panics on bad input: every problem is an error naming the file.
//!
//! Owns: [`TlsFiles`] (re-exported by config), the upstream TLS options and connector, and the
//! plain-words description of a failed upstream handshake ([`upstream_failure`]).
//! Never imports: config, pool or gateway (they import this).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS certificate and key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {message}")]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// File.
        path: PathBuf,
        /// Detail.
        message: String,
    },
    /// rustls refused the pair.
    #[error("invalid certificate/key pair ({cert}, {key}): {source}")]
    Rustls {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Cause.
        source: rustls::Error,
    },
}

fn pem_err(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Builds a server config offering HTTP/2 and HTTP/1.1 through ALPN.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = pem_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_err("private key", &files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// `[routes.upstream_tls]` as validated (files absolute), the connector's own option type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsOptions {
    /// CA certificates (PEM) that verify the upstream; None = the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Name sent as SNI and checked against the certificate; None = the upstream's host.
    pub server_name: Option<String>,
    /// Client certificate chain (PEM) for upstreams that require one (mTLS).
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Offer HTTP/2 through ALPN (used when the upstream picks it).
    pub http2: bool,
}

/// An upstream TLS setting that cannot be used: `key` is the `[routes.upstream_tls]` key at
/// fault (`upstream` when the system roots are missing).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamTlsError {
    /// Key at fault.
    pub key: &'static str,
    /// What is wrong, naming the file.
    pub message: String,
}

/// Client TLS for one `https://` upstream of one route, built when the config loads (so a reload
/// reads the files again). One rustls `ClientConfig` per connector: its in-memory session cache
/// (rustls' default) is shared by every connection to that upstream, so new connections resume
/// sessions. Certificate verification is always on.
pub struct UpstreamConnector {
    /// Unique per connector (the pool keys its connections by it; never reused, unlike an address).
    id: u64,
    /// ALPN `http/1.1` only (HTTP/1.1 routes, and upgrades on HTTP/2 routes).
    h1: Arc<ClientConfig>,
    /// ALPN `h2`, `http/1.1` (`http2 = true`); shares `h1`'s session cache.
    h2: Option<Arc<ClientConfig>>,
    server_name: ServerName<'static>,
    options: UpstreamTlsOptions,
}

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("server_name", &self.server_name)
            .field("options", &self.options)
            .finish()
    }
}

static NEXT_CONNECTOR_ID: AtomicU64 = AtomicU64::new(1);

impl UpstreamConnector {
    /// Builds the connector for `host` (the upstream URL's host): reads the CA file (or the system
    /// roots) and the client certificate and key.
    pub fn new(
        host: &str,
        options: &UpstreamTlsOptions,
    ) -> Result<UpstreamConnector, UpstreamTlsError> {
        let err = |key: &'static str, message: String| UpstreamTlsError { key, message };
        let name = options
            .server_name
            .clone()
            .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').into());
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            err(
                "server_name",
                format!("`{name}` is not a DNS name or IP address"),
            )
        })?;
        let roots = match &options.ca_file {
            Some(path) => ca_roots(path).map_err(|m| err("ca_file", m))?,
            None => system_roots().map_err(|m| err("upstream", m))?,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err("upstream", e.to_string()))?
            .with_root_certificates(roots);
        let mut cfg = match (&options.client_cert_file, &options.client_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = pem_certs(cert).map_err(|e| err("client_cert_file", e.to_string()))?;
                let pk = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    err(
                        "client_key_file",
                        pem_err("private key", key, e).to_string(),
                    )
                })?;
                builder.with_client_auth_cert(chain, pk).map_err(|e| {
                    err(
                        "client_key_file",
                        format!("{} does not go with {}: {e}", key.display(), cert.display()),
                    )
                })?
            }
            (Some(_), None) => {
                return Err(err(
                    "client_key_file",
                    "is required with client_cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(err(
                    "client_cert_file",
                    "is required with client_key_file".into(),
                ));
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let h2 = options.http2.then(|| {
            // A clone shares the session store (an `Arc`): one cache per upstream.
            let mut h2 = cfg.clone();
            h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(h2)
        });
        Ok(UpstreamConnector {
            id: NEXT_CONNECTOR_ID.fetch_add(1, Ordering::Relaxed),
            h1: Arc::new(cfg),
            h2,
            server_name,
            options: options.clone(),
        })
    }

    /// Unique id of this connector.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether HTTP/2 is offered through ALPN.
    pub fn http2(&self) -> bool {
        self.h2.is_some()
    }

    /// The options it was built from.
    pub fn options(&self) -> &UpstreamTlsOptions {
        &self.options
    }

    /// SNI and the name the certificate must match.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The rustls config: offering `h2` when `offer_h2` and the route allows it.
    pub fn client_config(&self, offer_h2: bool) -> Arc<ClientConfig> {
        match &self.h2 {
            Some(h2) if offer_h2 => h2.clone(),
            _ => self.h1.clone(),
        }
    }
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err("certificate", path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("certificate", path, e))?;
    if certs.is_empty() {
        return Err(pem_err("certificate", path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Trust anchors from a PEM file of CA certificates.
fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certs(path).map_err(|e| e.to_string())? {
        roots
            .add(cert)
            .map_err(|e| format!("{} is not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The operating system's trust anchors (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured).
fn system_roots() -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "no system CA certificates found{why}; install them (ca-certificates) or set [routes.upstream_tls] ca_file"
        ));
    }
    Ok(roots)
}

/// The TLS failure behind an upstream error, if it is one: the first `rustls::Error` in its
/// source chain (an `io::Error`'s inner error included), in plain words for the operational log.
/// HTTP/2 (the h2 crate) keeps only the text of an I/O error, so an alert received on an HTTP/2
/// connection is recognised by rustls' wording (`received fatal alert: NAME`).
pub fn upstream_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(t));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                    return Some(describe(t));
                }
                if io.kind() == std::io::ErrorKind::InvalidData {
                    let text = inner.to_string();
                    if let Some(alert) = text.strip_prefix("received fatal alert: ") {
                        return Some(describe_alert(alert));
                    }
                }
            }
        }
        cur = e.source();
    }
    None
}

/// An alert the upstream sent, by its rustls name (`CertificateRequired`, ...).
fn describe_alert(name: &str) -> String {
    match name {
        "CertificateRequired" => {
            "the upstream requires a client certificate (set client_cert_file and client_key_file)"
                .into()
        }
        "BadCertificate" | "UnknownCA" | "CertificateUnknown" | "CertificateExpired"
        | "CertificateRevoked" | "AccessDenied" => {
            format!("the upstream refused our client certificate (alert {name})")
        }
        _ => format!("the upstream aborted the TLS handshake (alert {name})"),
    }
}

/// What went wrong in a handshake, for an operator.
fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown CA: the upstream's certificate is not signed by a trusted CA (ca_file, or the system roots)".into(),
            CertificateError::NotValidForName => "name mismatch: the upstream's certificate is not valid for the name asked (the upstream host, or server_name)".into(),
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "name mismatch: the upstream's certificate is not valid for {expected:?} (it names {})",
                presented.join(", ")
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("expired: the upstream's certificate has expired ({c:?})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("not yet valid: the upstream's certificate is not valid yet ({c:?})")
            }
            CertificateError::Revoked => "revoked: the upstream's certificate is revoked".into(),
            other => format!("invalid upstream certificate: {other:?}"),
        },
        E::AlertReceived(a) => describe_alert(&format!("{a:?}")),
        E::InvalidMessage(_) => format!("the upstream does not speak TLS here? ({e})"),
        other => format!("TLS error: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "not a pem").unwrap();
        std::fs::write(&key, "nope").unwrap();
        let e = server_config(&TlsFiles {
            cert: cert.clone(),
            key,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.pem"), "{e}");
        let e = server_config(&TlsFiles {
            cert: dir.path().join("missing.pem"),
            key: cert,
        })
        .unwrap_err();
        assert!(e.to_string().contains("missing.pem"));
    }

    #[test]
    fn upstream_failures_are_named_even_as_text() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        // As tokio-rustls returns it (the rustls error inside an io::Error)...
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert.clone());
        let why = upstream_failure(&io).unwrap();
        assert!(why.contains("requires a client certificate"), "{why}");
        // ...and as HTTP/2 hands it on (its text only).
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert.to_string());
        assert_eq!(upstream_failure(&io).unwrap(), why);
        let cert = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(describe(&cert).starts_with("unknown CA"));
        // Not TLS: None.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(upstream_failure(&io).is_none());
    }

    #[test]
    fn generated_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let cfg = server_config(&TlsFiles { cert, key }).unwrap();
        assert_eq!(cfg.alpn_protocols[0], b"h2");
    }
}
