//! A file's text → JSON documents, decoded as `kubectl create -f FILE` decodes them.
//!
//! kubectl reads a file that starts with `{` as a stream of JSON values, and anything
//! else as YAML, cut into documents at each line that starts with `---`; each YAML
//! document becomes JSON through sigs.k8s.io/yaml (go-yaml v2). The same steps here:
//! 1. [`documents`] frames the text as kubectl does;
//! 2. granit-parser parses each document into events with source positions (YAML 1.2
//!    syntax, which for everything go-yaml accepts is the same as 1.1's);
//! 3. [`compose`] builds a tree of nodes, resolving scalars by go-yaml's YAML 1.1 rules
//!    ([`super::scalar`]) and refusing what libyaml refuses ([`super::libyaml`]);
//! 4. [`Converter`] makes the tree JSON as sigs.k8s.io/yaml does: aliases and `<<` merge
//!    keys expanded, keys made strings, numbers as Kubernetes reads them.
//!
//! Where kubectl silently picks one of two readings, the agent refuses instead: a key
//! given twice (kubectl keeps the last one), a key set before a `<<` merge that sets it
//! too (kubectl lets the merge win, the YAML spec the key), content after a `...`
//! document end (kubectl drops it). And where granit, following YAML 1.2, is stricter
//! than libyaml (a lone `-` before `,` `]` `}` in a flow collection, tabs indenting the
//! lines of a flow collection, the escape `\'`, a byte-order mark inside a document),
//! the agent refuses what kubectl reads.

use std::collections::HashMap;
use std::rc::Rc;

use granit_parser::{Event, Marker, Options, Parser, ScalarStyle, StructureStyle};
use serde_json::{Map, Value};

use super::libyaml;
use super::scalar::{self, Scalar, ScalarError};

/// One document: its root node's value and where it starts.
#[derive(Debug)]
pub(super) struct Document {
    /// The line (1-based, in the file) of the root node.
    pub line: usize,
    pub value: Value,
    /// The lines of the elements of the root's `items` sequence, which a `kind: List`
    /// document is expanded into.
    pub item_lines: Vec<usize>,
}

/// A problem in a file's text, and the line (1-based, in the file) where it is.
#[derive(Debug)]
pub(super) struct LineError {
    pub line: usize,
    pub error: DecodeError,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("a tab in indentation, or after `-`, `?` or `:`, which kubectl refuses: use spaces")]
    Tab,
    #[error("kubectl refuses the escape `{0}`: write the character itself")]
    Escape(String),
    #[error("invalid document separator {0:?}: only a comment may follow `---`")]
    Separator(String),
    #[error("content after the document end marker `...` (kubectl would ignore it): start a new document with `---`")]
    AfterDocumentEnd,
    #[error(transparent)]
    Scalar(#[from] ScalarError),
    #[error("a mapping or sequence cannot be a mapping key")]
    CollectionKey,
    #[error("duplicate key {key:?}, first set on line {first}")]
    DuplicateKey { key: String, first: usize },
    #[error(
        "key {key:?} is set on line {line} and again by this merge: kubectl would take the merged value, \
         the YAML spec the key; put `<<` before the keys"
    )]
    MergeOverridesKey { key: String, line: usize },
    #[error("a merge key `<<` takes a mapping or a sequence of mappings")]
    MergeValue,
    #[error("an alias refers to the node that contains it")]
    RecursiveAlias,
    #[error("the document expands to more than {MAX_VALUES} values (an alias bomb?)")]
    TooLarge,
}

/// More values than any object the API server can store (its 1.5 MiB request limit holds
/// fewer), so only a runaway alias expansion reaches it.
const MAX_VALUES: usize = 1_000_000;

/// Every document of a file, in order, each decoded or the problem that stopped it.
/// Empty documents (nothing but comments, or `null`) are skipped, as kubectl skips them.
pub(super) fn documents(text: &str) -> Vec<Result<Document, LineError>> {
    // kubectl reads files through a decoder that drops a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (dialect, frames) = if text.trim_start().starts_with('{') {
        (Dialect::Json, json_frames(text))
    } else {
        (Dialect::Yaml, yaml_frames(text))
    };
    frames
        .into_iter()
        .filter_map(|frame| frame.and_then(|(first_line, text)| document(text, first_line, dialect)).transpose())
        .collect()
}

/// How kubectl reads a file, which decides what it refuses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dialect {
    /// go-yaml v2, a port of libyaml.
    Yaml,
    /// Go's JSON decoder.
    Json,
}

