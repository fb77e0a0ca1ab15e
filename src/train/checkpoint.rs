//! Checkpoints: model parameters, batch-norm statistics and optimizer state in one
//! safetensors file, written atomically.
//!
//! Tensor names: `param/<parameter name>`, `running/<slot>/mean|var`, `optim/<state key>`.
//! Metadata: `optim_scalars` (JSON object of the optimizer's scalars) and `meta` (any JSON
//! the caller stores, e.g. the epoch).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::device::{Tensor, to_host};
use crate::model::{Network, RunningStats};
use crate::optim::{Optimizer, OptimizerState};

/// Errors of checkpoint I/O.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("checkpoint {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint, or does not fit the model/optimizer.
    #[error("checkpoint {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

struct Owned {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn owned(values: &[f32], shape: Vec<usize>) -> Owned {
    Owned {
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `net`, its running statistics and `optimizer`'s state to `path` (through a
/// temporary file and a rename), with `meta` stored as JSON.
pub fn save(
    path: &Path,
    net: &Network,
    optimizer: &dyn Optimizer,
    meta: &serde_json::Value,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut entries: Vec<(String, Owned)> = Vec::new();
    for (info, p) in net.param_info().iter().zip(net.params()) {
        entries.push((
            format!("param/{}", info.name),
            owned(&to_host(p), p.dims().to_vec()),
        ));
    }
    for (slot, r) in net.running_stats().iter().enumerate() {
        entries.push((
            format!("running/{slot}/mean"),
            owned(&r.mean, vec![r.mean.len()]),
        ));
        entries.push((
            format!("running/{slot}/var"),
            owned(&r.var, vec![r.var.len()]),
        ));
    }
    let state = optimizer.state();
    for (name, t) in &state.tensors {
        entries.push((
            format!("optim/{name}"),
            owned(&to_host(t), t.dims().to_vec()),
        ));
    }
    let scalars: serde_json::Map<String, serde_json::Value> = state
        .scalars
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
        .collect();
    let mut info = HashMap::new();
    info.insert(
        "optim_scalars".to_string(),
        serde_json::Value::Object(scalars).to_string(),
    );
    info.insert("meta".to_string(), meta.to_string());
    let bytes = safetensors::serialize(entries.iter().map(|(n, o)| (n.as_str(), o)), Some(info))
        .map_err(|e| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomic(path, &bytes).map_err(io)
}

/// Writes `bytes` to `path` through a temporary file in the same directory (named after
/// the target and this process, so concurrent writers never share one), synced, then
/// renamed into place; a failed write (a full disk) removes the temporary, so no partial
/// file is left behind. Every result file of a run is written this way.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Restores `net`'s parameters and running statistics and, if given, `optimizer`'s state
/// from `path`; returns the stored `meta`. Names and shapes must match; nothing is
/// changed unless everything read is valid.
pub fn load(
    path: &Path,
    net: &mut Network,
    optimizer: Option<&mut dyn Optimizer>,
) -> Result<serde_json::Value, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, metadata) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| invalid(format!("not a checkpoint: {e}")))?;
    let file =
        SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("not a checkpoint: {e}")))?;
    let values = |view: &TensorView| -> Result<Vec<f32>, CheckpointError> {
        if view.dtype() != Dtype::F32 {
            return Err(invalid(format!(
                "tensor of type {:?}, expected F32",
                view.dtype()
            )));
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(v)
    };
    // A non-finite stored value would train on (or evaluate to) garbage: refused by name.
    let finite = |what: &str, v: &[f32]| -> Result<(), CheckpointError> {
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(invalid(format!(
                "{what} holds a non-finite value ({}) at {i}",
                v[i]
            ))),
            None => Ok(()),
        }
    };
    let device = net
        .params()
        .first()
        .map(|p| p.device())
        .ok_or_else(|| invalid("the network has no parameters".into()))?;
    let tensor2 = |name: &str, view: &TensorView| -> Result<Tensor<2>, CheckpointError> {
        let shape: [usize; 2] = view
            .shape()
            .try_into()
            .map_err(|_| invalid(format!("{name} has shape {:?}, expected 2-D", view.shape())))?;
        let v = values(view)?;
        finite(name, &v)?;
        Ok(Tensor::from_data(TensorData::new(v, shape), &device))
    };
    let mut params = Vec::with_capacity(net.params().len());
    for (info, p) in net.param_info().iter().zip(net.params()) {
        let view = file
            .tensor(&format!("param/{}", info.name))
            .map_err(|_| invalid(format!("no parameter {}", info.name)))?;
        if view.shape() != p.dims() {
            return Err(invalid(format!(
                "parameter {} has shape {:?}, the model {:?}",
                info.name,
                view.shape(),
                p.dims()
            )));
        }
        params.push(tensor2(&format!("parameter {}", info.name), &view)?);
    }
    let mut running = Vec::new();
    for (slot, r) in net.running_stats().iter().enumerate() {
        let get = |role: &str| -> Result<Vec<f32>, CheckpointError> {
            let v = file
                .tensor(&format!("running/{slot}/{role}"))
                .map_err(|_| invalid(format!("no running statistics {slot}/{role}")))?;
            let v = values(&v)?;
            finite(&format!("running statistics {slot}/{role}"), &v)?;
            if role == "var" && v.iter().any(|&x| x < 0.0) {
                return Err(invalid(format!("running variance {slot} is negative")));
            }
            if v.len() != r.mean.len() {
                return Err(invalid(format!(
                    "running statistics {slot} have the wrong size"
                )));
            }
            Ok(v)
        };
        running.push(RunningStats {
            mean: get("mean")?,
            var: get("var")?,
        });
    }
    let mut state = OptimizerState::default();
    for (name, view) in file.tensors() {
        if let Some(key) = name.strip_prefix("optim/") {
            state.tensors.push((
                key.to_string(),
                tensor2(&format!("optimizer state {key}"), &view)?,
            ));
        }
    }
    state.tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let info = metadata.metadata().clone().unwrap_or_default();
    if let Some(s) = info.get("optim_scalars") {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(s).map_err(|e| invalid(format!("optimizer scalars: {e}")))?;
        for (k, v) in map {
            let v = v
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| invalid(format!("optimizer scalar {k} is not a finite number")))?;
            state.scalars.push((k, v));
        }
    }
    let meta = match info.get("meta") {
        Some(m) => serde_json::from_str(m).map_err(|e| invalid(format!("meta: {e}")))?,
        None => serde_json::Value::Null,
    };
    if let Some(optimizer) = optimizer {
        optimizer
            .check_state(&state, &params)
            .map_err(|e| invalid(e.to_string()))?;
        optimizer
            .load_state(&state)
            .map_err(|e| invalid(e.to_string()))?;
    }
    net.set_params(params).map_err(|e| invalid(e.to_string()))?;
    net.set_running_stats(running);
    Ok(meta)
}
