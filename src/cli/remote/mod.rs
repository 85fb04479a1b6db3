//! Remote CLI (SPEC §8): `login`, `logout`, `whoami`, `auth …`, `context …`, and the `token` /
//! `account` commands run against a gateway's admin API instead of the local store.
//!
//! - [`credentials`] — the profiles file (`url`, the token or a keyring reference, settings, the
//!   default context) and the system keyring;
//! - [`client`] — the HTTP client (system roots, the plain-HTTP refusal, errors in words).
//!
//! `TOKENGATE_TOKEN` beats the file; `--profile` picks a profile; a token is only ever sent to
//! the URL it was saved with. Tokens are read from stdin or the environment, never from argv.
//! Output goes through [`super::print`], the printer local commands use too. Must never import:
//! `cli::local` (local and remote are siblings under `cli`), `admin`, `gateway`.

mod client;
mod credentials;

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use http::{Method, StatusCode, Uri};

use super::print::{self, human_secs, join, outln, print_json, str_of};
use super::{
    AccountCmd, AuthCmd, Cli, CliError, Command, ContextCmd, LoginArgs, TokenCmd, not_a_token,
};
use crate::lifecycle::parse_scope;
use crate::path::percent_encode as enc;
pub use client::{Client, check_transport};
pub use credentials::{
    Context, Profile, credentials_path, keyring_delete, keyring_reference, keyring_set,
    load_profiles, save_profiles,
};

/// Environment variable holding a token (beats the credentials file).
pub const ENV_TOKEN: &str = "TOKENGATE_TOKEN";
/// Admin URL used by `login` when none is given or saved.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090";
/// Profile used when none is named.
pub const DEFAULT_PROFILE: &str = "default";
/// `auth status` warns when the token expires within this many days.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// Where remote commands go, and with which token.
#[derive(Debug, Clone)]
pub struct Target {
    /// Admin API base URL.
    pub url: String,
    /// Token (never printed).
    token: String,
    /// Profile the token came from (None: `TOKENGATE_TOKEN`).
    pub profile: Option<String>,
    /// Plain HTTP to a host that is not loopback is allowed (flag or profile).
    pub allow_plaintext: bool,
    /// The default account and scope (of the profile named, or matched by URL).
    pub context: Context,
}

impl Target {
    pub(crate) fn client(&self) -> Result<Client, CliError> {
        Client::new(&self.url, &self.token, self.allow_plaintext)
    }
}

/// Decides whether `token`/`account` commands run remotely, and against what:
/// remote when `--url`, `--profile` (or `TOKENGATE_URL` / `TOKENGATE_PROFILE`) is given, or when
/// there is no local config at all but a `[default]` profile exists.
pub fn target(cli: &Cli) -> Result<Option<Target>, CliError> {
    let implicit = cli.url.is_none()
        && cli.profile.is_none()
        && crate::app::default_config_path(cli.config.as_deref()).is_none();
    if cli.url.is_none() && cli.profile.is_none() && !implicit {
        return Ok(None);
    }
    let path = credentials_path()?;
    let profiles = load_profiles(&path)?;
    if implicit && !profiles.contains_key(DEFAULT_PROFILE) {
        return Ok(None);
    }
    resolve(cli, &profiles, &path).map(Some)
}

