//! `mep._native`: the Python binding of the `mep` library.
//!
//! A thin layer: every call maps its arguments onto the library's experiment API
//! (`TrainRun`, `GradientCheck`, `Suite`, `ContinualMethod`) and hands results back as
//! numpy arrays or as the JSON the CLI prints (the `mep` Python package parses it). Options
//! travel as JSON objects in the library's own serde form, so their names, checks and
//! defaults are the library's. The package in `python/mep` adds the Pythonic surface
//! (keyword arguments, array conversion, callbacks).

use std::path::PathBuf;

use mep::continual::EwcConfig;
use mep::data::{DataLocator, Dataset, Split};
use mep::device::{DeviceChoice, Tensor, Workload};
use mep::experiment::check::GradientCheck;
use mep::experiment::continual::{ContinualBench, ContinualMethod, load_base, write_outcome};
use mep::experiment::suites::{Suite, SuiteConfig, SuiteObserver};
use mep::experiment::{
    ARRAYS_DATASET, DataSource, ExperimentError, RunMeta, RunRequest, TrainOptions, TrainRun,
    read_meta,
};
use mep::model::{ModelSpec, Shape};
use mep::train::{Silent, TrainError, TrainObserver};
use numpy::PyUntypedArrayMethods;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn};
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(
    _native,
    MepError,
    PyRuntimeError,
    "A run failed for a reason other than a bad argument (divergence, a corrupt file, a device)."
);

/// The message of an error with its causes, as the CLI prints them (`a: b: c`).
fn message(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A library error as the Python exception a caller expects: bad arguments are
/// `ValueError`, file-system failures `OSError`, the rest [`MepError`].
fn to_py(e: ExperimentError) -> PyErr {
    use mep::data::DataError;
    let text = message(&e);
    match &e {
        ExperimentError::InvalidOption(_)
        | ExperimentError::UnknownPreset(_)
        | ExperimentError::ResumeMismatch { .. }
        | ExperimentError::Config { .. }
        | ExperimentError::Model(_)
        | ExperimentError::Optim(
            mep::optim::OptimError::InvalidOption { .. }
            | mep::optim::OptimError::UnknownUpdateRule(_),
        )
        | ExperimentError::Estimate(
            mep::estimate::EstimateError::InvalidOption(_)
            | mep::estimate::EstimateError::Loss(_)
            | mep::estimate::EstimateError::Network(_),
        ) => PyValueError::new_err(text),
        ExperimentError::Device(mep::device::DeviceError::Unknown(_))
        | ExperimentError::Device(mep::device::DeviceError::Threads { .. }) => {
            PyValueError::new_err(text)
        }
        ExperimentError::Data(
            DataError::InvalidOption(_)
            | DataError::UnknownDataset { .. }
            | DataError::NotDownloadable(_),
        )
        | ExperimentError::Train(TrainError::InvalidOption(_) | TrainError::Data(_)) => {
            PyValueError::new_err(text)
        }
        ExperimentError::Io { .. }
        | ExperimentError::Data(DataError::Io { .. } | DataError::Missing { .. }) => {
            PyOSError::new_err(text)
        }
        _ => MepError::new_err(text),
    }
}

/// Errors of other library modules, through [`ExperimentError`]'s conversions.
fn lib_err(e: impl Into<ExperimentError>) -> PyErr {
    to_py(e.into())
}

/// `T` from a JSON object; a value of the wrong type is reported with its key (serde's
/// own message names only the expected type).
fn parse_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> PyResult<T> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    serde_json::from_value(value.clone()).map_err(|e| {
        let culprit = value.as_object().and_then(|fields| {
            fields.iter().find_map(|(k, v)| {
                let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<T>(one)
                    .err()
                    .map(|e| format!("{what}: `{k}`: {e}"))
            })
        });
        PyValueError::new_err(culprit.unwrap_or_else(|| format!("{what}: {e}")))
    })
}

fn to_json(value: &impl serde::Serialize) -> PyResult<String> {
    serde_json::to_string(value).map_err(|e| MepError::new_err(e.to_string()))
}

fn device_choice(device: &str) -> PyResult<DeviceChoice> {
    device
        .parse()
        .map_err(|e: mep::device::DeviceError| PyValueError::new_err(e.to_string()))
}

