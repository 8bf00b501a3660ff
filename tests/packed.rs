//! AutoAWQ, GPTQ and HQQ checkpoints: damaged or unsupported ones are refused with a reason.

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use vibee_tests::{load, scratch_copy};

fn error(dir: &std::path::Path) -> String {
    format!("{:#}", load(dir, "auto").err().expect("refused"))
}

fn assert_refused(dir: &std::path::Path, expected: &str) {
    let message = error(dir);
    assert!(message.contains(expected), "{message}");
}

/// The quantized `fixture` loaded without the plugin that reads its layers is refused.
fn assert_needs_its_plugin(fixture: &str, plugin: &str) {
    let dir = vibee_tests::fixture(fixture);
    let message = format!("{:#}", load(&dir, "gqa,rope,rmsnorm,swiglu").err().unwrap());
    assert!(message.contains(&format!("needs `{plugin}`")), "{message}");
}

/// Rewrites `config.json` of `dir` with `edit` applied to its quantization_config.
fn edit_quantization_config(dir: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config["quantization_config"]);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
}

/// Rewrites tensor `name` of `dir`'s weights: `edit(shape, data)` changes its bytes in place
/// and returns its new shape.
fn replace_tensor(
    dir: &std::path::Path,
    name: &str,
    edit: impl Fn(&[usize], &mut Vec<u8>) -> Vec<usize>,
) {
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let target = tensors.tensor(name).unwrap();
    let mut data = target.data().to_vec();
    let shape = edit(target.shape(), &mut data);
    let views: Vec<(String, TensorView)> = tensors
        .tensors()
        .into_iter()
        .map(|(n, view)| match n == name {
            true => (
                n,
                TensorView::new(view.dtype(), shape.clone(), &data).unwrap(),
            ),
            false => (n, view),
        })
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
}

#[test]
fn unsupported_quantization_configs_are_named() {
    for (fixture, key, value, expected) in [
        ("llama-gqa-awq-g32", "version", "\"gemv\"", "GEMM layout"),
        ("llama-gqa-awq-g32", "bits", "3", "3 bits is not supported"),
        (
            "llama-gqa-awq-g32",
            "quant_method",
            "\"bitsandbytes\"",
            "`bitsandbytes` is not supported",
        ),
        ("llama-gqa-awq-g32", "group_size", "48", "multiple of 32"),
        (
            "llama-gqa-awq-g32",
            "exotic",
            "1",
            "quantization_config.exotic",
        ),
        (
            "llama-gqa-gptq-8bit",
            "checkpoint_format",
            "\"gptq_v2\"",
            "`gptq_v2` is not supported",
        ),
        (
            "llama-gqa-gptq-8bit",
            "bits",
            "2",
            "2 bits is not supported",
        ),
    ] {
        let dir = scratch_copy(fixture);
        edit_quantization_config(dir.path(), |q| {
            q[key] = serde_json::from_str(value).unwrap()
        });
        let message = error(dir.path());
        assert!(message.contains(expected), "{key}={value}: {message}");
    }
}

#[test]
fn damaged_packed_tensors_are_refused() {
    // A truncated weight file.
    let dir = scratch_copy("llama-gqa-gptq-8bit");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    assert_refused(dir.path(), "truncated or corrupt");
    // Packed tensors that do not fit the config's shapes.
    let dir = scratch_copy("llama-gqa-awq-g32");
    let path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        config.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    assert_refused(dir.path(), "qweight has shape");
    // A g_idx naming a group that has no scales.
    let dir = scratch_copy("llama-gqa-gptq-g32-actorder");
    replace_tensor(
        dir.path(),
        "model.layers.0.self_attn.q_proj.g_idx",
        |shape, data| {
            data[..4].copy_from_slice(&99i32.to_le_bytes());
            shape.to_vec()
        },
    );
    assert_refused(dir.path(), "g_idx names group 99");
    // Scales that are not a [groups, out] matrix.
    let dir = scratch_copy("llama-gqa-gptq-g32-actorder");
    replace_tensor(
        dir.path(),
        "model.layers.1.mlp.down_proj.scales",
        |shape, _| vec![shape.iter().product()],
    );
    assert_refused(dir.path(), "expected [groups, out features]");
    assert_needs_its_plugin("llama-gqa-gptq-8bit", "gptq");
}

#[test]
fn damaged_or_unsupported_hqq_layers_are_refused() {
    let layer = "model.layers.1.mlp.up_proj";
    // Each tensor's first byte is set to the value given; `None` cuts off its last row.
    let cases = [
        ("axis", Some(0), "axis 0 is not supported"),
        ("view_as_float", Some(1), "view_as_float"),
        ("offload_meta", Some(1), "offload_meta"),
        ("nbits", Some(3), "3-bit weights packed as `4bit_u8`"),
        ("group_size", Some(48), "does not divide"),
        ("W_q", None, "W_q has shape"),
        ("shape", Some(7), "`shape` says [7, 64]"),
    ];
    for (key, first_byte, expected) in cases {
        let dir = scratch_copy("llama-gqa-hqq-stored-g32");
        replace_tensor(
            dir.path(),
            &format!("{layer}.{key}"),
            |shape, data| match first_byte {
                Some(value) => {
                    data[0] = value;
                    shape.to_vec()
                }
                None => {
                    data.truncate(data.len() - shape[1]);
                    vec![shape[0] - 1, shape[1]]
                }
            },
        );
        let message = error(dir.path());
        assert!(message.contains(expected), "{key}: {message}");
        assert!(message.contains(layer), "{key}: {message}");
    }
    let dir = scratch_copy("llama-gqa-hqq-stored-g32");
    edit_quantization_config(dir.path(), |q| q["exotic"] = 1.into());
    assert_refused(dir.path(), "quantization_config.exotic");
    assert_needs_its_plugin("llama-gqa-hqq-stored-g32", "hqq");
}
