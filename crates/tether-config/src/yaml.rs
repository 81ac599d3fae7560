//! YAML text -> a tree of nodes that remember where they were written.
//!
//! Built from `saphyr-parser` events so that every later (semantic) error can point at the exact
//! line and column of the offending key or value. Duplicate mapping keys and aliases are
//! rejected here; everything else about meaning is left to `convert`.

use std::borrow::Cow;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle};

/// Deepest nesting accepted; Tether's schema needs 6, this only guards the recursion in
/// `convert` and in `Drop` against hostile input.
const MAX_DEPTH: usize = 64;

/// The value of `key:` written with nothing after it.
const EMPTY: Value = Value::Scalar {
    text: String::new(),
    plain: true,
};

/// A 1-based line and column in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Mark {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Mark {
    fn from(m: Marker) -> Self {
        Mark {
            line: m.line().max(1),
            column: m.col() + 1,
        }
    }
}

/// One value of the document and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub mark: Mark,
    pub value: Value,
}

/// The shape of a node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `plain` is false for quoted and block scalars, which are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One `key: value` pair of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub key_mark: Mark,
    pub value: Node,
}

/// A problem found while reading the YAML structure itself.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub mark: Mark,
    /// Field path of the place being read, `""` for the document root.
    pub path: String,
    pub message: String,
}

impl Node {
    /// True for `~`, `null`, and an empty plain value (`key:` with nothing after it).
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }
}

/// Parses one YAML document. `Ok(None)` means the text holds no value at all.
///
/// Syntax errors stop the parse (the parser cannot resync); duplicate keys and aliases are
/// collected so that all of them are reported at once.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, Vec<Problem>> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    while let Some(next) = parser.next_event() {
        match next {
            Ok((event, span)) => {
                if let Err(fatal) = builder.event(event, span.start.into()) {
                    builder.problems.push(fatal);
                    break;
                }
            }
            Err(e) => {
                let mark = Mark::from(*e.marker());
                let path = builder.path();
                builder.problems.push(Problem {
                    mark,
                    path,
                    message: format!("YAML syntax error: {}", e.info()),
                });
                break;
            }
        }
    }
    if builder.problems.is_empty() {
        Ok(builder.root.filter(|n| !n.is_null()))
    } else {
        Err(builder.problems)
    }
}

/// A container being filled, innermost last.
#[derive(Debug)]
enum Frame {
    Seq {
        mark: Mark,
        items: Vec<Node>,
    },
    Map {
        mark: Mark,
        entries: Vec<Entry>,
        /// The key read, waiting for its value; `keep` is false for keys already reported
        /// (duplicate or not a string), whose value is then dropped.
        key: Option<(String, Mark, bool)>,
    },
}

