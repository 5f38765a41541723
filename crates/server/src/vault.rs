//! The secrets vault: values sealed with XChaCha20-Poly1305 under a random
//! data key, which is stored only wrapped (sealed) by a master key that
//! never enters the database.
//!
//! Key design decision: the master key is a *list* — the current key first,
//! then previous ones — and every wrapped data key names the master key
//! that wraps it by id (a hash of the key). A replica can therefore unwrap
//! with an old or a new key during a rotation, and rotation only re-wraps
//! the data key, so values never need re-encrypting and a replica that
//! unwrapped the data key at start keeps working throughout.
//!
//! Every value is sealed with its name as associated data, so a sealed
//! value moved to another name (or another webhook) does not open.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chrono::Utc;
use drover_store::vault::WrappedKey;
use drover_store::{AgentRecord, Store};
use sha2::{Digest, Sha256};

use crate::selector::Selector;

/// Prefix of a sealed value: version and the data key's id follow.
pub const SEALED_PREFIX: &str = "v1:";
/// Id of the one data key the vault creates.
const DATA_KEY_ID: &str = "data-1";
/// Associated data of webhook secrets (global webhooks and the deliveries
/// copied from them share the sealed text).
pub const WEBHOOK_AAD: &str = "webhook-secret";
/// What a secret's value becomes in logs, outputs, events and errors.
pub const MASK: &str = "***";
/// Longest secret value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

const NONCE_LEN: usize = 24;

/// Why the vault cannot start, seal or open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("master key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: line {line}: a master key is 64 hex characters (32 bytes)")]
    KeyFormat { origin: String, line: usize },
    #[error("{0} holds no master key")]
    NoKey(String),
    #[error(
        "the vault's data key '{data_key}' is wrapped by master key {wanted}, but {origin} holds \
         only {configured}: start with the master key the vault was created with (list previous \
         keys after the current one while rotating)"
    )]
    UnknownMasterKey {
        data_key: String,
        wanted: String,
        configured: String,
        origin: String,
    },
    #[error(
        "the vault's data key '{data_key}' does not open with master key {master_key}: the key \
         or the stored data key was changed"
    )]
    Unwrap {
        data_key: String,
        master_key: String,
    },
    #[error("sealed value of {aad} is malformed")]
    Malformed { aad: String },
    #[error("sealed value of {aad} names data key '{key}', which the vault does not hold")]
    UnknownDataKey { aad: String, key: String },
    #[error("sealed value of {aad} does not open: it was altered or belongs to another name")]
    Open { aad: String },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error(transparent)]
    Store(#[from] drover_store::Error),
}

/// A 32-byte key.
#[derive(Clone)]
struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // Best effort: the bytes do not outlive the key in this struct.
        self.0 = [0; 32];
    }
}

fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).map_err(|e| Error::Random(e.to_string()))?;
    Ok(buf)
}

/// Seals `plain` under `key` with `aad` as associated data:
/// base64(nonce || ciphertext || tag), a fresh random nonce each time.
fn seal_raw(key: &Key, aad: &str, plain: &[u8]) -> Result<String, Error> {
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let nonce = random::<NONCE_LEN>()?;
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| Error::Open {
            aad: aad.to_owned(),
        })?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

/// Opens what [`seal_raw`] sealed; `None` when it does not authenticate.
fn open_raw(key: &Key, aad: &str, sealed: &str) -> Option<Vec<u8>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .ok()?;
    if bytes.len() < NONCE_LEN + 16 {
        return None;
    }
    let (nonce, ct) = bytes.split_at(NONCE_LEN);
    XChaCha20Poly1305::new((&key.0).into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: aad.as_bytes(),
            },
        )
        .ok()
}

/// A master key and its id (the first 16 hex digits of a hash of it).
#[derive(Debug, Clone)]
struct MasterKey {
    id: String,
    key: Key,
}

impl MasterKey {
    fn new(bytes: [u8; 32]) -> MasterKey {
        let digest = Sha256::new()
            .chain_update(b"drover master key id\0")
            .chain_update(bytes)
            .finalize();
        MasterKey {
            id: hex::encode(&digest[..8]),
            key: Key(bytes),
        }
    }
}

