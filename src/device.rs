//! The tensor stack: burn's runtime-dispatched backend, device selection and threads.
//!
//! Every tensor in mep is a [`Tensor`] of burn's `Dispatch` backend; which kernels run is
//! decided at run time by the [`Device`] it lives on. Two CPU backends are compiled in
//! (burn's pure-Rust `flex`, built on the `gemm` crate, and `ndarray`), CUDA is behind the
//! `cuda` cargo feature. `--device cpu` picks the CPU backend measured fastest for the
//! workload ([`Workload`]); `cpu:flex` and `cpu:ndarray` force one.

use std::fmt;
use std::str::FromStr;

/// The backend type of every tensor in mep.
pub type Backend = burn::Dispatch;
/// A device of the dispatch backend (CPU backend variant, CUDA GPU, or an autodiff wrapper).
pub type Device = burn::DispatchDevice;
/// A float tensor of rank `D` on the dispatch backend.
pub type Tensor<const D: usize> = burn::tensor::Tensor<Backend, D>;

/// A tensor's values copied to the host as `f32`, row-major (one device read).
///
/// On a CPU backend the copy is one pass: burn's `into_data` of a shared tensor copies its
/// buffer three times (bytes, a realignment, then elements), while an element-wise op on
/// it writes a fresh `f32` buffer that `into_data` then hands over without copying.
/// Multiplying by one changes no value (a settle step reads every weight this way).
pub fn to_host<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    if host_f32(t) {
        return into_host(t.clone().mul_scalar(1.0));
    }
    into_host(t.clone())
}

/// A tensor's values moved to the host as `f32`, row-major (no conversion pass when the
/// backend already holds `f32`).
pub fn into_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    let data = t.into_data();
    match data.dtype {
        burn::tensor::DType::F32 => data.into_vec::<f32>(),
        _ => data.convert::<f32>().into_vec::<f32>(),
    }
    .expect("converted to f32")
}

/// A `[rows, cols]` tensor on `device` from host values, row-major (`values.len()` must be
/// `rows * cols`).
pub fn from_host(values: Vec<f32>, [rows, cols]: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(burn::tensor::TensorData::new(values, [rows, cols]), device)
}

/// Keeps freed large buffers in the process instead of returning them to the kernel.
///
/// glibc serves every allocation above its mmap threshold (128 KiB to start with) with a
/// fresh `mmap`, so each settle step paid page faults for every new state-sized tensor:
/// 19% of a `cnn` settle step's time in `perf`. Raising the threshold and the trim
/// threshold makes the allocator reuse those pages (measured, one thread, batch 64: a
/// 784-256-128-10 settle step 259 -> 202 us, a `cnn` step 48 -> 42 ms). Call it once at
/// start-up, before threads are spawned; it does nothing on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before other threads
    // allocate, it cannot race.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Errors of device selection and thread setup.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device string could not be parsed.
    #[error("unknown device `{0}` (expected cpu, cpu:flex, cpu:ndarray, cuda or cuda:N)")]
    Unknown(String),
    /// The precision string could not be parsed.
    #[error("unknown precision `{0}` (expected f32, bf16 or f16)")]
    UnknownPrecision(String),
    /// CUDA was asked for but this binary was built without the `cuda` feature.
    #[error(
        "device `{0}` needs CUDA, but this binary was built without it; rebuild with `cargo build --release --features cuda`"
    )]
    CudaNotBuilt(String),
    /// A CUDA device was asked for but cannot run a computation (no GPU, no driver, or the
    /// index is out of range).
    #[error("device `{device}` cannot be used: {reason}")]
    Unusable {
        /// The device as named.
        device: String,
        /// What the probe computation reported.
        reason: String,
    },
    /// The thread count is invalid or the thread pool was already set up.
    #[error("cannot use {threads} threads: {reason}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why it failed.
        reason: String,
    },
}

