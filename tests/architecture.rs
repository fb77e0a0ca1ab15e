//! The module graph ARCHITECTURE.md draws is the real one: every `crate::` path in a
//! library module names a module of a lower layer, so the graph has no cycle.
//!
//! `cargo test --release --test architecture -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The library's top-level modules, lowest layer first (ARCHITECTURE.md's order). A module
/// may use only modules listed before it.
const LAYERS: [&str; 12] = [
    "simd",
    "device",
    "data",
    "loss",
    "model",
    "ep",
    "estimate",
    "optim",
    "train",
    "continual",
    "bench",
    "experiment",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a module's code (not its comments) names as `crate::<module>`.
fn uses(module: &str) -> BTreeSet<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let dir = src.join(module);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    }
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        files.push(file);
    }
    assert!(!files.is_empty(), "module {module} has no source");
    let mut out = BTreeSet::new();
    for f in files {
        for line in fs::read_to_string(&f).unwrap().lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != module && !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn every_module_uses_only_lower_layers() {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        declared,
        LAYERS.iter().copied().collect(),
        "lib.rs's modules and the layer list differ: place a new module in LAYERS and ARCHITECTURE.md"
    );
    let mut graph = BTreeMap::new();
    let mut wrong = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        let deps = uses(module);
        for d in &deps {
            match LAYERS.iter().position(|m| m == d) {
                Some(r) if r < rank => {}
                _ => wrong.push(format!("{module} -> {d}")),
            }
        }
        graph.insert(*module, deps);
    }
    for (m, deps) in &graph {
        println!(
            "{m} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(
        wrong.is_empty(),
        "edges against the layering (a cycle or an upward dependency): {wrong:?}"
    );
}
