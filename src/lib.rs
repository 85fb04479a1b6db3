//! tokengate: a Bearer-token authentication gateway.
//!
//! Every request on the public listener runs the pipeline of SPEC §1 — canonicalise, failed-auth
//! limiter, authenticate, authorise, rate-limit, audit, forward — and only then reaches the
//! upstream. Tokens are stored only as SHA-256 hashes (SQLite, or PostgreSQL for several replicas)
//! and cached in memory.
//!
//! # Layout
//! - `main.rs` — thin binary: parses the CLI, sets up tracing, calls into this library.
//! - [`cli`] — clap definitions and exit codes; local-store commands, remote commands (admin API
//!   client, credentials file) and the one printer both use.
//! - [`app`] — process lifecycle for `serve`: start, SIGHUP reload, SIGTERM drain.
//! - [`demo`] — `tokengate demo` (plain options) and the built-in echo upstream.
//! - [`config`] — TOML config: raw serde structs → validated [`config::Config`], named defaults.
//! - [`error`] — [`error::Reject`] and the one function that turns a rejection into a response.
//! - [`token`] — token format: generate, parse, checksum, display prefix, SHA-256.
//! - [`store`] — the token store behind one handle: SQLite ([`store::sqlite`]) or PostgreSQL
//!   ([`store::postgres`], LISTEN/NOTIFY change push); migrations, accounts, tokens, change log.
//! - [`cache`] — in-memory token cache with race-free invalidation.
//! - [`lifecycle`] — every token/account operation (create, rotate, revoke, disable,
//!   retire-on-first-use) and the rule that their result is never stronger than the caller.
//! - [`path`] — canonical request paths (step 1).
//! - [`health`] — readiness checks shared by the admin `/readyz` and the public health endpoint.
//! - [`hygiene`] — request validation and header hygiene (step 1, forwarding).
//! - [`auth`] — credential extraction and token judgement (steps 3–5).
//! - [`authz`] — rule templates, matching, permissions, scopes and `decide()` (step 6).
//! - [`ratelimit`] — per-token GCRA limiter and per-IP failed-auth limiter (steps 2, 7); limits
//!   exact across replicas, GCRA in Redis ([`ratelimit::redis`]).
//! - [`audit`] — the audit log: bounded writer, hash chain, verify, reader (step 8).
//! - [`proxy`] — forwarding to upstreams, streaming bodies (step 9).
//! - [`pool`] — keep-alive connection pool to the upstreams (hyper `client::conn`), over TCP or TLS,
//!   HTTP/1.1 or HTTP/2.
//! - [`body`] — body types and the streaming size/idle guard.
//! - [`gateway`] — the state handle, config swap and background jobs.
//! - `pipeline` — the request pipeline, one function per phase, on the gateway's state.
//! - [`sdnotify`] — systemd `Type=notify` readiness, reload and stop notifications.
//! - [`server`] — listeners, TLS handshake, hyper connections, graceful drain.
//! - [`tls`] — rustls server configs from PEM files; TLS to `https://` upstreams.
//! - [`admin`] — the admin listener: health, readiness, metrics, JSON API ([`admin::api`]), web UI
//!   ([`admin::ui`]) and its sessions ([`admin::session`]).
//! - [`metrics`] — Prometheus counters and histograms.
//! - [`clock`] — wall clock in ms (advanceable in tests) and RFC 3339 formatting.

pub mod admin;
pub mod app;
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
pub mod gateway;
pub mod health;
pub mod hygiene;
pub mod lifecycle;
pub mod metrics;
pub mod path;
mod pipeline;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod sdnotify;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
