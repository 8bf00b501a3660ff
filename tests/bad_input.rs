//! Bad input gets a clear error, never a panic.

use vibee_core::serving::pipeline::SamplingParams;
use vibee_core::serving::runner;
use vibee_tests::{fixture, load, scratch_copy};

const PLUGINS: &str = "gqa,rope,rmsnorm,swiglu";

fn load_error(dir: &std::path::Path, plugins: &str) -> String {
    match load(dir, plugins) {
        Ok(_) => panic!("loading {} with {plugins} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

/// A safetensors file holding one tensor, written by hand per the format: an 8-byte
/// little-endian header length, the JSON header, then the data.
fn safetensors_with(name: &str, dtype: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let header = serde_json::json!({ name: { "dtype": dtype, "shape": shape, "data_offsets": [0, data.len()] } }).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

#[test]
fn missing_weights_are_reported() {
    let dir = scratch_copy("llama-gqa");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(load_error(dir.path(), PLUGINS).contains("no weights found"));
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let dir = scratch_copy("llama-gqa");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("model.safetensors is not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn garbage_header_is_reported() {
    let dir = scratch_copy("llama-gqa");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json",
    )
    .unwrap();
    assert!(load_error(dir.path(), PLUGINS).contains("not a valid safetensors file"));
}

#[test]
fn tensor_shape_that_disagrees_with_config_names_the_tensor() {
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| c["intermediate_size"] = 96.into());
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[128, 64]")
            && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_tensor_dtype_is_named() {
    let dir = scratch_copy("llama-gqa");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let data = vec![0u8; 384 * 64 * 8];
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors_with("model.embed_tokens.weight", "I64", &[384, 64], &data),
    )
    .unwrap();
    // The embedding is read first (its shape bounds the sizes the config claims).
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("`model.embed_tokens.weight` has dtype I64"),
        "{err}"
    );
    let weights = vibee_core::io::weights::Weights::open(dir.path()).unwrap();
    let err = weights
        .get("model.embed_tokens.weight", &[384, 64])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dtype I64"), "{err}");
}

#[test]
fn missing_shard_is_reported() {
    let dir = scratch_copy("llama-sharded");
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("cannot read") && err.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_named() {
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| c["model_type"] = "llama9".into());
    assert!(load_error(dir.path(), PLUGINS).contains("model_type `llama9` is not supported"));
}

#[test]
fn malformed_config_json_is_reported() {
    let dir = scratch_copy("llama-gqa");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"llama\", ",
    )
    .unwrap();
    assert!(load_error(dir.path(), PLUGINS).contains("config.json is not valid JSON"));
}

#[test]
fn config_key_vibee_does_not_understand_is_named() {
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| c["sliding_window"] = 4096.into());
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("a key is not understood by vibee for model_type `llama`")
            && err.ends_with(": sliding_window"),
        "{err}"
    );
}

#[test]
fn every_unknown_config_key_is_named_in_one_error() {
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| {
        c["sliding_window"] = 4096.into();
        c["attn_temperature"] = 0.5.into();
        c["use_bias"] = true.into();
    });
    let err = load_error(dir.path(), PLUGINS);
    assert!(err.contains("keys are not understood"), "{err}");
    for key in ["sliding_window", "attn_temperature", "use_bias"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    // Keys inside the rope scaling and the quantization config join the same list.
    let quantized = scratch_copy("llama-gqa-awq-g32");
    edit_config(quantized.path(), |c| {
        c["attn_temperature"] = 0.5.into();
        c["rope_parameters"]["ramp"] = 1.into();
        c["quantization_config"]["clip"] = true.into();
    });
    let err = load_error(quantized.path(), "auto");
    assert!(
        err.ends_with(": attn_temperature, rope_parameters.ramp, quantization_config.clip"),
        "{err}"
    );
}

#[test]
fn config_field_with_wrong_type_is_named() {
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| c["hidden_size"] = "64".into());
    assert!(
        load_error(dir.path(), PLUGINS).contains("`hidden_size` must be a non-negative integer")
    );
}

#[test]
fn unknown_plugin_suggests_the_closest_name() {
    let err = load_error(&fixture("llama-gqa"), "gqaa,rope,rmsnorm,swiglu");
    assert!(
        err.contains("unknown plugin `gqaa`; did you mean `gqa`?"),
        "{err}"
    );
}

#[test]
fn planned_plugin_is_reported_as_not_implemented() {
    let err = load_error(
        &fixture("llama-gqa"),
        "gqa,rope,rmsnorm,swiglu,draft-speculative",
    );
    assert!(
        err.contains("`draft-speculative` (v2360) is planned"),
        "{err}"
    );
}

#[test]
fn two_plugins_for_one_exclusive_slot_are_refused() {
    let err = load_error(&fixture("llama-gqa"), "gqa,mha,rope,rmsnorm,swiglu");
    assert!(
        err.contains("`gqa` and `mha` both fill the exclusive `attention` slot"),
        "{err}"
    );
}

#[test]
fn a_slot_the_model_needs_but_nothing_fills_is_named() {
    let err = load_error(&fixture("llama-gqa"), "gqa,rmsnorm,swiglu");
    assert!(
        err.contains("needs a `position` operator") && err.contains("`rope`"),
        "{err}"
    );
}

#[test]
fn wrong_technique_for_the_checkpoint_names_the_config_field() {
    let err = load_error(&fixture("llama-gqa"), "mqa,rope,rmsnorm,swiglu");
    assert!(
        err.contains("num_key_value_heads = 2 but mqa needs 1"),
        "{err}"
    );
}

fn generate_error(prompt: Vec<u32>, params: SamplingParams) -> String {
    let mut engine = load(&fixture("llama-gqa"), "auto").unwrap();
    format!(
        "{:#}",
        runner::generate(&mut engine.app, prompt, params).unwrap_err()
    )
}

