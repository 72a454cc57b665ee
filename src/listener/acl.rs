//! Per-agent topic ACLs: which topics an agent may publish to and which filters it may
//! subscribe to, from `acl` rules with `${clientId}`, `${identity}` and `${thingName}`.
//!
//! Guarantees:
//! - A PUBLISH topic is allowed when an `allow` rule's filter matches it and no `deny` rule's
//!   filter does.
//! - A SUBSCRIBE filter is allowed when every topic it could match is matched by one `allow`
//!   filter (it is a subset) and no topic it could match is matched by a `deny` filter: a
//!   subscription can never deliver what a publish-side check would refuse.
//! - A variable is replaced by its value only when the value is one plain topic level (no `/`,
//!   `+`, `#` or NUL, not empty); otherwise the rule matches nothing, so an identity such as
//!   `#` cannot widen a rule.

use std::borrow::Cow;

use crate::config::{AclAction, AclRuleConfig};

/// What an agent asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
}

/// The values of the variables for one agent.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub client_id: &'a str,
    pub identity: &'a str,
    pub thing_name: &'a str,
}

/// The rules, compiled once per gateway and evaluated per agent (nothing is copied per
/// connection).
#[derive(Debug, Clone)]
pub struct Acl {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    allow: bool,
    action: AclAction,
    levels: Vec<Level>,
}

#[derive(Debug, Clone)]
enum Level {
    /// A literal level, `+` or `#`.
    Plain(String),
    /// Exactly one variable.
    Var(Var),
    /// Text with variables in it, e.g. `x-${identity}`.
    Template(String),
}

#[derive(Debug, Clone, Copy)]
enum Var {
    ClientId,
    Identity,
    ThingName,
}

const VARS: [(&str, Var); 3] = [
    ("${clientId}", Var::ClientId),
    ("${identity}", Var::Identity),
    ("${thingName}", Var::ThingName),
];

impl Var {
    fn value<'a>(self, subject: &Subject<'a>) -> &'a str {
        match self {
            Var::ClientId => subject.client_id,
            Var::Identity => subject.identity,
            Var::ThingName => subject.thing_name,
        }
    }
}

/// Whether `value` may stand for a variable: one plain, non-empty topic level.
fn plain_level(value: &str) -> bool {
    !value.is_empty() && !value.contains(['/', '+', '#', '\0'])
}

impl Level {
    fn parse(text: &str) -> Self {
        match VARS.iter().find(|(name, _)| *name == text) {
            Some((_, var)) => Level::Var(*var),
            None if text.contains("${") => Level::Template(text.to_string()),
            None => Level::Plain(text.to_string()),
        }
    }

    /// The level for `subject`; `None` when a variable's value is not one plain level.
    fn resolve<'a>(&'a self, subject: &Subject<'a>) -> Option<Cow<'a, str>> {
        match self {
            Level::Plain(text) => Some(Cow::Borrowed(text)),
            Level::Var(var) => {
                let value = var.value(subject);
                plain_level(value).then_some(Cow::Borrowed(value))
            }
            Level::Template(text) => {
                let mut out = text.clone();
                for (name, var) in VARS {
                    if out.contains(name) {
                        let value = var.value(subject);
                        if !plain_level(value) {
                            return None;
                        }
                        out = out.replace(name, value);
                    }
                }
                Some(Cow::Owned(out))
            }
        }
    }
}

impl Acl {
    pub fn new(rules: &[AclRuleConfig]) -> Self {
        Self {
            rules: rules
                .iter()
                .map(|r| Rule {
                    allow: r.allow.is_some(),
                    action: r.allow.or(r.deny).unwrap_or(AclAction::All),
                    levels: r.topic.split('/').map(Level::parse).collect(),
                })
                .collect(),
        }
    }

    /// Whether `subject` may publish to `topic` (a topic name) or subscribe to `topic` (a
    /// filter; a topic name for a delivery).
    pub fn allows(&self, subject: &Subject<'_>, access: Access, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut allowed = false;
        for rule in &self.rules {
            let governs = match rule.action {
                AclAction::All => true,
                AclAction::Publish => access == Access::Publish,
                AclAction::Subscribe => access == Access::Subscribe,
            };
            if !governs {
                continue;
            }
            let filter = rule
                .levels
                .iter()
                .map(|level| level.resolve(subject))
                .collect::<Option<Vec<_>>>();
            let filter = match filter {
                Some(filter) => filter,
                // An allow rule that cannot be filled in allows nothing.
                None if rule.allow => continue,
                // A deny rule that cannot be filled in denies everything it could have stood
                // for: the levels before its first variable, then `#`.
                None => deny_all_from(rule),
            };
            let hit = match (access, rule.allow) {
                (Access::Publish, _) => matches(&filter, &levels),
                (Access::Subscribe, true) => covers(&filter, &levels),
                (Access::Subscribe, false) => intersects(&filter, &levels),
            };
            if hit && !rule.allow {
                return false;
            }
            allowed |= hit;
        }
        allowed
    }
}

fn deny_all_from(rule: &Rule) -> Vec<Cow<'_, str>> {
    let mut levels: Vec<Cow<'_, str>> = rule
        .levels
        .iter()
        .map_while(|l| match l {
            Level::Plain(text) => Some(Cow::Borrowed(text.as_str())),
            _ => None,
        })
        .collect();
    levels.push(Cow::Borrowed("#"));
    levels
}

/// Topics beginning with `$` are not matched by a filter's leading wildcard.
fn wildcard_meets_dollar<S: AsRef<str>>(f: &[S], t: &[&str]) -> bool {
    t.first().is_some_and(|l| l.starts_with('$'))
        && f.first().is_some_and(|l| matches!(l.as_ref(), "+" | "#"))
}

/// Whether filter `f` matches topic name `t` (MQTT semantics; `#` also matches the parent).
fn matches<S: AsRef<str>>(f: &[S], t: &[&str]) -> bool {
    if wildcard_meets_dollar(f, t) {
        return false;
    }
    let mut i = 0;
    for level in f {
        match level.as_ref() {
            "#" => return true,
            "+" => {
                if i >= t.len() {
                    return false;
                }
            }
            literal => {
                if t.get(i) != Some(&literal) {
                    return false;
                }
            }
        }
        i += 1;
    }
    i == t.len()
}

/// Whether every topic filter `sub` can match is matched by filter `f`.
fn covers<S: AsRef<str>>(f: &[S], sub: &[&str]) -> bool {
    if wildcard_meets_dollar(f, sub) {
        return false;
    }
    let mut i = 0;
    for level in f {
        let Some(&s) = sub.get(i) else {
            // `sub` is shorter: only a trailing `#` of `f` (matching the parent) covers it.
            return level.as_ref() == "#" && i + 1 == f.len();
        };
        match level.as_ref() {
            "#" => return true,
            "+" if s != "#" => {}
            "+" => return false,
            literal => {
                if s != literal {
                    return false;
                }
            }
        }
        i += 1;
    }
    i == sub.len()
}

/// Whether some topic is matched by both filters.
fn intersects<S: AsRef<str>>(f: &[S], g: &[&str]) -> bool {
    let mut i = 0;
    loop {
        match (f.get(i).map(|l| l.as_ref()), g.get(i)) {
            (Some("#"), _) | (_, Some(&"#")) => return true,
            (None, None) => return true,
            // One ended and the other goes on without a `#` (caught above): no common topic.
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(a), Some(b)) => {
                if a != "+" && *b != "+" && a != *b {
                    return false;
                }
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests;
