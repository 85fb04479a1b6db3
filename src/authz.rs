//! Authorisation: rule templates, most-specific matching, permissions and scopes (SPEC §3).
//!
//! A [`RuleTable`] compiles every rule template of one route into a segment trie. A lookup walks
//! the trie once, depth first, trying children in specificity order (literal, then `{param}`,
//! then a rest), so the first rule it meets is the most specific one and the walk can stop there.
//! Each trie node is reached by at most one path prefix, so a lookup visits at most every node
//! once, whatever the number of rules, and allocates nothing unless a rule matches.
//!
//! Owns: [`RuleTable`], [`decide`], grants, scopes, the shadow verdict and [`match_path`] (the pure
//! path transform a route asks for). Must never import `config`, `gateway`, `pipeline`, `admin` or
//! `cli`: config builds rule tables from this module, not the other way round.

use std::collections::BTreeMap;
use std::fmt;

/// One configured rule, as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Methods this rule covers, upper-case; empty means every method.
    pub methods: Vec<String>,
    /// Segment template, e.g. "/apps/{app}/**".
    pub path: String,
    /// Required permission (`resource:action`); None only when `public`.
    pub permission: Option<String>,
    /// Public rules skip authentication.
    pub public: bool,
    /// Shadow rules are evaluated and logged, never enforced.
    pub shadow: bool,
}

/// Why a rule, permission or scope was refused; each variant names the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The path template is malformed.
    #[error("invalid rule path {path:?}: {why}")]
    BadTemplate {
        /// The template as written.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Two rules of the same kind (both shadow or both enforced) have the same template shape
    /// and overlapping methods, so neither is more specific.
    #[error(
        "ambiguous rules: `{first}` and `{second}` have the same path shape and overlapping \
         methods; give them disjoint methods or make one path more specific"
    )]
    Ambiguous {
        /// The earlier rule, as `METHODS PATH`.
        first: String,
        /// The later rule, as `METHODS PATH`.
        second: String,
    },
    /// A permission string is malformed.
    #[error("invalid permission {permission:?}: {why}")]
    BadPermission {
        /// The permission as written.
        permission: String,
        /// What is wrong with it.
        why: String,
    },
    /// A rule that is not public names no permission.
    #[error("rule for path {path:?} is not public and names no permission")]
    MissingPermission {
        /// The rule's template.
        path: String,
    },
    /// A rule lists a method that can never match a request.
    #[error("invalid method {method:?}: {why}")]
    BadMethod {
        /// The method as written.
        method: String,
        /// What is wrong with it.
        why: String,
    },
    /// A token scope key or pattern is malformed.
    #[error("invalid scope {key:?}: {why}")]
    BadScope {
        /// The scope key as written.
        key: String,
        /// What is wrong with the key or one of its patterns.
        why: String,
    },
}

/// One compiled template segment.
#[derive(Debug, Clone)]
enum Seg {
    /// Must equal the path segment exactly.
    Literal(Box<str>),
    /// Any one non-empty segment, captured under this name.
    Param(Box<str>),
    /// Zero or more remaining segments; captured (joined by '/') when named.
    Rest(Option<Box<str>>),
}

/// One trie node: the template prefix that leads here is shared by every rule below it.
#[derive(Debug, Default)]
struct Node {
    /// Literal children, sorted by text for binary search.
    literals: Vec<(Box<str>, u32)>,
    /// The `{param}` child, whatever the parameter is called.
    param: Option<u32>,
    /// Rules whose template ends exactly at this node.
    end: Terminal,
    /// Rules whose template ends with a rest at this node.
    rest: Terminal,
}

/// Rules sharing one template shape; all indices point into `RuleTable::rules`.
#[derive(Debug, Default)]
struct Terminal {
    /// Enforced rules, those with explicit methods first (they beat an all-methods rule).
    enforced: Vec<u32>,
    /// Shadow rules, ordered the same way.
    shadow: Vec<u32>,
}

/// A compiled, immutable rule table for one route.
#[derive(Debug)]
pub struct RuleTable {
    rules: Vec<Rule>,
    /// Compiled template of each rule, by rule index; used to extract captures.
    templates: Vec<Vec<Seg>>,
    /// The trie; node 0 is the root.
    nodes: Vec<Node>,
}

/// A rule that matched a request.
#[derive(Debug, Clone)]
pub struct RuleMatch<'a> {
    /// The matching rule.
    pub rule: &'a Rule,
    /// Index of the rule in the vector given to `RuleTable::new`.
    pub index: usize,
    /// Captured names and values, in template order. `{name...}` captures the rest joined with '/'; `**` captures nothing.
    pub captures: Vec<(&'a str, String)>,
}

/// Result of a lookup.
#[derive(Debug, Clone)]
pub struct Lookup<'a> {
    /// Most specific non-shadow rule matching (method, path), if any.
    pub enforced: Option<RuleMatch<'a>>,
    /// Most specific rule when shadow rules are considered too, only when that is a shadow rule
    /// (i.e. the shadow rule would change which rule applies). None otherwise.
    pub shadow: Option<RuleMatch<'a>>,
}

/// A rule found during the walk: its index, and the visit order of its terminal (lower is more
/// specific, because terminals are visited in specificity order).
#[derive(Debug, Clone, Copy)]
struct Found {
    rule: u32,
    rank: u32,
}

/// Walk state for one lookup; lives on the stack.
struct Search<'t> {
    table: &'t RuleTable,
    method: &'t str,
    rank: u32,
    enforced: Option<Found>,
    shadow: Option<Found>,
}

impl RuleTable {
    /// Compiles `rules`, refusing malformed templates, methods or permissions and ambiguous pairs.
    pub fn new(rules: Vec<Rule>) -> Result<RuleTable, RuleError> {
        let mut nodes = vec![Node::default()];
        let mut templates = Vec::with_capacity(rules.len());
        for (index, rule) in rules.iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| RuleError::BadTemplate {
                path: rule.path.clone(),
                why: "too many rules".to_owned(),
            })?;
            validate_methods(&rule.methods)?;
            if !rule.public {
                match &rule.permission {
                    Some(p) => validate_permission(p)?,
                    None => {
                        return Err(RuleError::MissingPermission {
                            path: rule.path.clone(),
                        });
                    }
                }
            }
            let template = parse_template(&rule.path)?;
            let terminal = insert(&mut nodes, &template).ok_or_else(|| RuleError::BadTemplate {
                path: rule.path.clone(),
                why: "too many rules".to_owned(),
            })?;
            let class = if rule.shadow {
                &mut terminal.shadow
            } else {
                &mut terminal.enforced
            };
            if let Some(&other) = class
                .iter()
                .find(|&&other| methods_overlap(&rules[other as usize].methods, &rule.methods))
            {
                return Err(RuleError::Ambiguous {
                    first: describe(&rules[other as usize]),
                    second: describe(rule),
                });
            }
            class.push(index);
            templates.push(template);
        }
        for node in &mut nodes {
            for class in [
                &mut node.end.enforced,
                &mut node.end.shadow,
                &mut node.rest.enforced,
                &mut node.rest.shadow,
            ] {
                // Stable: explicit-method rules first, then the (at most one) all-methods rule.
                class.sort_by_key(|&i| rules[i as usize].methods.is_empty());
            }
        }
        Ok(RuleTable {
            rules,
            templates,
            nodes,
        })
    }

    /// Finds the most specific rule for `(method, path)`; `path` must be canonical.
    pub fn lookup(&self, method: &str, path: &str) -> Lookup<'_> {
        let Some(after_root) = path.strip_prefix('/') else {
            return Lookup {
                enforced: None,
                shadow: None,
            };
        };
        // "/" has no segments; otherwise the text after the root is '/'-separated segments.
        let remaining = (!after_root.is_empty()).then_some(after_root);
        let mut search = Search {
            table: self,
            method,
            rank: 0,
            enforced: None,
            shadow: None,
        };
        search.visit(0, remaining);
        let shadow = match (search.shadow, search.enforced) {
            (Some(s), Some(e)) if s.rank == e.rank => {
                // Same template shape: an explicit-methods rule beats an all-methods one; on a
                // full tie the shadow rule wins, since it is a staged replacement of the other.
                let s_all = self.rules[s.rule as usize].methods.is_empty();
                let e_all = self.rules[e.rule as usize].methods.is_empty();
                (!s_all || e_all).then_some(s)
            }
            (Some(s), Some(e)) => (s.rank < e.rank).then_some(s),
            (shadow, _) => shadow,
        };
        Lookup {
            enforced: search.enforced.map(|f| self.matched(f.rule, path)),
            shadow: shadow.map(|f| self.matched(f.rule, path)),
        }
    }

    /// The rules as given to [`RuleTable::new`].
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Builds the match for a rule already known to match `path`, extracting its captures.
    fn matched(&self, rule: u32, path: &str) -> RuleMatch<'_> {
        let index = rule as usize;
        let mut captures = Vec::new();
        let mut remaining = path.strip_prefix('/').filter(|rest| !rest.is_empty());
        for seg in &self.templates[index] {
            match seg {
                Seg::Literal(_) | Seg::Param(_) => {
                    let (head, tail) = split_first(remaining);
                    if let Seg::Param(name) = seg {
                        captures.push((&**name, head.to_owned()));
                    }
                    remaining = tail;
                }
                Seg::Rest(name) => {
                    if let Some(name) = name {
                        captures.push((&**name, remaining.unwrap_or("").to_owned()));
                    }
                    break;
                }
            }
        }
        RuleMatch {
            rule: &self.rules[index],
            index,
            captures,
        }
    }
}