/// Floating-point precision of EP's forward pass, settling and contrast (the optimizer's
/// update always runs in f32 on f32 parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (the default).
    #[default]
    F32,
    /// bfloat16: f32's range, 8 significant bits.
    Bf16,
    /// IEEE half precision: 11 significant bits, range up to 65504.
    F16,
}

impl Precision {
    /// burn's float type of this precision.
    pub fn dtype(self) -> burn::tensor::FloatDType {
        match self {
            Self::F32 => burn::tensor::FloatDType::F32,
            Self::Bf16 => burn::tensor::FloatDType::BF16,
            Self::F16 => burn::tensor::FloatDType::F16,
        }
    }

    /// `t` in this precision (no copy when it already is).
    pub fn cast<const D: usize>(self, t: Tensor<D>) -> Tensor<D> {
        t.cast(self.dtype())
    }
}

impl FromStr for Precision {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "half" | "float16" => Ok(Self::F16),
            _ => Err(DeviceError::UnknownPrecision(s.to_string())),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// The CPU backends compiled into mep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBackend {
    /// burn-flex: pure Rust, `gemm`-based matrix products.
    Flex,
    /// burn-ndarray: `ndarray` with `matrixmultiply`.
    NdArray,
}

/// Kinds of work whose fastest CPU backend differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Forward and backward passes through burn's autodiff (the backprop baselines).
    Backprop,
    /// Element-wise-heavy state relaxation without autodiff (EP settling).
    Settle,
}

impl Workload {
    /// The CPU backend measured fastest for this workload on the 2-core development machine
    /// (figures in RESULTS.md, reproduced by `cargo bench --bench backends`).
    pub fn default_cpu_backend(self) -> CpuBackend {
        match self {
            Workload::Backprop => CpuBackend::Flex,
            Workload::Settle => CpuBackend::Flex,
        }
    }
}

/// A device as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU, with a forced backend or (`None`) the fastest one for the workload.
    Cpu(Option<CpuBackend>),
    /// CUDA GPU number `N`.
    Cuda(usize),
}

impl Default for DeviceChoice {
    fn default() -> Self {
        Self::Cpu(None)
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu(None)),
            "cpu:flex" | "flex" => Ok(Self::Cpu(Some(CpuBackend::Flex))),
            "cpu:ndarray" | "ndarray" => Ok(Self::Cpu(Some(CpuBackend::NdArray))),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match lower.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(DeviceError::Unknown(s.to_string())),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu(None) => write!(f, "cpu"),
            Self::Cpu(Some(CpuBackend::Flex)) => write!(f, "cpu:flex"),
            Self::Cpu(Some(CpuBackend::NdArray)) => write!(f, "cpu:ndarray"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The burn device for `workload` (without autodiff).
    pub fn resolve(self, workload: Workload) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu(backend) => Ok(cpu_device(
                backend.unwrap_or_else(|| workload.default_cpu_backend()),
            )),
            Self::Cuda(index) => cuda_device(index, &self),
        }
    }

    /// Whether this is a CPU device.
    pub fn is_cpu(self) -> bool {
        matches!(self, Self::Cpu(_))
    }
}

/// The device of one CPU backend.
pub fn cpu_device(backend: CpuBackend) -> Device {
    match backend {
        CpuBackend::Flex => Device::Flex(burn_flex::FlexDevice),
        CpuBackend::NdArray => Device::NdArray(burn_ndarray::NdArrayDevice::Cpu),
    }
}

/// Opens CUDA device `index` and runs [`probe`] on it: burn panics on the first tensor
/// operation of a device it cannot use, so the probe turns that into an error up front.
#[cfg(feature = "cuda")]
fn cuda_device(index: usize, choice: &DeviceChoice) -> Result<Device, DeviceError> {
    let device = Device::Cuda(burn::backend::cuda::CudaDevice::new(index));
    probe(&device).map_err(|reason| DeviceError::Unusable {
        device: choice.to_string(),
        reason,
    })?;
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize, choice: &DeviceChoice) -> Result<Device, DeviceError> {
    Err(DeviceError::CudaNotBuilt(choice.to_string()))
}