/// The configured master keys: the current one first, then previous ones
/// that still unwrap data keys during a rotation.
#[derive(Debug, Clone)]
pub struct MasterKeys {
    keys: Vec<MasterKey>,
    /// Where they came from, for messages (never the keys themselves).
    source: String,
}

/// Where the master keys come from.
#[derive(Clone)]
pub enum MasterKeySource {
    /// `DROVER_MASTER_KEY`: keys separated by commas or whitespace.
    Variable(String),
    /// A file of one key per line (created with a new key when missing).
    File(PathBuf),
}

impl std::fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterKeySource::Variable(_) => f.write_str("Variable(DROVER_MASTER_KEY)"),
            MasterKeySource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl MasterKeys {
    /// Parses keys: 64 hex characters each, one per line (or separated by
    /// commas); blank lines and `#` comments are skipped.
    pub fn parse(text: &str, source: &str) -> Result<MasterKeys, Error> {
        let mut keys = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            for word in line.split(|c: char| c == ',' || c.is_whitespace()) {
                if word.is_empty() {
                    continue;
                }
                let bytes: [u8; 32] = hex::decode(word)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::KeyFormat {
                        origin: source.to_owned(),
                        line: i + 1,
                    })?;
                let key = MasterKey::new(bytes);
                if seen.insert(key.id.clone()) {
                    keys.push(key);
                }
            }
        }
        if keys.is_empty() {
            return Err(Error::NoKey(source.to_owned()));
        }
        Ok(MasterKeys {
            keys,
            source: source.to_owned(),
        })
    }

    /// Loads the keys from the variable, or from the file, which is
    /// created (mode 0600) with a new random key when it does not exist.
    pub fn load(source: &MasterKeySource) -> Result<MasterKeys, Error> {
        match source {
            MasterKeySource::Variable(text) => MasterKeys::parse(text, "DROVER_MASTER_KEY"),
            MasterKeySource::File(path) => {
                let name = format!("master key file {}", path.display());
                let io = |source| Error::KeyFile {
                    path: path.display().to_string(),
                    source,
                };
                match std::fs::read_to_string(path) {
                    Ok(text) => MasterKeys::parse(&text, &name),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let bytes = random::<32>()?;
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent).map_err(io)?;
                        }
                        crate::private::create_file(
                            path,
                            format!("{}\n", hex::encode(bytes)).as_bytes(),
                        )
                        .map_err(io)?;
                        tracing::info!(path = %path.display(), "created a new master key");
                        Ok(MasterKeys {
                            keys: vec![MasterKey::new(bytes)],
                            source: name,
                        })
                    }
                    Err(e) => Err(io(e)),
                }
            }
        }
    }

    /// The id of the current key.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    fn find(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

fn wrap_aad(data_key_id: &str) -> String {
    format!("drover data key {data_key_id}")
}

/// The opened vault: master keys and the unwrapped data keys.
#[derive(Debug)]
pub struct Vault {
    master: MasterKeys,
    data: BTreeMap<String, Key>,
    /// The values to mask in each attempt's output, by attempt id: what
    /// dispatch handed out, or read again when another replica did. A
    /// cache: forgotten at the result, emptied when full.
    masks: std::sync::Mutex<std::collections::HashMap<String, Masks>>,
}

/// The secret values of one attempt.
pub type Masks = Arc<Vec<String>>;

/// Most attempts whose masks are kept in memory.
const MAX_CACHED_MASKS: usize = 50_000;

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub master_key_id: String,
    pub rewrapped: u64,
}