fn locator(data_dir: Option<PathBuf>) -> DataLocator {
    DataLocator::from_env(data_dir)
}

/// Runs `f` without the GIL on this thread (other Python threads run meanwhile).
///
/// The library's trainers are not `Send` (their estimators and optimizers are plain trait
/// objects), so `Python::detach`'s `Send` bound cannot be met by their borrows. It is
/// sound here: `detach` runs `f` on the calling thread, and every class holding a trainer
/// is `unsendable`, so its values are only ever touched from the thread that made them.
fn without_gil<T, F: FnOnce() -> T>(py: Python<'_>, f: F) -> T {
    struct SameThread<F>(F);
    // SAFETY: see above: the closure never leaves this thread.
    unsafe impl<F> Send for SameThread<F> {}
    impl<F> SameThread<F> {
        fn into_inner(self) -> F {
            self.0
        }
    }
    let f = SameThread(f);
    let out = py.detach(move || SameThread(f.into_inner()()));
    out.into_inner()
}

/// The (channels, height, width) of one sample from a shape's trailing dimensions:
/// `(d,)` is `(1, 1, d)`, `(h, w)` is `(1, h, w)`.
fn chw(dims: &[usize]) -> PyResult<[usize; 3]> {
    match *dims {
        [d] => Ok([1, 1, d]),
        [h, w] => Ok([1, h, w]),
        [c, h, w] => Ok([c, h, w]),
        _ => Err(PyValueError::new_err(format!(
            "one sample must have 1 to 3 dimensions (features, (h, w) or (c, h, w)), got {dims:?}"
        ))),
    }
}

/// A split from a float32 array `[n, ...]` and int64 labels `[n]`.
fn split(
    x: &PyReadonlyArrayDyn<'_, f32>,
    y: &PyReadonlyArray1<'_, i64>,
    which: &str,
) -> PyResult<(Split, [usize; 3])> {
    let shape = x.shape();
    let Some((&n, sample)) = shape.split_first() else {
        return Err(PyValueError::new_err(format!(
            "{which} inputs must be an array [n, ...], got a scalar"
        )));
    };
    let input_shape = chw(sample)?;
    let labels = y.as_slice()?;
    if labels.len() != n {
        return Err(PyValueError::new_err(format!(
            "{which}: {n} inputs but {} labels",
            labels.len()
        )));
    }
    let labels: Vec<u32> = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            u32::try_from(l).map_err(|_| {
                PyValueError::new_err(format!("{which} label {l} of sample {i} is negative"))
            })
        })
        .collect::<PyResult<_>>()?;
    let inputs = x.as_slice()?.to_vec();
    let dim = input_shape.iter().product();
    let s = Split::new(inputs, labels, dim).map_err(lib_err)?;
    Ok((s, input_shape))
}

/// A float32 array `[n, d]` from host values.
fn array2<'py>(
    py: Python<'py>,
    values: Vec<f32>,
    n: usize,
    d: usize,
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, values).reshape([n, d])?.into_any())
}

/// Inputs `[n, ...]` as a batch tensor `[n, features]`, checked against `input_shape`.
fn batch(
    x: &PyReadonlyArrayDyn<'_, f32>,
    input_shape: Shape,
    device: &mep::device::Device,
) -> PyResult<(Tensor<2>, usize)> {
    let shape = x.shape();
    let (n, dim) = match shape.split_first() {
        Some((&n, rest)) => (n, rest.iter().product::<usize>()),
        None => return Err(PyValueError::new_err("inputs must be an array [n, ...]")),
    };
    if dim != input_shape.numel() || n == 0 {
        return Err(PyValueError::new_err(format!(
            "inputs of shape {shape:?} do not fit the network's input {input_shape} ({} features per sample, at least one sample)",
            input_shape.numel()
        )));
    }
    let values = x.as_slice()?.to_vec();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "sample {} holds a non-finite input",
            i / dim
        )));
    }
    let t = mep::device::from_host(values, [n, dim], device);
    Ok((t, n))
}

/// A network: layers and parameters built from a model spec (`784-256-128-10`, `cnn`,
/// `vgg5-small`, ...), with its parameters as numpy arrays by name.
#[pyclass(unsendable, module = "mep._native")]
struct Network {
    net: mep::model::Network,
    spec: String,
}

