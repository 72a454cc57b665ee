//! `gatehouse decode`: batch payloads as JSON lines (docs/ENVELOPE.md), from files, directories
//! of `*.batch` files (in name order, which is batch order), or stdin.
//!
//! A payload that does not decode is reported on stderr naming its file, and the others are
//! still printed; the exit code is then 1. A closed pipe (`| head`) ends it quietly with 0.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gatehouse::envelope;

/// Decodes every input; stdin when `paths` is empty.
pub fn run(paths: &[PathBuf], header: bool) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut failed = false;
    let result = (|| -> anyhow::Result<()> {
        if paths.is_empty() {
            let mut payload = Vec::new();
            std::io::stdin()
                .read_to_end(&mut payload)
                .context("reading stdin")?;
            return print_batch(&mut out, &payload, header).context("stdin");
        }
        for file in inputs(paths, &mut failed) {
            let outcome = std::fs::read(&file)
                .map_err(anyhow::Error::from)
                .and_then(|payload| print_batch(&mut out, &payload, header));
            match outcome {
                Ok(()) => {}
                Err(e) if super::is_closed_pipe(&e) => return Err(e),
                Err(e) => {
                    out.flush()?;
                    eprintln!("gatehouse decode: {}: {e:#}", file.display());
                    failed = true;
                }
            }
        }
        out.flush()?;
        Ok(())
    })();
    match super::printed(result, "decode") {
        code if code == ExitCode::SUCCESS && failed => ExitCode::FAILURE,
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

fn print_batch(out: &mut impl Write, payload: &[u8], header: bool) -> anyhow::Result<()> {
    let (head, records) = envelope::decode(payload)?;
    if header {
        serde_json::to_writer(&mut *out, &head)?;
        out.write_all(b"\n")?;
    }
    for record in &records {
        serde_json::to_writer(&mut *out, &envelope::record_json(record))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
