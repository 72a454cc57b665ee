//! `gatehouse dead-letter list|export|retry`: the records the upstream would not take, kept in
//! the journal's `dead_letter` table with the reason, shown and resent by an operator.
//!
//! `list` and `export` read the journal while the gateway runs; `retry` needs it stopped (it
//! takes the journal's lock) and puts the records back in the stream for its next start.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use gatehouse::config::Config;
use gatehouse::envelope;
use gatehouse::journal::{self, DeadLetter, RetrySelection};

/// Which journal a journal command works on.
#[derive(clap::Args)]
pub struct JournalArg {
    /// The gateway's config file: its `journal.path` is used.
    #[arg(long, conflicts_with = "journal")]
    config: Option<PathBuf>,
    /// The journal file itself. Default: the embedded default `journal.path`.
    #[arg(long)]
    journal: Option<PathBuf>,
}

impl JournalArg {
    fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(match (&self.journal, &self.config) {
            (Some(path), _) => path.clone(),
            (None, Some(config)) => {
                Config::from_file(config)
                    .map_err(|e| {
                        anyhow::anyhow!("{}: invalid configuration\n{e}", config.display())
                    })?
                    .journal
                    .path
            }
            (None, None) => Config::embedded().journal.path,
        })
    }
}

#[derive(Subcommand)]
pub enum DeadLetterAction {
    /// One line per dead-lettered record (works while the gateway runs).
    List {
        #[command(flatten)]
        journal: JournalArg,
    },
    /// Every dead-lettered record as a JSON line, with its payload (works while the gateway runs).
    Export {
        #[command(flatten)]
        journal: JournalArg,
    },
    /// Put dead-lettered records back in the journal's stream: they are batched and sent at the
    /// gateway's next start. Stop the gateway first.
    Retry {
        #[command(flatten)]
        journal: JournalArg,
        /// Every dead-lettered record.
        #[arg(long, conflicts_with_all = ["batch", "seq"])]
        all: bool,
        /// The records of this batch.
        #[arg(long, conflicts_with = "seq")]
        batch: Option<u64>,
        /// These records (repeatable).
        #[arg(long)]
        seq: Vec<u64>,
    },
}

/// Runs one action; errors on stderr, exit 1.
pub fn run(action: DeadLetterAction) -> ExitCode {
    super::printed(dead_letter(action), "dead-letter")
}

fn dead_letter(action: DeadLetterAction) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match action {
        DeadLetterAction::List { journal } => {
            let path = journal.path()?;
            let (mut count, mut bytes) = (0u64, 0u64);
            journal::list_dead_letters(&path, |letter| {
                count += 1;
                bytes += letter.record.payload.len() as u64;
                writeln!(
                    out,
                    "seq {}\tbatch {}\tmoved {}\tagent {}\ttopic {}\t{} bytes\t{}",
                    letter.seq,
                    letter.batch_seq.map_or("-".to_string(), |b| b.to_string()),
                    rfc3339(letter.moved_at_ms),
                    letter.record.client_id,
                    letter.record.topic,
                    letter.record.payload.len(),
                    letter.reason
                )
            })?;
            writeln!(
                out,
                "{count} dead-lettered records ({bytes} payload bytes) in {}",
                path.display()
            )?;
        }
        DeadLetterAction::Export { journal } => {
            let path = journal.path()?;
            journal::list_dead_letters(&path, |letter| {
                serde_json::to_writer(&mut out, &dead_letter_json(&letter))?;
                out.write_all(b"\n")
            })?;
        }
        DeadLetterAction::Retry {
            journal,
            all,
            batch,
            seq,
        } => {
            let selection = match (all, batch, seq.is_empty()) {
                (true, _, _) => RetrySelection::All,
                (false, Some(batch), _) => RetrySelection::Batch(batch),
                (false, None, false) => RetrySelection::Seqs(seq),
                (false, None, true) => {
                    anyhow::bail!("say which records: --all, --batch N or --seq N")
                }
            };
            let path = journal.path()?;
            let moved = journal::retry_dead_letters(&path, &selection)?;
            writeln!(
                out,
                "Re-queued {moved} records in {}; the gateway sends them at its next start.",
                path.display()
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A dead letter as `decode` prints records, plus why and when it left the stream.
fn dead_letter_json(letter: &DeadLetter) -> serde_json::Value {
    let mut json = envelope::record_json(&envelope::DecodedRecord {
        seq: letter.seq,
        record: letter.record.clone(),
    });
    if let Some(map) = json.as_object_mut() {
        map.insert("reason".into(), letter.reason.clone().into());
        map.insert("movedAt".into(), letter.moved_at_ms.into());
        if let Some(batch) = letter.batch_seq {
            map.insert("batchSeq".into(), batch.into());
        }
    }
    json
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}