#[derive(Debug, Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
    problems: Vec<Problem>,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, mark: Mark) -> Result<(), Problem> {
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(self.problem(mark, "only one YAML document is allowed per file"));
                }
            }
            Event::Scalar(text, style, _, _) => {
                let plain = style == ScalarStyle::Plain;
                let text = Cow::into_owned(text);
                self.complete(Node {
                    mark,
                    value: Value::Scalar { text, plain },
                });
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(self.problem(mark, "nesting is too deep"));
                }
                self.stack.push(match event {
                    Event::SequenceStart(..) => Frame::Seq {
                        mark,
                        items: Vec::new(),
                    },
                    _ => Frame::Map {
                        mark,
                        entries: Vec::new(),
                        key: None,
                    },
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq { mark, items }) => Node {
                        mark,
                        value: Value::Seq(items),
                    },
                    Some(Frame::Map { mark, entries, .. }) => Node {
                        mark,
                        value: Value::Map(entries),
                    },
                    None => return Ok(()),
                };
                self.complete(node);
            }
            Event::Alias(_) => {
                let problem = self.problem(
                    mark,
                    "aliases (`*name`) are not supported; repeat the value",
                );
                self.problems.push(problem);
                // A placeholder keeps the surrounding structure consistent.
                self.complete(Node {
                    mark,
                    value: Value::Scalar {
                        text: String::new(),
                        plain: true,
                    },
                });
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }

    /// Hands a finished node to its parent (or makes it the root).
    fn complete(&mut self, node: Node) {
        let problem = match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                None
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                None
            }
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                Some((name, key_mark, keep)) => {
                    let mut value = node;
                    if value.value == EMPTY {
                        // `key:` with no value: point errors about it at the key.
                        value.mark = key_mark;
                    }
                    if keep {
                        entries.push(Entry {
                            key: name,
                            key_mark,
                            value,
                        });
                    }
                    None
                }
                None => match node.value {
                    Value::Scalar { text, .. } => {
                        let first = entries.iter().find(|e| e.key == text).map(|e| e.key_mark);
                        *key = Some((text.clone(), node.mark, first.is_none()));
                        first.map(|first| {
                            (
                                node.mark,
                                format!(
                                    "duplicate key `{text}` (first defined at line {})",
                                    first.line
                                ),
                            )
                        })
                    }
                    _ => {
                        *key = Some((String::new(), node.mark, false));
                        Some((node.mark, "mapping keys must be plain strings".to_string()))
                    }
                },
            },
        };
        if let Some((mark, message)) = problem {
            let problem = self.problem(mark, message);
            self.problems.push(problem);
        }
    }

    fn problem(&self, mark: Mark, message: impl Into<String>) -> Problem {
        Problem {
            mark,
            path: self.path(),
            message: message.into(),
        }
    }

    /// The field path of the place the parser is at, e.g. `routes[1].sticky`.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Seq { items, .. } => path.push_str(&format!("[{}]", items.len())),
                Frame::Map { key, .. } => {
                    if let Some((name, _, _)) = key {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(name);
                    }
                }
            }
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        parse(text).unwrap().unwrap()
    }

    #[test]
    fn keys_and_values_carry_one_based_positions() {
        let node = root("a: 1\nb:\n  - x\n  - { y: z }\n");
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].key_mark, Mark { line: 1, column: 1 });
        assert_eq!(entries[0].value.mark, Mark { line: 1, column: 4 });
        assert_eq!(entries[1].key_mark, Mark { line: 2, column: 1 });
        let Value::Seq(items) = &entries[1].value.value else {
            panic!("not a seq")
        };
        assert_eq!(items[0].mark, Mark { line: 3, column: 5 });
        assert_eq!(items[1].mark, Mark { line: 4, column: 5 });
    }

    #[test]
    fn a_duplicate_key_is_reported_at_its_second_occurrence() {
        let problems = parse("a:\n  b: 1\n  b: 2\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].mark, Mark { line: 3, column: 3 });
        assert_eq!(problems[0].path, "a.b");
        assert_eq!(
            problems[0].message,
            "duplicate key `b` (first defined at line 2)"
        );
    }

    #[test]
    fn a_syntax_error_names_the_enclosing_field() {
        let problems = parse("a:\n  b: [1, 2\n").unwrap_err();
        assert_eq!(problems[0].path, "a.b[2]");
        assert!(
            problems[0].message.starts_with("YAML syntax error: "),
            "{problems:?}"
        );
    }

    #[test]
    fn comments_only_is_an_empty_document() {
        assert_eq!(parse("# nothing here\n").unwrap(), None);
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("---\n").unwrap(), None);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing() {
        let block: String = (0..100).map(|depth| format!("{:depth$}k:\n", "")).collect();
        assert_eq!(parse(&block).unwrap_err()[0].message, "nesting is too deep");
        // Flow nesting is cut off by the parser itself.
        assert!(parse(&"[".repeat(100_000)).is_err());
    }

    #[test]
    fn aliases_are_refused() {
        let problems = parse("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!(problems[0].mark, Mark { line: 2, column: 4 });
        assert_eq!(problems[0].path, "b");
    }

    #[test]
    fn a_second_document_is_refused() {
        let problems = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(
            problems[0].message,
            "only one YAML document is allowed per file"
        );
        assert_eq!(problems[0].mark.line, 2);
    }
}
