//! Fuzz-style properties: the TOML, JSON and CIB parsers return an error (naming the
//! file) on any input, and never panic — on random text and on damaged valid files.

use haven_model::{Config, State, cib};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../../examples/two-node.toml");
const EXAMPLE_STATE: &str = include_str!("../../../examples/two-node-state.json");
const CIB: &str = r#"<cib have-quorum="1" dc-uuid="1"><configuration><crm_config><cluster_property_set id="o"><nvpair id="a" name="stonith-enabled" value="true"/></cluster_property_set></crm_config>
<nodes><node id="1" uname="n1"/><node id="2" uname="n2"/></nodes>
<resources><primitive id="r" class="ocf" provider="heartbeat" type="Dummy"><meta_attributes id="m"><nvpair id="s" name="resource-stickiness" value="INFINITY"/></meta_attributes></primitive>
<clone id="c"><meta_attributes id="cm"><nvpair id="p" name="promotable" value="true"/></meta_attributes><primitive id="d" class="ocf" provider="pacemaker" type="Stateful"/></clone></resources>
<constraints><rsc_location id="l" rsc="r" node="n1" score="100"/><rsc_colocation id="co" rsc="r" with-rsc="c" with-rsc-role="Promoted" score="INFINITY"/><rsc_order id="or" first="c" first-action="promote" then="r"/></constraints></configuration>
<status><node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member"><lrm id="1"><lrm_resources><lrm_resource id="r" class="ocf" provider="heartbeat" type="Dummy"><lrm_rsc_op id="r_last_0" operation="start" call-id="3" rc-code="0" op-status="0" interval="0" transition-key="1:2:0:u"/></lrm_resource></lrm_resources></lrm></node_state></status></cib>"#;

/// Damage a text: cut it, and splice random bytes in.
fn damage(text: &str, cut: usize, at: usize, junk: &str) -> String {
    let cut = cut % (text.len() + 1);
    let mut s: String = text.chars().take(cut).collect();
    let at = at % (s.chars().count() + 1);
    let head: String = s.chars().take(at).collect();
    let tail: String = s.chars().skip(at).collect();
    s = format!("{head}{junk}{tail}");
    s
}

#[test]
fn the_seed_documents_are_valid() {
    assert!(Config::from_toml("two-node.toml", EXAMPLE).is_ok());
    assert!(State::from_json("s.json", EXAMPLE_STATE).is_ok());
    let imported = cib::import("c.xml", CIB).expect("valid CIB");
    assert_eq!(imported.config.clones.len(), 1);
    assert_eq!(
        imported.state.resources["r"]["n1"].role,
        haven_model::Role::Started
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_text_is_refused_cleanly(text in "\\PC{0,200}") {
        if let Err(e) = Config::from_toml("x.toml", &text) {
            prop_assert!(e.to_string().starts_with("x.toml"), "{e}");
        }
        if let Err(e) = State::from_json("x.json", &text) {
            prop_assert!(e.to_string().starts_with("x.json"), "{e}");
        }
        if let Err(e) = cib::import("x.xml", &text) {
            prop_assert!(e.to_string().starts_with("x.xml"), "{e}");
        }
    }

    #[test]
    fn damaged_files_are_refused_cleanly(cut in 0usize..4000, at in 0usize..4000, junk in "[<>\"=/\\[\\]{}a-z0-9 \n-]{0,12}") {
        let toml = damage(EXAMPLE, cut, at, &junk);
        if let Err(e) = Config::from_toml("x.toml", &toml) {
            prop_assert!(e.to_string().starts_with("x.toml"), "{e}");
        }
        let json = damage(EXAMPLE_STATE, cut, at, &junk);
        if let Err(e) = State::from_json("x.json", &json) {
            prop_assert!(e.to_string().starts_with("x.json"), "{e}");
        }
        let xml = damage(CIB, cut, at, &junk);
        match cib::import("x.xml", &xml) {
            Err(e) => prop_assert!(e.to_string().starts_with("x.xml"), "{e}"),
            // Whatever imports must also schedule-ready validate.
            Ok(i) => prop_assert!(i.config.validate("x.xml").is_ok()),
        }
    }
}