/// A YAML stream cut as kubectl's YAMLReader cuts it: at each line that starts with
/// `---`, which may be followed by a comment only. Yields each document's first line
/// and text; documents are parsed apart, so a broken one does not hide the others.
fn yaml_frames(text: &str) -> Vec<Result<(usize, &str), LineError>> {
    let mut frames = Vec::new();
    let (mut start, mut first_line, mut offset) = (0, 1, 0);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if let Some(rest) = line.strip_prefix("---") {
            frames.push(Ok((first_line, &text[start..offset])));
            let rest = rest.trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                frames.push(Err(LineError { line: index + 1, error: DecodeError::Separator(rest.to_owned()) }));
            }
            (start, first_line) = (offset + line.len(), index + 2);
        }
        offset += line.len();
    }
    frames.push(Ok((first_line, &text[start..])));
    frames
}

/// A JSON stream (values one after another, as Go's json.Decoder reads it), framed and
/// checked by serde_json: the strict grammar kubectl applies to it, numbers beyond
/// float64 refused as Go refuses them. Each value is then decoded like a YAML document,
/// which JSON is, for its lines and the duplicate-key check.
fn json_frames(text: &str) -> Vec<Result<(usize, &str), LineError>> {
    let mut frames = Vec::new();
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut end = 0;
    loop {
        let start = end + (text[end..].len() - text[end..].trim_start().len());
        match values.next() {
            None => return frames,
            Some(Ok(_)) => {
                end = values.byte_offset();
                frames.push(Ok((line_at(text, start), &text[start..end])));
            }
            Some(Err(e)) => {
                frames.push(Err(LineError { line: e.line(), error: DecodeError::Json(e.to_string()) }));
                return frames;
            }
        }
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    1 + text[..offset].bytes().filter(|&b| b == b'\n').count()
}

/// One framed document, or `None` if it is empty.
fn document(text: &str, first_line: usize, dialect: Dialect) -> Result<Option<Document>, LineError> {
    let Some(root) = compose(text, first_line, dialect)? else { return Ok(None) };
    let value = Converter::default().value(&root)?;
    if value.is_null() {
        return Ok(None);
    }
    Ok(Some(Document { line: root.line, value, item_lines: item_lines(&root) }))
}

fn item_lines(root: &Node) -> Vec<usize> {
    let Content::Mapping(entries) = &root.content else { return Vec::new() };
    let items = entries.iter().rev().find(|(key, _)| is_key(key, "items"));
    match items.map(|(_, value)| &value.content) {
        Some(Content::Sequence(elements)) => elements.iter().map(|e| e.line).collect(),
        _ => Vec::new(),
    }
}

/// One step of a field path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// The line of the field at `path` in the object whose document (or `items` element)
/// starts on `object_line` of `text`: the line of its key, or of its element; the
/// deepest line found if the path goes on where the text does not (through a merge).
/// `None` if no object starts there. Errors are rare, so the text is decoded again
/// rather than every object carrying the lines of all its fields.
pub fn field_line(text: &str, object_line: usize, path: &[Segment]) -> Option<usize> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (dialect, frames) = if text.trim_start().starts_with('{') {
        (Dialect::Json, json_frames(text))
    } else {
        (Dialect::Yaml, yaml_frames(text))
    };
    let object = frames.into_iter().flatten().find_map(|(first_line, frame)| {
        let root = compose(frame, first_line, dialect).ok()??;
        if root.line == object_line {
            return Some(root);
        }
        let Content::Mapping(entries) = &root.content else { return None };
        let (_, items) = entries.iter().rev().find(|(key, _)| is_key(key, "items"))?;
        let Content::Sequence(elements) = &items.content else { return None };
        elements.iter().find(|element| element.line == object_line).cloned()
    })?;
    let (mut node, mut line) = (object, object_line);
    for segment in path {
        let next = match (&node.content, segment) {
            (Content::Mapping(entries), Segment::Key(wanted)) => {
                entries.iter().rev().find(|(key, _)| is_key(key, wanted)).map(|(key, value)| (key.line, value.clone()))
            }
            (Content::Sequence(elements), Segment::Index(index)) => {
                elements.get(*index).map(|element| (element.line, element.clone()))
            }
            _ => None,
        };
        let Some((at, value)) = next else { break };
        (line, node) = (at, value);
    }
    Some(line)
}

fn is_key(node: &Node, wanted: &str) -> bool {
    matches!(&node.content, Content::Scalar(scalar) if scalar.to_key().is_ok_and(|key| key == wanted))
}

/// A YAML node with its scalars resolved. Aliases share their anchor's node.
#[derive(Debug)]
struct Node {
    /// 1-based, in the file.
    line: usize,
    content: Content,
}

#[derive(Debug)]
enum Content {
    Scalar(Scalar),
    Sequence(Vec<Rc<Node>>),
    Mapping(Vec<(Rc<Node>, Rc<Node>)>),
}

