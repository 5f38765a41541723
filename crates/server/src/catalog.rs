//! The action catalog's rules, as pure functions: what a valid action is,
//! how submitted parameters are checked against their types, and how the argv
//! is built. Values are substituted inside single argv elements; nothing is
//! ever joined into a command line or passed to a shell.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_proto::jobs::{ActionSpec, ParamSpec, RetryPolicy, BUILTIN_NOOP};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Name of the built-in action that runs inside the agent without a process.
pub const NOOP: &str = "noop";

/// The built-in `noop` action, always in the catalog.
pub fn noop_spec() -> ActionSpec {
    ActionSpec {
        name: NOOP.to_owned(),
        description:
            "Does nothing, inside the agent, without a process (benchmarks, health checks)"
                .to_owned(),
        argv: vec![BUILTIN_NOOP.to_owned()],
        params: BTreeMap::new(),
        timeout: Duration::from_secs(10),
        retries: RetryPolicy::default(),
        kill_grace: Duration::from_secs(1),
        env: BTreeMap::new(),
        sandbox: None,
    }
}

/// A part of an argv element: literal text or a parameter reference.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    Param(&'a str),
}

/// Splits an argv element into text and `{{name}}` references.
fn parse_element(element: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = element;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("'{{{{' without closing '}}}}' in '{element}'"))?;
        let name = after[..end].trim();
        if !is_name(name) {
            return Err(format!(
                "'{{{{{name}}}}}' in '{element}' is not a parameter name"
            ));
        }
        parts.push(Part::Param(name));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks an action before it enters the catalog. Errors name the action
/// and the field.
pub fn validate_spec(spec: &ActionSpec) -> Result<(), String> {
    let name = &spec.name;
    let field = |f: &str, m: String| Err(format!("action '{name}': {f}: {m}"));
    if !is_name(name) {
        return Err(format!(
            "action name '{name}' is invalid: use 1-64 characters from a-z A-Z 0-9 _ -, starting with a letter"
        ));
    }
    if name == NOOP {
        return field(
            "name",
            "'noop' is built in and cannot be redefined".to_owned(),
        );
    }
    let Some(program) = spec.argv.first() else {
        return field("argv", "must name a program".to_owned());
    };
    if program.contains("{{") {
        return field(
            "argv[0]",
            "the program cannot come from a parameter".to_owned(),
        );
    }
    if program.starts_with("builtin:") && program != BUILTIN_NOOP {
        return field("argv[0]", format!("unknown built-in '{program}'"));
    }
    for (i, element) in spec.argv.iter().enumerate() {
        if element.contains('\0') {
            return field(&format!("argv[{i}]"), "contains a NUL byte".to_owned());
        }
        if crate::vault::mentions_secret(element) {
            return field(
                &format!("argv[{i}]"),
                "refers to a secret: secrets may only be used in env, never in argv, which other users of the host can read (e.g. env: {TOKEN: \"${{ secrets.NAME }}\"}, then \"$TOKEN\" in a script)".to_owned(),
            );
        }
        let parts = parse_element(element)
            .or_else(|m| field(&format!("argv[{i}]"), m).map(|()| Vec::new()))?;
        let whole = matches!(parts.as_slice(), [Part::Param(_)]);
        for part in parts {
            if let Part::Param(p) = part {
                let Some(ps) = spec.params.get(p) else {
                    return field(
                        &format!("argv[{i}]"),
                        format!("refers to undeclared parameter '{p}'"),
                    );
                };
                // Free text joined to other text can become code (`sh -c
                // "echo {{m}}"`, whatever the flags), several words or an
                // option: only values that cannot carry syntax may be
                // embedded. A free-text value is a whole argument or none.
                if !whole && !embeddable(ps) {
                    return field(
                        &format!("argv[{i}]"),
                        format!(
                            "string parameter '{p}' is embedded in a larger argument, where it would be run as code \
                             or read as several words: free text may only be a whole argument. Pass it as its own \
                             element (e.g. [\"sh\", \"-c\", \"echo \\\"$1\\\"\", \"sh\", \"{{{{{p}}}}}\"]), \
                             or make it an integer, bool or enum, or give it a pattern that admits none of {}",
                            SHELL_SYNTAX.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(" ")
                        ),
                    );
                }
            }
        }
    }
    for (p, ps) in &spec.params {
        if !is_name(p) {
            return field("params", format!("'{p}' is not a valid parameter name"));
        }
        let at = format!("params.{p}");
        match ps {
            ParamSpec::String {
                pattern,
                default,
                max_length,
                allow_leading_dash,
            } => {
                if let Some(re) = pattern {
                    anchored(re).map_err(|e| format!("action '{name}': {at}.pattern: {e}"))?;
                }
                if let Some(d) = default {
                    check_string(p, d, *max_length, pattern.as_deref(), *allow_leading_dash)
                        .or_else(|m| field(&at, m))?;
                }
            }
            ParamSpec::Integer { min, max, default } => {
                if let (Some(lo), Some(hi)) = (min, max) {
                    if lo > hi {
                        return field(&at, format!("min {lo} is above max {hi}"));
                    }
                }
                if let Some(d) = default {
                    check_integer(p, *d, *min, *max).or_else(|m| field(&at, m))?;
                }
            }
            ParamSpec::Enum { values, default } => {
                if values.is_empty() {
                    return field(&at, "an enum needs at least one value".to_owned());
                }
                if let Some(d) = default {
                    if !values.contains(d) {
                        return field(&at, format!("default '{d}' is not one of {values:?}"));
                    }
                }
            }
            ParamSpec::Bool { .. } => {}
        }
    }
    for k in spec.env.keys() {
        let ok = !k.is_empty()
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return field("env", format!("'{k}' is not a valid variable name"));
        }
        crate::vault::secret_refs(&spec.env[k])
            .or_else(|m| field(&format!("env.{k}"), m).map(|()| Vec::new()))?;
    }
    if spec.timeout.is_zero() {
        return field("timeout", "must be above zero".to_owned());
    }
    if let Some(s) = &spec.sandbox {
        if !drover_proto::sandbox::is_profile_name(s) {
            return field("sandbox", format!("'{s}' is not a sandbox profile name"));
        }
    }
    Ok(())
}

