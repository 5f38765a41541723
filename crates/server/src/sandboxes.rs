//! Sandbox profiles as the server uses them: the catalog's and the
//! built-in `process`, and which one a job or a task runs in.
//!
//! The profile is resolved when the job is created and stored with it, so
//! every attempt (retries included) runs under the limits that were
//! submitted, whatever happens to the catalog afterwards.

use drover_proto::jobs::ActionSpec;
use drover_proto::sandbox::Sandbox;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// sha256 of the canonical JSON of a profile.
pub fn spec_hash(s: &Sandbox) -> String {
    let json = serde_json::to_vec(s).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

/// Looks a profile up by name, the built-in `process` included.
pub async fn find(state: &AppState, name: &str) -> Result<Option<Sandbox>, ApiError> {
    Ok(crate::domain::find_profile(&state.store, name).await?)
}

/// The profile a job of `action` runs in (see `domain::Jobs::sandbox`).
/// The inner error (unknown profile, a process sandbox for an action that
/// asks for a container) is meant for the submitter.
pub async fn resolve(
    state: &AppState,
    action: &ActionSpec,
    requested: Option<&str>,
) -> Result<Result<Sandbox, String>, ApiError> {
    match crate::domain::Jobs::new(&state.store)
        .sandbox(action, requested)
        .await
    {
        Ok(s) => Ok(Ok(s)),
        Err(e) if e.is_input() => Ok(Err(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// An action that asks for a container cannot be run as a bare process:
/// a job or task may pick another profile, not a weaker kind.
pub fn check_floor(action: &str, floor: &Sandbox, chosen: &Sandbox) -> Result<(), String> {
    if floor.docker().is_some() && chosen.docker().is_none() {
        return Err(format!(
            "action '{action}' runs in docker sandbox '{}'; it cannot run in {} sandbox '{}'",
            floor.name(),
            chosen.kind(),
            chosen.name()
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> Sandbox {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_container_action_is_never_run_as_a_process() {
        let docker = profile(serde_json::json!({"type": "docker", "name": "tight", "image": "x"}));
        let other = profile(serde_json::json!({"type": "docker", "name": "big", "image": "x"}));
        let limited = profile(serde_json::json!({"type": "process", "name": "limited"}));
        let plain = Sandbox::default_process();
        let cases = [
            (&docker, &other, true),
            (&docker, &docker, true),
            (&docker, &plain, false),
            (&docker, &limited, false),
            (&plain, &docker, true),
            (&limited, &plain, true),
        ];
        for (floor, chosen, ok) in cases {
            let got = check_floor("a", floor, chosen);
            assert_eq!(
                got.is_ok(),
                ok,
                "{} -> {}: {got:?}",
                floor.name(),
                chosen.name()
            );
        }
        let err = check_floor("hog", &docker, &plain).unwrap_err();
        assert!(
            err.contains("hog") && err.contains("tight") && err.contains("process"),
            "{err}"
        );
    }

    #[test]
    fn hashes_follow_the_content() {
        let a = profile(
            serde_json::json!({"type": "docker", "name": "t", "image": "x", "memory": "64m"}),
        );
        let b = profile(
            serde_json::json!({"type": "docker", "name": "t", "image": "x", "memory": 67108864}),
        );
        let c = profile(
            serde_json::json!({"type": "docker", "name": "t", "image": "x", "memory": "65m"}),
        );
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_ne!(spec_hash(&a), spec_hash(&c));
    }
}
