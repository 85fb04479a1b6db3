//! Command line (SPEC §10): clap definitions and the local-store commands.
//!
//! Exit codes: 0 ok, 64 bad usage or config, 1 failure. Tokens are printed once, at creation or
//! rotation, on stdout's first line; they are never read from argv (`token identify` reads stdin).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::audit::{self, AdminRecord, AuditConfig, AuditLog, Entry};
use crate::clock::rfc3339;
use crate::config::{Config, Expiry, parse_duration};
use crate::store::{NewTokenSpec, RateOverride, Store, StoreError, TokenRow};

/// Exit code for bad usage or config (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for failures.
pub const EXIT_FAILURE: u8 = 1;

const ROOT_EXAMPLES: &str = "\
Examples:
  tokengate demo                                   # try it: gateway + echo upstream + tokens
  tokengate --config /etc/tokengate/tokengate.toml config check
  tokengate account create ci-bot
  tokengate token create --account ci-bot --name deploy --role cicd --expires 30d
  tokengate token list --expiring 7d
  echo \"$LEAKED\" | tokengate token identify --revoke
  tokengate audit --token tg_3hT9aB2x --since 1h
  pbpaste | tokengate login --url http://127.0.0.1:9090   # then token/account commands run remotely
  tokengate --profile staging token list";

/// tokengate: a Bearer-token authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "tokengate", version, about, after_help = ROOT_EXAMPLES)]
pub struct Cli {
    /// Config file (default: ./tokengate.toml).
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "TOKENGATE_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Operational log format (the audit log is separate and always JSON).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Admin API of a remote gateway (e.g. http://127.0.0.1:9090): `token` and `account` commands
    /// then run there, with the token from TOKENGATE_TOKEN or the credentials file.
    #[arg(long, global = true, env = "TOKENGATE_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Saved remote profile (see `tokengate login --profile NAME`); implies remote mode.
    #[arg(long, global = true, env = "TOKENGATE_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (public and admin listeners) until SIGTERM or ctrl-c; SIGHUP reloads.
    #[command(after_help = "Example:\n  tokengate --config /etc/tokengate/tokengate.toml serve")]
    Serve,
    /// Start a throw-away gateway in front of a built-in echo upstream, with fresh tokens.
    #[command(after_help = "Example:\n  cargo run --release -- demo")]
    Demo(DemoArgs),
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage accounts (owners of tokens).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Read and verify the audit log.
    Audit(AuditArgs),
    /// Store maintenance.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Save a token for a remote gateway's admin API; the token is read from stdin or TOKENGATE_TOKEN.
    #[command(
        after_help = "Examples:\n  pbpaste | tokengate login --url http://127.0.0.1:9090\n  TOKENGATE_TOKEN=\"$T\" tokengate login --profile staging --url https://gw.example.com:9090\n\nCredentials: $XDG_CONFIG_HOME/tokengate/credentials (else ~/.config/tokengate/credentials), mode 0600."
    )]
    Login,
    /// Forget a saved remote profile (the token itself stays valid until revoked).
    #[command(after_help = "Example:\n  tokengate logout --profile staging")]
    Logout,
    /// Show which token the remote CLI acts with.
    #[command(after_help = "Example:\n  tokengate whoami --profile staging")]
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Public port to try first (the next free one is used if taken).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Exit after printing the tokens and curl lines (for scripts and tests).
    #[arg(long, hide = true)]
    pub print_only: bool,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate the config file and explain what it sets up.
    #[command(after_help = "Example:\n  tokengate --config config/tokengate.toml config check")]
    Check,
}

