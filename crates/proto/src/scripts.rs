//! The scripts library (issue 16): named scripts whose every upload is an
//! immutable version named by the SHA-256 of its content. Policies bind a
//! version to agents; agents verify the hash before they run one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Largest script accepted, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;

/// The interpreter of a script that names none.
pub const DEFAULT_INTERPRETER: &str = "/bin/sh";

/// `POST /api/v1/scripts`: uploads a version of a script.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddScriptRequest {
    /// Letters, digits, '-' and '_', starting with a letter; at most 64.
    pub name: String,
    /// The script (UTF-8 text, at most 256 KiB).
    pub content: String,
    /// Absolute path of the program that runs it, given the script's path
    /// as its one argument [default: /bin/sh].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
}

/// One version of a script, without its content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScriptVersion {
    pub name: String,
    /// SHA-256 of the content, 64 hex digits: the version's name.
    pub sha256: String,
    pub interpreter: String,
    /// Size of the content in bytes.
    pub size: u64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// The answer to an upload: the version, and whether it is new (uploading
/// the same content again names the version there is).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddedScript {
    pub version: ScriptVersion,
    pub created: bool,
}

/// A script in the listing: its latest version and how many there are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScriptSummary {
    pub name: String,
    pub latest: ScriptVersion,
    pub versions: u64,
}

/// A version with its content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScriptContent {
    pub version: ScriptVersion,
    pub content: String,
}

/// Whether `s` is a script name: a letter, then letters, digits, '-' and
/// '_'; at most 64 characters.
pub fn is_script_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Whether `s` names an interpreter: an absolute path of printable ASCII
/// without spaces, at most 256 bytes.
pub fn is_interpreter(s: &str) -> bool {
    s.starts_with('/') && s.len() <= 256 && s.chars().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_interpreters() {
        assert!(is_script_name("motd"));
        assert!(is_script_name("ensure-ntp_2"));
        assert!(!is_script_name("2fast"));
        assert!(!is_script_name("a;rm -rf /"));
        assert!(!is_script_name(&"a".repeat(65)));
        assert!(is_interpreter("/usr/bin/python3"));
        assert!(!is_interpreter("python3"));
        assert!(!is_interpreter("/bin/sh -c"));
    }
}
