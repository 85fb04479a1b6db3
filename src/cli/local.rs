//! The commands on the local store: `account`, `token`, `audit`, `store`, `config check`.
//!
//! The CLI on the local store acts as the operator (an admin bound by policy): every token change
//! goes through [`crate::lifecycle`]. Output goes through [`super::print`].
//!
//! Must never import: `admin`, `gateway` (the CLI runs without a gateway).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::print::{self, outln, plural};
use super::{AccountCmd, AuditArgs, AuditCmd, CliError, CreateArgs, EXIT_FAILURE, TokenCmd};
use crate::app::{audit_config, load_config as app_load_config};
use crate::audit::{self, AdminRecord, AuditLog, Entry};
use crate::clock::rfc3339;
use crate::config::Config;
use crate::lifecycle::{self, Caller, RotateRequest, parse_scope, token_json};
use crate::store::{Store, TokenRow};

/// Finds the config: `--config`/`TOKENGATE_CONFIG`, else `./tokengate.toml`, else
/// `/etc/tokengate/tokengate.toml`.
pub(super) fn load_config(path: Option<&Path>) -> Result<Config, CliError> {
    Ok(app_load_config(path)?)
}

/// The OS user running the CLI: the actor of local admin events.
pub(super) fn os_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

struct Local {
    cfg: Config,
    store: Store,
    /// None when a running gateway owns the audit log: events then go through the store's
    /// outbox, and the gateway writes them within a poll interval.
    audit: Option<AuditLog>,
    actor: String,
}

impl Local {
    /// The local CLI acts as the operator: an admin, bound by policy.
    fn caller(&self) -> Caller {
        Caller::operator(self.actor.clone(), &self.cfg)
    }

    fn open(config: Option<&Path>) -> Result<Local, CliError> {
        let cfg = load_config(config)?;
        let mut store_cfg = cfg.store.options();
        store_cfg.busy_timeout = std::time::Duration::from_secs(5);
        let store =
            Store::open_existing(&store_cfg).map_err(|e| CliError::failure(e.to_string()))?;
        let audit = match AuditLog::open(audit_config(&cfg)) {
            Ok(a) => Some(a),
            Err(audit::AuditError::InUse { .. }) => None,
            Err(e) => return Err(CliError::failure(e.to_string())),
        };
        Ok(Local {
            cfg,
            store,
            audit,
            actor: os_actor(),
        })
    }

    /// Audits an event on an account (`account.created`, `account.disabled`).
    fn account_event(&self, event: &str, id: &str, name: &str) -> Result<(), CliError> {
        self.event(event, Some(id), None, Some(name), None, None)
    }

    /// Audits `token.revoked` for `row`, with the reason given.
    fn revoked_event(&self, row: &TokenRow, reason: &str) -> Result<(), CliError> {
        self.event(
            "token.revoked",
            Some(&row.id),
            Some(row),
            None,
            Some(reason),
            None,
        )
    }

    /// Before a change: the audit log must be able to take its event, or nothing is changed
    /// (a token created but never audited, its secret never printed, would hold a cap slot).
    /// When a running gateway owns the log, the event goes through the store's outbox instead.
    fn can_audit(&self) -> Result<(), CliError> {
        match &self.audit {
            Some(a) => a.check_room().map_err(|e| {
                CliError::failure(format!(
                    "nothing was changed: the audit log cannot take the event ({e}); free space or fix the audit log, then try again"
                ))
            }),
            None => Ok(()),
        }
    }

    fn event(
        &self,
        event: &str,
        target: Option<&str>,
        row: Option<&TokenRow>,
        account: Option<&str>,
        reason: Option<&str>,
        details: Option<serde_json::Value>,
    ) -> Result<(), CliError> {
        let rec = AdminRecord {
            timestamp: audit::now_rfc3339(),
            event: event.to_string(),
            actor: self.actor.clone(),
            auth_type: "cli".into(),
            target: target.map(str::to_string),
            account: account
                .map(str::to_string)
                .or_else(|| row.map(|r| r.account.clone())),
            api_token_id: row.map(|r| r.id.clone()),
            token_prefix: row.map(|r| r.prefix.clone()),
            reason: reason.map(str::to_string),
            client_ip: None,
            details,
        };
        let result = match &self.audit {
            Some(a) => a
                .record(Entry::Admin(rec))
                .and_then(|_| a.flush())
                .map_err(|e| e.to_string()),
            None => {
                let json = serde_json::to_string(&rec).expect("serializable");
                self.store.outbox_push(&json).map_err(|e| e.to_string())
            }
        };
        result.map_err(|e| {
            CliError::failure(format!(
                "the change was made, but its audit line could not be written: {e}"
            ))
        })
    }
}