/// `account` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Create an account.
    #[command(after_help = "Example:\n  tokengate account create ci-bot --email ci@example.com")]
    Create {
        /// Account name: letters, digits, `.`, `_`, `-`, `@`.
        name: String,
        /// Contact email.
        #[arg(long)]
        email: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List accounts.
    #[command(after_help = "Example:\n  tokengate account list --json")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable an account: all of its tokens are rejected at once.
    #[command(after_help = "Example:\n  tokengate account disable ci-bot")]
    Disable {
        /// Account name or id.
        name: String,
    },
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token; it is printed once on stdout's first line.
    #[command(
        after_help = "Examples:\n  tokengate token create --account ci-bot --name deploy --role cicd --expires 30d\n  tokengate token create --account ops --name readonly --permission apps:read --scope app=billing,web-* --allow-ip 10.0.0.0/8 --rate 5/10 --json"
    )]
    Create(CreateArgs),
    /// List tokens.
    #[command(
        after_help = "Examples:\n  tokengate token list\n  tokengate token list --stale 90d\n  tokengate token list --expiring 7d --json"
    )]
    List {
        /// Only this account's tokens.
        #[arg(long)]
        account: Option<String>,
        /// Only tokens not used for this long (e.g. 90d).
        #[arg(long, value_name = "AGE")]
        stale: Option<String>,
        /// Only tokens expiring within this long (e.g. 7d).
        #[arg(long, value_name = "WITHIN")]
        expiring: Option<String>,
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one token.
    #[command(after_help = "Example:\n  tokengate token show tg_3hT9aB2x")]
    Show {
        /// Token id or display prefix.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token; a running gateway on this store rejects it within a second.
    #[command(
        after_help = "Example:\n  tokengate token revoke tg_3hT9aB2x --reason \"left the team\""
    )]
    Revoke {
        /// Token id or display prefix.
        id: String,
        /// Why (kept in the store and the audit log).
        #[arg(long, default_value = "revoked")]
        reason: String,
    },
    /// Issue a successor; the old token works until the new one is used or the grace ends.
    #[command(after_help = "Example:\n  tokengate token rotate tg_3hT9aB2x --grace 1h")]
    Rotate {
        /// Token id or display prefix.
        id: String,
        /// How long the old token stays valid at most (default tokens.rotation_grace).
        #[arg(long)]
        grace: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Identify a token read from stdin (for leaks); optionally revoke it.
    #[command(after_help = "Example:\n  pbpaste | tokengate token identify --revoke")]
    Identify {
        /// Revoke the token too.
        #[arg(long)]
        revoke: bool,
        /// Reason recorded with --revoke.
        #[arg(long, default_value = "leaked")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `token create` options.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("grant").required(true).args(["role", "permission"])))]
pub struct CreateArgs {
    /// Owning account.
    #[arg(long)]
    pub account: String,
    /// Label shown in lists and logs.
    #[arg(long)]
    pub name: String,
    /// Role whose permissions are copied onto the token.
    #[arg(long)]
    pub role: Option<String>,
    /// Explicit permission (repeatable), e.g. apps:read.
    #[arg(long = "permission", value_name = "PERMISSION")]
    pub permission: Vec<String>,
    /// Expiry preset: 7d, 30d, 90d, 180d, 365d or never.
    #[arg(long)]
    pub expires: Option<String>,
    /// Restrict a captured name: KEY=V1,V2 (repeatable; `*` globs).
    #[arg(long = "scope", value_name = "KEY=V1,V2")]
    pub scope: Vec<String>,
    /// Allowed client network (repeatable), IPv4 or IPv6 CIDR.
    #[arg(long = "allow-ip", value_name = "CIDR")]
    pub allow_ip: Vec<String>,
    /// Rate-limit override: RPS/BURST.
    #[arg(long, value_name = "RPS/BURST")]
    pub rate: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `audit` options.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
#[command(
    after_help = "Examples:\n  tokengate audit --token tg_3hT9aB2x --since 24h\n  tokengate audit --decision deny --status 4xx --json\n  tokengate audit --follow\n  tokengate audit verify"
)]
pub struct AuditArgs {
    /// Verify the hash chain.
    #[command(subcommand)]
    pub verify: Option<AuditCmd>,
    /// Token name, id or prefix.
    #[arg(long)]
    pub token: Option<String>,
    /// Account name.
    #[arg(long)]
    pub account: Option<String>,
    /// allow or deny.
    #[arg(long)]
    pub decision: Option<String>,
    /// Reason (ok, revoked, no_rule, ...).
    #[arg(long)]
    pub reason: Option<String>,
    /// Status: exact (403) or class (4xx).
    #[arg(long)]
    pub status: Option<String>,
    /// Admin event (token.created, ...).
    #[arg(long)]
    pub event: Option<String>,
    /// Start: relative (1h, 7d) or RFC 3339.
    #[arg(long)]
    pub since: Option<String>,
    /// End: relative or RFC 3339.
    #[arg(long)]
    pub until: Option<String>,
    /// Keep printing new lines (survives rotation).
    #[arg(long)]
    pub follow: bool,
    /// Print the JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Log files, oldest first (default: audit.path from the config).
    pub files: Vec<PathBuf>,
}

/// `audit verify`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; prints OK with the line count, or the first bad line.
    #[command(after_help = "Example:\n  tokengate audit verify audit.log.2 audit.log.1 audit.log")]
    Verify {
        /// Files, oldest first (default: audit.path).
        files: Vec<PathBuf>,
        /// Accept a set whose oldest file does not start at seq 1 (older files deleted by retention).
        #[arg(long)]
        allow_partial_start: bool,
    },
}

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Create the store `store.path` names (SQLite), or the tables of `store.url` (PostgreSQL).
    /// The only command that creates a SQLite file: every other one, and `serve` after its first
    /// start, fails when the file is missing instead of starting over with an empty store.
    #[command(
        after_help = "Example:\n  tokengate --config /etc/tokengate/tokengate.toml store init"
    )]
    Init,
    /// Online backup through SQLite's backup API.
    #[command(
        after_help = "Example:\n  tokengate store backup /var/backups/tokengate-$(date +%F).db"
    )]
    Backup {
        /// Destination file (must not exist).
        file: PathBuf,
    },
    /// Copy a whole store into an empty one, on either engine: accounts, tokens (their hashes:
    /// every token stays valid), the change log and queued audit events, every field; verified
    /// by reading the destination back. Stop the gateways (or make them read-only) first.
    #[command(
        after_help = "Examples:\n  tokengate store copy --from /var/lib/tokengate/tokengate.db --to env:TOKENGATE_STORE_URL\n  tokengate store copy --from postgres://tokengate@db.internal/tokengate --to ./tokengate.db\n\nA location is a SQLite file, a postgres:// URL, or env:NAME to read either from the\nenvironment (keeps passwords out of argv)."
    )]
    Copy {
        /// Source: SQLite file, postgres:// URL, or env:NAME.
        #[arg(long, value_name = "FILE_OR_URL")]
        from: String,
        /// Destination, which must be empty: SQLite file, postgres:// URL, or env:NAME.
        #[arg(long, value_name = "FILE_OR_URL")]
        to: String,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    /// Bad usage or config (64).
    pub fn usage(m: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: m.into(),
        }
    }
    /// Failure (1).
    pub fn failure(m: impl Into<String>) -> Self {
        CliError {
            code: EXIT_FAILURE,
            message: m.into(),
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoAccount(_)
            | StoreError::AccountExists(_)
            | StoreError::NoToken(_)
            | StoreError::Ambiguous(_)
            | StoreError::AlreadyRevoked(_)
            | StoreError::AccountDisabled(_)
            | StoreError::CapReached { .. } => CliError::failure(e.to_string()),
            _ => CliError::failure(format!("{e}")),
        }
    }
}

