//! Job targets: which agents a selector names. Pure parsing and matching;
//! the grammar is documented in `docs/SELECTORS.md`.
//!
//! A selector is `*`, an agent id (or a unique prefix of one), or terms
//! joined by commas, all of which must hold:
//!
//! ```text
//! selector := '*' | AGENT-ID | term (',' term)*
//! term     := '!' positive | KEY '!=' value | KEY 'notin' list | positive
//! positive := 'group:' value | KEY '=' value | KEY 'in' list | KEY
//! list     := '(' value (',' value)* ')'
//! value    := unquoted | "'" text "'" | '"' text '"'   ('*' is a wildcard)
//! ```
//!
//! A key is a label an operator set or a fact the agent reports about
//! itself ([`drover_proto::agent::FACT_KEYS`]: `hostname`, `os`, `arch`,
//! `group`, `docker`, `runtime.*`, …); a fact wins over a label of the same
//! name, so `--target docker=true` picks the agents that can run
//! containers. Every negation is the plain opposite of its positive form:
//! `env!=prod`, `!env=prod` and `env notin (prod)` all match an agent
//! without an `env` label.

use std::borrow::Cow;

use drover_proto::agent::{is_fact_key, is_reported_label, reported_labels};
use drover_proto::glob::glob_match;
use drover_proto::labels::check_key;
use drover_store::AgentRecord;

/// A parsed `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// An agent id or a unique prefix of one.
    Agent(String),
    /// Every term must hold.
    Terms(Vec<Term>),
    /// `*`: every agent.
    All,
}

/// One comma-separated part of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// A label or fact name (`group` for `group:NAME`).
    pub key: String,
    pub test: Test,
    /// `!`, `!=` and `notin`: the term holds when the test does not.
    pub negated: bool,
}

/// What a term asks of a key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// The value matches this glob (`*` is the wildcard).
    Is(String),
    /// The value matches one of these globs.
    In(Vec<String>),
    /// The key has a value (any, also empty).
    Present,
}

/// What a selector may be, for error messages.
const FORMS: &str = "an agent id, *, or terms like key=value, key!=value, !key=value, \
                     key in (a,b), key notin (a,b), group:NAME, key, !key joined by commas";

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err(format!("target is empty: give {FORMS}"));
        }
        if t == "*" {
            return Ok(Selector::All);
        }
        // A lone word of hex digits and dashes is an agent id, as always.
        if t.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Ok(Selector::Agent(t.to_ascii_lowercase()));
        }
        Parser::new(s)
            .selector()
            .map(Selector::Terms)
            .map_err(|e| format!("target '{s}': column {}: {}", e.column, e.message))
    }

    /// Whether a selector matches an agent (an agent id only its full id).
    pub fn matches(&self, agent: &AgentRecord) -> bool {
        match self {
            Selector::All => true,
            Selector::Agent(id) => agent.id == *id,
            Selector::Terms(terms) => {
                let facts = Facts::of(agent);
                terms.iter().all(|t| t.holds(&facts))
            }
        }
    }
}

impl Term {
    fn holds(&self, facts: &Facts) -> bool {
        let value = facts.get(&self.key);
        let yes = match (&self.test, value) {
            (_, None) => false,
            (Test::Present, Some(_)) => true,
            (Test::Is(g), Some(v)) => glob_match(g, &v),
            (Test::In(gs), Some(v)) => gs.iter().any(|g| glob_match(g, &v)),
        };
        yes != self.negated
    }
}

/// An agent's labels and facts, as a selector reads them.
struct Facts<'a> {
    agent: &'a AgentRecord,
    reported: drover_proto::labels::Labels,
}