impl Vault {
    /// Opens the vault: unwraps the stored data keys, or creates the first
    /// one. Fails when a data key's master key is not configured or does
    /// not open it.
    pub async fn open(store: &Store, master: MasterKeys) -> Result<Vault, Error> {
        let mut stored = store.vault_keys().await?;
        if stored.is_empty() {
            let key = Key(random::<32>()?);
            let current = &master.keys[0];
            let wrapped = seal_raw(&current.key, &wrap_aad(DATA_KEY_ID), &key.0)?;
            // Another replica may create it at the same moment: one wins,
            // both read what was stored.
            store
                .insert_vault_key(
                    &WrappedKey {
                        id: DATA_KEY_ID.to_owned(),
                        master_key_id: current.id.clone(),
                        wrapped,
                    },
                    Utc::now(),
                )
                .await?;
            stored = store.vault_keys().await?;
        }
        let mut data = BTreeMap::new();
        for w in stored {
            let key = unwrap(&master, &w)?;
            data.insert(w.id, key);
        }
        Ok(Vault {
            master,
            data,
            masks: Default::default(),
        })
    }

    /// The values of the secrets `env` references, for `action` on
    /// `agent`: `Ok(Err(reason))` when one is missing or its scope refuses
    /// them (the reason names the secret, never a value).
    pub async fn resolve(
        &self,
        store: &Store,
        action: &str,
        env: &BTreeMap<String, String>,
        agent: &AgentRecord,
    ) -> Result<Result<BTreeMap<String, String>, String>, Error> {
        let names = match env_refs(env) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        let mut values = BTreeMap::new();
        for name in names {
            let Some(secret) = store.secret(&name).await? else {
                return Ok(Err(format!(
                    "secret '{name}' does not exist (removed after the job was created)"
                )));
            };
            let scope = Scope {
                name: &name,
                actions: &secret.actions,
                target: secret.target.as_deref(),
            };
            if let Some(why) = scope.refusal(action, agent) {
                return Ok(Err(why));
            }
            let value = self.unseal(&secret_aad(&name), &secret.sealed)?;
            values.insert(name, value);
        }
        Ok(Ok(values))
    }

    /// Remembers what to mask in an attempt's output.
    pub fn remember(&self, attempt: &str, values: Vec<String>) -> Masks {
        let values = Arc::new(values);
        if let Ok(mut m) = self.masks.lock() {
            if m.len() >= MAX_CACHED_MASKS {
                m.clear();
            }
            m.insert(attempt.to_owned(), values.clone());
        }
        values
    }

    /// Forgets an attempt's masks (its result is in).
    pub fn forget(&self, attempt: &str) {
        if let Ok(mut m) = self.masks.lock() {
            m.remove(attempt);
        }
    }

    /// What to mask in an attempt's output: remembered at dispatch, or
    /// read from its job's references and the current values.
    pub async fn masks(&self, store: &Store, attempt: &str) -> Result<Masks, Error> {
        if let Some(found) = self.masks.lock().ok().and_then(|m| m.get(attempt).cloned()) {
            return Ok(found);
        }
        let mut values = Vec::new();
        if let Some(a) = store.attempt_env(attempt).await? {
            let names = env_refs(&a.env).unwrap_or_default();
            for name in names {
                if let Some(secret) = store.secret(&name).await? {
                    values.push(self.unseal(&secret_aad(&name), &secret.sealed)?);
                }
            }
        }
        Ok(self.remember(attempt, values))
    }

    /// Re-wraps every data key not wrapped by the current master key under
    /// it. The data keys themselves do not change, so sealed values stay
    /// readable and replicas keep working.
    pub async fn rotate(&self, store: &Store) -> Result<Rotation, Error> {
        let current = &self.master.keys[0];
        let mut changes = Vec::new();
        for w in store.vault_keys().await? {
            if w.master_key_id == current.id {
                continue;
            }
            let key = unwrap(&self.master, &w)?;
            let wrapped = seal_raw(&current.key, &wrap_aad(&w.id), &key.0)?;
            changes.push((
                WrappedKey {
                    id: w.id,
                    master_key_id: current.id.clone(),
                    wrapped,
                },
                w.master_key_id,
            ));
        }
        let rewrapped = store.rewrap_vault_keys(&changes, Utc::now()).await?;
        Ok(Rotation {
            master_key_id: current.id.clone(),
            rewrapped,
        })
    }