/// Runs one small computation on `device` (`[1, 2] * 2`, read back) and reports why it
/// failed: a panic inside the backend (its message; the panic is caught and not printed)
/// or a wrong result.
pub fn probe(device: &Device) -> Result<(), String> {
    let device = device.clone();
    catch_quietly(move || {
        let t = Tensor::<1>::from_floats([1.0, 2.0], &device);
        into_host(t.mul_scalar(2.0))
    })
    .and_then(|values| {
        if values == [2.0, 4.0] {
            Ok(())
        } else {
            Err(format!(
                "a test computation returned {values:?} instead of [2.0, 4.0]"
            ))
        }
    })
}

/// Runs `f`, turning a panic into a message. The (process-wide) panic hook is replaced
/// meanwhile by one that records the first panic's message on any thread, so that a
/// backend whose worker thread panicked (leaving the caller a bare channel error) is
/// reported by the worker's own message; callers are serialised so that each restores
/// the hook it found.
fn catch_quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    use std::sync::{Arc, Mutex, PoisonError};
    static HOOK: Mutex<()> = Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(PoisonError::into_inner);
    let first: Arc<Mutex<Option<String>>> = Arc::default();
    let record = Arc::clone(&first);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload_as_str()
            .unwrap_or("the backend panicked")
            .to_string();
        record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(message);
    }));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    result.map_err(|_| {
        first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| "the backend panicked".to_string())
    })
}

/// The same device with reverse-mode autodiff enabled.
pub fn autodiff(device: &Device) -> Device {
    Device::autodiff(device.clone())
}

/// Most worker threads per core [`set_threads`] accepts: more only adds start-up time and
/// contention (5000 threads took 26 s to start on 2 cores, 40000 froze the machine).
pub const MAX_THREADS_PER_CORE: usize = 8;

/// Sets the number of worker threads of the CPU kernels (rayon's global pool, which both CPU
/// backends use); `0` means one per core. Must be called once, before any tensor work
/// (with `0`, a pool already started is kept). More than [`MAX_THREADS_PER_CORE`] per core
/// is refused.
///
/// With two or more threads the calling thread becomes the pool's worker 0, beside
/// `threads - 1` spawned ones: a parallel loop it starts then runs on it and the others,
/// instead of being handed to the pool while the caller sleeps until it is done (one wake-up
/// per loop, which burn's element-wise ops and the optimizer's small products paid on every
/// call). Work started on any other thread is served by the spawned workers. One thread
/// keeps a single spawned worker: there the caller's loops run inline anyway
/// ([`on_workers`]), and a pool of the caller alone would never serve other threads.
pub fn set_threads(threads: usize) -> Result<(), DeviceError> {
    let cores = cores();
    if threads > MAX_THREADS_PER_CORE * cores {
        return Err(DeviceError::Threads {
            threads,
            reason: format!(
                "more than {MAX_THREADS_PER_CORE} per core ({} on this machine's {cores} cores)",
                MAX_THREADS_PER_CORE * cores
            ),
        });
    }
    let wanted = if threads == 0 { cores } else { threads };
    let mut builder = rayon::ThreadPoolBuilder::new().num_threads(wanted);
    if wanted > 1 {
        builder = builder.use_current_thread();
    }
    match builder.build_global() {
        Ok(()) => Ok(()),
        Err(_) if threads == 0 => Ok(()),
        Err(e) => Err(DeviceError::Threads {
            threads,
            reason: e.to_string(),
        }),
    }
}

/// Whether `device` is a CPU backend, whose tensors the host kernels (`model::kernels`,
/// the dense settle loop) can read directly.
pub fn is_host(device: &Device) -> bool {
    matches!(device, Device::Flex(_) | Device::NdArray(_))
}

