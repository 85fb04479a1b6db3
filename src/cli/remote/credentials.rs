//! The remote CLI's credentials: the profiles file and the system keyring.
//!
//! `$XDG_CONFIG_HOME/tokengate/credentials` (else `$HOME/.config/tokengate/credentials`) is a
//! TOML file of profiles (`[default]`, `[NAME]`), each with its admin `url`, and either the
//! `token` itself or a `keyring` reference to an entry of the system keyring (service
//! `tokengate`), plus its settings (`allow_plaintext`) and default context (`[NAME.context]`).
//! It is always rewritten whole and atomically: a 0600 temporary file in the same 0700 folder,
//! then rename, so a crash never leaves half a file and a refresh never loses the old token
//! before the new one is on disk.
//!
//! Must never import `cli::local`, `admin` or `gateway`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::CliError;

/// The keyring service name every entry of the remote CLI is stored under.
pub const KEYRING_SERVICE: &str = "tokengate";

/// One saved profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Admin API base URL (`http://127.0.0.1:9090`).
    pub url: String,
    /// The token, when kept in this file (mode 0600) rather than the keyring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The token is in the system keyring, entry (service `tokengate`, user this value); the
    /// file keeps only this reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<String>,
    /// The token may travel over plain `http://` to a host that is not loopback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
    /// Default account and scope of the commands that take one (`tokengate context use`).
    #[serde(default, skip_serializing_if = "Context::is_empty")]
    pub context: Context,
}

/// A profile's default context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Default `--account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Default `--scope` values (`KEY=V1,V2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
}

impl Context {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self.account.is_none() && self.scope.is_empty()
    }

    /// `account billing, scope app=billing` (or `none`).
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if let Some(a) = &self.account {
            parts.push(format!("account {a}"));
        }
        if !self.scope.is_empty() {
            parts.push(format!("scope {}", self.scope.join(" ")));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

impl Profile {
    /// The profile's token: from the file, or read from the keyring.
    pub fn token(&self) -> Result<String, CliError> {
        match (&self.token, &self.keyring) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(r)) => keyring_get(r),
            (None, None) => Err(CliError::usage(
                "this profile holds no token: run `tokengate login` again",
            )),
        }
    }

    /// Where the token is kept, for people: `the credentials file` or `the system keyring`.
    pub fn storage(&self) -> &'static str {
        if self.keyring.is_some() {
            "the system keyring"
        } else {
            "the credentials file"
        }
    }
}

/// The credentials file path: `$XDG_CONFIG_HOME/tokengate/credentials`, else
/// `$HOME/.config/tokengate/credentials`.
pub fn credentials_path() -> Result<PathBuf, CliError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".config"),
            None => {
                return Err(CliError::usage(
                    "neither XDG_CONFIG_HOME nor HOME is set: cannot find the credentials file",
                ));
            }
        },
    };
    Ok(base.join("tokengate").join("credentials"))
}

