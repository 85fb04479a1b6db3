//! TLS server configuration from PEM files (rustls). Never panics on bad input: every problem is a
//! [`TlsError`] naming the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

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
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_err("certificate", &files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("certificate", &files.cert, e))?;
    if certs.is_empty() {
        return Err(pem_err(
            "certificate",
            &files.cert,
            "no CERTIFICATE block found",
        ));
    }
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