/// Finds the config: `--config`/`TOKENGATE_CONFIG`, else `./tokengate.toml`.
pub fn load_config(path: Option<&Path>) -> Result<Config, CliError> {
    let p = path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("tokengate.toml"));
    if path.is_none() && !p.exists() {
        return Err(CliError::usage(
            "no config file: pass --config FILE (or set TOKENGATE_CONFIG), or try `tokengate demo`; \
             config/tokengate.toml in the repository is an annotated example",
        ));
    }
    Config::load(&p).map_err(|e| CliError::usage(e.to_string()))
}

/// The OS user running the CLI: the actor of local admin events.
pub fn os_actor() -> String {
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

/// Builds the audit writer config from the validated config.
pub fn audit_config(cfg: &Config) -> AuditConfig {
    AuditConfig {
        path: cfg.audit.path.clone(),
        on_failure: cfg.audit.on_failure,
        max_bytes: cfg.audit.max_bytes,
        queue: cfg.audit.queue,
    }
}

fn now_ms() -> i64 {
    crate::store::system_now_ms()
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn fmt_time(ms: Option<i64>) -> String {
    ms.map(|m| rfc3339(m)[..16].replace('T', " "))
        .unwrap_or_else(|| "-".into())
}

/// JSON view of a token for `--json` output (never the hash, never the plaintext).
pub fn token_json(t: &TokenRow, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "name": t.name,
        "prefix": t.prefix,
        "account": t.account,
        "role": t.role,
        "permissions": t.permissions,
        "scopes": t.scopes,
        "allowed_cidrs": t.allowed_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "rate_limit": t.rate,
        "created_at": rfc3339(t.created_at),
        "created_by": t.created_by,
        "expires_at": t.expires_at.map(rfc3339),
        "last_used_at": t.last_used_at.map(rfc3339),
        "last_used_ip": t.last_used_ip,
        "revoked_at": t.revoked_at.map(rfc3339),
        "revoked_by": t.revoked_by,
        "revoke_reason": t.revoke_reason,
        "rotated_from": t.rotated_from,
        "rotation_deadline": t.rotation_deadline.map(rfc3339),
        "status": t.status(now),
    })
}