impl Network {
    fn build(spec: &str, input_shape: Option<Vec<usize>>, seed: u64) -> PyResult<Self> {
        let parsed: ModelSpec = spec.parse().map_err(lib_err)?;
        let shape = match input_shape {
            Some(dims) => Shape::from_chw(chw(&dims)?),
            None => parsed.declared_input().ok_or_else(|| {
                PyValueError::new_err(format!(
                    "model `{spec}` does not declare its input size: pass input_shape"
                ))
            })?,
        };
        let device = DeviceChoice::Cpu(None)
            .resolve(Workload::Backprop)
            .map_err(lib_err)?;
        let net = parsed.build(shape, seed, &device).map_err(lib_err)?;
        Ok(Self {
            net,
            spec: parsed.to_string(),
        })
    }
}

#[pymethods]
impl Network {
    /// Builds the network of `spec` for inputs of `input_shape` (features, (h, w) or
    /// (c, h, w); optional when the spec starts with its input size), initialised from
    /// `seed`.
    #[new]
    #[pyo3(signature = (spec, input_shape=None, seed=None))]
    fn new(spec: &str, input_shape: Option<Vec<usize>>, seed: Option<u64>) -> PyResult<Self> {
        Self::build(
            spec,
            input_shape,
            seed.unwrap_or(mep::experiment::DEFAULT_SEED),
        )
    }

    /// The network stored in a checkpoint written by `mep train` or `Run.save`.
    #[staticmethod]
    #[pyo3(signature = (path, input_shape=None))]
    fn load(path: PathBuf, input_shape: Option<Vec<usize>>) -> PyResult<Self> {
        let meta = read_meta(&path).map_err(to_py)?;
        let shape = match (input_shape, meta.input_shape) {
            (Some(dims), _) => Some(dims),
            (None, Some(s)) => Some(s.to_vec()),
            (None, None) => match meta.options.dataset() {
                ARRAYS_DATASET => None,
                name => Some(mep::data::find(name).map_err(lib_err)?.input_shape.to_vec()),
            },
        };
        let spec = meta.options.model().map_err(to_py)?.to_string();
        let mut network = Self::build(&spec, shape, meta.seed)?;
        mep::train::checkpoint::load(&path, &mut network.net, None).map_err(lib_err)?;
        Ok(network)
    }

    /// The model spec.
    #[getter]
    fn spec(&self) -> String {
        self.spec.clone()
    }

    /// Shape of one input, (channels, height, width).
    #[getter]
    fn input_shape(&self) -> (usize, usize, usize) {
        let s = self.net.input_shape().chw();
        (s[0], s[1], s[2])
    }

    /// Outputs per sample (classes).
    #[getter]
    fn outputs(&self) -> usize {
        self.net.output_shape().numel()
    }

    /// Number of trainable values.
    #[getter]
    fn num_params(&self) -> usize {
        self.net.num_params()
    }

    /// Parameter names, in the network's order.
    fn param_names(&self) -> Vec<String> {
        self.net
            .param_info()
            .iter()
            .map(|i| i.name.clone())
            .collect()
    }

