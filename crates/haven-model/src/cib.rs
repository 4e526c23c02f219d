//! Pacemaker CIB import: the `configuration` section becomes a [`Config`], the `status`
//! section a [`State`]. What Haven cannot express is listed in
//! [`Imported::unsupported`] by element and id; nothing is dropped silently.
//!
//! How the status is read: each node's `node_state` gives membership (the cluster layer
//! `in_ccm`, the controller `crmd`, the `join` phase and the `expected` state); each
//! `lrm_resource` holds an operation history that is replayed in call order to find the
//! resource's role there and whether it failed; `fail-count-*` and `last-failure-*`
//! transient attributes give failcounts.

use std::collections::{BTreeMap, HashMap};

use roxmltree::{Document, Node as XNode};

use crate::config::{
    Action, BoolOp, Clone, Colocation, Config, ConfigError, Expr, ExprOp, FenceLevel, Group,
    HealthStrategy, Location, Meta, MultipleActive, NoQuorumPolicy, Node, OnFail, Op, Order,
    OrderKind, PlacementStrategy, Primitive, ResourceSet, Role, Rule, ValueType,
};
use crate::score::{INFINITY, Score};
use crate::state::{DefinitionChange, Migration, NodeState, NodeStatus, ResourceStatus, State};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CibError {
    #[error("{source_name}: not well-formed XML: {message}")]
    Xml {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: <{element} id=\"{id}\">: {reason}")]
    Invalid {
        source_name: String,
        element: String,
        id: String,
        reason: String,
    },
    #[error("{0}")]
    Config(#[from] ConfigError),
}

/// Something in the CIB that Haven does not express, and was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub element: String,
    pub id: String,
    pub reason: String,
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: Config,
    pub state: State,
    pub unsupported: Vec<Unsupported>,
}

struct Ctx<'s> {
    source: &'s str,
    unsupported: Vec<Unsupported>,
}

impl Ctx<'_> {
    fn skip(&mut self, n: XNode<'_, '_>, reason: impl Into<String>) {
        self.unsupported.push(Unsupported {
            element: n.tag_name().name().to_string(),
            id: n.attribute("id").unwrap_or("").to_string(),
            reason: reason.into(),
        });
    }

    fn invalid(&self, n: XNode<'_, '_>, reason: impl Into<String>) -> CibError {
        CibError::Invalid {
            source_name: self.source.to_string(),
            element: n.tag_name().name().to_string(),
            id: n.attribute("id").unwrap_or("").to_string(),
            reason: reason.into(),
        }
    }
}

fn children<'a, 'i>(n: XNode<'a, 'i>, tag: &'static str) -> impl Iterator<Item = XNode<'a, 'i>> {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == tag)
}

fn child<'a, 'i>(n: XNode<'a, 'i>, tag: &'static str) -> Option<XNode<'a, 'i>> {
    children(n, tag).next()
}

/// Pacemaker's booleans: true/false, yes/no, on/off, 1/0, y/n.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" | "y" => Some(true),
        "false" | "no" | "off" | "0" | "n" => Some(false),
        _ => None,
    }
}

/// A duration in seconds from Pacemaker's forms: `10`, `10s`, `500ms`, `2m`, `1h`, `PT10S`.
/// The plain forms are the configuration's own ([`crate::config::parse_duration`]);
/// ISO 8601 and microseconds occur only in CIBs.
pub fn parse_seconds(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    if let Some(iso) = t.strip_prefix("pt").or_else(|| t.strip_prefix('p')) {
        let (num, unit) = iso.split_at(iso.len().saturating_sub(1));
        let n: u64 = num.parse().ok()?;
        return match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            _ => None,
        };
    }
    if let Some(num) = t.strip_suffix("usec").or_else(|| t.strip_suffix("us")) {
        return num.trim().parse::<u64>().ok().map(|us| us / 1_000_000);
    }
    crate::config::parse_duration(&t).map(|d| d.as_secs())
}