/// A collection whose end event has not come yet.
struct Open {
    line: usize,
    anchor: usize,
    mapping: bool,
    /// Where a flow collection starts (`[` or `{`), as a byte offset.
    flow_start: Option<usize>,
    children: Vec<Rc<Node>>,
}

fn parser_options() -> Options {
    let mut options = Options::default();
    options.emit_comments = false;
    options
}

/// The root node of a document's text (which kubectl's framing leaves at most one
/// document in), or `None` if it holds none.
fn compose(text: &str, first_line: usize, dialect: Dialect) -> Result<Option<Rc<Node>>, LineError> {
    let file_line = |line: usize| first_line + line - 1;
    let offset = |marker: &Marker| marker.byte_offset().expect("a parser of a str knows byte offsets");
    let mut anchors: HashMap<usize, Rc<Node>> = HashMap::new();
    let mut open: Vec<Open> = Vec::new();
    let mut root = None;
    let mut in_document = false;
    // The source of scalars and flow collections, whose lines libyaml checks apart.
    let mut inside = Vec::new();
    for event in Parser::new_from_str_with_options(text, parser_options()) {
        let (event, span) = event.map_err(|e| LineError {
            line: file_line(e.marker().line()),
            error: DecodeError::Yaml(e.kind().to_string()),
        })?;
        let line = file_line(span.start.line());
        let at = |error: DecodeError| LineError { line, error };
        let (node, anchor) = match event {
            Event::DocumentStart(..) if in_document => return Err(at(DecodeError::AfterDocumentEnd)),
            Event::DocumentStart(..) => {
                in_document = true;
                continue;
            }
            Event::SequenceStart(style, anchor, _) | Event::MappingStart(style, anchor, _) => {
                let mapping = matches!(event, Event::MappingStart(..));
                let flow_start = (style == StructureStyle::Flow).then(|| offset(&span.start));
                open.push(Open { line, anchor, mapping, flow_start, children: Vec::new() });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let done = open.pop().expect("the parser balances start and end events");
                inside.extend(done.flow_start.map(|start| start..offset(&span.end)));
                let content = if done.mapping {
                    let mut children = done.children.into_iter();
                    Content::Mapping(std::iter::from_fn(|| Some((children.next()?, children.next()?))).collect())
                } else {
                    Content::Sequence(done.children)
                };
                (Rc::new(Node { line: done.line, content }), done.anchor)
            }
            Event::Scalar(value, style, anchor, tag) => {
                let source = offset(&span.start)..offset(&span.end);
                if dialect == Dialect::Yaml && style == ScalarStyle::DoubleQuoted {
                    libyaml::check_escapes(&text[source.clone()]).map_err(at)?;
                }
                inside.push(source);
                let tag = tag.map(|tag| format!("{}{}", tag.handle(), tag.suffix()));
                let scalar =
                    scalar::resolve(&value, style == ScalarStyle::Plain, tag.as_deref()).map_err(|e| at(e.into()))?;
                (Rc::new(Node { line, content: Content::Scalar(scalar) }), anchor)
            }
            // The parser only names anchors defined before; one still open contains the alias.
            Event::Alias(id) => (anchors.get(&id).cloned().ok_or_else(|| at(DecodeError::RecursiveAlias))?, 0),
            _ => continue, // stream start and end, document end: no data
        };
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match open.last_mut() {
            Some(parent) => parent.children.push(node),
            None => root = Some(node),
        }
    }
    if dialect == Dialect::Yaml {
        libyaml::check_tabs(text, &inside)
            .map_err(|index| LineError { line: first_line + index, error: DecodeError::Tab })?;
    }
    Ok(root)
}

/// Makes a node tree JSON, counting values to stop alias bombs.
#[derive(Default)]
struct Converter {
    values: usize,
}

