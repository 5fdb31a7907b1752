//! `ferroformers download` and `ferroformers cache`: the hub cache from the command line.

use std::io::Write;

use clap::Args;
use ferroformers::hub::{self, HubOptions};

use crate::stdout_error;

/// `ferroformers download`.
#[derive(Args)]
pub struct DownloadArgs {
    /// A hub id such as org/name.
    #[arg(value_name = "MODEL")]
    model: String,
    /// The branch, tag or commit (default: main).
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// Fetch only this file (repeat for several; default: what a pipeline needs).
    #[arg(long = "file", value_name = "FILE")]
    files: Vec<String>,
}

/// `download MODEL [--revision R] [--file F]...`: fetch into the cache, print the snapshot path.
pub fn download(a: DownloadArgs) -> Result<(), String> {
    let files = (!a.files.is_empty()).then_some(a.files.as_slice());
    let snap = hub::download(
        &a.model,
        a.revision.as_deref(),
        files,
        &HubOptions::from_env(),
    )
    .map_err(|e| e.to_string())?;
    writeln!(std::io::stdout(), "{}", snap.display()).map_err(stdout_error)
}

/// `cache`: every cached model with its refs, size on disk and files.
pub fn cache() -> Result<(), String> {
    let root = hub::cache_dir();
    let repos = hub::scan_cache(&root).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "hub cache: {}", root.display()).map_err(stdout_error)?;
    if repos.is_empty() {
        writeln!(out, "(empty)").map_err(stdout_error)?;
    }
    for r in &repos {
        let refs = if r.refs.is_empty() {
            "no refs".to_string()
        } else {
            r.refs
                .iter()
                .map(|(name, commit)| format!("{name} -> {}", short(commit)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let partial = if r.incomplete_bytes > 0 {
            format!(", {} in unfinished downloads", human(r.incomplete_bytes))
        } else {
            String::new()
        };
        writeln!(
            out,
            "{}  {}  ({refs}{partial})",
            r.repo_id,
            human(r.size_on_disk)
        )
        .map_err(stdout_error)?;
        for s in &r.snapshots {
            writeln!(
                out,
                "  {}  {} file{}: {}",
                short(&s.commit),
                s.files.len(),
                if s.files.len() == 1 { "" } else { "s" },
                s.files.join(" ")
            )
            .map_err(stdout_error)?;
        }
    }
    Ok(())
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