impl Search<'_> {
    /// Visits the subtree at `node` for the path segments in `remaining`, most specific first.
    /// Returns true once the enforced rule is found: nothing visited later can beat it.
    fn visit(&mut self, node: u32, remaining: Option<&str>) -> bool {
        let table = self.table;
        let n = &table.nodes[node as usize];
        match remaining {
            None => {
                if self.terminal(&n.end) {
                    return true;
                }
            }
            Some(remaining) => {
                let (seg, tail) = match remaining.split_once('/') {
                    Some((seg, tail)) => (seg, Some(tail)),
                    None => (remaining, None),
                };
                let literal = n.literals.binary_search_by(|(lit, _)| (**lit).cmp(seg));
                if literal.is_ok_and(|i| self.visit(n.literals[i].1, tail)) {
                    return true;
                }
                // A parameter never matches the empty segment of a trailing slash.
                let param = n.param.filter(|_| !seg.is_empty());
                if param.is_some_and(|child| self.visit(child, tail)) {
                    return true;
                }
            }
        }
        self.terminal(&n.rest)
    }

    /// Checks one terminal for rules covering the method; true when the enforced rule was found.
    fn terminal(&mut self, terminal: &Terminal) -> bool {
        if terminal.enforced.is_empty() && terminal.shadow.is_empty() {
            return false;
        }
        let rank = self.rank;
        self.rank += 1;
        if self.shadow.is_none() {
            self.shadow = self
                .first_covering(&terminal.shadow)
                .map(|rule| Found { rule, rank });
        }
        self.enforced = self
            .first_covering(&terminal.enforced)
            .map(|rule| Found { rule, rank });
        self.enforced.is_some()
    }

    fn first_covering(&self, candidates: &[u32]) -> Option<u32> {
        candidates.iter().copied().find(|&i| {
            let methods = &self.table.rules[i as usize].methods;
            methods.is_empty() || methods.iter().any(|m| m == self.method)
        })
    }
}

/// Splits off the first segment of `remaining` (None means no segments left).
fn split_first(remaining: Option<&str>) -> (&str, Option<&str>) {
    match remaining {
        None => ("", None),
        Some(r) => match r.split_once('/') {
            Some((head, tail)) => (head, Some(tail)),
            None => (r, None),
        },
    }
}

/// Adds a template's path through the trie and returns the terminal where it ends; None when
/// the trie would outgrow `u32` node ids.
fn insert<'n>(nodes: &'n mut Vec<Node>, template: &[Seg]) -> Option<&'n mut Terminal> {
    let mut at = 0usize;
    for seg in template {
        let next_id = u32::try_from(nodes.len()).ok()?;
        match seg {
            Seg::Literal(text) => {
                let literals = &mut nodes[at].literals;
                match literals.binary_search_by(|(lit, _)| lit.cmp(text)) {
                    Ok(i) => at = literals[i].1 as usize,
                    Err(i) => {
                        literals.insert(i, (text.clone(), next_id));
                        nodes.push(Node::default());
                        at = next_id as usize;
                    }
                }
            }
            Seg::Param(_) => match nodes[at].param {
                Some(child) => at = child as usize,
                None => {
                    nodes[at].param = Some(next_id);
                    nodes.push(Node::default());
                    at = next_id as usize;
                }
            },
            Seg::Rest(_) => return Some(&mut nodes[at].rest),
        }
    }
    Some(&mut nodes[at].end)
}

/// `GET,HEAD /apps/{app}`, or `ANY /apps/{app}` for an all-methods rule.
fn describe(rule: &Rule) -> String {
    struct Methods<'a>(&'a [String]);
    impl fmt::Display for Methods<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.0.is_empty() {
                f.write_str("ANY")
            } else {
                f.write_str(&self.0.join(","))
            }
        }
    }
    let shadow = if rule.shadow { " (shadow)" } else { "" };
    format!("{} {}{shadow}", Methods(&rule.methods), rule.path)
}

fn methods_overlap(a: &[String], b: &[String]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|m| b.contains(m))
}

/// Methods are compared exactly against the request's, so a lower-case one would never match.
fn validate_methods(methods: &[String]) -> Result<(), RuleError> {
    for method in methods {
        let why = if method.is_empty() {
            "empty method"
        } else if method.bytes().any(|b| b.is_ascii_lowercase()) {
            "methods are upper-case"
        } else if !method.bytes().all(is_tchar) {
            "not an HTTP method token"
        } else {
            continue;
        };
        return Err(RuleError::BadMethod {
            method: method.clone(),
            why: why.to_owned(),
        });
    }
    Ok(())
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a template into segments; see the module docs and SPEC §3 for the syntax.
fn parse_template(path: &str) -> Result<Vec<Seg>, RuleError> {
    let bad = |why: String| RuleError::BadTemplate {
        path: path.to_owned(),
        why,
    };
    let Some(body) = path.strip_prefix('/') else {
        return Err(bad("must start with '/'".to_owned()));
    };
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<&str> = body.split('/').collect();
    let mut segs = Vec::with_capacity(raw.len());
    let mut names: Vec<&str> = Vec::new();
    for (i, text) in raw.iter().copied().enumerate() {
        let last = i + 1 == raw.len();
        let seg = if text == "**" {
            Seg::Rest(None)
        } else if let Some(inner) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            let (name, rest) = match inner.strip_suffix("...") {
                Some(name) => (name, true),
                None => (inner, false),
            };
            if !is_capture_name(name) {
                return Err(bad(format!(
                    "parameter name {name:?} must match [a-z_][a-z0-9_]*"
                )));
            }
            if names.contains(&name) {
                return Err(bad(format!("parameter {{{name}}} is captured twice")));
            }
            names.push(name);
            if rest {
                Seg::Rest(Some(name.into()))
            } else {
                Seg::Param(name.into())
            }
        } else {
            validate_literal(text, last).map_err(bad)?;
            Seg::Literal(text.into())
        };
        if matches!(seg, Seg::Rest(_)) && !last {
            return Err(bad(format!("{text:?} may only be the last segment")));
        }
        segs.push(seg);
    }
    Ok(segs)
}

