//! `vibee quantize` against references: GPTQ as AutoGPTQ runs it and AWQ as its definition
//! runs in torch, on the same calibration statistics (tests/fixtures/make_calibrated_fixtures.py);
//! int8 and q4 against the quantizers' own references, hqq against the checkpoint the `hqq`
//! package's HQQLinear quantized (tests/fixtures/make_packed_fixtures.py); every output loads
//! back through the AutoAWQ/GPTQ/HQQ loaders.

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use vibee_core::tools::conformance::Reference;
use vibee_inference::quantization::offline::{quantize_checkpoint, Method, Options};
use vibee_tests::{fixture, load};

/// As for the other quantized references (specs/v2341-q4.ron): observed errors are ~3e-6,
/// a single int8 rounding flip of an activation costs up to ~3e-2.
const TOLERANCE: f32 = 5e-2;

/// A fresh output directory under the temp dir, removed on drop.
struct Output(PathBuf);

impl Output {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vibee-quantize-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn calibration_text() -> String {
    std::fs::read_to_string(fixture("calibration/calibration.txt")).unwrap()
}

fn options(method: Method, act_order: bool) -> Options {
    Options {
        method,
        group: 32,
        bits: 4,
        act_order,
        calibration: matches!(method, Method::Awq | Method::Gptq).then(calibration_text),
        calibration_tokens: 2048,
        hessian_budget: usize::MAX,
    }
}

/// `vibee quantize` of llama-gqa into `out`.
fn quantize(
    out: &Path,
    options: &Options,
) -> anyhow::Result<vibee_inference::quantization::offline::Summary> {
    quantize_model(&fixture("llama-gqa"), out, options)
}

/// `vibee quantize` of `model` into `out`.
fn quantize_model(
    model: &Path,
    out: &Path,
    options: &Options,
) -> anyhow::Result<vibee_inference::quantization::offline::Summary> {
    let (registry, catalog) = vibee_cli::catalog(Vec::new())?;
    quantize_checkpoint(model, out, options, &registry, &catalog, &mut |_, _, _| {})
}

/// The largest difference between the quantized checkpoint's prompt logits and `reference`'s
/// (int8-rounded activations, as vibee's kernels compute).
fn max_error(out: &Path, reference: &Path) -> f32 {
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let engine = load(out, "auto").unwrap();
    let mut kv = engine.model.new_sequence();
    let logits = engine
        .model
        .forward(&reference.prompt_ids, kv.as_mut(), true)
        .unwrap();
    let expected = reference.decode_logits.unwrap().concat();
    logits
        .data
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn calibration_text_tokenizes_as_transformers_does() {
    let engine = load(&fixture("llama-gqa"), "auto").unwrap();
    let tokenizer = engine.tokenizer.unwrap();
    let ids: Vec<u32> = serde_json::from_str(
        &std::fs::read_to_string(fixture("calibration/calibration-ids.json")).unwrap(),
    )
    .unwrap();
    let mut ours = tokenizer.encode(&calibration_text()).unwrap();
    ours.truncate(2048);
    assert_eq!(ours, ids);
}

#[test]
fn gptq_matches_autogptq_on_the_same_calibration() {
    // With a budget of one byte each layer calibrates in a pass of its own: the same result.
    for (act_order, budget, reference) in [
        (false, usize::MAX, "gptq-g32.json"),
        (false, 1, "gptq-g32.json"),
        (true, usize::MAX, "gptq-g32-actorder.json"),
    ] {
        let options = Options {
            hessian_budget: budget,
            ..options(Method::Gptq, act_order)
        };
        let out = Output::new(reference);
        let summary = quantize(&out.0, &options).unwrap();
        assert_eq!(summary.quantized, 14);
        let error = max_error(&out.0, &fixture("calibration").join(reference));
        assert!(error < TOLERANCE, "{reference}: {error:e}");
        // The error feedback changed the weights: round-to-nearest's logits are far off.
        let rtn = max_error(&out.0, &fixture("calibration/q4-g32.json"));
        assert!(
            rtn > 10.0 * TOLERANCE,
            "{reference} is round-to-nearest: {rtn:e}"
        );
    }
}

#[test]
fn awq_matches_its_definition_on_the_same_calibration() {
    let out = Output::new("awq");
    quantize(&out.0, &options(Method::Awq, false)).unwrap();
    let error = max_error(&out.0, &fixture("calibration/awq-g32.json"));
    assert!(error < TOLERANCE, "awq: {error:e}");
    let rtn = max_error(&out.0, &fixture("calibration/q4-g32.json"));
    assert!(rtn > 10.0 * TOLERANCE, "awq is round-to-nearest: {rtn:e}");
}

#[test]
fn calibration_free_checkpoints_match_the_quantizers_references() {
    for (method, reference) in [
        (Method::Int8, "calibration/int8.json"),
        (Method::Q4, "calibration/q4-g32.json"),
        (Method::Hqq, "llama-gqa-hqq-stored-g32/reference.json"),
    ] {
        let out = Output::new(&reference.replace('/', "-"));
        quantize(&out.0, &options(method, false)).unwrap();
        let error = max_error(&out.0, &fixture(reference));
        assert!(error < TOLERANCE, "{reference}: {error:e}");
    }
}

#[test]
fn tensors_that_are_not_floats_pass_through_unchanged() {
    // Old GPT-NeoX checkpoints keep bool masks and i64 ids beside their weights.
    let model = vibee_tests::scratch_copy("llama-gqa");
    let file = model.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let positions: Vec<u8> = (0..8i64).flat_map(i64::to_le_bytes).collect();
    let mask = vec![1u8, 0, 1, 1];
    let mut views = SafeTensors::deserialize(&bytes).unwrap().tensors();
    views.push((
        "model.position_ids".into(),
        TensorView::new(Dtype::I64, vec![8], &positions).unwrap(),
    ));
    views.push((
        "model.layers.0.self_attn.mask".into(),
        TensorView::new(Dtype::BOOL, vec![2, 2], &mask).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let out = Output::new("non-float");
    quantize_model(model.path(), &out.0, &options(Method::Q4, false)).unwrap();
    let written = std::fs::read(out.0.join("model.safetensors")).unwrap();
    let written = SafeTensors::deserialize(&written).unwrap();
    for (name, dtype, data) in [
        ("model.position_ids", Dtype::I64, &positions),
        ("model.layers.0.self_attn.mask", Dtype::BOOL, &mask),
    ] {
        let tensor = written.tensor(name).unwrap();
        assert_eq!((tensor.dtype(), tensor.data()), (dtype, data.as_slice()));
    }
    assert!(load(&out.0, "auto").is_ok());
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let refused = |model: &Path, options: &Options| {
        let out = Output::new("refused");
        let error = quantize_model(model, &out.0, options).expect_err("refused");
        assert!(!out.0.exists(), "a refused run wrote {}", out.0.display());
        format!("{error:#}")
    };
    let llama = fixture("llama-gqa");
    let uncalibrated = Options {
        calibration: None,
        ..options(Method::Gptq, false)
    };
    assert!(refused(&llama, &uncalibrated).contains("--calib FILE"));
    let short = Options {
        calibration: Some("hi".into()),
        ..options(Method::Awq, false)
    };
    assert!(refused(&llama, &short).contains("at least 16"));
    let group = Options {
        group: 48,
        ..options(Method::Q4, false)
    };
    assert!(refused(&llama, &group).contains("--group must be 32, 64 or 128"));
    // llama-gqa's rows of 64 do not split into groups of 128: AWQ has nothing to scale.
    let wide_groups = Options {
        group: 128,
        ..options(Method::Awq, false)
    };
    assert!(refused(&llama, &wide_groups).contains("does not fit the group size"));
    let eight_bit_awq = Options {
        bits: 8,
        ..options(Method::Awq, false)
    };
    assert!(refused(&llama, &eight_bit_awq).contains("GPTQ's options"));
    let calibrated_q4 = Options {
        calibration: Some(calibration_text()),
        ..options(Method::Q4, false)
    };
    assert!(refused(&llama, &calibrated_q4).contains("need no calibration"));
    assert!(
        refused(&fixture("llama-gqa-awq-g32"), &options(Method::Q4, false))
            .contains("already quantized")
    );
    assert!(
        refused(&fixture("gguf-llama-q4_0"), &options(Method::Q4, false))
            .contains("not a Hugging Face checkpoint directory")
    );
    assert!(refused(&fixture("gpt2"), &options(Method::Q4, false)).contains("[in, out]"));
    assert!(refused(&fixture("gemma"), &options(Method::Awq, false)).contains("Llama-style"));
    assert!(Method::parse("fp4")
        .unwrap_err()
        .to_string()
        .contains("unknown method"));
    // An output directory with something in it is never overwritten.
    let out = Output::new("occupied");
    std::fs::create_dir_all(&out.0).unwrap();
    std::fs::write(out.0.join("keep.txt"), "mine").unwrap();
    let error = quantize(&out.0, &options(Method::Q4, false)).err().unwrap();
    assert!(format!("{error:#}").contains("not empty"));
    assert_eq!(
        std::fs::read_to_string(out.0.join("keep.txt")).unwrap(),
        "mine"
    );
}
