//! Signed assignments: the canonical bytes the server signs with Ed25519
//! and the agent verifies, so that neither a row changed directly in the
//! database nor a man in the middle can make an agent run something else.
//!
//! Two signatures travel in an assignment's [`Seal`]:
//!
//! - the **spec signature**, made once when the job is created (and stored
//!   with it), over what runs: job id, action, argv, the environment's
//!   *names*, timeout, kill grace, artifacts, sandbox and workspace. It is
//!   made before the job reaches the database, so editing the row later
//!   cannot produce a matching one without the server's private key;
//! - the **assignment signature**, made when an attempt is handed out, over
//!   the attempt id, the job id, the expiry, the lease and log cap, the
//!   environment's names *and values* (as sent: after secrets are injected
//!   at dispatch) and the spec signature, which binds the two.
//!
//! The agent checks both, then the expiry. Environment values are covered
//! only by the assignment signature because secrets are injected into them
//! at dispatch, after the job row is read: the spec signature cannot know
//! them, and needs none of them to vouch for the names.
//!
//! # Canonical encoding (version 1)
//!
//! Each message starts with its domain tag, then its fields in the order
//! below. A string or byte string is its length (u64, big-endian) and its
//! bytes; a number is a u64 (i64 for the expiry) big-endian; a list is its
//! length (u64) and its items; an optional value is one byte, 0 (absent)
//! or 1 (present) followed by the value. Sandbox and workspace are written
//! as canonical JSON (object keys sorted by their bytes, no whitespace,
//! serde_json's text for strings and numbers) inside a byte string.
//!
//! - spec: `drover/job-spec/v1\0`, job_id, action, argv (list), env names
//!   (list, sorted), timeout_ms, kill_grace_ms, artifacts (list), sandbox
//!   (optional), workspace (optional).
//! - assignment: `drover/assignment/v1\0`, attempt_id, job_id,
//!   expires_at_ms, lease_ms, log_cap_bytes, env (list of name, value
//!   pairs, sorted by name), the spec signature (64 raw bytes).
//!
//! A domain tag ends with NUL and names what it signs, so a signature of
//! one kind of message (or of a later one, e.g. signed policy scripts) can
//! never be taken for another.
//!
//! Key design decision: the encoding is written by hand rather than being
//! the JSON of the structs, so it does not change with field order, a
//! serde attribute or a map's iteration order, and older and newer builds
//! agree on it byte for byte.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer as _};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::jobs::Assignment;
use crate::sandbox::{Sandbox, WorkspaceSpec};

/// Domain tag of the spec message.
pub const SPEC_DOMAIN: &[u8] = b"drover/job-spec/v1\0";
/// Domain tag of the assignment message.
pub const ASSIGNMENT_DOMAIN: &[u8] = b"drover/assignment/v1\0";

/// The server's signatures over one assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// Ed25519 signature of the job's spec, made when the job was created
    /// (128 hex digits).
    pub spec: String,
    /// Ed25519 signature of this hand-out (128 hex digits).
    pub assignment: String,
    /// The hand-out is refused after this instant (ms since the Unix epoch).
    pub expires_at_ms: i64,
}

/// Why an assignment's signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("it carries no signature")]
    Unsigned,
    #[error("its {0} signature is not 128 hex digits")]
    Malformed(&'static str),
    #[error(
        "the job (action, argv, environment names, timeouts, artifacts, sandbox or workspace) is not what the server signed"
    )]
    Spec,
    #[error(
        "the hand-out (attempt, job, environment, lease, log cap or expiry) is not what the server signed"
    )]
    Assignment,
    #[error(
        "it expired at {expires_at_ms} ms and the agent's clock says {now_ms} ms (do the clocks agree?)"
    )]
    Expired { expires_at_ms: i64, now_ms: i64 },
    #[error("the policy (what runs, its script's content, timing or sandbox) is not what the server signed")]
    Policy,
    #[error("{0} cannot be encoded: {1}")]
    Encode(&'static str, String),
    #[error("'{0}' is not an Ed25519 public key (64 hex digits)")]
    BadKey(String),
}

