//! `drover secrets`: the vault. A value is read from stdin or a file,
//! never from argv (which other users of the host can read), and never
//! printed: the server does not answer it back.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use drover_proto::secrets::{RotateMasterKeyResponse, Secret, SetSecretRequest};
use reqwest::Method;

use crate::ops::Target;
use crate::output::{self, Output};

#[derive(Debug, clap::Subcommand)]
pub enum SecretsCommand {
    /// Create or replace a secret; its value comes from stdin or a file.
    Set {
        /// The secret's name: letters, digits and _, not starting with a
        /// digit; tasks refer to it as ${{ secrets.NAME }}.
        name: String,
        /// Read the value from stdin (one trailing newline is dropped).
        #[arg(
            long,
            conflicts_with = "from_file",
            required_unless_present = "from_file"
        )]
        stdin: bool,
        /// Read the value from this file (one trailing newline is dropped).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Only jobs of actions matching one of these globs may use it
        /// (repeatable) [default: any action].
        #[arg(long = "actions", value_name = "GLOB", num_args = 1..)]
        actions: Vec<String>,
        /// Only agents this selector matches may receive it [default: any].
        #[arg(long, value_name = "SELECTOR")]
        target: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Names, scopes and history of the secrets (never their values).
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a secret.
    Rm {
        /// The secret's name.
        name: String,
    },
    /// Re-wrap the vault's data keys under the server's current master key
    /// (the first of its master key list); see docs/SECURITY.md.
    RotateMasterKey {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        bail!(
            "secret name '{}' is invalid: a letter or '_', then letters, digits and '_'",
            name.escape_debug()
        );
    }
    Ok(())
}

/// The value without one trailing newline (what `echo` and editors add).
fn read_value(stdin: bool, file: Option<&PathBuf>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    match file {
        Some(path) if !stdin => {
            bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading the value from stdin")?;
        }
    }
    let Ok(mut value) = String::from_utf8(bytes) else {
        bail!("the value is not UTF-8 text");
    };
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        bail!("the value is empty");
    }
    Ok(value)
}

pub async fn secrets(target: &Target, cmd: SecretsCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        SecretsCommand::Set {
            name,
            stdin,
            from_file,
            actions,
            target,
            output,
        } => {
            check_name(&name)?;
            let value = read_value(stdin, from_file.as_ref())?;
            let s: Secret = api
                .call(
                    Method::PUT,
                    &format!("/secrets/{name}"),
                    Some(&SetSecretRequest {
                        value,
                        actions,
                        target,
                    }),
                    true,
                )
                .await?;
            match output {
                Output::Json => output::json(&s)?,
                Output::Text => println!("set secret {} (version {})", s.name, s.version),
            }
        }
        SecretsCommand::List { output } => {
            let list: Vec<Secret> = api.get("/secrets").await?;
            match output {
                Output::Json => output::json(&list)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                if s.actions.is_empty() {
                                    "*".to_owned()
                                } else {
                                    s.actions.join(",")
                                },
                                s.target.clone().unwrap_or_else(|| "*".to_owned()),
                                s.version.to_string(),
                                format!(
                                    "{} by {}",
                                    s.updated_at.format("%Y-%m-%d %H:%M:%S"),
                                    s.updated_by
                                ),
                            ]
                        })
                        .collect();
                    output::table(
                        &["SECRET", "ACTIONS", "TARGET", "VERSION", "UPDATED"],
                        &rows,
                    );
                }
            }
        }
        SecretsCommand::Rm { name } => {
            check_name(&name)?;
            api.delete(&format!("/secrets/{name}")).await?;
            println!("removed secret {name}");
        }
        SecretsCommand::RotateMasterKey { output } => {
            let r: RotateMasterKeyResponse = api
                .call::<(), _>(Method::POST, "/secrets/rotate-master-key", None, true)
                .await?;
            match output {
                Output::Json => output::json(&r)?,
                Output::Text => println!(
                    "data keys wrapped by master key {} ({} re-wrapped now)",
                    r.master_key_id, r.rewrapped
                ),
            }
        }
    }
    Ok(())
}
