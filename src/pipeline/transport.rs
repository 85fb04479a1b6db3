//! Tokens only over HTTPS: the pipeline phase that refuses a Bearer token sent over plain HTTP
//! by a client that is neither on loopback nor behind a trusted proxy that says it used HTTPS
//! ([`crate::forwarded::secure_transport`]). Runs before the token is looked up; the refusal is
//! audited (`plaintext_token`, with the token's display prefix so its owner can rotate it) and
//! nothing is forwarded. `server.allow_plaintext_tokens = true` turns it off.

use http::{Request, header};

use super::Ctx;
use crate::auth;
use crate::config::Config;
use crate::error::Reject;
use crate::forwarded::secure_transport;
use crate::gateway::ConnInfo;

/// The phase: `Ok` when the request carries no token, or carries it on an acceptable transport.
pub(super) fn check_transport<B>(
    cfg: &Config,
    conn: ConnInfo,
    req: &Request<B>,
    ctx: &mut Ctx,
) -> Result<(), Reject> {
    if cfg.server.allow_plaintext_tokens || !req.headers().contains_key(header::AUTHORIZATION) {
        return Ok(());
    }
    if secure_transport(
        conn.peer.ip(),
        conn.tls,
        req.headers(),
        &cfg.server.trusted_proxies,
    ) {
        return Ok(());
    }
    if let Ok(p) = auth::extract(req.headers(), req.uri().query()).and_then(auth::parse) {
        ctx.token_prefix = Some(p.display_prefix().to_string());
    }
    Err(Reject::PlaintextToken)
}
