//! Command line (SPEC §10): the clap definitions, exit codes and dispatch.
//!
//! - [`local`] — commands on the local store (`account`, `token`, `audit`, `store`, `config`);
//! - [`remote`] — the same `token` / `account` commands against a gateway's admin API, plus
//!   `login`, `logout`, `whoami`, `auth …`, `context …`, the credentials file and the keyring;
//! - [`print`] — the one printer both use (tables, details, the new-token line, JSON).
//!
//! Exit codes: 0 ok, 64 bad usage or config, 1 failure, 3 (`audit verify`) chain intact but
//! forwarded requests without completion, 10 / 11 (`approval request --wait`) rejected / timed
//! out. Tokens are printed once, at creation or
//! rotation, on stdout's first line; they are never read from argv (`token identify` reads stdin).
//! Every token change goes through [`crate::lifecycle`]. Nothing outside `src/cli/` and `main.rs`
//! imports this module.

mod approval;
mod local;
mod print;
mod remote;
mod shell;

pub use approval::{EXIT_REJECTED, EXIT_TIMED_OUT};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::app::AppError;
use crate::lifecycle::LifecycleError;
use crate::store::StoreError;

/// Exit code for bad usage or config (EX_USAGE).
pub const EXIT_USAGE: u8 = crate::app::EXIT_USAGE;
/// Exit code of `audit verify` when the chain is intact but forwarded requests have no
/// completion line (the gateway stopped while they ran).
pub const EXIT_INCOMPLETE: u8 = 3;
/// Exit code for failures.
pub const EXIT_FAILURE: u8 = crate::app::EXIT_FAILURE;

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
  tokengate auth status
  tokengate --profile staging token list
  tokengate completions bash > /etc/bash_completion.d/tokengate";

/// tokengate: a Bearer-token authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "tokengate", version, about, after_help = ROOT_EXAMPLES)]
pub struct Cli {
    /// Config file (default: ./tokengate.toml, else /etc/tokengate/tokengate.toml).
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
    /// Let the remote CLI send its token over plain http:// to a host that is not loopback
    /// (an unencrypted network you trust). `login --allow-plaintext` saves it in the profile.
    #[arg(long, global = true)]
    pub allow_plaintext: bool,
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
    #[command(
        subcommand,
        after_help = "Example:\n  tokengate --config /etc/tokengate/tokengate.toml config check"
    )]
    Config(ConfigCmd),
    /// Manage accounts (owners of tokens).
    #[command(
        subcommand,
        after_help = "Examples:\n  tokengate account create ci-bot --email ci@example.com\n  tokengate account list --json\n  tokengate account disable ci-bot"
    )]
    Account(AccountCmd),
    /// Manage API tokens.
    #[command(
        subcommand,
        after_help = "Examples:\n  tokengate token create --account ci-bot --name deploy --role cicd --expires 30d\n  tokengate token list --stale 90d\n  tokengate token rotate tg_3hT9aB2x --grace 1h\n  pbpaste | tokengate token identify --revoke"
    )]
    Token(TokenCmd),
    /// Read and verify the audit log.
    Audit(AuditArgs),
    /// Store maintenance.
    #[command(
        subcommand,
        after_help = "Examples:\n  tokengate store init\n  tokengate store backup /var/backups/tokengate-$(date +%F).db\n  tokengate store copy --from ./tokengate.db --to env:TOKENGATE_STORE_URL"
    )]
    Store(StoreCmd),
    /// Save a token for a remote gateway's admin API; the token is read from stdin or TOKENGATE_TOKEN.
    #[command(after_help = LOGIN_EXAMPLES)]
    Login(LoginArgs),
    /// Forget a saved remote profile (the token itself stays valid until revoked).
    #[command(after_help = "Example:\n  tokengate logout --profile staging")]
    Logout,
    /// The remote CLI's own credentials: status, token-info, refresh, revoke (and login, logout).
    #[command(
        subcommand,
        after_help = "Examples:\n  tokengate auth status\n  tokengate auth token-info --json\n  tokengate auth refresh --grace 1h\n  tokengate auth revoke --profile old-laptop"
    )]
    Auth(AuthCmd),
    /// The default account and scope of a remote profile, used by commands that take one.
    #[command(
        subcommand,
        after_help = "Examples:\n  tokengate context use --account billing-team --scope app=billing\n  tokengate token create --name deploy --role cicd     # --account and --scope from the context\n  tokengate context show\n  tokengate context clear"
    )]
    Context(ContextCmd),
    /// Ask a person to approve an approval-gated rule, and wait for the answer (remote).
    #[command(
        subcommand,
        after_help = "Examples:\n  tokengate approval request --rule deploy --param app=billing --wait 10m\n  tokengate approval list --pending"
    )]
    Approval(ApprovalCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  tokengate completions bash > /etc/bash_completion.d/tokengate\n  tokengate completions zsh > \"${fpath[1]}/_tokengate\"\n  tokengate completions fish > ~/.config/fish/completions/tokengate.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a folder.
    #[command(
        after_help = "Examples:\n  tokengate man | man -l -\n  tokengate man --dir /usr/share/man/man1"
    )]
    Man {
        /// Write tokengate.1 and tokengate-COMMAND.1 pages into this folder instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Show which token the remote CLI acts with.
    #[command(after_help = "Example:\n  tokengate whoami --profile staging")]
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

const LOGIN_EXAMPLES: &str = "\
Examples:
  pbpaste | tokengate login --url http://127.0.0.1:9090
  TOKENGATE_TOKEN=\"$T\" tokengate login --profile staging --url https://gw.example.com:9090
  tokengate login --keyring --url https://gw.example.com:9090 < token.txt

The token is never read from the command line: pipe it on stdin, paste it at the prompt, or set
TOKENGATE_TOKEN. Credentials: $XDG_CONFIG_HOME/tokengate/credentials (else
~/.config/tokengate/credentials), mode 0600; with --keyring the token is kept in the system
keyring and the file keeps only a reference.";

/// `login` options.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Keep the token in the system keyring (Secret Service, macOS Keychain, Windows Credential
    /// Manager); the credentials file keeps only a reference to it.
    #[arg(long)]
    pub keyring: bool,
    /// Refused: tokens are never read from argv (they would land in shell history and `ps`).
    #[arg(long, hide = true, value_name = "TOKEN", num_args = 0..=1, default_missing_value = "")]
    pub token: Option<String>,
}