    /// Every parameter as a float32 array (copies), by name, in the network's order:
    /// linear weights `[in, out]`, convolution kernels `[out, in * k * k]`, biases and
    /// gains `[1, n]`.
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (info, p) in self.net.param_info().iter().zip(self.net.params()) {
            let [r, c] = p.dims();
            dict.set_item(&info.name, array2(py, mep::device::to_host(p), r, c)?)?;
        }
        Ok(dict)
    }

    /// Replaces parameters by name (float32 arrays of the same shapes; every name must be
    /// the network's, and nothing changes unless every array is valid).
    fn set_params(&mut self, params: &Bound<'_, PyDict>) -> PyResult<()> {
        let infos = self.net.param_info().to_vec();
        let mut next: Vec<Tensor<2>> = self.net.params().to_vec();
        for (key, value) in params.iter() {
            let name: String = key.extract()?;
            let Some(i) = infos.iter().position(|p| p.name == name) else {
                return Err(PyValueError::new_err(format!(
                    "no parameter `{name}` (the network has: {})",
                    self.param_names().join(", ")
                )));
            };
            let array: PyReadonlyArrayDyn<'_, f32> = value.extract()?;
            let dims = next[i].dims();
            if array.shape() != dims {
                return Err(PyValueError::new_err(format!(
                    "parameter `{name}` has shape {dims:?}, the array {:?}",
                    array.shape()
                )));
            }
            let values = array.as_slice()?.to_vec();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(PyValueError::new_err(format!(
                    "parameter `{name}`: the array holds a non-finite value"
                )));
            }
            next[i] = mep::device::from_host(values, dims, &next[i].device());
        }
        self.net.set_params(next).map_err(lib_err)
    }

    /// The network's outputs (logits) for inputs `[n, ...]`, as float32 `[n, outputs]`.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let device = self
            .net
            .params()
            .first()
            .map(|p| p.device())
            .ok_or_else(|| PyValueError::new_err("the network has no parameters"))?;
        let (t, n) = batch(&x, self.net.input_shape(), &device)?;
        let net = &self.net;
        let out = without_gil(py, || mep::device::into_host(net.forward(t)));
        array2(py, out, n, self.outputs())
    }

    fn __repr__(&self) -> String {
        format!(
            "Network('{}', input_shape={:?}, {} parameters)",
            self.spec,
            self.input_shape(),
            self.num_params()
        )
    }
}

/// Forwards a run's progress to Python: a batch callback, Ctrl-C, and the first error
/// either raised (which stops the epoch).
struct PyObserver<'a> {
    on_batch: Option<&'a Py<PyAny>>,
    epoch: usize,
    batches: usize,
    batch: usize,
    error: Option<PyErr>,
}

impl TrainObserver for PyObserver<'_> {
    fn epoch_start(&mut self, epoch: usize, batches: usize) {
        (self.epoch, self.batches, self.batch) = (epoch, batches, 0);
    }

    fn batch_end(&mut self, loss: f32, correct: usize, samples: usize) {
        self.batch += 1;
        let Some(callback) = self.on_batch else {
            return;
        };
        if self.error.is_some() {
            return;
        }
        let args = (self.epoch, self.batch, self.batches, loss, correct, samples);
        if let Err(e) = Python::attach(|py| callback.call1(py, args)) {
            self.error = Some(e);
        }
    }

    fn should_stop(&mut self) -> bool {
        if self.error.is_none()
            && let Err(e) = Python::attach(|py| py.check_signals())
        {
            self.error = Some(e);
        }
        self.error.is_some()
    }
}

/// A training run (see `mep.Run`).
#[pyclass(unsendable, module = "mep._native")]
struct Run {
    run: Option<TrainRun>,
}

impl Run {
    fn get(&self) -> PyResult<&TrainRun> {
        self.run
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the run is closed"))
    }

    fn get_mut(&mut self) -> PyResult<&mut TrainRun> {
        self.run
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the run is closed"))
    }
}

