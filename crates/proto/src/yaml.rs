//! YAML read the same way everywhere (action catalogs, workflow
//! definitions, the agent's config), with one error format for people:
//! `FILE: line L, column C: message` — the file's name, never the
//! parser's `<input>`, and the message in the user's words, without the
//! parser's advice to its programmers.

use serde::de::DeserializeOwned;
use serde_saphyr::{MessageFormatter, UserMessageFormatter};

/// A document that could not be read: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {}{message}", position(*.line, *.column))]
pub struct YamlError {
    /// The file (or other source) named in the message.
    pub source_name: String,
    /// 1-based; `None` when the parser could not say.
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

fn position(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

/// Parses `text` (named `source` in errors) into a `T`. Duplicate keys,
/// unknown fields (for types that deny them) and wrong types are errors.
/// Booleans are YAML 1.2's `true` and `false` only: YAML 1.1's `y`, `no`,
/// `on` … stay text, so a sandbox named `y` or a label `no` is not read as
/// a boolean where the type is open (a tagged sandbox profile).
pub fn from_str<T: DeserializeOwned>(text: &str, source: &str) -> Result<T, YamlError> {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| error(&e, source))
}

/// The error `e` of a document named `source`, in the one format.
pub fn error(e: &serde_saphyr::Error, source: &str) -> YamlError {
    let location = e.location();
    let message = UserMessageFormatter.format_message(e.without_snippet());
    // The formatter's text is not sanitized: a key holding an escape
    // sequence must not act on a terminal.
    let message: String = message
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_debug().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    let known = location.filter(|l| l.line() > 0);
    YamlError {
        source_name: source.to_owned(),
        line: known.map(|l| l.line()),
        column: known.map(|l| l.column()).filter(|c| *c > 0),
        message: message.trim().trim_end_matches('.').to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        count: u32,
    }

    #[test]
    fn errors_name_the_file_line_and_column_in_plain_words() {
        let cases = [
            (
                "name: a\nname: b\n",
                "catalog.yaml: line 2, column 1: ",
                "duplicate",
            ),
            (
                "name: a\ncolour: red\n",
                "catalog.yaml: line 2, column 1: ",
                "unknown field `colour`",
            ),
            (
                "name: a\ncount: many\n",
                "catalog.yaml: line 2, column 8: ",
                "u32",
            ),
            ("name: [a\n", "catalog.yaml: line ", ""),
        ];
        for (text, start, contains) in cases {
            let e = from_str::<Doc>(text, "catalog.yaml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(start), "{text:?}: {e}");
            assert!(e.contains(contains), "{text:?}: {e}");
            for leak in ["<input>", "DuplicateKeyPolicy", "Options", "error:"] {
                assert!(!e.contains(leak), "{text:?}: {e}");
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(tag = "type", rename_all = "lowercase")]
    enum Tagged {
        Named { name: String, on: bool },
    }

    #[test]
    fn only_true_and_false_are_booleans() {
        // YAML 1.1's `y` stays a name even where the type is open.
        let t: Tagged = from_str("type: named\nname: y\non: true\n", "f").unwrap();
        assert_eq!(
            t,
            Tagged::Named {
                name: "y".into(),
                on: true
            }
        );
        let e = from_str::<Tagged>("type: named\nname: n\non: yes\n", "f").unwrap_err();
        assert!(
            e.to_string().contains("string \"yes\", expected a boolean"),
            "{e}"
        );
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        let e = from_str::<Doc>("name: a\n\"x\\e[2J\": 1\n", "f.yaml").unwrap_err();
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
    }
}