/// Characters that carry syntax for a shell or split words: a string
/// parameter whose pattern admits none of them may be embedded in a larger
/// argument.
const SHELL_SYNTAX: &[char] = &[
    ' ', '\t', '\n', '\r', ';', '&', '|', '$', '`', '\'', '"', '<', '>', '(', ')', '{', '}', '[',
    ']', '*', '?', '!', '#', '~', '\\', '%', '^',
];

/// Whether a parameter's values may be embedded in a larger argument:
/// typed values, or strings whose pattern admits no shell syntax.
fn embeddable(ps: &ParamSpec) -> bool {
    match ps {
        ParamSpec::Integer { .. } | ParamSpec::Enum { .. } | ParamSpec::Bool { .. } => true,
        ParamSpec::String { pattern, .. } => pattern
            .as_deref()
            .and_then(|p| anchored(p).ok())
            .is_some_and(|re| {
                SHELL_SYNTAX.iter().all(|c| {
                    !re.is_match(&c.to_string())
                        && !re.is_match(&format!("a{c}b"))
                        && !re.is_match(&format!("1{c}2"))
                        && !re.is_match(&format!("a{c}"))
                        && !re.is_match(&format!("{c}a"))
                })
            }),
    }
}

fn anchored(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

fn check_string(
    name: &str,
    v: &str,
    max_length: Option<usize>,
    pattern: Option<&str>,
    allow_leading_dash: bool,
) -> Result<(), String> {
    if v.contains('\0') {
        return Err(format!("parameter '{name}' contains a NUL byte"));
    }
    if v.starts_with('-') && !allow_leading_dash {
        return Err(format!(
            "parameter '{name}' begins with '-', which the program could read as an option; \
             the action does not allow that (allow_leading_dash)"
        ));
    }
    if let Some(max) = max_length {
        let len = v.chars().count();
        if len > max {
            return Err(format!(
                "parameter '{name}' is {len} characters long; at most {max} allowed"
            ));
        }
    }
    if let Some(p) = pattern {
        if !anchored(p)?.is_match(v) {
            return Err(format!("parameter '{name}' does not match the pattern {p}"));
        }
    }
    Ok(())
}

fn check_integer(name: &str, v: i64, min: Option<i64>, max: Option<i64>) -> Result<(), String> {
    if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) {
        let lo = min.map(|m| m.to_string()).unwrap_or_else(|| "-inf".into());
        let hi = max.map(|m| m.to_string()).unwrap_or_else(|| "inf".into());
        return Err(format!(
            "parameter '{name}' is {v}; allowed range is {lo}..={hi}"
        ));
    }
    Ok(())
}