    /// The id of the current master key.
    pub fn master_key_id(&self) -> &str {
        self.master.current_id()
    }

    /// Seals a value under the data key, bound to `aad` (a secret's name).
    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, Error> {
        let (id, key) = self
            .data
            .iter()
            .next_back()
            .ok_or_else(|| Error::UnknownDataKey {
                aad: aad.to_owned(),
                key: DATA_KEY_ID.to_owned(),
            })?;
        Ok(format!(
            "{SEALED_PREFIX}{id}:{}",
            seal_raw(key, aad, plain)?
        ))
    }

    /// Opens a sealed value bound to `aad`.
    pub fn unseal_bytes(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, Error> {
        let malformed = || Error::Malformed {
            aad: aad.to_owned(),
        };
        let rest = sealed.strip_prefix(SEALED_PREFIX).ok_or_else(malformed)?;
        let (id, body) = rest.split_once(':').ok_or_else(malformed)?;
        let key = self.data.get(id).ok_or_else(|| Error::UnknownDataKey {
            aad: aad.to_owned(),
            key: id.to_owned(),
        })?;
        open_raw(key, aad, body).ok_or_else(|| Error::Open {
            aad: aad.to_owned(),
        })
    }

    /// Opens a sealed text value bound to `aad`.
    pub fn unseal(&self, aad: &str, sealed: &str) -> Result<String, Error> {
        String::from_utf8(self.unseal_bytes(aad, sealed)?).map_err(|_| Error::Open {
            aad: aad.to_owned(),
        })
    }

    /// Seals a webhook secret.
    pub fn seal_webhook_secret(&self, secret: &str) -> Result<String, Error> {
        self.seal(WEBHOOK_AAD, secret.as_bytes())
    }

    /// A webhook secret in clear: sealed ones are opened; one still in
    /// clear (written by an older server before the back-fill) is used as
    /// it is.
    pub fn webhook_secret(&self, stored: &str) -> Result<String, Error> {
        if stored.starts_with(SEALED_PREFIX) {
            self.unseal(WEBHOOK_AAD, stored)
        } else {
            Ok(stored.to_owned())
        }
    }

    /// Seals the webhook secrets still stored in clear (global webhooks
    /// and pending deliveries); run at every start, so an upgrade encrypts
    /// what an older version stored.
    pub async fn backfill_webhook_secrets(&self, store: &Store) -> Result<usize, Error> {
        let mut n = 0;
        for deliveries in [false, true] {
            let clear = if deliveries {
                store.clear_delivery_secrets(SEALED_PREFIX).await?
            } else {
                store.clear_webhook_secrets(SEALED_PREFIX).await?
            };
            let mut rows = Vec::with_capacity(clear.len());
            for (id, secret) in clear {
                let sealed = self.seal_webhook_secret(&secret)?;
                rows.push((id, secret, sealed));
            }
            n += rows.len();
            if !rows.is_empty() {
                store.seal_webhook_secrets(deliveries, &rows).await?;
            }
        }
        Ok(n)
    }
}

fn unwrap(master: &MasterKeys, w: &WrappedKey) -> Result<Key, Error> {
    let mk = master
        .find(&w.master_key_id)
        .ok_or_else(|| Error::UnknownMasterKey {
            data_key: w.id.clone(),
            wanted: w.master_key_id.clone(),
            configured: master
                .keys
                .iter()
                .map(|k| k.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            origin: master.source.clone(),
        })?;
    let unwrap_err = || Error::Unwrap {
        data_key: w.id.clone(),
        master_key: mk.id.clone(),
    };
    let bytes = open_raw(&mk.key, &wrap_aad(&w.id), &w.wrapped).ok_or_else(unwrap_err)?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| unwrap_err())?;
    Ok(Key(key))
}

impl From<Error> for crate::error::ApiError {
    fn from(e: Error) -> crate::error::ApiError {
        match e {
            Error::Store(s) => s.into(),
            other => crate::error::ApiError::internal("the secrets vault", &other),
        }
    }
}

// ---- names, references, scope and masking (pure) ----

/// Whether `name` is a valid secret name: a letter or `_`, then letters,
/// digits and `_`, at most 128 characters.
pub fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The associated data of a secret's value.
pub fn secret_aad(name: &str) -> String {
    format!("secret:{name}")
}

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

/// The secrets a value references as `${{ secrets.NAME }}`, in order.
/// Other `${{ }}` expressions are not this function's business.
pub fn secret_refs(value: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        let expr = after[..end].trim();
        if let Some(name) = expr.strip_prefix("secrets.") {
            if !is_secret_name(name) {
                return Err(format!("'{name}' is not a valid secret name"));
            }
            out.push(name.to_owned());
        }
        rest = &after[end + CLOSE.len()..];
    }
    Ok(out)
}

