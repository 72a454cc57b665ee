//! `gatehouse decode`: batch payloads as JSON lines (docs/ENVELOPE.md), from files, directories
//! of `*.batch` files (in name order, which is batch order), or stdin.
//!
//! Fragments (version 2 batches) are reassembled across all the inputs: each record is printed
//! once, whole, when its last fragment is read, with `"fragments": N` added. A record still
//! missing fragments at the end is reported on stderr (its seq, how many fragments of how many,
//! and the files they came from), as is a corrupt set of fragments (naming the files); either
//! makes the exit code 1. `--fragments` prints every fragment as it is instead, with its
//! `fragment` object, and reassembles nothing.
//!
//! A payload that does not decode is reported on stderr naming its file, and the others are
//! still printed; the exit code is then 1. A closed pipe (`| head`) ends it quietly with 0.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gatehouse::envelope::{self, BatchRecord, Reassembler};

/// How `decode` prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Print each batch's header before its records.
    pub header: bool,
    /// Print fragment records as they are (`--fragments`) instead of reassembling them.
    pub fragments: bool,
}

/// Decodes every input, reassembling fragments; stdin when `paths` is empty.
pub fn run(paths: &[PathBuf], options: Options) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut decoder = Decoder {
        options,
        reassembler: Reassembler::new(),
        sources: HashMap::new(),
        failed: false,
    };
    let result = (|| -> anyhow::Result<()> {
        if paths.is_empty() {
            let mut payload = Vec::new();
            std::io::stdin()
                .read_to_end(&mut payload)
                .context("reading stdin")?;
            decoder.batch(&mut out, "stdin", &payload)?;
        } else {
            for file in inputs(paths, &mut decoder.failed) {
                let name = file.display().to_string();
                match std::fs::read(&file) {
                    Ok(payload) => decoder.batch(&mut out, &name, &payload)?,
                    Err(e) => decoder.report(&mut out, &name, &e)?,
                }
            }
        }
        decoder.finish(&mut out)?;
        out.flush()?;
        Ok(())
    })();
    match super::printed(result, "decode") {
        code if code == ExitCode::SUCCESS && decoder.failed => ExitCode::FAILURE,
        code => code,
    }
}

/// The files to decode: each file named, and each directory's `*.batch` files in name order.
/// Unreadable directories are reported (and set `failed`).
fn inputs(paths: &[PathBuf], failed: &mut bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        match batch_files(path) {
            Ok(found) => files.extend(found),
            Err(e) => {
                eprintln!("gatehouse decode: {}: {e}", path.display());
                *failed = true;
            }
        }
    }
    files
}

fn batch_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| p.extension().is_some_and(|e| e == "batch"))
        .collect();
    found.sort();
    Ok(found)
}

/// What decoding has seen so far, across inputs.
struct Decoder {
    options: Options,
    reassembler: Reassembler,
    /// The inputs each incomplete record's fragments came from, in reading order.
    sources: HashMap<(String, u64), Vec<String>>,
    failed: bool,
}

impl Decoder {
    /// Prints (or holds, for fragments) one input's records. Fails only when writing fails;
    /// a payload that does not decode is reported and skipped.
    fn batch(&mut self, out: &mut impl Write, name: &str, payload: &[u8]) -> anyhow::Result<()> {
        let (head, records) = match envelope::decode(payload) {
            Ok(decoded) => decoded,
            Err(e) => return self.report(out, name, &e),
        };
        if self.options.header {
            line(out, &head)?;
        }
        for record in records {
            if self.options.fragments || record.fragment.is_none() {
                line(out, &envelope::batch_record_json(&record))?;
                continue;
            }
            self.fragment(out, name, &head.gateway, record)?;
        }
        Ok(())
    }

    fn fragment(
        &mut self,
        out: &mut impl Write,
        name: &str,
        gateway: &str,
        record: BatchRecord,
    ) -> anyhow::Result<()> {
        let key = (gateway.to_string(), record.seq);
        match self.reassembler.push(gateway, record) {
            Ok(Some(whole)) => {
                self.sources.remove(&key);
                let mut json = envelope::record_json(&whole.record);
                if let (Some(n), Some(map)) = (whole.fragments, json.as_object_mut()) {
                    map.insert("fragments".into(), n.into());
                }
                line(out, &json)
            }
            Ok(None) => {
                if self.reassembler.is_pending(gateway, key.1) {
                    let files = self.sources.entry(key).or_default();
                    if files.last().is_none_or(|last| last != name) {
                        files.push(name.to_string());
                    }
                }
                Ok(())
            }
            Err(e) => {
                let mut files = self.sources.remove(&key).unwrap_or_default();
                if files.last().is_none_or(|last| last != name) {
                    files.push(name.to_string());
                }
                self.report(out, &list(&files), &e)
            }
        }
    }

    /// Reports the records still missing fragments.
    fn finish(&mut self, out: &mut impl Write) -> anyhow::Result<()> {
        if self.options.fragments {
            return Ok(());
        }
        let incomplete = self.reassembler.incomplete();
        if incomplete.is_empty() {
            return Ok(());
        }
        out.flush()?;
        for missing in incomplete {
            let files = self
                .sources
                .get(&(missing.gateway.clone(), missing.seq))
                .map(|files| list(files))
                .unwrap_or_default();
            eprintln!(
                "gatehouse decode: gateway {:?}, record seq {}: incomplete, {} of {} fragments of its {}-byte payload, from {files}",
                missing.gateway, missing.seq, missing.received, missing.count, missing.size
            );
        }
        self.failed = true;
        Ok(())
    }

    /// Reports an input's error on stderr after what was printed before it.
    fn report(
        &mut self,
        out: &mut impl Write,
        name: &str,
        e: &dyn std::fmt::Display,
    ) -> anyhow::Result<()> {
        out.flush()?;
        eprintln!("gatehouse decode: {name}: {e:#}");
        self.failed = true;
        Ok(())
    }
}

/// Writes `json` and a newline. Serialized first, so that a write error reaches the caller as
/// the `io::Error` it is (`serde_json::to_writer` would hide a closed pipe inside its own error).
fn line(out: &mut impl Write, json: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec(json)?;
    text.push(b'\n');
    out.write_all(&text)?;
    Ok(())
}

/// Input names for a message: all of a few, else the first two, the last and how many.
fn list(files: &[String]) -> String {
    match files {
        [] => "(no input)".to_string(),
        [_] | [_, _] | [_, _, _] => files.join(", "),
        [first, second, .., last] => {
            format!("{first}, {second}, ..., {last} ({} files)", files.len())
        }
    }
}