/// The suffix `config check` prints after a listener address that serves TLS.
fn tls_note(tls: bool) -> &'static str {
    if tls { " (TLS)" } else { "" }
}

fn now_ms() -> i64 {
    crate::store::system_now_ms()
}

/// `store backup`: SQLite's online backup, then an integrity check of the copy.
pub(super) fn store_backup(config: Option<&Path>, file: &Path) -> Result<(), CliError> {
    let l = Local::open(config)?;
    if file.exists() {
        return Err(CliError::usage(format!(
            "{} exists; choose a new file",
            file.display()
        )));
    }
    l.store
        .backup(file)
        .map_err(|e| CliError::failure(e.to_string()))?;
    let copy = Store::open(file, std::time::Duration::from_secs(5))
        .map_err(|e| CliError::failure(e.to_string()))?;
    let check = copy
        .integrity_check()
        .map_err(|e| CliError::failure(e.to_string()))?;
    if check != "ok" {
        return Err(CliError::failure(format!(
            "backup written but integrity_check says: {check}"
        )));
    }
    eprintln!("backup written to {} (integrity_check ok)", file.display());
    Ok(())
}

/// `store init`: creates the SQLite file (never over an existing one, nor beside the `-wal` or
/// `-shm` of a deleted one), or applies the migrations on PostgreSQL.
pub(super) fn store_init(config: Option<&Path>) -> Result<(), CliError> {
    let cfg = load_config(config)?;
    let o = cfg.store.options();
    if o.url.is_some() {
        let store = Store::open_options(&o).map_err(|e| CliError::failure(e.to_string()))?;
        eprintln!(
            "store ready at {} (schema version {})",
            store.location(),
            crate::store::SCHEMA_VERSION
        );
        return Ok(());
    }
    if o.path.exists() {
        return Err(CliError::failure(format!(
            "{} exists already; nothing changed (`store init` only creates a new store)",
            o.path.display()
        )));
    }
    let leftovers = Store::leftovers(&o.path);
    if !leftovers.is_empty() {
        let names: Vec<String> = leftovers.iter().map(|p| p.display().to_string()).collect();
        return Err(CliError::failure(format!(
            "{} belong to a store that was deleted (a process may still have it open); nothing \
             changed. Stop the gateways on it, and remove them if you really mean to start over \
             with an empty store",
            names.join(" and ")
        )));
    }
    Store::open(&o.path, o.busy_timeout).map_err(|e| CliError::failure(e.to_string()))?;
    eprintln!(
        "created an empty store at {} (schema version {})",
        o.path.display(),
        crate::store::SCHEMA_VERSION
    );
    Ok(())
}

/// `store copy`: opens both locations, copies, and verifies by reading the destination back.
pub(super) fn store_copy(from: &str, to: &str) -> Result<(), CliError> {
    use crate::store::{PgOptions, is_postgres_url};
    let resolve = |v: &str| match v.strip_prefix("env:") {
        Some(name) => std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CliError::usage(format!("environment variable `{name}` is not set"))),
        None => Ok(v.to_string()),
    };
    let (from, to) = (resolve(from)?, resolve(to)?);
    if from == to {
        return Err(CliError::usage("--from and --to name the same store"));
    }
    if !is_postgres_url(&from) && !Path::new(&from).is_file() {
        return Err(CliError::usage(format!("{from}: no such store file")));
    }
    let busy = std::time::Duration::from_secs(5);
    let pg = PgOptions::default();
    let open = |loc: &str| {
        Store::open_location(loc, busy, &pg).map_err(|e| {
            CliError::failure(format!(
                "cannot open {}: {e}",
                crate::store::redact_url(loc)
            ))
        })
    };
    let src = open(&from)?;
    let dst = open(&to)?;
    let dump = src
        .copy_to(&dst)
        .map_err(|e| CliError::failure(e.to_string()))?;
    eprintln!(
        "copied {} from {} to {}; read back and identical",
        dump.summary(),
        src.location(),
        dst.location()
    );
    Ok(())
}

