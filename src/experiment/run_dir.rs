//! A run directory: `config.json`, `metrics.jsonl`, the checkpoint and the monitor's
//! records and charts, each written atomically.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{CHECKPOINT, ExperimentError, RunMeta, read_meta, write_atomic};
use crate::bench::plot::{PlotError, Series, line_chart};
use crate::train::{MonitorRecord, Trainer};

/// The files of one training run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    /// The run directory `dir` (not created yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The checkpoint of the latest epoch.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join(CHECKPOINT)
    }

    /// The metrics file (one JSON object per epoch).
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    /// The monitor's records (one JSON object per record).
    pub fn monitor(&self) -> PathBuf {
        self.dir.join("monitor.jsonl")
    }

    /// The run metadata its checkpoint holds.
    pub fn read_meta(&self) -> Result<RunMeta, ExperimentError> {
        read_meta(&self.checkpoint())
    }

    /// Locks the directory for this process until the returned guard drops: a second run
    /// into the same directory (even one started before the first wrote anything) is
    /// refused. A lock whose process no longer runs (a killed run) is taken over.
    pub fn lock(&self) -> Result<RunLock, ExperimentError> {
        fs::create_dir_all(&self.dir).map_err(|e| ExperimentError::io("creating", &self.dir, e))?;
        let path = self.dir.join(".lock");
        for _ in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if process_runs(pid) => {
                            return Err(ExperimentError::InvalidOption(format!(
                                "{} is in use by another run (process {pid})",
                                self.dir.display()
                            )));
                        }
                        // Its process is gone: take the lock over.
                        _ => {
                            let _ = fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(ExperimentError::io("locking", &path, e)),
            }
        }
        Err(ExperimentError::InvalidOption(format!(
            "{} is in use by another run",
            self.dir.display()
        )))
    }

    /// Whether the directory holds a run (a checkpoint).
    pub fn holds_run(&self) -> bool {
        self.checkpoint().exists()
    }

    /// Prepares the directory for a run and writes `config.json`. A new run (`resumed`
    /// `None`) is refused where another run's checkpoint is, unless `replace`; then that
    /// run's checkpoint, metrics and monitor records are removed first, so nothing in the
    /// directory describes another run. A resumed run rewrites `metrics.jsonl` from the
    /// checkpoint's history (the checkpoint is the record: an epoch whose checkpoint was
    /// never written is dropped). Temporary files that a killed run left behind are
    /// removed.
    pub fn start(
        &self,
        config: &serde_json::Value,
        resumed: Option<&RunMeta>,
        replace: bool,
    ) -> Result<(), ExperimentError> {
        if resumed.is_none() && self.holds_run() {
            if !replace {
                let what = self
                    .read_meta()
                    .map(|m| format!("epoch {} of a run", m.epoch))
                    .unwrap_or_else(|_| "a checkpoint".into());
                return Err(ExperimentError::InvalidOption(format!(
                    "{} holds {what}: --resume continues it, --force replaces it, --out picks another directory",
                    self.dir.display()
                )));
            }
            for file in [self.checkpoint(), self.metrics(), self.monitor()] {
                match fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(ExperimentError::io("removing", &file, e));
                    }
                    _ => {}
                }
            }
        }
        fs::create_dir_all(&self.dir).map_err(|e| ExperimentError::io("creating", &self.dir, e))?;
        self.remove_stale_temporaries();
        let text = serde_json::to_string_pretty(config).unwrap_or_default();
        write_atomic(&self.dir.join("config.json"), text.as_bytes())?;
        if let Some(meta) = resumed {
            self.write_metrics(meta)?;
        }
        Ok(())
    }

    /// Removes `*.tmp-<pid>` files of processes that no longer run (a kill between a
    /// temporary's write and its rename leaves one).
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .rsplit_once(".tmp-")
                .and_then(|(_, p)| p.parse::<u32>().ok())
            else {
                continue;
            };
            let alive =
                pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
            if !alive {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn write_metrics(&self, meta: &RunMeta) -> Result<(), ExperimentError> {
        let mut lines = String::new();
        for m in &meta.history {
            lines.push_str(&serde_json::to_string(m).unwrap_or_default());
            lines.push('\n');
        }
        write_atomic(&self.metrics(), lines.as_bytes())
    }

    /// Records a finished epoch: the trainer's checkpoint with `meta` (which records the
    /// epoch), then `metrics.jsonl` from `meta.history`, so the metrics never list an epoch
    /// the checkpoint does not hold.
    pub fn record_epoch(&self, trainer: &Trainer, meta: &RunMeta) -> Result<(), ExperimentError> {
        let value = serde_json::to_value(meta).unwrap_or_default();
        trainer.save_checkpoint(&self.checkpoint(), &value)?;
        self.write_metrics(meta)
    }

    /// Removes the monitor's records of an earlier run.
    pub fn clear_monitor(&self) {
        let _ = fs::remove_file(self.monitor());
    }

    /// Appends monitor records.
    pub fn append_monitor(&self, records: &[MonitorRecord]) -> Result<(), ExperimentError> {
        if records.is_empty() {
            return Ok(());
        }
        let path = self.monitor();
        let io = |e| ExperimentError::io("writing", &path, e);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).unwrap_or_default());
            text.push('\n');
        }
        f.write_all(text.as_bytes()).map_err(io)
    }

    /// Draws the monitor's charts (gradient norms, cosine to backprop, energies, settle
    /// residuals) from its records; returns how many files were written (0 without
    /// records).
    pub fn monitor_charts(&self) -> Result<usize, ExperimentError> {
        let path = self.monitor();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ExperimentError::io("reading", &path, e)),
        };
        let records: Vec<MonitorRecord> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|e| ExperimentError::InvalidOption(format!("{}: {e}", path.display())))?;
        Ok(monitor_charts(&records, &self.dir)?)
    }
}