/// Runs the local-store commands (everything but `serve` and `demo`).
pub fn run_local(cli: &Cli) -> Result<(), CliError> {
    let config = cli.config.as_deref();
    match &cli.command {
        Command::Serve | Command::Demo(_) => unreachable!("handled by main"),
        Command::Config(ConfigCmd::Check) => config_check(config),
        Command::Login => crate::remote::login(cli),
        Command::Logout => crate::remote::logout(cli),
        Command::Whoami { json } => crate::remote::whoami(cli, *json),
        Command::Account(cmd) => match crate::remote::target(cli)? {
            Some(t) => crate::remote::run(&t, &cli.command),
            None => account(config, cmd),
        },
        Command::Token(cmd) => match crate::remote::target(cli)? {
            Some(t) => crate::remote::run(&t, &cli.command),
            None => token(config, cmd),
        },
        Command::Audit(args) => audit_cmd(config, args),
        Command::Store(StoreCmd::Backup { file }) => {
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
        Command::Store(StoreCmd::Copy { from, to }) => store_copy(from, to),
        Command::Store(StoreCmd::Init) => store_init(config),
    }
}

/// `store init`: creates the SQLite file (never over an existing one, nor beside the `-wal` or
/// `-shm` of a deleted one), or applies the migrations on PostgreSQL.
fn store_init(config: Option<&Path>) -> Result<(), CliError> {
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
fn store_copy(from: &str, to: &str) -> Result<(), CliError> {
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

fn config_check(config: Option<&Path>) -> Result<(), CliError> {
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
    println!("{src}: OK");
    println!(
        "  public listener  {}{}",
        cfg.server.listen,
        if cfg.server.tls.is_some() {
            " (TLS)"
        } else {
            ""
        }
    );
    println!(
        "  admin listener   {}{}",
        cfg.admin.listen,
        if cfg.admin.tls.is_some() {
            " (TLS)"
        } else {
            ""
        }
    );
    match &cfg.store.url {
        Some(url) => println!(
            "  store            {} (PostgreSQL)",
            crate::store::redact_url(url)
        ),
        None => println!("  store            {}", cfg.store.path.display()),
    }
    if let Some(redis) = &cfg.rate_limit.redis {
        println!(
            "  rate limits      exact across replicas via {}",
            crate::store::redact_url(redis)
        );
    }
    println!(
        "  audit log        {} (on_failure = {:?})",
        cfg.audit
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdout".into()),
        cfg.audit.on_failure
    );
    println!(
        "  roles            {}",
        cfg.roles.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    for r in &cfg.routes {
        println!(
            "  route {:<10} {} -> {} ({} rules{})",
            r.name,
            r.prefix,
            r.upstream_url,
            r.rules.rules().len(),
            if r.rules.rules().iter().any(|x| x.public) {
                ", some public"
            } else {
                ""
            }
        );
    }
    if cfg.routes.is_empty() {
        println!("  warning: no [[routes]]: every request will be denied (403 no_rule)");
    }
    if !cfg.admin.listen.ip().is_loopback() && cfg.admin.tls.is_none() {
        println!("  warning: the admin listener is not on loopback and has no TLS");
    }
    if !cfg.server.listen.ip().is_loopback() && cfg.server.tls.is_none() {
        println!(
            "  note: the public listener has no TLS; put a TLS terminator in front or set server.tls"
        );
    }
    Ok(())
}

fn account(config: Option<&Path>, cmd: &AccountCmd) -> Result<(), CliError> {
    let l = Local::open(config)?;
    match cmd {
        AccountCmd::Create { name, email, json } => {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
            {
                return Err(CliError::usage(
                    "account names are 1-64 letters, digits, `.`, `_`, `-`, `@`",
                ));
            }
            let acc = l
                .store
                .create_account(name, email.as_deref(), &l.actor, now_ms())?;
            l.event(
                "account.created",
                Some(&acc.id),
                None,
                Some(&acc.name),
                None,
                None,
            )?;
            if *json {
                print_json(&acc);
            } else {
                println!("created account {} ({})", acc.name, acc.id);
            }
            Ok(())
        }
        AccountCmd::List { json } => {
            let list = l.store.list_accounts()?;
            if *json {
                print_json(&list);
            } else {
                println!(
                    "{:<24} {:<22} {:<28} {:<17} STATUS",
                    "NAME", "ID", "EMAIL", "CREATED"
                );
                for a in list {
                    println!(
                        "{:<24} {:<22} {:<28} {:<17} {}",
                        a.name,
                        a.id,
                        a.email.as_deref().unwrap_or("-"),
                        fmt_time(Some(a.created_at)),
                        if a.disabled_at.is_some() {
                            "disabled"
                        } else {
                            "active"
                        }
                    );
                }
            }
            Ok(())
        }
        AccountCmd::Disable { name } => {
            let acc = l.store.disable_account(name, &l.actor, now_ms())?;
            l.event(
                "account.disabled",
                Some(&acc.id),
                None,
                Some(&acc.name),
                None,
                None,
            )?;
            println!(
                "disabled account {}: its tokens are rejected from now on",
                acc.name
            );
            Ok(())
        }
    }
}

/// Parses `KEY=V1,V2`.
pub fn parse_scope(s: &str) -> Result<(String, Vec<String>), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: scopes look like KEY=V1,V2"))?;
    let vals: Vec<String> = v
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    crate::authz::validate_scope(k, &vals).map_err(|e| e.to_string())?;
    Ok((k.to_string(), vals))
}

/// Parses `RPS/BURST`.
pub fn parse_rate(s: &str) -> Result<RateOverride, String> {
    let (r, b) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: a rate looks like RPS/BURST, e.g. 5/10"))?;
    let rps: f64 = r
        .parse()
        .ok()
        .filter(|x: &f64| *x > 0.0 && x.is_finite())
        .ok_or_else(|| format!("`{r}` is not a positive rate"))?;
    let burst: u32 = b
        .parse()
        .ok()
        .filter(|x| *x > 0)
        .ok_or_else(|| format!("`{b}` is not a positive burst"))?;
    Ok(RateOverride {
        requests_per_second: rps,
        burst,
    })
}

/// Validates a token label.
pub fn valid_token_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_graphic() || c == ' ')
}

/// Turns create options into a spec, checking them against the config.
pub fn build_spec(
    cfg: &Config,
    a: &CreateArgs,
    actor: &str,
    now: i64,
) -> Result<NewTokenSpec, CliError> {
    if !valid_token_name(&a.name) {
        return Err(CliError::usage(
            "token names are 1-64 printable ASCII characters",
        ));
    }
    let (role, permissions) = match &a.role {
        Some(r) => {
            let role = cfg.roles.get(r).ok_or_else(|| {
                CliError::usage(format!(
                    "no role `{r}`; roles: {}",
                    cfg.roles.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            let mut perms = role.permissions.clone();
            for p in &a.permission {
                if !perms.contains(p) {
                    perms.push(p.clone());
                }
            }
            (Some(r.clone()), perms)
        }
        None => (None, a.permission.clone()),
    };
    for p in &permissions {
        crate::authz::validate_permission(p).map_err(|e| CliError::usage(e.to_string()))?;
    }
    let expiry = match &a.expires {
        Some(e) => Expiry::parse(e).map_err(CliError::usage)?,
        None => cfg.tokens.default_expiry,
    };
    if !cfg.tokens.allowed_expiry.contains(&expiry) {
        return Err(CliError::usage(format!(
            "expiry `{expiry}` is not allowed by policy; allowed: {}",
            cfg.tokens
                .allowed_expiry
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let expires_at = match expiry {
        Expiry::Days(d) => Some(now + d as i64 * 86_400_000),
        Expiry::Never => None,
    };
    let mut scopes = BTreeMap::new();
    for s in &a.scope {
        let (k, v) = parse_scope(s).map_err(CliError::usage)?;
        scopes.insert(k, v);
    }
    let mut allowed_cidrs = Vec::new();
    for c in &a.allow_ip {
        let net = c
            .parse::<ipnet::IpNet>()
            .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                CliError::usage(format!(
                    "`{c}` is not a CIDR like 10.0.0.0/8 or 2001:db8::/32"
                ))
            })?;
        allowed_cidrs.push(net);
    }
    let rate = a
        .rate
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(CliError::usage)?;
    Ok(NewTokenSpec {
        account: a.account.clone(),
        name: a.name.clone(),
        role,
        permissions,
        scopes,
        allowed_cidrs,
        rate,
        expires_at,
        created_by: actor.to_string(),
    })
}

fn print_new_token(plaintext: &str, row: &TokenRow, json: bool, verb: &str) {
    // The token alone on stdout's first line (or in `token` with --json); the reminder on stderr.
    if json {
        let mut v = token_json(row, now_ms());
        v["token"] = plaintext.into();
        println!("{}", serde_json::to_string(&v).expect("json"));
    } else {
        println!("{plaintext}");
    }
    let _ = std::io::stdout().flush();
    eprintln!(
        "{verb} token {} ({}) for account {}, expires {}. Copy it now: it will not be shown again.",
        row.id,
        row.prefix,
        row.account,
        row.expires_at
            .map(rfc3339)
            .unwrap_or_else(|| "never".into())
    );
}

fn token(config: Option<&Path>, cmd: &TokenCmd) -> Result<(), CliError> {
    let l = Local::open(config)?;
    let now = now_ms();
    match cmd {
        TokenCmd::Create(a) => {
            let spec = build_spec(&l.cfg, a, &l.actor, now)?;
            let (row, new) = l.store.create_token(
                &spec,
                &l.cfg.tokens.prefix,
                l.cfg.tokens.max_active_per_account,
                now,
            )?;
            l.event(
                "token.created",
                Some(&row.id),
                Some(&row),
                None,
                None,
                Some(serde_json::json!({"name": row.name, "role": row.role, "permissions": row.permissions, "expires_at": row.expires_at.map(rfc3339)})),
            )?;
            print_new_token(&new.plaintext, &row, a.json, "created");
            Ok(())
        }
        TokenCmd::List {
            account,
            stale,
            expiring,
            all,
            json,
        } => {
            let stale_ms = stale
                .as_deref()
                .map(|s| parse_duration(s).map(|d| d.as_millis() as i64))
                .transpose()
                .map_err(CliError::usage)?;
            let exp_ms = expiring
                .as_deref()
                .map(|s| parse_duration(s).map(|d| d.as_millis() as i64))
                .transpose()
                .map_err(CliError::usage)?;
            let rows: Vec<TokenRow> = l
                .store
                .list_tokens(account.as_deref(), *all, now)?
                .into_iter()
                .filter(|t| {
                    stale_ms.is_none_or(|s| t.last_used_at.unwrap_or(t.created_at) < now - s)
                })
                .filter(|t| {
                    exp_ms.is_none_or(|w| t.expires_at.is_some_and(|e| e > now && e <= now + w))
                })
                .collect();
            if *json {
                print_json(&rows.iter().map(|t| token_json(t, now)).collect::<Vec<_>>());
            } else {
                print_token_table(&rows, now);
            }
            Ok(())
        }
        TokenCmd::Show { id, json } => {
            let t = l.store.find_token(id)?;
            if *json {
                print_json(&token_json(&t, now));
            } else {
                print_token_detail(&t, now);
            }
            Ok(())
        }
        TokenCmd::Revoke { id, reason } => {
            let t = l.store.find_token(id)?;
            let row = l.store.revoke(&t.id, &l.actor, reason, now)?;
            l.event(
                "token.revoked",
                Some(&row.id),
                Some(&row),
                None,
                Some(reason),
                None,
            )?;
            println!("revoked {} ({}, {})", row.id, row.prefix, row.name);
            Ok(())
        }
        TokenCmd::Rotate { id, grace, json } => {
            let grace = match grace {
                Some(g) => parse_duration(g).map_err(CliError::usage)?,
                None => l.cfg.tokens.rotation_grace,
            };
            let (row, new) = l.store.rotate(
                id,
                &l.actor,
                grace.as_millis() as i64,
                &l.cfg.tokens.prefix,
                now,
            )?;
            let old = row.rotated_from.clone().unwrap_or_default();
            l.event(
                "token.rotated",
                Some(&old),
                Some(&row),
                None,
                None,
                Some(serde_json::json!({"new_token_id": row.id, "grace_seconds": grace.as_secs()})),
            )?;
            print_new_token(&new.plaintext, &row, *json, "rotated: new");
            eprintln!(
                "the old token {old} keeps working until the new one is first used, or for {}s at most",
                grace.as_secs()
            );
            Ok(())
        }
        TokenCmd::Identify {
            revoke,
            reason,
            json,
        } => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| CliError::failure(format!("cannot read stdin: {e}")))?;
            let raw = line.trim();
            if raw.is_empty() {
                return Err(CliError::usage(
                    "paste the token on stdin, e.g. `pbpaste | tokengate token identify`",
                ));
            }
            let parsed = crate::token::parse(raw)
                .map_err(|e| CliError::failure(format!("this is not a tokengate token: {e}")))?;
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
                let r = l.store.revoke(&t.id, &l.actor, reason, now)?;
                l.event(
                    "token.revoked",
                    Some(&r.id),
                    Some(&r),
                    None,
                    Some(reason),
                    None,
                )?;
                r
            } else {
                t
            };
            if *json {
                print_json(&token_json(&t, now));
            } else {
                print_token_detail(&t, now);
                if *revoke {
                    println!("revoked: a running gateway on this store rejects it within a second");
                }
            }
            Ok(())
        }
    }
}

/// Prints tokens as a table.
pub fn print_token_table(rows: &[TokenRow], now: i64) {
    println!(
        "{:<21} {:<20} {:<12} {:<14} {:<9} {:<20} {:<16} {:<16} {:<16} STATUS",
        "ID", "NAME", "PREFIX", "ACCOUNT", "ROLE", "SCOPES", "CREATED", "EXPIRES", "LAST USED"
    );
    for t in rows {
        let scopes = if t.scopes.is_empty() {
            "-".to_string()
        } else {
            t.scopes
                .iter()
                .map(|(k, v)| format!("{k}={}", v.join(",")))
                .collect::<Vec<_>>()
                .join(";")
        };
        println!(
            "{:<21} {:<20} {:<12} {:<14} {:<9} {:<20} {:<16} {:<16} {:<16} {}",
            t.id,
            t.name,
            t.prefix,
            t.account,
            t.role.as_deref().unwrap_or("-"),
            scopes,
            fmt_time(Some(t.created_at)),
            t.expires_at
                .map(|e| fmt_time(Some(e)))
                .unwrap_or_else(|| "never".into()),
            fmt_time(t.last_used_at),
            t.status(now)
        );
    }
}

fn print_token_detail(t: &TokenRow, now: i64) {
    let v = token_json(t, now);
    if let serde_json::Value::Object(m) = v {
        for (k, v) in m {
            let s = match v {
                serde_json::Value::Null => "-".to_string(),
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            println!("{k:<18} {s}");
        }
    }
}

fn audit_cmd(config: Option<&Path>, a: &AuditArgs) -> Result<(), CliError> {
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
        println!("{report}");
        return if report.problem.is_none() {
            Ok(())
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
    let mut out = std::io::stdout().lock();
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

/// Maps a result to the process exit code, printing the error.
pub fn exit(r: Result<(), CliError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("error: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}
