//! ACL rule matching: variable substitution, filter coverage and intersection, the defaults.

use super::*;
use crate::config::default_acl;

fn rule(allow: bool, action: AclAction, topic: &str) -> AclRuleConfig {
    AclRuleConfig {
        allow: allow.then_some(action),
        deny: (!allow).then_some(action),
        topic: topic.into(),
    }
}

/// An ACL bound to one agent, for short assertions.
struct Agent {
    acl: Acl,
    identity: String,
}

impl Agent {
    fn allows(&self, access: Access, topic: &str) -> bool {
        let subject = Subject {
            client_id: &self.identity,
            identity: &self.identity,
            thing_name: "gw-1",
        };
        self.acl.allows(&subject, access, topic)
    }
}

fn agent(rules: &[AclRuleConfig], identity: &str) -> Agent {
    Agent {
        acl: Acl::new(rules),
        identity: identity.into(),
    }
}

fn split(t: &str) -> Vec<&str> {
    t.split('/').collect()
}

#[test]
fn the_default_acl_confines_an_agent_to_its_own_topics() {
    let acl = agent(&default_acl(), "edr-7");
    assert!(acl.allows(Access::Publish, "agents/edr-7/telemetry"));
    assert!(acl.allows(Access::Publish, "agents/edr-7/alerts/high"));
    assert!(!acl.allows(Access::Publish, "agents/edr-8/telemetry"));
    assert!(!acl.allows(Access::Publish, "agents/edr-70/telemetry"));
    assert!(!acl.allows(Access::Publish, "gatehouse/gw-1/batches"));
    assert!(acl.allows(Access::Subscribe, "agents/edr-7/commands/#"));
    assert!(acl.allows(Access::Subscribe, "agents/edr-7/commands/+/run"));
    assert!(acl.allows(Access::Subscribe, "agents/edr-7/commands"));
    assert!(
        !acl.allows(Access::Subscribe, "agents/edr-7/#"),
        "wider than commands"
    );
    assert!(
        !acl.allows(Access::Subscribe, "agents/+/commands/#"),
        "other agents' commands"
    );
    assert!(!acl.allows(Access::Subscribe, "#"));
}

#[test]
fn an_identity_with_wildcards_or_slashes_cannot_widen_a_rule() {
    for identity in ["#", "+", "a/b", "", "x\0y"] {
        let acl = agent(&default_acl(), identity);
        for topic in [
            "agents/x/telemetry",
            "agents/a/b/telemetry",
            "agents/#",
            "agents/+/t",
        ] {
            assert!(
                !acl.allows(Access::Publish, topic),
                "identity {identity:?} may publish to {topic}"
            );
        }
        assert!(!acl.allows(Access::Subscribe, "agents/+/commands/#"));
    }
}

#[test]
fn deny_wins_over_allow_in_both_directions() {
    let rules = [
        rule(true, AclAction::All, "agents/${identity}/#"),
        rule(false, AclAction::Publish, "agents/${identity}/commands/#"),
        rule(false, AclAction::Subscribe, "agents/${identity}/secrets/+"),
    ];
    let acl = agent(&rules, "a1");
    assert!(acl.allows(Access::Publish, "agents/a1/telemetry"));
    assert!(!acl.allows(Access::Publish, "agents/a1/commands/x"));
    assert!(
        acl.allows(Access::Subscribe, "agents/a1/commands/x"),
        "deny is publish-only"
    );
    assert!(!acl.allows(Access::Subscribe, "agents/a1/secrets/k"));
    assert!(
        !acl.allows(Access::Subscribe, "agents/a1/#"),
        "would include secrets"
    );
    assert!(
        !acl.allows(Access::Subscribe, "agents/a1/+/k"),
        "would include secrets/k"
    );
    assert!(acl.allows(Access::Subscribe, "agents/a1/public/k"));
}

#[test]
fn a_deny_rule_whose_variable_cannot_be_filled_denies_broadly() {
    let rules = [
        rule(true, AclAction::Publish, "agents/#"),
        rule(false, AclAction::Publish, "agents/${identity}/private"),
    ];
    // Identity "a/b" cannot be one level: the deny rule falls back to `agents/#`.
    let acl = agent(&rules, "a/b");
    assert!(!acl.allows(Access::Publish, "agents/a/b/private"));
    assert!(!acl.allows(Access::Publish, "agents/other/x"));
}

#[test]
fn thing_name_and_client_id_variables_are_filled_in() {
    let rules = [rule(
        true,
        AclAction::Publish,
        "site/${thingName}/${clientId}/x-${identity}",
    )];
    let acl = Acl::new(&rules);
    let subject = Subject {
        client_id: "c1",
        identity: "id1",
        thing_name: "gw-1",
    };
    assert!(acl.allows(&subject, Access::Publish, "site/gw-1/c1/x-id1"));
    assert!(!acl.allows(&subject, Access::Publish, "site/gw-2/c1/x-id1"));
    let slash = Subject {
        identity: "a/b",
        ..subject
    };
    assert!(!acl.allows(&slash, Access::Publish, "site/gw-1/c1/x-a/b"));
}

#[test]
fn filter_relations_follow_mqtt_semantics() {
    let f = |s: &str| s.split('/').map(str::to_string).collect::<Vec<_>>();
    assert!(matches(&f("a/#"), &split("a")));
    assert!(matches(&f("a/+/c"), &split("a/b/c")));
    assert!(!matches(&f("a/+"), &split("a")));
    assert!(!matches(&f("#"), &split("$SYS/x")));
    assert!(!matches(&f("+/x"), &split("$SYS/x")));
    assert!(matches(&f("$SYS/#"), &split("$SYS/x")));

    assert!(covers(&f("a/#"), &split("a/+/c")));
    assert!(covers(&f("a/#"), &split("a")));
    assert!(covers(&f("a/+/c"), &split("a/+/c")));
    assert!(!covers(&f("a/+/c"), &split("a/#")));
    assert!(!covers(&f("a/b"), &split("a/+")));
    assert!(!covers(&f("a/+"), &split("a/b/c")));
    assert!(!covers(&f("#"), &split("$SYS/#")));

    assert!(intersects(&f("a/+/c"), &split("a/b/+")));
    assert!(intersects(&f("a/#"), &split("a")));
    assert!(intersects(&f("+/+"), &split("x/#")));
    assert!(!intersects(&f("a/b"), &split("a/c")));
    assert!(!intersects(&f("a/b"), &split("a/b/c")));
    assert!(!intersects(&f("a/+"), &split("a")));
}
