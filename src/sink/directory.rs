//! The `directory` sink: each batch becomes one file `<batch_seq, 20 digits>.batch`.
//!
//! A file is written to a temporary name, fsynced, renamed into place and the directory fsynced,
//! so a reader never sees a partial batch and a confirmed batch survives power loss. A batch
//! re-sent after a crash overwrites its own file with the same bytes. Write failures (disk full)
//! are retried with backoff; the batch stays unconfirmed meanwhile.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use super::{Batch, Confirmation, Sink, SinkFuture};
use crate::telemetry;

pub struct DirectorySink {
    dir: PathBuf,
    max_inflight: usize,
}

impl DirectorySink {
    pub fn new(dir: PathBuf, max_inflight: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("upstream.path: cannot create {}", dir.display()))?;
        Ok(Self { dir, max_inflight })
    }
}

/// The file a batch is written to.
pub fn batch_file_name(batch_seq: u64) -> String {
    format!("{batch_seq:020}.batch")
}

fn write_atomically(dir: &Path, batch: &Batch) -> std::io::Result<()> {
    let name = batch_file_name(batch.batch_seq);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&batch.payload)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(&name))?;
    std::fs::File::open(dir)?.sync_all()
}

impl Sink for DirectorySink {
    fn name(&self) -> &'static str {
        "directory"
    }

    fn max_inflight(&self) -> usize {
        self.max_inflight
    }

    fn max_payload(&self) -> usize {
        // A file takes any size; the batcher's `batch.maxBytes` bounds what it seals.
        usize::MAX
    }

    fn run(
        self: Box<Self>,
        mut batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> SinkFuture {
        Box::pin(async move {
            while let Some(batch) = batches.recv().await {
                let mut backoff = Duration::from_millis(100);
                loop {
                    let dir = self.dir.clone();
                    let b = batch.clone();
                    let result = tokio::task::spawn_blocking(move || write_atomically(&dir, &b))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    match result {
                        Ok(()) => {
                            let _ = confirmations
                                .send(Confirmation::delivered(batch.batch_seq))
                                .await;
                            break;
                        }
                        Err(e) => {
                            metrics::counter!(telemetry::SINK_ERRORS, "reason" => "write")
                                .increment(1);
                            tracing::warn!(
                                error = %e,
                                dir = %self.dir.display(),
                                batch_seq = batch.batch_seq,
                                retry_in_ms = backoff.as_millis() as u64,
                                "Failed to write batch file; will retry."
                            );
                            if batches.is_closed() {
                                // Shutting down: leave it unconfirmed for the next start.
                                return;
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        })
    }
}
