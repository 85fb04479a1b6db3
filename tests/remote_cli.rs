//! The remote CLI (`tokengate login | whoami | logout`, and `token` / `account` commands with a
//! profile or `--url`) run as the real binary against a gateway on 127.0.0.1:0.

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use support::{LocalhostCert, Options, TestGateway, client, get_bearer};
use tokio::io::AsyncWriteExt;

/// Runs the binary with a private HOME, no inherited TOKENGATE_* variables, in `cwd` (which has
/// no tokengate.toml), feeding `stdin`.
async fn run(home: &Path, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"));
    cmd.args(args)
        .current_dir(home)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TOKENGATE_TOKEN")
        .env_remove("TOKENGATE_URL")
        .env_remove("TOKENGATE_PROFILE")
        .env_remove("TOKENGATE_CONFIG")
        .env_remove("TOKENGATE_CA_FILE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn login_create_list_revoke_whoami_logout_round_trip() {
    let tg = TestGateway::start().await;
    let (root, root_id) = tg.token("ops", "root", &["tokengate:admin"]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let url = format!("http://{}", tg.admin_addr);

    // login: the token comes from stdin, never argv; the file is private.
    let out = ok(&run(h, &[], &["login", "--url", &url], &format!("{root}\n")).await);
    assert!(out.contains("Logged in") && out.contains("root"), "{out}");
    let cred = h.join(".config/tokengate/credentials");
    assert_eq!(mode(&cred), 0o600, "credentials file mode");
    assert_eq!(mode(cred.parent().unwrap()), 0o700);
    let text = std::fs::read_to_string(&cred).unwrap();
    assert!(
        text.contains("[default]") && text.contains(&format!("url = \"{url}\"")),
        "{text}"
    );
    assert!(!out.contains(&root), "login never prints the token");

    // whoami, then account and token commands run remotely (no local config in this folder).
    let out = ok(&run(h, &[], &["whoami"], "").await);
    assert!(
        out.contains("root") && out.contains(&root_id) && out.contains("admin (all accounts)"),
        "{out}"
    );
    ok(&run(
        h,
        &[],
        &["account", "create", "ci", "--email", "ci@example.com"],
        "",
    )
    .await);
    let out = ok(&run(h, &[], &["account", "list"], "").await);
    assert!(out.contains("ci@example.com"), "{out}");
    let o = run(
        h,
        &[],
        &[
            "token",
            "create",
            "--account",
            "ci",
            "--name",
            "deploy",
            "--role",
            "viewer",
            "--expires",
            "30d",
        ],
        "",
    )
    .await;
    let out = ok(&o);
    let plain = out.lines().next().unwrap().trim().to_string();
    assert!(
        plain.starts_with("tg_") && plain.len() == 3 + 38,
        "first line is the token: {out}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("will not be shown again"));
    let r = get_bearer(&client(), tg.url("/apps/billing/x"), &plain).await;
    assert_eq!(r.status(), 200, "the remotely issued token works");

    let out = ok(&run(h, &[], &["token", "list", "--account", "ci", "--json"], "").await);
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["name"], "deploy");
    assert!(!out.contains(&plain));
    let table = ok(&run(h, &[], &["token", "list"], "").await);
    assert!(
        table.contains("deploy") && table.contains("viewer") && table.contains("active"),
        "{table}"
    );
    let out = ok(&run(h, &[], &["token", "show", &id], "").await);
    assert!(out.contains("deploy"), "{out}");

    let out = ok(&run(
        h,
        &[],
        &["token", "revoke", &id, "--reason", "round trip"],
        "",
    )
    .await);
    assert!(out.contains(&format!("revoked {id}")), "{out}");
    let r = get_bearer(&client(), tg.url("/apps/billing/x"), &plain).await;
    assert_eq!(
        r.status(),
        401,
        "revoked from the remote CLI, rejected at once"
    );
    let ev: Vec<Value> = tg
        .audit_lines()
        .await
        .into_iter()
        .filter(|l| l["event"] == "token.revoked")
        .collect();
    assert_eq!(
        (ev[0]["actor"].as_str(), ev[0]["reason"].as_str()),
        (Some(root_id.as_str()), Some("round trip"))
    );

    // identify reads the raw token from stdin.
    let out = ok(&run(
        h,
        &[],
        &["token", "identify", "--json"],
        &format!("{plain}\n"),
    )
    .await);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"].as_str(), Some(id.as_str()));

    // logout forgets the profile; remote commands then have nothing to use.
    ok(&run(h, &[], &["logout"], "").await);
    assert!(
        !std::fs::read_to_string(&cred)
            .unwrap()
            .contains("[default]")
    );
    let o = run(h, &[], &["whoami"], "").await;
    assert_eq!(
        o.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        tg.upstream.count(),
        1,
        "only the one public call reached the upstream"
    );
    let log = std::fs::read_to_string(tg.dir.path().join("audit.log")).unwrap();
    assert!(!log.contains(&root) && !log.contains(&plain));
    tg.stop().await;
}

#[tokio::test]
async fn profiles_env_token_precedence_and_no_token_to_a_foreign_url() {
    let tg = TestGateway::start().await;
    let (root, _) = tg.token("ops", "root", &["tokengate:admin"]);
    let (alice, _) = tg.token("alice", "alice-cli", &["tokengate:self", "apps:read"]);
    let (bob_plain, bob_id) = tg.token("bob", "bob-ci", &["apps:read"]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let xdg = h.join("xdg");
    let xdg_s = xdg.to_str().unwrap();
    let url = format!("http://{}", tg.admin_addr);

    // XDG_CONFIG_HOME is respected; TOKENGATE_TOKEN feeds login; --profile names the table.
    ok(&run(
        h,
        &[("XDG_CONFIG_HOME", xdg_s), ("TOKENGATE_TOKEN", &root)],
        &["login", "--url", &url],
        "",
    )
    .await);
    ok(&run(
        h,
        &[("XDG_CONFIG_HOME", xdg_s)],
        &["login", "--url", &url, "--profile", "alice"],
        &alice,
    )
    .await);
    let cred = xdg.join("tokengate/credentials");
    let text = std::fs::read_to_string(&cred).unwrap();
    assert!(
        text.contains("[default]") && text.contains("[alice]"),
        "{text}"
    );
    assert_eq!(mode(&cred), 0o600);

    let x = [("XDG_CONFIG_HOME", xdg_s)];
    let out = ok(&run(h, &x, &["whoami", "--json"], "").await);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["access"],
        "admin"
    );
    let out = ok(&run(h, &x, &["--profile", "alice", "whoami", "--json"], "").await);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["name"],
        "alice-cli"
    );
    // The environment beats the file.
    let out = ok(&run(
        h,
        &[("XDG_CONFIG_HOME", xdg_s), ("TOKENGATE_TOKEN", &alice)],
        &["whoami", "--json"],
        "",
    )
    .await);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["name"],
        "alice-cli"
    );

    // A self profile cannot reach another account's token.
    let o = run(
        h,
        &x,
        &["--profile", "alice", "token", "revoke", &bob_id],
        "",
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = get_bearer(&client(), tg.url("/apps/x/y"), &bob_plain).await;
    assert_eq!(r.status(), 200);
    let o = run(
        h,
        &x,
        &["--profile", "alice", "account", "create", "eve"],
        "",
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("403"));

    // A saved token is never sent to a URL it was not saved for: the recording upstream stands in
    // for a foreign server and must receive nothing.
    let foreign = format!("http://{}", tg.upstream.addr);
    let o = run(h, &x, &["--url", &foreign, "token", "list"], "").await;
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no token for"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(tg.upstream.count(), 1, "only the one public call above");

    // A wrong or non-tokengate token is refused at login and nothing is saved.
    let o = run(
        h,
        &x,
        &["login", "--url", &url, "--profile", "junk"],
        "not-a-token\n",
    )
    .await;
    assert_eq!(o.status.code(), Some(64));
    let o = run(h, &x, &["login", "--url", &url, "--profile", "junk"], "").await;
    assert_eq!(o.status.code(), Some(64), "no token on stdin");
    assert!(!std::fs::read_to_string(&cred).unwrap().contains("[junk]"));
    tg.stop().await;
}

#[tokio::test]
async fn login_over_tls_with_a_ca_made_in_the_test() {
    let certs = LocalhostCert::new();
    let tg = TestGateway::start_with(Options {
        sections: certs.admin_tls(),
        ..Options::default()
    })
    .await;
    let (root, _) = tg.token("ops", "root", &["tokengate:admin"]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let url = format!("https://localhost:{}", tg.admin_addr.port());
    // Without trusting the test CA the handshake fails and nothing is saved.
    let empty_ca = h.join("other.pem");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&empty_ca, other.cert.pem()).unwrap();
    let o = run(
        h,
        &[("TOKENGATE_CA_FILE", empty_ca.to_str().unwrap())],
        &["login", "--url", &url],
        &root,
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!h.join(".config/tokengate/credentials").exists());
    let ca = [("TOKENGATE_CA_FILE", certs.cert.to_str().unwrap())];
    ok(&run(h, &ca, &["login", "--url", &url], &root).await);
    let out = ok(&run(h, &ca, &["token", "list", "--json"], "").await);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 1);
    tg.stop().await;
}