impl<'a> Facts<'a> {
    fn of(agent: &'a AgentRecord) -> Facts<'a> {
        Facts {
            agent,
            reported: reported_labels(agent.inventory.as_ref()),
        }
    }

    /// The value of a fact (see [`drover_proto::agent::FACT_KEYS`]) or
    /// else a label; `None` when the agent has none (a fact of its
    /// inventory before its first heartbeat).
    fn get(&self, key: &str) -> Option<Cow<'_, str>> {
        let a = self.agent;
        let inv = a.inventory.as_ref();
        if is_reported_label(key) {
            return self.reported.get(key).map(|v| Cow::Borrowed(v.as_str()));
        }
        if !is_fact_key(key) {
            return a.labels.get(key).map(|v| Cow::Borrowed(v.as_str()));
        }
        match key {
            "hostname" => Some(Cow::Borrowed(&a.hostname)),
            "group" => a.group.as_deref().map(Cow::Borrowed),
            "agent_version" => a
                .agent_version
                .as_deref()
                .or(inv.map(|i| i.agent_version.as_str()))
                .map(Cow::Borrowed),
            "os" => inv.map(|i| Cow::Borrowed(i.os.as_str())),
            "os_version" => inv.map(|i| Cow::Borrowed(i.os_version.as_str())),
            "kernel" => inv.map(|i| Cow::Borrowed(i.kernel.as_str())),
            "arch" => inv.map(|i| Cow::Borrowed(i.arch.as_str())),
            "cpus" => inv.map(|i| Cow::Owned(i.cpu_count.to_string())),
            _ => None,
        }
    }
}

/// A parse error at a character position (0-based here, 1-based shown).
#[derive(Debug)]
struct ParseError {
    column: usize,
    message: String,
}

/// Characters of an unquoted value: those of label values, `*` (the
/// wildcard) and a few that facts contain (`/`, `:`, `+`).
fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '+' | '*')
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

/// Longest quoted value.
const MAX_VALUE: usize = 256;

