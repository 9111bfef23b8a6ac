//! The field an API server rejection is about, found in its message and mapped back to
//! the line of the repository's file.
//!
//! The API server names fields in two notations: server-side apply's
//! (`.spec.template.spec.containers[name="web"].env[name="N"].value`, lists of maps
//! by their keys) and validation's (`spec.template.spec.containers[0].image`,
//! `metadata.labels[app]`). Both are read here and resolved against the object sent,
//! so that `[name="web"]` becomes the index of that element.

use serde_json::Value;

use crate::render::Segment;

/// One step of a path as the API server writes it.
#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
    /// `[name="web",protocol="TCP"]`: the element of a list with these key fields.
    Keyed(Vec<(String, String)>),
    /// `[="a"]`: the element of a set with this value.
    Value(String),
}

/// The first field path in `message` that exists in `object`, as segments of it.
pub(crate) fn field_in(message: &str, object: &Value) -> Option<Vec<Segment>> {
    let bytes = message.as_bytes();
    (0..message.len()).filter(|&i| message.is_char_boundary(i)).find_map(|start| {
        let starts_path = bytes[start] == b'.' || bytes[start].is_ascii_alphabetic();
        let after_break = start == 0 || matches!(bytes[start - 1], b' ' | b'\n' | b'[');
        if !(starts_path && after_break) {
            return None;
        }
        let steps = parse(&message[start..])?;
        resolve(&steps, object)
    })
}

/// The path at the start of `text`, ended by `": "`.
fn parse(text: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    let mut rest = text.strip_prefix('.').unwrap_or(text);
    let mut first = true;
    loop {
        if rest.starts_with(": ") {
            return (!steps.is_empty()).then_some(steps);
        }
        if let Some(inner) = rest.strip_prefix('[') {
            let (step, after) = bracket(inner)?;
            steps.push(step);
            rest = after;
        } else {
            if !first {
                rest = rest.strip_prefix('.')?;
            }
            let end = rest.find(['.', '[', ':', ' ', '\n', ',', ']', '"']).unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            steps.push(Step::Key(rest[..end].to_owned()));
            rest = &rest[end..];
        }
        first = false;
    }
}

/// A bracket's step (after its `[`), and the text after its `]`.
fn bracket(inner: &str) -> Option<(Step, &str)> {
    let mut pairs = Vec::new();
    let mut rest = inner;
    loop {
        let key_end = rest.find(['=', ']'])?;
        let key = &rest[..key_end];
        if rest.as_bytes()[key_end] == b']' {
            let step = match key.parse() {
                Ok(index) if pairs.is_empty() => Step::Index(index),
                _ if pairs.is_empty() => Step::Key(key.to_owned()),
                _ => return None,
            };
            return Some((step, &rest[key_end + 1..]));
        }
        let (value, after) = literal(&rest[key_end + 1..])?;
        pairs.push((key.to_owned(), value));
        match after.as_bytes().first() {
            Some(b',') => rest = &after[1..],
            Some(b']') if pairs.len() == 1 && pairs[0].0.is_empty() => {
                return Some((Step::Value(pairs.remove(0).1), &after[1..]));
            }
            Some(b']') => return Some((Step::Keyed(pairs), &after[1..])),
            _ => return None,
        }
    }
}

/// A quoted (Go `%q`) or bare value, as text, and what follows it.
fn literal(text: &str) -> Option<(String, &str)> {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text.find([',', ']'])?;
        return Some((text[..end].to_owned(), &text[end..]));
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &quoted[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// The steps as segments of `object`, if each exists there.
fn resolve(steps: &[Step], object: &Value) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut value = object;
    for step in steps {
        let (segment, next) = match step {
            Step::Key(key) => (Segment::Key(key.clone()), value.get(key)?),
            Step::Index(index) => (Segment::Index(*index), value.get(index)?),
            Step::Keyed(pairs) => {
                let elements = value.as_array()?;
                let index = elements.iter().position(|element| {
                    pairs.iter().all(|(key, wanted)| element.get(key).is_some_and(|v| same(v, wanted)))
                })?;
                (Segment::Index(index), &elements[index])
            }
            Step::Value(wanted) => {
                let elements = value.as_array()?;
                let index = elements.iter().position(|element| same(element, wanted))?;
                (Segment::Index(index), &elements[index])
            }
        };
        segments.push(segment);
        value = next;
    }
    Some(segments)
}

/// Whether a value is the one a message wrote as `text`.
fn same(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s == text,
        other => serde_json::from_str::<Value>(text).is_ok_and(|written| written == *other),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn keys(path: &[&str]) -> Vec<Segment> {
        path.iter()
            .map(|s| match s.parse() {
                Ok(i) => Segment::Index(i),
                Err(_) => Segment::Key((*s).to_owned()),
            })
            .collect()
    }

    #[test]
    fn server_side_apply_and_validation_paths_resolve_in_the_object() {
        let object = json!({
            "metadata": {"labels": {"app.kubernetes.io/name": "x"}},
            "spec": {"replicas": "3", "template": {"spec": {"containers": [
                {"name": "side", "image": "a"},
                {"name": "web", "env": [{"name": "N", "value": 4}], "ports": [{"containerPort": 80, "protocol": "TCP"}]},
            ]}}},
        });
        let field = |message: &str| field_in(message, &object);
        assert_eq!(
            field(
                "failed to create typed patch object (ns/typo; apps/v1, Kind=Deployment): .spec.replicas: expected numeric (int or float), got string"
            ),
            Some(keys(&["spec", "replicas"]))
        );
        assert_eq!(
            field(
                "failed to create typed patch object (x): errors:\n  .spec.template.spec.containers[name=\"web\"].env[name=\"N\"].value: expected string, got 4\n  .spec.replicas: expected numeric"
            ),
            Some(keys(&["spec", "template", "spec", "containers", "1", "env", "0", "value"]))
        );
        assert_eq!(
            field(
                ".spec.template.spec.containers[name=\"web\"].ports[containerPort=80,protocol=\"TCP\"]: duplicate entries"
            ),
            Some(keys(&["spec", "template", "spec", "containers", "1", "ports", "0"]))
        );
        assert_eq!(
            field(
                "Deployment.apps \"x\" is invalid: [spec.template.spec.containers[0].image: Required value, spec.selector: Required value]"
            ),
            Some(keys(&["spec", "template", "spec", "containers", "0", "image"]))
        );
        assert_eq!(
            field("Deployment.apps \"x\" is invalid: metadata.labels[app.kubernetes.io/name]: Invalid value: \"x\""),
            Some(keys(&["metadata", "labels", "app.kubernetes.io/name"]))
        );
        assert_eq!(field("ConfigMap \"big\" is invalid: []: Too long: may not be more than 1048576 bytes"), None);
        assert_eq!(field("error decoding from json: illegal base64 data at input byte 7"), None);
    }
}