/// Name-value pairs of every child `tag` block (later blocks do not override earlier
/// ones, as with Pacemaker's first-match rule for unordered sets).
fn nvpairs(ctx: &mut Ctx<'_>, n: XNode<'_, '_>, tag: &'static str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for block in children(n, tag) {
        if child(block, "rule").is_some() {
            let by_agent = child(block, "rule").is_some_and(|r| {
                r.children()
                    .filter(|c| c.is_element())
                    .all(|c| c.tag_name().name() == "rsc_expression")
            });
            if !by_agent {
                ctx.skip(
                    block,
                    "attribute blocks conditional on rules are not supported; left out",
                );
            }
            continue;
        }
        if block.attribute("id-ref").is_some() {
            ctx.skip(
                block,
                "references to attribute blocks (id-ref) are not supported",
            );
            continue;
        }
        for nv in children(block, "nvpair") {
            let (Some(k), Some(v)) = (nv.attribute("name"), nv.attribute("value")) else {
                ctx.skip(nv, "nvpair without name or value");
                continue;
            };
            if !out.iter().any(|(ek, _)| ek == k) {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

fn parse_score(ctx: &Ctx<'_>, n: XNode<'_, '_>, attr: &str) -> Result<Option<Score>, CibError> {
    match n.attribute(attr) {
        None => Ok(None),
        Some(v) => v
            .parse::<Score>()
            .map(Some)
            .map_err(|e| ctx.invalid(n, format!("{attr}: {e}"))),
    }
}

/// Apply one meta attribute; returns false when the name is not a meta attribute Haven
/// knows for plain resources.
fn apply_meta(meta: &mut Meta, k: &str, v: &str) -> Option<bool> {
    match k {
        "target-role" if v == "#default" => {}
        "target-role" => meta.target_role = Some(Role::parse(v)?),
        "is-managed" => meta.is_managed = Some(parse_bool(v)?),
        "resource-stickiness" | "resource_stickiness" => {
            meta.resource_stickiness = Some(v.parse().ok()?)
        }
        "migration-threshold" => {
            let s: Score = v.parse().ok()?;
            meta.migration_threshold = Some(if s.is_pos_inf() {
                INFINITY as u32
            } else {
                u32::try_from(s.value().max(0)).ok()?
            });
        }
        "failure-timeout" => meta.failure_timeout = Some(parse_seconds(v)?),
        "allow-migrate" => meta.allow_migrate = Some(parse_bool(v)?),
        "priority" => {
            meta.priority = Some(match v.parse::<Score>() {
                Ok(s) => s.value(),
                Err(_) => v.trim().parse::<f64>().ok()? as i64,
            })
        }
        "critical" => meta.critical = Some(parse_bool(v)?),
        "multiple-active" => {
            meta.multiple_active = Some(match v {
                "stop_start" => MultipleActive::StopStart,
                "stop_only" => MultipleActive::StopOnly,
                "block" => MultipleActive::Block,
                "stop_unexpected" => MultipleActive::StopUnexpected,
                _ => return None,
            })
        }
        _ => return Some(false),
    }
    Some(true)
}

fn read_meta(
    ctx: &mut Ctx<'_>,
    n: XNode<'_, '_>,
    extra_ok: &[&str],
) -> Result<(Meta, Vec<(String, String)>), CibError> {
    let mut meta = Meta::default();
    let mut rest = Vec::new();
    for (k, v) in nvpairs(ctx, n, "meta_attributes") {
        match apply_meta(&mut meta, &k, &v) {
            Some(true) => {}
            Some(false) => {
                if extra_ok.contains(&k.as_str()) {
                    rest.push((k, v));
                } else if !IGNORED_META.contains(&k.as_str()) {
                    ctx.unsupported.push(Unsupported {
                        element: n.tag_name().name().to_string(),
                        id: n.attribute("id").unwrap_or("").to_string(),
                        reason: format!("meta attribute `{k}` is not supported; left out"),
                    });
                }
            }
            None => {
                return Err(ctx.invalid(n, format!("meta attribute `{k}`: bad value `{v}`")));
            }
        }
    }
    Ok((meta, rest))
}

/// Meta attributes that change nothing Haven decides.
const IGNORED_META: &[&str] = &[
    "node-health-base",
    "description",
    "requires",
    "restart-type",
    "resource-discovery",
];

const CLONE_META: &[&str] = &[
    "clone-max",
    "clone-min",
    "clone-node-max",
    "interleave",
    "notify",
    "globally-unique",
    "ordered",
    "promotable",
    "promoted-max",
    "master-max",
    "promoted-node-max",
    "master-node-max",
];

fn read_primitive(ctx: &mut Ctx<'_>, n: XNode<'_, '_>) -> Result<Primitive, CibError> {
    let id = n
        .attribute("id")
        .ok_or_else(|| ctx.invalid(n, "a primitive needs an id"))?;
    if n.attribute("template").is_some() {
        ctx.skip(
            n,
            "resource templates are not supported; the primitive keeps only its own attributes",
        );
    }
    let class = n.attribute("class").unwrap_or("ocf").to_string();
    let (meta, _) = read_meta(ctx, n, &[])?;
    let params = nvpairs(ctx, n, "instance_attributes").into_iter().collect();
    let mut ops = Vec::new();
    if let Some(opsn) = child(n, "operations") {
        for o in children(opsn, "op") {
            let name = o.attribute("name").unwrap_or("").to_string();
            let interval = match o.attribute("interval") {
                Some(v) => parse_seconds(v)
                    .ok_or_else(|| ctx.invalid(o, format!("interval: `{v}` is not a duration")))?,
                None => 0,
            };
            let timeout = o.attribute("timeout").and_then(parse_seconds);
            let role = o.attribute("role").and_then(Role::parse);
            let on_fail = match o.attribute("on-fail") {
                None => None,
                Some(v) => Some(match v {
                    "ignore" => OnFail::Ignore,
                    "block" => OnFail::Block,
                    "stop" => OnFail::Stop,
                    "restart" | "restart-container" => OnFail::Restart,
                    "standby" => OnFail::Standby,
                    "fence" => OnFail::Fence,
                    "demote" => OnFail::Demote,
                    _ => return Err(ctx.invalid(o, format!("on-fail: unknown value `{v}`"))),
                }),
            };
            ops.push(Op {
                name,
                interval,
                timeout,
                role,
                on_fail,
            });
        }
    }
    let utilization = read_utilization(ctx, n)?;
    Ok(Primitive {
        id: id.to_string(),
        provider: n
            .attribute("provider")
            .map(str::to_string)
            .or_else(|| (class == "ocf").then(|| "heartbeat".to_string())),
        class,
        agent: n.attribute("type").unwrap_or("").to_string(),
        params,
        meta,
        ops,
        utilization,
        home: None,
        failback: false,
    })
}

fn read_utilization(
    ctx: &mut Ctx<'_>,
    n: XNode<'_, '_>,
) -> Result<BTreeMap<String, i64>, CibError> {
    let mut out = BTreeMap::new();
    for (k, v) in nvpairs(ctx, n, "utilization") {
        let x: i64 = v
            .trim()
            .parse()
            .map_err(|_| ctx.invalid(n, format!("utilization `{k}`: `{v}` is not an integer")))?;
        out.insert(k, x);
    }
    Ok(out)
}

fn read_resources(ctx: &mut Ctx<'_>, res: XNode<'_, '_>, cfg: &mut Config) -> Result<(), CibError> {
    for n in res.children().filter(|c| c.is_element()) {
        match n.tag_name().name() {
            "primitive" => cfg.resources.push(read_primitive(ctx, n)?),
            "group" => {
                let g = read_group(ctx, n, cfg)?;
                cfg.groups.push(g);
            }
            "clone" | "master" => {
                let id = n
                    .attribute("id")
                    .ok_or_else(|| ctx.invalid(n, "a clone needs an id"))?;
                let (meta, extra) = read_meta(ctx, n, CLONE_META)?;
                let mut c = Clone {
                    id: id.to_string(),
                    meta,
                    promotable: n.tag_name().name() == "master",
                    ..Default::default()
                };
                for (k, v) in extra {
                    let bad = || ctx.invalid(n, format!("meta attribute `{k}`: bad value `{v}`"));
                    let num = || v.trim().parse::<u32>().map_err(|_| bad());
                    match k.as_str() {
                        "clone-max" => c.clone_max = Some(num()?),
                        "clone-node-max" => c.clone_node_max = Some(num()?),
                        "clone-min" => c.clone_min = Some(num()?),
                        "promoted-max" | "master-max" => c.promoted_max = Some(num()?),
                        "promoted-node-max" | "master-node-max" => {
                            c.promoted_node_max = Some(num()?)
                        }
                        "interleave" => c.interleave = parse_bool(&v).ok_or_else(bad)?,
                        "notify" => c.notify = parse_bool(&v).ok_or_else(bad)?,
                        "globally-unique" => c.globally_unique = parse_bool(&v).ok_or_else(bad)?,
                        "ordered" => c.ordered = parse_bool(&v).ok_or_else(bad)?,
                        "promotable" => c.promotable = parse_bool(&v).ok_or_else(bad)?,
                        _ => {}
                    }
                }
                if !c.promotable {
                    c.promoted_max = None;
                    c.promoted_node_max = None;
                }
                let inner = n.children().find(|c| {
                    c.is_element() && matches!(c.tag_name().name(), "primitive" | "group")
                });
                let Some(inner) = inner else {
                    ctx.skip(n, "a clone without a primitive or group inside; left out");
                    continue;
                };
                if inner.tag_name().name() == "primitive" {
                    cfg.resources.push(read_primitive(ctx, inner)?);
                } else {
                    let g = read_group(ctx, inner, cfg)?;
                    cfg.groups.push(g);
                }
                c.child = inner.attribute("id").unwrap_or("").to_string();
                cfg.clones.push(c);
            }
            "template" => ctx.skip(n, "resource templates are not supported"),
            "bundle" => ctx.skip(n, "bundles (container resources) are not supported"),
            _ => ctx.skip(n, "unknown resource kind"),
        }
    }
    Ok(())
}

fn read_group(ctx: &mut Ctx<'_>, n: XNode<'_, '_>, cfg: &mut Config) -> Result<Group, CibError> {
    let id = n
        .attribute("id")
        .ok_or_else(|| ctx.invalid(n, "a group needs an id"))?;
    let (meta, _) = read_meta(ctx, n, &[])?;
    let mut members = Vec::new();
    for p in children(n, "primitive") {
        let prim = read_primitive(ctx, p)?;
        members.push(prim.id.clone());
        cfg.resources.push(prim);
    }
    Ok(Group {
        id: id.to_string(),
        members,
        meta,
    })
}

/// Where an expression's value comes from when it names a resource attribute
/// (`value-source = "param"` or `"meta"`): the resource's own value of that name.
type ValueLookup<'l> = &'l dyn Fn(&str, &str) -> Option<String>;

fn read_rule(
    ctx: &mut Ctx<'_>,
    r: XNode<'_, '_>,
    lookup: Option<ValueLookup<'_>>,
) -> Result<Option<Rule>, CibError> {
    let mut rule = Rule {
        score: parse_score(ctx, r, "score")?,
        score_attribute: r.attribute("score-attribute").map(str::to_string),
        boolean_op: if r.attribute("boolean-op") == Some("or") {
            BoolOp::Or
        } else {
            BoolOp::And
        },
        role: r.attribute("role").and_then(Role::parse),
        ..Default::default()
    };
    for e in r.children().filter(|c| c.is_element()) {
        match e.tag_name().name() {
            "expression" => {
                let value = match e.attribute("value-source").unwrap_or("literal") {
                    "literal" => e.attribute("value").map(str::to_string),
                    source @ ("param" | "meta") => {
                        let name = e.attribute("value").unwrap_or("");
                        match lookup.and_then(|l| l(source, name)) {
                            Some(v) => Some(v),
                            // Without that attribute (or one that varies by node) the
                            // rule cannot hold here.
                            None => return Ok(None),
                        }
                    }
                    other => {
                        ctx.skip(r, format!("unknown value-source `{other}`; rule left out"));
                        return Ok(None);
                    }
                };
                let op = match e.attribute("operation").unwrap_or("") {
                    "eq" => ExprOp::Eq,
                    "ne" => ExprOp::Ne,
                    "lt" => ExprOp::Lt,
                    "gt" => ExprOp::Gt,
                    "lte" => ExprOp::Lte,
                    "gte" => ExprOp::Gte,
                    "defined" => ExprOp::Defined,
                    "not_defined" => ExprOp::NotDefined,
                    other => return Err(ctx.invalid(e, format!("operation: unknown `{other}`"))),
                };
                let value_type = match e.attribute("type") {
                    None => None,
                    Some("string") => Some(ValueType::String),
                    Some("integer") => Some(ValueType::Integer),
                    Some("number") => Some(ValueType::Number),
                    Some("version") => Some(ValueType::Version),
                    Some(t) => return Err(ctx.invalid(e, format!("type: unknown `{t}`"))),
                };
                rule.expressions.push(Expr {
                    attribute: e.attribute("attribute").unwrap_or("").to_string(),
                    operation: op,
                    value,
                    value_type,
                });
            }
            "rule" => match read_rule(ctx, e, lookup)? {
                Some(sub) => rule.rules.push(sub),
                None => return Ok(None),
            },
            other => {
                ctx.skip(
                    r,
                    format!("rule element <{other}> is not supported; rule left out"),
                );
                return Ok(None);
            }
        }
    }
    Ok(Some(rule))
}

/// The sets of a constraint. In a colocation set `ordering = "listed"` chains each
/// member with the one after it rather than the one before: the list is read reversed.
fn read_sets(ctx: &mut Ctx<'_>, n: XNode<'_, '_>, colocation: bool) -> Vec<ResourceSet> {
    let mut sets = Vec::new();
    for s in children(n, "resource_set") {
        let mut resources: Vec<String> = children(s, "resource_ref")
            .filter_map(|r| r.attribute("id").map(str::to_string))
            .collect();
        if colocation {
            match s.attribute("ordering") {
                None | Some("group") => {}
                Some("listed") => resources.reverse(),
                Some(o) => ctx.skip(s, format!("unknown set ordering `{o}`; ignored")),
            }
        } else if s.attribute("ordering").is_some() {
            ctx.skip(
                s,
                "the `ordering` attribute of sets is not supported; ignored",
            );
        }
        sets.push(ResourceSet {
            resources,
            sequential: s
                .attribute("sequential")
                .and_then(parse_bool)
                .unwrap_or(true),
            require_all: s
                .attribute("require-all")
                .and_then(parse_bool)
                .unwrap_or(true),
            role: s.attribute("role").and_then(Role::parse),
            action: s.attribute("action").and_then(Action::parse),
        });
    }
    sets
}

/// A resource's own parameter (`param`) or meta attribute (`meta`) `name`, from its
/// blocks that hold whatever the node; None when absent or set by rules.
fn resource_attribute(
    cons: XNode<'_, '_>,
    rsc: &str,
    source: &str,
    name: &str,
    node: Option<&Node>,
) -> Option<String> {
    let tag = if source == "meta" {
        "meta_attributes"
    } else {
        "instance_attributes"
    };
    let r = cons.document().descendants().find(|d| {
        d.attribute("id") == Some(rsc)
            && matches!(
                d.tag_name().name(),
                "primitive" | "group" | "clone" | "master"
            )
    })?;
    // Blocks are tried highest score first; the first that applies gives the value.
    let mut blocks: Vec<XNode<'_, '_>> = children(r, tag).collect();
    blocks.sort_by_key(|b| {
        std::cmp::Reverse(
            b.attribute("score")
                .and_then(|v| v.parse::<Score>().ok())
                .unwrap_or(Score::ZERO),
        )
    });
    for block in blocks {
        let Some(p) = children(block, "nvpair").find(|p| p.attribute("name") == Some(name)) else {
            continue;
        };
        if let Some(rule) = child(block, "rule") {
            // Its value depends on the node: only a given node can say.
            if !node_rule_holds(rule, node?)? {
                continue;
            }
        }
        return p.attribute("value").map(str::to_string);
    }
    None
}

/// Does a block's rule hold on `node`? Only equality tests of node names and
/// configured node attributes are understood (None otherwise).
fn node_rule_holds(rule: XNode<'_, '_>, node: &Node) -> Option<bool> {
    let mut results = Vec::new();
    for e in rule.children().filter(|c| c.is_element()) {
        if e.tag_name().name() != "expression" {
            return None;
        }
        let attr = e.attribute("attribute")?;
        let have = match attr {
            "#uname" => Some(node.name.clone()),
            "#id" => Some(node.id.clone().unwrap_or_else(|| node.name.clone())),
            a if a.starts_with('#') => return None,
            a => node.attributes.get(a).cloned(),
        };
        let want = e.attribute("value");
        results.push(match e.attribute("operation")? {
            "eq" => have.as_deref() == want,
            "ne" => have.as_deref() != want,
            "defined" => have.is_some(),
            "not_defined" => have.is_none(),
            _ => return None,
        });
    }
    Some(if rule.attribute("boolean-op") == Some("or") {
        results.iter().any(|&x| x)
    } else {
        results.iter().all(|&x| x)
    })
}

/// The small part of regular expressions that resource patterns use: literals, `.`,
/// bracket classes with ranges and negation, `*`, `+`, `?`, anchors and escapes.
#[derive(Debug)]
struct Pattern {
    anchored_start: bool,
    anchored_end: bool,
    atoms: Vec<(Atom, Repeat)>,
}

#[derive(Debug)]
enum Atom {
    Any,
    Char(char),
    Class(bool, Vec<(char, char)>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Repeat {
    One,
    Optional,
    Star,
    Plus,
}

impl Pattern {
    fn parse(p: &str) -> Option<Pattern> {
        let mut chars: Vec<char> = p.chars().collect();
        let anchored_start = chars.first() == Some(&'^');
        if anchored_start {
            chars.remove(0);
        }
        let n = chars.len();
        let anchored_end = chars.last() == Some(&'$') && (n < 2 || chars[n - 2] != '\\');
        if anchored_end {
            chars.pop();
        }
        let mut atoms = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let atom = match chars[i] {
                '.' => Atom::Any,
                '\\' => {
                    i += 1;
                    Atom::Char(*chars.get(i)?)
                }
                '[' => {
                    i += 1;
                    let negate = chars.get(i) == Some(&'^');
                    if negate {
                        i += 1;
                    }
                    let mut ranges = Vec::new();
                    let mut first = true;
                    while chars.get(i) != Some(&']') || first {
                        let lo = *chars.get(i)?;
                        first = false;
                        if chars.get(i + 1) == Some(&'-')
                            && chars.get(i + 2).is_some_and(|c| *c != ']')
                        {
                            ranges.push((lo, *chars.get(i + 2)?));
                            i += 3;
                        } else {
                            ranges.push((lo, lo));
                            i += 1;
                        }
                    }
                    Atom::Class(negate, ranges)
                }
                '(' | ')' | '|' | '{' | '}' | '*' | '+' | '?' | '^' | '$' => return None,
                c => Atom::Char(c),
            };
            i += 1;
            let repeat = match chars.get(i) {
                Some('*') => Repeat::Star,
                Some('+') => Repeat::Plus,
                Some('?') => Repeat::Optional,
                _ => Repeat::One,
            };
            if repeat != Repeat::One {
                i += 1;
            }
            atoms.push((atom, repeat));
        }
        Some(Pattern {
            anchored_start,
            anchored_end,
            atoms,
        })
    }

    fn is_match(&self, text: &str) -> bool {
        let t: Vec<char> = text.chars().collect();
        let starts: Vec<usize> = if self.anchored_start {
            vec![0]
        } else {
            (0..=t.len()).collect()
        };
        starts.into_iter().any(|s| self.match_at(&t, s, 0))
    }

    fn match_at(&self, t: &[char], pos: usize, ai: usize) -> bool {
        let Some((atom, repeat)) = self.atoms.get(ai) else {
            return !self.anchored_end || pos == t.len();
        };
        let hit = |p: usize| {
            t.get(p).is_some_and(|&c| match atom {
                Atom::Any => true,
                Atom::Char(x) => c == *x,
                Atom::Class(neg, ranges) => {
                    ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *neg
                }
            })
        };
        let (min, max) = match repeat {
            Repeat::One => (1, 1),
            Repeat::Optional => (0, 1),
            Repeat::Star => (0, usize::MAX),
            Repeat::Plus => (1, usize::MAX),
        };
        let mut n = 0;
        while n < max && hit(pos + n) {
            n += 1;
        }
        // Greedy, giving back one at a time.
        (min..=n).rev().any(|k| self.match_at(t, pos + k, ai + 1))
    }
}

fn read_constraints(
    ctx: &mut Ctx<'_>,
    cons: XNode<'_, '_>,
    cfg: &mut Config,
) -> Result<(), CibError> {
    for n in cons.children().filter(|c| c.is_element()) {
        let id = n.attribute("id").unwrap_or("").to_string();
        match n.tag_name().name() {
            "rsc_location" => {
                let mut rscs: Vec<String> = n
                    .attribute("rsc")
                    .map(|r| vec![r.to_string()])
                    .unwrap_or_default();
                if let Some(pattern) = n.attribute("rsc-pattern") {
                    // A leading `!` selects the resources the expression does not match.
                    let (invert, expr) = match pattern.strip_prefix('!') {
                        Some(rest) => (true, rest),
                        None => (false, pattern),
                    };
                    let Some(re) = Pattern::parse(expr) else {
                        ctx.skip(
                            n,
                            format!("rsc-pattern `{pattern}` uses unsupported syntax; left out"),
                        );
                        continue;
                    };
                    let resources = cons
                        .document()
                        .descendants()
                        .find(|d| d.has_tag_name("resources"));
                    for r in resources.into_iter().flat_map(|r| r.children()) {
                        if let Some(rid) = r.attribute("id")
                            && r.is_element()
                            && re.is_match(rid) != invert
                        {
                            rscs.push(rid.to_string());
                        }
                    }
                }
                for s in read_sets(ctx, n, false) {
                    rscs.extend(s.resources);
                }
                let mut rules = Vec::new();
                for r in children(n, "rule") {
                    if let Some(rule) = read_rule(ctx, r, None)? {
                        rules.push(rule);
                    }
                }
                // Rules that compare with a resource's own attributes are read once per
                // resource.
                let per_rsc = children(n, "rule").any(|r| {
                    r.descendants()
                        .any(|e| e.attribute("value-source").is_some_and(|v| v != "literal"))
                });
                let mut rules_of: Vec<Vec<Rule>> = Vec::new();
                if per_rsc {
                    for rsc in &rscs {
                        // A value that varies by node is read on each node, for that
                        // node only.
                        let varies = std::cell::Cell::new(false);
                        let lookup = |source: &str, name: &str| {
                            let v = resource_attribute(cons, rsc, source, name, None);
                            if v.is_none()
                                && cfg.nodes.iter().any(|nd| {
                                    resource_attribute(cons, rsc, source, name, Some(nd)).is_some()
                                })
                            {
                                varies.set(true);
                            }
                            v
                        };
                        let mut own = Vec::new();
                        for r in children(n, "rule") {
                            if let Some(rule) = read_rule(ctx, r, Some(&lookup))? {
                                own.push(rule);
                            }
                        }
                        if varies.get() {
                            own.clear();
                            for nd in &cfg.nodes {
                                let on_node = |source: &str, name: &str| {
                                    resource_attribute(cons, rsc, source, name, Some(nd))
                                };
                                for r in children(n, "rule") {
                                    if let Some(rule) = read_rule(ctx, r, Some(&on_node))? {
                                        own.push(Rule {
                                            score: rule.score,
                                            score_attribute: rule.score_attribute.clone(),
                                            boolean_op: BoolOp::And,
                                            role: rule.role,
                                            expressions: vec![Expr {
                                                attribute: "#uname".into(),
                                                operation: ExprOp::Eq,
                                                value: Some(nd.name.clone()),
                                                value_type: None,
                                            }],
                                            rules: vec![Rule {
                                                score: None,
                                                score_attribute: None,
                                                role: None,
                                                ..rule
                                            }],
                                        });
                                    }
                                }
                            }
                        }
                        rules_of.push(own);
                    }
                    rules = rules_of.iter().flatten().cloned().collect();
                }
                let node = n.attribute("node").map(str::to_string);
                let score = parse_score(ctx, n, "score")?;
                let role = n.attribute("role").and_then(Role::parse);
                if node.is_none() && rules.is_empty() {
                    if child(n, "rule").is_none() {
                        ctx.skip(n, "a location without node or rule; left out");
                    }
                    continue;
                }
                let score = if node.is_some() {
                    Some(score.unwrap_or(Score::ZERO))
                } else {
                    None
                };
                for (k, rsc) in rscs.iter().enumerate() {
                    // No rule of it can hold for this resource.
                    if per_rsc && node.is_none() && rules_of.get(k).is_none_or(|r| r.is_empty()) {
                        continue;
                    }
                    let cid = if k == 0 {
                        id.clone()
                    } else {
                        format!("{id}-{k}")
                    };
                    cfg.constraints.location.push(Location {
                        id: cid,
                        rsc: rsc.clone(),
                        node: node.clone(),
                        score,
                        role,
                        rules: if node.is_some() {
                            Vec::new()
                        } else if per_rsc {
                            rules_of.get(k).cloned().unwrap_or_default()
                        } else {
                            rules.clone()
                        },
                    });
                }
            }
            "rsc_colocation" => {
                if n.attribute("influence").is_some() {
                    ctx.skip(n, "the `influence` attribute is not supported; ignored");
                }
                let Some(score) = parse_score(ctx, n, "score")? else {
                    ctx.skip(n, "a colocation without a score; left out");
                    continue;
                };
                cfg.constraints.colocation.push(Colocation {
                    id,
                    rsc: n.attribute("rsc").map(str::to_string),
                    with: n.attribute("with-rsc").map(str::to_string),
                    score,
                    rsc_role: n.attribute("rsc-role").and_then(Role::parse),
                    with_role: n.attribute("with-rsc-role").and_then(Role::parse),
                    node_attribute: n
                        .attribute("node-attribute")
                        .filter(|a| *a != "#uname")
                        .map(str::to_string),
                    sets: read_sets(ctx, n, true),
                });
            }
            "rsc_order" => {
                let score = parse_score(ctx, n, "score")?;
                let kind = match n.attribute("kind") {
                    Some("Optional") => OrderKind::Optional,
                    Some("Serialize") => OrderKind::Serialize,
                    Some("Mandatory") => OrderKind::Mandatory,
                    Some(k) => return Err(ctx.invalid(n, format!("kind: unknown `{k}`"))),
                    None if score == Some(Score::ZERO) => OrderKind::Optional,
                    None => OrderKind::Mandatory,
                };
                cfg.constraints.order.push(Order {
                    id,
                    first: n.attribute("first").map(str::to_string),
                    then: n.attribute("then").map(str::to_string),
                    first_action: n.attribute("first-action").and_then(Action::parse),
                    then_action: n.attribute("then-action").and_then(Action::parse),
                    kind,
                    symmetrical: n.attribute("symmetrical").and_then(parse_bool),
                    require_all: n.attribute("require-all").and_then(parse_bool),
                    sets: read_sets(ctx, n, false),
                });
            }
            "rsc_ticket" => ctx.skip(n, "tickets are not supported"),
            _ => ctx.skip(n, "unknown constraint kind"),
        }
    }
    Ok(())
}

/// Remove constraints that name resources the configuration does not have (Pacemaker
/// ignores them too), reporting each.
fn drop_dangling(ctx: &mut Ctx<'_>, cfg: &mut Config) {
    let known: std::collections::HashSet<String> =
        cfg.id_index().keys().map(|s| s.to_string()).collect();
    let nodes: std::collections::HashSet<String> =
        cfg.nodes.iter().map(|n| n.name.clone()).collect();
    let mut report = |el: &str, id: &str, why: String| {
        ctx.unsupported.push(Unsupported {
            element: el.into(),
            id: id.into(),
            reason: why,
        });
    };
    cfg.constraints.location.retain(|l| {
        if !known.contains(&l.rsc) {
            report(
                "rsc_location",
                &l.id,
                format!("names unknown resource `{}`; left out", l.rsc),
            );
            return false;
        }
        if let Some(n) = &l.node
            && !nodes.contains(n)
        {
            report(
                "rsc_location",
                &l.id,
                format!("names unknown node `{n}`; left out"),
            );
            return false;
        }
        true
    });
    let ok_set = |sets: &mut Vec<ResourceSet>| {
        for s in sets.iter_mut() {
            s.resources.retain(|r| known.contains(r));
        }
        sets.retain(|s| !s.resources.is_empty());
    };
    let mut dropped = Vec::new();
    cfg.constraints.colocation.retain_mut(|c| {
        ok_set(&mut c.sets);
        let ok = match (&c.rsc, &c.with) {
            (Some(a), Some(b)) => known.contains(a) && known.contains(b) && a != b,
            (None, None) => !c.sets.is_empty(),
            _ => false,
        };
        if !ok {
            dropped.push(("rsc_colocation", c.id.clone()));
        }
        ok
    });
    cfg.constraints.order.retain_mut(|o| {
        ok_set(&mut o.sets);
        let ok = match (&o.first, &o.then) {
            (Some(a), Some(b)) => known.contains(a) && known.contains(b) && a != b,
            (None, None) => !o.sets.is_empty(),
            _ => false,
        };
        if !ok {
            dropped.push(("rsc_order", o.id.clone()));
        }
        ok
    });
    for (el, id) in dropped {
        report(el, &id, "names an unknown resource; left out".into());
    }
    cfg.fencing.levels.retain(|l| nodes.contains(&l.node));
}

fn read_config(ctx: &mut Ctx<'_>, conf: XNode<'_, '_>) -> Result<Config, CibError> {
    let mut cfg = Config::default();
    if let Some(crm) = child(conf, "crm_config") {
        for (k, v) in nvpairs(ctx, crm, "cluster_property_set") {
            let o = &mut cfg.options;
            let bad = || CibError::Invalid {
                source_name: ctx.source.to_string(),
                element: "nvpair".into(),
                id: k.clone(),
                reason: format!("bad value `{v}`"),
            };
            match k.as_str() {
                "stonith-enabled" | "fencing-enabled" => {
                    o.stonith_enabled = parse_bool(&v).ok_or_else(bad)?
                }
                "symmetric-cluster" => o.symmetric_cluster = parse_bool(&v).ok_or_else(bad)?,
                "maintenance-mode" => o.maintenance_mode = parse_bool(&v).ok_or_else(bad)?,
                "stop-all-resources" => o.stop_all_resources = parse_bool(&v).ok_or_else(bad)?,
                "stop-orphan-resources" | "stop-removed-resources" => {
                    o.stop_orphan_resources = parse_bool(&v).ok_or_else(bad)?
                }
                "startup-fencing" => o.startup_fencing = parse_bool(&v).ok_or_else(bad)?,
                "start-failure-is-fatal" => {
                    o.start_failure_is_fatal = parse_bool(&v).ok_or_else(bad)?
                }
                "default-resource-stickiness" => {
                    o.resource_stickiness = v.parse().map_err(|_| bad())?
                }
                "no-quorum-policy" => {
                    o.no_quorum_policy = match v.as_str() {
                        "stop" => NoQuorumPolicy::Stop,
                        "freeze" => NoQuorumPolicy::Freeze,
                        "ignore" => NoQuorumPolicy::Ignore,
                        "suicide" | "fence" => NoQuorumPolicy::Suicide,
                        "demote" => NoQuorumPolicy::Demote,
                        _ => return Err(bad()),
                    }
                }
                "node-health-strategy" => {
                    o.node_health_strategy = match v.as_str() {
                        "none" => HealthStrategy::None,
                        "migrate-on-red" => HealthStrategy::MigrateOnRed,
                        "only-green" => HealthStrategy::OnlyGreen,
                        "progressive" => HealthStrategy::Progressive,
                        "custom" => HealthStrategy::Custom,
                        _ => return Err(bad()),
                    }
                }
                "node-health-red" => o.node_health_red = Some(v.parse().map_err(|_| bad())?),
                "node-health-yellow" => o.node_health_yellow = Some(v.parse().map_err(|_| bad())?),
                "node-health-green" => o.node_health_green = Some(v.parse().map_err(|_| bad())?),
                "placement-strategy" => {
                    o.placement_strategy = match v.as_str() {
                        "default" => PlacementStrategy::Default,
                        "utilization" => PlacementStrategy::Utilization,
                        "minimal" => PlacementStrategy::Minimal,
                        "balanced" => PlacementStrategy::Balanced,
                        _ => return Err(bad()),
                    }
                }
                _ if INFORMATIONAL_OPTIONS.contains(&k.as_str()) => {}
                _ => ctx.unsupported.push(Unsupported {
                    element: "cluster_property_set".into(),
                    id: k.clone(),
                    reason: format!("cluster option `{k}` is not supported; ignored"),
                }),
            }
        }
    }
    if let Some(nodes) = child(conf, "nodes") {
        for n in children(nodes, "node") {
            let Some(name) = n.attribute("uname") else {
                ctx.skip(n, "a node without uname; left out");
                continue;
            };
            if n.attribute("type")
                .is_some_and(|t| t != "member" && t != "normal")
            {
                ctx.skip(n, "remote and ping nodes are not supported");
                continue;
            }
            let mut node = Node {
                name: name.to_string(),
                id: n.attribute("id").map(str::to_string),
                ..Default::default()
            };
            for (k, v) in nvpairs(ctx, n, "instance_attributes") {
                match k.as_str() {
                    "standby" => node.standby = parse_bool(&v).unwrap_or(false),
                    "maintenance" => node.maintenance = parse_bool(&v).unwrap_or(false),
                    _ => {
                        node.attributes.insert(k, v);
                    }
                }
            }
            node.utilization = read_utilization(ctx, n)?;
            cfg.nodes.push(node);
        }
    }
    if let Some(rd) = child(conf, "rsc_defaults") {
        let (meta, _) = read_meta(ctx, rd, &[])?;
        cfg.options.resource_defaults = meta;
        if let Some(s) = cfg.options.resource_defaults.resource_stickiness.take() {
            cfg.options.resource_stickiness = s;
        }
    }
    if let Some(od) = child(conf, "op_defaults") {
        for (k, _) in nvpairs(ctx, od, "meta_attributes") {
            if k != "timeout" && k != "record-pending" {
                ctx.unsupported.push(Unsupported {
                    element: "op_defaults".into(),
                    id: k.clone(),
                    reason: format!("operation default `{k}` is not supported; ignored"),
                });
            }
        }
    }
    if let Some(res) = child(conf, "resources") {
        read_resources(ctx, res, &mut cfg)?;
    }
    // Resource defaults that apply only to agents of one kind (a rule of
    // `rsc_expression`s) are written into the matching primitives.
    if let Some(rd) = child(conf, "rsc_defaults") {
        for block in children(rd, "meta_attributes") {
            let Some(rule) = child(block, "rule") else {
                continue;
            };
            let exprs: Vec<_> = rule.children().filter(|c| c.is_element()).collect();
            if exprs.is_empty()
                || exprs
                    .iter()
                    .any(|e| e.tag_name().name() != "rsc_expression")
            {
                continue;
            }
            let any = rule.attribute("boolean-op") == Some("or");
            let mut meta = Meta::default();
            for nv in children(block, "nvpair") {
                let (Some(k), Some(v)) = (nv.attribute("name"), nv.attribute("value")) else {
                    continue;
                };
                if apply_meta(&mut meta, k, v) != Some(true) {
                    ctx.skip(
                        nv,
                        "not a meta attribute Haven applies from defaults; left out",
                    );
                }
            }
            for p in &mut cfg.resources {
                let hit = |e: &XNode<'_, '_>| {
                    e.attribute("class").is_none_or(|c| c == p.class)
                        && e.attribute("provider")
                            .is_none_or(|v| Some(v) == p.provider.as_deref())
                        && e.attribute("type").is_none_or(|t| t == p.agent)
                };
                let matched = if any {
                    exprs.iter().any(hit)
                } else {
                    exprs.iter().all(hit)
                };
                if matched {
                    p.meta = p.meta.inherit(&meta);
                }
            }
        }
    }
    if let Some(cons) = child(conf, "constraints") {
        read_constraints(ctx, cons, &mut cfg)?;
    }
    if let Some(ft) = child(conf, "fencing-topology") {
        for l in children(ft, "fencing-level") {
            let (Some(target), Some(idx), Some(devs)) = (
                l.attribute("target"),
                l.attribute("index"),
                l.attribute("devices"),
            ) else {
                ctx.skip(
                    l,
                    "only fencing levels with target, index and devices are supported",
                );
                continue;
            };
            let index = idx
                .parse()
                .map_err(|_| ctx.invalid(l, format!("index: `{idx}` is not a number")))?;
            cfg.fencing.levels.push(FenceLevel {
                node: target.to_string(),
                index,
                devices: devs.split(',').map(|d| d.trim().to_string()).collect(),
            });
        }
    }
    for other in conf.children().filter(|c| c.is_element()) {
        if matches!(other.tag_name().name(), "tags" | "acls" | "alerts") {
            ctx.skip(other, "not part of Haven's configuration; left out");
        }
    }
    drop_dangling(ctx, &mut cfg);
    Ok(cfg)
}

const INFORMATIONAL_OPTIONS: &[&str] = &[
    "dc-version",
    "cluster-infrastructure",
    "cluster-name",
    "last-lrm-refresh",
    "have-watchdog",
    "expected-quorum-votes",
    "cluster-recheck-interval",
    "stonith-timeout",
    "dc-deadtime",
    "election-timeout",
    "shutdown-escalation",
    "pe-error-series-max",
    "pe-warn-series-max",
    "pe-input-series-max",
    "batch-limit",
    "stonith-action",
    "no_quorum_policy",
    "stop-orphan-actions",
    "cancel-removed-actions",
    "cluster-delay",
    "remove-after-stop",
    "crmd-transition-delay",
    "node-health-strategy",
    "enable-startup-probes",
    "migration-limit",
    "concurrent-fencing",
    "priority-fencing-delay",
    "shutdown-lock",
    "node-pending-timeout",
    "shutdown-lock-limit",
];

/// One recorded operation.
#[derive(Clone)]
struct OpRec {
    call: i64,
    op: String,
    interval: u64,
    rc: i64,
    status: i64,
    expected: Option<i64>,
    migrate_source: Option<String>,
    migrate_target: Option<String>,
    last_rc_change: Option<i64>,
    graph: Option<i64>,
    uuid: Option<String>,
    digest: Option<String>,
    restart_digest: Option<String>,
    force_restart: Option<String>,
    secure_digest: Option<String>,
    secure_params: Option<String>,
    feature_set: Option<String>,
}

fn read_ops(r: XNode<'_, '_>) -> Vec<OpRec> {
    let mut ops: Vec<OpRec> = Vec::new();
    for o in children(r, "lrm_rsc_op") {
        let call = o
            .attribute("call-id")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1);
        let op = o.attribute("operation").unwrap_or("").to_string();
        let interval = o
            .attribute("interval")
            .and_then(parse_seconds_ms)
            .unwrap_or(0);
        let expected = o
            .attribute("transition-key")
            .and_then(|k| k.split(':').nth(2))
            .and_then(|v| v.parse().ok());
        let key: Vec<&str> = o
            .attribute("transition-key")
            .unwrap_or("")
            .split(':')
            .collect();
        let rec = OpRec {
            graph: key.get(1).and_then(|v| v.parse().ok()),
            uuid: key.get(3).map(|v| v.to_string()),
            call,
            interval,
            rc: o
                .attribute("rc-code")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            status: o
                .attribute("op-status")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            expected,
            migrate_source: o.attribute("migrate_source").map(str::to_string),
            migrate_target: o.attribute("migrate_target").map(str::to_string),
            last_rc_change: o.attribute("last-rc-change").and_then(|v| v.parse().ok()),
            op,
            digest: o.attribute("op-digest").map(str::to_string),
            restart_digest: o.attribute("op-restart-digest").map(str::to_string),
            force_restart: o.attribute("op-force-restart").map(str::to_string),
            secure_digest: o.attribute("op-secure-digest").map(str::to_string),
            secure_params: o.attribute("op-secure-params").map(str::to_string),
            feature_set: o.attribute("crm_feature_set").map(str::to_string),
        };
        // `*_last_failure_0` repeats an operation listed under the same call id; the
        // entry for a recurring monitor keeps its last success, so the failure wins.
        let is_failure_record = o
            .attribute("id")
            .is_some_and(|i| i.ends_with("_last_failure_0"));
        match ops.iter().position(|x| {
            x.call == rec.call && x.op == rec.op && x.interval == rec.interval && rec.call >= 0
        }) {
            Some(i) if is_failure_record => ops[i] = rec,
            Some(_) => {}
            None => ops.push(rec),
        }
    }
    // Completed operations are ordered by call id. A pending one (call id -1) has no
    // call id yet: it goes before the first completed operation of a later transition
    // of the same controller, else last.
    let (mut pending, mut done): (Vec<OpRec>, Vec<OpRec>) =
        ops.into_iter().partition(|o| o.call < 0);
    done.sort_by_key(|o| o.call);
    pending.sort_by_key(|o| o.graph.unwrap_or(i64::MAX));
    for p in pending {
        let at = done
            .iter()
            .position(|d| {
                d.uuid.is_some()
                    && d.uuid == p.uuid
                    && matches!((d.graph, p.graph), (Some(dg), Some(pg)) if dg > pg && pg >= 0)
            })
            .unwrap_or(done.len());
        done.insert(at, p);
    }
    done
}

/// Intervals in the status section are milliseconds.
fn parse_seconds_ms(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok().map(|ms| ms / 1000)
}

/// Replay a resource's operation history on one node.
fn replay(ops: &[OpRec], node: &str) -> ResourceStatus {
    let mut st = ResourceStatus::default();
    for o in ops {
        if o.status == 1 || o.op == "notify" || o.op == "meta-data" {
            continue; // cancelled or informational
        }
        let pending = o.status == -1 || o.call < 0;
        let probe = o.op == "monitor" && o.interval == 0;
        // "Degraded" results count as running (190) and running promoted (191).
        let rc = match o.rc {
            190 => 0,
            191 => 8,
            rc => rc,
        };
        let o = &OpRec { rc, ..o.clone() };
        // An "error" status whose rc is what was expected was remapped to success by
        // older controllers.
        let ok = (o.status == 0 || o.status == 4 && o.expected == Some(o.rc))
            && match o.rc {
                // A monitor of the stopped role that finds it running is a failure.
                0 => !(o.op == "monitor" && o.interval > 0 && o.expected == Some(7)),
                7 => probe || o.op == "stop" || o.expected == Some(7),
                8 => probe || o.op == "monitor" || o.op == "promote",
                _ => false,
            };
        if pending {
            match o.op.as_str() {
                "start" | "migrate_from" => st.role = Role::Started,
                "promote" => st.role = Role::Promoted,
                _ => {}
            }
            continue;
        }
        // "Not installed" (by the agent, or the executor) is a hard error here; found by
        // a probe, it also says the resource is not running here. Invalid parameters
        // and insufficient privileges are hard errors too.
        let missing = !ok && (o.rc == 5 || o.status == 7);
        if missing && probe {
            st.hard_error = true;
            st.role = Role::Stopped;
            continue;
        }
        if !ok {
            st.failed = true;
            if missing || matches!(o.rc, 2 | 4) {
                st.hard_error = true;
            }
            st.failed_op = Some(format!("{}:{}", o.op, o.interval));
            st.last_failure = o.last_rc_change.or(st.last_failure);
            match o.op.as_str() {
                // A failed live migration may have left it running on the target too.
                "migrate_to" => {
                    if let Some(t) = &o.migrate_target {
                        st.migration = Some(Migration {
                            source: node.to_string(),
                            target: t.clone(),
                            completed: false,
                        });
                    }
                    if st.role == Role::Stopped {
                        st.role = Role::Started;
                    }
                }
                "stop" => {
                    st.stop_failed = true;
                    if st.role == Role::Stopped {
                        st.role = Role::Started;
                    }
                }
                "monitor" if o.rc == 7 => {
                    // Found not running when it should be: it needs recovery, but it is
                    // not active any more.
                    if st.role == Role::Stopped {
                        st.role = Role::Started;
                    }
                }
                "promote" => st.role = Role::Promoted,
                // A failed demote leaves it needing recovery from the unpromoted role.
                "demote" => st.role = Role::Unpromoted,
                "start" => {
                    // A start the executor itself gave up on (timed out, could not
                    // run) bans the node; an agent's error result is recovered in place
                    // unless failcounts say otherwise.
                    st.start_failed = o.status != 0;
                    if st.role == Role::Stopped {
                        st.role = Role::Started;
                    }
                }
                _ => {
                    if st.role == Role::Stopped {
                        st.role = Role::Started;
                    }
                }
            }
            continue;
        }
        match o.op.as_str() {
            "start" => {
                st.role = Role::Started;
                st.failed = false;
                st.failed_op = None;
                st.start_failed = false;
                st.hard_error = false;
                st.migration = None;
            }
            "stop" => {
                st.role = Role::Stopped;
                st.failed = false;
                st.failed_op = None;
                st.start_failed = false;
                st.stop_failed = false;
                st.migration = None;
            }
            "promote" => st.role = Role::Promoted,
            "demote" => st.role = Role::Unpromoted,
            "monitor" => {
                if probe {
                    st.failed = false;
                }
                st.role = match o.rc {
                    7 => Role::Stopped,
                    8 => Role::Promoted,
                    _ if st.role == Role::Promoted && !probe => Role::Unpromoted,
                    _ if st.role == Role::Stopped || probe => Role::Started,
                    _ => st.role,
                };
            }
            "migrate_to" => {
                st.role = Role::Started;
                if let Some(t) = &o.migrate_target {
                    st.migration = Some(Migration {
                        source: node.to_string(),
                        target: t.clone(),
                        completed: false,
                    });
                }
            }
            "migrate_from" => {
                st.role = Role::Started;
                st.failed = false;
                if let Some(s) = &o.migrate_source {
                    st.migration = Some(Migration {
                        source: s.clone(),
                        target: node.to_string(),
                        completed: true,
                    });
                }
            }
            _ => {}
        }
    }
    st
}

/// MD5 (RFC 1321) as lowercase hex: Pacemaker records parameter digests with it. Used
/// to tell whether a running resource's definition changed, never for security.
fn md5_hex(data: &[u8]) -> String {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i: u32| ((f64::from(i + 1)).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());
    let (mut a0, mut b0, mut c0, mut d0) = (
        0x6745_2301u32,
        0xefcd_ab89u32,
        0x98ba_dcfeu32,
        0x1032_5476u32,
    );
    for chunk in msg.chunks_exact(64) {
        let m: Vec<u32> = chunk
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        a0 = a0.wrapping_add(a);
        b0 = b0.wrapping_add(b);
        c0 = c0.wrapping_add(c);
        d0 = d0.wrapping_add(d);
    }
    [a0, b0, c0, d0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Pacemaker's digest of a parameter set: the MD5 of the parameters written as one
/// XML element with sorted attributes, in the form its version-1 digests use.
fn params_digest(params: &BTreeMap<String, String>) -> String {
    let mut s = String::from(" <parameters");
    for (k, v) in params {
        // Names Pacemaker leaves out of every operation digest.
        if k.starts_with("CRM_meta_")
            || matches!(
                k.as_str(),
                "id" | "crm_feature_set"
                    | "op-digest"
                    | "on_node"
                    | "on_node_uuid"
                    | "pcmk_external_ip"
            )
        {
            continue;
        }
        s.push(' ');
        s.push_str(k);
        s.push_str("=\"");
        for ch in v.chars() {
            match ch {
                '&' => s.push_str("&amp;"),
                '<' => s.push_str("&lt;"),
                '>' => s.push_str("&gt;"),
                '"' => s.push_str("&quot;"),
                '\n' => s.push_str("&#10;"),
                '\r' => s.push_str("&#13;"),
                '\t' => s.push_str("&#9;"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push_str("/>\n");
    md5_hex(s.as_bytes())
}

/// The parameters of a primitive as its agent sees them: its own instance attributes,
/// then those of the group and clone around it (the nearest wins). Blocks with rules
/// are left out (they are not imported either); `#default` means unset.
fn agent_params(prim: XNode<'_, '_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut cur = Some(prim);
    while let Some(n) = cur {
        if !matches!(
            n.tag_name().name(),
            "primitive" | "group" | "clone" | "master"
        ) {
            break;
        }
        add_block_params(n, &mut out);
        cur = n.parent_element();
    }
    out
}

fn add_block_params(n: XNode<'_, '_>, out: &mut BTreeMap<String, String>) {
    for block in children(n, "instance_attributes") {
        if child(block, "rule").is_some() {
            continue;
        }
        for nv in children(block, "nvpair") {
            if let (Some(k), Some(v)) = (nv.attribute("name"), nv.attribute("value"))
                && v != "#default"
            {
                out.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
        }
    }
}

/// Whether a fence device parameter is one Pacemaker itself interprets (older
/// controllers left those out of the digests they recorded).
fn is_fencing_param(name: &str) -> bool {
    matches!(name, "provides" | "stonith-timeout") || name.starts_with("pcmk_")
}

fn version_at_least(v: &str, want: &[u64]) -> bool {
    let have: Vec<u64> = v
        .split('.')
        .map(|x| x.trim().parse().unwrap_or(0))
        .collect();
    have.as_slice() >= want
}

/// Has the definition of a resource changed since it was started on this node? The
/// operations from its last start on recorded digests of the parameters they ran
/// with; these are compared with the parameters configured now (as Pacemaker does).
/// A change only to parameters the agent reloads in place (it recorded which force a
/// restart) is a reload; anything else, or a change while the start is still pending,
/// is a restart. Digests that leave out secret parameters count when they match, since
/// CIBs collected for troubleshooting have their secrets masked.
fn definition_change(ops: &[OpRec], prim: XNode<'_, '_>) -> Option<DefinitionChange> {
    let ok = |o: &OpRec| o.status == 0 || o.status == -1;
    let mut start = None;
    let mut stop = None;
    for (i, o) in ops.iter().enumerate() {
        match o.op.as_str() {
            "start" | "migrate_from" => start = Some(i),
            "monitor" if o.interval == 0 && matches!(o.rc, 0 | 8) && ok(o) => start = Some(i),
            "stop" if o.rc == 0 && o.status == 0 => stop = Some(i),
            _ => {}
        }
    }
    let start = start?;
    if stop.is_some_and(|s| s > start) {
        return None;
    }
    let start_pending =
        ops[start].op == "start" && (ops[start].status == -1 || ops[start].call < 0);
    let base = agent_params(prim);
    let stonith = prim.attribute("class") == Some("stonith");
    let mut result: Option<DefinitionChange> = None;
    for o in &ops[start..] {
        let checked = matches!(o.op.as_str(), "start" | "promote" | "migrate_from")
            || o.op == "monitor" && o.interval == 0;
        if !checked {
            continue;
        }
        // Parameters configured for this very operation join the resource's.
        let mut op_params = BTreeMap::new();
        if let Some(opsn) = child(prim, "operations") {
            for c in children(opsn, "op") {
                let interval = c.attribute("interval").and_then(parse_seconds).unwrap_or(0);
                if c.attribute("name") == Some(o.op.as_str()) && interval == o.interval {
                    add_block_params(c, &mut op_params);
                }
            }
        }
        let mut all = base.clone();
        for (k, v) in &op_params {
            all.insert(k.clone(), v.clone());
        }
        let listed = |list: &str, k: &str| list.contains(&format!(" {k} "));
        let restart_mismatch = o.restart_digest.as_deref().is_some_and(|want| {
            let kept: BTreeMap<String, String> = all
                .iter()
                .filter(|(k, _)| o.force_restart.as_deref().is_none_or(|l| listed(l, k)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            params_digest(&kept) != want
        });
        let verdict = if restart_mismatch {
            Some(DefinitionChange::Restart)
        } else {
            match o.digest.as_deref() {
                Some(d) if d == params_digest(&all) => None,
                Some(_) if !op_params.is_empty() => Some(DefinitionChange::Restart),
                _ if o.restart_digest.is_some() => Some(DefinitionChange::Reload),
                _ => Some(DefinitionChange::Restart),
            }
        };
        let Some(mut verdict) = verdict else {
            continue;
        };
        if let Some(want) = &o.secure_digest {
            let secret = o.secure_params.as_deref().unwrap_or("");
            let old = !version_at_least(o.feature_set.as_deref().unwrap_or("0"), &[3, 16, 0]);
            let source = if old { &base } else { &all };
            let shown: BTreeMap<String, String> = source
                .iter()
                .filter(|(k, _)| !(listed(secret, k) || old && stonith && is_fencing_param(k)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if &params_digest(&shown) == want {
                continue;
            }
        }
        if start_pending {
            verdict = DefinitionChange::Restart;
        }
        if result != Some(DefinitionChange::Restart) {
            result = Some(verdict);
        }
    }
    result
}

/// (resource, node, time of an operation's last result).
type Stamp = (String, String, Option<i64>);

/// What a live migration that did not finish left behind. A failed `migrate_to` may
/// have left the resource running on the target too, unless the target has stopped it
/// since. A `migrate_to` that succeeded towards a node that is down now, with nothing
/// recorded there, failed: the resource needs recovery where it was.
fn settle_migrations(state: &mut State, stopped_last: &[Stamp], migrations_at: &[Stamp]) {
    let node_state = |n: &str| state.nodes.get(n).map(|x| x.state);
    let mut down_targets: Vec<(String, String)> = Vec::new();
    let mut stopped_targets: Vec<(String, String)> = Vec::new();
    for (rid, per_node) in &state.resources {
        for (node, st) in per_node {
            let Some(m) = &st.migration else { continue };
            if m.completed || m.source != *node {
                continue;
            }
            let target_known = per_node.contains_key(&m.target);
            let begun = migrations_at
                .iter()
                .find(|(r, n, _)| r == rid && n == node)
                .and_then(|x| x.2);
            // Stopped on the target after the migration was attempted (or when unknown).
            let stopped_since = stopped_last.iter().any(|(r, n, t)| {
                r == rid && *n == m.target && !matches!((t, begun), (Some(t), Some(b)) if t < &b)
            });
            if st.failed && stopped_since {
                stopped_targets.push((rid.clone(), node.clone()));
            } else if !st.failed
                && st.role != Role::Stopped
                && !target_known
                && node_state(&m.target) == Some(NodeState::Offline)
            {
                down_targets.push((rid.clone(), node.clone()));
            }
        }
    }
    for (rid, node) in stopped_targets {
        if let Some(st) = state.resources.get_mut(&rid).and_then(|p| p.get_mut(&node)) {
            st.migration = None;
        }
    }
    for (rid, node) in down_targets {
        if let Some(st) = state.resources.get_mut(&rid).and_then(|p| p.get_mut(&node)) {
            st.failed = true;
            st.failed_op = Some("migrate_to:0".into());
            st.migration = None;
        }
    }
}

/// Cluster options that decide how the status section reads.
#[derive(Clone, Copy)]
struct StatusOptions {
    /// A node never seen is unclean until fenced.
    startup_fencing: bool,
    /// `node-pending-timeout` in seconds.
    pending_timeout: Option<u64>,
    /// With `shutdown-lock`: its limit in seconds (0: none).
    lock_limit: Option<u64>,
}

fn read_status(
    ctx: &mut Ctx<'_>,
    status: XNode<'_, '_>,
    prim_xml: &HashMap<&str, XNode<'_, '_>>,
    cfg: &Config,
    state: &mut State,
    opts: &StatusOptions,
) {
    let StatusOptions {
        startup_fencing,
        pending_timeout,
        lock_limit,
    } = *opts;
    let fencing = cfg.options.stonith_enabled;
    // (resource, node, when) whose history ends with a successful stop, and of the
    // last live migration begun there.
    let mut stopped_last: Vec<Stamp> = Vec::new();
    let mut migrations_at: Vec<Stamp> = Vec::new();
    // (node, resource) in the order the history lists them.
    let mut histories: Vec<(String, String)> = Vec::new();
    for (seen, ns) in children(status, "node_state").enumerate() {
        // A node that never finished joining is recorded by id only.
        let by_id = || {
            let id = ns.attribute("id")?;
            cfg.nodes
                .iter()
                .find(|n| n.id.as_deref() == Some(id))
                .map(|n| n.name.as_str())
        };
        let Some(uname) = ns.attribute("uname").or_else(by_id) else {
            ctx.skip(ns, "node_state without uname; left out");
            continue;
        };
        let truthy = |a: &str| {
            ns.attribute(a).is_some_and(|v| {
                v == "true" || v == "online" || v.parse::<i64>().is_ok_and(|t| t > 0)
            })
        };
        let in_ccm = truthy("in_ccm");
        let crmd = truthy("crmd");
        let join = ns.attribute("join").unwrap_or("down");
        let expected = ns.attribute("expected").unwrap_or("down");
        let mut node = NodeStatus::default();
        let mut attrs = BTreeMap::new();
        if let Some(ta) = child(ns, "transient_attributes") {
            for (k, v) in nvpairs(ctx, ta, "instance_attributes") {
                attrs.insert(k, v);
            }
            for (k, v) in nvpairs(ctx, ta, "utilization") {
                match v.trim().parse::<i64>() {
                    Ok(x) => {
                        node.utilization.insert(k, x);
                    }
                    Err(_) => ctx.unsupported.push(Unsupported {
                        element: "utilization".into(),
                        id: format!("{uname}/{k}"),
                        reason: format!("`{v}` is not an integer; left out"),
                    }),
                }
            }
        }
        let shutdown = attrs
            .get("shutdown")
            .is_some_and(|v| v != "0" && v != "false")
            || ns.attribute("shutdown").is_some_and(|v| v != "0");
        node.shutdown = shutdown;
        // Cluster membership recorded as the time it began: a node that has been a
        // member that long without its controller joining is fenced when the
        // configured `node-pending-timeout` has passed.
        let pending_since = ns
            .attribute("in_ccm")
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|t| *t > 1);
        let pending_expired = !crmd
            && matches!(
                (pending_since, pending_timeout, state.now),
                (Some(since), Some(t), Some(now)) if t > 0 && since + t as i64 <= now
            );
        // The node asked to be fenced (the `terminate` attribute).
        let terminate = attrs
            .get("terminate")
            .is_some_and(|v| parse_bool(v) == Some(true) || v.parse::<i64>().is_ok_and(|t| t > 0));
        node.state = if fencing && terminate {
            node.unclean_reason = Some("fencing was requested".to_string());
            NodeState::Unclean
        } else if in_ccm && crmd && join == "member" {
            NodeState::Online
        } else if in_ccm && crmd {
            NodeState::Pending
        } else if fencing && pending_expired {
            node.unclean_reason =
                Some("peer pending timed out on joining the process group".to_string());
            NodeState::Unclean
        } else if !fencing
            || !in_ccm && (expected == "down" || join == "down" && !crmd && expected != "member")
            || in_ccm && !crmd && (expected == "down" || shutdown)
        {
            // Left cleanly, or (without fencing) simply taken as down.
            NodeState::Offline
        } else {
            node.unclean_reason = Some(if in_ccm {
                "peer process is no longer available".to_string()
            } else {
                "peer is no longer part of the cluster".to_string()
            });
            NodeState::Unclean
        };
        if let Some(v) = attrs.get("standby") {
            node.standby = parse_bool(v);
        }
        if let Some(v) = attrs.get("maintenance") {
            node.maintenance = parse_bool(v);
        }
        // Failcounts per resource, summed over operations.
        let mut fails: HashMap<String, (u32, Option<i64>)> = HashMap::new();
        // Failures of operations configured with `on-fail = ignore` never count.
        let ignored = |key: &str| {
            let Some((rsc, op)) = key.split_once('#') else {
                return false;
            };
            let Some((name, ms)) = op.rsplit_once('_') else {
                return false;
            };
            let base = rsc.rsplit_once(':').map_or(rsc, |(b, _)| b);
            let secs = ms.parse::<u64>().map(|m| m / 1000).ok();
            cfg.resources.iter().any(|p| {
                p.id == base
                    && p.ops.iter().any(|o| {
                        o.name == name
                            && Some(o.interval) == secs
                            && o.on_fail == Some(OnFail::Ignore)
                    })
            })
        };
        for (k, v) in &attrs {
            if k.strip_prefix("fail-count-")
                .or_else(|| k.strip_prefix("last-failure-"))
                .is_some_and(ignored)
            {
                continue;
            }
            if let Some(rest) = k.strip_prefix("fail-count-") {
                let rsc = rest.split('#').next().unwrap_or(rest).to_string();
                let n: u32 = v
                    .parse::<Score>()
                    .map(|s| s.value().clamp(0, INFINITY) as u32)
                    .unwrap_or(0);
                let e = fails.entry(rsc).or_default();
                e.0 = e.0.saturating_add(n).min(INFINITY as u32);
            } else if let Some(rest) = k.strip_prefix("last-failure-") {
                let rsc = rest.split('#').next().unwrap_or(rest).to_string();
                let t = v.parse::<i64>().ok();
                let e = fails.entry(rsc).or_default();
                e.1 = e.1.max(t);
            }
        }
        node.attributes = attrs
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with("fail-count-")
                    && !k.starts_with("last-failure-")
                    && k != "probe_complete"
                    && k != "shutdown"
                    && k != "standby"
                    && k != "maintenance"
            })
            .collect();
        if let Some(lrm) = child(ns, "lrm")
            && let Some(rs) = child(lrm, "lrm_resources")
        {
            for r in children(rs, "lrm_resource") {
                let Some(rid) = r.attribute("id") else {
                    continue;
                };
                histories.push((uname.to_string(), rid.to_string()));
                let ops = read_ops(r);
                let mut st = replay(&ops, uname);
                st.seen = u32::try_from(seen).unwrap_or(u32::MAX);
                if let Some(o) = ops
                    .iter()
                    .rev()
                    .find(|o| o.status != 1 && o.op != "notify")
                    .filter(|o| o.op == "stop" && o.rc == 0 && o.status == 0)
                {
                    stopped_last.push((rid.to_string(), uname.to_string(), o.last_rc_change));
                }
                if let Some(o) = ops.iter().rev().find(|o| o.op == "migrate_to") {
                    migrations_at.push((rid.to_string(), uname.to_string(), o.last_rc_change));
                }
                let base = rid
                    .rsplit_once(':')
                    .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
                    .map_or(rid, |(b, _)| b);
                if st.role != Role::Stopped
                    && let Some(p) = prim_xml.get(base)
                {
                    st.definition_changed = definition_change(&ops, *p);
                }
                // With `shutdown-lock`, what runs on a node shutting down (and what ran
                // on one that shut down, until the lock expires) stays with it. Fence
                // devices and clone instances are never locked.
                if let Some(limit) = lock_limit
                    && let Some(p) = prim_xml.get(base)
                    && p.attribute("class") != Some("stonith")
                    && !p
                        .ancestors()
                        .any(|a| matches!(a.tag_name().name(), "clone" | "master"))
                {
                    let locked_at = r
                        .attribute("shutdown-lock")
                        .and_then(|v| v.parse::<i64>().ok());
                    st.shutdown_locked = match locked_at {
                        Some(at) => {
                            limit == 0 || state.now.is_none_or(|now| at + limit as i64 > now)
                        }
                        None => shutdown && st.role != Role::Stopped,
                    };
                }
                st.probed = true;
                if let Some((n, t)) = fails.remove(rid) {
                    st.failcount = n;
                    st.last_failure = t.or(st.last_failure);
                }
                // A node may list the same resource in more than one history block;
                // each is read on its own, and one saying it is not running there does
                // not cancel another saying it is (as Pacemaker reads them).
                let on_node = state.resources.entry(rid.to_string()).or_default();
                match on_node.get(uname) {
                    Some(prev) if prev.role != Role::Stopped && st.role == Role::Stopped => {}
                    Some(prev) => {
                        if st.failcount == 0 {
                            st.failcount = prev.failcount;
                            st.last_failure = prev.last_failure.or(st.last_failure);
                        }
                        on_node.insert(uname.to_string(), st);
                    }
                    None => {
                        on_node.insert(uname.to_string(), st);
                    }
                }
            }
        }
        // Failcounts of resources with no history on this node still count.
        for (rid, (n, t)) in fails {
            let e = state
                .resources
                .entry(rid)
                .or_default()
                .entry(uname.to_string())
                .or_default();
            e.failcount = n;
            e.last_failure = t;
        }
        state.nodes.insert(uname.to_string(), node);
    }
    settle_migrations(state, &stopped_last, &migrations_at);
    // A node that left while its history says a managed resource still runs there
    // may still be running it: it is unclean until fenced.
    if fencing && !cfg.options.maintenance_mode {
        for (node, rid) in &histories {
            let Some(ns) = state.nodes.get(node) else {
                continue;
            };
            if ns.state != NodeState::Offline || ns.maintenance == Some(true) {
                continue;
            }
            let active = state
                .resources
                .get(rid)
                .and_then(|p| p.get(node))
                .is_some_and(|st| st.role != Role::Stopped);
            let base = rid
                .rsplit_once(':')
                .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
                .map_or(rid.as_str(), |(b, _)| b);
            let managed = cfg
                .resources
                .iter()
                .find(|p| p.id == base)
                .is_some_and(|p| p.meta.is_managed != Some(false));
            if active
                && managed
                && let Some(ns) = state.nodes.get_mut(node)
            {
                ns.state = NodeState::Unclean;
                ns.unclean_reason = Some(format!("{base} is thought to be active there"));
            }
        }
    }
    // A node never seen may be running anything: with startup fencing (the default)
    // it is unclean until fenced; without, it is taken as down.
    for n in &cfg.nodes {
        state.nodes.entry(n.name.clone()).or_insert_with(|| {
            if fencing && startup_fencing {
                NodeStatus {
                    state: NodeState::Unclean,
                    unclean_reason: Some("node is unclean".into()),
                    ..Default::default()
                }
            } else {
                NodeStatus::default()
            }
        });
    }
}

/// The value of a cluster option (the first set that names it).
fn crm_option<'a>(conf: XNode<'a, '_>, name: &str) -> Option<&'a str> {
    let crm = child(conf, "crm_config")?;
    children(crm, "cluster_property_set")
        .flat_map(|set| children(set, "nvpair"))
        .find(|nv| nv.attribute("name") == Some(name))
        .and_then(|nv| nv.attribute("value"))
}

/// Import a Pacemaker CIB; `source` names the file in errors.
pub fn import(source: &str, xml: &str) -> Result<Imported, CibError> {
    let doc = Document::parse(xml).map_err(|e| CibError::Xml {
        source_name: source.to_string(),
        message: e.to_string(),
    })?;
    let root = doc.root_element();
    let mut ctx = Ctx {
        source,
        unsupported: Vec::new(),
    };
    if root.tag_name().name() != "cib" {
        return Err(ctx.invalid(root, "the root element must be <cib>"));
    }
    let conf = child(root, "configuration")
        .ok_or_else(|| ctx.invalid(root, "no <configuration> section"))?;
    let mut config = read_config(&mut ctx, conf)?;
    let dc = root.attribute("dc-uuid");
    let startup_fencing = config.options.startup_fencing;
    let mut state = State {
        have_quorum: root
            .attribute("have-quorum")
            .and_then(parse_bool)
            .unwrap_or(true),
        quorum_lost: root
            .attribute("no-quorum-panic")
            .and_then(parse_bool)
            .unwrap_or(false),
        now: root
            .attribute("execution-date")
            .and_then(|v| v.parse().ok()),
        ..Default::default()
    };
    if let Some(status) = child(root, "status") {
        let prim_xml: HashMap<&str, XNode<'_, '_>> = conf
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == "primitive")
            .filter_map(|n| Some((n.attribute("id")?, n)))
            .collect();
        let pending_timeout = crm_option(conf, "node-pending-timeout").and_then(parse_seconds);
        // Some(limit in seconds, 0 = none) when resources are locked to nodes that shut
        // down cleanly.
        let lock_limit = crm_option(conf, "shutdown-lock")
            .and_then(parse_bool)
            .filter(|on| *on)
            .map(|_| {
                crm_option(conf, "shutdown-lock-limit")
                    .and_then(parse_seconds)
                    .unwrap_or(0)
            });
        read_status(
            &mut ctx,
            status,
            &prim_xml,
            &config,
            &mut state,
            &StatusOptions {
                startup_fencing,
                pending_timeout,
                lock_limit,
            },
        );
    }
    // Rules may test `#is_dc`; the DC is named by its node id.
    for n in &config.nodes {
        let is_dc = dc.is_some() && n.id.as_deref() == dc;
        if let Some(ns) = state.nodes.get_mut(&n.name) {
            ns.attributes.insert("#is_dc".into(), is_dc.to_string());
        }
    }
    // Nodes present only in the status section still exist.
    for name in state.nodes.keys() {
        if !config.nodes.iter().any(|n| &n.name == name) {
            config.nodes.push(Node {
                name: name.clone(),
                ..Default::default()
            });
        }
    }
    config.validate(source)?;
    Ok(Imported {
        config,
        state,
        unsupported: ctx.unsupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_patterns_match_like_regular_expressions() {
        let m = |p: &str, t: &str| Pattern::parse(p).is_some_and(|re| re.is_match(t));
        assert!(m("^rsc[0-9]$", "rsc1"));
        assert!(!m("^rsc[0-9]$", "rsc12"));
        assert!(!m("^rsc[0-9]$", "set-rsc1"));
        assert!(m("rsc", "set-rsc1"));
        assert!(m("meta-", "meta-rsc"));
        assert!(!m("meta-", "rsc"));
        assert!(m("^a.*z$", "abcz"));
        assert!(m("^ab+c?$", "abbb"));
        assert!(!m("^ab+c?$", "ac"));
        assert!(m("[^0-9]x", "ax"));
        assert!(!m("[^0-9]x", "1x"));
        assert!(m("a\\.b", "a.b"));
        assert!(!m("a\\.b", "axb"));
        // Groups and alternation are not supported: no pattern rather than a wrong one.
        assert!(Pattern::parse("(a|b)").is_none());
    }

    #[test]
    fn md5_matches_the_rfc_vectors() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        let long =
            b"12345678901234567890123456789012345678901234567890123456789012345678901234567890";
        assert_eq!(md5_hex(long), "57edf4a22be3c955ac49da2e2107b67a");
    }

    #[test]
    fn parameter_digests_are_pacemakers() {
        // Recorded by Pacemaker for a resource without parameters, and for a fence
        // device with four (the order of the attributes does not matter).
        assert_eq!(
            params_digest(&BTreeMap::new()),
            "f2317cad3d54cec5d7d7aa7d0bf35cf8"
        );
        let p: BTreeMap<String, String> = [
            ("pcmk_host_list", "fc16-builder,fc16-builder2,fc16-builder3"),
            ("pcmk_host_check", "static-list"),
            ("debug", "1"),
            ("action", "reboot"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(params_digest(&p), "7e3dbcf6815893c8d95c1b9fa1fd82ae");
    }

    #[test]
    fn durations_read_pacemakers_forms() {
        for (text, secs) in [
            ("10", 10),
            ("10s", 10),
            ("1500ms", 1),
            ("2min", 120),
            ("1h", 3600),
            ("PT10S", 10),
            ("P40S", 40),
            ("2000000us", 2),
        ] {
            assert_eq!(parse_seconds(text), Some(secs), "{text}");
        }
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(parse_seconds("10 parsecs"), None);
    }

    #[test]
    fn a_second_history_block_saying_stopped_does_not_cancel_a_running_one() {
        let xml = r#"<cib><configuration><crm_config/><nodes><node id="1" uname="n1"/></nodes>
<resources><primitive id="r" class="ocf" provider="heartbeat" type="Dummy"/></resources>
<constraints/></configuration><status>
<node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member">
<lrm id="1"><lrm_resources>
<lrm_resource id="r" class="ocf" provider="heartbeat" type="Dummy">
<lrm_rsc_op id="r_start_0" operation="start" call-id="1" rc-code="0" op-status="0" interval="0"/>
</lrm_resource>
<lrm_resource id="r" class="ocf" provider="heartbeat" type="Dummy">
<lrm_rsc_op id="r_monitor_0" operation="monitor" call-id="1" rc-code="7" op-status="0" interval="0"/>
</lrm_resource>
</lrm_resources></lrm></node_state></status></cib>"#;
        let imp = import("t.xml", xml).expect("imports");
        assert_eq!(imp.state.resources["r"]["n1"].role, Role::Started);
    }

    #[test]
    fn startup_fencing_is_imported_into_the_options() {
        let xml = |v: &str| {
            format!(
                r#"<cib><configuration><crm_config><cluster_property_set id="c">
<nvpair id="sf" name="startup-fencing" value="{v}"/></cluster_property_set></crm_config>
<nodes><node id="1" uname="n1"/></nodes><resources/><constraints/></configuration></cib>"#
            )
        };
        let off = import("t.xml", &xml("false")).expect("imports");
        assert!(!off.config.options.startup_fencing);
        assert!(off.unsupported.iter().all(|u| u.id != "startup-fencing"));
        assert!(
            import("t.xml", &xml("true"))
                .expect("imports")
                .config
                .options
                .startup_fencing
        );
        let Err(err) = import("t.xml", &xml("maybe")) else {
            panic!("a malformed startup-fencing is refused");
        };
        let err = err.to_string();
        assert!(err.contains("startup-fencing"), "{err}");
    }

    fn cib(params: &str, digest: &str, extra: &str) -> String {
        format!(
            r#"<cib><configuration><crm_config/><nodes><node id="1" uname="n1"/></nodes>
<resources><primitive id="r" class="ocf" provider="heartbeat" type="Dummy">
<instance_attributes id="ia">{params}</instance_attributes></primitive></resources>
<constraints/></configuration><status>
<node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member">
<lrm id="1"><lrm_resources><lrm_resource id="r" class="ocf" provider="heartbeat" type="Dummy">
<lrm_rsc_op id="r_last_0" operation="start" call-id="3" rc-code="0" op-status="0" interval="0"
 op-digest="{digest}" {extra}/>
</lrm_resource></lrm_resources></lrm></node_state></status></cib>"#
        )
    }

    fn changed(xml: &str) -> Option<DefinitionChange> {
        let imp = import("t.xml", xml).expect("imports");
        imp.state.resources["r"]["n1"].definition_changed
    }

    #[test]
    fn a_changed_parameter_restarts_or_reloads() {
        let one = r#"<nvpair id="a" name="fake" value="1"/>"#;
        let two = r#"<nvpair id="a" name="fake" value="2"/>"#;
        let mut p = BTreeMap::new();
        p.insert("fake".to_string(), "1".to_string());
        let d = params_digest(&p);
        assert_eq!(changed(&cib(one, &d, "")), None);
        assert_eq!(changed(&cib(two, &d, "")), Some(DefinitionChange::Restart));
        // The agent listed `state` as the only parameter needing a restart: `fake`
        // is reloaded in place.
        let restart = params_digest(&BTreeMap::new());
        let reloadable = format!(r#"op-force-restart=" state " op-restart-digest="{restart}""#);
        assert_eq!(
            changed(&cib(two, &d, &reloadable)),
            Some(DefinitionChange::Reload)
        );
    }
    #[test]
    fn pattern_locations_compare_with_each_resources_own_parameter() {
        let xml = r#"<cib><configuration><crm_config/><nodes><node id="1" uname="n1"/></nodes>
<resources>
<primitive id="rsc1" class="ocf" provider="heartbeat" type="Dummy">
<instance_attributes id="i1"><nvpair id="f1" name="fake" value="300"/></instance_attributes></primitive>
<primitive id="rsc2" class="ocf" provider="heartbeat" type="Dummy">
<instance_attributes id="i2"><nvpair id="f2" name="fake" value="400"/></instance_attributes></primitive>
<primitive id="other" class="ocf" provider="heartbeat" type="Dummy"/>
</resources>
<constraints><rsc_location id="l" rsc-pattern="^rsc[0-9]$"><rule id="r" score="INFINITY">
<expression id="e" attribute="fake" operation="gt" value="fake" value-source="param"/>
</rule></rsc_location></constraints></configuration><status/></cib>"#;
        let imp = import("t.xml", xml).expect("imports");
        let values: Vec<(String, Option<String>)> = imp
            .config
            .constraints
            .location
            .iter()
            .map(|l| (l.rsc.clone(), l.rules[0].expressions[0].value.clone()))
            .collect();
        assert_eq!(
            values,
            vec![
                ("rsc1".to_string(), Some("300".to_string())),
                ("rsc2".to_string(), Some("400".to_string())),
            ]
        );
    }
    #[test]
    fn a_parameter_set_per_node_gives_a_rule_per_node() {
        let xml = r##"<cib><configuration><crm_config/><nodes>
<node id="1" uname="n1"/><node id="2" uname="n2"/></nodes>
<resources><primitive id="r" class="ocf" provider="heartbeat" type="Dummy">
<instance_attributes id="i1" score="10"><nvpair id="f1" name="fake" value="100"/></instance_attributes>
<instance_attributes id="i2" score="20"><rule id="ir" score="INFINITY">
<expression id="ie" attribute="#uname" operation="eq" value="n2"/></rule>
<nvpair id="f2" name="fake" value="200"/></instance_attributes>
</primitive></resources>
<constraints><rsc_location id="l" rsc="r"><rule id="lr" score="INFINITY">
<expression id="e" attribute="fake" operation="eq" value="fake" value-source="param"/>
</rule></rsc_location></constraints></configuration><status/></cib>"##;
        let imp = import("t.xml", xml).expect("imports");
        let rules = &imp.config.constraints.location[0].rules;
        let per_node: Vec<(Option<String>, Option<String>)> = rules
            .iter()
            .map(|r| {
                (
                    r.expressions[0].value.clone(),
                    r.rules[0].expressions[0].value.clone(),
                )
            })
            .collect();
        assert_eq!(
            per_node,
            vec![
                (Some("n1".to_string()), Some("100".to_string())),
                (Some("n2".to_string()), Some("200".to_string())),
            ]
        );
    }
    #[test]
    fn a_node_gone_with_a_resource_still_running_is_unclean() {
        let xml = |op: &str| {
            format!(
                r#"<cib><configuration><crm_config/><nodes><node id="1" uname="n1"/></nodes>
<resources><primitive id="r" class="ocf" provider="heartbeat" type="Dummy"/></resources>
<constraints/></configuration><status>
<node_state id="1" uname="n1" in_ccm="false" crmd="offline" join="down" expected="down">
<lrm id="1"><lrm_resources><lrm_resource id="r" class="ocf" provider="heartbeat" type="Dummy">
<lrm_rsc_op id="r_last_0" operation="{op}" call-id="3" rc-code="0" op-status="0" interval="0"/>
</lrm_resource></lrm_resources></lrm></node_state></status></cib>"#
            )
        };
        let running = import("t.xml", &xml("start")).expect("imports");
        let n1 = &running.state.nodes["n1"];
        assert_eq!(n1.state, NodeState::Unclean);
        assert_eq!(
            n1.unclean_reason.as_deref(),
            Some("r is thought to be active there")
        );
        let stopped = import("t.xml", &xml("stop")).expect("imports");
        assert_eq!(stopped.state.nodes["n1"].state, NodeState::Offline);
    }
    #[test]
    fn a_node_asking_to_be_fenced_is_unclean() {
        let xml = r#"<cib><configuration><crm_config/><nodes><node id="1" uname="n1"/></nodes>
<resources/><constraints/></configuration><status>
<node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member">
<transient_attributes id="1"><instance_attributes id="s1">
<nvpair id="t" name="terminate" value="1"/></instance_attributes></transient_attributes>
</node_state></status></cib>"#;
        let imp = import("t.xml", xml).expect("imports");
        let n1 = &imp.state.nodes["n1"];
        assert_eq!(n1.state, NodeState::Unclean);
        assert_eq!(n1.unclean_reason.as_deref(), Some("fencing was requested"));
    }
}