/// Whether `t` is an `f32` tensor on a CPU backend, whose values the host kernels and
/// loops can take over ([`into_host`]) and hand back ([`from_host`]) without conversion.
pub fn host_f32<const D: usize>(t: &Tensor<D>) -> bool {
    is_host(&t.device()) && t.dtype() == burn::tensor::DType::F32
}

/// The machine's cores (what the OS lets this process use; 1 when it cannot tell).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Number of worker threads the CPU kernels use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `task(0)`, `task(1)`, ... `task(count - 1)`, each exactly once, on the pool's
/// workers: each worker takes the next task not yet taken until none is left. With the
/// tasks in decreasing size (the longest-processing-time-first rule) the workers end
/// within about the last tasks' size of each other, whatever their speeds. A binary split
/// of the list (rayon's) fixes each worker's share up front, and on this 2-vCPU VM one
/// core often ran 5-15% slower than the other for a while: the faster then waited for up
/// to half a share at the end of every parallel phase.
pub(crate) fn self_scheduled(count: usize, task: impl Fn(usize) + Sync) {
    let workers = threads().min(count);
    if workers <= 1 {
        (0..count).for_each(task);
        return;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        loop {
            let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if t >= count {
                break;
            }
            task(t);
        }
    };
    rayon::scope(|s| {
        for _ in 1..workers {
            s.spawn(|_| work());
        }
        work();
    });
}