/// What the spec signature covers, borrowed from a job or an assignment.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub job_id: &'a str,
    pub action: &'a str,
    pub argv: &'a [String],
    /// Only the names are signed.
    pub env: &'a BTreeMap<String, String>,
    pub timeout_ms: u64,
    pub kill_grace_ms: u64,
    pub artifacts: &'a [String],
    pub sandbox: Option<&'a Sandbox>,
    pub workspace: Option<&'a WorkspaceSpec>,
}

impl<'a> Spec<'a> {
    /// The spec part of an assignment.
    pub fn of(a: &'a Assignment) -> Spec<'a> {
        Spec {
            job_id: &a.job_id,
            action: &a.action,
            argv: &a.argv,
            env: &a.env,
            timeout_ms: a.timeout_ms,
            kill_grace_ms: a.kill_grace_ms,
            artifacts: &a.artifacts,
            sandbox: a.sandbox.as_ref(),
            workspace: a.workspace.as_ref(),
        }
    }

    /// The canonical bytes of the spec message, appended to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        out.extend_from_slice(SPEC_DOMAIN);
        put_str(out, self.job_id);
        put_str(out, self.action);
        put_u64(out, self.argv.len() as u64);
        for arg in self.argv {
            put_str(out, arg);
        }
        put_u64(out, self.env.len() as u64);
        for name in self.env.keys() {
            put_str(out, name);
        }
        put_u64(out, self.timeout_ms);
        put_u64(out, self.kill_grace_ms);
        put_u64(out, self.artifacts.len() as u64);
        for path in self.artifacts {
            put_str(out, path);
        }
        put_json(out, "sandbox", self.sandbox)?;
        put_json(out, "workspace", self.workspace)?;
        Ok(())
    }
}

/// The canonical bytes of the assignment message, appended to `out`.
pub fn encode_assignment(
    a: &Assignment,
    expires_at_ms: i64,
    spec_signature: &[u8; 64],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(ASSIGNMENT_DOMAIN);
    put_str(out, &a.attempt_id);
    put_str(out, &a.job_id);
    out.extend_from_slice(&expires_at_ms.to_be_bytes());
    put_u64(out, a.lease_ms);
    put_u64(out, a.log_cap_bytes);
    put_u64(out, a.env.len() as u64);
    for (name, value) in &a.env {
        put_str(out, name);
        put_str(out, value);
    }
    out.extend_from_slice(spec_signature);
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_json<T: Serialize>(
    out: &mut Vec<u8>,
    what: &'static str,
    v: Option<&T>,
) -> Result<(), Error> {
    let Some(v) = v else {
        out.push(0);
        return Ok(());
    };
    out.push(1);
    let value = serde_json::to_value(v).map_err(|e| Error::Encode(what, e.to_string()))?;
    let mut text = Vec::with_capacity(256);
    canonical_json(&value, &mut text);
    put_u64(out, text.len() as u64);
    out.extend_from_slice(&text);
    Ok(())
}

/// JSON with object keys sorted by their bytes and no whitespace, whatever
/// order the map keeps them in (serde_json's `preserve_order` may be on).
pub fn canonical_json(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::from(key.as_str()).to_string().as_bytes());
                out.push(b':');
                if let Some(item) = map.get(key) {
                    canonical_json(item, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The `N` bytes written as `2 * N` hex digits, or `None`.
pub fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (digit(text[2 * i])? << 4) | digit(text[2 * i + 1])?;
    }
    Some(out)
}

/// A public key as the server publishes it: 64 hex digits.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    to_hex(key.as_bytes())
}

/// Reads a public key written by [`public_key_hex`].
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, Error> {
    from_hex::<32>(text.trim())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| Error::BadKey(text.chars().take(80).collect()))
}

/// The server's side: signs specs when jobs are created and seals
/// assignments when they are handed out. One message buffer per call; an
/// Ed25519 signature costs about 20 µs.
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", public_key_hex(&self.key.verifying_key()))
    }
}

