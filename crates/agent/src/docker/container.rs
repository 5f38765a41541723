//! What a container is created with: the profile's limits, least
//! privilege for everything else, and the mounts and environment of an
//! attempt or a workspace.

use std::collections::HashMap;
use std::path::Path;

use drover_proto::jobs::Assignment;
use drover_proto::sandbox::DockerSandbox;
use drover_proto::workflows::OUTPUT_FILE_ENV;

use super::api::{ContainerConfig, HostConfig, LogConfig, Mount};

/// What a container is made of, besides its profile.
#[derive(Debug)]
pub(crate) struct ContainerSpec<'a> {
    pub sandbox: &'a DockerSandbox,
    /// The engine's name of the runtime, `None` for its default.
    pub runtime: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: &'a str,
    pub mounts: Vec<Mount>,
    pub labels: HashMap<String, String>,
    /// The json-file log's size bound.
    pub log_max_bytes: u64,
}

/// The create request for a container: the profile's limits, least
/// privilege for everything else.
pub(crate) fn container_config(spec: ContainerSpec<'_>) -> ContainerConfig {
    let s = spec.sandbox;
    let memory = s.memory.map(|m| i64::try_from(m.0).unwrap_or(i64::MAX));
    ContainerConfig {
        image: s.image.clone(),
        entrypoint: spec.entrypoint,
        cmd: spec.cmd,
        env: spec.env,
        working_dir: spec.working_dir.to_owned(),
        user: s.user.clone(),
        labels: spec.labels,
        host_config: HostConfig {
            memory,
            // The same as memory: no swap on top of it.
            memory_swap: memory,
            nano_cpus: s.cpus.map(|c| (c * 1e9).round() as i64),
            pids_limit: s.pids.map(i64::from),
            network_mode: s.network.clone(),
            readonly_rootfs: s.read_only,
            tmpfs: HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,nosuid,nodev,size={}", s.scratch.0),
            )]),
            cap_drop: vec!["ALL".to_owned()],
            cap_add: s.capabilities.clone(),
            security_opt: vec!["no-new-privileges".to_owned()],
            runtime: spec.runtime,
            // A small init as PID 1 passes SIGTERM on to the program (PID 1
            // ignores signals it has no handler for) and reaps orphans.
            init: true,
            mounts: spec.mounts,
            log_config: LogConfig {
                kind: "json-file".to_owned(),
                config: HashMap::from([
                    ("max-size".to_owned(), spec.log_max_bytes.to_string()),
                    ("max-file".to_owned(), "2".to_owned()),
                ]),
            },
        },
    }
}

/// The json-file bound for an attempt: room for what the agent keeps of
/// both streams and then some, never less than 16 MiB nor more than 1 GiB.
pub(super) fn log_max_bytes(a: &Assignment) -> u64 {
    a.log_cap_bytes
        .saturating_mul(2)
        .saturating_add(8 << 20)
        .clamp(16 << 20, 1 << 30)
}

pub(super) fn bind(source: &Path, target: &str) -> Mount {
    Mount {
        target: target.to_owned(),
        source: source.to_string_lossy().into_owned(),
        kind: "bind",
        read_only: false,
    }
}

pub(super) fn volume(name: &str, target: &str) -> Mount {
    Mount {
        target: target.to_owned(),
        source: name.to_owned(),
        kind: "volume",
        read_only: false,
    }
}

/// The owner a directory mounted into a container gets: a numeric
/// `uid[:gid]` user of the profile (a name means nothing on the host).
pub(crate) fn numeric_owner(user: Option<&str>) -> Option<(u32, Option<u32>)> {
    let user = user?;
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = u.parse().ok()?;
    match g {
        Some(g) => Some((uid, Some(g.parse().ok()?))),
        None => Some((uid, None)),
    }
}

