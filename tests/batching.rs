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

/// A pool too small for every request at once: the newest give their blocks back and wait,
/// are recomputed when there is room, and still generate what each generates alone; a request
/// the whole pool cannot hold fails with the numbers; every block is back in the pool after.
#[test]
fn a_full_kv_pool_preempts_the_newest_and_loses_no_request() {
    let plugins = "gqa,rope,rmsnorm,swiglu,sampler,paged-kv";
    let configs = vibee_core::external::PluginConfigs(
        [("paged-kv".to_string(), "block=4,blocks=8".to_string())].into(),
    );
    let engine = || {
        vibee_core::Engine::load(
            &fixture("llama-gqa"),
            &vibee_tests::plugins(plugins),
            &vibee_core::Registry::builtin(),
            &vibee_cli::builtin_plugins(),
            &configs,
        )
        .unwrap()
    };
    let params = |max_tokens| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    // 20, 8 and 21 tokens at the end: 5 + 2 + 6 blocks of 4 where the pool holds 8.
    let requests = vec![
        (vec![1, 17, 42, 99, 5, 200, 31, 8], params(12)),
        (vec![1, 250, 3], params(5)),
        (
            vec![1, 64, 128, 12, 77, 301, 2, 9, 44, 45, 46, 300],
            params(9),
        ),
    ];
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|(prompt, p)| {
            let mut e = engine();
            runner::generate(&mut e.app, prompt.clone(), p.clone())
                .unwrap()
                .tokens
        })
        .collect();
    let mut shared = engine();
    let mut all = requests.clone();
    // 36 prompt tokens need 9 blocks: never, in a pool of 8.
    all.push(((1..37).collect(), params(2)));
    let results = runner::generate_many(&mut shared.app, all);
    for (result, expected) in results.iter().zip(&alone) {
        assert_eq!(&result.as_ref().unwrap().tokens, expected);
    }
    let refused = format!("{:#}", results[3].as_ref().unwrap_err());
    assert!(
        refused.contains("9 more blocks of 4 tokens are needed") && refused.contains("pool's 8"),
        "{refused}"
    );
    let metrics = shared.app.world.resource::<vibee_core::pipeline::Metrics>();
    assert!(metrics.preempted > 0, "the pool never ran short");
    let usage = shared.model.kv_usage().unwrap();
    assert_eq!((usage.blocks_in_use, usage.capacity), (0, 8));
}

/// Prompts prefilled in chunks under a per-step token budget, beside the others' decode
/// steps, and at most two requests a step: each request still gets what it gets alone.
#[test]
fn chunked_prefill_under_a_step_budget_gives_each_request_its_own_tokens() {
    let plugins = "gqa,rope,rmsnorm,swiglu,sampler";
    let params = |max_tokens| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let requests = vec![
        (vec![1, 17, 42, 99, 5, 200, 31, 8], params(6)),
        (vec![1, 250, 3], params(4)),
        (
            vec![1, 64, 128, 12, 77, 301, 2, 9, 44, 45, 46, 300],
            params(5),
        ),
    ];
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|(prompt, p)| {
            let mut e = load(&fixture("llama-gqa"), plugins).unwrap();
            runner::generate(&mut e.app, prompt.clone(), p.clone())
                .unwrap()
                .tokens
        })
        .collect();
    let mut shared = load(&fixture("llama-gqa"), plugins).unwrap();
    shared
        .app
        .world
        .insert_resource(vibee_core::pipeline::StepBudget {
            max_num_batched_tokens: 5,
            max_num_seqs: 2,
            ..Default::default()
        });
    let results = runner::generate_many(&mut shared.app, requests);
    for (result, expected) in results.iter().zip(&alone) {
        assert_eq!(&result.as_ref().unwrap().tokens, expected);
    }
    let metrics = shared.app.world.resource::<vibee_core::pipeline::Metrics>();
    assert_eq!(metrics.largest_step_tokens, 5);
}

/// One request a step: first come first served runs the first request's whole generation
/// before the second starts; the priority policy runs the lower `priority` first.
#[test]
fn the_priority_policy_serves_lower_priority_values_first() {
    use vibee_core::pipeline::{SchedulingPolicy, StepBudget};
    let params = |priority| SamplingParams {
        temperature: 0.0,
        max_tokens: 6,
        ignore_eos: true,
        priority,
        ..SamplingParams::default()
    };
    let order = |policy| {
        let mut engine = load(&fixture("llama-gqa"), "gqa,rope,rmsnorm,swiglu,sampler").unwrap();
        engine.app.world.insert_resource(StepBudget {
            max_num_seqs: 1,
            policy,
            ..StepBudget::default()
        });
        let requests = vec![(vec![1, 17, 42], params(5)), (vec![1, 250, 3], params(-1))];
        let out: Vec<_> = runner::generate_many(&mut engine.app, requests)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        out[0].time_to_first_token_s < out[1].time_to_first_token_s
    };
    assert!(
        order(SchedulingPolicy::Fcfs),
        "FCFS serves the first request first"
    );
    assert!(
        !order(SchedulingPolicy::Priority),
        "priority -1 goes before 5"
    );
}