/// Checks submitted values against the action's parameters and fills in
/// defaults. Unknown, missing, mistyped and out-of-range values are refused
/// with a message naming the parameter.
pub fn resolve_params(
    spec: &ActionSpec,
    given: &BTreeMap<String, Value>,
) -> Result<BTreeMap<String, String>, String> {
    if let Some(unknown) = given.keys().find(|k| !spec.params.contains_key(*k)) {
        let known: Vec<&String> = spec.params.keys().collect();
        return Err(format!(
            "unknown parameter '{unknown}' for action '{}' (it takes {known:?})",
            spec.name
        ));
    }
    let mut out = BTreeMap::new();
    for (name, ps) in &spec.params {
        let value = given.get(name);
        let text = match ps {
            ParamSpec::String {
                max_length,
                pattern,
                default,
                allow_leading_dash,
            } => {
                let v = match value {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::Bool(b)) => b.to_string(),
                    Some(other) => {
                        return Err(format!("parameter '{name}' must be a string, got {other}"))
                    }
                    None => default
                        .clone()
                        .ok_or_else(|| format!("missing parameter '{name}'"))?,
                };
                check_string(
                    name,
                    &v,
                    *max_length,
                    pattern.as_deref(),
                    *allow_leading_dash,
                )?;
                v
            }
            ParamSpec::Integer { min, max, default } => {
                let v = match value {
                    Some(Value::Number(n)) => n
                        .as_i64()
                        .ok_or_else(|| format!("parameter '{name}' must be an integer, got {n}"))?,
                    Some(Value::String(s)) => s
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| format!("parameter '{name}' must be an integer, got '{s}'"))?,
                    Some(other) => {
                        return Err(format!(
                            "parameter '{name}' must be an integer, got {other}"
                        ))
                    }
                    None => default.ok_or_else(|| format!("missing parameter '{name}'"))?,
                };
                check_integer(name, v, *min, *max)?;
                v.to_string()
            }
            ParamSpec::Enum { values, default } => {
                let v = match value {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(format!(
                            "parameter '{name}' must be one of {values:?}, got {other}"
                        ))
                    }
                    None => default
                        .clone()
                        .ok_or_else(|| format!("missing parameter '{name}'"))?,
                };
                if !values.contains(&v) {
                    return Err(format!(
                        "parameter '{name}' must be one of {values:?}, got '{v}'"
                    ));
                }
                v
            }
            ParamSpec::Bool { default } => {
                let v = match value {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::String(s)) if s == "true" => true,
                    Some(Value::String(s)) if s == "false" => false,
                    Some(other) => {
                        return Err(format!(
                            "parameter '{name}' must be true or false, got {other}"
                        ))
                    }
                    None => default.ok_or_else(|| format!("missing parameter '{name}'"))?,
                };
                v.to_string()
            }
        };
        out.insert(name.clone(), text);
    }
    Ok(out)
}

/// Builds the argv: each element with its references replaced. A value
/// stays inside its element, whatever characters it holds.
pub fn render_argv(
    spec: &ActionSpec,
    values: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    spec.argv
        .iter()
        .map(|element| {
            let mut out = String::new();
            for part in parse_element(element)? {
                match part {
                    Part::Text(t) => out.push_str(t),
                    Part::Param(p) => out.push_str(
                        values
                            .get(p)
                            .ok_or_else(|| format!("no value for parameter '{p}'"))?,
                    ),
                }
            }
            Ok(out)
        })
        .collect()
}