/// A literal must be written the way a canonical path spells it, or it could never match.
fn validate_literal(text: &str, last: bool) -> Result<(), String> {
    if text.is_empty() {
        return if last {
            Ok(()) // trailing slash: a significant final empty segment
        } else {
            Err("empty segment ('//')".to_owned())
        };
    }
    if text == "." || text == ".." {
        return Err(format!(
            "dot segment {text:?} never matches a canonical path"
        ));
    }
    if text.contains(['{', '}']) {
        return Err(format!(
            "segment {text:?}: a parameter must be a whole segment, like {{name}} or {{name...}}"
        ));
    }
    if text.contains('*') {
        return Err(format!(
            "segment {text:?}: '*' is only allowed as a whole '**' segment"
        ));
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or(&[]);
            if hex.len() != 2
                || !hex
                    .iter()
                    .all(|&h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return Err(format!(
                    "segment {text:?}: '%' must be followed by two upper-case hex digits"
                ));
            }
            i += 3;
            continue;
        }
        // unreserved / sub-delims except ';' / ':' / '@' (RFC 3986 pchar)
        let ok = b.is_ascii_alphanumeric() || b"-._~!$&'()+,=:@".contains(&b);
        if !ok {
            return Err(format!(
                "segment {text:?}: character {:?} is not allowed in a canonical path",
                char::from(b)
            ));
        }
        i += 1;
    }
    Ok(())
}

/// `[a-z_][a-z0-9_]*`: template capture names, which are also token scope keys.
fn is_capture_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// Does the granted permission list allow `required`? `*` grants everything; `res:*` grants every `res:` action; otherwise exact match.
pub fn grants(granted: &[String], required: &str) -> bool {
    granted.iter().any(|g| {
        if g == "*" || g == required {
            return true;
        }
        // `res:*` covers `res:<action>` (and `res:*` itself) for a non-empty resource and action.
        match g.strip_suffix('*') {
            Some(prefix) if prefix.len() > 1 && prefix.ends_with(':') => required
                .strip_prefix(prefix)
                .is_some_and(|action| !action.is_empty()),
            _ => false,
        }
    })
}

/// Do the token's scopes allow these captures? For every capture whose name is a key in `scopes`, the value must match one of that key's patterns (`*` is a glob wildcard matching any run of characters, e.g. "web-*"). Captures without a scope key are unrestricted. Empty scopes allow everything.
///
/// Values are compared in their canonical (still percent-encoded) form, case-sensitively; `*`
/// also matches '/', so `docs-*` allows a `{name...}` capture of `docs-1/a/b`. A key whose
/// pattern list is empty allows no value.
pub fn scopes_allow(scopes: &BTreeMap<String, Vec<String>>, captures: &[(&str, String)]) -> bool {
    if scopes.is_empty() {
        return true;
    }
    captures
        .iter()
        .all(|(name, value)| match scopes.get(*name) {
            None => true,
            Some(patterns) => patterns
                .iter()
                .any(|p| glob(p.as_bytes(), value.as_bytes())),
        })
}

/// Glob match where `*` matches any run (possibly empty) of bytes, '/' included.
/// Backtracks only to the last star, so at most `pattern.len() * value.len()` steps.
fn glob(pattern: &[u8], value: &[u8]) -> bool {
    let (mut p, mut v) = (0, 0);
    // Position after the last '*' seen, and how far into the value that star reaches.
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p + 1, v));
            p += 1;
        } else if p < pattern.len() && pattern[p] == value[v] {
            p += 1;
            v += 1;
        } else if let Some((after, reach)) = star {
            // Let the last star swallow one more byte and retry from there.
            star = Some((after, reach + 1));
            p = after;
            v = reach + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// The token as the decision sees it: what it is granted and the role it names.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'t> {
    /// The token's permission list (enforced).
    pub permissions: &'t [String],
    /// The token's scopes.
    pub scopes: &'t BTreeMap<String, Vec<String>>,
    /// The token's role, by name.
    pub role: Option<&'t str>,
}

/// Roles marked shadow, by name: the permission list the shadow verdict is evaluated with.
/// Implemented by the config's role table (authz never reads the config itself).
pub trait ShadowRoles {
    /// The permissions of `role` when that role is marked shadow; None otherwise.
    fn shadow_permissions(&self, role: &str) -> Option<&[String]>;
}

/// Why `decide` refused; `'r` borrows the required permission from the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied<'r> {
    /// No rule matches (method, path).
    NoRule,
    /// The token lacks the rule's permission (or there is no token for a non-public rule).
    InsufficientPermission(&'r str),
    /// The permission is granted but a capture is outside the token's scopes.
    OutOfScope(&'r str),
}

impl<'r> Denied<'r> {
    /// The audit `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::NoRule => "no_rule",
            Denied::InsufficientPermission(_) => "insufficient_permission",
            Denied::OutOfScope(_) => "out_of_scope",
        }
    }

    /// The permission the matched rule requires, when a rule matched.
    pub fn permission(&self) -> Option<&'r str> {
        match self {
            Denied::NoRule => None,
            Denied::InsufficientPermission(p) | Denied::OutOfScope(p) => Some(p),
        }
    }
}

/// The shadow evaluation: logged as `shadow_decision`, never enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shadow {
    /// The staged rule / shadow role would allow the request.
    WouldAllow,
    /// It would refuse it.
    WouldDeny,
}

impl Shadow {
    /// The audit `shadow_decision` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Shadow::WouldAllow => "would_allow",
            Shadow::WouldDeny => "would_deny",
        }
    }
}

/// The outcome of [`decide`]: the enforced verdict and, when a shadow rule or shadow role
/// applies, what it would have decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'r> {
    /// Enforced: allowed, or why not.
    pub verdict: Result<(), Denied<'r>>,
    /// Shadow verdict; None when no shadow rule wins and the token's role is not shadow.
    pub shadow: Option<Shadow>,
}

/// Step 6 (SPEC §3), pure: does the matched rule let this token through, and what would the
/// staged (shadow) rule or the token's shadow role decide? `subject` is None when no token was
/// presented (a public rule). The shadow evaluation uses the winning shadow rule (else the
/// enforced one) with the shadow role's permissions (else the token's own).
pub fn decide<'r>(
    lookup: Option<&Lookup<'r>>,
    subject: Option<Subject<'_>>,
    roles: &impl ShadowRoles,
) -> Decision<'r> {
    let enforced = lookup.and_then(|l| l.enforced.as_ref());
    let token_perms = subject.map(|s| s.permissions);
    let verdict = judge(enforced, subject, token_perms);
    let shadow_rule = lookup.and_then(|l| l.shadow.as_ref());
    let shadow_role = subject
        .and_then(|s| s.role)
        .and_then(|name| roles.shadow_permissions(name));
    let shadow = (shadow_rule.is_some() || shadow_role.is_some()).then(|| {
        match judge(
            shadow_rule.or(enforced),
            subject,
            shadow_role.or(token_perms),
        ) {
            Ok(()) => Shadow::WouldAllow,
            Err(_) => Shadow::WouldDeny,
        }
    });
    Decision { verdict, shadow }
}