pub(super) fn config_check(config: Option<&Path>) -> Result<(), CliError> {
    let cfg = load_config(config)?;
    // Certificates are part of the config: `serve` would refuse to start without them.
    for files in [&cfg.server.tls, &cfg.admin.tls].into_iter().flatten() {
        crate::tls::server_config(files).map_err(|e| CliError::usage(e.to_string()))?;
    }
    let src = cfg
        .source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    outln!("{src}: OK");
    let workers = match cfg.server.workers {
        0 => String::new(),
        1 => " on 1 worker runtime of its own (server.workers)".to_string(),
        n => format!(" on {n} worker runtimes of their own (server.workers)"),
    };
    outln!(
        "  public listener  {}{}{workers}",
        cfg.server.listen,
        tls_note(cfg.server.tls.is_some())
    );
    outln!(
        "  admin listener   {}{}",
        cfg.admin.listen,
        tls_note(cfg.admin.tls.is_some())
    );
    match &cfg.store.url {
        Some(url) => outln!(
            "  store            {} (PostgreSQL)",
            crate::store::redact_url(url)
        ),
        None => outln!("  store            {}", cfg.store.path.display()),
    }
    if let Some(redis) = &cfg.rate_limit.redis {
        outln!(
            "  rate limits      exact across replicas via {}",
            crate::store::redact_url(redis)
        );
    }
    outln!(
        "  audit log        {} (on_failure = {})",
        cfg.audit
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdout".into()),
        match cfg.audit.on_failure {
            audit::OnFailure::Reject => "reject",
            audit::OnFailure::Continue => "continue",
        }
    );
    outln!(
        "  roles            {}",
        cfg.roles.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    for r in &cfg.routes {
        outln!(
            "  route {:<10} {} -> {} ({}{})",
            r.name,
            r.prefix,
            r.upstream_url,
            plural(r.rules.rules().len(), "rule", "rules"),
            if r.rules.rules().iter().any(|x| x.public) {
                ", some public"
            } else {
                ""
            }
        );
    }
    if cfg.routes.is_empty() {
        outln!("  warning: no [[routes]]: every request will be denied (403 no_rule)");
    }
    if let Some(m) = &cfg.mfa {
        println!(
            "  mfa              TOTP, key {} (required_for_admin = {}, step-up {:?})",
            m.key_file.display(),
            m.required_for_admin,
            m.step_up_ttl
        );
    }
    for r in cfg.approvals.rules.values() {
        if let Some(a) = &r.approval {
            let who: Vec<String> = a.approvers.iter().map(|x| x.to_string()).collect();
            println!(
                "  approval {:<14} {} {} ({}), window {:?}, approvers {}",
                r.name,
                r.route,
                r.path,
                r.permission.as_deref().unwrap_or("-"),
                a.window,
                who.join(", ")
            );
        }
    }
    if let Some(w) = &cfg.approvals.webhook {
        println!("  approval webhook {} ({} attempts)", w.url, w.max_attempts);
    }
    if !cfg.admin.listen.ip().is_loopback() && cfg.admin.tls.is_none() {
        outln!("  warning: the admin listener is not on loopback and has no TLS");
    }
    if !cfg.server.listen.ip().is_loopback() && cfg.server.tls.is_none() {
        outln!(
            "  note: the public listener has no TLS; put a TLS terminator in front or set server.tls"
        );
    }
    Ok(())
}

pub(super) fn account(config: Option<&Path>, cmd: &AccountCmd) -> Result<(), CliError> {
    let l = Local::open(config)?;
    match cmd {
        AccountCmd::Create { name, email, json } => {
            super::check_name(
                name,
                "._-@",
                "account names are 1-64 letters, digits, `.`, `_`, `-`, `@`",
            )?;
            l.can_audit()?;
            let acc = l
                .store
                .create_account(name, email.as_deref(), &l.actor, now_ms())?;
            l.account_event("account.created", &acc.id, &acc.name)?;
            print::account_created(&lifecycle::account_json(&acc), *json);
            Ok(())
        }
        AccountCmd::List { json } => {
            let list = l.store.list_accounts()?;
            let views: Vec<_> = list.iter().map(lifecycle::account_json).collect();
            print::account_list(&views, *json);
            Ok(())
        }
        AccountCmd::Disable { name } => {
            l.can_audit()?;
            let acc = lifecycle::disable_account(&l.store, &l.caller(), name, now_ms())?;
            l.account_event("account.disabled", &acc.id, &acc.name)?;
            outln!(
                "disabled account {}: its tokens are rejected from now on",
                acc.name
            );
            Ok(())
        }
        AccountCmd::ResetMfa { name } => {
            l.can_audit()?;
            let acc = l.store.get_account(name)?;
            if !l.store.mfa_remove(&acc.id)? {
                return Err(CliError::failure(format!(
                    "account {} has no TOTP enrolment",
                    acc.name
                )));
            }
            l.account_event("mfa.reset", &acc.id, &acc.name)?;
            println!(
                "removed the TOTP enrolment of {}: it enrols again in the web UI",
                acc.name
            );
            Ok(())
        }
    }
}

/// The creation request of `token create`'s flags.
pub(super) fn create_request(a: &CreateArgs) -> Result<crate::lifecycle::CreateRequest, CliError> {
    let mut scopes = BTreeMap::new();
    for s in &a.scope {
        let (k, v) = parse_scope(s).map_err(CliError::usage)?;
        scopes.insert(k, v);
    }
    let account = a.account.clone().ok_or_else(|| {
        CliError::usage("--account is required (a default context applies to remote profiles only)")
    })?;
    Ok(crate::lifecycle::CreateRequest {
        account,
        name: a.name.clone(),
        role: a.role.clone(),
        permissions: a.permission.clone(),
        expires: a.expires.clone(),
        scopes,
        allowed_cidrs: a.allow_ip.clone(),
        rate: a.rate.clone(),
    })
}

/// A new token's JSON view with its plaintext, for [`print::new_token`] (printed once).
fn new_view(row: &TokenRow, plaintext: &str, now: i64) -> serde_json::Value {
    let mut v = token_json(row, now);
    v["token"] = plaintext.into();
    v
}

pub(super) fn token(config: Option<&Path>, cmd: &TokenCmd) -> Result<(), CliError> {
    let l = Local::open(config)?;
    let now = now_ms();
    match cmd {
        TokenCmd::Create(a) => {
            let req = create_request(a)?;
            l.can_audit()?;
            let (row, new) = lifecycle::create(&l.store, &l.cfg, &l.caller(), &req, now)?;
            l.event(
                "token.created",
                Some(&row.id),
                Some(&row),
                None,
                None,
                Some(serde_json::json!({"name": row.name, "role": row.role, "permissions": row.permissions, "expires_at": row.expires_at.map(rfc3339)})),
            )?;
            print::new_token(&new_view(&row, &new.plaintext, now), a.json, "created");
            Ok(())
        }
        TokenCmd::List {
            account,
            stale,
            expiring,
            all,
            json,
        } => {
            let filter = lifecycle::ListFilter::parse(stale.as_deref(), expiring.as_deref())
                .map_err(CliError::usage)?;
            let views: Vec<_> = l
                .store
                .list_tokens(account.as_deref(), *all, now)?
                .iter()
                .filter(|t| filter.keeps(t, now))
                .map(|t| token_json(t, now))
                .collect();
            print::token_list(&views, *json);
            Ok(())
        }
        TokenCmd::Show { id, json } => {
            let t = l.store.find_token(id)?;
            print::token_show(&token_json(&t, now), *json);
            Ok(())
        }
        TokenCmd::Revoke { id, reason } => {
            let t = l.store.find_token(id)?;
            l.can_audit()?;
            let row = lifecycle::revoke(&l.store, &l.caller(), &t, reason, now)?;
            l.revoked_event(&row, reason)?;
            outln!("revoked {} ({}, {})", row.id, row.prefix, row.name);
            Ok(())
        }
        TokenCmd::Rotate {
            id,
            grace,
            expires,
            json,
        } => {
            let old = l.store.find_token(id)?;
            let req = RotateRequest {
                grace: grace.clone(),
                expires: expires.clone(),
            };
            l.can_audit()?;
            let (row, new, grace) =
                lifecycle::rotate(&l.store, &l.cfg, &l.caller(), &old, &req, now)?;
            let old = row.rotated_from.clone().unwrap_or_default();
            l.event(
                "token.rotated",
                Some(&old),
                Some(&row),
                None,
                None,
                Some(serde_json::json!({"new_token_id": row.id, "grace_seconds": grace.as_secs()})),
            )?;
            print::new_token(&new_view(&row, &new.plaintext, now), *json, "rotated: new");
            print::rotated(&old, grace.as_secs());
            Ok(())
        }
        TokenCmd::Identify {
            revoke,
            reason,
            json,
        } => {
            let line = super::read_identify_token()?;
            let raw = line.as_str();
            let parsed = crate::token::parse(raw).map_err(super::not_a_token)?;
            let found = l.store.lookup_hash(&parsed.hash())?;
            let Some(t) = found else {
                l.event(
                    "token.identified",
                    None,
                    None,
                    None,
                    Some("unknown_token"),
                    Some(serde_json::json!({"prefix": parsed.display_prefix()})),
                )?;
                return Err(CliError::failure(format!(
                    "{}… is well-formed but not in this store (another deployment, or already deleted)",
                    parsed.display_prefix()
                )));
            };
            l.event("token.identified", Some(&t.id), Some(&t), None, None, None)?;
            let t = if *revoke && t.revoked_at.is_none() {
                let r = lifecycle::revoke(&l.store, &l.caller(), &t, reason, now)?;
                l.revoked_event(&r, reason)?;
                r
            } else {
                t
            };
            print::token_show(&token_json(&t, now), *json);
            if *revoke && !*json {
                outln!("revoked: a running gateway on this store rejects it within a second");
            }
            Ok(())
        }
    }
}

pub(super) fn audit_cmd(config: Option<&Path>, a: &AuditArgs) -> Result<(), CliError> {
    let default_files = |files: &[PathBuf]| -> Result<Vec<PathBuf>, CliError> {
        if !files.is_empty() {
            return Ok(files.to_vec());
        }
        let cfg = load_config(config)?;
        match cfg.audit.path {
            Some(p) => Ok(vec![p]),
            None => Err(CliError::usage(
                "audit.path is stdout (\"-\"): pass the files to read",
            )),
        }
    };
    if let Some(AuditCmd::Verify {
        files,
        allow_partial_start,
    }) = &a.verify
    {
        let files = default_files(files)?;
        let opts = audit::VerifyOptions {
            allow_partial_start: *allow_partial_start,
        };
        let report =
            audit::verify_with(&files, opts).map_err(|e| CliError::failure(e.to_string()))?;
        outln!("{report}");
        return if report.is_complete() {
            Ok(())
        } else if report.is_ok() {
            // The chain is intact, but forwarded requests have no completion line.
            Err(CliError {
                code: super::EXIT_INCOMPLETE,
                message: String::new(),
            })
        } else {
            Err(CliError {
                code: EXIT_FAILURE,
                message: String::new(),
            })
        };
    }
    let files = default_files(&a.files)?;
    let now = time::OffsetDateTime::now_utc();
    let parse_t = |s: &Option<String>| -> Result<Option<time::OffsetDateTime>, CliError> {
        s.as_deref()
            .map(|x| audit::parse_time_arg(x, now).map_err(CliError::usage))
            .transpose()
    };
    let filter = audit::Filter {
        token: a.token.clone(),
        account: a.account.clone(),
        decision: a.decision.clone(),
        reason: a.reason.clone(),
        status: a.status.clone(),
        since: parse_t(&a.since)?,
        until: parse_t(&a.until)?,
        event: a.event.clone(),
    };
    if let Some(d) = &filter.decision {
        if d != "allow" && d != "deny" {
            return Err(CliError::usage("--decision is allow or deny"));
        }
    }
    let format = if a.json {
        audit::OutputFormat::Json
    } else {
        audit::OutputFormat::Table
    };
    let mut out = std::io::LineWriter::new(print::Stdout);
    let mut err = std::io::stderr().lock();
    if a.follow {
        let last = files.last().expect("at least one file");
        audit::follow(last, &filter, format, &mut out, &|| false).map_err(audit_error)
    } else {
        audit::query(&files, &filter, format, &mut out, &mut err)
            .map(|_| ())
            .map_err(audit_error)
    }
}

/// A bad filter (`--status 4x`) is a usage error (64), like a bad `--decision` or `--since`.
fn audit_error(e: audit::AuditError) -> CliError {
    match e {
        audit::AuditError::Filter(_) => CliError::usage(e.to_string()),
        e => CliError::failure(e.to_string()),
    }
}
