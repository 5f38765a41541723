//! The artifact store: files collected from agents, kept behind one trait,
//! `object_store::ObjectStore`, so a local directory (the default) and any
//! S3-compatible service are the same to the rest of the server.
//!
//! An upload streams to the store while its sha256 and size are computed;
//! a file over the size limit or whose digest differs from the one the
//! agent announced is aborted and never recorded.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::buffered::BufWriter;
use object_store::path::Path as StorePath;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};

/// Why the artifact store cannot be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store '{url}': {message}")]
    Open { url: String, message: String },
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    #[error("artifact key '{0}' is not a valid path")]
    Key(String),
    #[error("the file is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error(
        "sha256 mismatch: the agent announced {announced}, the bytes received hash to {actual}"
    )]
    Digest { announced: String, actual: String },
    #[error("reading the upload failed: {0}")]
    Body(String),
}

/// Where artifacts live.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    /// For logs: the URL without credentials.
    pub describe: String,
}

impl ArtifactStore {
    /// Opens `url`: `s3://BUCKET[/PREFIX]` (settings from the `AWS_*`
    /// variables), `file:///DIR`, or a plain directory path.
    pub fn open(url: &str) -> Result<ArtifactStore, ArtifactError> {
        let err = |message: String| ArtifactError::Open {
            url: url.to_owned(),
            message,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(err("no bucket named".into()));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| err(e.to_string()))?;
            let inner: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            };
            return Ok(ArtifactStore {
                inner,
                describe: format!("s3://{bucket}/{}", prefix.trim_matches('/')),
            });
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        if dir.contains("://") {
            return Err(err(
                "use a directory, file:///DIR or s3://BUCKET[/PREFIX]".into()
            ));
        }
        crate::private::dir(std::path::Path::new(dir))
            .map_err(|e| err(format!("cannot create {dir}: {e}")))?;
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| err(e.to_string()))?;
        Ok(ArtifactStore {
            inner: Arc::new(local),
            describe: format!("file://{dir}"),
        })
    }

    /// Streams `body` to `key`, checking size and digest. Returns the size
    /// and hex sha256.
    pub async fn put<S, E>(
        &self,
        key: &str,
        mut body: S,
        max: u64,
        announced_sha256: &str,
    ) -> Result<(u64, String), ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = StorePath::parse(key).map_err(|_| ArtifactError::Key(key.to_owned()))?;
        let mut writer = BufWriter::new(self.inner.clone(), path);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let failed = loop {
            match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(ArtifactError::Body(e.to_string())),
                Some(Ok(chunk)) => {
                    size += chunk.len() as u64;
                    if size > max {
                        break Some(ArtifactError::TooLarge { max });
                    }
                    hasher.update(&chunk);
                    if let Err(e) = writer.put(chunk).await {
                        break Some(e.into());
                    }
                }
            }
        };
        let actual = hex::encode(hasher.finalize());
        let failed = failed.or_else(|| {
            (!actual.eq_ignore_ascii_case(announced_sha256)).then(|| ArtifactError::Digest {
                announced: announced_sha256.to_owned(),
                actual: actual.clone(),
            })
        });
        if let Some(e) = failed {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(key, error = %abort, "aborting an artifact upload failed");
            }
            return Err(e);
        }
        tokio::io::AsyncWriteExt::shutdown(&mut writer)
            .await
            .map_err(|e| ArtifactError::Body(e.to_string()))?;
        Ok((size, actual))
    }

    /// The content of `key` as a stream of chunks.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, object_store::Error>>, ArtifactError> {
        let path = StorePath::parse(key).map_err(|_| ArtifactError::Key(key.to_owned()))?;
        Ok(self.inner.get(&path).await?.into_stream())
    }
}

/// The key of an attempt's file: under its run and task when it has them.
pub fn key(
    run_id: Option<&str>,
    task_id: Option<&str>,
    job_id: &str,
    attempt_id: &str,
    path: &str,
) -> String {
    match (run_id, task_id) {
        (Some(run), Some(task)) => format!("runs/{run}/{task}/{attempt_id}/{path}"),
        _ => format!("jobs/{job_id}/{attempt_id}/{path}"),
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn a_local_store_keeps_what_matches_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(&dir.path().display().to_string()).expect("open");
        let sha = hex::encode(Sha256::digest(b"hello world"));
        let (size, got) = store
            .put(
                "runs/r/t/a/out.txt",
                chunks(&[b"hello ", b"world"]),
                100,
                &sha,
            )
            .await
            .expect("stored");
        assert_eq!((size, got.as_str()), (11, sha.as_str()));
        let mut back = Vec::new();
        let mut s = store.get("runs/r/t/a/out.txt").await.expect("get");
        while let Some(c) = s.next().await {
            back.extend_from_slice(&c.expect("chunk"));
        }
        assert_eq!(back, b"hello world");

        let wrong = store
            .put("runs/r/t/a/bad.txt", chunks(&[b"hello"]), 100, &sha)
            .await
            .expect_err("digest differs");
        assert!(wrong.to_string().contains("sha256 mismatch"), "{wrong}");
        let big = store
            .put("runs/r/t/a/big.txt", chunks(&[b"0123456789"]), 4, &sha)
            .await
            .expect_err("too large");
        assert!(big.to_string().contains("larger than 4 bytes"), "{big}");
        assert!(!dir.path().join("runs/r/t/a/bad.txt").exists());
        assert!(!dir.path().join("runs/r/t/a/big.txt").exists());
        assert!(ArtifactStore::open("ftp://x").is_err());
    }
}