fn env_token() -> Option<String> {
    std::env::var(ENV_TOKEN)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The URL, token source and settings for `--url` / `--profile` / the environment.
fn resolve(
    cli: &Cli,
    profiles: &BTreeMap<String, Profile>,
    path: &Path,
) -> Result<Target, CliError> {
    let (url, profile) = (cli.url.as_deref(), cli.profile.as_deref());
    let env_token = env_token();
    let name = profile.unwrap_or(DEFAULT_PROFILE);
    let saved = profiles.get(name);
    if profile.is_some() && saved.is_none() && (env_token.is_none() || url.is_none()) {
        return Err(CliError::usage(format!(
            "no profile `{name}` in {}; create it with `tokengate login --profile {name} --url URL`",
            path.display()
        )));
    }
    let url = match (url, saved) {
        (Some(u), _) => normalize_url(u)?,
        (None, Some(p)) => p.url.clone(),
        (None, None) => {
            return Err(CliError::usage(format!(
                "no admin URL: pass --url, or run `tokengate login` first (credentials: {})",
                path.display()
            )));
        }
    };
    // A saved token only ever goes to the URL it was saved with.
    let from_file = saved
        .filter(|p| p.url == url)
        .map(|p| (name.to_string(), p))
        .or_else(|| {
            (profile.is_none())
                .then(|| profiles.iter().find(|(_, p)| p.url == url))
                .flatten()
                .map(|(n, p)| (n.clone(), p))
        });
    let (allow, context) = from_file
        .as_ref()
        .map(|(_, p)| (p.allow_plaintext, p.context.clone()))
        .unwrap_or_default();
    let allow_plaintext = cli.allow_plaintext || allow;
    if let Some(t) = env_token {
        return Ok(Target {
            url,
            token: t,
            profile: None,
            allow_plaintext,
            context,
        });
    }
    match from_file {
        Some((n, p)) => Ok(Target {
            url,
            token: p.token()?,
            profile: Some(n),
            allow_plaintext,
            context,
        }),
        None => Err(CliError::usage(format!(
            "no token for {url}: set {ENV_TOKEN}, or run `tokengate login --url {url}` (credentials: {})",
            path.display()
        ))),
    }
}

/// Checks a URL is `http(s)://host[:port][/base]` and drops a trailing `/`.
pub fn normalize_url(u: &str) -> Result<String, CliError> {
    let bad = || {
        CliError::usage(format!(
            "`{u}` is not an admin URL like http://127.0.0.1:9090"
        ))
    };
    let uri: Uri = u.trim().parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad()),
    }
    if uri.authority().is_none() || uri.query().is_some() {
        return Err(bad());
    }
    Ok(u.trim().trim_end_matches('/').to_string())
}

// ------------------------------------------------------------------------------------------------
// login, logout, whoami

/// Reads a token from `TOKENGATE_TOKEN`, else the first line of stdin (echo off on a terminal).
fn read_token() -> Result<String, CliError> {
    if let Some(t) = env_token() {
        return Ok(t);
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprint!("Paste the token and press Enter (it is not shown): ");
        let _ = std::io::stderr().flush();
        echo(false);
    }
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    if tty {
        echo(true);
        eprintln!();
    }
    r.map_err(|e| CliError::failure(format!("cannot read stdin: {e}")))?;
    let t = line.trim().to_string();
    if t.is_empty() {
        return Err(CliError::usage(format!(
            "no token: pipe it on stdin (e.g. `pbpaste | tokengate login`) or set {ENV_TOKEN}; it is never read from the command line"
        )));
    }
    Ok(t)
}

/// Best effort: turn terminal echo off/on with `stty` (no extra dependency for a prompt).
fn echo(on: bool) {
    let _ = std::process::Command::new("stty")
        .arg(if on { "echo" } else { "-echo" })
        .stdin(std::process::Stdio::inherit())
        .status();
}

/// The credentials file, the profiles in it, and the profile `--profile` names (else the default).
fn profile_file(cli: &Cli) -> Result<(PathBuf, BTreeMap<String, Profile>, String), CliError> {
    let path = credentials_path()?;
    let profiles = load_profiles(&path)?;
    let name = cli
        .profile
        .clone()
        .unwrap_or_else(|| DEFAULT_PROFILE.to_string());
    Ok((path, profiles, name))
}

/// Whether `url` answers like tokengate's public listener (its reserved whoami endpoint), which
/// someone gave `login` instead of the admin URL.
fn is_public_listener(c: &Client) -> bool {
    matches!(
        c.send(Method::GET, "/_tokengate/v1/whoami", None),
        Ok((StatusCode::OK, v)) if v["prefix"].is_string()
    )
}