#[pymethods]
impl Run {
    /// Sets a run up: `options` is a JSON object of training options (the keys of a
    /// `mep train --config` file); data is the options' named set, or the arrays when
    /// `x` is given.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (options, seed=None, device="cpu", out=None, resume=false, force=false,
        monitor=None, fetch=true, data_dir=None, x=None, y=None, x_test=None, y_test=None,
        classes=None))]
    fn new(
        py: Python<'_>,
        options: &str,
        seed: Option<u64>,
        device: &str,
        out: Option<PathBuf>,
        resume: bool,
        force: bool,
        monitor: Option<usize>,
        fetch: bool,
        data_dir: Option<PathBuf>,
        x: Option<PyReadonlyArrayDyn<'_, f32>>,
        y: Option<PyReadonlyArray1<'_, i64>>,
        x_test: Option<PyReadonlyArrayDyn<'_, f32>>,
        y_test: Option<PyReadonlyArray1<'_, i64>>,
        classes: Option<usize>,
    ) -> PyResult<Self> {
        let options: TrainOptions = parse_json(options, "training options")?;
        let request = RunRequest {
            options,
            seed,
            device: device_choice(device)?,
            out,
            resume,
            force,
            monitor,
            collective: None,
        };
        let arrays = match (x, y, x_test, y_test) {
            (None, None, None, None) => None,
            (Some(x), Some(y), Some(xt), Some(yt)) => {
                let (train, shape) = split(&x, &y, "train")?;
                let (test, test_shape) = split(&xt, &yt, "test")?;
                if shape != test_shape {
                    return Err(PyValueError::new_err(format!(
                        "train samples are {shape:?}, test samples {test_shape:?}"
                    )));
                }
                let classes = classes.unwrap_or_else(|| {
                    train
                        .labels()
                        .iter()
                        .chain(test.labels())
                        .max()
                        .map_or(0, |&m| m as usize + 1)
                });
                Some(
                    Dataset::from_splits(ARRAYS_DATASET, shape, classes, train, test)
                        .map_err(lib_err)?,
                )
            }
            _ => {
                return Err(PyValueError::new_err(
                    "training on arrays needs all four of x, y, x_test and y_test",
                ));
            }
        };
        let locator = locator(data_dir);
        let run = without_gil(py, move || {
            let data = match arrays {
                Some(d) => DataSource::Arrays(d),
                None => DataSource::Named {
                    locator: &locator,
                    fetch,
                    progress: &mut mep::data::download::NoProgress,
                },
            };
            TrainRun::start(request, data)
        })
        .map_err(to_py)?;
        Ok(Self { run: Some(run) })
    }

    /// Runs the next epoch without the GIL and returns its metrics as JSON (`None` when
    /// every epoch has run). `on_batch(epoch, batch, batches, loss, correct, samples)` is
    /// called after every batch; an exception it raises, or Ctrl-C, stops the epoch
    /// between batches and is raised here (the epoch is not recorded).
    #[pyo3(signature = (on_batch=None))]
    fn step(&mut self, py: Python<'_>, on_batch: Option<Py<PyAny>>) -> PyResult<Option<String>> {
        let run = self.get_mut()?;
        let mut observer = PyObserver {
            on_batch: on_batch.as_ref(),
            epoch: 0,
            batches: 0,
            batch: 0,
            error: None,
        };
        let result = without_gil(py, || run.run_epoch(&mut observer));
        if let Some(e) = observer.error {
            return Err(e);
        }
        match result.map_err(to_py)? {
            Some(m) => Ok(Some(to_json(&m)?)),
            None => Ok(None),
        }
    }

    /// Every finished epoch's metrics, as a JSON list.
    fn history(&self) -> PyResult<String> {
        to_json(&self.get()?.history())
    }

    /// The run's `config.json`, as JSON.
    fn config(&self) -> PyResult<String> {
        to_json(&self.get()?.config_json())
    }

    /// Epochs the options ask for.
    #[getter]
    fn epochs(&self) -> PyResult<usize> {
        Ok(self.get()?.prepared().config.epochs)
    }

    /// The next epoch to run (1-based).
    #[getter]
    fn next_epoch(&self) -> PyResult<usize> {
        Ok(self.get()?.next_epoch())
    }

    /// The run's seed.
    #[getter]
    fn seed(&self) -> PyResult<u64> {
        Ok(self.get()?.seed())
    }

    /// The run directory, if it records.
    #[getter]
    fn out(&self) -> PyResult<Option<String>> {
        Ok(self
            .get()?
            .dir()
            .map(|d| d.path().to_string_lossy().into_owned()))
    }

    /// A copy of the network as it is now.
    fn network(&self) -> PyResult<Network> {
        let run = self.get()?;
        Ok(Network {
            net: run.trainer().model().clone(),
            spec: run.prepared().spec.to_string(),
        })
    }

    /// Accuracy of the run's prediction (its estimator's: the free phase's output for EP)
    /// on inputs `[n, ...]` and labels `[n]`, in [0, 1].
    fn evaluate(
        &self,
        py: Python<'_>,
        x: PyReadonlyArrayDyn<'_, f32>,
        y: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<f64> {
        let run = self.get()?;
        let (data, shape) = split(&x, &y, "evaluation")?;
        let expected = run.trainer().model().input_shape();
        if Shape::from_chw(shape).numel() != expected.numel() {
            return Err(PyValueError::new_err(format!(
                "inputs of shape {:?} do not fit the network's input {expected}",
                x.shape()
            )));
        }
        let classes = run.trainer().model().output_shape().numel();
        if let Some(l) = data.labels().iter().find(|&&l| l as usize >= classes) {
            return Err(PyValueError::new_err(format!(
                "label {l} is not below the network's {classes} outputs"
            )));
        }
        if data.is_empty() {
            return Err(PyValueError::new_err("no sample to evaluate"));
        }
        without_gil(py, || run.trainer().evaluate(&data, 256)).map_err(lib_err)
    }

    /// The run's prediction (logits) for inputs `[n, ...]`, float32 `[n, outputs]`.
    fn predict<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let run = self.get()?;
        let trainer = run.trainer();
        let (t, n) = batch(&x, trainer.model().input_shape(), trainer.device())?;
        let out = without_gil(py, || {
            mep::device::into_host(trainer.estimator().predict(trainer.model(), t))
        });
        array2(py, out, n, trainer.model().output_shape().numel())
    }

    /// Writes a checkpoint (model, optimizer state and run metadata, as `mep train`
    /// does) to `path` atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let run = self.get()?;
        let meta = RunMeta {
            options: run.prepared().options.clone(),
            seed: run.seed(),
            epoch: run.history().len(),
            history: run.history().to_vec(),
            input_shape: Some(run.prepared().dataset.input_shape),
        };
        let value = serde_json::to_value(&meta).map_err(|e| MepError::new_err(e.to_string()))?;
        without_gil(py, || run.trainer().save_checkpoint(&path, &value)).map_err(lib_err)
    }

    /// Ends the run: draws the monitor's charts (with a directory) and releases the run
    /// directory's lock. Returns the number of chart files.
    fn close(&mut self) -> PyResult<usize> {
        match self.run.take() {
            Some(run) => run.finish().map_err(to_py),
            None => Ok(0),
        }
    }
}