/// sha256 of the canonical JSON of a spec: what an approval or a job pins.
pub fn spec_hash(spec: &ActionSpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn echo() -> ActionSpec {
        serde_json::from_value(json!({
            "name": "echo",
            "argv": ["/bin/echo", "{{message}}", "--count={{count}}", "{{mode}}", "{{loud}}"],
            "params": {
                "message": {"type": "string", "max_length": 40},
                "count": {"type": "integer", "min": 1, "max": 5, "default": 1},
                "mode": {"type": "enum", "values": ["a", "b"], "default": "a"},
                "loud": {"type": "bool", "default": false}
            }
        }))
        .unwrap()
    }

    fn given(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn hostile_values_stay_one_literal_argument() {
        let spec = echo();
        for hostile in [
            "hi; rm -rf /",
            "$(id)",
            "`id`",
            "a\nb",
            "'; DROP TABLE x; --",
            "*",
            "a b c",
        ] {
            let values = resolve_params(&spec, &given(json!({"message": hostile}))).unwrap();
            let argv = render_argv(&spec, &values).unwrap();
            assert_eq!(argv.len(), 5);
            assert_eq!(argv[1], hostile);
        }
        let err = resolve_params(&spec, &given(json!({"message": "a\u{0}b"}))).unwrap_err();
        assert!(err.contains("NUL"), "{err}");
    }

    #[test]
    fn parameters_are_typed_and_named_in_errors() {
        let spec = echo();
        let cases = [
            (json!({}), "missing parameter 'message'"),
            (
                json!({"message": "x", "colour": "red"}),
                "unknown parameter 'colour'",
            ),
            (
                json!({"message": "x", "count": 9}),
                "parameter 'count' is 9; allowed range is 1..=5",
            ),
            (
                json!({"message": "x", "count": "many"}),
                "parameter 'count' must be an integer",
            ),
            (
                json!({"message": "x", "mode": "c"}),
                "parameter 'mode' must be one of",
            ),
            (
                json!({"message": "x", "loud": "yes"}),
                "parameter 'loud' must be true or false",
            ),
            (
                json!({"message": "x".repeat(41)}),
                "parameter 'message' is 41 characters long",
            ),
            (
                json!({"message": ["x"]}),
                "parameter 'message' must be a string",
            ),
        ];
        for (v, want) in cases {
            let err = resolve_params(&spec, &given(v.clone())).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
        let ok = resolve_params(
            &spec,
            &given(json!({"message": "x", "count": "3", "loud": true})),
        )
        .unwrap();
        let argv = render_argv(&spec, &ok).unwrap();
        assert_eq!(argv, ["/bin/echo", "x", "--count=3", "a", "true"]);
    }

    #[test]
    fn string_patterns_match_the_whole_value() {
        let spec: ActionSpec = serde_json::from_value(json!({
            "name": "svc", "argv": ["systemctl", "restart", "{{unit}}"],
            "params": {"unit": {"type": "string", "pattern": "[a-z-]+"}}
        }))
        .unwrap();
        assert!(resolve_params(&spec, &given(json!({"unit": "nginx"}))).is_ok());
        let err = resolve_params(&spec, &given(json!({"unit": "nginx; reboot"}))).unwrap_err();
        assert!(err.contains("does not match the pattern"), "{err}");
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field() {
        let base = echo();
        let mut undeclared = base.clone();
        undeclared.argv.push("{{nope}}".into());
        let mut unclosed = base.clone();
        unclosed.argv.push("{{message".into());
        let mut program_param = base.clone();
        program_param.argv[0] = "{{message}}".into();
        let mut empty = base.clone();
        empty.argv.clear();
        let mut bad_name = base.clone();
        bad_name.name = "rm -rf".into();
        let mut bad_regex = base.clone();
        bad_regex.params.insert(
            "re".into(),
            ParamSpec::String {
                max_length: None,
                pattern: Some("(".into()),
                default: None,
                allow_leading_dash: false,
            },
        );
        let mut reserved = base.clone();
        reserved.name = "noop".into();
        let mut script = base.clone();
        script.argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello {{message}}".into(),
        ];
        let mut perl = base.clone();
        perl.argv = vec![
            "/usr/bin/env".into(),
            "perl".into(),
            "-e".into(),
            "print '{{message}}'".into(),
        ];
        let cases = [
            (undeclared, "argv[5]: refers to undeclared parameter 'nope'"),
            (unclosed, "without closing"),
            (program_param, "argv[0]: the program cannot come from a parameter"),
            (empty, "argv: must name a program"),
            (bad_name, "action name 'rm -rf' is invalid"),
            (bad_regex, "params.re.pattern"),
            (reserved, "built in"),
            (script, "argv[2]: string parameter 'message' is embedded in a larger argument, where it would be run as code"),
            (perl, "argv[3]: string parameter 'message' is embedded in a larger argument"),
        ];
        for (spec, want) in cases {
            let err = validate_spec(&spec).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        assert!(validate_spec(&base).is_ok());
        // The safe forms: the value as its own argument, or a typed value.
        let mut positional = base.clone();
        positional.argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo \"$1\"".into(),
            "sh".into(),
            "{{message}}".into(),
        ];
        assert!(validate_spec(&positional).is_ok());
        let mut typed = base.clone();
        typed.argv = vec!["/bin/sh".into(), "-c".into(), "sleep {{count}}".into()];
        assert!(validate_spec(&typed).is_ok());
    }

    /// The flag list this rule replaced was bypassed by `sh -ec`, `sh -c
    /// --` and `python3 -Sc`: embedding free text is refused whatever the
    /// flags, and only typed or pattern-bound values may be embedded.
    #[test]
    fn free_text_is_a_whole_argument_or_nothing() {
        let with = |argv: &[&str], pattern: Option<&str>| {
            let mut spec = echo();
            spec.argv = argv.iter().map(|a| (*a).to_owned()).collect();
            spec.params.insert(
                "message".into(),
                ParamSpec::String {
                    max_length: None,
                    pattern: pattern.map(str::to_owned),
                    default: None,
                    allow_leading_dash: false,
                },
            );
            validate_spec(&spec)
        };
        for argv in [
            &["/bin/sh", "-ec", "echo {{message}}"][..],
            &["/bin/sh", "-c", "--", "echo {{message}}"],
            &["/usr/bin/python3", "-Sc", "print('{{message}}')"],
            &["/bin/bash", "-xc", "echo {{message}}"],
            &["/bin/echo", "{{message}}.txt"],
            &["/bin/echo", "--name={{message}}"],
            &["/bin/echo", "{{message}}{{message}}"],
        ] {
            let err = with(argv, None).unwrap_err();
            assert!(
                err.contains("is embedded in a larger argument"),
                "{argv:?}: {err}"
            );
        }
        // Whole arguments are fine, whatever comes before them.
        assert!(with(
            &["/bin/sh", "-ec", "echo \"$1\"", "sh", "{{message}}"],
            None
        )
        .is_ok());
        // A pattern that admits no shell syntax may be embedded; one that
        // admits a space, a quote or a '$' may not.
        assert!(with(
            &["/bin/echo", "--name={{message}}"],
            Some("[A-Za-z0-9._-]+")
        )
        .is_ok());
        assert!(with(&["/bin/sh", "-c", "echo {{message}}"], Some("[a-z]{1,8}")).is_ok());
        for loose in ["[a-z ]+", ".*", "[^;]+", "[a-z$]+", "\\S+", "[a-z'\"]+"] {
            let err = with(&["/bin/sh", "-c", "echo {{message}}"], Some(loose)).unwrap_err();
            assert!(err.contains("is embedded"), "{loose}: {err}");
        }
    }

    #[test]
    fn a_leading_dash_is_refused_unless_allowed() {
        let mut spec = echo();
        let given: BTreeMap<String, Value> =
            [("message".to_owned(), Value::String("--help".into()))].into();
        let err = resolve_params(&spec, &given).unwrap_err();
        assert!(err.contains("parameter 'message' begins with '-'"), "{err}");
        spec.params.insert(
            "message".into(),
            ParamSpec::String {
                max_length: None,
                pattern: None,
                default: None,
                allow_leading_dash: true,
            },
        );
        assert_eq!(resolve_params(&spec, &given).unwrap()["message"], "--help");
    }

    #[test]
    fn hash_changes_with_the_spec() {
        let a = echo();
        let mut b = echo();
        b.description = "changed".into();
        assert_eq!(spec_hash(&a), spec_hash(&echo()));
        assert_ne!(spec_hash(&a), spec_hash(&b));
    }
}