impl Converter {
    fn value(&mut self, node: &Node) -> Result<Value, LineError> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(LineError { line: node.line, error: DecodeError::TooLarge });
        }
        match &node.content {
            Content::Scalar(scalar) => scalar.to_json().map_err(|e| LineError { line: node.line, error: e.into() }),
            Content::Sequence(elements) => {
                elements.iter().map(|e| self.value(e)).collect::<Result<_, _>>().map(Value::Array)
            }
            Content::Mapping(entries) => self.mapping(entries).map(Value::Object),
        }
    }

    /// go-yaml v2 fills a mapping entry by entry, a `<<` merge included, each overwriting
    /// what came before; the checks refuse the cases where that order matters.
    fn mapping(&mut self, entries: &[(Rc<Node>, Rc<Node>)]) -> Result<Map<String, Value>, LineError> {
        let mut map = Map::new();
        // The line where each key was set by the mapping itself (not by a merge).
        let mut own_keys: HashMap<String, usize> = HashMap::new();
        let mut merge_line = None;
        for (key, value) in entries {
            let at = |error: DecodeError| LineError { line: key.line, error };
            let key_text = match &key.content {
                Content::Scalar(Scalar::MergeKey) => {
                    if let Some(first) = merge_line.replace(key.line) {
                        return Err(at(DecodeError::DuplicateKey { key: "<<".to_owned(), first }));
                    }
                    for (merged_key, merged_value) in self.merged(value)? {
                        if let Some(&line) = own_keys.get(&merged_key) {
                            return Err(at(DecodeError::MergeOverridesKey { key: merged_key, line }));
                        }
                        map.insert(merged_key, merged_value);
                    }
                    continue;
                }
                Content::Scalar(scalar) => scalar.to_key().map_err(|e| at(e.into()))?,
                Content::Sequence(_) | Content::Mapping(_) => return Err(at(DecodeError::CollectionKey)),
            };
            if let Some(&first) = own_keys.get(&key_text) {
                return Err(at(DecodeError::DuplicateKey { key: key_text, first }));
            }
            map.insert(key_text.clone(), self.value(value)?);
            own_keys.insert(key_text, key.line);
        }
        Ok(map)
    }

    /// The entries a `<<` merge key brings: a mapping's, or those of a sequence of
    /// mappings where the earlier ones win.
    fn merged(&mut self, value: &Node) -> Result<Map<String, Value>, LineError> {
        let not_a_mapping = |node: &Node| LineError { line: node.line, error: DecodeError::MergeValue };
        match &value.content {
            Content::Mapping(entries) => self.mapping(entries),
            Content::Sequence(sources) => {
                let mut merged = Map::new();
                for source in sources.iter().rev() {
                    let Content::Mapping(entries) = &source.content else { return Err(not_a_mapping(source)) };
                    merged.extend(self.mapping(entries)?);
                }
                Ok(merged)
            }
            Content::Scalar(_) => Err(not_a_mapping(value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn decode(text: &str) -> Vec<Value> {
        documents(text)
            .into_iter()
            .map(|d| d.unwrap_or_else(|e| panic!("line {}: {}", e.line, e.error)).value)
            .collect()
    }

    fn error(text: &str) -> (usize, String) {
        let e = documents(text).into_iter().find_map(Result::err).expect("an error");
        (e.line, e.error.to_string())
    }

    #[test]
    fn frames_like_kubectl() {
        let text = "a: 1\n--- # comment\n# nothing\n---\n~\n---\nb: 2\n...\n";
        assert_eq!(decode(text), [json!({"a": 1}), json!({"b": 2})]);
        let lines: Vec<usize> = documents(text).into_iter().map(|d| d.unwrap().line).collect();
        assert_eq!(lines, [1, 7]);
        assert_eq!(error("a: 1\n--- !!map\nb: 2\n").0, 2);
        assert_eq!(error("a: 1\n...\nb: 2\n"), (3, DecodeError::AfterDocumentEnd.to_string()));
    }

    #[test]
    fn json_streams_are_framed_and_strict() {
        assert_eq!(decode("{\"a\": 1.0}\n\n {\"b\": [true]}"), [json!({"a": 1}), json!({"b": [true]})]);
        assert_eq!(documents("{}\n{\"b\": 1}").into_iter().map(|d| d.unwrap().line).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(error("{\"a\": 1}\n{\"a\": yes}").0, 2);
        assert_eq!(error("{\"a\": 1e400}").0, 1);
    }

    #[test]
    fn aliases_and_merges() {
        let text = "base: &b {k: 1, j: 1}\ncopy: *b\nover:\n  <<: *b\n  k: 2\nmany:\n  <<: [{k: 3}, *b]\n";
        assert_eq!(
            decode(text),
            [
                json!({"base": {"k": 1, "j": 1}, "copy": {"k": 1, "j": 1}, "over": {"k": 2, "j": 1}, "many": {"k": 3, "j": 1}})
            ]
        );
        assert_eq!(error("b: &b {k: 1}\nc:\n  k: 2\n  <<: *b\n").0, 4);
        assert_eq!(error("a: &a [*a]\n"), (1, DecodeError::RecursiveAlias.to_string()));
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
        assert_eq!(error(bomb).1, DecodeError::TooLarge.to_string());
    }

    #[test]
    fn duplicate_keys_are_refused_even_when_only_json_makes_them_equal() {
        assert_eq!(error("a: 1\nb: 2\na: 3\n").1, "duplicate key \"a\", first set on line 1");
        assert_eq!(error("x:\n  1: a\n  \"1\": b\n").0, 3);
    }
}
