//! Unit tests of the remote CLI: which token goes where, URL checks.

use clap::Parser;

use super::*;

fn profiles() -> BTreeMap<String, Profile> {
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
                token: Some("tg_b".into()),
                context: Context {
                    account: Some("billing".into()),
                    scope: vec![],
                },
                ..Profile::default()
            },
        ),
    ])
}

fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["tokengate"];
    all.extend_from_slice(args);
    all.push("whoami");
    Cli::try_parse_from(all).unwrap()
}

#[test]
fn saved_tokens_only_go_to_their_own_url() {
    let p = profiles();
    let path = Path::new("/x/credentials");
    // Runs without TOKENGATE_TOKEN in the test environment.
    if std::env::var_os(ENV_TOKEN).is_some() {
        return;
    }
    let t = resolve(&cli(&[]), &p, path).unwrap();
    assert_eq!(
        (t.url.as_str(), t.token.as_str()),
        ("http://a:9090", "tg_a")
    );
    let t = resolve(&cli(&["--profile", "staging"]), &p, path).unwrap();
    assert_eq!(t.token, "tg_b");
    assert_eq!(t.context.account.as_deref(), Some("billing"));
    let t = resolve(&cli(&["--url", "https://b:9090/"]), &p, path).unwrap();
    assert_eq!(
        (t.token.as_str(), t.profile.as_deref()),
        ("tg_b", Some("staging")),
        "matched by URL"
    );
    let e = resolve(&cli(&["--url", "http://evil:9090"]), &p, path).unwrap_err();
    assert!(
        e.message.contains("no token for http://evil:9090"),
        "{}",
        e.message
    );
    assert!(
        resolve(
            &cli(&["--url", "http://evil:9090", "--profile", "default"]),
            &p,
            path
        )
        .is_err()
    );
    assert!(resolve(&cli(&["--profile", "nope"]), &p, path).is_err());
    let t = resolve(&cli(&["--allow-plaintext"]), &p, path).unwrap();
    assert!(t.allow_plaintext);
}

#[test]
fn urls_are_checked() {
    assert_eq!(
        normalize_url("http://127.0.0.1:9090/").unwrap(),
        "http://127.0.0.1:9090"
    );
    assert!(normalize_url("ftp://x").is_err());
    assert!(normalize_url("127.0.0.1:9090").is_err());
    assert!(normalize_url("http://x/?a=1").is_err());
    assert_eq!(enc("a b@c/d"), "a%20b%40c%2Fd");
}