impl Signer {
    /// A signer of the 32-byte secret key (seed).
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        Signer {
            key: SigningKey::from_bytes(seed),
        }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The spec signature (hex) of a job about to be stored.
    pub fn sign_spec(&self, spec: &Spec<'_>) -> Result<String, Error> {
        let mut msg = Vec::with_capacity(1024);
        spec.encode(&mut msg)?;
        Ok(to_hex(&self.key.sign(&msg).to_bytes()))
    }

    /// The signature (hex) of any message (a desired policy's).
    pub fn sign_bytes(&self, msg: &[u8]) -> String {
        to_hex(&self.key.sign(msg).to_bytes())
    }

    /// Seals a fully built assignment (secrets already in its environment)
    /// with its job's spec signature. A job stored without one (created
    /// before assignments were signed) gets no seal: an agent that knows
    /// the key refuses it.
    pub fn seal(
        &self,
        a: &mut Assignment,
        spec_signature: Option<&str>,
        expires_at_ms: i64,
    ) -> Result<(), Error> {
        a.seal = None;
        let Some(spec_hex) = spec_signature else {
            return Ok(());
        };
        let spec = from_hex::<64>(spec_hex).ok_or(Error::Malformed("spec"))?;
        let mut msg = Vec::with_capacity(512);
        encode_assignment(a, expires_at_ms, &spec, &mut msg);
        a.seal = Some(Seal {
            spec: spec_hex.to_owned(),
            assignment: to_hex(&self.key.sign(&msg).to_bytes()),
            expires_at_ms,
        });
        Ok(())
    }
}

/// Checks a signature (hex) made by `Signer::sign_bytes`.
pub fn verify_bytes(key: &VerifyingKey, msg: &[u8], signature: &str) -> Result<(), Error> {
    let sig = from_hex::<64>(signature).ok_or(Error::Malformed("signature"))?;
    key.verify_strict(msg, &Signature::from_bytes(&sig))
        .map_err(|_| Error::Policy)
}

