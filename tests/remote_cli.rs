//! The remote CLI (`tokengate login | whoami | logout`, and `token` / `account` commands with a
//! profile or `--url`) run as the real binary against a gateway on 127.0.0.1:0.

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use support::{
    LocalhostCert, Options, TestGateway, assert_error_message, assert_exit_code, client,
    get_bearer, get_bearer_expect,
};
use tokio::io::AsyncWriteExt;

/// The binary with `args`, a private HOME, no inherited TOKENGATE_* variables, in `home` (which
/// has no tokengate.toml); stdout and stderr piped.
fn command(home: &Path, args: &[&str]) -> tokio::process::Command {
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
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Runs [`command`] with the variables `env` set, feeding `stdin`.
async fn run(home: &Path, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
    let mut cmd = command(home, args);
    cmd.stdin(std::process::Stdio::piped());
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

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the run exited with `code` and said `needle` on stderr.
fn fails_with(o: &Output, code: i32, needle: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", err(o));
    assert!(err(o).contains(needle), "{}", err(o));
}

/// A gateway with a token `name` of `account` holding `perms`, a private HOME for the CLI, and
/// the admin listener's URL.
async fn gateway_and_home(
    account: &str,
    name: &str,
    perms: &[&str],
) -> (TestGateway, (String, String), tempfile::TempDir, String) {
    let tg = TestGateway::start().await;
    let token = tg.token(account, name, perms);
    let url = format!("http://{}", tg.admin_addr);
    (tg, token, tempfile::tempdir().unwrap(), url)
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn login_create_list_revoke_whoami_logout_round_trip() {
    let (tg, (root, root_id), home, url) =
        gateway_and_home("ops", "root", &["tokengate:admin"]).await;
    let h = home.path();

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
    let ev = tg.admin_events("token.revoked").await;
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
    assert_exit_code(&o, 64);
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
    let (tg, root, _) = TestGateway::with_admin().await;
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
    fails_with(&o, 1, "404");
    get_bearer_expect(&client(), tg.url("/apps/x/y"), &bob_plain, 200).await;
    let o = run(
        h,
        &x,
        &["--profile", "alice", "account", "create", "eve"],
        "",
    )
    .await;
    fails_with(&o, 1, "403");

    // A saved token is never sent to a URL it was not saved for: the recording upstream stands in
    // for a foreign server and must receive nothing.
    let foreign = format!("http://{}", tg.upstream.addr);
    let o = run(h, &x, &["--url", &foreign, "token", "list"], "").await;
    fails_with(&o, 64, "no token for");
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
    // The certificate error is told in words, with what to do; no Rust Debug value.
    let e = assert_exit_code(&o, 1);
    assert!(
        e.contains("not signed by an authority this computer trusts")
            && e.contains("TOKENGATE_CA_FILE"),
        "{e}"
    );
    assert!(
        !e.contains("UnknownIssuer") && !e.contains("Custom {"),
        "{e}"
    );
    assert!(!h.join(".config/tokengate/credentials").exists());
    let ca = [("TOKENGATE_CA_FILE", certs.cert.to_str().unwrap())];
    ok(&run(h, &ca, &["login", "--url", &url], &root).await);
    let out = ok(&run(h, &ca, &["token", "list", "--json"], "").await);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 1);
    tg.stop().await;
}

/// Runs the binary with its stdout's reading end already closed (as `| head -1` leaves it).
async fn run_closed_stdout(home: &Path, args: &[&str]) -> Output {
    let mut child = command(home, args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn auth_status_token_info_refresh_and_revoke_round_trip() {
    let (tg, (me, me_id), home, url) =
        gateway_and_home("ops", "laptop", &["tokengate:self", "apps:read"]).await;
    let h = home.path();
    let cred = h.join(".config/tokengate/credentials");

    // login with the token on stdin, status, token-info.
    ok(&run(h, &[], &["login", "--url", &url], &format!("{me}\n")).await);
    let out = ok(&run(h, &[], &["auth", "status"], "").await);
    assert!(
        out.contains(&format!("Logged in to {url} as laptop"))
            && out.contains("account ops")
            && out.contains("profile default")
            && out.contains("credentials file")
            && out.contains("expires"),
        "{out}"
    );
    assert!(!out.contains(&me), "status never prints the token");
    let v: Value =
        serde_json::from_str(&ok(&run(h, &[], &["auth", "status", "--json"], "").await)).unwrap();
    assert_eq!(v["token"]["id"], me_id.as_str());
    assert_eq!(v["storage"], "file");
    assert!(v["expires_in_days"].as_i64().unwrap() >= 29, "{v}");
    let v: Value = serde_json::from_str(&ok(
        &run(h, &[], &["auth", "token-info", "--json"], "").await
    ))
    .unwrap();
    assert_eq!(
        (v["id"].as_str(), v["name"].as_str()),
        (Some(me_id.as_str()), Some("laptop"))
    );
    assert_eq!(v["permissions"][1], "apps:read");

    // refresh: the file now holds the successor (atomically rewritten, still 0600), the next
    // command works with it, and the old token is refused once the grace is over.
    let out = ok(&run(h, &[], &["auth", "refresh", "--grace", "1h"], "").await);
    assert!(
        out.contains("Refreshed profile `default`") && out.contains("for 1h at most"),
        "{out}"
    );
    let text = std::fs::read_to_string(&cred).unwrap();
    assert!(!text.contains(&me), "the old token left the file");
    assert_eq!(mode(&cred), 0o600);
    let v: Value =
        serde_json::from_str(&ok(&run(h, &[], &["whoami", "--json"], "").await)).unwrap();
    let new_id = v["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, me_id);
    assert_eq!(v["rotated_from"], me_id.as_str());
    tg.gw.clock().advance_ms(3_600_000 + 60_000);
    let r = get_bearer(&client(), tg.url("/apps/billing/x"), &me).await;
    assert_eq!(r.status(), 401, "the old token is refused after the grace");
    ok(&run(h, &[], &["auth", "status"], "").await);

    // revoke: the token in use is revoked (401) and the profile is gone.
    let new_plain = {
        let text = std::fs::read_to_string(&cred).unwrap();
        let line = text.lines().find(|l| l.starts_with("token = ")).unwrap();
        line.trim_start_matches("token = ")
            .trim_matches('"')
            .to_string()
    };
    get_bearer_expect(&client(), tg.url("/apps/billing/x"), &new_plain, 200).await;
    let out = ok(&run(h, &[], &["auth", "revoke", "--reason", "laptop lost"], "").await);
    assert!(
        out.contains(&format!("Revoked {new_id}")) && out.contains("removed"),
        "{out}"
    );
    get_bearer_expect(&client(), tg.url("/apps/billing/x"), &new_plain, 401).await;
    assert!(
        !std::fs::read_to_string(&cred)
            .unwrap()
            .contains("[default]")
    );
    let o = run(h, &[], &["auth", "status"], "").await;
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    let ev = tg.admin_events("token.revoked").await;
    assert_eq!(ev.last().unwrap()["reason"], "laptop lost");

    // login with the token in TOKENGATE_TOKEN; status then says where the token comes from.
    let (other, _) = tg.token("ops", "ci", &["tokengate:self", "apps:read"]);
    ok(&run(
        h,
        &[("TOKENGATE_TOKEN", &other)],
        &["login", "--url", &url],
        "",
    )
    .await);
    assert!(std::fs::read_to_string(&cred).unwrap().contains(&other));
    let out = ok(&run(h, &[("TOKENGATE_TOKEN", &other)], &["auth", "status"], "").await);
    assert!(out.contains("TOKENGATE_TOKEN"), "{out}");
    let log = std::fs::read_to_string(tg.dir.path().join("audit.log")).unwrap();
    assert!(!log.contains(&me) && !log.contains(&new_plain) && !log.contains(&other));
    tg.stop().await;
}

#[tokio::test]
async fn default_context_feeds_account_and_scope() {
    let (tg, (root, _), home, url) = gateway_and_home("ops", "root", &["tokengate:admin"]).await;
    let h = home.path();
    tg.account("billing-team");
    ok(&run(h, &[], &["login", "--url", &url], &root).await);
    let out = ok(&run(
        h,
        &[],
        &[
            "context",
            "use",
            "--account",
            "billing-team",
            "--scope",
            "app=billing",
        ],
        "",
    )
    .await);
    assert!(
        out.contains("account billing-team, scope app=billing"),
        "{out}"
    );
    let o = run(
        h,
        &[],
        &[
            "token", "create", "--name", "deploy", "--role", "viewer", "--json",
        ],
        "",
    )
    .await;
    let v: Value = serde_json::from_str(ok(&o).lines().next().unwrap()).unwrap();
    assert_eq!(v["account"], "billing-team");
    assert_eq!(v["scopes"]["app"][0], "billing");
    let plain = v["token"].as_str().unwrap();
    get_bearer_expect(&client(), tg.url("/apps/billing/x"), plain, 200).await;
    // The scoped token outside its scope is told so, not that it lacks the permission.
    let r = get_bearer_expect(&client(), tg.url("/apps/web/x"), plain, 403).await;
    let body: Value = r.json().await.unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("scopes do not cover") && !msg.contains("lacks"),
        "{msg}"
    );
    assert_eq!(tg.last_request_line().await["reason"], "out_of_scope");
    // `token list` takes the context's account.
    let list: Vec<Value> =
        serde_json::from_str(&ok(&run(h, &[], &["token", "list", "--json"], "").await)).unwrap();
    assert!(list.iter().all(|t| t["account"] == "billing-team") && list.len() == 1);
    let out = ok(&run(h, &[], &["context", "clear"], "").await);
    assert!(out.contains("cleared"), "{out}");
    let o = run(
        h,
        &[],
        &["token", "create", "--name", "x", "--role", "viewer"],
        "",
    )
    .await;
    fails_with(&o, 64, "--account is required");
    tg.stop().await;
}

#[tokio::test]
async fn reported_bugs_stay_fixed() {
    let (tg, (root, _), home, url) = gateway_and_home("ops", "root", &["tokengate:admin"]).await;
    let h = home.path();
    let cfg = tg.config_path.to_str().unwrap().to_string();

    // `login --token X` explains where tokens come from; nothing is saved.
    let o = run(h, &[], &["login", "--url", &url, "--token", "tg_x"], "").await;
    assert_eq!(o.status.code(), Some(64));
    assert!(
        err(&o).contains("never read from the command line") && err(&o).contains("TOKENGATE_TOKEN"),
        "{}",
        err(&o)
    );
    // `login` against the public URL points at the admin URL.
    let public = format!("http://{}", tg.addr);
    let o = run(h, &[], &["login", "--url", &public], &root).await;
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    assert!(
        err(&o).contains("public listener") && err(&o).contains("admin"),
        "{}",
        err(&o)
    );
    // No repeated words.
    let o = run(h, &[], &["login", "--url", &url], "not-a-token\n").await;
    assert!(
        err(&o).contains("this is not a tokengate token"),
        "{}",
        err(&o)
    );
    assert_eq!(
        err(&o).matches("not a tokengate token").count(),
        1,
        "{}",
        err(&o)
    );
    assert!(!h.join(".config/tokengate/credentials").exists());

    ok(&run(h, &[], &["login", "--url", &url], &root).await);
    // --permission with --role, as documented.
    let o = run(
        h,
        &[],
        &[
            "token",
            "create",
            "--account",
            "ops",
            "--name",
            "both",
            "--role",
            "viewer",
            "--permission",
            "apps:deploy",
            "--json",
        ],
        "",
    )
    .await;
    let v: Value = serde_json::from_str(ok(&o).lines().next().unwrap()).unwrap();
    let perms = v["permissions"].to_string();
    assert!(
        perms.contains("apps:read") && perms.contains("apps:deploy"),
        "{perms}"
    );
    let id = v["id"].as_str().unwrap().to_string();
    // `--grace 1h` is echoed as 1h.
    let o = run(h, &[], &["token", "rotate", &id, "--grace", "1h"], "").await;
    ok(&o);
    assert!(err(&o).contains("for 1h at most"), "{}", err(&o));

    // `account list --json`: one shape locally and remotely.
    let remote: Vec<Value> =
        serde_json::from_str(&ok(&run(h, &[], &["account", "list", "--json"], "").await)).unwrap();
    let local: Vec<Value> = serde_json::from_str(&ok(&run(
        h,
        &[],
        &["--config", &cfg, "account", "list", "--json"],
        "",
    )
    .await))
    .unwrap();
    assert_eq!(remote, local);
    assert!(
        local[0]["created_at"].as_str().unwrap().ends_with('Z') && local[0]["status"] == "active"
    );

    // A closed stdout ends every listing quietly with 0 (locally and remotely).
    for args in [
        vec!["whoami"],
        vec!["token", "list"],
        vec!["account", "list"],
        vec!["token", "show", &id, "--json"],
        vec!["--config", &cfg, "token", "list"],
        vec!["--config", &cfg, "account", "list"],
        vec!["--config", &cfg, "config", "check"],
        vec!["completions", "bash"],
    ] {
        let o = run_closed_stdout(h, &args).await;
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", err(&o));
        assert!(err(&o).is_empty(), "{args:?}: {}", err(&o));
    }

    // `config check`: human names and plurals.
    let out = ok(&run(h, &[], &["--config", &cfg, "config", "check"], "").await);
    assert!(
        out.contains("on_failure = reject") && !out.contains("Reject"),
        "{out}"
    );
    assert!(!out.contains("(1 rules"), "{out}");

    // A disabled account gets its own message.
    let (bob, _) = tg.token("bob", "bob-ci", &["apps:read"]);
    ok(&run(h, &[], &["account", "disable", "bob"], "").await);
    let r = get_bearer(&client(), tg.url("/apps/billing/x"), &bob).await;
    assert_error_message(r, 401, "account that owns this API token is disabled").await;
    assert_eq!(
        tg.upstream.count(),
        0,
        "no refused request reached the upstream"
    );
    tg.stop().await;
}

/// A non-loopback address of this host (the one a default route would use), to reach the
/// gateway from a peer that is not loopback. The test fails loudly without one.
fn non_loopback_addr() -> std::net::IpAddr {
    for probe in [
        "192.0.2.1:9",
        "198.51.100.1:9",
        "10.255.255.1:9",
        "8.8.8.8:53",
    ] {
        if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") {
            if s.connect(probe).is_ok() {
                if let Ok(a) = s.local_addr() {
                    if !a.ip().is_loopback() && !a.ip().is_unspecified() {
                        return a.ip();
                    }
                }
            }
        }
    }
    panic!("this host has no non-loopback IPv4 address: the plain-HTTP refusal test needs one");
}

/// A gateway listening on every address with the `[server]` keys `server`, a token with
/// `apps:read`, and the URL of `/apps/billing/x` through the non-loopback address `here`.
async fn on_the_lan(here: std::net::IpAddr, server: String) -> (TestGateway, String, String) {
    let tg = TestGateway::start_with(Options {
        listen: Some("0.0.0.0:0".into()),
        server,
        ..Options::default()
    })
    .await;
    let (t, _) = tg.token("ops", "ci", &["apps:read"]);
    let via_lan = format!("http://{here}:{}/apps/billing/x", tg.addr.port());
    (tg, t, via_lan)
}

/// `GET url` with the bearer `token` and one more header; the status.
async fn get_with_header(url: &str, token: &str, header: (&str, &str)) -> reqwest::StatusCode {
    support::get_with(&client(), url, Some(token), &[header])
        .await
        .status()
}

#[tokio::test]
async fn bearer_tokens_over_plain_http_only_from_loopback_or_a_trusted_https_proxy() {
    let here = non_loopback_addr();
    let (tg, t, via_lan) = on_the_lan(here, format!("trusted_proxies = [\"{here}/32\"]")).await;
    let via_lo = format!("http://127.0.0.1:{}/apps/billing/x", tg.addr.port());

    // From a non-loopback peer, over plain HTTP: 403 with how to fix, audited, nothing forwarded.
    let r = get_bearer_expect(&client(), via_lan.clone(), &t, 403).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "https_required");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("HTTPS") && msg.contains("X-Forwarded-Proto"),
        "{msg}"
    );
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "plaintext_token");
    assert_eq!(line["client_ip"], here.to_string());
    assert_eq!(line["token_prefix"], &t[..11]);
    assert_eq!(tg.upstream.count(), 0);
    // A trusted proxy that says the client used HTTPS is believed; one that says http is not.
    let r = get_with_header(&via_lan, &t, ("x-forwarded-proto", "https")).await;
    assert_eq!(r, 200);
    let r = get_with_header(&via_lan, &t, ("forwarded", "for=192.0.2.9;proto=http")).await;
    assert_eq!(r, 403);
    assert_eq!(tg.upstream.count(), 1);
    // Loopback: the exception.
    get_bearer_expect(&client(), via_lo, &t, 200).await;
    // Without a token nothing changes: the usual 401.
    assert_eq!(client().get(via_lan).send().await.unwrap().status(), 401);
    tg.stop().await;

    // Untrusted non-loopback peer: even a claimed HTTPS is refused; the switch lifts it.
    let (tg, t, via_lan) = on_the_lan(here, String::new()).await;
    let r = get_with_header(&via_lan, &t, ("x-forwarded-proto", "https")).await;
    assert_eq!(r, 403);
    tg.stop().await;
    let (tg, t, via_lan) = on_the_lan(here, "allow_plaintext_tokens = true".into()).await;
    get_bearer_expect(&client(), via_lan, &t, 200).await;
    tg.stop().await;
}

