//! The remote CLI's admin API client: `reqwest` (blocking, rustls) with the system's root
//! certificates, or only the CAs of `TOKENGATE_CA_FILE` / `SSL_CERT_FILE` when one is set.
//!
//! Refuses to send a token over plain `http://` to a host that is not loopback unless told to
//! (`--allow-plaintext`, or `allow_plaintext = true` in the profile): the check runs before any
//! connection. Network and TLS failures are told in words, with what to do.
//!
//! Must never import `cli::local`, `admin` or `gateway`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode, Uri};

use crate::cli::CliError;

/// Environment variable naming a PEM bundle of CAs trusted for `https://` admin URLs.
pub const ENV_CA_FILE: &str = "TOKENGATE_CA_FILE";
/// Largest response body read from the admin API.
const MAX_RESPONSE: u64 = 8 * 1024 * 1024;

/// An admin API client for one base URL and token.
pub struct Client {
    url: String,
    token: String,
    http: reqwest::blocking::Client,
}

/// True for `localhost`, `*.localhost` and loopback addresses (127.0.0.0/8, ::1).
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") || h.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a plain `http://` URL whose host is not loopback, unless `allowed`.
pub fn check_transport(url: &str, allowed: bool) -> Result<(), CliError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| CliError::usage(format!("bad URL {url}")))?;
    let host = uri.host().unwrap_or("");
    if uri.scheme_str() == Some("http") && !is_loopback_host(host) && !allowed {
        return Err(CliError::usage(format!(
            "refusing to send a token over plain HTTP to {host}: anyone on the network could read it. \
             Use the https:// URL of the admin listener, or, on a network you trust, pass \
             --allow-plaintext (`tokengate login --allow-plaintext` saves it in the profile)"
        )));
    }
    Ok(())
}

impl Client {
    /// A client for `url` acting with `token`; `allow_plaintext` lifts the plain-HTTP refusal.
    pub fn new(url: &str, token: &str, allow_plaintext: bool) -> Result<Client, CliError> {
        check_transport(url, allow_plaintext)?;
        let loopback = url
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.host().map(is_loopback_host))
            .unwrap_or(false);
        let mut b = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokengate-cli/", env!("CARGO_PKG_VERSION")));
        if loopback {
            b = b.no_proxy();
        }
        if let Some(file) = ca_file() {
            b = b.tls_built_in_root_certs(false);
            for c in read_cas(&file)? {
                b = b.add_root_certificate(c);
            }
        }
        let http = b
            .build()
            .map_err(|e| CliError::failure(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client {
            url: url.to_string(),
            token: token.to_string(),
            http,
        })
    }

    /// One request: the status and the JSON body (`null` when the body is not JSON).
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), CliError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .header(http::header::ACCEPT, "application/json");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let mut bytes = Vec::new();
        use std::io::Read;
        resp.take(MAX_RESPONSE)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                CliError::failure(format!("the admin API at {} broke off: {e}", self.url))
            })?;
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, v))
    }

    /// Calls the API; a non-2xx answer becomes the error, in the server's words.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, CliError> {
        let (status, v) = self.send(method, path, body)?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(self.api_error(status, &v))
        }
    }

    /// An error answer as `URL (403 insufficient_scope): message`.
    pub fn api_error(&self, status: StatusCode, v: &serde_json::Value) -> CliError {
        let msg = v["message"].as_str().unwrap_or("no message");
        let code = v["error"].as_str().unwrap_or("error");
        CliError::failure(format!("{} ({} {code}): {msg}", self.url, status.as_u16()))
    }

    fn unreachable(&self, e: &reqwest::Error) -> CliError {
        CliError::failure(format!(
            "cannot reach the admin API at {}: {}",
            self.url,
            describe(e)
        ))
    }
}

