//! The `mep` binary: data listing, training, and its error messages.

mod common;

use std::process::Output;

use common::{data_dir, scratch_dir, stderr};

fn mep(args: &[&str], data: Option<&std::path::Path>) -> Output {
    common::run_mep(args, data)
}

/// The JSON objects printed one per line on stdout.
fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn data_list_shows_both_sets_present_from_mep_data_dir() {
    let out = mep(&["data", "list"], Some(&data_dir()));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for name in ["mnist", "fashion-mnist", "permuted-mnist", "xor"] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name} in\n{text}"));
        assert!(line.contains("present"), "{line}");
    }

    let out = mep(&["data", "list", "--json"], Some(&data_dir()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sets = v["datasets"].as_array().unwrap();
    let mnist = sets.iter().find(|s| s["name"] == "mnist").unwrap();
    assert_eq!(mnist["present"], true);
    assert_eq!(mnist["train_samples"], 60000);
}

#[test]
fn data_list_reports_missing_sets() {
    let empty = scratch_dir("cli-empty");
    let out = mep(
        &["--data-dir", empty.to_str().unwrap(), "data", "list"],
        None,
    );
    assert!(out.status.success());
    let text = stdout(&out);
    let line = text.lines().find(|l| l.starts_with("mnist ")).unwrap();
    assert!(line.contains("missing"), "{line}");
    assert!(text.contains("mep data fetch"));
}

#[test]
fn train_writes_config_and_metrics() {
    let out_dir = scratch_dir("cli-train");
    let out = mep(
        &[
            "train",
            "--dataset",
            "mnist",
            "--model",
            "784-32-10",
            "--optimizer",
            "sgd",
            "--epochs",
            "2",
            "--train-samples",
            "640",
            "--test-samples",
            "200",
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ],
        Some(&data_dir()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let epochs = json_lines(&out);
    assert_eq!(epochs.len(), 2);
    let config = read_json(&out_dir.join("config.json"));
    assert_eq!(config["optimizer"], "sgd");
    assert_eq!(config["train_samples"], 640);
    let acc = epochs[1]["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "accuracy {acc} after 2 epochs on 640 samples");
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for key in [
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "seconds",
    ] {
        assert!(lines[1].get(key).is_some(), "metrics lack {key}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model"], "784-32-10");
    assert_eq!(config["seed"], 42);
}

fn assert_clean_failure(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = stderr(out);
    assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    assert!(
        !err.contains("panicked"),
        "a panic instead of an error:\n{err}"
    );
}

#[test]
fn errors_are_one_clear_line_with_nonzero_exit() {
    let empty = scratch_dir("cli-err");
    let d = empty.to_str().unwrap();
    assert_clean_failure(
        &mep(
            &["--data-dir", d, "train", "--dataset", "mnist", "--no-fetch"],
            None,
        ),
        "mep data fetch mnist",
    );
    assert_clean_failure(
        &mep(&["train", "--dataset", "cifar-99"], None),
        "unknown data set `cifar-99`",
    );
    assert_clean_failure(
        &mep(&["train", "--model", "784-x-10"], None),
        "invalid model spec",
    );
    assert_clean_failure(
        &mep(&["--device", "tpu", "data", "list"], None),
        "unknown device `tpu`",
    );
    assert_clean_failure(
        &common::run_mep_with(&["data", "list"], None, &[("MEP_SIMD", "sse9")]),
        "MEP_SIMD=sse9 names no level: use baseline, avx2 or avx512",
    );
    assert_clean_failure(
        &mep(&["train", "--dataset", "xor", "--model", "784-10"], None),
        "the spec's input has 784 features, the data 2",
    );
    assert_clean_failure(
        &mep(
            &["train", "--dataset", "xor", "--model", "2-4-2", "--lr=-1"],
            None,
        ),
        "invalid optimizer option lr",
    );
    assert_clean_failure(
        &mep(&["data", "fetch", "xor"], None),
        "cannot be downloaded",
    );
    assert_clean_failure(
        &mep(&["data", "fetch", "cifar-10-subset"], None),
        "cifar-10-subset` cannot be downloaded (it is built in, derived from another set, or a local copy only)",
    );
    assert_clean_failure(
        &mep(
            &["train", "--model", "784-100000000-10", "--no-fetch"],
            Some(&data_dir()),
        ),
        "GB of memory",
    );
    assert_clean_failure(
        &mep(&["--threads", "40000", "data", "list"], None),
        "cannot use 40000 threads: more than 8 per core",
    );
    assert_clean_failure(
        &mep(&["train", "--dataset", "xor", "--precision", "f8"], None),
        "unknown precision `f8`",
    );
    assert_clean_failure(
        &mep(
            &[
                "train",
                "--dataset",
                "xor",
                "--model",
                "2-4-2",
                "--estimator",
                "backprop",
                "--precision",
                "bf16",
            ],
            None,
        ),
        "--precision bf16 applies to the EP estimators",
    );
    if !cfg!(feature = "cuda") {
        assert_clean_failure(
            &mep(
                &[
                    "--device",
                    "cuda",
                    "train",
                    "--dataset",
                    "xor",
                    "--model",
                    "2-4-2",
                ],
                None,
            ),
            "built without",
        );
    } else if !std::env::var("MEP_TEST_DEVICE").is_ok_and(|d| d.starts_with("cuda")) {
        // A CUDA build on a machine without a usable GPU: burn would panic on the first
        // tensor operation; the device probe turns that into one clear line.
        assert_clean_failure(
            &mep(&["--device", "cuda", "train", "--dataset", "xor"], None),
            "device `cuda:0` cannot be used",
        );
    }
}

#[test]
fn fetch_with_a_bad_mirror_fails_cleanly_and_leaves_no_file() {
    let dir = scratch_dir("cli-fetch");
    // Nothing listens on this port: the fetch must fail with a download error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mirror = format!("http://127.0.0.1:{port}/");
    let out = mep(
        &[
            "data",
            "fetch",
            "mnist",
            "--mirror",
            &mirror,
            "--to",
            dir.to_str().unwrap(),
        ],
        None,
    );
    assert_clean_failure(&out, "download failed");
    let leftover: Vec<_> = std::fs::read_dir(dir.join("mnist"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftover.is_empty(), "left behind: {leftover:?}");
}

#[test]
fn check_gradient_prints_cosine_and_norm_ratio_per_parameter() {
    let out = mep(
        &[
            "check-gradient",
            "--model",
            "784-32-10",
            "--batch",
            "16",
            "--beta",
            "0.01",
            "--nudging",
            "centered",
            "--steps",
            "150",
            "--json",
        ],
        Some(&data_dir()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let params = v["params"].as_array().unwrap();
    let names: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    for p in params {
        let cosine = p["cosine"].as_f64().unwrap();
        let ratio = p["norm_ratio"].as_f64().unwrap();
        assert!(cosine > 0.999 && (ratio - 1.0).abs() < 0.02, "{p}");
    }
    // The table form names the reference.
    let out = mep(
        &[
            "check-gradient",
            "--model",
            "784-16-10",
            "--batch",
            "4",
            "--steps",
            "20",
        ],
        Some(&data_dir()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("vs backprop"), "{}", stdout(&out));
    assert_clean_failure(
        &mep(
            &[
                "check-gradient",
                "--estimator",
                "eqprop",
                "--model",
                "784-16-10",
            ],
            Some(&data_dir()),
        ),
        "hard-sigmoid",
    );
    assert_clean_failure(
        &mep(
            &["check-gradient", "--nudging", "sideways"],
            Some(&data_dir()),
        ),
        "unknown nudging",
    );
}

#[test]
fn ep_training_records_settle_statistics_and_bench_settle_writes_results() {
    let out_dir = scratch_dir("cli-train-ep");
    let out = mep(
        &[
            "train",
            "--estimator",
            "ep",
            "--optimizer",
            "sgd",
            "--lr",
            "0.2",
            "--epochs",
            "3",
            "--model",
            "784-32-10",
            "--train-samples",
            "640",
            "--test-samples",
            "200",
            "--settle-steps",
            "10",
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ],
        Some(&data_dir()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let epochs = json_lines(&out);
    let config = read_json(&out_dir.join("config.json"));
    let epoch = &epochs[2];
    assert!(
        epoch["settle_steps_mean"].as_f64().unwrap() <= 10.0,
        "{epoch}"
    );
    assert!(epoch["settle_residual_mean"].as_f64().is_some());
    assert_eq!(config["estimator"], "ep");
    assert_eq!(config["ep"]["beta"], 0.5);
    // Measured 43% after three epochs of ten steps (chance is 10%).
    let acc = epoch["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.3, "accuracy {acc}");

    let bench_dir = scratch_dir("cli-bench-settle");
    // At the baseline vector width (MEP_SIMD), which every x86-64 CPU has; the results
    // record it.
    let out = common::run_mep_with(
        &[
            "bench",
            "settle",
            "--models",
            "784-32-10",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--out",
            bench_dir.to_str().unwrap(),
            "--json",
        ],
        None,
        &[("MEP_SIMD", "baseline")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v["rows"][0];
    assert_eq!(row["simd"], "baseline", "{row}");
    for key in [
        "settle_step_us",
        "settle_gflops",
        "matmul_gflops",
        "ep_gradient_ms",
    ] {
        assert!(row[key].as_f64().unwrap() > 0.0, "{key}: {row}");
    }
    // Cost model: fc2 forward and its transpose, 2 * 2 * 64 * 32 * 10 FLOPs.
    assert!((row["settle_step_mflop"].as_f64().unwrap() - 0.08192).abs() < 1e-9);
    assert!(bench_dir.join("results.json").is_file());
}

#[test]
fn presets_resolve_with_overrides_and_bad_names_fail_cleanly() {
    let out_dir = scratch_dir("cli-preset");
    let out = mep(
        &[
            "train",
            "--preset",
            "sdmep",
            "--model",
            "784-32-10",
            "--train-samples",
            "256",
            "--test-samples",
            "100",
            "--lr",
            "0.02",
            "--settle-steps",
            "5",
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ],
        Some(&data_dir()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let epochs = json_lines(&out);
    let config = &read_json(&out_dir.join("config.json"));
    assert_eq!(config["preset"], "sdmep");
    assert_eq!(config["composite"]["lr"], 0.02);
    assert_eq!(config["composite"]["update"]["kind"], "dion");
    assert_eq!(config["estimator_config"]["settle"]["steps"], 5);
    assert_eq!(config["estimator_config"]["beta"], 0.5);
    assert!(epochs[0]["settle_steps_mean"].as_f64().unwrap() <= 5.0);
    assert_clean_failure(
        &mep(&["train", "--preset", "smep-turbo"], Some(&data_dir())),
        "unknown preset",
    );
    assert_clean_failure(
        &mep(
            &["train", "--preset", "smep", "--estimator", "ep"],
            Some(&data_dir()),
        ),
        "cannot be used with",
    );
    assert_clean_failure(
        &mep(
            &[
                "train",
                "--dataset",
                "xor",
                "--model",
                "2-4-2",
                "--preset",
                "adam",
                "--momentum",
                "0.9",
            ],
            None,
        ),
        "must be 0 with the adam update",
    );
}

#[test]
fn bench_memory_measures_each_method_in_a_fresh_process() {
    let out_dir = scratch_dir("bench-memory");
    let out = mep(
        &[
            "--threads",
            "1",
            "bench",
            "memory",
            "--quick",
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v = &json_lines(&out)[0];
    let rows = v["rows"].as_array().unwrap();
    // 3 depths x (4 methods + EP at 10 and 100 settle steps).
    assert_eq!(rows.len(), 18);
    let find = |method: &str, depth: u64, steps: Option<u64>| {
        rows.iter()
            .find(|r| {
                r["method"] == method
                    && r["depth"] == depth
                    && (steps.is_none() || r["settle_steps"] == steps.unwrap())
            })
            .unwrap_or_else(|| panic!("no {method} row at depth {depth}"))
    };
    for r in rows {
        for key in ["peak_bytes", "rss_peak_bytes", "model_bytes", "param_bytes"] {
            assert!(r[key].as_u64().unwrap() > 0, "{key} in {r}");
        }
        // Each probe ran in its own process: its resident peak covers its own heap peak.
        assert!(
            r["rss_peak_bytes"].as_u64() >= r["peak_bytes"].as_u64(),
            "{r}"
        );
    }
    let ep = |steps| find("ep", 100, Some(steps))["peak_bytes"].as_u64().unwrap();
    assert!(
        ep(100).abs_diff(ep(10)) <= 1024,
        "{} vs {}",
        ep(10),
        ep(100)
    );
    let bp = find("backprop", 100, None)["peak_bytes"].as_u64().unwrap();
    assert!(ep(30) <= bp, "EP {} > backprop {bp}", ep(30));
    assert!(
        find("backprop_checkpointed", 100, None)["checkpoint_every"]
            .as_u64()
            .unwrap()
            >= 10
    );
    assert!(v["per_layer"].as_array().unwrap().len() >= 4);
    for f in [
        "results.json",
        "table.md",
        "peak_memory.svg",
        "peak_memory.png",
    ] {
        assert!(out_dir.join(f).exists(), "{f}");
    }

    let out = mep(&["bench", "memory", "--depths", "0"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--depths must be positive"),
        "{}",
        stderr(&out)
    );
    let out = mep(
        &["bench", "memory-probe", "--method", "nope", "--depth", "3"],
        None,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown method"), "{}", stderr(&out));
}

/// The deep suite's quick version (residual MLPs with 6 and 10 linear layers, 1000
/// training samples): EP's gradients at initialisation match backprop's (cosine >= 0.99 on
/// every weight matrix; measured 0.997-1.000) and EP's test accuracy after the epoch
/// is within 3 points of backprop's on the same model (measured: 54.6 against 54.8, 61.0
/// against 60.0, on 500 test images).
#[test]
fn bench_deep_quick_trains_ep_as_well_as_backprop() {
    let out_dir = scratch_dir("bench-deep");
    let out = mep(
        &[
            "--threads",
            "1",
            "bench",
            "deep",
            "--quick",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        Some(&data_dir()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let results = read_json(&out_dir.join("results.json"));
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for depth in ["depth6", "depth10"] {
        let accuracy = |label: &str| {
            runs.iter()
                .find(|r| r["setting"] == depth && r["label"] == label)
                .unwrap_or_else(|| panic!("no {label} run at {depth}"))["final_test_accuracy"]
                .as_f64()
                .unwrap()
        };
        let (ep, bp) = (accuracy("ep"), accuracy("backprop"));
        assert!(ep > bp - 0.03, "{depth}: EP {ep} against backprop {bp}");
    }
    let gradients = results["gradient_norms"].as_array().unwrap();
    assert_eq!(gradients.len(), 6 + 10, "one row per weight matrix");
    for g in gradients {
        assert!(g["cosine"].as_f64().unwrap() >= 0.99, "{g}");
    }
    assert!(out_dir.join("gradients_per_layer.svg").is_file());
}

#[test]
fn bench_gemm_and_muon_time_the_host_kernels() {
    let out = mep(
        &[
            "--threads",
            "1",
            "bench",
            "gemm",
            "--shapes",
            "16x32x8,64x64x64",
            "--repeats",
            "3",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["shape"], "64x64x64");
    assert!(rows.iter().all(|r| r["gflops"].as_f64().unwrap() > 0.0));
    assert_clean_failure(
        &mep(&["bench", "gemm", "--shapes", "16x32"], None),
        "is not MxKxN",
    );
    assert_clean_failure(
        &mep(&["bench", "gemm", "--shapes", "0x4x4"], None),
        "has a zero dimension",
    );
    let out = mep(
        &[
            "--threads",
            "1",
            "bench",
            "muon",
            "--model",
            "784-64-32-10",
            "--repeats",
            "3",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // One row per weight matrix, and the update is their sum.
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let sum: f64 = rows.iter().map(|r| r["ms"].as_f64().unwrap()).sum();
    assert!((sum - v["update_ms"].as_f64().unwrap()).abs() < 1e-9);
    assert!(rows[0]["gflop"].as_f64().unwrap() > 0.0);
}

#[test]
fn closed_or_full_stdout_ends_quietly_or_with_an_error_never_a_panic() {
    // A full stdout: one clear error line, non-zero exit.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mep"))
        .args(["data", "list", "--json"])
        .stdout(full)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("writing to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A closed pipe: the run ends after a complete epoch, quietly (SIGPIPE), with its
    // checkpoint and metrics intact.
    let dir = scratch_dir("cli-closed-pipe");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mep"))
        .args([
            "--threads",
            "1",
            "train",
            "--dataset",
            "xor",
            "--model",
            "2-8-2",
        ])
        .args([
            "--estimator",
            "backprop",
            "--epochs",
            "500",
            "--json",
            "--out",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let stdout = child.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap();
    } // the read end closes here
    let out = child.wait_with_output().unwrap();
    assert!(first.contains("\"epoch\":1"), "{first}");
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(!metrics.is_empty());
    assert!(dir.join("checkpoint.safetensors").is_file());
}

#[test]
fn an_idx_header_claiming_gigabytes_is_refused_without_reserving_them() {
    // A raw image file whose header claims 5,000,000 images (3.9 GB) over 1000 data bytes,
    // beside real label and test files; mep runs under a 3 GB address-space limit, so
    // reserving what the header claims would abort instead of reporting the truncation.
    let dir = scratch_dir("cli-idx-claims");
    let mnist = dir.join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    for f in [
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(data_dir().join("mnist").join(f), mnist.join(f)).unwrap();
    }
    let mut bytes = Vec::new();
    for v in [2051u32, 5_000_000, 28, 28] {
        bytes.extend_from_slice(&v.to_be_bytes());
    }
    bytes.extend_from_slice(&[0u8; 1000]);
    std::fs::write(mnist.join("train-images-idx3-ubyte"), bytes).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 3000000; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_mep"))
        .args(["--threads", "1", "--data-dir"])
        .arg(&dir)
        .args(["train", "--dataset", "mnist", "--no-fetch", "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "promises 3920000000 data bytes, found 1000");
}

#[test]
fn train_help_names_every_preset() {
    // The flag's help is written by hand (clap needs a literal): this keeps it in step with
    // `Preset::ALL`.
    let out = mep(&["train", "--help"], None);
    assert!(out.status.success());
    let help = stdout(&out);
    let line = help
        .lines()
        .find(|l| l.trim_start().starts_with("Preset:"))
        .expect("the --preset help");
    let text: String = help[help.find(line).unwrap()..].chars().take(400).collect();
    for name in mep::experiment::Preset::names() {
        assert!(text.contains(name), "--preset help misses {name}: {text}");
    }
}