/// Whether a value mentions a secret at all (used to refuse one where a
/// secret may not go).
pub fn mentions_secret(value: &str) -> bool {
    let mut rest = value;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        if after[..end].trim().starts_with("secrets.") {
            return true;
        }
        rest = &after[end + CLOSE.len()..];
    }
    false
}

/// Every secret the variables reference, each once.
pub fn env_refs(env: &BTreeMap<String, String>) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for (name, value) in env {
        out.extend(secret_refs(value).map_err(|e| format!("env.{name}: {e}"))?);
    }
    Ok(out)
}

/// Replaces every `${{ secrets.NAME }}` with its value.
pub fn substitute(value: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        out.push_str(&rest[..start]);
        let expr = after[..end].trim();
        match expr.strip_prefix("secrets.").and_then(|n| values.get(n)) {
            Some(v) => out.push_str(v),
            None => out.push_str(&rest[start..start + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    out.push_str(rest);
    out
}

/// `*` (any run of characters) and `?` (one character) globs.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A secret's scope: the actions and the agents it may reach.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    pub name: &'a str,
    pub actions: &'a [String],
    pub target: Option<&'a str>,
}

impl Scope<'_> {
    /// Why the secret may not be given to `action` on `agent`, if it may
    /// not. The reason names the secret, never its value.
    pub fn refusal(&self, action: &str, agent: &AgentRecord) -> Option<String> {
        if !self.actions.is_empty() && !self.actions.iter().any(|g| glob_match(g, action)) {
            return Some(format!(
                "secret '{}' may not be used by action '{action}' (its actions: {})",
                self.name,
                self.actions.join(", ")
            ));
        }
        if let Some(target) = self.target {
            let allowed = Selector::parse(target).is_ok_and(|s| s.matches(agent));
            if !allowed {
                return Some(format!(
                    "secret '{}' may not be sent to agent {} (its target: {target})",
                    self.name, agent.id
                ));
            }
        }
        None
    }
}

/// Replaces every occurrence of the values in `text` with `***`, longest
/// value first (so a value containing another is masked whole).
pub fn mask(text: &str, values: &[String]) -> String {
    let mut sorted: Vec<&String> = values.iter().filter(|v| !v.is_empty()).collect();
    sorted.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = text.to_owned();
    for v in sorted {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), MASK);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn keys(n: u8) -> MasterKeys {
        MasterKeys::parse(&hex::encode([n; 32]), "test").unwrap()
    }

    fn vault(master: &MasterKeys) -> Vault {
        let key = Key([7; 32]);
        let mut data = BTreeMap::new();
        data.insert(DATA_KEY_ID.to_owned(), key);
        Vault {
            master: master.clone(),
            data,
            masks: Default::default(),
        }
    }

    #[test]
    fn a_sealed_value_opens_only_unchanged_under_its_name_and_key() {
        let v = vault(&keys(1));
        let sealed = v.seal(&secret_aad("DB"), b"hunter2").unwrap();
        assert!(sealed.starts_with("v1:data-1:"));
        assert!(!sealed.contains("hunter2"));
        assert_eq!(v.unseal(&secret_aad("DB"), &sealed).unwrap(), "hunter2");
        // A fresh nonce each time.
        assert_ne!(sealed, v.seal(&secret_aad("DB"), b"hunter2").unwrap());

        // Tampered: flip one bit of the ciphertext.
        let (head, body) = sealed.rsplit_once(':').unwrap();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = format!(
            "{head}:{}",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        );
        assert!(matches!(
            v.unseal(&secret_aad("DB"), &tampered),
            Err(Error::Open { .. })
        ));
        // Moved to another name.
        let err = v.unseal(&secret_aad("OTHER"), &sealed).unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        assert_eq!(
            err.to_string(),
            "sealed value of secret:OTHER does not open: it was altered or belongs to another name"
        );
        // Another data key.
        let mut other = vault(&keys(1));
        other.data.insert(DATA_KEY_ID.to_owned(), Key([8; 32]));
        assert!(matches!(
            other.unseal(&secret_aad("DB"), &sealed),
            Err(Error::Open { .. })
        ));
        // Garbage.
        for bad in ["", "v1:", "v1:data-1:", "v1:data-1:!!", "v2:data-1:AAAA"] {
            assert!(v.unseal(&secret_aad("DB"), bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            v.unseal(&secret_aad("DB"), "v1:data-9:AAAA"),
            Err(Error::UnknownDataKey { .. })
        ));
    }

    #[test]
    fn a_wrapped_data_key_opens_only_with_its_master_key() {
        let k1 = keys(1);
        let data = Key([9; 32]);
        let wrapped = WrappedKey {
            id: DATA_KEY_ID.into(),
            master_key_id: k1.current_id().into(),
            wrapped: seal_raw(&k1.keys[0].key, &wrap_aad(DATA_KEY_ID), &data.0).unwrap(),
        };
        assert_eq!(unwrap(&k1, &wrapped).unwrap().0, [9; 32]);
        // Wrong master key: named by id, and the message says what to do.
        let k2 = keys(2);
        let err = unwrap(&k2, &wrapped).unwrap_err();
        assert!(matches!(err, Error::UnknownMasterKey { .. }));
        assert!(err.to_string().contains(k1.current_id()), "{err}");
        assert!(err.to_string().contains(k2.current_id()), "{err}");
        // A key that claims the right id but is another key.
        let mut forged = k2.clone();
        forged.keys[0].id = k1.current_id().to_owned();
        assert!(matches!(
            unwrap(&forged, &wrapped),
            Err(Error::Unwrap { .. })
        ));
        // The previous key in the list still opens it (rotation).
        let both = MasterKeys::parse(
            &format!("{}\n{}\n", hex::encode([2u8; 32]), hex::encode([1u8; 32])),
            "test",
        )
        .unwrap();
        assert_eq!(both.current_id(), k2.current_id());
        assert_eq!(unwrap(&both, &wrapped).unwrap().0, [9; 32]);
        // Another data key id as associated data does not open.
        let moved = WrappedKey {
            id: "data-2".into(),
            ..wrapped
        };
        assert!(matches!(unwrap(&k1, &moved), Err(Error::Unwrap { .. })));
    }

    #[test]
    fn master_key_text_is_checked() {
        assert!(MasterKeys::parse("# only a comment\n\n", "f").is_err());
        let err =
            MasterKeys::parse(&format!("{}\nnothex\n", hex::encode([1u8; 32])), "f").unwrap_err();
        assert_eq!(
            err.to_string(),
            "f: line 2: a master key is 64 hex characters (32 bytes)"
        );
        let two = MasterKeys::parse(
            &format!("{}, {}", hex::encode([1u8; 32]), hex::encode([2u8; 32])),
            "v",
        )
        .unwrap();
        assert_eq!(two.keys.len(), 2);
        assert_eq!(two.current_id().len(), 16);
    }

    #[test]
    fn references_substitution_and_masks() {
        let env = BTreeMap::from([
            ("A".to_owned(), "${{ secrets.TOKEN }}".to_owned()),
            (
                "B".to_owned(),
                "Bearer ${{secrets.TOKEN}} ${{ secrets.X_2 }}".to_owned(),
            ),
            ("C".to_owned(), "plain ${{ inputs.x }}".to_owned()),
        ]);
        let refs = env_refs(&env).unwrap();
        assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["TOKEN", "X_2"]);
        assert!(secret_refs("${{ secrets.no-dash }}").is_err());
        assert!(mentions_secret("x ${{ secrets.A }}"));
        assert!(!mentions_secret("x ${{ inputs.A }}"));
        let values = BTreeMap::from([
            ("TOKEN".to_owned(), "t0k".to_owned()),
            ("X_2".to_owned(), "xx".to_owned()),
        ]);
        assert_eq!(substitute(&env["B"], &values), "Bearer t0k xx");
        assert_eq!(substitute(&env["C"], &values), "plain ${{ inputs.x }}");
        assert_eq!(
            mask("a t0k b t0kxx", &["t0k".into(), "t0kxx".into(), "".into()]),
            "a *** b ***"
        );
    }

    /// On both engines: the first start creates one data key; clear
    /// webhook secrets are sealed at start; a rotation re-wraps under the
    /// new key, after which the old key alone no longer opens the vault.
    #[tokio::test]
    async fn open_backfill_and_rotate_on_a_real_store() {
        for backend in drover_store::testing::BACKENDS {
            let db = drover_store::testing::TestDb::new(backend).await;
            let store = Store::open(&drover_store::Options {
                url: db.url.clone(),
                max_connections: 2,
            })
            .await
            .unwrap();
            let id = store
                .create_webhook(
                    "https://example.com/h",
                    "clear-secret-123456",
                    &[],
                    "admin",
                    Utc::now(),
                )
                .await
                .unwrap();
            let old = keys(1);
            let v = Vault::open(&store, old.clone()).await.unwrap();
            assert_eq!(store.vault_keys().await.unwrap().len(), 1, "{backend}");
            assert_eq!(v.backfill_webhook_secrets(&store).await.unwrap(), 1);
            assert_eq!(v.backfill_webhook_secrets(&store).await.unwrap(), 0);
            let hook = store.list_webhooks().await.unwrap();
            let hook = hook.iter().find(|h| h.id == id).unwrap();
            assert!(hook.secret.starts_with(SEALED_PREFIX), "{backend}");
            assert_eq!(
                v.webhook_secret(&hook.secret).unwrap(),
                "clear-secret-123456"
            );
            let sealed = v.seal(&secret_aad("A"), b"value").unwrap();

            // A second replica opens the same data key.
            let again = Vault::open(&store, old.clone()).await.unwrap();
            assert_eq!(again.unseal(&secret_aad("A"), &sealed).unwrap(), "value");

            let both = MasterKeys::parse(
                &format!("{}\n{}", hex::encode([2u8; 32]), hex::encode([1u8; 32])),
                "test",
            )
            .unwrap();
            let rotating = Vault::open(&store, both).await.unwrap();
            let r = rotating.rotate(&store).await.unwrap();
            assert_eq!(r.rewrapped, 1, "{backend}");
            assert_eq!(rotating.rotate(&store).await.unwrap().rewrapped, 0);
            let stored = store.vault_keys().await.unwrap();
            assert!(stored
                .iter()
                .all(|k| k.master_key_id == keys(2).current_id()));
            let new_only = Vault::open(&store, keys(2)).await.unwrap();
            assert_eq!(new_only.unseal(&secret_aad("A"), &sealed).unwrap(), "value");
            let err = Vault::open(&store, old).await.unwrap_err();
            assert!(matches!(err, Error::UnknownMasterKey { .. }), "{err}");
            store.close().await;
        }
    }

    #[test]
    fn scope_globs() {
        for (p, t, want) in [
            ("deploy-*", "deploy-web", true),
            ("deploy-*", "build", false),
            ("*", "x", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("exact", "exact", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} {t}");
        }
        assert!(is_secret_name("DB_PASS"));
        assert!(!is_secret_name("1A"));
        assert!(!is_secret_name("a-b"));
    }
}
