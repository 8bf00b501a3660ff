//! Hostile command lines get a clear error quickly: thread counts the machine cannot run, and
//! paths that are not regular files (devices that never end, FIFOs that block).

mod common;

use std::time::{Duration, Instant};

use common::{failure, stdout, vibee};

fn cores() -> usize {
    vibee_core::backend::cpu::pool::available_cores()
}

/// `vibee args`, which must finish within `limit`.
fn timed(args: &[&str], limit: Duration) -> std::process::Output {
    let started = Instant::now();
    let out = vibee(args);
    let took = started.elapsed();
    assert!(took < limit, "{args:?} took {took:?}");
    out
}

#[test]
fn thread_counts_far_above_the_cores_are_refused_naming_the_limit() {
    let threads = 100_000.max(cores() * 100).to_string();
    let args = ["run", "--prompt-ids", "1,2", "--threads", &threads];
    let err = failure(&timed(&args, Duration::from_secs(30)), 1);
    let limit = cores() * 4;
    assert!(
        err.contains(&format!(
            "--threads {threads} is more than this machine can use"
        )) && err.contains(&format!("{} cores available", cores()))
            && err.contains(&format!("({limit})")),
        "{err}"
    );
}

#[test]
fn rayon_num_threads_is_held_to_the_same_limit() {
    let threads = 100_000.max(cores() * 100).to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vibee"))
        .args(["run", "--prompt-ids", "1,2"])
        .current_dir(common::repo())
        .env("RAYON_NUM_THREADS", &threads)
        .output()
        .unwrap();
    let err = failure(&out, 1);
    assert!(
        err.contains(&format!(
            "RAYON_NUM_THREADS={threads} is more than this machine can use"
        )),
        "{err}"
    );
}

#[test]
fn a_modest_oversubscription_still_runs_in_reasonable_time() {
    // Up to four threads per core, the most accepted: workers share cores, so none may spin.
    let threads = (cores() * 4).min(cores() + 16).to_string();
    let out = timed(
        &[
            "run",
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "16",
            "--greedy",
            "--ignore-eos",
            "--json",
            "--threads",
            &threads,
        ],
        Duration::from_secs(120),
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["tokens"].as_array().unwrap().len(), 16);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("more than the") && err.contains("cores available"),
        "{err}"
    );
}

#[test]
fn devices_and_fifos_given_as_files_are_refused_without_reading_or_blocking() {
    let dir = std::env::temp_dir().join(format!("vibee-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let fifo = fifo.to_str().unwrap();
    for path in ["/dev/zero", fifo] {
        let kind = if path == fifo {
            "is a named pipe (FIFO), not a regular file"
        } else {
            "is a device, not a regular file"
        };
        for (args, context) in [
            (
                vec!["run", "--prompt-ids", "1", "--pipeline", path],
                String::new(),
            ),
            (
                vec!["run", "--prompt-ids", "1", "--plugin-path", path],
                "cannot read the plugin library".to_string(),
            ),
            (
                vec!["specs", "--plugin-path", path],
                "cannot read the plugin library".to_string(),
            ),
            (
                vec![
                    "quantize",
                    "--method",
                    "gptq",
                    "--model",
                    "tests/fixtures/llama-gqa",
                    "--out",
                    dir.join("out").to_str().unwrap(),
                    "--calib",
                    path,
                ],
                "cannot read the calibration text".to_string(),
            ),
            (
                vec![
                    "score",
                    "--metric",
                    "chrf",
                    "--predictions",
                    path,
                    "--references",
                    path,
                ],
                String::new(),
            ),
        ] {
            let err = failure(&timed(&args, Duration::from_secs(30)), 1);
            assert!(
                err.contains(&format!("{path} {kind}")) && err.contains(&context),
                "{args:?}: {err}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_files_that_are_devices_are_refused() {
    // A checkpoint whose tokenizer.json and weights are links to /dev/zero.
    let dir = std::env::temp_dir().join(format!("vibee-hostile-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = common::repo().join("tests/fixtures/llama-gqa");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
    std::os::unix::fs::symlink("/dev/zero", dir.join("tokenizer.json")).unwrap();
    let model = dir.to_str().unwrap();
    let args = ["run", "--model", model, "--prompt-ids", "1"];
    let err = failure(&timed(&args, Duration::from_secs(30)), 1);
    assert!(err.contains("tokenizer.json is a device"), "{err}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("model.safetensors")).unwrap();
    let err = failure(&timed(&args, Duration::from_secs(30)), 1);
    assert!(err.contains("model.safetensors is a device"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