/// The agent's side: checks both signatures of an assignment with the
/// server's public key, then its expiry against `now_ms`.
pub fn verify(a: &Assignment, key: &VerifyingKey, now_ms: i64) -> Result<(), Error> {
    let seal = a.seal.as_ref().ok_or(Error::Unsigned)?;
    let spec_sig = from_hex::<64>(&seal.spec).ok_or(Error::Malformed("spec"))?;
    let hand_out = from_hex::<64>(&seal.assignment).ok_or(Error::Malformed("assignment"))?;
    let mut msg = Vec::with_capacity(1024);
    Spec::of(a).encode(&mut msg)?;
    key.verify_strict(&msg, &Signature::from_bytes(&spec_sig))
        .map_err(|_| Error::Spec)?;
    msg.clear();
    encode_assignment(a, seal.expires_at_ms, &spec_sig, &mut msg);
    key.verify_strict(&msg, &Signature::from_bytes(&hand_out))
        .map_err(|_| Error::Assignment)?;
    if now_ms > seal.expires_at_ms {
        return Err(Error::Expired {
            expires_at_ms: seal.expires_at_ms,
            now_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{ByteSize, DockerSandbox, GitSource, ProcessSandbox, PullPolicy};

    fn signer(seed: u8) -> Signer {
        Signer::from_seed(&[seed; 32])
    }

    fn assignment() -> Assignment {
        Assignment {
            attempt_id: "att-1".into(),
            job_id: "job-1".into(),
            action: "echo".into(),
            argv: vec!["/bin/echo".into(), "hello".into()],
            env: [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two".to_owned()),
            ]
            .into(),
            timeout_ms: 30_000,
            kill_grace_ms: 5_000,
            log_cap_bytes: 1 << 20,
            lease_ms: 30_000,
            artifacts: vec!["out.txt".into()],
            sandbox: Some(Sandbox::Process(ProcessSandbox {
                name: "small".into(),
                open_files: Some(64),
                user: Some("nobody".into()),
                ..ProcessSandbox::default()
            })),
            workspace: None,
            mask: Vec::new(),
            seal: None,
        }
    }

    /// Signs `a` as the server does: the spec at creation, the seal at
    /// hand-out.
    fn sealed(s: &Signer, mut a: Assignment, expires_at_ms: i64) -> Assignment {
        let spec = s.sign_spec(&Spec::of(&a)).unwrap_or_else(|e| panic!("{e}"));
        s.seal(&mut a, Some(&spec), expires_at_ms)
            .unwrap_or_else(|e| panic!("{e}"));
        a
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_sealed_assignment_verifies_and_survives_the_wire() {
        let s = signer(7);
        let a = sealed(&s, assignment(), NOW + 60_000);
        assert_eq!(verify(&a, &s.public_key(), NOW), Ok(()));
        // Through JSON and back, as the agent gets it.
        let text = serde_json::to_string(&a).unwrap_or_else(|e| panic!("{e}"));
        let back: Assignment = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(verify(&back, &s.public_key(), NOW), Ok(()));
    }

    /// A docker sandbox (a float, sizes) and a workspace with a git source,
    /// signed before they are stored as JSON and verified after they are
    /// read back, as the database and the wire do to them.
    #[test]
    fn profiles_survive_a_json_round_trip() {
        let s = signer(7);
        let docker = Sandbox::Docker(DockerSandbox {
            name: "tight".into(),
            description: String::new(),
            image: "debian:bookworm-slim".into(),
            pull: PullPolicy::Never,
            cpus: Some(0.1 + 0.2),
            memory: Some(ByteSize(1536 << 20)),
            pids: Some(64),
            network: "none".into(),
            runtime: Some("runsc".into()),
            read_only: true,
            scratch: ByteSize(64 << 20),
            user: Some("1000:1000".into()),
            capabilities: vec!["CHOWN".into()],
        });
        let mut a = assignment();
        a.sandbox = Some(docker.clone());
        a.workspace = Some(WorkspaceSpec {
            id: "ws-1".into(),
            sandbox: docker,
            git: Some(GitSource {
                repo: "https://example.com/r.git".into(),
                reference: Some("v1".into()),
            }),
        });
        let spec = s.sign_spec(&Spec::of(&a)).unwrap_or_else(|e| panic!("{e}"));
        let stored = serde_json::to_string(&a).unwrap_or_else(|e| panic!("{e}"));
        let mut back: Assignment = serde_json::from_str(&stored).unwrap_or_else(|e| panic!("{e}"));
        s.seal(&mut back, Some(&spec), NOW + 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(verify(&back, &s.public_key(), NOW), Ok(()));
    }

    /// Every covered field, changed after signing, fails verification with
    /// the signature that covers it.
    #[test]
    fn tampered_fields_fail() {
        let s = signer(7);
        let good = sealed(&s, assignment(), NOW + 60_000);
        type Edit = fn(&mut Assignment);
        let cases: &[(&str, Edit, Error)] = &[
            ("argv", |a| a.argv[1] = "bye".into(), Error::Spec),
            ("argv added", |a| a.argv.push("-x".into()), Error::Spec),
            ("action", |a| a.action = "other".into(), Error::Spec),
            ("job id", |a| a.job_id = "job-2".into(), Error::Spec),
            (
                "env name",
                |a| {
                    a.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
                },
                Error::Spec,
            ),
            (
                "env value",
                |a| {
                    a.env.insert("A".into(), "2".into());
                },
                Error::Assignment,
            ),
            ("timeout", |a| a.timeout_ms += 1, Error::Spec),
            ("kill grace", |a| a.kill_grace_ms = 0, Error::Spec),
            (
                "artifacts",
                |a| a.artifacts.push("/etc/shadow".into()),
                Error::Spec,
            ),
            ("sandbox", |a| a.sandbox = None, Error::Spec),
            (
                "sandbox user",
                |a| {
                    if let Some(Sandbox::Process(p)) = &mut a.sandbox {
                        p.user = None;
                    }
                },
                Error::Spec,
            ),
            (
                "attempt id",
                |a| a.attempt_id = "att-2".into(),
                Error::Assignment,
            ),
            ("lease", |a| a.lease_ms = 1, Error::Assignment),
            ("log cap", |a| a.log_cap_bytes = 1, Error::Assignment),
            (
                "expiry",
                |a| {
                    if let Some(seal) = &mut a.seal {
                        seal.expires_at_ms += 3_600_000;
                    }
                },
                Error::Assignment,
            ),
            ("no seal", |a| a.seal = None, Error::Unsigned),
            (
                "spec hex",
                |a| {
                    if let Some(seal) = &mut a.seal {
                        seal.spec.pop();
                    }
                },
                Error::Malformed("spec"),
            ),
        ];
        for (what, edit, want) in cases {
            let mut a = good.clone();
            edit(&mut a);
            assert_eq!(
                verify(&a, &s.public_key(), NOW).as_ref(),
                Err(want),
                "{what}"
            );
        }
    }

    #[test]
    fn another_key_or_an_expired_seal_fails() {
        let s = signer(7);
        let a = sealed(&s, assignment(), NOW + 60_000);
        assert_eq!(verify(&a, &signer(8).public_key(), NOW), Err(Error::Spec));
        // A seal of another key on a spec of the right one.
        let mut mixed = a.clone();
        let spec = mixed.seal.as_ref().map(|x| x.spec.clone());
        signer(8)
            .seal(&mut mixed, spec.as_deref(), NOW + 60_000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(verify(&mixed, &s.public_key(), NOW), Err(Error::Assignment));
        assert_eq!(
            verify(&a, &s.public_key(), NOW + 60_001),
            Err(Error::Expired {
                expires_at_ms: NOW + 60_000,
                now_ms: NOW + 60_001
            })
        );
        assert!(verify(&a, &s.public_key(), NOW + 60_001)
            .map_err(|e| e.to_string())
            .is_err_and(|e| e.contains("expired")));
    }

    #[test]
    fn a_job_without_a_spec_signature_gets_no_seal() {
        let s = signer(7);
        let mut a = assignment();
        s.seal(&mut a, None, NOW).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.seal, None);
        assert_eq!(verify(&a, &s.public_key(), NOW), Err(Error::Unsigned));
    }

    /// The encoding is fixed: these bytes are what version 1 means, and a
    /// change to them breaks every agent in the field.
    #[test]
    fn the_encoding_is_stable() {
        let mut a = assignment();
        a.sandbox = None;
        a.env = [("A".to_owned(), "1".to_owned())].into();
        let mut out = Vec::new();
        Spec::of(&a)
            .encode(&mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut want = SPEC_DOMAIN.to_vec();
        for part in [&b"job-1"[..], b"echo"] {
            want.extend_from_slice(&(part.len() as u64).to_be_bytes());
            want.extend_from_slice(part);
        }
        want.extend_from_slice(&2u64.to_be_bytes());
        for part in [&b"/bin/echo"[..], b"hello"] {
            want.extend_from_slice(&(part.len() as u64).to_be_bytes());
            want.extend_from_slice(part);
        }
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"A");
        want.extend_from_slice(&30_000u64.to_be_bytes());
        want.extend_from_slice(&5_000u64.to_be_bytes());
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(b"out.txt");
        want.extend_from_slice(&[0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = serde_json::json!({"b": 1, "a": {"d": [true, null], "c": "x\"y"}, "e": 1.5});
        let mut out = Vec::new();
        canonical_json(&v, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"a":{"c":"x\"y","d":[true,null]},"b":1,"e":1.5}"#
        );
    }

    #[test]
    fn keys_and_hex_round_trip() {
        let s = signer(9);
        let text = public_key_hex(&s.public_key());
        assert_eq!(text.len(), 64);
        assert_eq!(parse_public_key(&text), Ok(s.public_key()));
        assert!(parse_public_key("zz").is_err());
        assert_eq!(from_hex::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(from_hex::<2>("0aF"), None);
        assert_eq!(to_hex(&[0, 255, 16]), "00ff10");
    }
}