/// A hand-written recursive-descent parser over the characters.
struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn new(s: &str) -> Parser {
        Parser {
            chars: s.chars().collect(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn found(&self) -> String {
        match self.peek() {
            None => "the end".to_owned(),
            Some(c) => format!("'{c}'"),
        }
    }

    fn fail<T>(&self, at: usize, message: String) -> Result<T, ParseError> {
        Err(ParseError {
            column: at + 1,
            message,
        })
    }

    fn expected<T>(&self, what: &str) -> Result<T, ParseError> {
        self.fail(self.pos, format!("expected {what}, found {}", self.found()))
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let end = self.pos + word.chars().count();
        let matches = self
            .chars
            .get(self.pos..end)
            .is_some_and(|w| w.iter().copied().eq(word.chars()))
            && !self.chars.get(end).copied().is_some_and(is_key_char);
        if matches {
            self.pos = end;
        }
        matches
    }

    fn selector(&mut self) -> Result<Vec<Term>, ParseError> {
        let mut terms = Vec::new();
        loop {
            self.skip_ws();
            terms.push(self.term()?);
            self.skip_ws();
            if self.peek().is_none() {
                return Ok(terms);
            }
            if !self.eat(',') {
                return self.expected("',' between terms or the end");
            }
        }
    }

    fn term(&mut self) -> Result<Term, ParseError> {
        let negated = self.eat('!');
        if negated {
            self.skip_ws();
        }
        let start = self.pos;
        let key = self.key()?;
        if key == "group" && self.eat(':') {
            let value = self.value(false)?;
            return Ok(Term {
                key,
                test: Test::Is(value),
                negated,
            });
        }
        let after_key = self.pos;
        self.skip_ws();
        let no_double = |p: &Parser, op: &str| {
            p.fail(
                start.saturating_sub(1),
                format!("'!' cannot negate '{op}': write the positive form"),
            )
        };
        if self.eat('=') {
            return Ok(Term {
                key,
                test: Test::Is(self.value(true)?),
                negated,
            });
        }
        if self.peek() == Some('!') && self.chars.get(self.pos + 1) == Some(&'=') {
            if negated {
                return no_double(self, "!=");
            }
            self.pos += 2;
            return Ok(Term {
                key,
                test: Test::Is(self.value(true)?),
                negated: true,
            });
        }
        // `in` and `notin` need a space after the key.
        if self.pos > after_key {
            if self.eat_word("in") {
                return Ok(Term {
                    key,
                    test: Test::In(self.list()?),
                    negated,
                });
            }
            if self.eat_word("notin") {
                if negated {
                    return no_double(self, "notin");
                }
                return Ok(Term {
                    key,
                    test: Test::In(self.list()?),
                    negated: true,
                });
            }
        }
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Term {
                key,
                test: Test::Present,
                negated,
            });
        }
        self.expected("'=', '!=', ' in (…)', ' notin (…)', ',' or the end after the key")
    }

    fn key(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        while self.peek().is_some_and(is_key_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.expected("a label key, a fact or group:NAME");
        }
        let key: String = self.chars[start..self.pos].iter().collect();
        check_key(&key).map_err(|e| ParseError {
            column: start + 1,
            message: e.to_string(),
        })?;
        Ok(key)
    }

    /// A value; an empty unquoted one only where `allow_empty` (`key=`).
    fn value(&mut self, allow_empty: bool) -> Result<String, ParseError> {
        self.skip_ws();
        let start = self.pos;
        if let Some(q @ ('\'' | '"')) = self.peek() {
            self.pos += 1;
            let mut v = String::new();
            loop {
                match self.peek() {
                    None => {
                        return self.fail(start, format!("unclosed quote {q}: add a closing {q}"))
                    }
                    Some(c) if c == q => {
                        self.pos += 1;
                        break;
                    }
                    Some(c) if c.is_control() => {
                        return self.expected("a printable character in the quoted value")
                    }
                    Some(c) => {
                        v.push(c);
                        self.pos += 1;
                    }
                }
            }
            if v.len() > MAX_VALUE {
                return self.fail(start, format!("value is longer than {MAX_VALUE} bytes"));
            }
            return Ok(v);
        }
        while self.peek().is_some_and(is_value_char) {
            self.pos += 1;
        }
        let v: String = self.chars[start..self.pos].iter().collect();
        // A value ends at a separator; anything else is a character it may
        // not hold (quote the value to use spaces and other characters).
        self.skip_ws();
        if !matches!(self.peek(), None | Some(',' | ')')) || (v.is_empty() && !allow_empty) {
            return self.fail(
                self.pos,
                format!(
                    "invalid value: expected letters, digits, . _ - / : + * or a quoted value, found {}",
                    self.found()
                ),
            );
        }
        if v.len() > MAX_VALUE {
            return self.fail(start, format!("value is longer than {MAX_VALUE} bytes"));
        }
        Ok(v)
    }

    fn list(&mut self) -> Result<Vec<String>, ParseError> {
        self.skip_ws();
        if !self.eat('(') {
            return self.expected("'(' opening the list of values");
        }
        let mut values = Vec::new();
        loop {
            values.push(self.value(false)?);
            self.skip_ws();
            if self.eat(')') {
                return Ok(values);
            }
            if !self.eat(',') {
                return self.expected("',' or ')' in the list of values");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::Utc;
    use drover_proto::agent::Inventory;

    fn agent(id: &str, labels: &[(&str, &str)], group: Option<&str>) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            hostname: "h".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            group: group.map(Into::into),
            agent_version: None,
            enrolled_at: Utc::now(),
            last_seen_at: None,
            inventory: None,
            session_id: None,
            session_ended_reason: None,
            revoked_at: None,
            revoked_reason: None,
            dispatch: drover_proto::api::DispatchState::Active,
            dispatch_reason: None,
            dispatch_force: false,
            removed_at: None,
        }
    }

    fn is(key: &str, v: &str) -> Term {
        Term {
            key: key.into(),
            test: Test::Is(v.into()),
            negated: false,
        }
    }

    fn not(mut t: Term) -> Term {
        t.negated = true;
        t
    }

    fn within(key: &str, vs: &[&str]) -> Term {
        Term {
            key: key.into(),
            test: Test::In(vs.iter().map(|v| v.to_string()).collect()),
            negated: false,
        }
    }

    fn has(key: &str) -> Term {
        Term {
            key: key.into(),
            test: Test::Present,
            negated: false,
        }
    }

    #[test]
    fn parses_every_form() {
        let terms = |t: Vec<Term>| Ok(Selector::Terms(t));
        let cases = [
            ("*", Ok(Selector::All)),
            (" * ", Ok(Selector::All)),
            ("0192ABCD-1", Ok(Selector::Agent("0192abcd-1".into()))),
            ("group:web", terms(vec![is("group", "web")])),
            ("role=web", terms(vec![is("role", "web")])),
            (
                "role=web, env=prod",
                terms(vec![is("role", "web"), is("env", "prod")]),
            ),
            ("env=", terms(vec![is("env", "")])),
            ("os=Debian*", terms(vec![is("os", "Debian*")])),
            (
                "os='Debian GNU/Linux'",
                terms(vec![is("os", "Debian GNU/Linux")]),
            ),
            ("os = \"a,b\"", terms(vec![is("os", "a,b")])),
            ("env!=prod", terms(vec![not(is("env", "prod"))])),
            ("!env=prod", terms(vec![not(is("env", "prod"))])),
            ("! env = prod", terms(vec![not(is("env", "prod"))])),
            (
                "role in (web,api)",
                terms(vec![within("role", &["web", "api"])]),
            ),
            (
                "role in ( web , 'a b' )",
                terms(vec![within("role", &["web", "a b"])]),
            ),
            (
                "role notin (web)",
                terms(vec![not(within("role", &["web"]))]),
            ),
            ("!role in (web)", terms(vec![not(within("role", &["web"]))])),
            ("gpu", terms(vec![has("gpu")])),
            ("!gpu", terms(vec![not(has("gpu"))])),
            ("index", terms(vec![has("index")])),
            ("infra=x", terms(vec![is("infra", "x")])),
            (
                "group:local,role=web",
                terms(vec![is("group", "local"), is("role", "web")]),
            ),
            ("!group:local", terms(vec![not(is("group", "local"))])),
            (
                "role in (web,api),!env=prod,gpu",
                terms(vec![
                    within("role", &["web", "api"]),
                    not(is("env", "prod")),
                    has("gpu"),
                ]),
            ),
            (
                "runtime.runsc=true",
                terms(vec![is("runtime.runsc", "true")]),
            ),
            ("team/owner=ops", terms(vec![is("team/owner", "ops")])),
        ];
        for (s, want) in cases {
            assert_eq!(Selector::parse(s), want, "{s}");
        }
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let cases = [
            ("", "target is empty: give an agent id, *,"),
            (
                "role=$(id)",
                "target 'role=$(id)': column 6: invalid value: expected letters, digits, . _ - / : + * or a quoted value, found '$'",
            ),
            ("group:", "target 'group:': column 7: invalid value"),
            (
                "web;rm",
                "target 'web;rm': column 4: expected '=', '!=', ' in (…)', ' notin (…)', ',' or the end after the key, found ';'",
            ),
            ("host name", "column 6: expected '=', '!='"),
            (
                "role in web",
                "target 'role in web': column 9: expected '(' opening the list of values, found 'w'",
            ),
            (
                "role in (web",
                "target 'role in (web': column 13: expected ',' or ')' in the list of values, found the end",
            ),
            (
                "role in (web,)",
                "column 14: invalid value: expected letters, digits",
            ),
            (
                "role=web,",
                "target 'role=web,': column 10: expected a label key, a fact or group:NAME, found the end",
            ),
            (
                ",role=web",
                "column 1: expected a label key, a fact or group:NAME, found ','",
            ),
            ("role=web env=prod", "column 10: invalid value"),
            ("os='Debian", "column 4: unclosed quote ': add a closing '"),
            (
                "!env!=prod",
                "column 1: '!' cannot negate '!=': write the positive form",
            ),
            ("!env notin (a)", "'!' cannot negate 'notin'"),
            ("-role=x", "column 1: label key '-role' is invalid"),
            ("role=(web)", "column 6: invalid value"),
            ("!", "column 2: expected a label key"),
            ("rolein(web)", "column 7: expected '=', '!='"),
        ];
        for (s, want) in cases {
            let got = Selector::parse(s).unwrap_err();
            assert!(got.contains(want), "{s:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn matches_labels_groups_globs_lists_and_negations() {
        let web = agent("a", &[("role", "web"), ("env", "prod")], Some("eu"));
        let api = agent("b", &[("role", "api"), ("env", "dev")], Some("local"));
        let db = agent("c", &[("role", "db")], None);
        let all = [&web, &api, &db];
        let cases: &[(&str, [bool; 3])] = &[
            ("role=web,env=prod", [true, false, false]),
            ("group:eu", [true, false, false]),
            ("group=eu", [true, false, false]),
            ("group:local,role=api", [false, true, false]),
            ("group:local,role=web", [false, false, false]),
            ("!group:eu", [false, true, true]),
            ("group", [true, true, false]),
            ("role in (web,api)", [true, true, false]),
            ("role in (web,api),!env=prod", [false, true, false]),
            ("role notin (web,api)", [false, false, true]),
            // Negations match an agent without the key.
            ("env!=prod", [false, true, true]),
            ("!env=prod", [false, true, true]),
            ("env", [true, true, false]),
            ("!env", [false, false, true]),
            ("role=*", [true, true, true]),
            ("role=w*", [true, false, false]),
            ("role=*b", [true, false, true]),
            ("env=", [false, false, false]),
            ("*", [true, true, true]),
            ("hostname=h", [true, true, true]),
            ("hostname!=h*", [false, false, false]),
        ];
        for (s, want) in cases {
            let sel = Selector::parse(s).unwrap();
            let got = all.map(|a| sel.matches(a));
            assert_eq!(&got, want, "{s}");
        }
    }

    #[test]
    fn matches_inventory_facts_over_labels() {
        let mut a = agent("a", &[("os", "plan9"), ("arch", "z80")], None);
        assert!(
            !Selector::parse("os=*").unwrap().matches(&a),
            "no inventory yet"
        );
        assert!(Selector::parse("!os").unwrap().matches(&a));
        a.hostname = "web-01.example".into();
        a.inventory = Some(Inventory {
            hostname: "web-01.example".into(),
            os: "Debian GNU/Linux".into(),
            os_version: "12".into(),
            kernel: "6.1.0-18-amd64".into(),
            arch: "x86_64".into(),
            cpu_count: 8,
            agent_version: "0.1.0".into(),
            ..Inventory::default()
        });
        let cases = [
            ("os=Debian*", true),
            ("os='Debian GNU/Linux'", true),
            ("os=debian*", false),
            ("os=plan9", false),
            ("arch in (x86_64,aarch64)", true),
            ("arch=z80", false),
            ("os_version=12,kernel=6.1.*", true),
            ("cpus=8", true),
            ("cpus in (1,2,4)", false),
            ("hostname=web-*", true),
            ("agent_version=0.1.*", true),
            ("os", true),
        ];
        for (s, want) in cases {
            assert_eq!(Selector::parse(s).unwrap().matches(&a), want, "{s}");
        }
    }

    #[test]
    fn reported_labels_select_on_what_the_agent_offers() {
        use drover_proto::sandbox::DockerStatus;
        let with = |docker: Option<DockerStatus>, kinds: &[&str]| {
            let mut a = agent("a", &[("docker", "false")], None);
            a.inventory = Some(Inventory {
                docker,
                sandboxes: kinds.iter().map(|k| k.to_string()).collect(),
                ..Inventory::default()
            });
            a
        };
        let engine = |runtimes: &[&str]| {
            Some(DockerStatus {
                available: true,
                runtimes: runtimes.iter().map(|r| r.to_string()).collect(),
                ..DockerStatus::default()
            })
        };
        let docker = Selector::parse("docker=true").unwrap();
        let gvisor = Selector::parse("docker=true,runtime.runsc=true").unwrap();
        let no_docker = Selector::parse("docker=false").unwrap();
        let cases = [
            (with(engine(&["runc"]), &["process", "docker"]), true, false),
            (
                with(engine(&["runc", "runsc"]), &["process", "docker"]),
                true,
                true,
            ),
            // Reachable, but the agent does not accept docker sandboxes.
            (with(engine(&["runc"]), &["process"]), false, false),
            (
                with(
                    Some(DockerStatus {
                        available: false,
                        error: Some("connection refused".into()),
                        ..DockerStatus::default()
                    }),
                    &["process", "docker"],
                ),
                false,
                false,
            ),
            (with(None, &["process", "docker"]), false, false),
        ];
        for (i, (a, want_docker, want_gvisor)) in cases.iter().enumerate() {
            // A label an operator set never overrides what is reported.
            assert_eq!(docker.matches(a), *want_docker, "case {i}");
            assert_eq!(no_docker.matches(a), !*want_docker, "case {i}");
            assert_eq!(gvisor.matches(a), *want_gvisor, "case {i}");
        }
        // No inventory yet: nothing is known to be offered.
        assert!(!docker.matches(&agent("b", &[], None)));
    }
}