/// `TOKENGATE_CA_FILE`, else `SSL_CERT_FILE`: a bundle that replaces the system's roots.
fn ca_file() -> Option<PathBuf> {
    std::env::var_os(ENV_CA_FILE)
        .or_else(|| std::env::var_os("SSL_CERT_FILE"))
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn read_cas(file: &std::path::Path) -> Result<Vec<reqwest::Certificate>, CliError> {
    let pem = std::fs::read(file).map_err(|e| {
        CliError::usage(format!(
            "cannot read CA certificates from {} ({ENV_CA_FILE}): {e}",
            file.display()
        ))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default();
    if certs.is_empty() {
        return Err(CliError::usage(format!(
            "no CA certificates in {} ({ENV_CA_FILE})",
            file.display()
        )));
    }
    Ok(certs)
}

/// A request failure in words: the TLS verdict when there is one, else the innermost cause.
fn describe(e: &reqwest::Error) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = e.to_string();
    while let Some(x) = cur {
        if let Some(t) = x.downcast_ref::<rustls::Error>() {
            return tls_words(t);
        }
        if let Some(t) = x
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return tls_words(t);
        }
        last = x.to_string();
        cur = x.source();
    }
    if e.is_timeout() {
        return "no answer in time (timed out)".into();
    }
    // The TLS error may sit behind a boxed cause that does not downcast: read its words.
    if let Some(name) = last.strip_prefix("invalid peer certificate: ") {
        let c = match name {
            "UnknownIssuer" => Some(rustls::CertificateError::UnknownIssuer),
            "BadSignature" => Some(rustls::CertificateError::BadSignature),
            "NotValidForName" => Some(rustls::CertificateError::NotValidForName),
            "Expired" => Some(rustls::CertificateError::Expired),
            "NotValidYet" => Some(rustls::CertificateError::NotValidYet),
            "Revoked" => Some(rustls::CertificateError::Revoked),
            _ => None,
        };
        return match c {
            Some(c) => tls_words(&rustls::Error::InvalidCertificate(c)),
            None => tls_words(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
        };
    }
    last
}

/// A TLS failure told for people, with what to do.
fn tls_words(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let trust =
        format!("if this is your gateway's own CA, trust it with {ENV_CA_FILE}=/path/to/ca.pem");
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => format!(
                "the server's certificate is not signed by an authority this computer trusts (self-signed, or a private CA); {trust}"
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's certificate is not valid for this host name: use the name the certificate was issued for".into()
            }
            C::Expired | C::ExpiredContext { .. } => {
                "the server's certificate has expired: renew it on the gateway".into()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet: check the clocks of both machines".into()
            }
            C::Revoked => "the server's certificate has been revoked".into(),
            C::BadEncoding => "the server's certificate is damaged".into(),
            _ => format!("the server's certificate was refused; {trust}"),
        },
        rustls::Error::AlertReceived(_) => {
            "the server ended the TLS handshake (does it want a client certificate, or is this not a TLS port?)".into()
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server does not speak TLS on this port: is the URL http:// rather than https://?"
                .into()
        }
        other => format!("the TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for ok in [
            "http://127.0.0.1:9090",
            "http://127.3.4.5:9090",
            "http://localhost:9090",
            "http://[::1]:9090",
            "https://gw.example.com:9090",
        ] {
            check_transport(ok, false).unwrap_or_else(|e| panic!("{ok}: {}", e.message));
        }
        for bad in [
            "http://gw.example.com:9090",
            "http://10.0.0.5:9090",
            "http://[2001:db8::1]:9090",
            "http://localhost.evil.com:9090",
        ] {
            let e = check_transport(bad, false).unwrap_err();
            assert!(
                e.message.contains("plain HTTP") && e.message.contains("--allow-plaintext"),
                "{bad}: {}",
                e.message
            );
            assert!(check_transport(bad, true).is_ok());
        }
    }

    #[test]
    fn certificate_errors_are_words() {
        let s = tls_words(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(s.contains("self-signed") && s.contains(ENV_CA_FILE), "{s}");
        assert!(!s.contains("UnknownIssuer"), "{s}");
    }
}
