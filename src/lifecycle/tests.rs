//! Unit tests of the lifecycle rule, including the property: whatever a non-admin caller asks,
//! the token it gets is never stronger than itself.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn rate(rps: f64, burst: u32) -> RateOverride {
    RateOverride {
        requests_per_second: rps,
        burst,
    }
}

fn caller(perms: &[&str]) -> Caller {
    Caller {
        label: "tok_me".into(),
        admin: perms.iter().any(|p| *p == "*" || *p == PERM_ADMIN),
        account_id: "acc_1".into(),
        account: "a".into(),
        permissions: perms.iter().map(|s| s.to_string()).collect(),
        scopes: BTreeMap::new(),
        allowed_cidrs: vec![],
        expires_at: None,
        rate: rate(100.0, 200),
        default_rate: rate(100.0, 200),
    }
}

fn spec(perms: &[&str]) -> NewTokenSpec {
    NewTokenSpec {
        account: "a".into(),
        name: "x".into(),
        role: None,
        permissions: perms.iter().map(|s| s.to_string()).collect(),
        scopes: BTreeMap::new(),
        allowed_cidrs: vec![],
        rate: None,
        expires_at: None,
        created_by: "t".into(),
    }
}

const NEW: Explicit = Explicit {
    expiry: false,
    rate: false,
    existing: false,
};
const ASKED: Explicit = Explicit {
    expiry: true,
    rate: true,
    existing: false,
};

#[test]
fn self_tokens_never_mint_stronger_tokens() {
    let me = caller(&["tokengate:self", "apps:*"]);
    assert!(not_stronger(&me, &mut spec(&["apps:read", "apps:*"]), NEW).is_ok());
    for (bad, attr) in [
        (&["*"][..], "tokengate"),
        (&["tokengate:admin"], "tokengate"),
        (&["tokengate:*"], "tokengate"),
        (&["env:read"], "permissions"),
    ] {
        let r = not_stronger(&me, &mut spec(bad), NEW).unwrap_err();
        assert_eq!(r.attribute, attr, "{bad:?}");
        assert!(r.message.starts_with(attr), "{}", r.message);
    }
    // `apps:read` does not cover `apps:*`.
    let narrow = caller(&["tokengate:self", "apps:read"]);
    assert_eq!(
        not_stronger(&narrow, &mut spec(&["apps:*"]), NEW)
            .unwrap_err()
            .attribute,
        "permissions"
    );
    let mut me = caller(&["tokengate:self", "apps:read"]);
    me.scopes.insert("app".into(), vec!["web-*".into()]);
    me.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let mut s = spec(&["apps:read"]);
    not_stronger(&me, &mut s, NEW).unwrap();
    assert_eq!(s.scopes["app"], vec!["web-*"], "scopes are inherited");
    assert_eq!(s.allowed_cidrs, me.allowed_cidrs, "networks are inherited");
    let mut s = spec(&["apps:read"]);
    s.scopes.insert("app".into(), vec!["web-a".into()]);
    s.allowed_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
    assert!(not_stronger(&me, &mut s, NEW).is_ok(), "narrower is fine");
    let mut s = spec(&["apps:read"]);
    s.scopes.insert("app".into(), vec!["*".into()]);
    assert_eq!(
        not_stronger(&me, &mut s, NEW).unwrap_err().attribute,
        "scopes"
    );
    let mut s = spec(&["apps:read"]);
    s.allowed_cidrs = vec!["0.0.0.0/0".parse().unwrap()];
    assert_eq!(
        not_stronger(&me, &mut s, NEW).unwrap_err().attribute,
        "allowed_cidrs"
    );
    // An existing token without the caller's limits is wider, not "to be inherited".
    assert_eq!(
        not_stronger(&me, &mut spec(&["apps:read"]), Explicit::EXISTING)
            .unwrap_err()
            .attribute,
        "scopes"
    );
}

