//! Third-party plugins end to end: the example libraries and two deliberately broken ones are
//! built with cargo, then loaded by `vibee` and by the engine in process.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::{failure, repo, stdout, vibee};
use vibee_core::serving::external::{PluginConfigs, PluginFaults};
use vibee_core::serving::pipeline::SamplingParams;
use vibee_core::{serving::runner, Engine};

/// Builds the plugin libraries (cargo does nothing when they are fresh) and returns the
/// directory they are in: the one holding this test's own profile.
fn libraries() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet"])
        .args(["-p", "vibee-example-no-repeat-ngram"])
        .args(["-p", "vibee-example-regex-deny"])
        .args(["-p", "vibee-example-jsonl-monitor"])
        .args(["-p", "vibee-example-typical-sampler"])
        .args(["-p", "vibee-example-max-running"])
        .args(["-p", "vibee-example-chrf"])
        .args(["-p", "vibee-test-panicking"])
        .args(["-p", "vibee-test-abi-mismatch"])
        .current_dir(repo())
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the plugin libraries failed");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn library(name: &str) -> PathBuf {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    libraries().join(format!("{DLL_PREFIX}{name}{DLL_SUFFIX}"))
}

fn tokens(json: &str) -> Vec<u64> {
    let value: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    value["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[test]
fn a_logits_processor_plugin_changes_generation_from_the_cli() {
    let lib = library("vibee_example_no_repeat_ngram");
    let lib = lib.to_str().unwrap();
    let base = [
        "run",
        "--prompt-ids",
        "5,6,7",
        "--greedy",
        "--max-tokens",
        "60",
        "--ignore-eos",
        "--json",
    ];
    let plain = tokens(&stdout(&vibee(&base)));
    let distinct: BTreeSet<_> = plain.iter().collect();
    assert!(
        distinct.len() < plain.len(),
        "the plain run must repeat a token for this test to mean anything: {plain:?}"
    );
    let mut args = base.to_vec();
    args.extend([
        "--plugin-path",
        lib,
        "--plugins",
        "auto,no-repeat-ngram",
        "--plugin-config",
        "no-repeat-ngram=1",
    ]);
    let banned = tokens(&stdout(&vibee(&args)));
    let mut seen: BTreeSet<u64> = [5, 6, 7].into();
    for t in &banned {
        assert!(
            seen.insert(*t),
            "token {t} repeats with no-repeat-ngram n=1: {banned:?}"
        );
    }
}

#[test]
fn plugins_are_listed_with_their_origin_and_bad_configurations_are_refused() {
    let lib = library("vibee_example_regex_deny");
    let lib = lib.to_str().unwrap();
    let listed = stdout(&vibee(&[
        "specs",
        "--plugin-path",
        lib,
        "--family",
        "content-safety",
    ]));
    assert!(
        listed.contains("regex-deny") && listed.contains(lib),
        "{listed}"
    );
    let err = failure(
        &vibee(&[
            "run",
            "--prompt",
            "hi",
            "--plugin-path",
            lib,
            "--plugins",
            "auto,regex-deny",
            "--plugin-config",
            "regex-deny=explode (",
        ]),
        1,
    );
    assert!(err.contains("unknown action `explode`"), "{err}");
    let err = failure(
        &vibee(&["run", "--prompt", "hi", "--plugins", "auto,regex-deny"]),
        1,
    );
    assert!(err.contains("unknown plugin `regex-deny`"), "{err}");
}

#[test]
fn every_example_plugin_passes_its_shipped_conformance_cases() {
    for name in [
        "vibee_example_no_repeat_ngram",
        "vibee_example_regex_deny",
        "vibee_example_jsonl_monitor",
        "vibee_example_typical_sampler",
        "vibee_example_max_running",
        "vibee_example_chrf",
    ] {
        let lib = library(name);
        let out = stdout(&vibee(&["conformance", "--plugin", lib.to_str().unwrap()]));
        assert!(out.contains(" passed, 0 failed"), "{name}: {out}");
    }
}

#[test]
fn an_eval_metric_plugin_scores_files_as_sacrebleu_does() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("plugins/examples/chrf/reference.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let dir = std::env::temp_dir().join(format!("vibee-score-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let column = |key: &str| -> String {
        cases
            .iter()
            .map(|c| format!("{}\n", c[key].as_str().unwrap()))
            .collect()
    };
    std::fs::write(dir.join("pred.txt"), column("prediction")).unwrap();
    std::fs::write(dir.join("ref.txt"), column("reference")).unwrap();
    let lib = library("vibee_example_chrf");
    let score = |predictions: &str, json: bool| {
        let (lib, refs) = (lib.to_str().unwrap(), dir.join("ref.txt"));
        let predictions = dir.join(predictions);
        let mut args = vec!["score", "--plugin-path", lib, "--metric", "chrf"];
        args.extend(["--predictions", predictions.to_str().unwrap()]);
        args.extend(["--references", refs.to_str().unwrap()]);
        args.extend(json.then_some("--json"));
        vibee(&args)
    };
    let out = stdout(&score("pred.txt", true));
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let scores = out["scores"].as_array().unwrap();
    assert_eq!(scores.len(), cases.len());
    for (got, case) in scores.iter().zip(cases) {
        let (got, want) = (got.as_f64().unwrap(), case["score"].as_f64().unwrap());
        assert!(
            (got - want).abs() < 1e-9,
            "{got} vs sacreBLEU {want} for {case}"
        );
    }
    std::fs::write(dir.join("short.txt"), "one line\n").unwrap();
    let err = failure(&score("short.txt", false), 1);
    assert!(err.contains("has 1 lines but"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_panicking_plugin_fails_its_request_is_disabled_and_the_engine_goes_on() {
    let external = vibee_cli::load_external(&[library("vibee_test_panicking")]).unwrap();
    let (registry, catalog) = vibee_cli::catalog(external).unwrap();
    let mut engine = Engine::load(
        &repo().join("tests/fixtures/llama-gqa"),
        &["auto".into(), "panicking".into()],
        &registry,
        &catalog,
        &PluginConfigs([("panicking".to_string(), "3".to_string())].into()),
    )
    .unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let err = runner::generate(&mut engine.app, vec![1, 5, 9], params.clone())
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("plugin `panicking` panicked: deliberate panic after 3 tokens"),
        "{err:#}"
    );
    assert!(!engine.app.is_enabled("panicking"));
    let faults = &engine.app.world.resource::<PluginFaults>().0;
    assert_eq!(faults.len(), 1, "{faults:?}");
    let out = runner::generate(&mut engine.app, vec![1, 5, 9], params).unwrap();
    assert_eq!(
        out.tokens.len(),
        8,
        "the engine serves the next request without the plugin"
    );
}

#[test]
fn libraries_that_are_not_compatible_plugins_are_refused_with_a_reason() {
    let err = vibee_cli::load_external(&[library("vibee_test_abi_mismatch")])
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(err.contains("vibee-sdk types do not match"), "{err}");
    let err = vibee_cli::load_external(&[repo().join("Cargo.toml")])
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("cannot load plugin"), "{err:#}");
    let twice = library("vibee_example_jsonl_monitor");
    let external = vibee_cli::load_external(&[twice.clone(), twice]).unwrap();
    let err = vibee_cli::catalog(external).err().unwrap();
    assert!(format!("{err:#}").contains("already taken"), "{err:#}");
}

#[test]
fn new_plugin_scaffolds_crates_that_build_and_pass_their_conformance_case() {
    let dir = std::env::temp_dir().join(format!("vibee-new-plugin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target = libraries().parent().unwrap().to_path_buf();
    for (kind, root) in [
        ("logits", None),
        ("filter", Some(".")),
        ("monitor", Some(".")),
        ("sampler", None),
        ("admission", Some(".")),
        ("metric", None),
    ] {
        let name = format!("my-{kind}");
        stdout(&vibee(&[
            "new-plugin",
            &name,
            "--kind",
            kind,
            "--dir",
            dir.to_str().unwrap(),
        ]));
        let crate_dir = dir.join(&name);
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet"])
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "the scaffolded {kind} crate does not build"
        );
        let lib = library(&name.replace('-', "_"));
        let root = root.map_or(crate_dir.clone(), |r| repo().join(r));
        let out = stdout(&vibee(&[
            "conformance",
            "--root",
            root.to_str().unwrap(),
            "--plugin",
            lib.to_str().unwrap(),
        ]));
        assert!(out.contains(" passed, 0 failed"), "{kind}: {out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Builds the reloadable test plugin forcing `token` and puts it at `dest` the way a build
/// replaces a file: written beside it, then renamed over it.
fn build_reloadable(token: u32, dest: &std::path::Path) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "vibee-test-reloadable"])
        .env("VIBEE_TEST_FORCED_TOKEN", token.to_string())
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(status.success());
    replace(&library("vibee_test_reloadable"), dest);
}

fn replace(source: &std::path::Path, dest: &std::path::Path) {
    let staging = dest.with_extension("staging");
    std::fs::copy(source, &staging).unwrap();
    std::fs::rename(&staging, dest).unwrap();
}

#[test]
fn rebuilt_plugins_pipeline_edits_and_admin_commands_take_effect_mid_generation() {
    use vibee_core::serving::pipeline::{request_bundle, SeqState, Tokens};
    use vibee_core::serving::reload::{Admin, ReloadLog, Reloader, Watch};

    let dir = std::env::temp_dir().join(format!("vibee-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join(format!(
        "{}reloadable{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let pipeline = dir.join("pipeline.ron");
    build_reloadable(11, &lib);
    std::fs::write(&pipeline, r#"(plugins: ["reloadable"])"#).unwrap();

    let external = vibee_cli::load_external(std::slice::from_ref(&lib)).unwrap();
    let (registry, catalog) = vibee_cli::catalog(external).unwrap();
    let mut engine = Engine::load(
        &repo().join("tests/fixtures/llama-gqa"),
        &["auto".into(), "reloadable".into()],
        &registry,
        &catalog,
        &PluginConfigs::default(),
    )
    .unwrap();
    let watch = Watch {
        libraries: [(lib.clone(), "reloadable")].into(),
        directories: vec![dir.clone()],
        pipeline: Some(pipeline.clone()),
    };
    let reloader = Reloader::new(registry, catalog, watch).unwrap();
    let admin = reloader.admin();
    reloader.install(&mut engine.app);

    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 100,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let app = &mut engine.app;
    let first = app
        .world
        .spawn(request_bundle(vec![1, 5, 9], params.clone()))
        .id();
    let second = app.world.spawn(request_bundle(vec![1, 7], params)).id();
    let last = |app: &vibee_core::App, e| {
        *app.world
            .get::<Tokens>(e)
            .unwrap()
            .generated
            .last()
            .unwrap()
    };
    for _ in 0..3 {
        app.step();
    }
    assert_eq!((last(app, first), last(app, second)), (11, 11));

    // Steps until the reload log says `what`, giving the watcher time between steps.
    let step_until = |app: &mut vibee_core::App, what: &str| {
        let seen = app.world.resource::<ReloadLog>().0.len();
        for _ in 0..40 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            app.step();
            let log = &app.world.resource::<ReloadLog>().0;
            if log[seen..].iter().any(|l| l.contains(what)) {
                return;
            }
        }
        panic!("no `{what}` in {:?}", app.world.resource::<ReloadLog>().0);
    };
    build_reloadable(22, &lib);
    step_until(app, "reloaded `reloadable`");
    app.step();
    assert_eq!((last(app, first), last(app, second)), (22, 22));

    replace(&library("vibee_test_abi_mismatch"), &lib);
    step_until(app, "kept the running `reloadable`");
    assert!(app
        .world
        .resource::<ReloadLog>()
        .0
        .last()
        .unwrap()
        .contains("do not match"));
    app.step();
    assert_eq!(
        last(app, first),
        22,
        "a refused library leaves the running one in place"
    );

    std::fs::write(&pipeline, r#"(plugins: [])"#).unwrap();
    step_until(app, "disabled `reloadable`");
    app.step();
    assert!(!app.is_enabled("reloadable"));
    std::fs::write(&pipeline, r#"(plugins: ["flash-attention"])"#).unwrap();
    step_until(app, "kept the running pipeline");

    let log_ends_with = |app: &vibee_core::App, what: &str| {
        let log = &app.world.resource::<ReloadLog>().0;
        assert!(log.last().unwrap().ends_with(what), "{log:?}");
    };
    let enable = Admin::Enable {
        plugin: "reloadable".into(),
        config: None,
    };
    admin.send(enable).unwrap();
    app.step();
    log_ends_with(app, "enabled `reloadable`");
    assert_eq!(
        last(app, first),
        22,
        "the admin command applies at the next step"
    );
    admin
        .send(Admin::Disable {
            plugin: "reloadable".into(),
        })
        .unwrap();
    app.step();
    log_ends_with(app, "disabled `reloadable`");

    // A new library dropped into the watched directory is loaded and can then be enabled.
    replace(
        &library("vibee_example_no_repeat_ngram"),
        &dir.join(format!(
            "{}fresh{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )),
    );
    step_until(app, "loaded plugin `no-repeat-ngram`");
    admin
        .send(Admin::Enable {
            plugin: "no-repeat-ngram".into(),
            config: Some("1".into()),
        })
        .unwrap();
    app.step();
    log_ends_with(app, "enabled `no-repeat-ngram`");
    let generated = &app.world.get::<Tokens>(first).unwrap().generated;
    let before: BTreeSet<u32> = generated[..generated.len() - 1].iter().copied().collect();
    assert!(
        !before.contains(generated.last().unwrap())
            && ![1, 5, 9].contains(generated.last().unwrap())
    );

    while app.world.get::<SeqState>(first) == Some(&SeqState::Running) {
        app.step();
    }
    for request in [first, second] {
        assert_eq!(
            app.world.get::<SeqState>(request),
            Some(&SeqState::Finished(
                vibee_core::serving::pipeline::FinishReason::Length
            ))
        );
        assert_eq!(
            app.world.get::<Tokens>(request).unwrap().generated.len(),
            100,
            "no token is dropped across reloads"
        );
    }
    let log = &app.world.resource::<ReloadLog>().0;
    for once in [
        "reloaded `reloadable`",
        "kept the running `reloadable`",
        "loaded plugin",
    ] {
        let times = log.iter().filter(|l| l.contains(once)).count();
        assert_eq!(times, 1, "one change is applied once: {once} in {log:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_plugin_claiming_a_builtin_spec_is_held_to_that_specs_cases() {
    let dir = std::env::temp_dir().join(format!("vibee-claim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    stdout(&vibee(&[
        "new-plugin",
        "top-k-only",
        "--kind",
        "sampler",
        "--dir",
        dir.to_str().unwrap(),
    ]));
    let crate_dir = dir.join("top-k-only");
    // A top-k sampler that claims to implement v2380, the full sampler spec.
    for file in ["src/lib.rs", "conformance.ron"] {
        let path = crate_dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("v2391", "v2380")).unwrap();
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", libraries().parent().unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let lib = library("top_k_only");
    let out = vibee(&["conformance", "--plugin", lib.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    failure(&out, 1);
    let held: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("v2380") && l.contains("transformers"))
        .collect();
    assert!(held.len() >= 2, "v2380's own cases ran: {table}");
    assert!(held.iter().all(|l| l.contains("FAIL")), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}