/// `tokengate login [--url URL] [--profile NAME] [--keyring] [--allow-plaintext]`.
pub fn login(cli: &Cli, args: &LoginArgs) -> Result<(), CliError> {
    if args.token.is_some() {
        return Err(CliError::usage(format!(
            "tokens are never read from the command line (they would stay in your shell history and in `ps`): \
             pipe the token on stdin (`pbpaste | tokengate login`), paste it at the prompt, or set {ENV_TOKEN}"
        )));
    }
    let (path, mut profiles, name) = profile_file(cli)?;
    super::check_name(
        &name,
        "._-",
        "profile names are 1-64 letters, digits, `.`, `_`, `-`",
    )?;
    let old = profiles.get(&name).cloned();
    let url = match (&cli.url, &old) {
        (Some(u), _) => normalize_url(u)?,
        (None, Some(p)) => p.url.clone(),
        (None, None) => DEFAULT_URL.to_string(),
    };
    let allow_plaintext = cli.allow_plaintext
        || old
            .as_ref()
            .is_some_and(|p| p.allow_plaintext && p.url == url);
    check_transport(&url, allow_plaintext)?;
    let token = read_token()?;
    crate::token::parse(&token).map_err(not_a_token)?;
    let c = Client::new(&url, &token, allow_plaintext)?;
    let (status, me) = c.send(Method::GET, "/v1/whoami", None)?;
    if !status.is_success() {
        if status != StatusCode::UNAUTHORIZED && is_public_listener(&c) {
            return Err(CliError::usage(format!(
                "{url} is the gateway's public listener, not its admin API: log in with the admin URL \
                 (the `[admin] listen` address of the gateway's config, by default {DEFAULT_URL})"
            )));
        }
        return Err(c.api_error(status, &me));
    }
    let mut profile = Profile {
        url: url.clone(),
        allow_plaintext,
        // The context stays while the profile points at the same gateway.
        context: old
            .as_ref()
            .filter(|p| p.url == url)
            .map(|p| p.context.clone())
            .unwrap_or_default(),
        ..Profile::default()
    };
    let stale_entry = old.as_ref().and_then(|p| p.keyring.clone());
    if args.keyring {
        let reference = keyring_reference(&name, &url);
        keyring_set(&reference, &token)?;
        profile.keyring = Some(reference);
    } else {
        profile.token = Some(token);
    }
    profiles.insert(name.clone(), profile.clone());
    save_profiles(&path, &profiles)?;
    if let Some(r) = stale_entry.filter(|r| Some(r) != profile.keyring.as_ref()) {
        keyring_delete(&r)?;
    }
    outln!(
        "Logged in to {url} as {} ({}), account {}, access {}.",
        me["name"].as_str().unwrap_or("?"),
        me["prefix"].as_str().unwrap_or("?"),
        me["account"].as_str().unwrap_or("?"),
        me["access"].as_str().unwrap_or("?"),
    );
    if args.keyring {
        outln!(
            "Saved as profile `{name}`: the token is in the system keyring; {} keeps only a reference.",
            path.display()
        );
    } else {
        outln!(
            "Saved as profile `{name}` in {} (mode 0600).",
            path.display()
        );
    }
    Ok(())
}

/// Removes profile `name` (and its keyring entry) from the file.
fn forget(
    path: &Path,
    profiles: &mut BTreeMap<String, Profile>,
    name: &str,
) -> Result<(), CliError> {
    let Some(p) = profiles.remove(name) else {
        return Err(CliError::failure(format!(
            "no profile `{name}` in {}",
            path.display()
        )));
    };
    save_profiles(path, profiles)?;
    if let Some(r) = &p.keyring {
        keyring_delete(r)?;
    }
    Ok(())
}

/// `tokengate logout [--profile NAME]`: forgets a saved profile (the token stays valid; revoke it
/// with `tokengate auth revoke` if it should stop working).
pub fn logout(cli: &Cli) -> Result<(), CliError> {
    let (path, mut profiles, name) = profile_file(cli)?;
    forget(&path, &mut profiles, &name)?;
    outln!(
        "Logged out: profile `{name}` removed from {}.",
        path.display()
    );
    Ok(())
}