/// Sets the number of CPU worker threads (0: one per core); only before any training. With
/// two or more, the calling thread becomes one of them (train from it: its parallel loops
/// then need no handoff); other threads' work runs on the rest.
#[pyfunction]
fn set_threads(threads: usize) -> PyResult<()> {
    mep::device::set_threads(threads).map_err(lib_err)
}

/// The number of CPU worker threads in use.
#[pyfunction]
fn threads() -> usize {
    mep::device::threads()
}

/// The vector width the host's element-wise loops run at: `"baseline"`, `"avx2"` or
/// `"avx512"` (the CPU's widest, or less where `MEP_SIMD` or [`set_simd_level`] asks).
#[pyfunction]
fn simd_level() -> &'static str {
    mep::simd::level().name()
}

/// Caps the vector width of the host's element-wise loops (`"baseline"`, `"avx2"`,
/// `"avx512"`; every width gives the same results, only the speed differs); returns the
/// width now in force, at most the CPU's.
#[pyfunction]
fn set_simd_level(level: &str) -> PyResult<&'static str> {
    let asked = mep::simd::Level::parse(level).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown SIMD level `{level}`: use baseline, avx2 or avx512"
        ))
    })?;
    Ok(mep::simd::set_level(asked).name())
}

/// The preset names.
#[pyfunction]
fn presets() -> Vec<&'static str> {
    mep::experiment::Preset::names()
}

/// The named data sets, as JSON (name, input shape, classes, where they come from).
#[pyfunction]
fn datasets() -> PyResult<String> {
    let list: Vec<serde_json::Value> = mep::data::catalog()
        .into_iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "input_shape": d.input_shape,
                "classes": d.classes,
            })
        })
        .collect();
    to_json(&list)
}

