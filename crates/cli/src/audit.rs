//! `drover audit verify` and `drover audit export` (`drover audit list` is
//! in `jobs`).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use drover_proto::audit::AuditVerification;

use crate::jobs::q;
use crate::ops::Target;
use crate::output::{self, Output};

/// Exit status of `drover audit verify` when the chain is broken.
pub const EXIT_CHAIN_BROKEN: u8 = 5;

/// The audit log's hash chain is broken; main turns this into exit
/// status 5.
#[derive(Debug, thiserror::Error)]
#[error("the audit log was tampered with: {message} ({checked} rows before it are sound)")]
pub struct ChainBroken {
    pub message: String,
    pub checked: u64,
}

pub async fn verify(target: &Target, output: Output) -> anyhow::Result<()> {
    let api = target.api()?;
    let v: AuditVerification = api.get("/audit/verify").await?;
    match output {
        Output::Json => output::json(&v)?,
        Output::Text if v.ok => println!(
            "OK: {} rows, chain head row {} sha256 {}",
            v.count, v.head_id, v.head_hash
        ),
        Output::Text => {}
    }
    match v.broken {
        None if v.ok => Ok(()),
        Some(b) => Err(ChainBroken {
            message: b.message,
            checked: v.count,
        }
        .into()),
        None => Err(ChainBroken {
            message: "the server reported a broken chain without saying where".into(),
            checked: v.count,
        }
        .into()),
    }
}

pub async fn export(
    target: &Target,
    since: Option<DateTime<Utc>>,
    format: &str,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let api = target.api()?;
    let mut path = format!("/audit/export?format={}", q(format));
    if let Some(at) = since {
        path.push_str(&format!("&since={}", q(&at.to_rfc3339())));
    }
    let mut resp = api.open(&path, &[]).await?;
    // A file is written beside its final name and renamed once complete,
    // so an interrupted export never looks like a whole one.
    let (mut sink, partial): (Box<dyn Write>, Option<std::path::PathBuf>) = match out {
        Some(file) => {
            let mut name = file.as_os_str().to_owned();
            name.push(".partial");
            let partial = std::path::PathBuf::from(name);
            let f = std::fs::File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            (Box::new(std::io::BufWriter::new(f)), Some(partial))
        }
        None => (
            Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            None,
        ),
    };
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = resp.chunk().await.context("reading the export")? {
            sink.write_all(&chunk).context("writing the export")?;
        }
        sink.flush().context("writing the export")?;
        Ok(())
    }
    .await;
    drop(sink);
    match (result, partial, out) {
        (Ok(()), Some(partial), Some(file)) => std::fs::rename(&partial, file)
            .with_context(|| format!("cannot rename {} to {}", partial.display(), file.display())),
        (Err(e), Some(partial), _) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
        (r, _, _) => r,
    }
}
