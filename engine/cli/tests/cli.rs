//! The `vibee` command as a user runs it.

mod common;

use common::{failure, repo, stdout, vibee};

fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(
        repo()
            .join("tests/fixtures")
            .join(name)
            .join("reference.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn run_with_named_plugins_reproduces_the_transformers_greedy_continuation() {
    let reference = reference("llama-gqa");
    let prompt: Vec<String> = ids(&reference["prompt_ids"])
        .iter()
        .map(u64::to_string)
        .collect();
    let out = vibee(&[
        "run",
        "--model",
        "tests/fixtures/llama-gqa",
        "--plugins",
        "gqa,rope,rmsnorm,swiglu",
        "--prompt-ids",
        &prompt.join(","),
        "--max-tokens",
        "16",
        "--greedy",
        "--ignore-eos",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(ids(&json["tokens"]), ids(&reference["greedy_ids"]));
    assert_eq!(json["text"], reference["greedy_text"]);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "time_to_first_token_s",
    ] {
        assert!(json[key].as_f64().unwrap() > 0.0, "{key}");
    }
}

#[test]
fn run_text_prompt_tokenizes_like_transformers() {
    let reference = reference("llama-mha");
    let out = vibee(&[
        "run",
        "--model",
        "tests/fixtures/llama-mha",
        "--prompt",
        reference["prompt_text"].as_str().unwrap(),
        "--max-tokens",
        "16",
        "--greedy",
        "--ignore-eos",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        json["prompt_tokens"].as_u64().unwrap() as usize,
        ids(&reference["prompt_ids"]).len()
    );
    assert_eq!(ids(&json["tokens"]), ids(&reference["greedy_ids"]));
}

#[test]
fn run_without_model_uses_the_builtin_tiny_model() {
    let out = vibee(&[
        "run",
        "--prompt",
        "hello",
        "--max-tokens",
        "5",
        "--seed",
        "3",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(!json["tokens"].as_array().unwrap().is_empty());
}

#[test]
fn specs_lists_the_registry_and_filters_by_family_as_json() {
    let table = stdout(&vibee(&["specs"]));
    assert!(table.contains("v2202") && table.contains("gqa") && table.contains("planned"));
    let json: serde_json::Value = serde_json::from_str(&stdout(&vibee(&[
        "specs",
        "--family",
        "attention",
        "--json",
    ])))
    .unwrap();
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.starts_with(&["mha", "mqa", "gqa"]), "{names:?}");
    assert!(json
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["family"] == "attention"));
    let implemented = stdout(&vibee(&["specs", "--status", "implemented"]));
    assert!(!implemented.contains("planned"));
}

#[test]
fn bench_reports_speeds_as_json() {
    let out = vibee(&[
        "bench",
        "--model",
        "tests/fixtures/llama-gqa",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--repeat",
        "1",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(json["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["weight_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn bench_concurrency_reports_each_level() {
    let out = vibee(&[
        "bench",
        "--model",
        "tests/fixtures/llama-gqa",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--repeat",
        "1",
        "--concurrency",
        "1,3",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let levels = json["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, concurrency) in levels.iter().zip([1, 3]) {
        assert_eq!(level["concurrency"], concurrency);
        assert!(level["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(level["per_sequence_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let err = failure(&vibee(&["bench", "--concurrency", "0"]), 1);
    assert!(
        err.contains("--concurrency 0: each level must be 1 to"),
        "{err}"
    );
}

/// Each line of a `--prompts` file gets, in input order, what `run --json` gives it alone; a
/// line that cannot be read is named before anything runs.
#[test]
fn run_prompts_answers_each_line_as_run_alone() {
    let dir = std::env::temp_dir().join(format!("vibee-prompts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("requests.jsonl");
    let lines = [
        r#"{"prompt_ids": [1, 17, 42, 99], "max_tokens": 6}"#,
        r#"{"prompt": "The lighthouse keeper", "max_tokens": 3}"#,
        r#"{"prompt_ids": [1, 250], "max_tokens": 5, "temperature": 0.7, "seed": 4}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let model = ["--model", "tests/fixtures/llama-gqa", "--greedy"];
    let mut args = vec!["run", "--prompts", file.to_str().unwrap()];
    args.extend(model);
    let many: Vec<serde_json::Value> = stdout(&vibee(&args))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(many.len(), 3);
    let alone = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["run", "--json"];
        args.extend(model);
        args.extend(extra);
        serde_json::from_str(&stdout(&vibee(&args))).unwrap()
    };
    let expected = [
        alone(&["--prompt-ids", "1,17,42,99", "--max-tokens", "6"]),
        alone(&["--prompt", "The lighthouse keeper", "--max-tokens", "3"]),
    ];
    for (got, want) in many.iter().zip(&expected) {
        assert_eq!(got["tokens"], want["tokens"]);
        assert_eq!(got["text"], want["text"]);
    }
    // The line's temperature overrides --greedy: a seeded draw of five tokens.
    assert_eq!(many[2]["tokens"].as_array().unwrap().len(), 5);
    std::fs::write(&file, r#"{"prompt_ids": [1], "max_tokenz": 2}"#).unwrap();
    let err = failure(&vibee(&args), 1);
    assert!(
        err.contains("requests.jsonl:1: unknown field `max_tokenz`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn divergence_measures_quantization_against_the_full_precision_model() {
    let measure = |args: &[&str]| -> serde_json::Value {
        let mut all = vec![
            "divergence",
            "--reference",
            "tests/fixtures/llama-gqa",
            "--tokens",
            "48",
            "--json",
        ];
        all.extend_from_slice(args);
        serde_json::from_str(&stdout(&vibee(&all))).unwrap()
    };
    // The same weights in a GGUF file: the same distributions.
    let same = measure(&["--model", "tests/fixtures/gguf-llama-f32"]);
    assert!(same["mean_kl"].as_f64().unwrap() < 1e-9, "{same}");
    assert_eq!(same["top1_agreement"].as_f64(), Some(1.0));
    // Eight bits per weight stay closer than four.
    let int8 = measure(&[
        "--model",
        "tests/fixtures/llama-gqa",
        "--plugins",
        "auto,int8",
    ]);
    let q4 = measure(&["--model", "tests/fixtures/gguf-llama-q4_0"]);
    let kl = |v: &serde_json::Value| v["mean_kl"].as_f64().unwrap();
    assert!(0.0 < kl(&int8) && kl(&int8) < kl(&q4), "{int8} {q4}");
}

#[test]
fn quantize_writes_a_checkpoint_that_runs_and_measures_closer_with_more_bits() {
    let dir = std::env::temp_dir().join(format!("vibee-quantize-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let measure = |method: &str| -> f64 {
        let out = dir.join(method);
        let out = out.to_str().unwrap();
        let text = stdout(&vibee(&[
            "quantize",
            "--method",
            method,
            "--group",
            "32",
            "--model",
            "tests/fixtures/llama-gqa",
            "--out",
            out,
        ]));
        assert!(text.contains("quantized 14 linear layers"), "{text}");
        let run = stdout(&vibee(&[
            "run",
            "--model",
            out,
            "--prompt-ids",
            "1,5,9",
            "--max-tokens",
            "4",
            "--json",
        ]));
        assert!(run.contains("\"finish_reason\":\"length\""), "{run}");
        let divergence: serde_json::Value = serde_json::from_str(&stdout(&vibee(&[
            "divergence",
            "--model",
            out,
            "--reference",
            "tests/fixtures/llama-gqa",
            "--text",
            "tests/fixtures/calibration/evaluation.txt",
            "--json",
        ])))
        .unwrap();
        divergence["mean_kl"].as_f64().unwrap()
    };
    let (int8, q4) = (measure("int8"), measure("q4"));
    assert!(0.0 < int8 && int8 < q4, "{int8} {q4}");
    let again = failure(
        &vibee(&[
            "quantize",
            "--method",
            "q4",
            "--model",
            "tests/fixtures/llama-gqa",
            "--out",
            dir.join("q4").to_str().unwrap(),
        ]),
        1,
    );
    assert!(again.contains("not empty"), "{again}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_requests_fail_with_a_message_not_a_panic() {
    for (args, message) in [
        (
            vec!["run", "--prompt-ids", "1,2", "--max-tokens", "0"],
            "max tokens must be at least 1",
        ),
        (vec!["run", "--prompt", ""], "prompt is empty"),
        (
            vec![
                "run",
                "--prompt",
                "hi",
                "--plugins",
                "gqa,rope,rmsnorm,swiglu,flash",
            ],
            "unknown plugin `flash`",
        ),
        (
            vec!["run", "--model", "/nonexistent", "--prompt", "hi"],
            "there is no model at /nonexistent",
        ),
        (
            vec!["run", "--prompt", "hi", "--top-p", "0"],
            "--top-p must be in (0, 1]",
        ),
        (vec!["run"], "give a prompt"),
        (
            vec!["specs", "--family", "atention"],
            "unknown family `atention`",
        ),
        (
            vec![
                "quantize",
                "--method",
                "fp4",
                "--model",
                "tests/fixtures/llama-gqa",
                "--out",
                "/tmp/x",
            ],
            "unknown method `fp4` (int8, q4, awq, gptq, hqq)",
        ),
        (
            vec![
                "quantize",
                "--method",
                "gptq",
                "--model",
                "tests/fixtures/llama-gqa",
                "--out",
                "/tmp/x",
                "--calib",
                "/nonexistent",
            ],
            "cannot read the calibration text",
        ),
    ] {
        let err = failure(&vibee(&args), 1);
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn conformance_runs_a_spec_and_writes_json_and_junit() {
    let dir = std::env::temp_dir().join(format!("vibee-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json_path, junit_path) = (dir.join("r.json"), dir.join("r.xml"));
    let out = vibee(&[
        "conformance",
        "--spec",
        "v2202",
        "--json",
        json_path.to_str().unwrap(),
        "--junit",
        junit_path.to_str().unwrap(),
    ]);
    let table = stdout(&out);
    assert!(
        table.contains("gqa with kv_heads == heads equals mha") && table.contains(" 0 failed"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert!(json
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["passed"] == true && r["spec"] == "v2202"));
    let junit = std::fs::read_to_string(&junit_path).unwrap();
    assert!(
        junit.contains("<testsuite name=\"vibee conformance\"") && junit.contains("failures=\"0\"")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn conformance_exits_non_zero_when_a_case_fails() {
    // A spec file whose case cannot pass: gqa does fit the llama-gqa checkpoint.
    let root = std::env::temp_dir().join(format!("vibee-conformance-fail-{}", std::process::id()));
    std::fs::create_dir_all(root.join("specs")).unwrap();
    let fixture = repo().join("tests/fixtures/llama-gqa");
    std::fs::write(
        root.join("specs/v2202-gqa.ron"),
        format!(
            "(spec: \"v2202\", cases: [(name: \"wrongly expects a refusal\", check: Rejects(fixture: \"{}\", plugins: [\"gqa\", \"rope\", \"rmsnorm\", \"swiglu\"], mentions: \"x\"))])",
            fixture.display()
        ),
    )
    .unwrap();
    let out = vibee(&[
        "conformance",
        "--spec",
        "gqa",
        "--root",
        root.to_str().unwrap(),
    ]);
    let err = failure(&out, 1);
    assert!(err.contains("1 conformance case(s) failed"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn chat_prompts_go_through_the_chat_template() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/chat.json")).unwrap(),
    )
    .unwrap();
    let hello = &reference["cases"][0];
    let out = vibee(&[
        "run",
        "--chat",
        "--prompt",
        "Hello there",
        "--max-tokens",
        "2",
        "--greedy",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        json["prompt_tokens"].as_u64().unwrap() as usize,
        hello["ids"].as_array().unwrap().len()
    );
}

#[test]
fn kv_memory_sizes_a_paged_pool_and_is_refused_past_the_machine() {
    let run = |gb: &str| {
        vibee(&[
            "run",
            "--kv-memory",
            gb,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "2",
            "--json",
        ])
    };
    let json: serde_json::Value = serde_json::from_str(&stdout(&run("0.01"))).unwrap();
    assert_eq!(json["tokens"].as_array().unwrap().len(), 2);
    let err = failure(&run("100000"), 1);
    assert!(err.contains("more than this machine's"), "{err}");
    // A block count whose bytes overflow 64 bits is measured, not wrapped.
    let huge = vibee(&[
        "run",
        "--plugins",
        "auto,paged-kv",
        "--plugin-config",
        "paged-kv=blocks=18446744073709551615",
        "--prompt-ids",
        "1,2",
    ]);
    let err = failure(&huge, 1);
    assert!(err.contains("more than this machine's"), "{err}");
    // Too small for the prompt: refused with the numbers, not a panic.
    let err = failure(
        &vibee(&[
            "run",
            "--kv-memory",
            "0.00001",
            "--prompt-ids",
            &(1..40).map(|i| i.to_string()).collect::<Vec<_>>().join(","),
            "--max-tokens",
            "2",
        ]),
        1,
    );
    assert!(err.contains("the KV pool cannot hold"), "{err}");
}
