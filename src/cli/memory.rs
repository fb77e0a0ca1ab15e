//! `mep bench memory`: peak memory of one training step against depth, each measurement in
//! a fresh process (`mep bench memory-probe`, hidden).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;
use mep::bench::memory::{MemoryMethod, MemoryProbe, MemoryRow, bytes_per_layer, run_probe};
use mep::bench::plot::{Series, line_chart};
use mep::device::Workload;
use serde::Serialize;

use super::Globals;
use super::progress::count_bar;
use mep::experiment::write_atomic;

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Depths 10, 50 and 100 only (seconds).
    #[arg(long)]
    quick: bool,
    /// Depths (linear layers) to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10, 100, 500, 1000, 2000])]
    depths: Vec<usize>,
    /// EP settle steps of the main rows.
    #[arg(long, default_value_t = 30)]
    settle_steps: usize,
    /// Further EP settle-step counts measured at every depth, to show that memory does not
    /// grow with settling.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10, 100])]
    compare_steps: Vec<usize>,
    /// Hidden width.
    #[arg(long, default_value_t = 128)]
    width: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Output directory.
    #[arg(long, default_value = "results/memory")]
    out: PathBuf,
    /// Print results.json on stdout.
    #[arg(long)]
    json: bool,
}

/// One probe, run in this process (hidden; `mep bench memory` spawns it).
#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[arg(long)]
    method: String,
    #[arg(long)]
    depth: usize,
    #[arg(long, default_value_t = 128)]
    width: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 30)]
    settle_steps: usize,
}

pub fn probe(args: ProbeArgs, globals: &Globals) -> Result<()> {
    let device = globals.device.resolve(Workload::Settle)?;
    let method: MemoryMethod = args.method.parse()?;
    let probe = MemoryProbe {
        width: args.width,
        batch: args.batch,
        settle_steps: args.settle_steps,
        seed: globals.seed,
        ..MemoryProbe::paper(method, args.depth)
    };
    let row = run_probe(&probe, &device)?;
    outln!("{}", serde_json::to_string(&row)?)?;
    Ok(())
}

/// Per-method summary of the table.
#[derive(Debug, Serialize)]
struct Summary {
    method: MemoryMethod,
    settle_steps: Option<usize>,
    /// Least-squares slope of peak bytes against depth.
    bytes_per_layer: Option<f64>,
}

