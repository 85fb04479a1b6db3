//! Authorisation through a running gateway (issue 3, SPEC §3): scopes, IP allowlists with and
//! without a trusted proxy, shadow rules and shadow roles, roles and wildcards, most-specific-wins,
//! WebSocket upgrades, and ambiguous rules refused by `config check`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokengate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_tokengate");

/// `tokengate --config CFG token create --account ACCOUNT --name NAME ARGS...`: returns the
/// plaintext (first stdout line).
async fn cli_token(config: &std::path::Path, account: &str, name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["token", "create", "--account", account, "--name", name])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "token create {account}/{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().next().unwrap().trim().to_string()
}

/// One GET over raw TCP with `Connection: close`, optional token and extra header lines.
async fn get(addr: SocketAddr, target: &str, tok: Option<&str>, extra: &str) -> RawResponse {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n");
    if let Some(t) = tok {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    r.push_str(extra);
    r.push_str("Connection: close\r\n\r\n");
    raw(addr, &r).await
}

/// Asserts a 403 with its challenge, JSON body and required permission.
fn assert_forbidden(r: &RawResponse, permission: Option<&str>) {
    assert_eq!(r.status, 403, "{}", r.raw);
    let www = r.header("www-authenticate").unwrap();
    assert!(
        www.starts_with("Bearer realm=\"tokengate\"")
            && www.contains("error=\"insufficient_scope\""),
        "{www}"
    );
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "insufficient_scope");
    match permission {
        Some(p) => assert_eq!(body["required_permission"], p, "{body}"),
        None => assert!(body["required_permission"].is_null(), "{body}"),
    }
}

/// Asserts a 401 `invalid_token` with the generic description.
fn assert_invalid_token(r: &RawResponse) {
    assert_eq!(r.status, 401, "{}", r.raw);
    let www = r.header("www-authenticate").unwrap();
    assert!(www.contains("error=\"invalid_token\""), "{www}");
    assert!(
        www.ends_with("error_description=\"The access token is invalid\""),
        "generic, no hint about the allowlist: {www}"
    );
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "invalid_token");
}

// ------------------------------------------------------------------------------------------------
// Scopes.