/// A named data set as arrays: `(x, y, x_test, y_test)`, inputs float32
/// `[n, channels, height, width]` normalised as `options` (a JSON object of `dataset`,
/// `standardize`, `train_samples`, `test_samples`) says, labels int64.
#[pyfunction]
#[pyo3(signature = (options, seed=None, fetch=true, data_dir=None))]
fn load_dataset<'py>(
    py: Python<'py>,
    options: &str,
    seed: Option<u64>,
    fetch: bool,
    data_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let options: TrainOptions = parse_json(options, "data options")?;
    let locator = locator(data_dir);
    let seed = seed.unwrap_or(mep::experiment::DEFAULT_SEED);
    let dataset = without_gil(py, || {
        options.load_data(&locator, seed, fetch, &mut mep::data::download::NoProgress)
    })
    .map_err(to_py)?;
    let [c, h, w] = dataset.input_shape;
    let mut parts: Vec<Bound<'py, PyAny>> = Vec::with_capacity(4);
    for split in [&dataset.train, &dataset.test] {
        let x = PyArray1::from_slice(py, split.inputs()).reshape([split.len(), c, h, w])?;
        let y: Vec<i64> = split.labels().iter().map(|&l| i64::from(l)).collect();
        parts.push(x.into_any());
        parts.push(PyArray1::from_vec(py, y).into_any());
    }
    Ok(pyo3::types::PyTuple::new(py, parts)?.into_any())
}

/// `mep check-gradient`: `check` is a JSON object of `GradientCheck` fields (unset ones
/// take the CLI's defaults); returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (check, seed=None, device="cpu", fetch=true, data_dir=None))]
fn check_gradient(
    py: Python<'_>,
    check: &str,
    seed: Option<u64>,
    device: &str,
    fetch: bool,
    data_dir: Option<PathBuf>,
) -> PyResult<String> {
    let check: GradientCheck = merge_defaults(check, "gradient check options")?;
    let device = device_choice(device)?
        .resolve(Workload::Settle)
        .map_err(lib_err)?;
    let locator = locator(data_dir);
    let report = without_gil(py, || {
        check.run(
            seed.unwrap_or(mep::experiment::DEFAULT_SEED),
            &device,
            &locator,
            fetch,
            &mut mep::data::download::NoProgress,
        )
    })
    .map_err(to_py)?;
    to_json(&report)
}

/// `T`'s defaults overlaid with the JSON object `given`; unknown keys are refused and a
/// value of the wrong type is reported with its key.
fn merge_defaults<T: Default + serde::Serialize + serde::de::DeserializeOwned>(
    given: &str,
    what: &str,
) -> PyResult<T> {
    let given: serde_json::Map<String, serde_json::Value> = parse_json(given, what)?;
    let defaults = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => {
            return Err(MepError::new_err(format!(
                "{what}: defaults are not an object"
            )));
        }
    };
    let mut merged = defaults.clone();
    for (k, v) in given {
        if !defaults.contains_key(&k) {
            let mut known: Vec<&str> = defaults.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(PyValueError::new_err(format!(
                "{what}: unknown option `{k}` (expected one of: {})",
                known.join(", ")
            )));
        }
        let mut one = defaults.clone();
        one.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<T>(serde_json::Value::Object(one)) {
            return Err(PyValueError::new_err(format!("{what}: `{k}`: {e}")));
        }
        merged.insert(k, v);
    }
    serde_json::from_value(serde_json::Value::Object(merged))
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// Suite progress: only downloads (quietly) and Ctrl-C.
struct SuiteQuiet {
    interrupted: Option<PyErr>,
    download: mep::data::download::NoProgress,
}

impl TrainObserver for SuiteQuiet {
    fn should_stop(&mut self) -> bool {
        if self.interrupted.is_none()
            && let Err(e) = Python::attach(|py| py.check_signals())
        {
            self.interrupted = Some(e);
        }
        self.interrupted.is_some()
    }
}

impl mep::continual::ContinualObserver for SuiteQuiet {}

impl mep::experiment::continual::ContinualBenchObserver for SuiteQuiet {
    fn download(&mut self) -> &mut dyn mep::data::download::DownloadProgress {
        &mut self.download
    }
}

impl SuiteObserver for SuiteQuiet {
    fn download(&mut self) -> &mut dyn mep::data::download::DownloadProgress {
        &mut self.download
    }
}

/// `mep bench NAME`: runs a suite (or `continual`, the five-method continual-learning
/// comparison with its defaults) and returns its `results.json` as JSON; with `out`, also
/// writes results.json, table.md and the charts there.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (name, quick=false, seeds=None, seed=None,
    out=None, device="cpu", fetch=true, data_dir=None))]
