//! Re-rendering an edited configuration without losing the operator's formatting.
//!
//! `haven node standby` or `haven resource move` change one field of a configuration an
//! operator wrote by hand, with comments. Rendering the edited [`Config`] from scratch would
//! drop every comment and reorder the file. Instead the old and new configurations are
//! both rendered the same way, compared, and only the parts that differ are written into
//! the operator's document; everything else — comments, key order, inline or standard
//! tables — stays as it was.
//!
//! The result is checked by parsing it back: if it does not read as exactly the new
//! configuration (a shape this merge did not foresee), the plain rendering is returned
//! instead, so an edit is never lost or altered, only, at worst, reformatted.

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

use crate::config::{Config, ConfigError};

/// `new`, rendered into `original`'s text (which parses as `old`) keeping its comments
/// and layout wherever the two configurations agree.
pub fn render_preserving(
    original: &str,
    old: &Config,
    new: &Config,
) -> Result<String, ConfigError> {
    let plain = new.to_toml()?;
    let merged = merge(original, &old.to_toml()?, &plain);
    match merged {
        Some(text) if Config::from_toml("merged", &text).is_ok_and(|c| c == *new) => Ok(text),
        _ => Ok(plain),
    }
}

fn merge(original: &str, old_rendered: &str, new_rendered: &str) -> Option<String> {
    let mut doc: DocumentMut = original.parse().ok()?;
    let a: DocumentMut = old_rendered.parse().ok()?;
    let b: DocumentMut = new_rendered.parse().ok()?;
    let mut root = Item::Table(doc.as_table().clone());
    apply(
        &mut root,
        &Item::Table(a.as_table().clone()),
        &Item::Table(b.as_table().clone()),
        false,
    )?;
    *doc.as_table_mut() = root.into_table().ok()?;
    Some(doc.to_string())
}

/// Text of an item without its surrounding whitespace and comments, for comparing two
/// renderings made by the same serializer.
fn text(item: &Item) -> String {
    match item.clone().into_value() {
        Ok(mut v) => {
            v.decor_mut().clear();
            v.to_string()
        }
        Err(other) => other.to_string(),
    }
}

/// Makes `orig` (which reads as `a`) read as `b`, touching only what differs.
///
/// Inside an element of an array of tables, new keys are written inline: a new
/// `[resources.meta]` header would land at the end of the file, far from its element.
fn apply(orig: &mut Item, a: &Item, b: &Item, in_element: bool) -> Option<()> {
    if text(a) == text(b) {
        return Some(());
    }
    if let (Some(ta), Some(tb)) = (a.as_table_like(), b.as_table_like()) {
        let inline = orig.is_inline_table() || in_element;
        let reformat = orig.is_inline_table();
        let to = orig.as_table_like_mut()?;
        for (key, ib) in tb.iter() {
            if ta.get(key).is_some_and(|ia| text(ia) == text(ib)) {
                continue;
            }
            match (ta.get(key), to.get_mut(key)) {
                (Some(ia), Some(io)) => apply(io, ia, ib, in_element)?,
                _ => {
                    to.insert(key, shaped(ib.clone(), inline)?);
                }
            }
        }
        let gone: Vec<String> = ta
            .iter()
            .filter(|(k, _)| !tb.contains_key(k))
            .map(|(k, _)| k.to_string())
            .collect();
        for key in gone {
            to.remove(&key);
        }
        if reformat {
            to.fmt();
        }
        return Some(());
    }
    if let (Some(la), Some(lb), Some(lo)) = (elements(a), elements(b), elements(orig))
        && la.len() == lo.len()
        && la.iter().chain(&lb).all(|i| i.as_table_like().is_some())
    {
        let ka = identities(&la);
        let kb = identities(&lb);
        let mut out = Vec::with_capacity(lb.len());
        for (k, ib) in lb.iter().enumerate() {
            let j = match (&ka, &kb) {
                (Some(ka), Some(kb)) => ka.iter().position(|x| *x == kb[k]),
                _ => (k < la.len()).then_some(k),
            };
            match j {
                Some(j) => {
                    let mut io = lo[j].clone();
                    apply(&mut io, &la[j], ib, true)?;
                    out.push(io);
                }
                None => out.push(shaped(ib.clone(), in_element)?),
            }
        }
        *orig = rebuild(orig, out)?;
        return Some(());
    }
    let mut value = b.clone();
    if let (Some(old), Some(new)) = (orig.as_value(), value.as_value_mut()) {
        *new.decor_mut() = old.decor().clone();
    }
    *orig = if orig.is_value() {
        Item::Value(value.into_value().ok()?)
    } else {
        value
    };
    Some(())
}

/// An item as it may be written inside an inline table (values only) or a standard one.
fn shaped(item: Item, inline: bool) -> Option<Item> {
    if inline {
        item.into_value().ok().map(Item::Value)
    } else {
        Some(item)
    }
}

/// The elements of an array of tables, written either as `[[x]]` or as `x = [{..}]`.
fn elements(item: &Item) -> Option<Vec<Item>> {
    match item {
        Item::ArrayOfTables(aot) => Some(aot.iter().cloned().map(Item::Table).collect()),
        Item::Value(Value::Array(arr)) => Some(arr.iter().cloned().map(Item::Value).collect()),
        _ => None,
    }
}