/// Reads every profile (none when the file does not exist).
pub fn load_profiles(path: &Path) -> Result<BTreeMap<String, Profile>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(CliError::failure(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Writes every profile atomically: a 0600 temporary file in the same 0700 folder, synced, then
/// renamed over the old file.
pub fn save_profiles(path: &Path, profiles: &BTreeMap<String, Profile>) -> Result<(), CliError> {
    let fail = |what: &str, e: std::io::Error| {
        CliError::failure(format!("cannot {what} {}: {e}", path.display()))
    };
    let dir = path.parent().expect("the credentials path has a folder");
    std::fs::create_dir_all(dir).map_err(|e| fail("create the folder of", e))?;
    let text = toml::to_string(profiles).expect("profiles serialize");
    let tmp = dir.join(format!(".credentials.{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let _ = std::fs::remove_file(&tmp);
    let mut f = opts.open(&tmp).map_err(|e| fail("write", e))?;
    let header = "# tokengate remote CLI credentials: written by `tokengate login`. Keep this file private (mode 0600).\n";
    let written = f
        .write_all(header.as_bytes())
        .and_then(|_| f.write_all(text.as_bytes()))
        .and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("write", e));
    }
    // The rename is durable once the folder is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// keyring

/// The keyring entry's user name for a profile: `PROFILE@URL`.
pub fn keyring_reference(profile: &str, url: &str) -> String {
    format!("{profile}@{url}")
}

fn entry(reference: &str) -> Result<keyring::Entry, CliError> {
    // Elsewhere the crate would fall back to an in-memory mock and the token would be lost.
    if !cfg!(any(
        target_os = "linux",
        target_os = "freebsd",
        target_os = "openbsd",
        target_os = "macos",
        target_os = "windows"
    )) {
        return Err(CliError::usage(
            "this system has no supported keyring: log in without --keyring",
        ));
    }
    keyring::Entry::new(KEYRING_SERVICE, reference).map_err(keyring_error)
}

fn keyring_error(e: keyring::Error) -> CliError {
    let hint = match &e {
        keyring::Error::NoStorageAccess(_) | keyring::Error::PlatformFailure(_) => {
            " (is a Secret Service such as gnome-keyring or KeePassXC running and unlocked in this session? Without one, log in without --keyring)"
        }
        _ => "",
    };
    CliError::failure(format!("system keyring: {e}{hint}"))
}

/// Stores `token` in the keyring under `reference`.
pub fn keyring_set(reference: &str, token: &str) -> Result<(), CliError> {
    entry(reference)?.set_password(token).map_err(keyring_error)
}

/// Reads the token stored under `reference`.
pub fn keyring_get(reference: &str) -> Result<String, CliError> {
    entry(reference)?.get_password().map_err(|e| match e {
        keyring::Error::NoEntry => CliError::usage(format!(
            "the system keyring has no token for `{reference}` (deleted?): run `tokengate login --keyring` again"
        )),
        e => keyring_error(e),
    })
}

/// Deletes the entry under `reference` (gone already is fine).
pub fn keyring_delete(reference: &str) -> Result<(), CliError> {
    match entry(reference)?.delete_credential() {
        Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
        Err(e) => Err(keyring_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn profiles() -> BTreeMap<String, Profile> {
        BTreeMap::from([
            (
                "default".to_string(),
                Profile {
                    url: "http://a:9090".into(),
                    token: Some("tg_a".into()),
                    ..Profile::default()
                },
            ),
            (
                "staging".to_string(),
                Profile {
                    url: "https://b:9090".into(),
                    keyring: Some("staging@https://b:9090".into()),
                    allow_plaintext: true,
                    context: Context {
                        account: Some("billing".into()),
                        scope: vec!["app=billing,web-*".into()],
                    },
                    ..Profile::default()
                },
            ),
        ])
    }

    #[test]
    fn credentials_file_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokengate").join("credentials");
        save_profiles(&path, &profiles()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("[default]")
                && text.contains("[staging]")
                && text.contains("[staging.context]"),
            "{text}"
        );
        assert!(!text.contains("allow_plaintext = false"), "{text}");
        assert_eq!(load_profiles(&path).unwrap(), profiles());
        assert!(
            std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")),
            "no temporary file left behind"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(
                std::fs::metadata(path.parent().unwrap())
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777,
                0o700
            );
        }
    }

    #[test]
    fn files_of_earlier_versions_still_load() {
        let p: BTreeMap<String, Profile> =
            toml::from_str("[default]\nurl = \"http://a:9090\"\ntoken = \"tg_a\"\n").unwrap();
        assert_eq!(p, {
            let mut m = profiles();
            m.remove("staging");
            m
        });
    }

    #[test]
    fn contexts_describe_themselves() {
        assert_eq!(Context::default().describe(), "none");
        assert_eq!(
            profiles()["staging"].context.describe(),
            "account billing, scope app=billing,web-*"
        );
    }
}