fn run_suite(
    py: Python<'_>,
    name: &str,
    quick: bool,
    seeds: Option<Vec<u64>>,
    seed: Option<u64>,
    out: Option<PathBuf>,
    device: &str,
    fetch: bool,
    data_dir: Option<PathBuf>,
) -> PyResult<String> {
    let choice = device_choice(device)?;
    let device = choice.resolve(Workload::Backprop).map_err(lib_err)?;
    let locator = locator(data_dir);
    let seed = seed.unwrap_or(mep::experiment::DEFAULT_SEED);
    let mut observer = SuiteQuiet {
        interrupted: None,
        download: mep::data::download::NoProgress,
    };
    if name == "continual" {
        let bench = ContinualBench {
            quick,
            ..ContinualBench::default()
        };
        let seeds = seeds.unwrap_or_else(|| vec![seed]);
        let results = without_gil(py, || {
            bench.run(&seeds, &locator, fetch, &device, &mut observer)
        });
        if let Some(e) = observer.interrupted {
            return Err(e);
        }
        let mut results = results.map_err(to_py)?;
        if let Some(obj) = results.json.as_object_mut() {
            obj.insert("device".into(), choice.to_string().into());
        }
        if let Some(dir) = out {
            without_gil(py, || results.write(&dir)).map_err(to_py)?;
        }
        return to_json(&results.json);
    }
    let suite = Suite::from_name(name).map_err(to_py)?;
    let config = SuiteConfig {
        quick,
        seeds,
        seed,
        locator: &locator,
        fetch,
        device,
        device_label: choice.to_string(),
    };
    let results = without_gil(py, || suite.run(&config, &mut observer));
    if let Some(e) = observer.interrupted {
        return Err(e);
    }
    let results = results.map_err(to_py)?;
    if let Some(dir) = out {
        without_gil(py, || results.write(&dir)).map_err(to_py)?;
    }
    to_json(&results.json)
}

/// `mep continual`: one method on `tasks` permuted tasks of the options' data set.
/// `options` is a JSON object of training options, `ewc` one of `EwcConfig` fields (or
/// `None`); returns the outcome as JSON; with `out`, also writes results.json and charts.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (options, tasks=10, ewc=None, seed=None, out=None,
    device="cpu", fetch=true, data_dir=None))]
fn continual(
    py: Python<'_>,
    options: &str,
    tasks: usize,
    ewc: Option<&str>,
    seed: Option<u64>,
    out: Option<PathBuf>,
    device: &str,
    fetch: bool,
    data_dir: Option<PathBuf>,
) -> PyResult<String> {
    let options: TrainOptions = parse_json(options, "training options")?;
    let ewc: Option<EwcConfig> = match ewc {
        Some(json) => Some(merge_defaults(json, "EWC options")?),
        None => None,
    };
    let method = ContinualMethod::new(options, ewc);
    method.validate().map_err(to_py)?;
    let device = device_choice(device)?
        .resolve(Workload::Backprop)
        .map_err(lib_err)?;
    let locator = locator(data_dir);
    let seed = seed.unwrap_or(mep::experiment::DEFAULT_SEED);
    let outcome = without_gil(py, || {
        let base = load_base(
            &method.options,
            seed,
            &locator,
            fetch,
            &mut mep::data::download::NoProgress,
        )?;
        let outcome = method.run(&base, tasks, seed, &device, &mut Silent)?;
        if let Some(dir) = &out {
            write_outcome(dir, &outcome)?;
        }
        Ok::<_, ExperimentError>(outcome)
    })
    .map_err(to_py)?;
    to_json(&outcome)
}

/// The `mep._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A misspelt MEP_SIMD would otherwise silently run at the CPU's width.
    mep::simd::level_from_env().map_err(PyValueError::new_err)?;
    m.add("MepError", m.py().get_type::<MepError>())?;
    m.add_class::<Network>()?;
    m.add_class::<Run>()?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    m.add_function(wrap_pyfunction!(datasets, m)?)?;
    m.add_function(wrap_pyfunction!(load_dataset, m)?)?;
    m.add_function(wrap_pyfunction!(check_gradient, m)?)?;
    m.add_function(wrap_pyfunction!(run_suite, m)?)?;
    m.add_function(wrap_pyfunction!(continual, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
