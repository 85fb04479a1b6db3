//! Rejections and the one function that turns them into responses (SPEC §1).
//!
//! Classified by who caused them: the client (4xx), the upstream (502/504), or us (500/503).
//! Clients get a short stable message; the cause goes to the operational log.
//!
//! Owns: [`Reject`] and [`respond`]. Must never import `config`, `gateway`, `pipeline`, `admin` or
//! `cli` (every layer imports it).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Body, full};

/// Why a request was not forwarded (or failed upstream). `reason()` is the audit `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// Step 1: the request is malformed (path, Host, headers, method). `reason` is specific.
    BadRequest {
        /// Audit reason, e.g. `bad_path`, `bad_host`, `bad_header`, `method_not_allowed`.
        reason: &'static str,
        /// Human sentence for the client.
        message: String,
    },
    /// Request target longer than `server.max_uri_bytes`.
    UriTooLong,
    /// Header fields larger than `server.max_header_bytes`.
    HeadersTooLarge,
    /// Body larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// The client paused its request body longer than `server.body_idle_timeout`.
    BodyIdle,
    /// Step 2: this client IP failed authentication too often.
    ClientBlocked {
        /// Seconds until it may try again.
        retry_after: u64,
    },
    /// Step 3: no `Authorization` header, or a non-Bearer scheme.
    MissingToken {
        /// `missing_token` or `unsupported_scheme`.
        reason: &'static str,
    },
    /// Step 3: malformed Bearer credentials, two headers, or a token in the query.
    InvalidRequest {
        /// `malformed`, `duplicate_authorization`, `token_in_query`.
        reason: &'static str,
        /// Human sentence.
        message: &'static str,
    },
    /// Steps 4–5: the token is not acceptable.
    InvalidToken {
        /// `bad_format`, `bad_checksum`, `unknown_token`, `expired`, `revoked`, `account_disabled`, `ip_not_allowed`.
        reason: &'static str,
    },
    /// Step 6: not allowed.
    Forbidden {
        /// `insufficient_permission`, `no_rule`, `out_of_scope`.
        reason: &'static str,
        /// Required permission, when a rule matched.
        permission: Option<String>,
    },
    /// Step 6: the rule needs a person's approval and this token holds none that is live
    /// (issue 19). 403 `approval_required`, with the pending request's id when there is one.
    ApprovalRequired {
        /// The rule's name.
        rule: String,
        /// The pending request bound to this token, rule and parameters, if any.
        approval_id: Option<String>,
    },
    /// Step 7: per-token rate limit.
    RateLimited {
        /// Seconds to wait.
        retry_after: u64,
        /// Burst size (RateLimit-Limit).
        limit: u32,
    },
    /// Store unavailable on a cache miss.
    StoreUnavailable,
    /// Step 8: the audit writer cannot accept a record.
    AuditUnavailable,
    /// Upgrade requested where not allowed.
    UpgradeRefused,
    /// 421: the Host is not one this route answers for (`host_not_allowed`).
    Misdirected {
        /// Audit reason.
        reason: &'static str,
    },
    /// 501: a feature the gateway does not implement, e.g. a transfer coding other than
    /// `chunked` (`unsupported_transfer_coding`).
    NotImplemented {
        /// Audit reason.
        reason: &'static str,
    },
    /// No route for a path on the reserved prefix.
    NotFound,
    /// Step 9: upstream refused or failed.
    UpstreamError,
    /// Step 9: the TLS connection to the upstream failed (certificate not trusted, wrong name,
    /// expired, client certificate refused...); the cause goes to the operational log. Never
    /// retried without TLS or verification.
    UpstreamTls,
    /// Step 9: upstream did not answer in time.
    UpstreamTimeout,
    /// The whole request took longer than `server.request_timeout`.
    RequestTimeout,
    /// A bug or an unexpected internal failure.
    Internal,
    /// 403: a forward-auth request from a peer outside `server.trusted_proxies`
    /// (`forward_auth_untrusted`): the original method, URI and host it describes are not believed.
    ForwardAuthUntrusted,
    /// 403: a Bearer token sent over plain HTTP by a client that is neither on loopback nor
    /// behind a trusted proxy that says it used HTTPS (`plaintext_token`); nothing is looked up
    /// or forwarded. `server.allow_plaintext_tokens = true` lifts it.
    PlaintextToken,
}