/// The target of `whoami` and `auth …`: always remote, from `--url` / `--profile` / the default.
fn current(cli: &Cli) -> Result<(Target, PathBuf, BTreeMap<String, Profile>), CliError> {
    let path = credentials_path()?;
    let profiles = load_profiles(&path)?;
    let t = resolve(cli, &profiles, &path)?;
    Ok((t, path, profiles))
}

/// `tokengate whoami [--profile NAME] [--json]`.
pub fn whoami(cli: &Cli, json: bool) -> Result<(), CliError> {
    let (t, ..) = current(cli)?;
    let me = t.client()?.call(Method::GET, "/v1/whoami", None)?;
    if json {
        print_json(&me);
        return Ok(());
    }
    let s = |k: &str| me[k].as_str().unwrap_or("-").to_string();
    outln!(
        "{} ({}) of account {}",
        s("name"),
        s("prefix"),
        s("account")
    );
    outln!("  token id     {}", s("id"));
    outln!("  access       {}", access_words(&me));
    outln!("  permissions  {}", join(&me["permissions"]));
    outln!(
        "  expires      {}",
        me["expires_at"].as_str().unwrap_or("never")
    );
    outln!("  via          {} ({})", t.url, source_words(&t));
    Ok(())
}

fn access_words(me: &serde_json::Value) -> &'static str {
    if me["access"] == "admin" {
        "admin (all accounts)"
    } else {
        "self (own account)"
    }
}

fn source_words(t: &Target) -> String {
    t.profile
        .as_deref()
        .map(|p| format!("profile {p}"))
        .unwrap_or_else(|| ENV_TOKEN.to_string())
}

// ------------------------------------------------------------------------------------------------
// auth status | token-info | refresh | revoke

/// `tokengate auth …` (login and logout are dispatched to [`login`] / [`logout`]).
pub fn auth(cli: &Cli, cmd: &AuthCmd) -> Result<(), CliError> {
    match cmd {
        AuthCmd::Login(a) => login(cli, a),
        AuthCmd::Logout => logout(cli),
        AuthCmd::Status { json } => status(cli, *json),
        AuthCmd::TokenInfo { json } => {
            let (t, ..) = current(cli)?;
            let me = t.client()?.call(Method::GET, "/v1/whoami", None)?;
            print::token_show(&me, *json);
            Ok(())
        }
        AuthCmd::Refresh { grace } => refresh(cli, grace.as_deref()),
        AuthCmd::Revoke { reason } => revoke_self(cli, reason),
    }
}

/// The whoami answer, or an error that says the saved token no longer works and what to do.
fn whoami_or_explain(t: &Target, c: &Client) -> Result<serde_json::Value, CliError> {
    let (status, me) = c.send(Method::GET, "/v1/whoami", None)?;
    if status.is_success() {
        return Ok(me);
    }
    if status == StatusCode::UNAUTHORIZED {
        let what = me["message"].as_str().unwrap_or("the token is not valid");
        let fix = match &t.profile {
            Some(p) => format!("log in again: `tokengate login --profile {p}`"),
            None => format!("set {ENV_TOKEN} to a valid token"),
        };
        return Err(CliError::failure(format!(
            "{} ({}) rejects the token: {what} Fix: {fix}",
            t.url,
            source_words(t)
        )));
    }
    Err(c.api_error(status, &me))
}

/// Days from now until an RFC 3339 instant (negative when past).
fn days_until(rfc: &str) -> Option<i64> {
    let at = crate::clock::parse_rfc3339(rfc)?;
    Some((at - crate::clock::system_now_ms()).div_euclid(86_400_000))
}