/// One evaluation of a rule match against a permission list and the token's scopes.
fn judge<'r>(
    m: Option<&RuleMatch<'r>>,
    subject: Option<Subject<'_>>,
    perms: Option<&[String]>,
) -> Result<(), Denied<'r>> {
    let Some(m) = m else {
        return Err(Denied::NoRule);
    };
    if m.rule.public {
        return Ok(());
    }
    let perm = m.rule.permission.as_deref().unwrap_or("");
    let (Some(subject), Some(perms)) = (subject, perms) else {
        return Err(Denied::InsufficientPermission(perm));
    };
    if !grants(perms, perm) {
        return Err(Denied::InsufficientPermission(perm));
    }
    if !scopes_allow(subject.scopes, &m.captures) {
        return Err(Denied::OutOfScope(perm));
    }
    Ok(())
}

/// Validates a permission string: `resource:action` where each part is [a-z0-9][a-z0-9_.-]* ; or `resource:*`; or `*`.
pub fn validate_permission(p: &str) -> Result<(), RuleError> {
    if p == "*" {
        return Ok(());
    }
    let bad = |why: &str| RuleError::BadPermission {
        permission: p.to_owned(),
        why: why.to_owned(),
    };
    let Some((resource, action)) = p.split_once(':') else {
        return Err(bad("expected `resource:action`, `resource:*` or `*`"));
    };
    if !is_permission_part(resource) {
        return Err(bad("resource must match [a-z0-9][a-z0-9_.-]*"));
    }
    if action != "*" && !is_permission_part(action) {
        return Err(bad("action must be `*` or match [a-z0-9][a-z0-9_.-]*"));
    }
    Ok(())
}