impl Reject {
    /// Audit `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::BadRequest { reason, .. } => reason,
            Reject::UriTooLong => "uri_too_long",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BodyTooLarge => "body_too_large",
            Reject::BodyIdle => "body_idle",
            Reject::ClientBlocked { .. } => "client_blocked",
            Reject::MissingToken { reason } => reason,
            Reject::InvalidRequest { reason, .. } => reason,
            Reject::InvalidToken { reason } => reason,
            Reject::Forbidden { reason, .. } => reason,
            Reject::RateLimited { .. } => "rate_limited",
            Reject::ApprovalRequired { .. } => "approval_required",
            Reject::StoreUnavailable => "store_unavailable",
            Reject::AuditUnavailable => "audit_unavailable",
            Reject::UpgradeRefused => "upgrade_refused",
            Reject::Misdirected { reason } | Reject::NotImplemented { reason } => reason,
            Reject::NotFound => "not_found",
            Reject::UpstreamError => "upstream_error",
            Reject::UpstreamTls => "upstream_tls_error",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::RequestTimeout => "request_timeout",
            Reject::Internal => "internal_error",
            Reject::ForwardAuthUntrusted => "forward_auth_untrusted",
            Reject::PlaintextToken => "plaintext_token",
        }
    }

    /// A failed authentication (steps 3–5): a missing, malformed or unacceptable credential.
    /// These count towards the per-address failed-authentication limiter.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Reject::MissingToken { .. }
                | Reject::InvalidRequest { .. }
                | Reject::InvalidToken { .. }
        )
    }

    /// A failure that can happen after the request was allowed and handed to the upstream
    /// (step 9): when the request got that far, its audit `rbac_decision` stays `allow`.
    pub fn counts_as_allowed(&self) -> bool {
        matches!(
            self,
            Reject::UpstreamError
                | Reject::UpstreamTls
                | Reject::UpstreamTimeout
                | Reject::BodyTooLarge
                | Reject::BodyIdle
        )
    }

    /// A failure on our side (not the client's, not the upstream's): worth an operational log line.
    pub fn is_ours(&self) -> bool {
        matches!(self, Reject::StoreUnavailable | Reject::Internal)
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::BadRequest { .. } | Reject::InvalidRequest { .. } | Reject::UpgradeRefused => {
                StatusCode::BAD_REQUEST
            }
            Reject::UriTooLong => StatusCode::URI_TOO_LONG,
            Reject::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::BodyIdle => StatusCode::REQUEST_TIMEOUT,
            Reject::ClientBlocked { .. } | Reject::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Reject::MissingToken { .. } | Reject::InvalidToken { .. } => StatusCode::UNAUTHORIZED,
            Reject::Forbidden { .. }
            | Reject::ForwardAuthUntrusted
            | Reject::PlaintextToken
            | Reject::ApprovalRequired { .. } => StatusCode::FORBIDDEN,
            Reject::StoreUnavailable | Reject::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Reject::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            Reject::UpstreamError | Reject::UpstreamTls => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable `error` code in the JSON body.
    fn code(&self) -> &'static str {
        match self {
            Reject::BadRequest { .. } | Reject::InvalidRequest { .. } | Reject::UpgradeRefused => {
                "invalid_request"
            }
            Reject::UriTooLong => "uri_too_long",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BodyTooLarge => "body_too_large",
            Reject::BodyIdle => "request_timeout",
            Reject::ClientBlocked { .. } => "too_many_failures",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::MissingToken { .. } => "unauthorized",
            Reject::InvalidToken { .. } => "invalid_token",
            Reject::Forbidden { .. } => "insufficient_scope",
            Reject::ApprovalRequired { .. } => "approval_required",
            Reject::StoreUnavailable | Reject::AuditUnavailable => "unavailable",
            Reject::NotFound => "not_found",
            Reject::Misdirected { .. } => "misdirected_request",
            Reject::NotImplemented { .. } => "not_implemented",
            Reject::UpstreamError | Reject::UpstreamTls => "bad_gateway",
            Reject::UpstreamTimeout | Reject::RequestTimeout => "gateway_timeout",
            Reject::Internal => "internal_error",
            Reject::ForwardAuthUntrusted => "forbidden",
            Reject::PlaintextToken => "https_required",
        }
    }

    fn message(&self) -> String {
        match self {
            Reject::BadRequest { message, .. } => message.clone(),
            Reject::UriTooLong => "The request target is too long.".into(),
            Reject::HeadersTooLarge => "The request header fields are too large.".into(),
            Reject::BodyTooLarge => "The request body is too large.".into(),
            Reject::BodyIdle => {
                "The request body stopped arriving; send it without long pauses.".into()
            }
            Reject::ClientBlocked { .. } => {
                "Too many failed authentication attempts from this address; retry later.".into()
            }
            Reject::MissingToken {
                reason: "unsupported_scheme",
            } => "Use `Authorization: Bearer <token>`; other schemes are not accepted.".into(),
            Reject::MissingToken { .. } => {
                "An API token is required: send `Authorization: Bearer <token>`.".into()
            }
            Reject::InvalidRequest { message, .. } => (*message).into(),
            Reject::InvalidToken { reason: "expired" } => {
                "The API token has expired; create a new one.".into()
            }
            Reject::InvalidToken { reason: "revoked" } => "The API token has been revoked.".into(),
            Reject::InvalidToken {
                reason: "account_disabled",
            } => "The account that owns this API token is disabled; ask an administrator.".into(),
            Reject::InvalidToken { .. } => "The API token is not valid.".into(),
            Reject::Forbidden {
                reason: "out_of_scope",
                permission: Some(p),
            } => format!(
                "The API token holds `{p}`, but its scopes do not cover this request (another app or resource than the ones it is limited to)."
            ),
            Reject::Forbidden {
                permission: Some(p),
                ..
            } => format!("The API token lacks the permission `{p}` for this request."),
            Reject::Forbidden { .. } => "No rule allows this request.".into(),
            Reject::ApprovalRequired {
                rule,
                approval_id: Some(id),
            } => format!(
                "This request needs a person's approval (rule `{rule}`); request {id} is pending."
            ),
            Reject::ApprovalRequired { rule, .. } => format!(
                "This request needs a person's approval (rule `{rule}`): ask with `tokengate approval request --rule {rule}` or POST /v1/approvals."
            ),
            Reject::RateLimited { .. } => "Rate limit exceeded for this token; retry later.".into(),
            Reject::StoreUnavailable | Reject::AuditUnavailable => {
                "The gateway cannot serve this request right now; retry later.".into()
            }
            Reject::UpgradeRefused => "Protocol upgrades are not allowed on this route.".into(),
            Reject::NotFound => "Not found.".into(),
            Reject::Misdirected { .. } => "This host name is not served here.".into(),
            Reject::NotImplemented { .. } => {
                "Transfer codings other than `chunked` are not supported.".into()
            }
            Reject::UpstreamError => "The upstream service failed to answer.".into(),
            Reject::UpstreamTls => {
                "The gateway could not make a trusted TLS connection to the upstream service."
                    .into()
            }
            Reject::UpstreamTimeout | Reject::RequestTimeout => {
                "The upstream service did not answer in time.".into()
            }
            Reject::Internal => "Internal error.".into(),
            Reject::ForwardAuthUntrusted => {
                "Forward-auth decisions are only given to trusted proxies (server.trusted_proxies)."
                    .into()
            }
            Reject::PlaintextToken => {
                "API tokens are only accepted over HTTPS: this request sent one over plain HTTP. \
                 Call the https:// URL (and treat this token as exposed: rotate it). Operators: \
                 behind a TLS-terminating proxy, list it in server.trusted_proxies and have it send \
                 `X-Forwarded-Proto: https`."
                    .into()
            }
        }
    }

    /// `error_description` for invalid_token: `expired`/`revoked` name themselves, others are generic.
    fn description(&self) -> Option<&'static str> {
        match self {
            Reject::InvalidToken { reason: "expired" } => Some("The access token expired"),
            Reject::InvalidToken { reason: "revoked" } => Some("The access token was revoked"),
            Reject::InvalidToken { .. } => Some("The access token is invalid"),
            Reject::InvalidRequest { .. } => Some("Malformed Authorization header"),
            Reject::Forbidden { .. } => Some("The access token does not allow this request"),
            _ => None,
        }
    }

    /// RFC 6750 §3 challenge, when this rejection carries one.
    pub fn challenge(&self, realm: &str) -> Option<String> {
        let error = match self {
            Reject::MissingToken { .. } => return Some(format!("Bearer realm=\"{realm}\"")),
            Reject::InvalidRequest { .. } => "invalid_request",
            Reject::InvalidToken { .. } => "invalid_token",
            Reject::Forbidden { .. } => "insufficient_scope",
            _ => return None,
        };
        let mut s = format!("Bearer realm=\"{realm}\", error=\"{error}\"");
        if let Some(d) = self.description() {
            s.push_str(&format!(", error_description=\"{d}\""));
        }
        Some(s)
    }
}