/// `tokengate auth status [--json]`: who, which gateway, until when, and warnings.
fn status(cli: &Cli, json: bool) -> Result<(), CliError> {
    let (t, path, profiles) = current(cli)?;
    let c = t.client()?;
    let me = whoami_or_explain(&t, &c)?;
    let saved = t.profile.as_deref().and_then(|p| profiles.get(p));
    let storage = match saved {
        Some(p) if t.profile.is_some() => format!("{} ({})", p.storage(), path.display()),
        _ => format!("the environment ({ENV_TOKEN})"),
    };
    let expires = me["expires_at"].as_str();
    let days = expires.and_then(days_until);
    let mut warnings = vec![];
    match days {
        Some(d) if d < EXPIRY_WARNING_DAYS => warnings.push(format!(
            "the token expires in {}: run `tokengate auth refresh` before then",
            print::plural(d.max(0) as usize, "day", "days")
        )),
        None if expires.is_none() => warnings.push(
            "the token never expires: consider one with an expiry (`tokengate auth refresh` keeps it)".to_string(),
        ),
        _ => {}
    }
    if t.profile.is_none() && env_token().is_some() {
        if let Some(p) = cli
            .profile
            .as_deref()
            .or(Some(DEFAULT_PROFILE))
            .filter(|p| profiles.contains_key(*p))
        {
            warnings.push(format!(
                "{ENV_TOKEN} is set: it is used instead of profile `{p}`"
            ));
        }
    }
    if t.allow_plaintext && t.url.starts_with("http://") {
        warnings
            .push("plain HTTP to a host that is not loopback is allowed for this profile".into());
    }
    if me["access"] == "admin" {
        warnings.push(
            "this token has admin access to every account: keep it for administration".into(),
        );
    }
    if json {
        print_json(&serde_json::json!({
            "url": t.url,
            "profile": t.profile,
            "storage": if t.profile.is_none() { "env" } else if saved.is_some_and(|p| p.keyring.is_some()) { "keyring" } else { "file" },
            "token": me,
            "expires_in_days": days,
            "context": t.context,
            "warnings": warnings,
        }));
        return Ok(());
    }
    outln!(
        "Logged in to {} as {} ({}), account {}",
        t.url,
        str_of(&me, "name"),
        str_of(&me, "prefix"),
        str_of(&me, "account")
    );
    outln!("  access       {}", access_words(&me));
    outln!("  source       {} — {}", source_words(&t), storage);
    outln!(
        "  expires      {}",
        match (expires, days) {
            (Some(e), Some(d)) => format!(
                "{e} (in {})",
                print::plural(d.max(0) as usize, "day", "days")
            ),
            _ => "never".into(),
        }
    );
    outln!(
        "  last used    {}",
        me["last_used_at"].as_str().unwrap_or("never")
    );
    outln!("  context      {}", t.context.describe());
    for w in &warnings {
        outln!("  warning: {w}");
    }
    Ok(())
}

/// `tokengate auth refresh [--grace D]`: rotates the profile's own token, saves the successor in
/// its place (file rewritten atomically, or the keyring entry replaced). Never prints it.
fn refresh(cli: &Cli, grace: Option<&str>) -> Result<(), CliError> {
    let (t, path, mut profiles) = current(cli)?;
    let Some(name) = t.profile.clone() else {
        return Err(CliError::usage(format!(
            "{ENV_TOKEN} is set: `auth refresh` renews a saved profile's token. Rotate this one with \
             `tokengate token rotate ID`, then put the new token in {ENV_TOKEN} yourself"
        )));
    };
    let c = t.client()?;
    let me = whoami_or_explain(&t, &c)?;
    let id = str_of(&me, "id");
    let v = c.call(
        Method::POST,
        &format!("/v1/tokens/{}/rotate", enc(&id)),
        Some(serde_json::json!({"grace": grace})),
    )?;
    let new = v["token"].as_str().unwrap_or_default().to_string();
    let p = profiles.get_mut(&name).expect("resolved from this file");
    let saved = match &p.keyring {
        Some(r) => keyring_set(r, &new),
        None => {
            p.token = Some(new.clone());
            save_profiles(&path, &profiles)
        }
    };
    if let Err(e) = saved {
        // The old token is on its way out: the new one must not be lost. Shown once, here.
        eprintln!(
            "error: the token was rotated but the new one could not be saved ({}). It follows on stdout, once: \
             save it with `tokengate login --profile {name}`.",
            e.message
        );
        outln!("{new}");
        return Err(CliError::failure(String::new()));
    }
    outln!(
        "Refreshed profile `{name}`: now using {} ({}), expires {}.",
        str_of(&v, "id"),
        str_of(&v, "prefix"),
        v["expires_at"].as_str().unwrap_or("never")
    );
    outln!(
        "The old token {} ({}) keeps working until the new one is first used, or for {} at most.",
        id,
        str_of(&me, "prefix"),
        human_secs(v["grace_seconds"].as_u64().unwrap_or(0))
    );
    Ok(())
}