#[test]
fn expiry_and_rate_are_narrowed_when_unsaid_and_refused_when_asked() {
    let mut me = caller(&["tokengate:self", "apps:read"]);
    me.expires_at = Some(7 * 86_400_000);
    me.rate = rate(2.0, 4);
    let mut s = spec(&["tokengate:self"]);
    not_stronger(&me, &mut s, NEW).unwrap();
    assert_eq!(
        s.expires_at,
        Some(7 * 86_400_000),
        "never → the caller's expiry"
    );
    assert_eq!(
        s.rate,
        Some(rate(2.0, 4)),
        "the default rate → the caller's"
    );
    let mut s = spec(&["apps:read"]);
    s.expires_at = None;
    assert_eq!(
        not_stronger(&me, &mut s, ASKED).unwrap_err().attribute,
        "expiry"
    );
    let mut s = spec(&["apps:read"]);
    s.expires_at = Some(8 * 86_400_000);
    assert_eq!(
        not_stronger(&me, &mut s, ASKED).unwrap_err().attribute,
        "expiry"
    );
    let mut s = spec(&["apps:read"]);
    s.expires_at = Some(86_400_000);
    s.rate = Some(rate(100_000.0, 4));
    assert_eq!(
        not_stronger(&me, &mut s, ASKED).unwrap_err().attribute,
        "rate"
    );
    s.rate = Some(rate(1.0, 5));
    assert_eq!(
        not_stronger(&me, &mut s, ASKED).unwrap_err().attribute,
        "rate"
    );
    s.rate = Some(rate(1.0, 4));
    assert!(not_stronger(&me, &mut s, ASKED).is_ok());
}

#[test]
fn admins_may_exceed_themselves() {
    let admin = caller(&[PERM_ADMIN]);
    let mut s = spec(&["*"]);
    s.rate = Some(rate(1e6, 1_000_000));
    assert!(not_stronger(&admin, &mut s, ASKED).is_ok());
}

#[test]
fn parsers() {
    assert_eq!(
        parse_scope("app=billing, web-*").unwrap(),
        (
            "app".to_string(),
            vec!["billing".to_string(), "web-*".to_string()]
        )
    );
    assert!(parse_scope("nope").is_err());
    assert_eq!(parse_rate("5/10").unwrap(), rate(5.0, 10));
    for bad in ["5", "0/1", "1/0", "x/1", "inf/1"] {
        assert!(parse_rate(bad).is_err(), "{bad}");
    }
    assert!(valid_token_name("deploy key"));
    assert!(!valid_token_name(""));
    assert!(valid_account_name("ci@example"));
    assert!(!valid_account_name("a b"));
}

/// Is `t` no stronger than `c`, checked independently of `not_stronger`'s code path?
fn within(c: &Caller, t: &NewTokenSpec) -> Result<(), String> {
    for p in &t.permissions {
        if !authz::grants(&c.permissions, p) {
            return Err(format!("permission {p}"));
        }
    }
    for (k, mine) in &c.scopes {
        let Some(theirs) = t.scopes.get(k) else {
            return Err(format!("scope {k} unrestricted"));
        };
        for v in theirs {
            // Every value the child pattern matches must be matched by one of ours: with `*` as
            // the only wildcard it is enough that the pattern, read literally, matches ours.
            let m = BTreeMap::from([(k.clone(), mine.clone())]);
            if !authz::scopes_allow(&m, &[(k.as_str(), v.clone())]) {
                return Err(format!("scope {k}={v}"));
            }
        }
    }
    if !c.allowed_cidrs.is_empty()
        && (t.allowed_cidrs.is_empty()
            || t.allowed_cidrs
                .iter()
                .any(|n| !c.allowed_cidrs.iter().any(|m| m.contains(n))))
    {
        return Err("networks".into());
    }
    if let Some(e) = c.expires_at {
        if t.expires_at.is_none_or(|x| x > e) {
            return Err("expiry".into());
        }
    }
    let r = t.rate.unwrap_or(c.default_rate);
    if r.requests_per_second > c.rate.requests_per_second || r.burst > c.rate.burst {
        return Err("rate".into());
    }
    Ok(())
}

const PERMS: &[&str] = &[
    "*",
    "tokengate:admin",
    "tokengate:self",
    "tokengate:*",
    "apps:read",
    "apps:write",
    "apps:*",
    "env:read",
    "env:*",
    "logs:read",
];
const SCOPE_VALUES: &[&str] = &["billing", "web-*", "web-a", "*", "api", "b*"];
const NETS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "0.0.0.0/0",
    "192.168.1.0/24",
    "2001:db8::/32",
];

fn pick(all: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    proptest::sample::subsequence(all, 0..=all.len())
        .prop_map(|v| v.into_iter().map(str::to_string).collect())
}

prop_compose! {
    fn arb_caller()(
        mut perms in pick(PERMS),
        scopes in proptest::option::of(pick(SCOPE_VALUES)),
        nets in pick(NETS),
        exp in proptest::option::of(1i64..1_000),
        r in proptest::option::of((1u32..50, 1u32..50)),
    ) -> Caller {
        perms.retain(|p| p != "*" && p != PERM_ADMIN); // non-admins: admins may exceed themselves
        perms.push(PERM_SELF.into());
        let default_rate = rate(10.0, 20);
        Caller {
            label: "tok_me".into(),
            admin: false,
            account_id: "acc_1".into(),
            account: "a".into(),
            permissions: perms,
            scopes: scopes.map(|v| BTreeMap::from([("app".to_string(), v)])).unwrap_or_default(),
            allowed_cidrs: nets.iter().map(|n| n.parse().unwrap()).collect(),
            expires_at: exp,
            rate: r.map(|(a, b)| rate(a as f64, b)).unwrap_or(default_rate),
            default_rate,
        }
    }
}

