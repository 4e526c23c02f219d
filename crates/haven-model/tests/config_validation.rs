//! A configuration is accepted only when it is coherent; every refusal names the file,
//! the field and the rule.

use haven_model::{Config, ConfigError, Role, Score, State};

const EXAMPLE: &str = include_str!("../../../examples/two-node.toml");
const EXAMPLE_STATE: &str = include_str!("../../../examples/two-node-state.json");

fn refuse(text: &str) -> (String, String) {
    match Config::from_toml("c.toml", text) {
        Err(ConfigError::Invalid {
            source_name,
            field,
            reason,
        }) => {
            assert_eq!(source_name, "c.toml");
            (field, reason)
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
}

const BASE: &str = r#"
[[nodes]]
name = "n1"
[[nodes]]
name = "n2"
[[resources]]
id = "a"
class = "lsb"
type = "a"
[[resources]]
id = "b"
class = "lsb"
type = "b"
"#;

#[test]
fn example_parses_and_round_trips() {
    let c = Config::from_toml("two-node.toml", EXAMPLE).expect("example is valid");
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.options.resource_stickiness, Score::new(100));
    assert_eq!(c.constraints.colocation[0].with_role, Some(Role::Promoted));
    assert_eq!(c.constraints.colocation[0].score, Score::INFINITY);
    let again = Config::from_toml("again.toml", &c.to_toml().expect("renders")).expect("valid");
    assert_eq!(again, c);
    let s = State::from_json("two-node-state.json", EXAMPLE_STATE).expect("state is valid");
    assert_eq!(s.resources["vm1"]["m1"].role, Role::Started);
}

#[test]
fn unknown_constraint_ids_are_named() {
    let (f, r) = refuse(&format!(
        "{BASE}[[constraints.order]]\nid = \"o\"\nfirst = \"a\"\nthen = \"zz\"\n"
    ));
    assert_eq!(f, "constraints.order[0].then");
    assert!(r.contains("unknown resource `zz`"), "{r}");
    let (f, _) = refuse(&format!(
        "{BASE}[[constraints.location]]\nid = \"l\"\nrsc = \"a\"\nnode = \"n9\"\nscore = 5\n"
    ));
    assert_eq!(f, "constraints.location[0].node");
}

#[test]
fn duplicate_ids_are_refused() {
    let (f, r) = refuse(&format!(
        "{BASE}[[groups]]\nid = \"a\"\nmembers = [\"b\"]\n"
    ));
    assert_eq!(f, "groups[0].id");
    assert!(r.contains("already used by resources[0].id"), "{r}");
    let (f, _) = refuse("[[nodes]]\nname = \"n\"\n[[nodes]]\nname = \"n\"\n");
    assert_eq!(f, "nodes[1].name");
}

#[test]
fn mandatory_order_cycles_are_refused_but_optional_ones_pass() {
    let cyc = format!(
        "{BASE}[[constraints.order]]\nid = \"o1\"\nfirst = \"a\"\nthen = \"b\"\n\
         [[constraints.order]]\nid = \"o2\"\nfirst = \"b\"\nthen = \"a\"\n"
    );
    let (f, r) = refuse(&cyc);
    assert!(f.starts_with("constraints.order["), "{f}");
    assert!(r.contains("cycle"), "{r}");
    let opt = cyc.replace("id = \"o2\"", "id = \"o2\"\nkind = \"Optional\"");
    assert!(Config::from_toml("c.toml", &opt).is_ok());
}

#[test]
fn impossible_clone_counts_are_refused() {
    let (f, r) = refuse(&format!(
        "{BASE}[[clones]]\nid = \"c\"\nchild = \"a\"\nclone-max = 1\npromotable = true\npromoted-max = 2\n"
    ));
    assert_eq!(f, "clones[0].promoted-max");
    assert!(r.contains("cannot exceed clone-max"), "{r}");
    let (f, _) = refuse(&format!(
        "{BASE}[[clones]]\nid = \"c\"\nchild = \"a\"\nclone-node-max = 0\n"
    ));
    assert_eq!(f, "clones[0].clone-node-max");
}

#[test]
fn bad_scores_and_syntax_name_the_file() {
    let e = Config::from_toml(
        "c.toml",
        &format!("{BASE}[[constraints.location]]\nid = \"l\"\nrsc = \"a\"\nnode = \"n1\"\nscore = \"lots\"\n"),
    )
    .expect_err("bad score");
    let msg = e.to_string();
    assert!(msg.starts_with("c.toml:"), "{msg}");
    assert!(msg.contains("not a score"), "{msg}");
    let e = Config::from_toml("c.toml", "[options]\nbogus = 1\n").expect_err("unknown key");
    assert!(e.to_string().contains("bogus"), "{e}");
}

#[test]
fn passwords_never_live_in_the_config() {
    let (f, r) = refuse(
        "[[nodes]]\nname = \"n1\"\n[[fencing.devices]]\nid = \"f\"\nagent = \"fence_ipmilan\"\nparams = { password = \"x\" }\n",
    );
    assert_eq!(f, "fencing.devices[0].params.password");
    assert!(r.contains("password-file"), "{r}");
}

#[test]
fn fencing_devices_that_cannot_work_safely_are_refused() {
    let dev = |extra: &str| {
        format!("{BASE}[[fencing.devices]]\nid = \"d\"\nagent = \"fence_ipmilan\"\n{extra}")
    };
    let (f, r) = refuse(&dev("params = { snmp_priv_passwd = \"x\" }\n"));
    assert_eq!(f, "fencing.devices[0].params.snmp_priv_passwd");
    assert!(r.contains("password-file"), "{r}");
    let (f, r) = refuse(&dev("params = { pcmk_host_argument = \"none\" }\n"));
    assert_eq!(f, "fencing.devices[0].hosts");
    assert!(r.contains("exactly"), "{r}");
    Config::from_toml(
        "c.toml",
        &dev("hosts = [\"n1\"]\nparams = { pcmk_host_argument = \"none\" }\n"),
    )
    .expect("one host named: valid");
    let (f, _) = refuse(&format!(
        "[options]\nno-quorum-policy = \"freeze\"\n{BASE}[[fencing.devices]]\nid = \"w\"\nagent = \"watchdog\"\n"
    ));
    assert_eq!(f, "fencing.devices[0].agent");
    let (f, r) = refuse(&dev(
        "[[fencing.levels]]\nnode = \"n1\"\nindex = 1\ndevices = []\n",
    ));
    assert_eq!(f, "fencing.levels[0].devices");
    assert!(r.contains("at least one"), "{r}");
}

#[test]
fn two_node_needs_two_nodes_and_fencing() {
    Config::from_toml("c.toml", &format!("[options]\ntwo-node = true\n{BASE}"))
        .expect("two nodes with stonith: valid");
    let (f, r) = refuse(&format!(
        "[options]\ntwo-node = true\nstonith-enabled = false\n{BASE}"
    ));
    assert_eq!(f, "options.two-node");
    assert!(r.contains("stonith-enabled"), "{r}");
    let (f, _) = refuse(&format!(
        "[options]\ntwo-node = true\n{BASE}[[nodes]]\nname = \"n3\"\n"
    ));
    assert_eq!(f, "options.two-node");
}

#[test]
fn fence_delays_and_timeouts_must_be_durations_in_pacemakers_forms() {
    let dev = |params: &str| {
        format!(
            "{BASE}[[fencing.devices]]\nid = \"fence-n1\"\nagent = \"fence_ipmilan\"\nparams = {{ {params} }}\n"
        )
    };
    for good in [
        "pcmk_delay_max = \"5\"",
        "pcmk_delay_max = \"5s\"",
        "pcmk_delay_max = \"500ms\"",
        "pcmk_delay_max = \"1min\"",
        "pcmk_delay_base = \"2s\"",
        "pcmk_delay_base = \"n1:5s;n2:0\"",
        "pcmk_delay_base = \"n1:5s, n2:1min\"",
        "pcmk_reboot_timeout = \"40s\"",
        "delay = \"4\"",
    ] {
        Config::from_toml("c.toml", &dev(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let (f, r) = refuse(&dev("pcmk_delay_max = \"5x\""));
    assert_eq!(f, "fencing.devices[fence-n1].params.pcmk_delay_max");
    assert!(r.contains("'5x' is not a duration"), "{r}");
    assert!(r.contains("500ms") && r.contains("min"), "{r}");
    let (f, r) = refuse(&dev("pcmk_delay_base = \"n1:5s;n2:soon\""));
    assert_eq!(f, "fencing.devices[fence-n1].params.pcmk_delay_base");
    assert!(r.contains("'soon' (for node n2) is not a duration"), "{r}");
    let (_, r) = refuse(&dev("pcmk_delay_base = \"n1:5s;n3:0\""));
    assert!(r.contains("`n3`") && r.contains("[[nodes]]"), "{r}");
    let (_, r) = refuse(&dev("pcmk_delay_base = \"n1:5s;n2\""));
    assert!(r.contains("NODE:DELAY"), "{r}");
    let (f, _) = refuse(&dev("pcmk_delay_base = \"-1\""));
    assert_eq!(f, "fencing.devices[fence-n1].params.pcmk_delay_base");
    let (f, _) = refuse(&dev("pcmk_reboot_timeout = \"\""));
    assert_eq!(f, "fencing.devices[fence-n1].params.pcmk_reboot_timeout");
    let (f, r) = refuse(&dev("delay = \"4s\""));
    assert_eq!(f, "fencing.devices[fence-n1].params.delay");
    assert!(r.contains("whole number of seconds"), "{r}");
    let (f, _) = refuse(&format!(
        "{BASE}[[fencing.devices]]\nid = \"wd\"\nagent = \"watchdog\"\nparams = {{ wait = \"ten\" }}\n"
    ));
    assert_eq!(f, "fencing.devices[wd].params.wait");
}

#[test]
fn a_volumes_window_timeout_is_a_bounded_duration() {
    let vol = |v: &str| {
        format!(
            "{BASE}[[resources]]\nid = \"vol1\"\nclass = \"volume\"\ntype = \"volume\"\nparams = {{ window_timeout = \"{v}\" }}\n"
        )
    };
    for good in ["120", "90s", "2min", "1h"] {
        Config::from_toml("c.toml", &vol(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let (f, r) = refuse(&vol("soon"));
    assert_eq!(f, "resources[vol1].params.window_timeout");
    assert!(r.contains("'soon' is not a duration"), "{r}");
    for out_of_range in ["0", "500ms", "2h"] {
        let (f, r) = refuse(&vol(out_of_range));
        assert_eq!(f, "resources[vol1].params.window_timeout");
        assert!(
            r.contains(&format!("'{out_of_range}' is out of range")),
            "{r}"
        );
    }
    // Another class's parameter of that name is its agent's business.
    Config::from_toml(
        "c.toml",
        &vol("soon").replace("class = \"volume\"", "class = \"lsb\""),
    )
    .expect("not a volume");
}

#[test]
fn durations_parse_to_the_millisecond() {
    use haven_model::config::parse_duration;
    use std::time::Duration;
    assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
    assert_eq!(parse_duration(" 5s "), Some(Duration::from_secs(5)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("1min"), Some(Duration::from_secs(60)));
    assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
    for bad in ["", "s", "5x", "-1", "1.5s", "99999999999999999999h"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}