#[test]
fn empty_prompt_is_refused() {
    assert!(generate_error(vec![], SamplingParams::default()).contains("prompt is empty"));
}

#[test]
fn zero_max_tokens_is_refused() {
    let params = SamplingParams {
        max_tokens: 0,
        ..SamplingParams::default()
    };
    assert!(generate_error(vec![1, 2], params).contains("max tokens must be at least 1"));
}

#[test]
fn oversized_prompt_is_refused() {
    let err = generate_error(vec![5; 200], SamplingParams::default());
    assert!(
        err.contains("200 tokens but the model's context holds 128"),
        "{err}"
    );
}

#[test]
fn out_of_vocabulary_token_is_refused() {
    assert!(
        generate_error(vec![1, 384], SamplingParams::default()).contains("outside the vocabulary")
    );
}

#[test]
fn generation_stops_at_the_context_limit() {
    let mut engine = load(&fixture("llama-gqa"), "auto").unwrap();
    let params = SamplingParams {
        max_tokens: 1000,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let out = runner::generate(&mut engine.app, vec![7; 120], params).unwrap();
    assert_eq!(out.tokens.len(), 8);
    assert_eq!(
        out.finish_reason,
        vibee_core::serving::pipeline::FinishReason::Context
    );
}

#[test]
fn a_config_claiming_more_layers_than_the_weights_hold_is_refused_quickly() {
    // A billion layers once allocated 128 GB for the layer list before reading a tensor.
    for (layers, message) in [
        (1_000_000_000, "1000000000"),
        (1000, "the config gives 1000 layers"),
    ] {
        let dir = scratch_copy("llama-gqa");
        edit_config(dir.path(), |c| c["num_hidden_layers"] = layers.into());
        let started = std::time::Instant::now();
        let err = load_error(dir.path(), PLUGINS);
        assert!(err.contains(message), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| c["num_hidden_layers"] = 3.into());
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("no tensor of layer 2 (`model.layers.2.*`)"),
        "{err}"
    );
}

#[test]
fn an_embedding_that_disagrees_with_the_vocabulary_is_named() {
    let dir = scratch_copy("llama-gqa");
    edit_config(dir.path(), |c| c["vocab_size"] = 100_000.into());
    let err = load_error(dir.path(), PLUGINS);
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("[100000, 64]"),
        "{err}"
    );
}

/// Replaces element `index` of the float tensor `name` in `dir`'s weights with `bits`
/// (little-endian bytes of one element in the tensor's own dtype).
fn set_element(dir: &std::path::Path, name: &str, index: usize, bits: &[u8]) {
    use safetensors::tensor::TensorView;
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let target = tensors.tensor(name).unwrap();
    let mut data = target.data().to_vec();
    data[index * bits.len()..(index + 1) * bits.len()].copy_from_slice(bits);
    let views: Vec<(String, TensorView)> = (tensors.tensors().into_iter())
        .map(|(n, view)| match n == name {
            true => (
                n,
                TensorView::new(view.dtype(), view.shape().to_vec(), &data).unwrap(),
            ),
            false => (n, view),
        })
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
}

#[test]
fn nan_or_infinite_scales_of_stored_quantized_layers_are_refused_naming_the_tensor() {
    const F16_NAN: [u8; 2] = 0x7e00u16.to_le_bytes();
    const F16_INF: [u8; 2] = 0x7c00u16.to_le_bytes();
    for (fixture, tensor, bits) in [
        (
            "llama-gqa-awq-g32",
            "model.layers.0.self_attn.q_proj.scales",
            &F16_NAN[..],
        ),
        (
            "llama-gqa-awq-g32",
            "model.layers.1.mlp.down_proj.scales",
            &F16_INF[..],
        ),
        (
            "llama-gqa-gptq-8bit",
            "model.layers.0.self_attn.k_proj.scales",
            &F16_NAN[..],
        ),
        (
            "llama-gqa-gptq-g32-actorder",
            "model.layers.1.mlp.up_proj.scales",
            &F16_INF[..],
        ),
        (
            "llama-gqa-hqq-stored-g32",
            "model.layers.0.self_attn.q_proj.scale",
            &f32::NAN.to_le_bytes()[..],
        ),
        (
            "llama-gqa-hqq-stored-g32",
            "model.layers.0.mlp.gate_proj.zero",
            &f32::NEG_INFINITY.to_le_bytes()[..],
        ),
    ] {
        let dir = scratch_copy(fixture);
        set_element(dir.path(), tensor, 3, bits);
        let err = load_error(dir.path(), "auto");
        assert!(
            err.contains(&format!("`{tensor}` holds"))
                && err.contains("at element 3")
                && err.contains("must be finite"),
            "{fixture}: {err}"
        );
    }
}

/// AWQ and GPTQ layers hold their grouping in their tensors' shapes; a config whose
/// `group_size` says otherwise (or is larger than the layers) is refused by name.
#[test]
fn a_group_size_that_disagrees_with_the_stored_groups_is_refused() {
    for (fixture, size) in [
        ("llama-gqa-awq-g32", "4096"),
        ("llama-gqa-gptq-g32-actorder", "64"),
        ("llama-gqa-gptq-8bit", "32"),
    ] {
        let dir = scratch_copy(fixture);
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let before = config["quantization_config"]["group_size"].clone();
        config["quantization_config"]["group_size"] = serde_json::from_str(size).unwrap();
        std::fs::write(&path, config.to_string()).unwrap();
        let err = load_error(dir.path(), "auto");
        assert!(
            err.contains(&format!("quantization_config.group_size is {size}, but")),
            "{fixture} (group_size {before} -> {size}): {err}"
        );
    }
}
