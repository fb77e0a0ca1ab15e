//! Fuzzing of mep's input parsers: the IDX and CIFAR-10 readers, the model-spec grammar,
//! TOML run configs and checkpoint loading. Each target mutates valid inputs (bit flips, byte
//! insertions and deletions, truncations, splices, interesting values) with a seeded
//! generator and checks that every input gives a clean result or a typed error, never a
//! panic, and that what loads is consistent.
//!
//! CI runs a short pass (`MEP_FUZZ_EXECS`, default 2,000 executions per target). The long
//! run, a million per target:
//!
//! ```sh
//! MEP_FUZZ_EXECS=1000000 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! A failing input is written to `target/tmp/fuzz-<target>-failure.bin` to reproduce.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use common::{gzip, idx_bytes, scratch_dir};
use mep::data::idx::{read_images, read_labels};
use mep::experiment::TrainOptions;
use mep::model::{ModelSpec, Shape};

/// Executions per target.
fn execs() -> usize {
    std::env::var("MEP_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// xorshift64*: a small seeded generator, the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations of `base`.
fn mutate(rng: &mut Rng, base: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: [u32; 8] = [0, 1, 2, 255, 0x7fff_ffff, 0x8000_0000, u32::MAX, 2051];
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, rng.next() as u8),
            2 if !v.is_empty() => {
                v.remove(at.min(v.len() - 1));
            }
            3 => v.truncate(at),
            4 if v.len() >= 4 => {
                let i = at.min(v.len() - 4);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                v[i..i + 4].copy_from_slice(&x.to_be_bytes());
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from + 1);
                v.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => {
                let n = 1 + rng.below(16);
                v.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }
    v
}

/// Runs `check` on `execs()` mutated inputs; a panic fails the test with the input saved.
fn fuzz(name: &str, corpus: &[Vec<u8>], mut check: impl FnMut(&[u8])) {
    let dir = scratch_dir(&format!("fuzz-{name}"));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let start = Instant::now();
    let n = execs();
    for i in 0..n {
        let base = &corpus[rng.below(corpus.len())];
        let input = if i < corpus.len() {
            corpus[i].clone()
        } else {
            mutate(&mut rng, base, corpus)
        };
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let saved = dir.join(format!("fuzz-{name}-failure.bin"));
            std::fs::write(&saved, &input).unwrap();
            panic!(
                "{name}: execution {i} panicked; input in {}",
                saved.display()
            );
        }
    }
    println!(
        "{name}: {n} executions in {:.1} s, no panic",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn idx_reader() {
    let images = idx_bytes(0x0803, &[3, 2, 2], &[7; 12]);
    let labels = idx_bytes(0x0801, &[3], &[1, 2, 3]);
    let corpus = vec![images.clone(), labels.clone(), gzip(&images), gzip(&labels)];
    let dir = scratch_dir("fuzz-idx-files");
    let path = dir.join("input");
    fuzz("idx", &corpus, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(i) = read_images(&path) {
            assert_eq!(i.pixels.len(), i.count * i.rows * i.cols);
        }
        if let Ok(l) = read_labels(&path) {
            // A label file's length is its header's count: nothing beyond it is accepted.
            let count = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            if bytes[..2] != [0x1f, 0x8b] {
                assert_eq!(l.labels.len(), count as usize);
            }
        }
    });
}

#[test]
fn cifar_reader() {
    use mep::data::cifar::{RECORD, read_batch};
    let mut two = vec![7u8; 2 * RECORD];
    two[0] = 3;
    two[RECORD] = 9;
    let corpus = vec![two.clone(), gzip(&two)];
    let dir = scratch_dir("fuzz-cifar-files");
    let path = dir.join("input");
    fuzz("cifar", &corpus, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(b) = read_batch(&path) {
            assert_eq!(b.pixels.len(), b.len() * (RECORD - 1));
            assert!(b.labels.iter().all(|&l| l < 10));
        }
    });
}

