//! Real published `config.json` files (verbatim copies, `tests/fixtures/configs/SOURCES.md`)
//! load, and what the engine reads from them is what their families mean.

use std::collections::BTreeMap;

use vibee_core::app::registry::Registry;
use vibee_core::config::families;
use vibee_core::config::{NormKind, PositionKind, QkNormScope, Residual};
use vibee_core::ModelConfig;
use vibee_tests::repo_root;

/// Every committed config, by file stem.
fn published() -> BTreeMap<String, String> {
    let dir = repo_root().join("tests/fixtures/configs");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

fn config(name: &str) -> ModelConfig {
    ModelConfig::from_json(&published()[name]).unwrap()
}

#[test]
fn every_published_config_loads_and_names_registered_plugins() {
    let registry = Registry::builtin();
    let mut failures = Vec::new();
    let mut per_family: BTreeMap<String, usize> = BTreeMap::new();
    let files = published();
    for (name, text) in &files {
        match ModelConfig::from_json(text) {
            Ok(c) => {
                *per_family.entry(c.model_type.clone()).or_default() += 1;
                for (slot, plugin) in c.required_plugins() {
                    assert!(
                        registry.get(plugin).is_some(),
                        "{name}: slot {slot} needs `{plugin}`, which the registry lacks"
                    );
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "refused:\n{}", failures.join("\n"));
    assert!(files.len() >= 40, "only {} published configs", files.len());
    let missing: Vec<_> = families::model_types()
        .into_iter()
        .filter(|t| !per_family.contains_key(*t))
        .collect();
    assert!(missing.is_empty(), "no published config for {missing:?}");
}

#[test]
fn legacy_gemma_gelu_means_the_tanh_approximation() {
    // gemma-7b's first release says `hidden_act: gelu`; Google's implementation and
    // transformers compute the tanh approximation.
    assert_eq!(config("gemma-7b").hidden_act, "gelu_pytorch_tanh");
    let c = config("gemma-2-9b-it");
    assert_eq!(c.hidden_act, "gelu_pytorch_tanh");
    assert_eq!(c.residual, Residual::Sandwich);
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!(c.query_pre_attn_scalar, Some(224.0));
    assert_eq!(c.sliding_layers[0], Some(4096));
    assert_eq!(c.sliding_layers[1], None);
}

#[test]
fn deepseek_v2_heads_are_the_rotary_width() {
    let c = config("DeepSeek-V2-Lite");
    assert_eq!(c.head_dim, 64);
    let mla = c.mla.unwrap();
    assert_eq!((mla.kv_lora_rank, mla.nope_dim, mla.v_dim), (512, 128, 128));
    let moe = c.moe.unwrap();
    assert_eq!((moe.experts, moe.top_k), (64, 6));
    assert!(!moe.sparse_layers[0] && moe.sparse_layers[1]);
}

#[test]
fn falcon_arrangements_are_read_from_their_flags() {
    let seven = config("falcon-7b-instruct");
    assert_eq!((seven.num_heads, seven.num_kv_heads), (71, 1));
    assert_eq!(seven.residual, Residual::Parallel);
    assert_eq!(seven.layout.norms.attn_in, seven.layout.norms.ffn_in);
    assert_eq!(seven.intermediate_size, 4 * 4544);
    assert!(seven.tie_word_embeddings);
    let big = config("falcon-180B-chat");
    assert_eq!((big.num_heads, big.num_kv_heads), (232, 8));
    assert_eq!(big.layout.norms.attn_in, Some("ln_attn"));
}

/// A falcon fixture's config in the form Falcon was first published in (`RefinedWeb*`
/// model types, `n_head`/`n_head_kv`/`n_layer`), the inverse of transformers'
/// `convert_custom_code_checkpoint.py`.
fn refined_web_form(fixture: &str, model_type: &str) -> String {
    let path = repo_root()
        .join("tests/fixtures")
        .join(fixture)
        .join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let map = v.as_object_mut().unwrap();
    for (new, old) in [
        ("num_attention_heads", "n_head"),
        ("num_hidden_layers", "n_layer"),
        ("num_kv_heads", "n_head_kv"),
    ] {
        if let Some(value) = map.remove(new) {
            map.insert(old.into(), value);
        }
    }
    map.remove("new_decoder_architecture");
    map.insert("model_type".into(), model_type.into());
    v.to_string()
}

#[test]
fn falcons_first_published_form_reads_as_the_falcon_it_became() {
    for (fixture, model_type) in [
        ("falcon", "RefinedWeb"),
        ("falcon-7b-style", "RefinedWebModel"),
    ] {
        let current =
            ModelConfig::from_dir(&repo_root().join("tests/fixtures").join(fixture)).unwrap();
        let legacy = ModelConfig::from_json(&refined_web_form(fixture, model_type)).unwrap();
        assert_eq!(
            ModelConfig {
                model_type: "falcon".into(),
                ..legacy
            },
            current,
            "{fixture}"
        );
    }
    let forty = config("falcon-40b-RefinedWeb");
    assert_eq!(
        (forty.num_heads, forty.num_kv_heads, forty.num_layers),
        (128, 8, 60)
    );
    assert_eq!(forty.layout.norms.ffn_in, Some("ln_mlp"));
    let seven = config("falcon-7b-instruct-RefinedWebModel");
    assert_eq!((seven.num_heads, seven.num_kv_heads), (71, 1));
    let contradiction = refined_web_form("falcon", "RefinedWebModel").replace(
        "\"model_type\"",
        "\"new_decoder_architecture\": true, \"model_type\"",
    );
    assert!(ModelConfig::from_json(&contradiction)
        .unwrap_err()
        .to_string()
        .contains("contradicts the model_type"));
}

#[test]
fn qwen3_moe_routes_without_a_shared_expert() {
    let c = config("Qwen3-30B-A3B");
    assert_eq!(c.qk_norm, Some(QkNormScope::PerHead));
    let moe = c.moe.unwrap();
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_intermediate),
        (128, 8, 768)
    );
    assert!(moe.normalize_top_k && moe.shared_intermediate.is_none());
    assert!(moe.sparse_layers.iter().all(|s| *s));
}

#[test]
fn family_spellings_are_read_under_the_common_keys() {
    let bloom = config("bloom");
    assert_eq!((bloom.hidden_size, bloom.num_layers), (14336, 70));
    assert_eq!(bloom.position, PositionKind::Alibi);
    let gpt2 = config("distilgpt2");
    assert_eq!((gpt2.num_layers, gpt2.max_position_embeddings), (6, 1024));
    assert_eq!(gpt2.norm, NormKind::Layer { bias: true });
    assert!(gpt2.tie_word_embeddings);
    let neox = config("pythia-160m");
    assert_eq!(neox.rotary_dim, neox.head_dim / 4);
}

#[test]
fn a_family_alias_that_disagrees_with_the_common_key_is_refused() {
    let text = published()["distilgpt2"]
        .replace("\"n_embd\": 768", "\"n_embd\": 768, \"hidden_size\": 512");
    let e = ModelConfig::from_json(&text).unwrap_err().to_string();
    assert!(
        e.contains("`n_embd` (768) and `hidden_size` (512) disagree"),
        "{e}"
    );
    // The same value under both names is no conflict (some starcoder2 configs give the
    // epsilon both as `norm_epsilon` and as `rms_norm_eps`).
    let same = published()["distilgpt2"]
        .replace("\"n_embd\": 768", "\"n_embd\": 768, \"hidden_size\": 768");
    assert_eq!(ModelConfig::from_json(&same).unwrap().hidden_size, 768);
}

/// transformers' BLOOM, GPT-2 and Falcon classes compute head widths from hidden_size and read
/// their MLP width under their own key (or not at all), so a stray `head_dim` or
/// `intermediate_size` changes nothing there: with such keys added to each fixture's config,
/// transformers 5.24 gives the fixture's reference logits exactly (checked when this test was
/// written), and vibee must read the same dimensions.
#[test]
fn keys_a_family_never_reads_change_nothing() {
    for (fixture, stray) in [
        ("bloom", r#""head_dim": 7, "intermediate_size": 5"#),
        ("gpt2", r#""head_dim": 7, "intermediate_size": 5"#),
        ("falcon", r#""intermediate_size": 5"#),
    ] {
        let path = repo_root().join(format!("tests/fixtures/{fixture}/config.json"));
        let text = std::fs::read_to_string(path).unwrap();
        let plain = ModelConfig::from_json(&text).unwrap();
        let strayed = ModelConfig::from_json(&text.replacen('{', &format!("{{{stray}, "), 1))
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let dims = |c: &ModelConfig| (c.head_dim, c.intermediate_size, c.num_kv_heads);
        assert_eq!(dims(&strayed), dims(&plain), "{fixture}");
    }
}

/// Where rope scaling's pretraining length comes from, as transformers 5.24 reads it (each
/// case checked with `AutoConfig.from_pretrained` when this test was written): Phi-3's config
/// class defines a top-level `original_max_position_embeddings` (default 4096) that overrides
/// the scaling's own; Llama's does not, so the scaling's own counts, else
/// max_position_embeddings.
#[test]
fn rope_pretraining_length_is_read_where_transformers_reads_it() {
    use vibee_core::config::RopeScaling;
    let original = |fixture: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let path = repo_root().join(format!("tests/fixtures/{fixture}/config.json"));
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut json);
        match ModelConfig::from_json(&json.to_string())
            .unwrap()
            .rope_scaling
        {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            }
            | RopeScaling::Llama3 {
                original_max_position_embeddings,
                ..
            } => original_max_position_embeddings,
            other => panic!("{fixture}: {other:?}"),
        }
    };
    let top = "original_max_position_embeddings";
    let phi3_without_top = original("phi3", &|c| {
        c.as_object_mut().unwrap().remove(top);
    });
    assert_eq!(phi3_without_top, 4096);
    let phi3_both = original("phi3", &|c| {
        c[top] = 100.into();
        c["rope_parameters"][top] = 200.into();
    });
    assert_eq!(phi3_both, 100);
    let llama_both = original("llama-rope-llama3", &|c| c[top] = 100.into());
    assert_eq!(llama_both, 64);
    let llama_top_only = original("llama-rope-llama3", &|c| {
        c[top] = 100.into();
        c["max_position_embeddings"] = 1000.into();
        c["rope_parameters"].as_object_mut().unwrap().remove(top);
    });
    assert_eq!(llama_top_only, 1000);
}

#[test]
fn qwen2_moe_routes_beside_a_gated_shared_expert() {
    let c = config("Qwen2-57B-A14B");
    let moe = c.moe.expect("routed experts");
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_intermediate),
        (64, 8, 2560)
    );
    assert_eq!(moe.shared_intermediate, Some(20480));
    assert!(moe.shared_gate && !moe.normalize_top_k);
    assert!(c.qkv_bias && c.sliding_layers.iter().all(Option::is_none));
}