prop_compose! {
    fn arb_spec()(
        perms in pick(PERMS),
        scopes in proptest::option::of(pick(SCOPE_VALUES)),
        nets in pick(NETS),
        exp in proptest::option::of(1i64..2_000),
        r in proptest::option::of((1u32..100, 1u32..100)),
    ) -> NewTokenSpec {
        NewTokenSpec {
            account: "a".into(),
            name: "x".into(),
            role: None,
            permissions: perms,
            scopes: scopes.map(|v| BTreeMap::from([("app".to_string(), v)])).unwrap_or_default(),
            allowed_cidrs: nets.iter().map(|n| n.parse().unwrap()).collect(),
            rate: r.map(|(a, b)| rate(a as f64, b)),
            expires_at: exp,
            created_by: "t".into(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// For random callers and random requests, whatever the rule lets through is never
    /// stronger than the caller, whether the request is new (narrowed) or an existing token.
    #[test]
    fn the_result_is_never_stronger_than_the_caller(
        c in arb_caller(),
        s in arb_spec(),
        expiry in any::<bool>(),
        rate_asked in any::<bool>(),
        existing in any::<bool>(),
    ) {
        let mut out = s.clone();
        let ex = Explicit { expiry, rate: rate_asked, existing };
        if not_stronger(&c, &mut out, ex).is_ok() {
            prop_assert_eq!(within(&c, &out), Ok(()), "{:?} → {:?}", s, out);
            prop_assert_eq!(&out.permissions, &s.permissions);
            if existing {
                prop_assert_eq!(format!("{out:?}"), format!("{s:?}"), "an existing token is never changed, only judged");
            }
        }
        // An identical copy of the caller is always allowed.
        let mut me = NewTokenSpec {
            permissions: c.permissions.clone(),
            scopes: c.scopes.clone(),
            allowed_cidrs: c.allowed_cidrs.clone(),
            rate: Some(c.rate),
            expires_at: c.expires_at,
            ..s
        };
        prop_assert!(not_stronger(&c, &mut me, Explicit::EXISTING).is_ok());
    }
}

fn config() -> Config {
    Config::from_toml(
        r#"
[tokens]
allowed_expiry = ["7d", "30d", "never"]
default_expiry = "30d"

[rate_limit]
requests_per_second = 10
burst = 20

[[routes]]
name = "api"
prefix = "/"
upstream = "http://127.0.0.1:1"

[[routes.rules]]
path = "/apps/**"
permission = "apps:read"
"#,
        std::path::Path::new("test.toml"),
    )
    .expect("test config")
}

fn request(perms: &[&str]) -> CreateRequest {
    CreateRequest {
        account: "a".into(),
        name: "deploy".into(),
        permissions: perms.iter().map(|s| s.to_string()).collect(),
        ..CreateRequest::default()
    }
}

fn invalid(r: Result<NewTokenSpec, LifecycleError>) -> String {
    match r {
        Err(LifecycleError::Invalid(m)) => m,
        other => panic!("not invalid: {other:?}"),
    }
}

#[test]
fn creation_requests_are_checked_against_policy() {
    let cfg = config();
    let now = 1_000;
    let s = build_spec(&cfg, &request(&["apps:read"]), "me", now).unwrap();
    assert_eq!(s.expires_at, Some(now + 30 * 86_400_000), "default expiry");
    assert_eq!((s.created_by.as_str(), s.rate), ("me", None));
    let mut r = request(&["env:read"]);
    r.role = Some("viewer".into());
    r.expires = Some("never".into());
    r.scopes = BTreeMap::from([("app".to_string(), vec!["web-*".to_string()])]);
    r.allowed_cidrs = vec!["10.0.0.0/8".into(), "192.0.2.1".into()];
    r.rate = Some("5/10".into());
    let s = build_spec(&cfg, &r, "me", now).unwrap();
    assert_eq!(s.role.as_deref(), Some("viewer"));
    assert_eq!(
        s.permissions,
        ["apps:read", "logs:read", "env:read"],
        "role expanded"
    );
    assert_eq!(s.expires_at, None);
    assert_eq!(s.allowed_cidrs[1].to_string(), "192.0.2.1/32");
    assert_eq!(s.rate, Some(rate(5.0, 10)));

    let with = |f: &dyn Fn(&mut CreateRequest)| {
        let mut r = request(&["apps:read"]);
        f(&mut r);
        invalid(build_spec(&cfg, &r, "me", now))
    };
    assert!(with(&|r| r.name = String::new()).contains("token names"));
    assert!(with(&|r| r.role = Some("nope".into())).contains("no role `nope`"));
    assert!(with(&|r| r.permissions = vec!["bad perm".into()]).contains("bad perm"));
    assert!(with(&|r| r.expires = Some("90d".into())).contains("not allowed by policy"));
    assert!(with(&|r| r.expires = Some("soon".into())).contains("not an expiry"));
    assert!(
        with(&|r| r.allowed_cidrs = vec!["10/8/8".into()])
            .contains("neither an IP address nor a CIDR")
    );
    assert!(with(&|r| r.rate = Some("fast".into())).contains("RPS/BURST"));
}

#[test]
fn check_create_applies_the_rule_but_lets_the_operator_exceed_itself() {
    let cfg = config();
    let op = Caller::operator("cli:root", &cfg);
    assert!(op.admin);
    let mut r = request(&["*"]);
    r.expires = Some("never".into());
    r.rate = Some("1000/1000".into());
    let s = check_create(&cfg, &op, &r, 0).unwrap();
    assert_eq!((s.expires_at, s.created_by.as_str()), (None, "cli:root"));
    // The operator is still bound by policy.
    r.expires = Some("365d".into());
    assert!(matches!(
        check_create(&cfg, &op, &r, 0),
        Err(LifecycleError::Invalid(_))
    ));

    let mut me = caller(&["tokengate:self", "apps:read"]);
    me.default_rate = rate(10.0, 20);
    me.rate = rate(10.0, 20);
    me.expires_at = Some(7 * 86_400_000);
    let s = check_create(&cfg, &me, &request(&["apps:read"]), 0).unwrap();
    assert_eq!(
        s.expires_at,
        Some(7 * 86_400_000),
        "30d default narrowed to 7d"
    );
    assert_eq!(s.rate, None, "the default rate is the caller's own");
    let mut r = request(&["apps:read"]);
    r.expires = Some("30d".into());
    assert!(matches!(
        check_create(&cfg, &me, &r, 0),
        Err(LifecycleError::Forbidden(Refusal {
            attribute: "expiry",
            ..
        }))
    ));
    let mut r = request(&["apps:read"]);
    r.account = "other".into();
    assert!(matches!(
        check_create(&cfg, &me, &r, 0),
        Err(LifecycleError::Forbidden(Refusal {
            attribute: "account",
            ..
        }))
    ));
}

#[test]
fn rotation_keeps_the_expiry_and_only_admins_give_a_new_one() {
    let cfg = config();
    let me = caller(&["tokengate:self", "apps:read"]);
    let old = TokenRow {
        account: "a".into(),
        prefix: "tg_12345678".into(),
        permissions: vec!["apps:read".into()],
        rate: Some(rate(1.0, 1)),
        expires_at: Some(5 * 86_400_000),
        ..TokenRow::test("tok_old", "acc_1")
    };
    let now = 4 * 86_400_000;
    let (grace, exp) = check_rotate(&cfg, &me, &old, &RotateRequest::default(), now).unwrap();
    assert_eq!((grace, exp), (cfg.tokens.rotation_grace, old.expires_at));
    let asked = RotateRequest {
        grace: Some("1h".into()),
        expires: Some("7d".into()),
    };
    assert!(matches!(
        check_rotate(&cfg, &me, &old, &asked, now),
        Err(LifecycleError::Forbidden(Refusal {
            attribute: "expiry",
            ..
        }))
    ));
    let admin = caller(&[PERM_ADMIN]);
    let (grace, exp) = check_rotate(&cfg, &admin, &old, &asked, now).unwrap();
    assert_eq!((grace.as_secs(), exp), (3600, Some(now + 7 * 86_400_000)));
    let mut strong = old.clone();
    strong.permissions = vec!["*".into()];
    assert!(matches!(
        check_rotate(&cfg, &me, &strong, &RotateRequest::default(), now),
        Err(LifecycleError::Forbidden(Refusal {
            attribute: "tokengate",
            ..
        }))
    ));
    assert!(may_revoke(&me, &old).is_ok());
    assert_eq!(may_revoke(&me, &strong).unwrap_err().attribute, "tokengate");
}