fn spawn_probe(
    globals: &Globals,
    threads: usize,
    method: MemoryMethod,
    depth: usize,
    steps: usize,
    args: &MemoryArgs,
) -> Result<MemoryRow> {
    let exe = std::env::current_exe().context("locating the mep binary")?;
    let output = Command::new(&exe)
        .args(["--seed", &globals.seed.to_string()])
        .args(["--device", &globals.device.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["bench", "memory-probe", "--method", method.name()])
        .args(["--depth", &depth.to_string()])
        .args(["--width", &args.width.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--settle-steps", &steps.to_string()])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !output.status.success() {
        bail!(
            "the {} probe at depth {depth} failed: {}",
            method.name(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("reading the probe's output `{}`", stdout.trim()))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn run(args: MemoryArgs, globals: &Globals) -> Result<()> {
    let threads = globals.threads;
    let depths = if args.quick {
        vec![10, 50, 100]
    } else {
        args.depths.clone()
    };
    anyhow::ensure!(
        depths.iter().all(|&d| d >= 1) && !depths.is_empty(),
        "--depths must be positive"
    );
    anyhow::ensure!(
        args.settle_steps >= 1 && args.compare_steps.iter().all(|&s| s >= 1),
        "settle steps must be at least 1"
    );
    anyhow::ensure!(
        args.width >= 1 && args.batch >= 1,
        "--width and --batch must be positive"
    );
    let mut plan: Vec<(MemoryMethod, usize, usize)> = Vec::new();
    for &depth in &depths {
        for method in MemoryMethod::ALL {
            plan.push((method, depth, args.settle_steps));
        }
        for &steps in &args.compare_steps {
            if steps != args.settle_steps {
                plan.push((MemoryMethod::Ep, depth, steps));
            }
        }
    }
    let bar = count_bar(plan.len() as u64, "probes");
    let mut rows = Vec::with_capacity(plan.len());
    for (method, depth, steps) in plan {
        bar.set_message(format!("{} depth {depth}", method.name()));
        rows.push(spawn_probe(globals, threads, method, depth, steps, &args)?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut keys: Vec<(MemoryMethod, Option<usize>)> = Vec::new();
    for r in &rows {
        if !keys.contains(&(r.method, r.settle_steps)) {
            keys.push((r.method, r.settle_steps));
        }
    }
    let summaries: Vec<Summary> = keys
        .iter()
        .map(|&(method, settle_steps)| {
            let points: Vec<(usize, u64)> = rows
                .iter()
                .filter(|r| r.method == method && r.settle_steps == settle_steps)
                .map(|r| (r.depth, r.peak_bytes))
                .collect();
            Summary {
                method,
                settle_steps,
                bytes_per_layer: bytes_per_layer(&points),
            }
        })
        .collect();
    let reference = MemoryProbe {
        width: args.width,
        batch: args.batch,
        ..MemoryProbe::paper(MemoryMethod::Ep, 2)
    };
    let deeper = MemoryProbe {
        depth: 3,
        ..reference
    };
    let theory_per_layer = deeper.ep_theory_bytes() - reference.ep_theory_bytes();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({
        "network": format!("64 -> {} x (depth - 1) -> 10, ReLU", args.width),
        "batch": args.batch,
        "threads": threads,
        "device": globals.device.to_string(),
        "rows": rows,
        "per_layer": summaries,
        "ep_theory_bytes_per_layer": theory_per_layer,
    });
    write_atomic(
        &args.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;

    let label = |m: MemoryMethod, s: Option<usize>| match s {
        Some(s) => format!("{} ({s} settle steps)", m.name()),
        None => m.name().to_string(),
    };
    let mut table = String::from(
        "| method | depth | peak MiB | before step MiB | parameters MiB | EP theory MiB | peak RSS MiB | seconds |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} |\n",
            label(r.method, r.settle_steps),
            r.depth,
            mib(r.peak_bytes),
            mib(r.model_bytes),
            mib(r.param_bytes),
            r.theory_bytes
                .map_or("-".into(), |t| format!("{:.2}", mib(t))),
            r.rss_peak_bytes
                .map_or("-".into(), |t| format!("{:.1}", mib(t))),
            r.seconds
        ));
    }
    table.push_str("\n| method | bytes per layer (slope) |\n|---|---|\n");
    for s in &summaries {
        table.push_str(&format!(
            "| {} | {} |\n",
            label(s.method, s.settle_steps),
            s.bytes_per_layer.map_or("-".into(), |b| format!("{b:.0}"))
        ));
    }
    table.push_str(&format!(
        "| EP theory (parameters, gradients, states, momentum, free states) | {theory_per_layer} |\n"
    ));
    write_atomic(&args.out.join("table.md"), table.as_bytes())?;

    let series: Vec<Series> = keys
        .iter()
        .map(|&(method, steps)| Series {
            label: label(method, steps),
            points: rows
                .iter()
                .filter(|r| r.method == method && r.settle_steps == steps)
                .map(|r| (r.depth as f64, mib(r.peak_bytes)))
                .collect(),
        })
        .collect();
    line_chart(
        &args.out.join("peak_memory"),
        "peak memory of one training step",
        "depth (linear layers)",
        "peak heap MiB",
        &series,
    )?;
    if args.json {
        outln!("{}", serde_json::to_string(&json)?)?;
    } else {
        out!("{table}")?;
        errln!("results in {}", args.out.display());
    }
    Ok(())
}