/// `auth` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Same as `tokengate login`.
    #[command(after_help = LOGIN_EXAMPLES)]
    Login(LoginArgs),
    /// Same as `tokengate logout`.
    #[command(after_help = "Example:\n  tokengate auth logout --profile staging")]
    Logout,
    /// Who the CLI acts as, on which gateway, until when, and what needs attention.
    #[command(
        after_help = "Examples:\n  tokengate auth status\n  tokengate --profile staging auth status --json"
    )]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every detail of the token the CLI uses (id, permissions, scopes, expiry, last use).
    #[command(after_help = "Example:\n  tokengate auth token-info --json")]
    TokenInfo {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the profile's own token and save the successor in its place; the old one works
    /// until the new one is first used or the grace ends.
    #[command(
        after_help = "Examples:\n  tokengate auth refresh\n  tokengate --profile ci auth refresh --grace 10m"
    )]
    Refresh {
        /// How long the old token stays valid at most (default tokens.rotation_grace).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Revoke the token the profile uses and remove the profile.
    #[command(after_help = "Example:\n  tokengate auth revoke --reason \"laptop lost\"")]
    Revoke {
        /// Why (kept in the store and the audit log).
        #[arg(long, default_value = "revoked by its holder")]
        reason: String,
    },
}

/// `context` subcommands.
#[derive(Debug, Subcommand)]
pub enum ContextCmd {
    /// Set the profile's default account and scope.
    #[command(
        after_help = "Example:\n  tokengate context use --account billing-team --scope app=billing"
    )]
    Use {
        /// Default account of `token create` and `token list`.
        #[arg(long)]
        account: Option<String>,
        /// Default scope of `token create`: KEY=V1,V2 (repeatable).
        #[arg(long = "scope", value_name = "KEY=V1,V2")]
        scope: Vec<String>,
    },
    /// Show the profile's context.
    #[command(after_help = "Example:\n  tokengate context show --json")]
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget the profile's context.
    #[command(after_help = "Example:\n  tokengate context clear")]
    Clear,
}