pub(super) fn env_list(a: &Assignment, outputs: &str) -> Vec<String> {
    let mut env: Vec<String> = a.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("{OUTPUT_FILE_ENV}={outputs}"));
    env
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use drover_proto::sandbox::WORK_MOUNT;

    use super::*;
    use crate::docker::api;
    use crate::test_support::docker_profile as profile;

    #[test]
    fn container_body_has_the_limits_and_least_privilege() {
        let d = profile(serde_json::json!({
            "memory": "64m", "cpus": 0.5, "pids": 32, "capabilities": ["CHOWN"],
            "user": "1000:1000", "scratch": "16m",
        }));
        let body = container_config(ContainerSpec {
            sandbox: &d,
            runtime: Some("runc".into()),
            entrypoint: vec!["echo".into()],
            cmd: vec!["hi; rm -rf /".into()],
            env: vec!["A=1".into()],
            working_dir: WORK_MOUNT,
            mounts: vec![bind(Path::new("/w"), WORK_MOUNT)],
            labels: HashMap::from([("k".to_owned(), "v".to_owned())]),
            log_max_bytes: 16 << 20,
        });
        let json = serde_json::to_value(api::container_body(&body)).unwrap();
        let want = serde_json::json!({
            "Image": "busybox:1",
            "Entrypoint": ["echo"],
            "Cmd": ["hi; rm -rf /"],
            "Env": ["A=1"],
            "WorkingDir": "/work",
            "User": "1000:1000",
            "Labels": {"k": "v"},
            "AttachStdin": false, "AttachStdout": false, "AttachStderr": false,
            "OpenStdin": false, "Tty": false,
            "HostConfig": {
                "Memory": 64 << 20,
                "MemorySwap": 64 << 20,
                "NanoCpus": 500_000_000,
                "PidsLimit": 32,
                "NetworkMode": "none",
                "ReadonlyRootfs": true,
                "Tmpfs": {"/tmp": format!("rw,nosuid,nodev,size={}", 16 << 20)},
                "CapDrop": ["ALL"],
                "CapAdd": ["CHOWN"],
                "SecurityOpt": ["no-new-privileges"],
                "Runtime": "runc",
                "Init": true,
                "Privileged": false,
                "Mounts": [{"Target": "/work", "Source": "/w", "Type": "bind", "ReadOnly": false}],
                "LogConfig": {"Type": "json-file", "Config": {"max-size": (16u64 << 20).to_string(), "max-file": "2"}},
            },
        });
        assert_eq!(
            json,
            want,
            "{}",
            serde_json::to_string_pretty(&json).unwrap()
        );
        // Defaults: no limits asked, none set; the engine's runtime.
        let body = container_config(ContainerSpec {
            sandbox: &profile(serde_json::json!({"read_only": false})),
            runtime: None,
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: WORK_MOUNT,
            mounts: vec![],
            labels: HashMap::new(),
            log_max_bytes: 1,
        });
        let json = serde_json::to_value(api::container_body(&body)).unwrap();
        let hc = &json["HostConfig"];
        for absent in [
            "Memory",
            "MemorySwap",
            "NanoCpus",
            "PidsLimit",
            "Runtime",
            "CapAdd",
        ] {
            assert!(hc.get(absent).is_none(), "{absent} in {hc}");
        }
        assert!(json.get("User").is_none(), "{json}");
        assert_eq!(hc["ReadonlyRootfs"], false);
        assert_eq!(
            hc["Tmpfs"]["/tmp"],
            format!("rw,nosuid,nodev,size={}", 64u64 << 20)
        );
    }

    #[test]
    fn log_bound_follows_the_cap() {
        let mut a = crate::test_support::assignment(&["x"]);
        for (cap, want) in [
            (1 << 20, 16 << 20),
            (100 << 20, (200 << 20) + (8 << 20)),
            (u64::MAX, 1 << 30),
        ] {
            a.log_cap_bytes = cap;
            assert_eq!(log_max_bytes(&a), want, "{cap}");
        }
    }

    #[test]
    fn numeric_owners_table() {
        let cases = [
            (None, None),
            (Some("nobody"), None),
            (Some("1000"), Some((1000, None))),
            (Some("1000:50"), Some((1000, Some(50)))),
            (Some("1000:staff"), None),
        ];
        for (user, want) in cases {
            assert_eq!(numeric_owner(user), want, "{user:?}");
        }
    }
}