#[tokio::test]
async fn remote_cli_refuses_plain_http_to_a_host_that_is_not_loopback() {
    let here = non_loopback_addr();
    let (tg, root, _) = TestGateway::with_admin().await;
    // A listener on the non-loopback address stands in for a remote gateway: it must see nothing.
    let spy = std::net::TcpListener::bind((here, 0)).unwrap();
    spy.set_nonblocking(true).unwrap();
    let spy_url = format!("http://{}", spy.local_addr().unwrap());
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let o = run(
        h,
        &[("TOKENGATE_TOKEN", &root)],
        &["--url", &spy_url, "token", "list"],
        "",
    )
    .await;
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    assert!(
        err(&o).contains("plain HTTP") && err(&o).contains("--allow-plaintext"),
        "{}",
        err(&o)
    );
    let o = run(h, &[], &["login", "--url", &spy_url], &root).await;
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    let accepted = spy.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(
        accepted,
        Err(std::io::ErrorKind::WouldBlock),
        "the CLI connected to the non-loopback host"
    );
    // Loopback is fine without the flag.
    let url = format!("http://{}", tg.admin_addr);
    ok(&run(
        h,
        &[("TOKENGATE_TOKEN", &root)],
        &["--url", &url, "token", "list"],
        "",
    )
    .await);
    // Told to, it does send: the listener answers 401 and sees the token arrive.
    spy.set_nonblocking(false).unwrap();
    let seen = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = spy.accept().unwrap();
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"error":"invalid_token","message":"The API token is not valid."}"#;
        let _ = write!(
            s,
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        String::from_utf8_lossy(&got).into_owned()
    });
    let o = run(
        h,
        &[("TOKENGATE_TOKEN", &root)],
        &["--url", &spy_url, "--allow-plaintext", "token", "list"],
        "",
    )
    .await;
    fails_with(&o, 1, "401");
    let request = seen.join().unwrap();
    assert!(request.contains(&format!("Bearer {root}")), "{request}");
    tg.stop().await;
}