/// `approval` subcommands: always against a gateway's admin API (`--url` or TOKENGATE_URL, token
/// from TOKENGATE_TOKEN or the saved profile).
#[derive(Debug, Subcommand)]
pub enum ApprovalCmd {
    /// Ask for an approval of a rule (`[[routes.rules]] name`) for this token; with --wait,
    /// block until a person decides. Exit codes: 0 approved (or asked, without --wait),
    /// 10 rejected, 11 not decided within --wait (or expired), 1 other failures.
    #[command(
        after_help = "Examples:\n  TOKENGATE_URL=https://gw.example.com:9090 TOKENGATE_TOKEN=\"$CI_TOKEN\" \\\n    tokengate approval request --rule deploy --param app=billing --message \"release 4.2\" --wait 10m\n\nApproving is not a CLI command: a person approves in the web UI (Approvals page) with a TOTP\ncode. A token alone, even an admin token, is always refused."
    )]
    Request {
        /// The rule's name.
        #[arg(long)]
        rule: String,
        /// A path parameter of the rule, NAME=VALUE (repeat for each).
        #[arg(long, value_name = "NAME=VALUE")]
        param: Vec<String>,
        /// Why: shown to the approvers and in the notification.
        #[arg(long)]
        message: Option<String>,
        /// Wait this long for the decision (e.g. 10m), polling with backoff.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List approval requests (this token's; all for an admin token).
    #[command(
        after_help = "Examples:\n  tokengate approval list --pending\n  tokengate approval list --json"
    )]
    List {
        /// Only pending ones.
        #[arg(long)]
        pending: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one approval request.
    #[command(after_help = "Example:\n  tokengate approval show apr_0123456789abcdef --json")]
    Show {
        /// The request id (`apr_...`).
        id: String,
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
    /// Remove an account's TOTP enrolment (a lost phone and no recovery code left): the person
    /// enrols again at the next sign-in. Local store only.
    #[command(
        name = "reset-mfa",
        after_help = "Example:\n  tokengate account reset-mfa alice"
    )]
    ResetMfa {
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
        /// A new lifetime for the successor (an expiry preset allowed by policy, e.g. 30d);
        /// without it the successor keeps the old token's expiry.
        #[arg(long)]
        expires: Option<String>,
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
#[command(group(clap::ArgGroup::new("grant").required(true).multiple(true).args(["role", "permission"])))]
pub struct CreateArgs {
    /// Owning account (remotely: default from `tokengate context use --account`).
    #[arg(long)]
    pub account: Option<String>,
    /// Label shown in lists and logs.
    #[arg(long)]
    pub name: String,
    /// Role whose permissions are copied onto the token.
    #[arg(long)]
    pub role: Option<String>,
    /// Explicit permission (repeatable), e.g. apps:read; with --role, added to the role's.
    #[arg(long = "permission", value_name = "PERMISSION")]
    pub permission: Vec<String>,
    /// Expiry preset: 7d, 30d, 90d, 180d, 365d or never.
    #[arg(long)]
    pub expires: Option<String>,
    /// Restrict a captured name: KEY=V1,V2 (repeatable; `*` globs); remotely, default from
    /// `tokengate context use --scope`.
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
#[command(after_help = "Example:\n  tokengate audit verify audit.log.2 audit.log.1 audit.log")]
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

/// A name (account, profile) is 1-64 ASCII letters, digits or characters of `extra`; else the
/// usage error `message`.
fn check_name(name: &str, extra: &str, message: &str) -> Result<(), CliError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    {
        return Err(CliError::usage(message));
    }
    Ok(())
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

impl From<LifecycleError> for CliError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Invalid(m) => CliError::usage(m),
            LifecycleError::Forbidden(r) => CliError::failure(r.message),
            LifecycleError::Store(e) => e.into(),
        }
    }
}

/// Runs the commands other than `serve` and `demo`: on the local store, or remotely when a
/// `--url` / `--profile` / saved login says so.
pub fn run_local(cli: &Cli) -> Result<(), CliError> {
    let config = cli.config.as_deref();
    match &cli.command {
        Command::Serve | Command::Demo(_) => unreachable!("handled by main"),
        Command::Config(ConfigCmd::Check) => local::config_check(config),
        Command::Login(a) | Command::Auth(AuthCmd::Login(a)) => remote::login(cli, a),
        Command::Logout | Command::Auth(AuthCmd::Logout) => remote::logout(cli),
        Command::Whoami { json } => remote::whoami(cli, *json),
        Command::Auth(cmd) => remote::auth(cli, cmd),
        Command::Context(cmd) => remote::context(cli, cmd),
        Command::Completions { shell } => shell::completions(*shell),
        Command::Man { dir } => shell::man(dir.as_deref()),
        Command::Account(cmd) => match remote::target(cli)? {
            Some(t) => remote::run(&t, &cli.command),
            None => local::account(config, cmd),
        },
        Command::Token(cmd) => match remote::target(cli)? {
            Some(t) => remote::run(&t, &cli.command),
            None => local::token(config, cmd),
        },
        Command::Approval(cmd) => match remote::target(cli)? {
            Some(t) => approval::run(&t, cmd),
            None => Err(CliError::usage(
                "approval commands run against a gateway: pass --url (or TOKENGATE_URL) with TOKENGATE_TOKEN, or run `tokengate login`",
            )),
        },
        Command::Audit(args) => local::audit_cmd(config, args),
        Command::Store(StoreCmd::Backup { file }) => local::store_backup(config, file),
        Command::Store(StoreCmd::Copy { from, to }) => local::store_copy(from, to),
        Command::Store(StoreCmd::Init) => local::store_init(config),
    }
}

/// "this is not a tokengate token", without saying it twice: the parse error's own words.
fn not_a_token(e: crate::token::TokenError) -> CliError {
    CliError::usage(match e {
        crate::token::TokenError::Format => "this is not a tokengate token".to_string(),
        e => format!("this is not a valid tokengate token: {e}"),
    })
}

/// `token identify`'s token: one line of stdin (never argv), trimmed.
fn read_identify_token() -> Result<String, CliError> {
    use std::io::BufRead;
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
    Ok(raw.to_string())
}

/// The demo's plain options from its flags.
pub fn demo_options(a: &DemoArgs) -> crate::demo::DemoOptions {
    crate::demo::DemoOptions {
        port: a.port,
        print_only: a.print_only,
    }
}

impl From<AppError> for CliError {
    fn from(e: AppError) -> Self {
        CliError {
            code: e.code,
            message: e.message,
        }
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