fn is_permission_part(part: &str) -> bool {
    let mut bytes = part.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

/// Validates a scope pattern/key (keys are template capture names [a-z_][a-z0-9_]*; patterns are non-empty printable ASCII without '/').
///
/// An empty pattern list is refused: it would deny every value, which is better said by not
/// giving the token the permission at all.
pub fn validate_scope(key: &str, patterns: &[String]) -> Result<(), RuleError> {
    let bad = |why: String| RuleError::BadScope {
        key: key.to_owned(),
        why,
    };
    if !is_capture_name(key) {
        return Err(bad(
            "key must be a capture name matching [a-z_][a-z0-9_]*".to_owned()
        ));
    }
    if patterns.is_empty() {
        return Err(bad("lists no patterns".to_owned()));
    }
    for pattern in patterns {
        if pattern.is_empty() {
            return Err(bad("empty pattern".to_owned()));
        }
        if !pattern.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(bad(format!(
                "pattern {pattern:?} must be printable ASCII without spaces or '/'"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- matching like the backend

/// The path rules are matched against: lower-cased unless `case_sensitive`, one trailing `/`
/// removed when `ignore_trailing_slash`, so `/ADMIN/` is judged as `/admin` by a route whose
/// backend treats them alike. What is forwarded stays the canonical path.
pub fn match_path(
    path: &str,
    case_sensitive: bool,
    ignore_trailing_slash: bool,
) -> std::borrow::Cow<'_, str> {
    let mut p = std::borrow::Cow::Borrowed(path);
    if !case_sensitive && p.bytes().any(|b| b.is_ascii_uppercase()) {
        p = std::borrow::Cow::Owned(p.to_ascii_lowercase());
    }
    if ignore_trailing_slash && p.len() > 1 && p.ends_with('/') {
        p = match p {
            std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(&b[..b.len() - 1]),
            std::borrow::Cow::Owned(mut o) => {
                o.pop();
                std::borrow::Cow::Owned(o)
            }
        };
    }
    p
}

/// Lower-cases a rule template's literal text, leaving `{capture}` names as written.
pub fn lowercase_template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0u32;
    for c in path.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        out.push(if depth == 0 {
            c.to_ascii_lowercase()
        } else {
            c
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(methods: &[&str], path: &str, permission: &str) -> Rule {
        Rule {
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            path: path.to_owned(),
            permission: Some(permission.to_owned()),
            public: false,
            shadow: false,
        }
    }

    fn shadow(methods: &[&str], path: &str, permission: &str) -> Rule {
        Rule {
            shadow: true,
            ..rule(methods, path, permission)
        }
    }

    fn table(rules: Vec<Rule>) -> RuleTable {
        RuleTable::new(rules).expect("valid rules")
    }

    static NO_SCOPES: BTreeMap<String, Vec<String>> = BTreeMap::new();

    /// A subject holding `permissions`, with no scopes and no role.
    fn holding(permissions: &[String]) -> Subject<'_> {
        Subject {
            permissions,
            scopes: &NO_SCOPES,
            role: None,
        }
    }

    struct NoShadowRoles;
    impl ShadowRoles for NoShadowRoles {
        fn shadow_permissions(&self, _: &str) -> Option<&[String]> {
            None
        }
    }

    struct Staged(Vec<String>);
    impl ShadowRoles for Staged {
        fn shadow_permissions(&self, role: &str) -> Option<&[String]> {
            (role == "staged").then_some(self.0.as_slice())
        }
    }

    #[test]
    fn decide_names_the_reason_and_the_required_permission() {
        let t = table(vec![
            rule(&["GET"], "/apps/{app}/**", "apps:read"),
            Rule {
                permission: None,
                public: true,
                ..rule(&["GET"], "/health", "x:y")
            },
        ]);
        let perms = strings(&["apps:read"]);
        let who = holding(&perms);
        let l = t.lookup("GET", "/apps/web/x");
        assert_eq!(decide(Some(&l), Some(who), &NoShadowRoles).verdict, Ok(()));
        let other = strings(&["billing:read"]);
        let d = decide(Some(&l), Some(holding(&other)), &NoShadowRoles);
        assert_eq!(d.verdict, Err(Denied::InsufficientPermission("apps:read")));
        assert_eq!(d.verdict.unwrap_err().reason(), "insufficient_permission");
        assert_eq!(d.shadow, None, "no shadow rule, no shadow role");
        // No token at all on a non-public rule.
        assert_eq!(
            decide(Some(&l), None, &NoShadowRoles).verdict,
            Err(Denied::InsufficientPermission("apps:read"))
        );
        // Scopes: the permission is granted, the capture is not.
        let mut scopes = BTreeMap::new();
        scopes.insert("app".to_owned(), strings(&["api-*"]));
        let scoped = Subject {
            scopes: &scopes,
            ..who
        };
        let d = decide(Some(&l), Some(scoped), &NoShadowRoles);
        assert_eq!(d.verdict, Err(Denied::OutOfScope("apps:read")));
        assert_eq!(d.verdict.unwrap_err().permission(), Some("apps:read"));
        let l2 = t.lookup("GET", "/apps/api-1/x");
        assert_eq!(
            decide(Some(&l2), Some(scoped), &NoShadowRoles).verdict,
            Ok(())
        );
        // No rule, and no route at all.
        let l3 = t.lookup("POST", "/apps/web/x");
        let d = decide(Some(&l3), Some(who), &NoShadowRoles);
        assert_eq!(d.verdict, Err(Denied::NoRule));
        assert_eq!(d.verdict.unwrap_err().permission(), None);
        assert_eq!(
            decide(None, Some(who), &NoShadowRoles).verdict,
            Err(Denied::NoRule)
        );
        // A public rule needs no token.
        let l4 = t.lookup("GET", "/health");
        assert_eq!(decide(Some(&l4), None, &NoShadowRoles).verdict, Ok(()));
    }

    #[test]
    fn decide_evaluates_shadow_rules_and_shadow_roles_without_enforcing_them() {
        let t = table(vec![
            rule(&["GET"], "/apps/**", "apps:read"),
            shadow(&["GET"], "/apps/secret/**", "apps:admin"),
        ]);
        let perms = strings(&["apps:read"]);
        let who = holding(&perms);
        // The staged rule would refuse; the enforced one allows, and is what counts.
        let l = t.lookup("GET", "/apps/secret/a");
        let d = decide(Some(&l), Some(who), &NoShadowRoles);
        assert_eq!(d.verdict, Ok(()));
        assert_eq!(d.shadow, Some(Shadow::WouldDeny));
        assert_eq!(Shadow::WouldDeny.as_str(), "would_deny");
        // Outside the staged rule there is no shadow verdict.
        let l2 = t.lookup("GET", "/apps/public");
        assert_eq!(decide(Some(&l2), Some(who), &NoShadowRoles).shadow, None);
        // A shadow role is evaluated with its own list; the token's list is enforced.
        let roles = Staged(strings(&["apps:*"]));
        let staged = Subject {
            role: Some("staged"),
            permissions: &[],
            ..who
        };
        let d = decide(Some(&l2), Some(staged), &roles);
        assert_eq!(d.verdict, Err(Denied::InsufficientPermission("apps:read")));
        assert_eq!(d.shadow, Some(Shadow::WouldAllow));
        let plain = Subject {
            role: Some("other"),
            ..who
        };
        assert_eq!(decide(Some(&l2), Some(plain), &roles).shadow, None);
    }

    fn template_error(path: &str) -> String {
        match RuleTable::new(vec![rule(&[], path, "a:b")]) {
            Err(RuleError::BadTemplate { path: p, why }) => {
                assert_eq!(p, path);
                why
            }
            other => panic!("{path:?} should be a bad template, got {other:?}"),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// For each set of templates (rules for every method), which template wins a GET of each
    /// path (None: no rule matches).
    #[test]
    fn the_most_specific_template_wins() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, Option<&'a str>)]);
        let cases: &[Case] = &[
            // Most specific wins: literal, then parameter, then rest.
            (
                &["/**", "/apps/**", "/apps/{app}", "/apps/admin"],
                &[
                    ("/apps/admin", Some("/apps/admin")),
                    ("/apps/billing", Some("/apps/{app}")),
                    ("/apps/admin/x", Some("/apps/**")),
                    ("/apps/billing/", Some("/apps/**")),
                    ("/apps", Some("/apps/**")),
                    ("/apps/", Some("/apps/**")),
                    ("/other", Some("/**")),
                    ("/", Some("/**")),
                ],
            ),
            // The first difference from the left decides. Position 0: literal `a` beats `{a}`,
            // even though the other template is longer.
            (
                &["/{a}/x/y", "/a/{b}/**"],
                &[("/a/x/y", Some("/a/{b}/**")), ("/b/x/y", Some("/{a}/x/y"))],
            ),
            // An exact end beats an empty rest.
            (
                &["/apps/**", "/apps", "/", "/{rest...}"],
                &[
                    ("/apps", Some("/apps")),
                    ("/apps/x", Some("/apps/**")),
                    ("/", Some("/")),
                    ("/x", Some("/{rest...}")),
                ],
            ),
            // A parameter beats a rest, and needs a non-empty segment.
            (
                &["/apps/{app}/**", "/apps/**"],
                &[
                    ("/apps/billing", Some("/apps/{app}/**")),
                    ("/apps/billing/", Some("/apps/{app}/**")),
                    ("/apps/billing/x/y", Some("/apps/{app}/**")),
                    ("/apps/", Some("/apps/**")),
                    ("/apps", Some("/apps/**")),
                ],
            ),
            // A trailing slash is significant.
            (
                &["/apps/"],
                &[
                    ("/apps/", Some("/apps/")),
                    ("/apps", None),
                    ("/apps/x", None),
                ],
            ),
            (&["/apps"], &[("/apps", Some("/apps")), ("/apps/", None)]),
            (
                &["/apps/{app}/"],
                &[
                    ("/apps/x/", Some("/apps/{app}/")),
                    ("/apps/x", None),
                    ("/apps//", None),
                ],
            ),
            // Segment boundaries hold.
            (
                &["/apps", "/apps/**", "/x/{id}"],
                &[
                    ("/appsX", None),
                    ("/appsX/y", None),
                    ("/app", None),
                    ("/x/1/2", None),
                    ("/xy/1", None),
                ],
            ),
            // Literals are case-sensitive, and paths must be rooted.
            (&["/Apps"], &[("/Apps", Some("/Apps")), ("/apps", None)]),
            (&["/**"], &[("", None), ("apps", None)]),
            // Canonical literals are accepted.
            (
                &[
                    "/a:b@c!$&'()+,=~-._%20%2F",
                    "/_tokengate/v1/whoami",
                    "/{_x9}/{y_...}",
                ],
                &[
                    (
                        "/a:b@c!$&'()+,=~-._%20%2F",
                        Some("/a:b@c!$&'()+,=~-._%20%2F"),
                    ),
                    ("/_tokengate/v1/whoami", Some("/_tokengate/v1/whoami")),
                ],
            ),
        ];
        for &(templates, paths) in cases {
            let t = table(templates.iter().map(|p| rule(&[], p, "a:read")).collect());
            for &(path, want) in paths {
                let got = t.lookup("GET", path).enforced.map(|m| m.rule.path.as_str());
                assert_eq!(got, want, "{path:?} in {templates:?}");
            }
        }
    }

    #[test]
    fn captures_in_template_order() {
        let t = table(vec![
            rule(&[], "/apps/{app}/env/{key}", "env:read"),
            rule(&[], "/files/{owner}/{path...}", "files:read"),
            rule(&[], "/logs/{app}/**", "logs:read"),
        ]);
        let m = t
            .lookup("GET", "/apps/billing/env/DB_URL")
            .enforced
            .unwrap();
        assert_eq!(
            m.captures,
            vec![("app", "billing".to_owned()), ("key", "DB_URL".to_owned())]
        );
        let caps = |path: &str| t.lookup("GET", path).enforced.unwrap().captures;
        assert_eq!(
            caps("/files/ann/a/b/c"),
            vec![("owner", "ann".to_owned()), ("path", "a/b/c".to_owned())]
        );
        assert_eq!(
            caps("/files/ann"),
            vec![("owner", "ann".to_owned()), ("path", String::new())]
        );
        assert_eq!(caps("/files/ann/a/")[1], ("path", "a/".to_owned()));
        assert_eq!(caps("/logs/web/x/y"), vec![("app", "web".to_owned())]);
        assert_eq!(caps("/logs/web"), vec![("app", "web".to_owned())]);
    }

    #[test]
    fn match_reports_original_index_and_rules_keeps_order() {
        let rules = vec![
            rule(&[], "/b", "b:read"),
            rule(&[], "/a", "a:read"),
            rule(&[], "/c/{x}", "c:read"),
        ];
        let t = table(rules.clone());
        assert_eq!(t.rules(), &rules[..]);
        let m = t.lookup("GET", "/a").enforced.unwrap();
        assert_eq!(m.index, 1);
        assert_eq!(m.rule, &rules[1]);
        assert_eq!(t.lookup("GET", "/c/1").enforced.unwrap().index, 2);
    }

    #[test]
    fn methods_select_among_rules_of_one_shape() {
        let t = table(vec![
            rule(&["GET", "HEAD"], "/apps/{app}", "apps:read"),
            rule(&["POST"], "/apps/{name}", "apps:write"),
            rule(&[], "/apps/**", "apps:other"),
        ]);
        let perm = |method: &str| {
            t.lookup(method, "/apps/x")
                .enforced
                .and_then(|m| m.rule.permission.clone())
        };
        assert_eq!(perm("GET").as_deref(), Some("apps:read"));
        assert_eq!(perm("HEAD").as_deref(), Some("apps:read"));
        assert_eq!(perm("POST").as_deref(), Some("apps:write"));
        // No `/apps/{app}` rule covers DELETE, so the less specific rule applies.
        assert_eq!(perm("DELETE").as_deref(), Some("apps:other"));
        // Exact comparison: methods are upper-case by contract.
        assert_eq!(perm("get").as_deref(), Some("apps:other"));
        // The name of the capture comes from the rule that matched.
        let m = t.lookup("POST", "/apps/x").enforced.unwrap();
        assert_eq!(m.captures, vec![("name", "x".to_owned())]);
    }

    #[test]
    fn no_match_is_none() {
        let t = table(vec![rule(&["GET"], "/apps/{app}", "apps:read")]);
        let l = t.lookup("POST", "/apps/x");
        assert!(l.enforced.is_none() && l.shadow.is_none());
        let l = t.lookup("GET", "/nope");
        assert!(l.enforced.is_none() && l.shadow.is_none());
        let empty = table(Vec::new());
        assert!(empty.lookup("GET", "/").enforced.is_none());
    }

    #[test]
    fn same_shape_overlapping_methods_is_ambiguous_and_names_both() {
        let err = RuleTable::new(vec![
            rule(&["GET", "HEAD"], "/apps/{app}", "apps:read"),
            rule(&["PUT"], "/apps/{app}/x", "apps:write"),
            rule(&["POST", "HEAD"], "/apps/{name}", "apps:write"),
        ])
        .expect_err("ambiguous");
        assert_eq!(
            err,
            RuleError::Ambiguous {
                first: "GET,HEAD /apps/{app}".to_owned(),
                second: "POST,HEAD /apps/{name}".to_owned(),
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("GET,HEAD /apps/{app}") && msg.contains("POST,HEAD /apps/{name}"));

        // Empty methods means every method, so it overlaps any other list.
        let err = RuleTable::new(vec![
            rule(&["GET"], "/a/**", "a:read"),
            rule(&[], "/a/{rest...}", "a:write"),
        ])
        .expect_err("ambiguous");
        assert!(matches!(err, RuleError::Ambiguous { ref first, ref second }
            if first == "GET /a/**" && second == "ANY /a/{rest...}"));
        assert!(matches!(
            RuleTable::new(vec![
                rule(&[], "/a/", "a:read"),
                rule(&[], "/a/", "a:write")
            ]),
            Err(RuleError::Ambiguous { .. })
        ));
    }

    #[test]
    fn different_shapes_or_disjoint_methods_are_not_ambiguous() {
        table(vec![
            rule(&["GET"], "/apps/{app}", "apps:read"),
            rule(&["POST"], "/apps/{app}", "apps:write"),
            rule(&[], "/apps/admin", "apps:admin"),
            rule(&[], "/apps/{app}/", "apps:read"),
            rule(&[], "/apps/{app}/**", "apps:read"),
            rule(&[], "/apps", "apps:list"),
            rule(&[], "/apps/**", "apps:list"),
            rule(&[], "/{x}/{app}", "x:read"),
        ]);
    }

    #[test]
    fn shadow_rule_staging_a_change_of_the_same_shape() {
        let t = table(vec![
            rule(&["GET"], "/apps/{app}", "apps:read"),
            shadow(&["GET"], "/apps/{name}", "apps:admin"),
        ]);
        let l = t.lookup("GET", "/apps/billing");
        let enforced = l.enforced.unwrap();
        let shadow = l.shadow.unwrap();
        assert_eq!(enforced.index, 0);
        assert_eq!(shadow.index, 1);
        assert_eq!(shadow.captures, vec![("name", "billing".to_owned())]);
        let l = t.lookup("POST", "/apps/billing");
        assert!(l.enforced.is_none() && l.shadow.is_none());
    }

    #[test]
    fn shadow_rule_reported_only_when_it_would_change_the_rule() {
        let t = table(vec![
            rule(&[], "/apps/{app}", "apps:read"),
            shadow(&[], "/apps/admin", "apps:admin"),
            shadow(&[], "/apps/**", "apps:list"),
        ]);
        // More specific shadow rule: reported.
        let l = t.lookup("GET", "/apps/admin");
        assert_eq!(l.enforced.unwrap().index, 0);
        assert_eq!(l.shadow.unwrap().index, 1);
        // Less specific shadow rule: not reported, the enforced rule would still apply.
        let l = t.lookup("GET", "/apps/billing");
        assert_eq!(l.enforced.unwrap().index, 0);
        assert!(l.shadow.is_none());
        // No enforced rule: the shadow rule would change the outcome.
        let l = t.lookup("GET", "/apps/billing/x");
        assert!(l.enforced.is_none());
        assert_eq!(l.shadow.unwrap().index, 2);
    }

    #[test]
    fn shadow_ties_follow_method_specificity() {
        let t = table(vec![
            rule(&["GET"], "/x/{id}", "x:read"),
            shadow(&[], "/x/{id}", "x:admin"),
        ]);
        // Explicit GET beats the all-methods shadow rule.
        let l = t.lookup("GET", "/x/1");
        assert_eq!(l.enforced.unwrap().index, 0);
        assert!(l.shadow.is_none());
        let l = t.lookup("DELETE", "/x/1");
        assert!(l.enforced.is_none());
        assert_eq!(l.shadow.unwrap().index, 1);

        let t = table(vec![
            rule(&[], "/x/{id}", "x:read"),
            shadow(&["GET"], "/x/{id}", "x:admin"),
        ]);
        assert_eq!(t.lookup("GET", "/x/1").shadow.unwrap().index, 1);
        let l = t.lookup("PUT", "/x/1");
        assert_eq!(l.enforced.unwrap().index, 0);
        assert!(l.shadow.is_none());
    }

    #[test]
    fn shadow_rules_are_checked_among_themselves() {
        let err = RuleTable::new(vec![
            rule(&["GET"], "/a", "a:read"),
            shadow(&["GET"], "/a", "a:write"),
            shadow(&["GET", "PUT"], "/a", "a:admin"),
        ])
        .expect_err("ambiguous shadows");
        assert_eq!(
            err,
            RuleError::Ambiguous {
                first: "GET /a (shadow)".to_owned(),
                second: "GET,PUT /a (shadow)".to_owned(),
            }
        );
    }

    #[test]
    fn shadow_rule_may_make_a_path_public() {
        let t = table(vec![
            rule(&[], "/health", "health:read"),
            Rule {
                public: true,
                permission: None,
                ..shadow(&[], "/health", "")
            },
        ]);
        let l = t.lookup("GET", "/health");
        assert!(!l.enforced.unwrap().rule.public);
        assert!(l.shadow.unwrap().rule.public);
    }

    #[test]
    fn permissions_are_required_unless_public() {
        let missing = Rule {
            permission: None,
            ..rule(&[], "/a", "")
        };
        assert_eq!(
            RuleTable::new(vec![missing.clone()]).err(),
            Some(RuleError::MissingPermission {
                path: "/a".to_owned()
            })
        );
        table(vec![Rule {
            public: true,
            ..missing.clone()
        }]);
        // A public rule's permission is ignored, even a malformed one.
        table(vec![Rule {
            public: true,
            ..rule(&[], "/a", "Not A Permission")
        }]);
        assert!(matches!(
            RuleTable::new(vec![rule(&[], "/a", "apps")]),
            Err(RuleError::BadPermission { .. })
        ));
    }

    #[test]
    fn methods_must_be_upper_case_tokens() {
        for bad in ["get", "", "GE T", "Get"] {
            assert!(
                matches!(
                    RuleTable::new(vec![rule(&[bad], "/a", "a:read")]),
                    Err(RuleError::BadMethod { ref method, .. }) if method == bad
                ),
                "{bad:?}"
            );
        }
        table(vec![rule(&["GET", "M-SEARCH", "PROPFIND"], "/a", "a:read")]);
    }

    #[test]
    fn template_syntax_errors() {
        assert!(template_error("apps").contains("start with '/'"));
        assert!(template_error("").contains("start with '/'"));
        assert!(template_error("//").contains("empty segment"));
        assert!(template_error("/a//b").contains("empty segment"));
        assert!(template_error("/a{b}").contains("whole segment"));
        assert!(template_error("/{b}a").contains("whole segment"));
        assert!(template_error("/{a}/{a}").contains("twice"));
        assert!(template_error("/{a}/{a...}").contains("twice"));
        assert!(template_error("/**/x").contains("last segment"));
        assert!(template_error("/**/").contains("last segment"));
        assert!(template_error("/{r...}/x").contains("last segment"));
        assert!(template_error("/{}").contains("parameter name"));
        assert!(template_error("/{...}").contains("parameter name"));
        assert!(template_error("/{App}").contains("parameter name"));
        assert!(template_error("/{1a}").contains("parameter name"));
        assert!(template_error("/a*").contains("'*'"));
        assert!(template_error("/*").contains("'*'"));
        assert!(template_error("/***").contains("'*'"));
        assert!(template_error("/.").contains("dot segment"));
        assert!(template_error("/a/../b").contains("dot segment"));
        for bad in [
            "/a;b", "/a b", "/a%2f", "/a%zz", "/a%2", "/a%", "/a?b", "/a#b", "/a\\b", "/é",
        ] {
            template_error(bad);
        }
    }

    #[test]
    fn many_rules_index_correctly() {
        let mut rules = Vec::new();
        for i in 0..500 {
            rules.push(rule(&["GET"], &format!("/svc{i}/{{id}}"), "svc:read"));
            rules.push(rule(&[], &format!("/svc{i}/{{id}}/items/**"), "svc:list"));
        }
        rules.push(rule(&[], "/**", "fallback:read"));
        let t = table(rules);
        let m = t.lookup("GET", "/svc377/abc").enforced.unwrap();
        assert_eq!(m.index, 754);
        assert_eq!(m.captures, vec![("id", "abc".to_owned())]);
        assert_eq!(
            t.lookup("GET", "/svc377/abc/items/1")
                .enforced
                .unwrap()
                .index,
            755
        );
        assert_eq!(
            t.lookup("POST", "/svc377/abc").enforced.unwrap().index,
            1000
        );
        assert_eq!(
            t.lookup("GET", "/svc9999/abc").enforced.unwrap().index,
            1000
        );
    }

    #[test]
    fn grants_with_wildcards() {
        let g = strings(&["apps:*", "env:read"]);
        assert!(grants(&g, "apps:read"));
        assert!(grants(&g, "apps:deploy"));
        assert!(grants(&g, "apps:*"));
        assert!(!grants(&g, "appsx:read"));
        assert!(!grants(&g, "app:read"));
        assert!(!grants(&g, "apps:"));
        assert!(grants(&g, "env:read"));
        assert!(!grants(&g, "env:write"));
        assert!(!grants(&g, "*"));
        assert!(grants(&strings(&["*"]), "anything:at-all"));
        assert!(grants(&strings(&["*"]), "*"));
        assert!(!grants(&strings(&["apps:read"]), "apps:write"));
        assert!(!grants(&strings(&["apps:read"]), "apps:*"));
        assert!(!grants(&strings(&["Apps:read"]), "apps:read"));
        assert!(!grants(&[], "apps:read"));
        // A malformed grant never widens.
        assert!(!grants(&strings(&[":*"]), ":x"));
        assert!(!grants(&strings(&["apps*"]), "apps:read"));
    }

    #[test]
    fn permission_syntax() {
        for ok in [
            "*",
            "apps:*",
            "apps:read",
            "tokengate:admin",
            "a0:b_c.d-e",
            "9:9",
        ] {
            assert_eq!(validate_permission(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "apps",
            "apps:",
            ":read",
            "Apps:read",
            "apps:Read",
            "apps:read:x",
            "*:read",
            "apps:re*",
            "_a:b",
            "a:-b",
            "apps :read",
            "**",
        ] {
            assert!(
                matches!(validate_permission(bad), Err(RuleError::BadPermission { ref permission, .. }) if permission == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn scopes_with_globs() {
        let scopes = BTreeMap::from([("app".to_owned(), strings(&["billing", "web-*"]))]);
        let allow = |app: &str| scopes_allow(&scopes, &[("app", app.to_owned())]);
        assert!(allow("billing"));
        assert!(allow("web-1"));
        assert!(allow("web-"));
        assert!(!allow("xweb-1"));
        assert!(!allow("billing2"));
        assert!(!allow("Billing"));
        assert!(!allow("web"));
        // Captures without a scope key are unrestricted.
        assert!(scopes_allow(&scopes, &[("env", "prod".to_owned())]));
        assert!(!scopes_allow(
            &scopes,
            &[("env", "prod".to_owned()), ("app", "xweb".to_owned())]
        ));
        // Empty scopes allow everything; no captures are allowed by any scopes.
        assert!(scopes_allow(&BTreeMap::new(), &[("app", "x".to_owned())]));
        assert!(scopes_allow(&scopes, &[]));
        // A key with no patterns allows no value.
        let none = BTreeMap::from([("app".to_owned(), Vec::new())]);
        assert!(!scopes_allow(&none, &[("app", "x".to_owned())]));
    }

    #[test]
    fn glob_patterns() {
        let g = |p: &str, v: &str| glob(p.as_bytes(), v.as_bytes());
        assert!(g("*", ""));
        assert!(g("*", "anything/at/all"));
        assert!(g("a*b*c", "aXXbYYc"));
        assert!(g("a*b*c", "abc"));
        assert!(g("*-prod", "eu-west-prod"));
        assert!(!g("*-prod", "eu-west-prod2"));
        assert!(g("a**b", "ab"));
        assert!(g("*a*a*a*b", "aaaaaaaaaaaaaaaab"));
        assert!(!g("*a*a*a*b", "aaaaaaaaaaaaaaaaa"));
        assert!(!g("", "a"));
        assert!(g("", ""));
        assert!(g("docs-*", "docs-1/a/b"));
    }

    #[test]
    fn scope_syntax() {
        assert_eq!(
            validate_scope("app", &strings(&["billing", "web-*", "*"])),
            Ok(())
        );
        assert_eq!(validate_scope("_x1", &strings(&["a%20b"])), Ok(()));
        for (key, patterns) in [
            ("App", vec!["x"]),
            ("", vec!["x"]),
            ("1a", vec!["x"]),
            ("a-b", vec!["x"]),
            ("app", vec![]),
            ("app", vec![""]),
            ("app", vec!["a/b"]),
            ("app", vec!["a b"]),
            ("app", vec!["é"]),
            ("app", vec!["ok", "tab\t"]),
        ] {
            assert!(
                matches!(validate_scope(key, &strings(&patterns)), Err(RuleError::BadScope { key: ref k, .. }) if k == key),
                "{key:?} {patterns:?}"
            );
        }
    }

    mod differential {
        //! `lookup` against a matcher that tries every rule and ranks by the spec's words.
        use super::super::*;
        use proptest::prelude::*;
        use std::cmp::Ordering;

        #[derive(Debug, Clone, PartialEq)]
        enum T {
            Lit(&'static str),
            Param,
            Rest,
            NamedRest,
        }

        #[derive(Debug, Clone)]
        struct Gen {
            methods: Vec<&'static str>,
            segs: Vec<T>,
            shadow: bool,
        }

        fn render(segs: &[T]) -> String {
            if segs.is_empty() {
                return "/".to_owned();
            }
            let mut out = String::new();
            for (i, s) in segs.iter().enumerate() {
                out.push('/');
                match s {
                    T::Lit(l) => out.push_str(l),
                    T::Param => out.push_str(&format!("{{p{i}}}")),
                    T::Rest => out.push_str("**"),
                    T::NamedRest => out.push_str("{r...}"),
                }
            }
            out
        }

        fn gen_rule() -> impl Strategy<Value = Gen> {
            let fixed = prop_oneof![
                Just(T::Lit("a")),
                Just(T::Lit("b")),
                Just(T::Lit("c")),
                Just(T::Param),
            ];
            let tail = prop_oneof![
                Just(None),
                Just(Some(T::Lit(""))),
                Just(Some(T::Rest)),
                Just(Some(T::NamedRest)),
            ];
            let methods = proptest::sample::subsequence(vec!["GET", "POST", "PUT"], 0..=2);
            (
                proptest::collection::vec(fixed, 0..4),
                tail,
                methods,
                proptest::bool::weighted(0.3),
            )
                .prop_map(|(mut segs, tail, methods, shadow)| {
                    // A lone trailing slash on "/" would be "//": skip it.
                    match tail {
                        Some(T::Lit("")) if segs.is_empty() => {}
                        Some(t) => segs.push(t),
                        None => {}
                    }
                    Gen {
                        methods,
                        segs,
                        shadow,
                    }
                })
        }

        fn gen_path() -> impl Strategy<Value = String> {
            (
                proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 0..5),
                any::<bool>(),
            )
                .prop_map(|(segs, slash)| {
                    let mut p: String = segs.iter().map(|s| format!("/{s}")).collect();
                    if p.is_empty() || slash {
                        p.push('/');
                    }
                    p
                })
        }

        /// Kinds in the order the spec ranks them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        enum Kind {
            Rest,
            End,
            Param,
            Literal,
        }

        /// Captures if the template matches the path segments.
        fn reference_match(segs: &[T], path: &[&str]) -> Option<Vec<(String, String)>> {
            let mut caps = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                match s {
                    T::Lit(l) => {
                        if path.get(i) != Some(l) {
                            return None;
                        }
                    }
                    T::Param => {
                        let seg = path.get(i).filter(|s| !s.is_empty())?;
                        caps.push((format!("p{i}"), (*seg).to_owned()));
                    }
                    T::Rest => return Some(caps),
                    T::NamedRest => {
                        caps.push(("r".to_owned(), path[i.min(path.len())..].join("/")));
                        return Some(caps);
                    }
                }
            }
            (segs.len() == path.len()).then_some(caps)
        }

        /// Kind of the template at path position `p` (0..=n), for a template that matches.
        fn kind_at(segs: &[T], p: usize) -> Kind {
            match segs.get(p) {
                Some(T::Lit(_)) => Kind::Literal,
                Some(T::Param) => Kind::Param,
                Some(T::Rest | T::NamedRest) => Kind::Rest,
                None if matches!(segs.last(), Some(T::Rest | T::NamedRest)) => Kind::Rest,
                None => Kind::End,
            }
        }

        /// Segment by segment from the left; the first difference decides; then explicit
        /// methods beat all methods.
        fn compare(a: &Gen, b: &Gen, n: usize) -> Ordering {
            (0..=n)
                .map(|p| kind_at(&a.segs, p).cmp(&kind_at(&b.segs, p)))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
                .then((!a.methods.is_empty()).cmp(&!b.methods.is_empty()))
        }

        fn shape(g: &Gen) -> Vec<T> {
            g.segs
                .iter()
                .map(|s| match s {
                    T::NamedRest => T::Rest,
                    other => other.clone(),
                })
                .collect()
        }

        fn overlap(a: &Gen, b: &Gen) -> bool {
            a.methods.is_empty()
                || b.methods.is_empty()
                || a.methods.iter().any(|m| b.methods.contains(m))
        }

        fn to_rule(g: &Gen, i: usize) -> Rule {
            Rule {
                methods: g.methods.iter().map(|m| (*m).to_owned()).collect(),
                path: render(&g.segs),
                permission: Some(format!("r:p{i}")),
                public: false,
                shadow: g.shadow,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn lookup_agrees_with_reference(
                gens in proptest::collection::vec(gen_rule(), 0..14),
                paths in proptest::collection::vec(gen_path(), 1..8),
                method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")],
            ) {
                let rules: Vec<Rule> = gens.iter().enumerate().map(|(i, g)| to_rule(g, i)).collect();
                let ambiguous = (0..gens.len()).any(|j| (0..j).any(|i| {
                    gens[i].shadow == gens[j].shadow
                        && shape(&gens[i]) == shape(&gens[j])
                        && overlap(&gens[i], &gens[j])
                }));
                let table = match RuleTable::new(rules) {
                    Ok(t) => t,
                    Err(e) => {
                        prop_assert!(ambiguous, "unexpected error {e}");
                        prop_assert!(matches!(e, RuleError::Ambiguous { .. }), "{e}");
                        return Ok(());
                    }
                };
                prop_assert!(!ambiguous, "ambiguous set accepted");
                for path in &paths {
                    let segs: Vec<&str> = if path == "/" {
                        Vec::new()
                    } else {
                        path[1..].split('/').collect()
                    };
                    let n = segs.len();
                    let matches: Vec<(usize, Vec<(String, String)>)> = gens
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| g.methods.is_empty() || g.methods.contains(&method))
                        .filter_map(|(i, g)| reference_match(&g.segs, &segs).map(|c| (i, c)))
                        .collect();
                    let best = |candidates: Vec<&(usize, Vec<(String, String)>)>, shadow_tiebreak: bool| {
                        let mut best: Option<&(usize, Vec<(String, String)>)> = None;
                        for c in candidates {
                            best = match best {
                                None => Some(c),
                                Some(b) => {
                                    let mut o = compare(&gens[c.0], &gens[b.0], n);
                                    if shadow_tiebreak {
                                        o = o.then(gens[c.0].shadow.cmp(&gens[b.0].shadow));
                                    }
                                    assert_ne!(o, Ordering::Equal, "tie between {} and {}", c.0, b.0);
                                    Some(if o.is_gt() { c } else { b })
                                }
                            };
                        }
                        best.cloned()
                    };
                    let want_enforced = best(matches.iter().filter(|m| !gens[m.0].shadow).collect(), false);
                    let want_overall = best(matches.iter().collect(), true);
                    let want_shadow = want_overall.filter(|m| gens[m.0].shadow);

                    let got = table.lookup(method, path);
                    let simplify = |m: Option<RuleMatch<'_>>| m.map(|m| {
                        (m.index, m.captures.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Vec<_>>())
                    });
                    prop_assert_eq!(simplify(got.enforced), want_enforced, "enforced for {} {}", method, path);
                    prop_assert_eq!(simplify(got.shadow), want_shadow, "shadow for {} {}", method, path);
                }
            }
        }
    }

    #[test]
    fn templates_lower_case_their_literals_only() {
        assert_eq!(
            lowercase_template("/X/Admin/{AppName}/{Rest...}"),
            "/x/admin/{AppName}/{Rest...}"
        );
        assert_eq!(lowercase_template("/A/**"), "/a/**");
    }
}