/// The one place a rejection becomes a response.
pub fn respond(reject: &Reject, realm: &str, request_id: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body_json(reject, request_id) + "\n")));
    *resp.status_mut() = reject.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    if let Some(c) = reject.challenge(realm) {
        if let Ok(v) = HeaderValue::from_str(&c) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    match reject {
        Reject::ClientBlocked { retry_after } => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        Reject::RateLimited { retry_after, limit } => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            h.insert("ratelimit-limit", HeaderValue::from(*limit));
            h.insert("ratelimit-remaining", HeaderValue::from(0u32));
            h.insert("ratelimit-reset", HeaderValue::from(*retry_after));
        }
        Reject::StoreUnavailable | Reject::AuditUnavailable => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        }
        _ => {}
    }
    if matches!(
        reject.status(),
        StatusCode::BAD_REQUEST
            | StatusCode::URI_TOO_LONG
            | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::REQUEST_TIMEOUT
    ) {
        // After a framing-level problem the connection's state is suspect: close it.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The JSON body of a refusal, without the final newline (also sent by the forward-auth
/// endpoint as `X-Tokengate-Error`, for front proxies that drop the body of a denial).
pub fn body_json(reject: &Reject, request_id: &str) -> String {
    let mut body = serde_json::json!({
        "error": reject.code(),
        "message": reject.message(),
        "request_id": request_id,
    });
    if let Reject::Forbidden {
        permission: Some(p),
        ..
    } = reject
    {
        body["required_permission"] = p.clone().into();
    }
    if let Reject::ApprovalRequired { rule, approval_id } = reject {
        body["rule"] = rule.clone().into();
        body["approval_id"] = approval_id.clone().into();
    }
    body.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_follow_rfc6750() {
        assert_eq!(
            Reject::MissingToken {
                reason: "missing_token"
            }
            .challenge("tg")
            .unwrap(),
            "Bearer realm=\"tg\""
        );
        let c = Reject::InvalidToken { reason: "expired" }
            .challenge("tg")
            .unwrap();
        assert!(c.contains("error=\"invalid_token\"") && c.contains("expired"));
        let c = Reject::InvalidToken {
            reason: "unknown_token",
        }
        .challenge("tg")
        .unwrap();
        assert!(!c.contains("unknown"));
        assert!(Reject::UpstreamError.challenge("tg").is_none());
    }

    #[test]
    fn outcomes_are_classified_by_variant() {
        let failures = [
            Reject::MissingToken {
                reason: "missing_token",
            },
            Reject::InvalidRequest {
                reason: "malformed",
                message: "m",
            },
            Reject::InvalidToken {
                reason: "unknown_token",
            },
        ];
        assert!(failures.iter().all(Reject::is_auth_failure));
        // Refusals that are not a failed authentication: not counted by the limiter.
        for r in [
            Reject::ClientBlocked { retry_after: 1 },
            Reject::RateLimited {
                retry_after: 1,
                limit: 1,
            },
            Reject::Forbidden {
                reason: "no_rule",
                permission: None,
            },
            Reject::StoreUnavailable,
        ] {
            assert!(!r.is_auth_failure(), "{r:?}");
            assert!(!r.counts_as_allowed(), "{r:?}");
        }
        for r in [
            Reject::UpstreamError,
            Reject::UpstreamTimeout,
            Reject::BodyTooLarge,
            Reject::BodyIdle,
        ] {
            assert!(r.counts_as_allowed() && !r.is_auth_failure(), "{r:?}");
        }
        assert!(!Reject::RequestTimeout.counts_as_allowed());
        assert!(Reject::StoreUnavailable.is_ours() && Reject::Internal.is_ours());
        assert!(!Reject::UpstreamError.is_ours());
    }

    #[test]
    fn scoped_and_disabled_refusals_say_why() {
        let scoped = body_json(
            &Reject::Forbidden {
                reason: "out_of_scope",
                permission: Some("apps:read".into()),
            },
            "rid",
        );
        assert!(
            scoped.contains("scopes do not cover") && !scoped.contains("lacks"),
            "{scoped}"
        );
        let disabled = body_json(
            &Reject::InvalidToken {
                reason: "account_disabled",
            },
            "rid",
        );
        assert!(
            disabled.contains("account that owns this API token is disabled"),
            "{disabled}"
        );
    }

    #[test]
    fn body_never_echoes_details() {
        let r = respond(
            &Reject::Forbidden {
                reason: "insufficient_permission",
                permission: Some("apps:deploy".into()),
            },
            "tg",
            "rid",
        );
        assert_eq!(r.status(), 403);
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
    }
}
