//! Streamed text: what the pipeline decodes token by token (waiting out characters split
//! across byte-level tokens, and runs of SentencePiece byte-fallback tokens, which decode
//! together), joined, is the tokenizer's decoding of the whole continuation.

use vibee_core::serving::pipeline::SamplingParams;
use vibee_core::serving::runner;
use vibee_tests::{fixture, load};

#[test]
fn streamed_text_joins_to_the_decoded_continuation() {
    for name in ["llama-gqa", "gemma", "gpt2", "qwen2", "gguf-llama-spm"] {
        let dir = fixture(name);
        let mut engine = load(&dir, "auto").unwrap();
        let tokenizer = engine.tokenizer.clone().unwrap();
        for seed in 0..4 {
            let params = SamplingParams {
                seed,
                max_tokens: 40,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            let mut streamed = String::new();
            let out = runner::generate_streaming(&mut engine.app, vec![1, 5, 9], params, |s| {
                streamed.push_str(&s.text)
            })
            .unwrap();
            let whole = tokenizer.decode(&out.tokens).unwrap();
            assert_eq!(streamed, whole, "{name}, seed {seed}: {:?}", out.tokens);
            assert_eq!(out.text.as_deref(), Some(whole.as_str()));
        }
    }
}
