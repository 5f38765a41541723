//! `drover scripts`: the scripts library. `add` uploads a file as a new
//! version (named by the SHA-256 of its content); `show NAME[@VERSION]`
//! prints a version; `diff` compares two versions as a unified diff.

use std::path::PathBuf;

use anyhow::{bail, Context};
use drover_proto::scripts::{
    is_script_name, AddScriptRequest, AddedScript, ScriptContent, ScriptSummary, ScriptVersion,
    MAX_SCRIPT_BYTES,
};

use crate::ops::Target;
use crate::output::{self, Output};

#[derive(Debug, clap::Subcommand)]
pub enum ScriptsCommand {
    /// Upload FILE as a new version of script NAME (the same content again
    /// names the version there is).
    Add {
        /// The script's name: a letter, then letters, digits, '-' and '_'.
        name: String,
        /// The file to upload (UTF-8 text, at most 256 KiB).
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// Absolute path of the program that runs the script
        /// [default: /bin/sh].
        #[arg(long, value_name = "PATH")]
        interpreter: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Every script with its latest version.
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A script's versions (NAME), or one version's content
    /// (NAME@VERSION; VERSION is a SHA-256, a unique prefix of one, or
    /// latest).
    Show {
        /// NAME or NAME@VERSION.
        script: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A unified diff between two versions of a script [default: the one
    /// before the latest, and the latest].
    Diff {
        /// The script's name.
        name: String,
        /// The older version [default: the one before the latest].
        from: Option<String>,
        /// The newer version [default: latest].
        to: Option<String>,
    },
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if !is_script_name(name) {
        bail!(
            "script name '{}' is invalid: a letter, then letters, digits, '-' and '_', at most 64",
            name.escape_debug()
        );
    }
    Ok(())
}

/// NAME or NAME@VERSION.
fn split(script: &str) -> anyhow::Result<(&str, Option<&str>)> {
    let (name, version) = match script.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (script, None),
    };
    check_name(name)?;
    if version.is_some_and(str::is_empty) {
        bail!("'{script}': the version after '@' is empty");
    }
    Ok((name, version))
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn when(v: &ScriptVersion) -> String {
    format!(
        "{} by {}",
        v.created_at.format("%Y-%m-%d %H:%M:%S"),
        v.created_by
    )
}

pub async fn scripts(target: &Target, cmd: ScriptsCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        ScriptsCommand::Add {
            name,
            file,
            interpreter,
            output,
        } => {
            check_name(&name)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if bytes.len() > MAX_SCRIPT_BYTES {
                bail!(
                    "{} is {} bytes; a script may have at most {MAX_SCRIPT_BYTES}",
                    file.display(),
                    bytes.len()
                );
            }
            let Ok(content) = String::from_utf8(bytes) else {
                bail!("{} is not UTF-8 text", file.display());
            };
            let added: AddedScript = api
                .post(
                    "/scripts",
                    &AddScriptRequest {
                        name,
                        content,
                        interpreter,
                    },
                )
                .await?;
            match output {
                Output::Json => output::json(&added)?,
                Output::Text => {
                    let v = &added.version;
                    if added.created {
                        println!("added {}@{} ({} bytes)", v.name, v.sha256, v.size);
                    } else {
                        println!("unchanged: {}@{} is this content already", v.name, v.sha256);
                    }
                }
            }
        }
        ScriptsCommand::List { output } => {
            let list: Vec<ScriptSummary> = api.get("/scripts").await?;
            match output {
                Output::Json => output::json(&list)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                short(&s.latest.sha256).to_owned(),
                                s.versions.to_string(),
                                s.latest.interpreter.clone(),
                                s.latest.size.to_string(),
                                when(&s.latest),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "SCRIPT",
                            "LATEST",
                            "VERSIONS",
                            "INTERPRETER",
                            "BYTES",
                            "ADDED",
                        ],
                        &rows,
                    );
                }
            }
        }
        ScriptsCommand::Show { script, output } => {
            let (name, version) = split(&script)?;
            match version {
                None => {
                    let versions: Vec<ScriptVersion> = api.get(&format!("/scripts/{name}")).await?;
                    match output {
                        Output::Json => output::json(&versions)?,
                        Output::Text => {
                            let rows: Vec<Vec<String>> = versions
                                .iter()
                                .map(|v| {
                                    vec![
                                        v.sha256.clone(),
                                        v.interpreter.clone(),
                                        v.size.to_string(),
                                        when(v),
                                    ]
                                })
                                .collect();
                            output::table(&["VERSION", "INTERPRETER", "BYTES", "ADDED"], &rows);
                        }
                    }
                }
                Some(v) => {
                    let got = fetch(&api, name, v).await?;
                    match output {
                        Output::Json => output::json(&got)?,
                        Output::Text => print!("{}", got.content),
                    }
                }
            }
        }
        ScriptsCommand::Diff { name, from, to } => {
            check_name(&name)?;
            let (from, to) = match (from, to) {
                (Some(f), Some(t)) => (f, t),
                (Some(f), None) => (f, "latest".to_owned()),
                (None, _) => {
                    let versions: Vec<ScriptVersion> = api.get(&format!("/scripts/{name}")).await?;
                    match versions.as_slice() {
                        [latest, before, ..] => (before.sha256.clone(), latest.sha256.clone()),
                        _ => bail!("script '{name}' has one version: name two to compare"),
                    }
                }
            };
            let a = fetch(&api, &name, &from).await?;
            let b = fetch(&api, &name, &to).await?;
            let diff = similar::TextDiff::from_lines(&a.content, &b.content);
            print!(
                "{}",
                diff.unified_diff().context_radius(3).header(
                    &format!("{name}@{}", short(&a.version.sha256)),
                    &format!("{name}@{}", short(&b.version.sha256)),
                )
            );
        }
    }
    Ok(())
}

async fn fetch(
    api: &crate::client::Api,
    name: &str,
    version: &str,
) -> anyhow::Result<ScriptContent> {
    if !(version == "latest" || version.chars().all(|c| c.is_ascii_hexdigit())) {
        bail!("version '{version}' is not latest, a SHA-256 or a prefix of one");
    }
    api.get(&format!("/scripts/{name}/versions/{version}"))
        .await
}