#[tokio::test]
async fn scope_limits_a_captured_name_to_the_listed_values() {
    let tg = TestGateway::start().await;
    tg.account("ops");
    let tok = cli_token(
        &tg.config_path,
        "ops",
        "scoped",
        &["--permission", "apps:read", "--scope", "app=billing,web-*"],
    )
    .await;

    let allowed = [
        ("/apps/billing", "/apps/billing"),
        ("/apps/billing/invoices", "/apps/billing/invoices"),
        ("/apps/web-1", "/apps/web-1"),
        ("/apps/web-1/logs", "/apps/web-1/logs"),
        ("/apps/web-", "/apps/web-"),
        ("/apps/%62illing/x", "/apps/billing/x"),
        ("/apps/billing/x?app=payroll", "/apps/billing/x?app=payroll"),
    ];
    for (target, forwarded) in allowed {
        tg.upstream.clear();
        let r = get(tg.addr, target, Some(&tok), "").await;
        assert_eq!(r.status, 200, "{target}: {}", r.raw);
        let got: Vec<String> = tg.upstream.targets();
        assert_eq!(got, [forwarded], "{target}");
        let line = tg.last_request_line().await;
        assert_eq!(line["reason"], "ok", "{target}");
    }

    for target in [
        "/apps/payroll",
        "/apps/payroll/x",
        "/apps/Billing/x",
        "/apps/billing-x",
        "/apps/web",
        "/apps/xweb-1",
        "/apps/%70ayroll",
    ] {
        tg.upstream.clear();
        let r = get(tg.addr, target, Some(&tok), "").await;
        assert_forbidden(&r, Some("apps:read"));
        let line = tg.last_request_line().await;
        assert_rejection_line(&line, 403, "out_of_scope");
        assert_eq!(line["permission"], "apps:read");
        assert_eq!(tg.upstream.count(), 0, "{target}");
    }
    // Path tricks to step from an allowed value to another are refused before authorisation.
    for target in [
        "/apps/billing/../payroll/x",
        "/apps/web-1%2F..%2Fpayroll",
        "/apps/billing%2Fpayroll",
    ] {
        let r = get(tg.addr, target, Some(&tok), "").await;
        assert_eq!(r.status, 400, "{target}");
        assert_rejection_line(&tg.last_request_line().await, 400, "bad_path");
    }
    assert_eq!(tg.upstream.count(), 0);

    // whoami shows the scope.
    let r = get(tg.addr, "/_tokengate/v1/whoami", Some(&tok), "").await;
    let me: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(me["scopes"]["app"], serde_json::json!(["billing", "web-*"]));
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// IP allowlists and trusted proxies.

/// A CLI-created token of `ops` holding `apps:read`, usable only from addresses in `net`.
async fn ip_bound_reader(cfg: &std::path::Path, name: &str, net: &str) -> String {
    cli_token(
        cfg,
        "ops",
        name,
        &["--permission", "apps:read", "--allow-ip", net],
    )
    .await
}

#[tokio::test]
async fn ip_allowlist_uses_the_tcp_peer_and_ignores_spoofed_forwarded_for() {
    let tg = TestGateway::start().await;
    tg.account("ops");
    let cfg = tg.config_path.clone();
    let local = ip_bound_reader(&cfg, "local", "127.0.0.0/8").await;
    let tenner = ip_bound_reader(&cfg, "tenner", "10.0.0.0/8").await;
    let v6only = ip_bound_reader(&cfg, "v6", "2001:db8::/32").await;

    let r = get(tg.addr, "/apps/x", Some(&local), "").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(tg.upstream.count(), 1);

    for (tok, xff) in [
        (&tenner, ""),
        (&tenner, "X-Forwarded-For: 10.1.2.3\r\n"),
        (
            &tenner,
            "X-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 10.1.2.3\r\nForwarded: for=10.1.2.3\r\n",
        ),
        (&v6only, "X-Forwarded-For: 2001:db8::1\r\n"),
    ] {
        let r = get(tg.addr, "/apps/x", Some(tok), xff).await;
        assert_invalid_token(&r);
        let line = tg.last_request_line().await;
        assert_rejection_line(&line, 401, "ip_not_allowed");
        assert_eq!(
            line["client_ip"], "127.0.0.1",
            "without trusted proxies the peer address counts"
        );
    }
    assert_eq!(tg.upstream.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn trusted_proxy_makes_the_last_untrusted_forwarded_for_hop_the_client() {
    let tg = TestGateway::with_server("trusted_proxies = [\"127.0.0.0/8\"]").await;
    let perms = &["apps:read"];
    let (tenner, _) = tg.token_with("ops", "tenner", perms, |s| {
        s.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap()]
    });
    let (v6, _) = tg.token_with("ops", "v6", perms, |s| {
        s.allowed_cidrs = vec!["2001:db8::/32".parse().unwrap()]
    });

    // (token, X-Forwarded-For, allowed, client_ip the gateway must use)
    let cases = [
        (&tenner, Some("10.1.2.3"), true, "10.1.2.3"),
        (&tenner, Some("6.6.6.6, 10.1.2.3"), true, "10.1.2.3"),
        (&tenner, Some("10.1.2.3, 127.0.0.5"), true, "10.1.2.3"),
        (&tenner, Some("::ffff:10.1.2.3"), true, "::ffff:10.1.2.3"),
        (&tenner, Some("10.1.2.3, 6.6.6.6"), false, "6.6.6.6"),
        (&tenner, Some("bogus"), false, "127.0.0.1"),
        (&tenner, Some("10.1.2.3, bogus"), false, "127.0.0.1"),
        (&tenner, None, false, "127.0.0.1"),
        (&v6, Some("2001:db8::7"), true, "2001:db8::7"),
        (&v6, Some("2001:db9::7"), false, "2001:db9::7"),
        (&v6, Some("10.1.2.3"), false, "10.1.2.3"),
    ];
    for (tok, xff, allowed, client) in cases {
        tg.upstream.clear();
        let extra = xff
            .map(|x| format!("X-Forwarded-For: {x}\r\n"))
            .unwrap_or_default();
        let r = get(tg.addr, "/apps/x", Some(tok), &extra).await;
        let line = tg.last_request_line().await;
        assert_eq!(line["client_ip"], client, "{xff:?}: {line}");
        if allowed {
            assert_eq!(r.status, 200, "{xff:?}: {}", r.raw);
            let got = tg.upstream.received();
            assert_eq!(got.len(), 1);
            assert_eq!(
                got[0].headers["x-forwarded-for"], client,
                "the upstream sees the client the gateway believed"
            );
            assert_eq!(got[0].headers["x-real-ip"], client);
        } else {
            assert_invalid_token(&r);
            assert_rejection_line(&line, 401, "ip_not_allowed");
            assert_eq!(tg.upstream.count(), 0, "{xff:?}");
        }
    }
    tg.stop().await;
}

/// On a dual-stack listener (`[::]`), an IPv4 client arrives as `::ffff:a.b.c.d`. The gateway
/// takes it for the IPv4 address everywhere: a trusted proxy is believed (its
/// `X-Forwarded-For` is the client), token networks written in IPv4 match, and the forwarded
/// headers and the audit line name `127.0.0.1`, as on an IPv4 listener.
#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_address() {
    let tg = TestGateway::start_with(Options {
        listen: Some("[::]:0".into()),
        ..Options::server("trusted_proxies = [\"127.0.0.1/32\"]")
    })
    .await;
    let v4 = SocketAddr::from(([127, 0, 0, 1], tg.addr.port()));
    let (tok, _) = tg.token_with("ci", "lo", &["apps:read"], |s| {
        s.allowed_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    });
    // Straight from 127.0.0.1: the token's network matches.
    let r = get(v4, "/apps/x", Some(&tok), "").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let got = tg.upstream.received();
    assert_eq!(got[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        got[0].headers["forwarded"],
        "for=127.0.0.1;proto=http;host=\"gw.test\""
    );
    let line = tg.last_request_line().await;
    assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
    // Through 127.0.0.1 as a trusted proxy: its X-Forwarded-For names the client, whose
    // address is outside the token's networks.
    let r = get(
        v4,
        "/apps/x",
        Some(&tok),
        "X-Forwarded-For: 203.0.113.9\r\n",
    )
    .await;
    assert_invalid_token(&r);
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 401, "ip_not_allowed");
    assert_eq!(line["client_ip"], "203.0.113.9", "{line}");
    assert_eq!(tg.upstream.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn ip_allowlist_with_ipv6_cidrs_on_an_ipv6_listener() {
    // A gateway listening on `[::1]:0`, for a real IPv6 peer.
    let v6 = TestGateway::start_with(Options {
        listen: Some("[::1]:0".into()),
        ..Options::default()
    })
    .await;
    assert!(v6.addr.is_ipv6());
    let now = v6.gw.now_ms();
    let make = |name: &str, cidr: &str| {
        v6.token_with("ops", name, &["apps:read"], |s| {
            s.allowed_cidrs = vec![cidr.parse().unwrap()];
            s.expires_at = Some(now + 86_400_000);
        })
        .0
    };
    let loopback = make("loopback", "::1/128");
    let doc = make("doc", "2001:db8::/32");
    let v4 = make("v4", "127.0.0.0/8");

    let r = get(v6.addr, "/apps/x", Some(&loopback), "").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(v6.upstream.count(), 1);
    assert_eq!(v6.upstream.received()[0].headers["x-forwarded-for"], "::1");
    assert_eq!(
        v6.upstream.received()[0].headers["forwarded"],
        "for=\"[::1]\";proto=http;host=\"gw.test\""
    );
    for tok in [&doc, &v4] {
        let r = get(
            v6.addr,
            "/apps/x",
            Some(tok),
            "X-Forwarded-For: 2001:db8::1\r\n",
        )
        .await;
        assert_invalid_token(&r);
    }
    assert_eq!(v6.upstream.count(), 1);
    let lines = v6.request_lines().await;
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["client_ip"], "::1");
    for l in &lines[1..] {
        assert_rejection_line(l, 401, "ip_not_allowed");
        assert_eq!(l["client_ip"], "::1");
    }
    v6.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Shadow rules and shadow roles.

/// Rules with a staged (shadow) rule that would deny and one that would open a path.
fn shadow_rules() -> String {
    [
        permission_rule(&["GET"], "/apps/{app}/**", "apps:read"),
        shadow(permission_rule(
            &["GET"],
            "/apps/{app}/secrets/**",
            "apps:secrets",
        )),
        permission_rule(&["GET"], "/reports/**", "reports:read"),
        shadow(public_rule(&["GET"], "/reports/public/**")),
        permission_rule(&["POST"], "/apps/{app}/deploy", "apps:deploy"),
    ]
    .concat()
}

#[tokio::test]
async fn shadow_rules_are_logged_but_never_enforced() {
    let tg = TestGateway::start_with(Options::rules(shadow_rules())).await;
    let (reader, _) = tg.token("ops", "reader", &["apps:read"]);
    let (secrets, _) = tg.token("ops", "secrets", &["apps:read", "apps:secrets"]);

    // The staged rule would deny, the enforced one allows: forwarded, logged would_deny.
    let r = get(tg.addr, "/apps/x/secrets/k", Some(&reader), "").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(tg.upstream.count(), 1);
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "ok");
    assert_eq!(line["rbac_decision"], "allow");
    assert_eq!(line["shadow_decision"], "would_deny", "{line}");
    assert_eq!(
        line["rule"], "api:GET /apps/{app}/**",
        "the enforced rule is the one recorded"
    );
    assert_eq!(line["permission"], "apps:read");

    let r = get(tg.addr, "/apps/x/secrets/k", Some(&secrets), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        tg.last_request_line().await["shadow_decision"],
        "would_allow"
    );

    // Where no shadow rule applies, there is no shadow decision.
    let r = get(tg.addr, "/apps/x/logs", Some(&reader), "").await;
    assert_eq!(r.status, 200);
    assert!(tg.last_request_line().await["shadow_decision"].is_null());

    // A staged public rule would allow, the enforced one denies: 403, nothing forwarded.
    tg.upstream.clear();
    let r = get(tg.addr, "/reports/public/q1", Some(&reader), "").await;
    assert_forbidden(&r, Some("reports:read"));
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 403, "insufficient_permission");
    assert_eq!(line["shadow_decision"], "would_allow", "{line}");
    // ... and it does not make the route public either.
    let r = get(tg.addr, "/reports/public/q1", None, "").await;
    assert_eq!(r.status, 401);
    assert_rejection_line(&tg.last_request_line().await, 401, "missing_token");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn shadow_roles_are_logged_but_the_stored_permissions_are_enforced() {
    let roles = r#"
[roles.narrowing]
permissions = ["logs:read"]
shadow = true

[roles.widening]
permissions = ["apps:read", "apps:deploy"]
shadow = true
"#;
    let tg = TestGateway::start_with(Options {
        sections: roles.into(),
        rules: shadow_rules(),
        ..Options::default()
    })
    .await;
    // Tokens keep the permission list they were created with; the roles changed since.
    let (narrowed, _) = tg.token_with("ops", "narrowed", &["apps:read", "logs:read"], |s| {
        s.role = Some("narrowing".into())
    });
    let (widened, _) = tg.token_with("ops", "widened", &["apps:read"], |s| {
        s.role = Some("widening".into())
    });
    let (plain, _) = tg.token("ops", "plain", &["apps:read"]);

    let r = get(tg.addr, "/apps/x/status", Some(&narrowed), "").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let line = tg.last_request_line().await;
    assert_eq!(line["rbac_decision"], "allow");
    assert_eq!(line["shadow_decision"], "would_deny", "{line}");
    assert_eq!(tg.upstream.count(), 1);

    let deploy = |tok: String| {
        let addr = tg.addr;
        async move {
            raw(
                addr,
                format!(
                    "POST /apps/x/deploy HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
            )
            .await
        }
    };
    let r = deploy(widened.clone()).await;
    assert_forbidden(&r, Some("apps:deploy"));
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 403, "insufficient_permission");
    assert_eq!(line["shadow_decision"], "would_allow", "{line}");
    assert_eq!(
        tg.upstream.count(),
        1,
        "the shadow role did not widen the token"
    );

    let r = get(tg.addr, "/apps/x/status", Some(&plain), "").await;
    assert_eq!(r.status, 200);
    assert!(
        tg.last_request_line().await["shadow_decision"].is_null(),
        "no role, no shadow decision"
    );
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Roles, wildcards, most specific rule.

/// Overlapping rules, from `/apps/{app}/**` down to literal and public paths under it.
fn specific_rules() -> String {
    [
        permission_rule(&["GET"], "/apps/{app}/**", "apps:read"),
        permission_rule(&["GET"], "/apps/{app}/secrets/**", "apps:secrets"),
        permission_rule(&["GET"], "/apps/billing/secrets/**", "billing:secrets"),
        public_rule(&["GET"], "/apps/{app}/status"),
        permission_rule(&["GET"], "/apps/{app}/logs/{file...}", "logs:read"),
        permission_rule(&["POST"], "/apps/{app}/deploy", "apps:deploy"),
        permission_rule(&[], "/admin/**", "admin:all"),
    ]
    .concat()
}

/// (token, target, status, rule that decided, required permission)
type Expect<'a> = (Option<&'a str>, &'a str, u16, &'a str, Option<&'a str>);

#[tokio::test]
async fn the_most_specific_rule_wins_end_to_end() {
    let tg = TestGateway::start_with(Options::rules(specific_rules())).await;
    let (reader, _) = tg.token("ops", "reader", &["apps:read"]);
    let (billing, _) = tg.token("ops", "billing", &["apps:read", "billing:secrets"]);
    let (apps_all, _) = tg.token("ops", "apps-all", &["apps:*"]);
    let (everything, _) = tg.token("ops", "everything", &["*"]);
    let (admin_all, _) = tg.token("ops", "admin-all", &["admin:*"]);

    // (token, target, status, rule that decided, required permission)
    let cases: Vec<Expect<'_>> = vec![
        (
            Some(&reader),
            "/apps/x/readme",
            200,
            "api:GET /apps/{app}/**",
            Some("apps:read"),
        ),
        (
            Some(&reader),
            "/apps/x/secrets/k",
            403,
            "api:GET /apps/{app}/secrets/**",
            Some("apps:secrets"),
        ),
        (
            Some(&reader),
            "/apps/billing/secrets/k",
            403,
            "api:GET /apps/billing/secrets/**",
            Some("billing:secrets"),
        ),
        (
            Some(&billing),
            "/apps/billing/secrets/k",
            200,
            "api:GET /apps/billing/secrets/**",
            Some("billing:secrets"),
        ),
        (
            Some(&billing),
            "/apps/other/secrets/k",
            403,
            "api:GET /apps/{app}/secrets/**",
            Some("apps:secrets"),
        ),
        (
            Some(&apps_all),
            "/apps/other/secrets/k",
            200,
            "api:GET /apps/{app}/secrets/**",
            Some("apps:secrets"),
        ),
        (
            Some(&apps_all),
            "/apps/billing/secrets/k",
            403,
            "api:GET /apps/billing/secrets/**",
            Some("billing:secrets"),
        ),
        (
            Some(&apps_all),
            "/admin/users",
            403,
            "api:* /admin/**",
            Some("admin:all"),
        ),
        (
            Some(&reader),
            "/apps/x/logs/a/b.txt",
            403,
            "api:GET /apps/{app}/logs/{file...}",
            Some("logs:read"),
        ),
        (
            None,
            "/apps/x/status",
            200,
            "api:GET /apps/{app}/status",
            None,
        ),
        (
            None,
            "/apps/x/status/more",
            401,
            "api:GET /apps/{app}/**",
            Some("apps:read"),
        ),
        (
            Some(&everything),
            "/admin/users",
            200,
            "api:* /admin/**",
            Some("admin:all"),
        ),
        (
            Some(&everything),
            "/apps/billing/secrets/k",
            200,
            "api:GET /apps/billing/secrets/**",
            Some("billing:secrets"),
        ),
        (
            Some(&admin_all),
            "/admin/users",
            200,
            "api:* /admin/**",
            Some("admin:all"),
        ),
        (
            Some(&admin_all),
            "/apps/x/readme",
            403,
            "api:GET /apps/{app}/**",
            Some("apps:read"),
        ),
    ];
    for (tok, target, status, rule, permission) in cases {
        tg.upstream.clear();
        let r = get(tg.addr, target, tok, "").await;
        assert_eq!(r.status, status, "{target}: {}", r.raw);
        let line = tg.last_request_line().await;
        assert_eq!(line["rule"], rule, "{target}: {line}");
        assert_eq!(
            line["permission"],
            permission.map_or(serde_json::Value::Null, Into::into),
            "{target}: {line}"
        );
        match status {
            200 => assert_eq!(tg.upstream.count(), 1, "{target}"),
            403 => {
                assert_forbidden(&r, permission);
                assert_rejection_line(&line, 403, "insufficient_permission");
                assert_eq!(tg.upstream.count(), 0, "{target}");
            }
            _ => {
                assert_rejection_line(&line, 401, "missing_token");
                assert_eq!(tg.upstream.count(), 0, "{target}");
            }
        }
    }
    tg.stop().await;
}

#[tokio::test]
async fn roles_expand_at_creation_and_editing_a_role_never_widens_old_tokens() {
    let tg = TestGateway::start_with(Options::rules(specific_rules())).await;
    tg.account("ci");
    let cfg = tg.config_path.clone();
    let deployer = cli_token(&cfg, "ci", "deployer", &["--role", "deployer"]).await;
    let viewer = cli_token(&cfg, "ci", "viewer", &["--role", "viewer"]).await;

    let r = get(tg.addr, "/_tokengate/v1/whoami", Some(&deployer), "").await;
    let me: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(me["role"], "deployer");
    let perms: Vec<&str> = me["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        perms.contains(&"apps:deploy") && perms.contains(&"apps:read"),
        "{perms:?}"
    );

    let post = |tok: &str| {
        format!(
            "POST /apps/x/deploy HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    assert_eq!(raw(tg.addr, post(&deployer)).await.status, 200);
    let r = raw(tg.addr, post(&viewer)).await;
    assert_forbidden(&r, Some("apps:deploy"));
    assert_rejection_line(
        &tg.last_request_line().await,
        403,
        "insufficient_permission",
    );
    assert_eq!(tg.upstream.count(), 1);

    // The operator widens `viewer` and reloads: the old viewer token keeps its stored list.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let widened = format!(
        "{text}\n[roles.viewer]\npermissions = [\"apps:read\", \"logs:read\", \"apps:deploy\"]\n"
    );
    std::fs::write(&cfg, widened).unwrap();
    tg.gw.set_config(Config::load(&cfg).unwrap());
    let r = raw(tg.addr, post(&viewer)).await;
    assert_forbidden(&r, Some("apps:deploy"));
    let new_viewer = cli_token(&cfg, "ci", "viewer-2", &["--role", "viewer"]).await;
    assert_eq!(raw(tg.addr, post(&new_viewer)).await.status, 200);
    assert_eq!(tg.upstream.count(), 2);
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Upgrades.

/// Rules for the WebSocket tests: `/ws`, the apps, and the admin paths.
fn ws_rules() -> String {
    [
        permission_rule(&["GET"], "/ws", "apps:read"),
        permission_rule(&["GET", "POST"], "/apps/{app}/**", "apps:read"),
        permission_rule(&[], "/admin/**", "admin:all"),
    ]
    .concat()
}

fn upgrade_request(
    method: &str,
    target: &str,
    tok: Option<&str>,
    upgrade: &str,
    connection: &str,
) -> String {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: gw.test\r\n");
    if let Some(t) = tok {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !upgrade.is_empty() {
        r.push_str(&format!("Upgrade: {upgrade}\r\n"));
    }
    r.push_str(&format!(
        "Connection: {connection}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ));
    if method == "POST" {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("\r\n");
    r
}

#[tokio::test]
async fn websocket_upgrade_is_refused_unless_the_route_allows_it() {
    let tg = TestGateway::start_with(Options::rules(ws_rules())).await;
    let (tok, _) = tg.token("ops", "ws", &["apps:read"]);
    let r = raw_expect(
        tg.addr,
        upgrade_request("GET", "/ws", Some(&tok), "websocket", "Upgrade, close"),
        400,
    )
    .await;
    assert!(r.header("www-authenticate").is_none());
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert_rejection_line(&tg.last_request_line().await, 400, "upgrade_refused");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn websocket_round_trip_works_where_allowed_and_h2c_never_passes() {
    let tg = TestGateway::start_with(Options {
        rules: ws_rules(),
        route: "websocket = true".into(),
        ..Options::default()
    })
    .await;
    let (tok, id) = tg.token("ops", "ws", &["apps:read"]);

    // Refusals first: h2c in any form, odd upgrade requests, no token, no permission.
    let refusals: Vec<(String, u16, &str)> = vec![
        (
            upgrade_request(
                "GET",
                "/ws",
                Some(&tok),
                "h2c",
                "Upgrade, HTTP2-Settings, close",
            ),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request("GET", "/ws", Some(&tok), "websocket, h2c", "Upgrade, close"),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request("GET", "/ws", Some(&tok), "h2c, websocket", "Upgrade, close"),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request("POST", "/apps/x/h2c", Some(&tok), "h2c", "Upgrade, close"),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request(
                "GET",
                "/apps/x/h2c",
                Some(&tok),
                "",
                "HTTP2-Settings, close",
            )
            .replace(
                "Sec-WebSocket-Version: 13\r\n",
                "Sec-WebSocket-Version: 13\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            ),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request(
                "POST",
                "/apps/x/ws",
                Some(&tok),
                "websocket",
                "Upgrade, close",
            ),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request("GET", "/ws", Some(&tok), "websocket", "close"),
            400,
            "upgrade_refused",
        ),
        (
            upgrade_request("GET", "/ws", None, "websocket", "Upgrade, close"),
            401,
            "missing_token",
        ),
        (
            upgrade_request(
                "GET",
                "/admin/ws",
                Some(&tok),
                "websocket",
                "Upgrade, close",
            ),
            403,
            "insufficient_permission",
        ),
    ];
    for (req, status, reason) in &refusals {
        let r = raw(tg.addr, &req).await;
        assert_eq!(r.status, *status, "{req}: {}", r.raw);
        assert_ne!(r.status, 101);
        assert_rejection_line(&tg.last_request_line().await, *status, reason);
    }
    assert_eq!(
        tg.upstream.count(),
        0,
        "no refused upgrade reached the upstream"
    );

    // The real thing: 101, then bytes both ways through the gateway.
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(upgrade_request("GET", "/ws", Some(&tok), "websocket", "Upgrade").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed during the handshake: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [
        &b"hello through tokengate"[..],
        &[0x81, 0x05, b'h', b'e', b'l', b'l', b'o'][..],
    ] {
        s.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, msg);
    }
    drop(s);
    let got = tg.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, "/ws");
    assert_eq!(got[0].headers["upgrade"], "websocket");
    assert_eq!(got[0].headers["x-tokengate-token-id"], id.as_str());
    assert!(got[0].headers.get("authorization").is_none());
    let line = tg.last_request_line().await;
    assert_eq!(line["status_code"], 101);
    assert_eq!(line["reason"], "ok");
    assert_eq!(line["rbac_decision"], "allow");
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Ambiguous rules.

/// Writes a config with `rules` into `dir` and runs `tokengate config check` on it.
fn config_check(
    dir: &std::path::Path,
    rules: String,
) -> (std::path::PathBuf, std::process::Output) {
    let path = write_config(dir, "127.0.0.1:9", &Options::rules(rules));
    let out = cli(&path, &["config", "check"]);
    (path, out)
}

#[test]
fn ambiguous_rules_are_refused_by_config_check_and_at_start_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    // `GET /apps/{app}` and then `second`.
    let after_get =
        |second: String| permission_rule(&["GET"], "/apps/{app}", "apps:read") + &second;
    let rules = after_get(permission_rule(
        &["POST", "GET"],
        "/apps/{name}",
        "apps:write",
    ));
    let (path, out) = config_check(dir.path(), rules);
    let err = assert_exit_code(&out, 64);
    assert!(err.contains("ambiguous"), "{err}");
    assert!(
        err.contains("GET /apps/{app}"),
        "names the first rule: {err}"
    );
    assert!(
        err.contains("POST,GET /apps/{name}"),
        "names the second rule: {err}"
    );
    // At start the same config is refused with the same explanation.
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("GET /apps/{app}") && e.contains("POST,GET /apps/{name}"),
        "{e}"
    );

    // A staged (shadow) replacement of the same shape is not ambiguous; disjoint methods are not either.
    for ok in [
        after_get(shadow(permission_rule(
            &["POST", "GET"],
            "/apps/{name}",
            "apps:write",
        ))),
        after_get(permission_rule(&["POST"], "/apps/{name}", "apps:write")),
    ] {
        let (_, out) = config_check(dir.path(), ok.clone());
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