/// [`self_scheduled`] over owned items (such as disjoint `&mut` chunks of one buffer),
/// `f(index, item)` in the items' order.
pub(crate) fn each_self_scheduled<T: Send>(items: Vec<T>, f: impl Fn(usize, T) + Sync) {
    if threads() == 1 {
        items
            .into_iter()
            .enumerate()
            .for_each(|(i, item)| f(i, item));
        return;
    }
    // Each task takes its item out of its slot once (the lock is never contended).
    let slots: Vec<std::sync::Mutex<Option<T>>> = items
        .into_iter()
        .map(|item| std::sync::Mutex::new(Some(item)))
        .collect();
    self_scheduled(slots.len(), |i| {
        let item = slots[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(item) = item {
            f(i, item);
        }
    });
}

/// Runs `f` on one of the pool's workers (here when this thread is one, as the thread that
/// called [`set_threads`] is, or when the pool has a single worker, whose kernels run on
/// the caller anyway). A parallel loop started from outside the pool hands its work to the
/// workers and puts the caller to sleep until they are done, once per loop; from inside,
/// the caller works on its share and the other workers steal the rest. A loop of many
/// short parallel phases (a settle, a Newton–Schulz iteration) therefore pays one handoff
/// instead of one per phase.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if threads() == 1 || rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// While it lives, the pool's other workers look for work without pause instead of going
/// to sleep ([`keep_workers_awake`]).
#[derive(Debug)]
pub struct AwakeWorkers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for AwakeWorkers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Pause instructions between two looks for work of an awake worker (about a
/// microsecond): looking more often slowed the caller's own work down.
const AWAKE_SPINS: usize = 64;

/// Looks for work after which an awake worker yields its core once (a few hundred
/// microseconds), so that another process that needs it gets it.
const AWAKE_LOOKS_PER_YIELD: u32 = 256;

/// Keeps the pool's other workers awake, looking for work, until the guard drops: for a
/// loop of short parallel phases between serial ones (a training step). rayon puts an idle
/// worker to sleep after a few dozen microseconds, and waking it takes about 45 us on the
/// 2-core development VM: a `join` of two 20 us halves right after 50 us of serial work took
/// 50 us instead of 21, because the caller did both halves before the worker woke up.
/// While the guard lives, the workers spin between looks (`rayon::yield_now`) instead.
///
/// Only on the pool's worker 0 (the thread that called [`set_threads`] with two or more
/// threads), whose own core the spinning workers leave free, and with no more threads than
/// cores; `None` otherwise. The workers spin on their own cores (yielding them now and
/// then), so hold it only around work that keeps the pool busy, and not where other
/// processes share the cores (the trainer does not with ranks).
pub fn keep_workers_awake() -> Option<AwakeWorkers> {
    if threads() < 2 || threads() > cores() || rayon::current_thread_index() != Some(0) {
        return None;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    rayon::spawn_broadcast(move |ctx| {
        // Worker 0 is the caller, which runs its copy the next time it waits on the pool:
        // it returns at once.
        if ctx.index() == 0 {
            return;
        }
        let mut looks = 0u32;
        while !flag.load(std::sync::atomic::Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                looks = 0;
                continue;
            }
            looks = looks.wrapping_add(1);
            if looks.is_multiple_of(AWAKE_LOOKS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                for _ in 0..AWAKE_SPINS {
                    std::hint::spin_loop();
                }
            }
        }
    });
    Some(AwakeWorkers { stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once, on one worker or several, and with more workers than
    /// tasks; owned items reach their task with their own index.
    #[test]
    fn self_scheduled_tasks_run_exactly_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for count in [0, 1, 2, 17] {
                let runs: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|| {
                    self_scheduled(count, |t| {
                        runs[t].fetch_add(1, Ordering::Relaxed);
                    });
                });
                assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
                let mut values = vec![0usize; count];
                pool.install(|| {
                    let chunks: Vec<&mut [usize]> = values.chunks_mut(1).collect();
                    each_self_scheduled(chunks, |i, chunk| chunk[0] = i + 1);
                });
                assert_eq!(values, (1..=count).collect::<Vec<_>>(), "{threads} threads");
            }
        }
    }

    #[test]
    fn awake_workers_only_for_worker_zero_and_released_on_drop() {
        // A test thread is no worker of the global pool: nothing to keep awake.
        assert!(keep_workers_awake().is_none());
        // Two spinning threads need two cores (the guard refuses more threads than cores).
        if cores() < 2 {
            return;
        }
        // A pool this thread joins as worker 0 (leaked by rayon, as documented).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .use_current_thread()
            .build()
            .unwrap();
        let guard = pool.install(keep_workers_awake);
        assert!(guard.is_some(), "worker 0 of two keeps worker 1 awake");
        // Awake, worker 1 takes the pool's work: the second halves of joins whose first
        // halves sleep (at least one of a hundred; scheduling decides the rest).
        let ran_on_one = pool.install(|| {
            (0..100)
                .filter(|_| {
                    let (_, b) = rayon::join(
                        || std::thread::sleep(std::time::Duration::from_micros(200)),
                        rayon::current_thread_index,
                    );
                    b == Some(1)
                })
                .count()
        });
        assert!(ran_on_one > 0, "worker 1 took no second half");
        drop(guard);
        // Released, the pool still serves work on every worker.
        let indices = pool.broadcast(|ctx| ctx.index());
        assert_eq!(indices, vec![0, 1]);
    }

    #[test]
    fn probe_passes_on_both_cpu_backends() {
        for backend in [CpuBackend::Flex, CpuBackend::NdArray] {
            assert_eq!(probe(&cpu_device(backend)), Ok(()), "{backend:?}");
        }
    }

    #[test]
    fn a_panicking_probe_becomes_its_message() {
        let owned = catch_quietly(|| -> () { panic!("no CUDA driver: {}", 7) });
        assert_eq!(owned, Err("no CUDA driver: 7".to_string()));
        let literal = catch_quietly(|| -> () { panic!("static message") });
        assert_eq!(literal, Err("static message".to_string()));
        assert_eq!(catch_quietly(|| 3), Ok(3));
        // A worker thread's panic is the reason, not the caller's channel error after it.
        let worker = catch_quietly(|| -> () {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            std::thread::spawn(move || {
                let _tx = tx;
                panic!("cannot load libcuda.so");
            });
            rx.recv().unwrap();
        });
        assert_eq!(worker, Err("cannot load libcuda.so".to_string()));
    }
}
