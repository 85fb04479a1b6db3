//! tokengate: a Bearer-token authentication gateway.
//!
//! Every request on the public listener runs the pipeline of SPEC §1 — canonicalise, failed-auth
//! limiter, authenticate, authorise, rate-limit, audit, forward — and only then reaches the
//! upstream. Tokens are stored only as SHA-256 hashes (SQLite, or PostgreSQL for several replicas)
//! and cached in memory.
//!
//! # Layout
//! Modules marked (crate) are `pub(crate)`: nothing outside the library (tests/, benches/, fuzz/)
//! needs them. Dependency rules: nothing outside `cli` and `main.rs` imports `cli`; `store`,
//! `ratelimit` and `audit` never import `config` (config converts into their option types); the
//! pipeline never imports `admin`; `clock` imports nothing of ours; no import circle between
//! modules (`scripts/module-graph` checks all of it).
//!
//! - `main.rs` — thin binary: parses the CLI, sets up tracing, calls into this library.
//! - [`cli`] (`cli/{mod,local,approval,print,shell}.rs`, `cli/remote/{mod,client,credentials}.rs`) —
//!   clap definitions and exit codes; local-store commands, remote commands (`auth`, `context`,
//!   `approval`, the admin API client, the credentials file and keyring) and the one printer both
//!   use; shell completions and man pages.
//! - [`app`] — process lifecycle for `serve`: start, SIGHUP reload, SIGTERM drain.
//! - [`demo`] — `tokengate demo` (plain options) and the built-in echo upstream.
//! - [`config`] (`config/{mod,raw,validate}.rs`) — TOML config: raw serde structs → validated
//!   [`config::Config`], one function per section, named defaults; route matching helpers.
//! - [`error`] — [`error::Reject`] and the one function that turns a rejection into a response.
//! - [`token`] — token format: generate, parse, checksum, display prefix, SHA-256.
//! - [`store`] (`store/{mod,row,tables,copy,file,sessions,approvals,sqlite}.rs`,
//!   `store/postgres/`) — the token store behind one handle, with its own options type: SQLite
//!   ([`store::sqlite`]) or PostgreSQL ([`store::postgres`], LISTEN/NOTIFY change push);
//!   migrations (written once in `tables`, expanded per engine), accounts, tokens, change log.
//! - [`cache`] — in-memory token cache with race-free invalidation.
//! - `lifecycle` (crate) — every token/account operation (create, rotate, revoke, disable,
//!   retire-on-first-use) and the rule that their result is never stronger than the caller.
//! - [`path`] — canonical request paths (step 1).
//! - `health` (crate) — readiness checks shared by the admin `/readyz` and the public health endpoint.
//! - `readiness` (crate) — the readiness result and the public probe's bookkeeping the gateway holds.
//! - `hygiene` (crate) — request validation and header hygiene (step 1, forwarding).
//! - `forwarded` (crate) — the client address (peer or trusted `X-Forwarded-For` hop), and whether
//!   a token may be accepted on this transport (TLS, loopback, or a trusted proxy saying HTTPS).
//! - [`auth`] — credential extraction and token judgement (steps 3–5).
//! - [`authz`] — rule templates, matching, permissions, scopes and `decide()` (step 6).
//! - [`approval`] — approval-gated rules: the gate after step 7, the binding of an approval to
//!   its token, rule and parameters, who may approve, and the signed webhook notifications.
//! - [`mfa`] — TOTP (RFC 6238), sealing of TOTP secrets (AES-256-GCM), recovery codes, the
//!   per-account failure window.
//! - [`ratelimit`] (`ratelimit/{mod,redis}.rs`) — per-token GCRA limiter and per-IP failed-auth
//!   limiter (steps 2, 7), owning [`ratelimit::Rate`]; exact across replicas in Redis.
//! - [`audit`] (`audit/{mod,writer,sink,line,verify,reader}.rs`) — the audit log: bounded
//!   writer, file sink, line format and hash chain, verify, reader (step 8).
//! - [`proxy`] — forwarding to upstreams, streaming bodies (step 9).
//! - [`pool`] (`pool/{mod,h2_conn,raw}.rs`) — keep-alive connection pool to the upstreams (hyper
//!   `client::conn`), over TCP or TLS, HTTP/1.1 or HTTP/2.
//! - [`body`] — body types and the streaming size/idle guard.
//! - [`gateway`] — the state handle, config swap and background jobs.
//! - `pipeline` (crate) — the request pipeline, one function per phase, on the gateway's state.
//! - `sdnotify` (crate) — systemd `Type=notify` readiness, reload and stop notifications.
//! - [`server`] (`server.rs`, `server/{admission,workers}.rs`) — listeners, connection limits,
//!   TLS handshake, hyper connections, the `server.workers` runtimes, graceful drain.
//! - [`h1`] (`h1/{mod,parse,framing,forward,io,differential}.rs`) — the HTTP/1 fast path: plain
//!   HTTP/1.1 requests forwarded by the connection's own task over pooled raw upstream
//!   connections, the pipeline's phases unchanged; declines to hyper what it does not cover.
//! - `tls` (crate) — rustls server configs from PEM files; TLS to `https://` upstreams.
//! - [`admin`] (`admin/{mod,api,ui,session,approvals,mfa}.rs`) — the admin listener: health,
//!   readiness, metrics, JSON API ([`admin::api`]), web UI and its sessions
//!   ([`admin::session`]), the approvals and MFA routes.
//! - `metrics` (crate) — Prometheus counters and histograms.
//! - [`clock`] — wall clock in ms (advanceable in tests) and RFC 3339 formatting.

pub mod admin;
pub mod app;
pub mod approval;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod body;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub(crate) mod forward_auth;
pub(crate) mod forwarded;
pub mod gateway;
pub mod h1;
pub(crate) mod health;
pub(crate) mod hygiene;
pub(crate) mod lifecycle;
pub(crate) mod logging;
pub mod metrics;
pub mod mfa;
pub mod path;
pub(crate) mod pipeline;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub(crate) mod readiness;
pub mod sdnotify;
pub mod server;
pub mod store;
pub(crate) mod tls;
pub mod token;