/// `tokengate auth revoke [--reason R]`: revokes the token in use and removes its profile.
fn revoke_self(cli: &Cli, reason: &str) -> Result<(), CliError> {
    let (t, path, mut profiles) = current(cli)?;
    let c = t.client()?;
    let me = whoami_or_explain(&t, &c)?;
    let id = str_of(&me, "id");
    c.call(
        Method::POST,
        &format!("/v1/tokens/{}/revoke", enc(&id)),
        Some(serde_json::json!({"reason": reason})),
    )?;
    outln!(
        "Revoked {} ({}, {}): the gateway rejects it from now on.",
        id,
        str_of(&me, "prefix"),
        str_of(&me, "name")
    );
    match &t.profile {
        Some(name) => {
            forget(&path, &mut profiles, name)?;
            outln!("Profile `{name}` removed from {}.", path.display());
        }
        None => outln!("Unset {ENV_TOKEN}: it holds the revoked token."),
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// context

/// `tokengate context use | show | clear` on the profile `--profile` names (else the default).
pub fn context(cli: &Cli, cmd: &ContextCmd) -> Result<(), CliError> {
    let (path, mut profiles, name) = profile_file(cli)?;
    let Some(p) = profiles.get_mut(&name) else {
        return Err(CliError::usage(format!(
            "no profile `{name}` in {}: a context belongs to a profile; create it with `tokengate login --profile {name}`",
            path.display()
        )));
    };
    match cmd {
        ContextCmd::Use { account, scope } => {
            if account.is_none() && scope.is_empty() {
                return Err(CliError::usage(
                    "say what to use: --account NAME and/or --scope KEY=V1,V2",
                ));
            }
            if let Some(a) = account {
                super::check_name(
                    a,
                    "._-@",
                    "account names are 1-64 letters, digits, `.`, `_`, `-`, `@`",
                )?;
                p.context.account = Some(a.clone());
            }
            for s in scope {
                parse_scope(s).map_err(CliError::usage)?;
            }
            if !scope.is_empty() {
                p.context.scope = scope.clone();
            }
            let d = p.context.describe();
            save_profiles(&path, &profiles)?;
            outln!("Context of profile `{name}`: {d}.");
        }
        ContextCmd::Show { json } => {
            if *json {
                print_json(&p.context);
            } else {
                outln!("Context of profile `{name}`: {}.", p.context.describe());
            }
        }
        ContextCmd::Clear => {
            p.context = Context::default();
            save_profiles(&path, &profiles)?;
            outln!("Context of profile `{name}` cleared.");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// token and account commands

/// Runs a `token` / `account` command against the admin API.
pub fn run(t: &Target, command: &Command) -> Result<(), CliError> {
    let c = t.client()?;
    match command {
        Command::Account(cmd) => account(&c, cmd),
        Command::Token(cmd) => token(&c, &t.context, cmd),
        _ => Err(CliError::usage(
            "only `token` and `account` commands run remotely",
        )),
    }
}

fn account(c: &Client, cmd: &AccountCmd) -> Result<(), CliError> {
    match cmd {
        AccountCmd::ResetMfa { .. } => {
            return Err(CliError::usage(
                "`account reset-mfa` runs on the local store only (use --config, not --url)",
            ));
        }
        AccountCmd::Create { name, email, json } => {
            let v = c.call(
                Method::POST,
                "/v1/accounts",
                Some(serde_json::json!({"name": name, "email": email})),
            )?;
            print::account_created(&v, *json);
        }
        AccountCmd::List { json } => {
            let v = c.call(Method::GET, "/v1/accounts", None)?;
            let list = v["accounts"].as_array().cloned().unwrap_or_default();
            print::account_list(&list, *json);
        }
        AccountCmd::Disable { name } => {
            c.call(
                Method::POST,
                &format!("/v1/accounts/{}/disable", enc(name)),
                None,
            )?;
            outln!("disabled account {name}: its tokens are rejected from now on");
        }
    }
    Ok(())
}

fn token(c: &Client, ctx: &Context, cmd: &TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create(a) => {
            let account = a.account.clone().or_else(|| ctx.account.clone()).ok_or_else(|| {
                CliError::usage(
                    "--account is required (or set a default with `tokengate context use --account NAME`)",
                )
            })?;
            let scope = if a.scope.is_empty() {
                &ctx.scope
            } else {
                &a.scope
            };
            let mut scopes = serde_json::Map::new();
            for s in scope {
                let (k, v) = parse_scope(s).map_err(CliError::usage)?;
                scopes.insert(k, v.into());
            }
            let body = serde_json::json!({
                "account": account,
                "name": a.name,
                "role": a.role,
                "permissions": a.permission,
                "expires": a.expires,
                "scopes": scopes,
                "allowed_cidrs": a.allow_ip,
                "rate": a.rate,
            });
            let v = c.call(Method::POST, "/v1/tokens", Some(body))?;
            print::new_token(&v, a.json, "created");
        }
        TokenCmd::List {
            account,
            stale,
            expiring,
            all,
            json,
        } => {
            let mut q = vec![];
            let account = account.as_ref().or(ctx.account.as_ref());
            for (k, v) in [
                ("account", account),
                ("stale", stale.as_ref()),
                ("expiring", expiring.as_ref()),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(v)));
                }
            }
            if *all {
                q.push("all=true".into());
            }
            let path = if q.is_empty() {
                "/v1/tokens".to_string()
            } else {
                format!("/v1/tokens?{}", q.join("&"))
            };
            let v = c.call(Method::GET, &path, None)?;
            let list = v["tokens"].as_array().cloned().unwrap_or_default();
            print::token_list(&list, *json);
        }
        TokenCmd::Show { id, json } => {
            let v = c.call(Method::GET, &format!("/v1/tokens/{}", enc(id)), None)?;
            print::token_show(&v, *json);
        }
        TokenCmd::Revoke { id, reason } => {
            let v = c.call(
                Method::POST,
                &format!("/v1/tokens/{}/revoke", enc(id)),
                Some(serde_json::json!({"reason": reason})),
            )?;
            outln!(
                "revoked {} ({}, {})",
                str_of(&v, "id"),
                str_of(&v, "prefix"),
                str_of(&v, "name")
            );
        }
        TokenCmd::Rotate {
            id,
            grace,
            expires,
            json,
        } => {
            let mut body = serde_json::json!({"grace": grace});
            if let Some(e) = expires {
                body["expires"] = e.as_str().into();
            }
            let v = c.call(
                Method::POST,
                &format!("/v1/tokens/{}/rotate", enc(id)),
                Some(body),
            )?;
            print::new_token(&v, *json, "rotated: new");
            print::rotated(
                &str_of(&v, "rotated_from"),
                v["grace_seconds"].as_u64().unwrap_or(0),
            );
        }
        TokenCmd::Identify {
            revoke,
            reason,
            json,
        } => {
            let line = super::read_identify_token()?;
            let raw = line.as_str();
            let v = c.call(
                Method::POST,
                "/v1/tokens/identify",
                Some(serde_json::json!({"token": raw, "revoke": revoke, "reason": reason})),
            )?;
            print::token_show(&v, *json);
            if *revoke && !*json {
                outln!("revoked: the gateway rejects it from now on");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
