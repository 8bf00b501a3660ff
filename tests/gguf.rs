//! GGUF reading against llama.cpp's `gguf` Python package (`make_gguf_fixtures.py`): every
//! tensor type dequantizes block by block to what `gguf.quants.dequantize` gives, the metadata
//! reads back as written, and damaged files are refused with a reason. GGUF models
//! (`make_gguf_models.py`, converted by llama.cpp's tools): the embedded tokenizer encodes as
//! transformers' GGUF tokenizer does, and bad model files are refused with a reason. Their
//! logits are conformance cases of v2345 (specs/v2345-gguf.ron), as those of the int8 and q4
//! quantizers are of v2340 and v2341; here, their configurations are checked.

use vibee_core::io::gguf::{Gguf, Value};
use vibee_core::io::tokenizer::Tokenizer;
use vibee_core::io::weights::DType;
use vibee_tests::{fixture, load, scratch_copy};

#[test]
fn every_tensor_type_dequantizes_as_the_gguf_package_does() {
    let file = Gguf::open(&fixture("gguf/blocks.gguf")).unwrap();
    let types = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"];
    let k_types = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"];
    for name in types.into_iter().chain(k_types) {
        let tensor = file
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let expected = file.tensor(&format!("{name}.expected")).unwrap();
        assert_eq!(expected.kind, DType::F32);
        assert_eq!(tensor.dims, expected.dims);
        let (got, want) = (file.dequantize(tensor), file.dequantize(expected));
        assert_eq!(got.len(), tensor.elements());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn metadata_reads_back_as_written() {
    let file = Gguf::open(&fixture("gguf/blocks.gguf")).unwrap();
    let get = |key: &str| file.metadata.get(key).cloned();
    assert_eq!(file.version, 3);
    assert_eq!(
        get("general.architecture"),
        Some(Value::String("llama".into()))
    );
    assert_eq!(get("vibee.u32"), Some(Value::U32(7)));
    assert_eq!(get("vibee.i32"), Some(Value::I32(-3)));
    assert_eq!(get("vibee.f32"), Some(Value::F32(0.5)));
    assert_eq!(get("vibee.bool"), Some(Value::Bool(true)));
    assert_eq!(get("vibee.string"), Some(Value::String("héllo".into())));
    assert_eq!(get("vibee.u64"), Some(Value::U64(1 << 40)));
    assert_eq!(
        get("vibee.strings"),
        Some(Value::Array(vec![
            Value::String("a".into()),
            Value::String("bc".into())
        ]))
    );
    let Some(Value::Array(ints)) = get("vibee.ints") else {
        panic!("vibee.ints is not an array");
    };
    assert_eq!(ints.len(), 3);
}

#[test]
fn damaged_files_are_refused_with_a_reason() {
    let dir = scratch_copy("gguf");
    let path = dir.path().join("blocks.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let error = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        format!("{:#}", Gguf::open(&path).err().expect("refused"))
    };
    let truncated = error(&bytes[..bytes.len() - 100]);
    assert!(
        truncated.contains("past the end of the file"),
        "{truncated}"
    );
    let header = error(&bytes[..40]);
    assert!(header.contains("inside its header"), "{header}");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(error(&magic).contains("GGUF magic"));
    let mut version = bytes.clone();
    version[4] = 9;
    assert!(error(&version).contains("version 9"));
}

/// A GGUF fixture's embedded tokenizer, and its reference's texts with their token ids.
fn tokenizer_and_cases(name: &str) -> (Tokenizer, Vec<(String, Vec<u32>)>) {
    let dir = fixture(name);
    let file = Gguf::open(&dir.join("model.gguf")).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file)
        .unwrap()
        .expect("the file has a tokenizer");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let cases: Vec<(String, Vec<u32>)> =
        serde_json::from_value(reference["tokenized"].clone()).unwrap();
    assert!(cases.len() >= 3);
    (tokenizer, cases)
}

#[test]
fn the_embedded_tokenizer_encodes_as_transformers_gguf_tokenizer_does() {
    let (tokenizer, cases) = tokenizer_and_cases("gguf-llama-q4_0");
    for (text, expected) in &cases {
        // The file says not to add BOS, so a plain prompt is its text's tokens.
        assert_eq!(&tokenizer.encode(text).unwrap(), expected, "{text:?}");
        assert_eq!(&tokenizer.decode(expected).unwrap(), text);
    }
    let chat = tokenizer
        .apply_chat_template(
            &[vibee_core::io::tokenizer::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(chat, "<s>user: hi\nassistant:");
}

#[test]
fn llama3_and_qwen2_pre_tokenizers_split_as_transformers_gguf_tokenizer_does() {
    for fixture in ["gguf-llama-gqa-llama-bpe", "gguf-qwen2-qwen2"] {
        let (tokenizer, cases) = tokenizer_and_cases(fixture);
        assert!(cases.len() >= 5, "{fixture}");
        for (text, expected) in &cases {
            assert_eq!(
                &tokenizer.encode(text).unwrap(),
                expected,
                "{fixture}: {text:?}"
            );
            assert_eq!(&tokenizer.decode(expected).unwrap(), text, "{fixture}");
        }
    }
}

/// Each pre-tokenizer name llama.cpp's converter writes for a published byte-level tokenizer
/// (falcon, mpt, smollm, starcoder, dbrx): that tokenizer's vocabulary cut to its first merges,
/// against Hugging Face `tokenizers` running the published tokenizer.json on it; and Mistral
/// NeMo's `tekken`, and `llama-bpe`/`llama3` and `qwen2`/`deepseek-r1-qwen` once more, on
/// DOLMA 2's vocabulary against transformers' GGUF tokenizer loader, and
/// BLOOM's `bloom` and DeepSeek's `deepseek-llm` on it against llama.cpp's own tokenizer
/// (tests/fixtures/make_pre_tokenizer_fixtures.py).
#[test]
fn published_pre_tokenizers_split_as_their_tokenizer_json_does() {
    let dir = fixture("pre-tokenizers");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = reference["tokenizer_ggml_pre"]
            .as_str()
            .unwrap()
            .to_string();
        let file = Gguf::open(&path.with_extension("gguf")).unwrap();
        let tokenizer = Tokenizer::from_gguf(&file).unwrap().unwrap();
        let cases: Vec<(String, Vec<u32>)> =
            serde_json::from_value(reference["tokenized"].clone()).unwrap();
        for (text, expected) in &cases {
            assert_eq!(
                &tokenizer.encode(text).unwrap(),
                expected,
                "{name}: {text:?}"
            );
        }
        names.push(name);
    }
    names.sort();
    let expected = [
        "bloom",
        "dbrx",
        "deepseek-llm",
        "deepseek-r1-qwen",
        "falcon",
        "llama-bpe",
        "llama3",
        "mpt",
        "qwen2",
        "smollm",
        "starcoder",
        "tekken",
    ];
    assert_eq!(names, expected);
}

/// A byte-level vocabulary under a pre-tokenizer name vibee does not know: refused by name
/// when text is to be tokenized, while the model still runs on token ids.
#[test]
fn an_unknown_pre_tokenizer_is_named_and_token_ids_still_run() {
    let dir = scratch_copy("gguf-llama-gqa-llama-bpe");
    let file = dir.path().join("model.gguf");
    let mut bytes = std::fs::read(&file).unwrap();
    let name = b"llama-bpe";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    bytes[at..at + name.len()].copy_from_slice(b"llama-bpX");
    std::fs::write(&file, &bytes).unwrap();
    let mut engine = load(&file, "auto").unwrap();
    assert!(engine.tokenizer.is_none());
    let why = engine.tokenizer_error.clone().unwrap();
    assert!(
        why.contains("pre-tokenizer `llama-bpX` is not supported yet"),
        "{why}"
    );
    let params = vibee_core::serving::pipeline::SamplingParams {
        temperature: 0.0,
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let out =
        vibee_core::serving::runner::generate(&mut engine.app, vec![1, 17, 42], params).unwrap();
    assert_eq!(out.tokens.len(), 4);
}

#[test]
fn a_sentencepiece_vocabulary_encodes_as_llama_cpp_does() {
    let (tokenizer, cases) = tokenizer_and_cases("gguf-llama-spm");
    for (text, expected) in &cases {
        // The file does not say otherwise, so llama.cpp prepends BOS (id 1).
        let mut with_bos = vec![1];
        with_bos.extend(expected);
        assert_eq!(tokenizer.encode(text).unwrap(), with_bos, "{text:?}");
        assert_eq!(&tokenizer.decode(expected).unwrap(), text);
    }
}

#[test]
fn bad_gguf_models_are_refused_with_a_reason() {
    let plugins = "auto";
    let error =
        |path: &std::path::Path| format!("{:#}", load(path, plugins).err().expect("refused"));
    // Two files in one directory: which one is meant?
    let dir = scratch_copy("gguf-llama-q4_0");
    std::fs::copy(dir.path().join("model.gguf"), dir.path().join("other.gguf")).unwrap();
    assert!(error(dir.path()).contains("several .gguf files"));
    // Truncated weights.
    let file = dir.path().join("other.gguf");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert!(error(&file).contains("truncated"), "{}", error(&file));
    // An architecture vibee does not run.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let at = text.find("llama").unwrap();
    let mut renamed = bytes.clone();
    renamed[at..at + 5].copy_from_slice(b"mamba");
    std::fs::write(&file, &renamed).unwrap();
    assert!(
        error(&file).contains("architecture `mamba` is not supported"),
        "{}",
        error(&file)
    );
    // Llama 3 rope divisors that do not cover the head's frequencies (8 for head_dim 16).
    let rope_dir = scratch_copy("gguf-llama-rope-llama3");
    let rope_file = rope_dir.path().join("model.gguf");
    let mut bytes = std::fs::read(&rope_file).unwrap();
    let name = b"rope_freqs.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // After the name: the number of dimensions (u32), then the first dimension (u64).
    assert_eq!(bytes[at + 4..at + 12], 8u64.to_le_bytes());
    bytes[at + 4..at + 12].copy_from_slice(&4u64.to_le_bytes());
    std::fs::write(&rope_file, &bytes).unwrap();
    let message = error(&rope_file);
    assert!(
        message.contains("rope_freqs.weight must hold 8 float values"),
        "{message}"
    );
    // Stacked experts that disagree with the expert count in the metadata.
    let moe_dir = scratch_copy("gguf-mixtral");
    let moe_file = moe_dir.path().join("model.gguf");
    let mut bytes = std::fs::read(&moe_file).unwrap();
    let key = b"llama.expert_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // After the key: the value type (u32: 4), then the value.
    assert_eq!(bytes[at..at + 8], [4, 0, 0, 0, 4, 0, 0, 0]);
    bytes[at + 4..at + 8].copy_from_slice(&8u32.to_le_bytes());
    std::fs::write(&moe_file, &bytes).unwrap();
    let message = error(&moe_file);
    assert!(message.contains("it should stack 8 experts"), "{message}");
    // q/k/v fused into one tensor (llama.cpp's --fuse-qkv) for a family vibee reads separately.
    let fused_dir = scratch_copy("gguf-llama-f32");
    let fused_file = fused_dir.path().join("model.gguf");
    let mut bytes = std::fs::read(&fused_file).unwrap();
    let (from, to) = (b"blk.0.ffn_gate.weight", b"blk.0.attn_qkv.weight");
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(&fused_file, &bytes).unwrap();
    let message = error(&fused_file);
    assert!(message.contains("fuses q/k/v into attn_qkv"), "{message}");
    // DeepSeek-V2: YaRN whose log multiplier (the one mscale a file keeps) is missing, and
    // a kv_b_proj with only its key half.
    let latent_dir = scratch_copy("gguf-deepseek_v2-lite-style");
    let latent_file = latent_dir.path().join("model.gguf");
    let original = std::fs::read(&latent_file).unwrap();
    let renamed = |from: &[u8], to: &[u8]| {
        let mut bytes = original.clone();
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        bytes[at..at + to.len()].copy_from_slice(to);
        std::fs::write(&latent_file, &bytes).unwrap();
        error(&latent_file)
    };
    let message = renamed(b"yarn_log_multiplier", b"yarn_log_multiplieX");
    assert!(
        message.contains("no deepseek2.rope.scaling.yarn_log_multiplier"),
        "{message}"
    );
    let message = renamed(b"blk.1.attn_v_b.weight", b"blk.1.attn_v_X.weight");
    assert!(
        message.contains("one half of `model.layers.1.self_attn.kv_b_proj.weight`"),
        "{message}"
    );
    // Quantized weights without the plugin that runs them.
    let missing = format!(
        "{:#}",
        load(
            &file.with_file_name("model.gguf"),
            "gqa,rope,rmsnorm,swiglu"
        )
        .err()
        .unwrap()
    );
    assert!(missing.contains("needs `gguf`"), "{missing}");
    // The gguf plugin on full-precision weights.
    let dense = format!(
        "{:#}",
        load(&fixture("llama-gqa"), "gqa,rope,rmsnorm,swiglu,gguf")
            .err()
            .unwrap()
    );
    assert!(dense.contains("no GGUF-quantized tensors"), "{dense}");
}

#[test]
fn quantizing_reproduces_the_gguf_packages_blocks() {
    let file = Gguf::open(&fixture("gguf/blocks.gguf")).unwrap();
    for (name, quantize) in [
        (
            "Q8_0",
            vibee_core::io::blocks::quantize_q8_0 as fn(&[f32]) -> Vec<u8>,
        ),
        ("Q4_0", vibee_core::io::blocks::quantize_q4_0),
    ] {
        let stored = file.data(file.tensor(name).unwrap());
        // The gguf package's own dequantization of its blocks quantizes back to them.
        let values = file.dequantize(file.tensor(&format!("{name}.expected")).unwrap());
        assert_eq!(quantize(&values), stored, "{name}");
    }
}

#[test]
fn quantizer_configurations_are_checked() {
    let configs = |config: &str| {
        vibee_core::serving::external::PluginConfigs(
            [("q4".to_string(), config.to_string())].into(),
        )
    };
    let error = |config: &str| {
        let result = vibee_core::Engine::load(
            &fixture("llama-gqa"),
            &vibee_tests::plugins("gqa,rope,rmsnorm,swiglu,q4"),
            &vibee_core::Registry::builtin(),
            &vibee_cli::builtin_plugins(),
            &configs(config),
        );
        format!("{:#}", result.err().expect("refused"))
    };
    assert!(error("group=48").contains("must be 32, 64 or 128"));
    assert!(error("groups=64").contains("is `group=N`"));
    // Two quantizers at once: one slot.
    let both = format!(
        "{:#}",
        load(&fixture("llama-gqa"), "gqa,rope,rmsnorm,swiglu,int8,q4")
            .err()
            .unwrap()
    );
    assert!(both.contains("int8") && both.contains("q4"), "{both}");
}