/// Rebuilds `orig`'s array in its own notation from `items`.
fn rebuild(orig: &Item, items: Vec<Item>) -> Option<Item> {
    match orig {
        Item::ArrayOfTables(_) => {
            let mut aot = ArrayOfTables::new();
            for item in items {
                let table: Table = match item {
                    Item::Table(t) => t,
                    Item::Value(Value::InlineTable(t)) => t.into_table(),
                    _ => return None,
                };
                aot.push(table);
            }
            Some(Item::ArrayOfTables(aot))
        }
        Item::Value(Value::Array(old)) => {
            let mut arr = toml_edit::Array::new();
            for item in items {
                arr.push_formatted(item.into_value().ok()?);
            }
            arr.set_trailing(old.trailing().clone());
            arr.set_trailing_comma(old.trailing_comma());
            let mut v = Value::Array(arr);
            *v.decor_mut() = old.decor().clone();
            Some(Item::Value(v))
        }
        _ => None,
    }
}

/// The key naming each element (`id`, else `name`), when every element has a distinct
/// one; otherwise elements are matched by position.
fn identities(items: &[Item]) -> Option<Vec<String>> {
    for key in ["id", "name"] {
        let ids: Option<Vec<String>> = items
            .iter()
            .map(|i| i.as_table_like()?.get(key)?.as_str().map(str::to_string))
            .collect();
        if let Some(ids) = ids {
            let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
            if distinct.len() == ids.len() {
                return Some(ids);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HAND_WRITTEN: &str = r#"# The production cluster. Ask ops before changing fencing.
[options]
stonith-enabled = true # never turn this off
resource-stickiness = 100

# rack A
[[nodes]]
name = "n1"

# rack B
[[nodes]]
name = "n2"
attributes = { rack = "b" } # the spare

[[resources]]
id = "web"
class = "process"
type = "web"
params = { command = "sleep 1000" } # stands in for the web server

# the database must not move lightly
[[resources]]
id = "db"
class = "process"
type = "db"
params = { command = "sleep 1000" }
meta = { resource-stickiness = 1000 }

[[constraints.location]]
id = "web-likes-n1" # keep
rsc = "web"
node = "n1"
score = "100"
"#;

    fn edited(edit: impl FnOnce(&mut Config)) -> (String, Config) {
        let old = Config::from_toml("t", HAND_WRITTEN).unwrap();
        let mut new = old.clone();
        edit(&mut new);
        let text = render_preserving(HAND_WRITTEN, &old, &new).unwrap();
        assert_eq!(Config::from_toml("t", &text).unwrap(), new, "{text}");
        (text, new)
    }

    fn comments(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.find('#').map(|i| l[i..].trim()))
            .collect()
    }

    #[test]
    fn standby_keeps_every_comment_and_the_layout() {
        let (text, _) = edited(|c| c.nodes[1].standby = true);
        assert_eq!(comments(&text), comments(HAND_WRITTEN), "{text}");
        assert!(text.contains("standby = true"), "{text}");
        assert!(text.contains("attributes = { rack = \"b\" }"), "{text}");
        let changed: Vec<_> = text
            .lines()
            .filter(|l| !HAND_WRITTEN.lines().any(|o| o == *l))
            .collect();
        assert_eq!(changed, ["standby = true"], "{text}");
    }

    #[test]
    fn adding_and_removing_constraints_keeps_the_others() {
        let (text, new) = edited(|c| {
            c.constraints.location.push(crate::Location {
                id: "cli-prefer-db".into(),
                rsc: "db".into(),
                node: Some("n2".into()),
                score: Some(crate::Score::INFINITY),
                ..crate::Location::default()
            })
        });
        assert_eq!(comments(&text), comments(HAND_WRITTEN), "{text}");
        assert!(text.contains("cli-prefer-db"));
        let old = new.clone();
        let mut back = new;
        back.constraints
            .location
            .retain(|l| l.id != "cli-prefer-db");
        let again = render_preserving(&text, &old, &back).unwrap();
        assert_eq!(Config::from_toml("t", &again).unwrap(), back);
        assert_eq!(comments(&again), comments(HAND_WRITTEN), "{again}");
        assert!(!again.contains("cli-prefer-db"), "{again}");
    }

    #[test]
    fn changing_an_inline_table_field_keeps_its_comment() {
        let (text, _) = edited(|c| {
            c.resources[1].meta.target_role = Some(crate::Role::Stopped);
            c.resources[0].meta.target_role = Some(crate::Role::Stopped);
        });
        assert_eq!(comments(&text), comments(HAND_WRITTEN), "{text}");
        assert_eq!(text.matches("Stopped").count(), 2, "{text}");
    }

    #[test]
    fn removing_a_resource_keeps_the_comments_of_the_rest() {
        let (text, _) = edited(|c| {
            c.resources.retain(|r| r.id != "web");
            c.constraints.location.clear();
        });
        assert!(
            text.contains("# the database must not move lightly"),
            "{text}"
        );
        assert!(text.contains("# rack B"), "{text}");
        assert!(!text.contains("stands in for the web server"), "{text}");
    }

    #[test]
    fn an_unparseable_original_falls_back_to_the_plain_rendering() {
        let old = Config::from_toml("t", HAND_WRITTEN).unwrap();
        let mut new = old.clone();
        new.nodes[0].standby = true;
        let text = render_preserving("not [ toml", &old, &new).unwrap();
        assert_eq!(text, new.to_toml().unwrap());
    }
}
