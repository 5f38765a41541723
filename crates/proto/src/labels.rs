//! Label and group syntax, checked the same way by server, agent and CLI.

use std::collections::BTreeMap;

/// Agent labels: a sorted map so that output and hashing are stable.
pub type Labels = BTreeMap<String, String>;

/// A label key, value or group name that breaks the syntax rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key '{0}' is invalid: use 1-63 characters from a-z A-Z 0-9 . _ - /, starting with a letter or digit")]
    Key(String),
    #[error("label '{key}' has an invalid value '{value}': use at most 63 characters from a-z A-Z 0-9 . _ -")]
    Value { key: String, value: String },
    #[error("group name '{0}' is invalid: use 1-63 characters from a-z A-Z 0-9 . _ -, starting with a letter or digit")]
    Group(String),
    #[error("'{0}' is not a label: write it as key=value")]
    Pair(String),
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn starts_alnum(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Checks a label key.
pub fn check_key(key: &str) -> Result<(), LabelError> {
    let ok = (1..=63).contains(&key.len())
        && starts_alnum(key)
        && key.chars().all(|c| is_name_char(c) || c == '/');
    if ok {
        Ok(())
    } else {
        Err(LabelError::Key(key.to_owned()))
    }
}

/// Checks a label value (may be empty).
pub fn check_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.len() <= 63 && value.chars().all(is_name_char) {
        Ok(())
    } else {
        Err(LabelError::Value {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Checks a group name.
pub fn check_group(group: &str) -> Result<(), LabelError> {
    if (1..=63).contains(&group.len()) && starts_alnum(group) && group.chars().all(is_name_char) {
        Ok(())
    } else {
        Err(LabelError::Group(group.to_owned()))
    }
}

/// Checks every key and value of a label map.
pub fn check_labels(labels: &Labels) -> Result<(), LabelError> {
    for (k, v) in labels {
        check_key(k)?;
        check_value(k, v)?;
    }
    Ok(())
}

/// Parses one `key=value` argument as typed on a command line.
pub fn parse_pair(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| LabelError::Pair(s.to_owned()))?;
    check_key(k)?;
    check_value(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let cases = [
            ("role", true),
            ("team/owner", true),
            ("a", true),
            ("", false),
            ("-role", false),
            ("ro le", false),
            ("role;rm", false),
            (&"k".repeat(63), true),
            (&"k".repeat(64), false),
        ];
        for (key, ok) in cases {
            assert_eq!(check_key(key).is_ok(), ok, "key {key:?}");
        }
    }

    #[test]
    fn values_and_pairs() {
        assert_eq!(parse_pair("env=prod"), Ok(("env".into(), "prod".into())));
        assert_eq!(parse_pair("env="), Ok(("env".into(), String::new())));
        assert!(matches!(parse_pair("env"), Err(LabelError::Pair(_))));
        assert!(matches!(
            parse_pair("env=$(id)"),
            Err(LabelError::Value { .. })
        ));
        assert!(matches!(
            parse_pair("env=a/b"),
            Err(LabelError::Value { .. })
        ));
    }

    #[test]
    fn groups() {
        assert!(check_group("web-eu1").is_ok());
        assert!(check_group("").is_err());
        assert!(check_group("web/eu").is_err());
    }
}
