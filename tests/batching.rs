//! Requests that share the engine's steps (one batched forward a step, a prompt's prefill
//! beside the others' decode steps) get the tokens each gets alone.

use vibee_core::pipeline::{request_bundle, SamplingParams, SeqState, Tokens};
use vibee_core::runner;
use vibee_tests::{fixture, load};

#[test]
fn requests_batched_in_one_engine_generate_what_each_generates_alone() {
    let plugins = "gqa,rope,rmsnorm,swiglu,sampler";
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 17, 42, 99, 5, 200, 31, 8],
        vec![1, 250, 3],
        vec![1, 64, 128, 12, 77, 301, 2, 9, 44, 45, 46, 300],
    ];
    let params = |max_tokens| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    // Different lengths, so requests finish at different steps and the others go on.
    let lengths = [12, 5, 9];
    let mut alone = Vec::new();
    for (prompt, &n) in prompts.iter().zip(&lengths) {
        let mut engine = load(&fixture("llama-gqa"), plugins).unwrap();
        alone.push(
            runner::generate(&mut engine.app, prompt.clone(), params(n))
                .unwrap()
                .tokens,
        );
    }
    let mut engine = load(&fixture("llama-gqa"), plugins).unwrap();
    let first = request_bundle(prompts[0].clone(), params(lengths[0]));
    let mut entities = vec![engine.app.world.spawn(first).id()];
    // The others join while the first decodes.
    for _ in 0..2 {
        engine.app.step();
    }
    for (prompt, &n) in prompts.iter().zip(&lengths).skip(1) {
        let bundle = request_bundle(prompt.clone(), params(n));
        entities.push(engine.app.world.spawn(bundle).id());
    }
    for _ in 0..64 {
        let done = entities.iter().all(|e| {
            matches!(
                engine.app.world.get::<SeqState>(*e),
                Some(SeqState::Finished(_))
            )
        });
        if done {
            break;
        }
        engine.app.step();
    }
    for (entity, expected) in entities.iter().zip(&alone) {
        let state = engine.app.world.get::<SeqState>(*entity).unwrap().clone();
        assert!(matches!(state, SeqState::Finished(_)), "{state:?}");
        let tokens = engine.app.world.get::<Tokens>(*entity).unwrap();
        assert_eq!(&tokens.generated, expected);
    }
}