#[test]
fn model_spec_grammar() {
    let specs = [
        "784-256-128-10",
        "conv32k5-pool2-conv64k5-pool2-fc10",
        "conv8k3s2p1-relu-avgpool2-flatten-fc10",
        "784-128-res[relu-fc128]-res[ln-gelu-fc128]-10",
        "784-tokens4-attn2-ln-flatten-fc10",
        "784-bn-drop0.1-hsig-10",
        "mlp-small",
        "cnn",
    ];
    let mut corpus: Vec<Vec<u8>> = specs.iter().map(|s| s.as_bytes().to_vec()).collect();
    // Plus specs drawn token by token from the grammar, so that mutations start from many
    // shapes of valid (or nearly valid) input.
    const TOKENS: [&str; 24] = [
        "784",
        "64",
        "16",
        "10",
        "fc8",
        "conv4k3",
        "conv2k2s2p1",
        "pool2",
        "avgpool2",
        "relu",
        "tanh",
        "hsig",
        "gelu",
        "id",
        "ln",
        "bn",
        "drop0.2",
        "flatten",
        "tokens4",
        "attn2",
        "res[relu-fc16]",
        "res[conv4k3p1]",
        "mlp-small",
        "cnn-small",
    ];
    let mut rng = Rng(7);
    for _ in 0..200 {
        let n = 1 + rng.below(6);
        let spec: Vec<&str> = (0..n).map(|_| TOKENS[rng.below(TOKENS.len())]).collect();
        corpus.push(spec.join("-").into_bytes());
    }
    let dev = common::dev();
    fuzz("spec", &corpus, |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let Ok(spec) = text.parse::<ModelSpec>() else {
            return;
        };
        // What parses prints as a spec that parses to the same thing.
        let again: ModelSpec = spec.to_string().parse().expect("a printed spec parses");
        assert_eq!(again.to_string(), spec.to_string());
        // Small inputs keep a build cheap; it may fail, but only with an error.
        let _ = spec.build(Shape::Image { c: 1, h: 8, w: 8 }, 1, &dev);
        let _ = spec.build(Shape::Flat(16), 1, &dev);
    });
}

#[test]
fn toml_run_configs() {
    let configs = [
        "preset = \"smep\"\nepochs = 2\nlr = 0.01\n",
        "estimator = \"ep\"\noptimizer = \"adam\"\nbeta = 0.2\nsettle_steps = 10\nnudging = \"centered\"\n",
        "preset = \"sdmep\"\nupdate = \"dion\"\ngamma = 0.9\nschedule = \"cosine\"\nwarmup = 5\n",
        "standardize = [0.1307, 0.3081]\nerror_feedback = 0.9\nef_rank = 0.2\nbatch = 32\n",
        "model = \"784-res[relu-fc784]-10\"\nloss = \"ce:0.1\"\nprecision = \"bf16\"\n",
    ];
    let corpus: Vec<Vec<u8>> = configs.iter().map(|s| s.as_bytes().to_vec()).collect();
    fuzz("toml", &corpus, |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let Ok(options) = toml::from_str::<TrainOptions>(text) else {
            return;
        };
        if options.validate().is_ok() {
            let _ = options.recipe(1000);
            let _ = options.load_options();
        }
    });
}

#[test]
fn checkpoint_loading() {
    use mep::experiment::{EstimatorChoice, Preset, Recipe};
    use mep::loss::Loss;
    use mep::optim::UpdateRule;
    let dev = common::dev();
    let dir = scratch_dir("fuzz-checkpoint-files");
    let build = || {
        let net = common::network("6-8-bn-relu-3", Shape::Flat(6), 4, &dev);
        // Backprop with sdmep's optimizer (Dion on every matrix, the spectral bound): the
        // checkpoint then holds every kind of optimizer state.
        let mut recipe: Recipe = Preset::Sdmep.config();
        recipe.estimator = EstimatorChoice::Backprop {
            loss: Loss::CrossEntropy { smoothing: 0.0 },
        };
        if let UpdateRule::Dion { threshold, .. } = &mut recipe.optimizer.update {
            *threshold = 0;
        }
        let (est, opt) = recipe.build(&net, 100, 1).unwrap();
        mep::train::Trainer::new(net, est, opt, dev.clone())
    };
    let mut trainer = build();
    let x: Vec<f32> = (0..4 * 6).map(|i| ((i * 37) % 11) as f32 / 11.0).collect();
    trainer.train_step(&x, &[0, 1, 2, 1], None).unwrap();
    let path = dir.join("valid.safetensors");
    trainer
        .save_checkpoint(&path, &serde_json::json!({"epoch": 1}))
        .unwrap();
    let corpus = vec![std::fs::read(&path).unwrap()];
    let input = dir.join("input.safetensors");
    let mut target = build();
    fuzz("checkpoint", &corpus, |bytes| {
        std::fs::write(&input, bytes).unwrap();
        if target.load_checkpoint(Path::new(&input)).is_ok() {
            // What loads is finite and trains a step without a panic.
            assert_eq!(target.non_finite_param(), None);
            let _ = target.train_step(&x, &[0, 1, 2, 1], None);
        }
    });
}
