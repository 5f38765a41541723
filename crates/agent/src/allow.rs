//! Which actions this agent agrees to run. The server decides what to send,
//! but the machine's owner decides what runs on it: an action that matches
//! no pattern of `allow_actions` is refused without starting anything.

/// True when `action` matches one of `patterns`. An empty list allows
/// nothing.
pub fn action_allowed(patterns: &[String], action: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, action))
}

pub use drover_proto::glob::glob_match;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_table() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("uptime", "uptime", true),
            ("uptime", "uptimes", false),
            ("uptime", "uptim", false),
            ("uptime", "Uptime", false),
            ("deploy-*", "deploy-web", true),
            ("deploy-*", "deploy-", true),
            ("deploy-*", "deploy", false),
            ("deploy-*", "x-deploy-web", false),
            ("*-restart", "nginx-restart", true),
            ("*-restart", "nginx-restart-now", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("**", "x", true),
            ("", "", true),
            ("", "x", false),
            ("d?", "dx", false),
            ("dé*", "déploie", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(glob_match(pattern, text), want, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn allow_list_table() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases = [
            (list(&[]), "uptime", false),
            (list(&["*"]), "uptime", true),
            (list(&["deploy-*", "uptime"]), "uptime", true),
            (list(&["deploy-*", "uptime"]), "deploy-db", true),
            (list(&["deploy-*", "uptime"]), "reboot", false),
        ];
        for (patterns, action, want) in cases {
            assert_eq!(
                action_allowed(&patterns, action),
                want,
                "{patterns:?} {action}"
            );
        }
    }
}