/// A private D-Bus session bus with gnome-keyring's Secret Service unlocked in it (a real
/// keyring, as on a desktop). Fails loudly when the programs are missing: never skipped.
struct SecretService {
    bus: String,
    pid: u32,
    _home: tempfile::TempDir,
}

impl SecretService {
    fn start() -> SecretService {
        let home = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("dbus-daemon")
            .args(["--session", "--fork", "--print-address=1", "--print-pid=1"])
            .output()
            .expect("dbus-daemon is missing: install dbus and gnome-keyring (.ci/run does)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let bus = lines.next().unwrap().to_string();
        let pid: u32 = lines.next().unwrap().trim().parse().unwrap();
        let mut unlock = std::process::Command::new("gnome-keyring-daemon")
            .args(["--unlock", "--components=secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus)
            .env("HOME", home.path())
            .env_remove("XDG_DATA_HOME")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("gnome-keyring-daemon is missing: install gnome-keyring (.ci/run does)");
        {
            use std::io::Write;
            unlock
                .stdin
                .take()
                .unwrap()
                .write_all(b"test-password")
                .unwrap();
        }
        assert!(
            unlock.wait().unwrap().success(),
            "gnome-keyring-daemon --unlock failed"
        );
        SecretService {
            bus,
            pid,
            _home: home,
        }
    }

    /// The secret stored for `user` under the service `tokengate` (secret-tool, libsecret's CLI).
    fn lookup(&self, user: &str) -> Option<String> {
        let out = std::process::Command::new("secret-tool")
            .args(["lookup", "service", "tokengate", "username", user])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .output()
            .expect("secret-tool is missing: install libsecret-tools (.ci/run does)");
        let s = String::from_utf8(out.stdout).unwrap();
        (out.status.success() && !s.is_empty()).then_some(s)
    }
}

impl Drop for SecretService {
    fn drop(&mut self) {
        // Only the bus this test started; gnome-keyring-daemon exits with its session bus.
        let _ = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status();
    }
}

#[tokio::test]
async fn login_keyring_round_trip_on_a_real_secret_service() {
    let ss = SecretService::start();
    let (tg, (me, me_id), home, url) =
        gateway_and_home("ops", "desk", &["tokengate:self", "apps:read"]).await;
    let h = home.path();
    let bus = [("DBUS_SESSION_BUS_ADDRESS", ss.bus.as_str())];
    let out = ok(&run(h, &bus, &["login", "--keyring", "--url", &url], &me).await);
    assert!(out.contains("system keyring"), "{out}");
    let cred = h.join(".config/tokengate/credentials");
    let text = std::fs::read_to_string(&cred).unwrap();
    let reference = format!("default@{url}");
    assert!(
        !text.contains(&me) && text.contains(&format!("keyring = \"{reference}\"")),
        "the file keeps only a reference: {text}"
    );
    assert_eq!(
        ss.lookup(&reference).as_deref(),
        Some(me.as_str()),
        "in the real keyring"
    );
    let v: Value =
        serde_json::from_str(&ok(&run(h, &bus, &["whoami", "--json"], "").await)).unwrap();
    assert_eq!(v["id"], me_id.as_str());
    let v: Value =
        serde_json::from_str(&ok(&run(h, &bus, &["auth", "status", "--json"], "").await)).unwrap();
    assert_eq!(v["storage"], "keyring");
    // refresh replaces the keyring entry; the file still holds no token.
    ok(&run(h, &bus, &["auth", "refresh"], "").await);
    let new = ss.lookup(&reference).unwrap();
    assert_ne!(new, me);
    assert!(!std::fs::read_to_string(&cred).unwrap().contains(&new));
    let v: Value =
        serde_json::from_str(&ok(&run(h, &bus, &["whoami", "--json"], "").await)).unwrap();
    assert_eq!(v["rotated_from"], me_id.as_str());
    // logout removes the profile and the keyring entry.
    ok(&run(h, &bus, &["logout"], "").await);
    assert_eq!(ss.lookup(&reference), None);
    tg.stop().await;
}

/// The shell commands of one CI recipe in the README: GitHub's `run:` lines, GitLab's `script:`
/// items, Jenkins' `sh '...'` steps.
fn recipe_commands(block: &str) -> Vec<String> {
    let mut cmds = vec![];
    let mut in_script = false;
    for line in block.lines() {
        let t = line.trim();
        if let Some(c) = t.strip_prefix("- run: ") {
            cmds.push(c.to_string());
        } else if t == "script:" {
            in_script = true;
        } else if in_script && t.starts_with("- ") {
            cmds.push(t[2..].to_string());
        } else if let Some(c) = t.strip_prefix("sh '").and_then(|c| c.strip_suffix('\'')) {
            cmds.push(c.to_string());
        }
    }
    cmds
}

#[tokio::test]
async fn readme_ci_recipes_work_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## CI recipes")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let blocks: Vec<&str> = section.split("```").skip(1).step_by(2).collect();
    assert_eq!(blocks.len(), 3, "GitHub Actions, GitLab CI, Jenkins");
    let tg = TestGateway::start().await;
    let (ci, _) = tg.token("ci-bot", "deploy", &["tokengate:self", "apps:read"]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tokengate")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let admin = format!("http://{}", tg.admin_addr);
    let public = format!("http://{}", tg.addr);
    for block in blocks {
        let cmds = recipe_commands(block);
        assert_eq!(cmds.len(), 3, "{block}");
        for c in cmds {
            let before = tg.upstream.count();
            let mut cmd = tokio::process::Command::new("bash");
            cmd.args(["-euo", "pipefail", "-c", &c])
                .current_dir(h)
                .env("HOME", h)
                .env("PATH", &path)
                .env("TOKENGATE_TOKEN", &ci)
                .env("TOKENGATE_URL", &admin)
                .env("GATEWAY", &public)
                .env_remove("TOKENGATE_CONFIG")
                .env_remove("TOKENGATE_PROFILE");
            let o = cmd.output().await.unwrap();
            assert!(
                o.status.success(),
                "`{c}` failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                err(&o)
            );
            if c.contains("/apps/billing/status") {
                assert_eq!(tg.upstream.count(), before + 1, "`{c}` reached the API");
            }
        }
    }
    tg.stop().await;
}
