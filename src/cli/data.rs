//! `mep data list|fetch`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use mep::data::download::Downloader;
use mep::data::locate::locate_in;
use mep::data::{self, DataLocator, DatasetSpec, Source};
use serde::Serialize;

use super::Globals;
use super::progress::DownloadBar;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Show the known data sets and where each was found.
    List {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download a data set into the user cache, verifying SHA-256 checksums.
    Fetch {
        /// Data set name (mnist, fashion-mnist; permuted-mnist fetches mnist).
        name: String,
        /// Base URL to fetch from instead of the catalogue's mirrors (repeatable).
        #[arg(long = "mirror", value_name = "URL")]
        mirrors: Vec<String>,
        /// Directory to download into instead of the user cache.
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize)]
struct ListEntry {
    name: String,
    description: String,
    source: &'static str,
    present: bool,
    path: Option<PathBuf>,
    train_samples: usize,
    test_samples: usize,
    classes: usize,
}

pub fn run(cmd: DataCommand, globals: &Globals) -> Result<()> {
    let locator = DataLocator::from_env(globals.data_dir.clone());
    match cmd {
        DataCommand::List { json } => list(&locator, json),
        DataCommand::Fetch { name, mirrors, to } => {
            let spec = data::find(&name)?;
            let root = match to {
                Some(dir) => dir,
                None => locator.download_dir()?,
            };
            let mirrors = (!mirrors.is_empty()).then_some(mirrors);
            let dir = fetch(&spec, mirrors.as_deref(), &root)?;
            errln!("{} is in {}", spec.name, dir.display());
            Ok(())
        }
    }
}

/// Downloads `spec` into `root/<name>` with a progress bar.
pub fn fetch(
    spec: &DatasetSpec,
    mirrors: Option<&[String]>,
    root: &std::path::Path,
) -> Result<PathBuf> {
    let mut bar = DownloadBar::default();
    Downloader::default()
        .fetch_dataset(spec, mirrors, root, &mut bar)
        .with_context(|| format!("fetching data set `{}` into {}", spec.name, root.display()))
}

fn list(locator: &DataLocator, json: bool) -> Result<()> {
    let entries: Vec<ListEntry> = data::catalog()
        .iter()
        .map(|spec| {
            let (source, present, path) = match &spec.source {
                Source::Idx { .. } => {
                    let found = locator.locate(spec).ok().map(|f| f.dir);
                    ("download", found.is_some(), found)
                }
                Source::BuiltIn => ("built-in", true, None),
                Source::CifarBinary { archive, .. } => {
                    let found = locator
                        .locate_cifar(spec)
                        .ok()
                        .and_then(|(_, test)| test.parent().map(std::path::Path::to_path_buf));
                    let source = if archive.is_some() {
                        "download"
                    } else {
                        "local"
                    };
                    (source, found.is_some(), found)
                }
                Source::Derived { from } => {
                    let base = data::find(from).expect("derived sets name catalogue entries");
                    let found = locator
                        .search_dirs()
                        .iter()
                        .find_map(|d| locate_in(d, &base))
                        .map(|f| f.dir);
                    ("derived", found.is_some(), found)
                }
            };
            ListEntry {
                name: spec.name.clone(),
                description: spec.description.clone(),
                source,
                present,
                path,
                train_samples: spec.train_count,
                test_samples: spec.test_count,
                classes: spec.classes,
            }
        })
        .collect();
    if json {
        let searched = locator.search_dirs();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "search_dirs": searched,
                "datasets": entries,
            }))?
        )?;
        return Ok(());
    }
    outln!(
        "{:<15} {:<8} {:<9} {:>6} {:>6}  location",
        "name",
        "status",
        "source",
        "train",
        "test"
    )?;
    for e in &entries {
        outln!(
            "{:<15} {:<8} {:<9} {:>6} {:>6}  {}",
            e.name,
            if e.present { "present" } else { "missing" },
            e.source,
            e.train_samples,
            e.test_samples,
            e.path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| if e.present {
                    "(built in)".into()
                } else {
                    "-".into()
                })
        )?;
    }
    if entries.iter().any(|e| !e.present) {
        let dirs: Vec<String> = locator
            .search_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        outln!("\nsearched: {}", dirs.join(", "))?;
        outln!("fetch a missing set with `mep data fetch NAME`")?;
    }
    Ok(())
}
