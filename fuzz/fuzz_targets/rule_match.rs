//! Fuzzes rule templates and paths: `RuleTable::lookup` must agree with a naive matcher.
//!
//! Input: newline-separated lines. Every line but the last is a rule: its first byte picks the
//! methods (bits 0-2: GET, POST, PUT; none set means every method) and bit 3 marks it shadow; the
//! rest is the template. The last line's first byte picks the request method, the rest is the path.
#![no_main]

use std::cmp::Ordering;

use libfuzzer_sys::fuzz_target;
use tokengate::authz::{Rule, RuleMatch, RuleTable};

const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Rest,
    End,
    Param,
    Literal,
}

fn segments(path: &str) -> Option<Vec<&str>> {
    let body = path.strip_prefix('/')?;
    Some(if body.is_empty() { Vec::new() } else { body.split('/').collect() })
}

/// The template's segments as (kind, text), for a template `RuleTable::new` accepted.
fn parse(template: &str) -> Vec<(Kind, &str)> {
    let segs = segments(template).expect("accepted templates start with '/'");
    segs.into_iter()
        .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            _ if s == "**" => (Kind::Rest, ""),
            Some(name) => match name.strip_suffix("...") {
                Some(name) => (Kind::Rest, name),
                None => (Kind::Param, name),
            },
            None => (Kind::Literal, s),
        })
        .collect()
}

/// Captures when the template matches the path segments.
fn matches(template: &[(Kind, &str)], path: &[&str]) -> Option<Vec<(String, String)>> {
    let mut captures = Vec::new();
    for (i, &(kind, text)) in template.iter().enumerate() {
        match kind {
            Kind::Literal if path.get(i) == Some(&text) => {}
            Kind::Param if path.get(i).is_some_and(|s| !s.is_empty()) => {
                captures.push((text.to_owned(), path[i].to_owned()));
            }
            Kind::Rest => {
                if !text.is_empty() {
                    captures.push((text.to_owned(), path[i.min(path.len())..].join("/")));
                }
                return Some(captures);
            }
            _ => return None,
        }
    }
    (template.len() == path.len()).then_some(captures)
}

/// The template's kind at path position `p`: a rest covers every position from where it starts.
fn kind_at(template: &[(Kind, &str)], p: usize) -> Kind {
    match template.get(p) {
        Some(&(kind, _)) => kind,
        None if template.last().is_some_and(|&(k, _)| k == Kind::Rest) => Kind::Rest,
        None => Kind::End,
    }
}

fn simplify(m: Option<RuleMatch<'_>>) -> Option<(usize, Vec<(String, String)>)> {
    m.map(|m| (m.index, m.captures.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.split('\n').collect();
    let Some(request) = lines.pop() else {
        return;
    };
    if lines.len() > 16 {
        return;
    }
    let rules: Vec<Rule> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let flags = line.bytes().next().unwrap_or(0);
            Rule {
                methods: (0..3)
                    .filter(|b| flags & (1 << b) != 0)
                    .map(|b| METHODS[b].to_owned())
                    .collect(),
                path: line.get(1..).unwrap_or("").to_owned(),
                permission: Some(format!("rule:n{i}")),
                public: false,
                shadow: flags & 8 != 0,
            }
        })
        .collect();
    let method = METHODS[usize::from(request.bytes().next().unwrap_or(0) % 4)];
    let path = request.get(1..).unwrap_or("");

    let Ok(table) = RuleTable::new(rules.clone()) else {
        return;
    };
    let lookup = table.lookup(method, path);

    let templates: Vec<Vec<(Kind, &str)>> = rules.iter().map(|r| parse(&r.path)).collect();
    let path_segs = segments(path);
    let found: Vec<(usize, Vec<(String, String)>)> = match &path_segs {
        None => Vec::new(),
        Some(segs) => rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.methods.is_empty() || r.methods.iter().any(|m| m == method))
            .filter_map(|(i, _)| matches(&templates[i], segs).map(|c| (i, c)))
            .collect(),
    };
    let n = path_segs.map_or(0, |s| s.len());
    // Segment by segment from the left, then explicit methods over every method, then (only when
    // shadow rules compete) shadow over enforced.
    let rank = |a: usize, b: usize, shadow_wins_ties: bool| -> Ordering {
        let by_template = (0..=n)
            .map(|p| kind_at(&templates[a], p).cmp(&kind_at(&templates[b], p)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal);
        let explicit = |i: usize| !rules[i].methods.is_empty();
        let o = by_template.then(explicit(a).cmp(&explicit(b)));
        if shadow_wins_ties { o.then(rules[a].shadow.cmp(&rules[b].shadow)) } else { o }
    };
    let best = |shadow_too: bool| {
        let mut best: Option<&(usize, Vec<(String, String)>)> = None;
        for candidate in found.iter().filter(|c| shadow_too || !rules[c.0].shadow) {
            best = match best {
                None => Some(candidate),
                Some(b) => {
                    let o = rank(candidate.0, b.0, shadow_too);
                    assert_ne!(o, Ordering::Equal, "tie between rules {} and {}", candidate.0, b.0);
                    Some(if o.is_gt() { candidate } else { b })
                }
            };
        }
        best.cloned()
    };
    let want_enforced = best(false);
    let want_shadow = best(true).filter(|m| rules[m.0].shadow);
    assert_eq!(simplify(lookup.enforced), want_enforced, "enforced: {method} {path:?}");
    assert_eq!(simplify(lookup.shadow), want_shadow, "shadow: {method} {path:?}");
});
