//! `vibee arch` (v2280 arch-calc) as a user runs it.

mod common;

use common::{failure, stdout, vibee};

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&stdout(&vibee(&all))).unwrap()
}

#[test]
fn arch_prints_the_parameters_of_a_published_config() {
    let text = stdout(&vibee(&[
        "arch",
        "--config",
        "tests/fixtures/configs/Llama-2-7b-hf.json",
    ]));
    assert!(text.contains("6,738,415,616"), "{text}");
    assert!(text.contains("FLOPs/token, decode @ 2048"), "{text}");
    assert!(text.contains("512.00 KiB"), "{text}");
    assert!(text.contains("Chinchilla-optimal tokens"), "{text}");
}

#[test]
fn arch_json_has_total_active_flops_kv_and_memory() {
    let v = json(&[
        "arch",
        "--config",
        "tests/fixtures/configs/Mixtral-8x7B-v0.1.json",
        "--batch",
        "2",
        "--context",
        "1024",
        "--kv-dtype",
        "f32",
        "--flops",
        "1e23",
    ]);
    assert_eq!(v["params"]["total"], 46_702_792_704u64);
    assert_eq!(v["params"]["active"], 12_879_925_248u64);
    assert_eq!(v["kv_cache"]["bytes_per_token"], 32 * 2 * 8 * 128 * 4);
    assert_eq!(
        v["memory"]["kv_cache_bytes"],
        2 * 1024 * 32 * 2 * 8 * 128 * 4
    );
    assert_eq!(v["memory"]["weight_bytes"], 2 * 46_702_792_704u64);
    assert_eq!(v["flops"]["context"], 1024);
    let params = v["chinchilla"]["budget"]["params"].as_f64().unwrap();
    assert!((6.0 * 20.0 * params * params / 1e23 - 1.0).abs() < 1e-9);
}

#[test]
fn arch_from_flags_matches_the_config() {
    let from_flags = json(&[
        "arch",
        "--hidden",
        "2048",
        "--layers",
        "22",
        "--heads",
        "32",
        "--kv-heads",
        "4",
        "--intermediate",
        "5632",
        "--vocab",
        "32000",
    ]);
    let from_config = json(&[
        "arch",
        "--config",
        "tests/fixtures/configs/TinyLlama-1.1B-Chat-v1.0.json",
    ]);
    assert_eq!(from_flags["params"], from_config["params"]);
    assert_eq!(from_flags["params"]["total"], 1_100_048_384u64);
}

#[test]
fn arch_sweep_lists_shapes_within_ten_percent() {
    let v = json(&["arch", "--sweep", "7B"]);
    let configs = v["configs"].as_array().unwrap();
    assert!(configs
        .iter()
        .any(|c| c["layers"] == 32 && c["hidden"] == 4096 && c["params"] == 6_738_415_616u64));
    for c in configs {
        assert!(c["deviation"].as_f64().unwrap().abs() <= 0.1);
    }
    let text = stdout(&vibee(&["arch", "--sweep", "7e9"]));
    assert!(text.contains("6,738,415,616"), "{text}");
}

#[test]
fn arch_flops_alone_gives_the_compute_optimal_size() {
    let v = json(&["arch", "--flops", "5.76e23"]);
    let params = v["params"].as_f64().unwrap();
    assert!((params / 69.3e9 - 1.0).abs() < 0.01, "{params}");
}

#[test]
fn arch_errors_are_clean() {
    let err = failure(&vibee(&["arch", "--config", "/nonexistent/config.json"]), 1);
    assert!(
        err.contains("cannot read /nonexistent/config.json"),
        "{err}"
    );
    let err = failure(&vibee(&["arch"]), 1);
    assert!(err.contains("describe a model"), "{err}");
    let err = failure(&vibee(&["arch", "--hidden", "64", "--layers", "2"]), 1);
    assert!(err.contains("--heads is missing"), "{err}");
    let err = failure(
        &vibee(&[
            "arch",
            "--config",
            "tests/fixtures/configs/gpt2.json",
            "--batch",
            "0",
        ]),
        1,
    );
    assert!(err.contains("--batch must be at least 1"), "{err}");
    let err = failure(&vibee(&["arch", "--sweep", "100"]), 1);
    assert!(err.contains("within ±10%"), "{err}");
    let err = failure(&vibee(&["arch", "--sweep", "lots"]), 2);
    assert!(err.contains("not a number"), "{err}");
    let err = failure(&vibee(&["arch", "--dtype", "q4", "--flops", "1e20"]), 2);
    assert!(err.contains("use f32, f16, bf16 or int8"), "{err}");
}