/// Whether process `pid` runs (this one does).
///
/// A zombie (a process that ended but was not reaped yet, as the ranks of a job whose
/// launcher exited first can stay where nothing reaps orphans) does not run: its
/// `/proc/<pid>/stat` state is `Z` (or `X`, dead).
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    match fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
        // `pid (command) STATE ...`; the command may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_none_or(|state| !matches!(state, 'Z' | 'X')),
        Err(_) => Path::new("/proc").join(pid.to_string()).exists(),
    }
}

/// A run directory's lock (see [`RunDir::lock`]); dropping it releases the directory.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Charts of a monitor.jsonl: gradient norms, cosine to backprop, energies, settle residuals.
fn monitor_charts(records: &[MonitorRecord], out: &Path) -> Result<usize, PlotError> {
    let Some(first) = records.first() else {
        return Ok(0);
    };
    let names: Vec<String> = first.params.iter().map(|p| p.name.clone()).collect();
    let per_param = |f: &dyn Fn(&crate::train::ParamRecord) -> f64| -> Vec<Series> {
        names
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.ends_with(".bias"))
            .map(|(i, n)| Series {
                label: n.clone(),
                points: records
                    .iter()
                    .map(|r| (r.step as f64, f(&r.params[i])))
                    .collect(),
            })
            .collect()
    };
    let mut files = line_chart(
        &out.join("monitor_grad_norms"),
        "gradient norm per layer (log10)",
        "step",
        "log10 ||grad||",
        &per_param(&|p| p.grad_norm.max(1e-30).log10()),
    )?;
    files.extend(line_chart(
        &out.join("monitor_cosine"),
        "cosine to the backprop gradient of the same loss",
        "step",
        "cosine",
        &per_param(&|p| p.cosine),
    )?);
    let phases = first.phases.len();
    if phases > 0 {
        let energy: Vec<Series> = (0..phases)
            .map(|k| Series {
                label: format!("phase {}", k + 1),
                points: records
                    .iter()
                    .filter_map(|r| r.phases.get(k).map(|p| (r.step as f64, p.energy as f64)))
                    .collect(),
            })
            .collect();
        files.extend(line_chart(
            &out.join("monitor_energy"),
            "mean energy at the settled states",
            "step",
            "energy",
            &energy,
        )?);
        let picks = [0, records.len() / 2, records.len() - 1];
        let residual: Vec<Series> = picks
            .iter()
            .filter_map(|&i| {
                let r = &records[i];
                r.phases.first().map(|p| Series {
                    label: format!("step {}", r.step),
                    points: p
                        .residual_curve
                        .iter()
                        .map(|&(s, v)| (s as f64, (v as f64).max(1e-30).log10()))
                        .collect(),
                })
            })
            .collect();
        files.extend(line_chart(
            &out.join("monitor_residual"),
            "settle residual (largest per-sample state-gradient norm, log10)",
            "settle step",
            "log10 residual",
            &residual,
        )?);
    }
    Ok(files.len())
}
