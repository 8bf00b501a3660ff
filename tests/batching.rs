//! Requests that share the engine's steps (one batched forward a step, a prompt's prefill
//! beside the others' decode steps) get the tokens each gets alone.

use bevy_ecs::entity::Entity;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vibee_core::serving::pipeline::{request_bundle, SamplingParams, SeqState, Tokens};
use vibee_core::serving::runner;
use vibee_tests::{fixture, load};

const PLUGINS: &str = "gqa,rope,rmsnorm,swiglu,sampler";

/// Greedy decoding of `max_tokens` new tokens, past end-of-sequence tokens.
fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// Three prompts of 8, 3 and 12 tokens, generating `lengths` tokens.
fn three(lengths: [usize; 3]) -> Vec<(Vec<u32>, SamplingParams)> {
    let prompts = [
        vec![1, 17, 42, 99, 5, 200, 31, 8],
        vec![1, 250, 3],
        vec![1, 64, 128, 12, 77, 301, 2, 9, 44, 45, 46, 300],
    ];
    prompts.into_iter().zip(lengths.map(greedy)).collect()
}

/// Each request's tokens when it runs alone, in an engine of its own.
fn alone(requests: &[(Vec<u32>, SamplingParams)]) -> Vec<Vec<u32>> {
    requests
        .iter()
        .map(|(prompt, params)| {
            let mut engine = load(&fixture("llama-gqa"), PLUGINS).unwrap();
            runner::generate(&mut engine.app, prompt.clone(), params.clone())
                .unwrap()
                .tokens
        })
        .collect()
}

/// llama-gqa with the KV-cache plugin `kv` configured as `config`.
fn with_kv(kv: &str, config: &str) -> vibee_core::Engine {
    let configs =
        vibee_core::serving::external::PluginConfigs([(kv.to_string(), config.to_string())].into());
    vibee_core::Engine::load(
        &fixture("llama-gqa"),
        &vibee_tests::plugins(&format!("{PLUGINS},{kv}")),
        &vibee_core::Registry::builtin(),
        &vibee_cli::builtin_plugins(),
        &configs,
    )
    .unwrap()
}

#[test]
fn requests_batched_in_one_engine_generate_what_each_generates_alone() {
    // Different lengths, so requests finish at different steps and the others go on.
    let requests = three([12, 5, 9]);
    let alone = alone(&requests);
    let mut engine = load(&fixture("llama-gqa"), PLUGINS).unwrap();
    let mut entities = vec![engine
        .app
        .world
        .spawn(request_bundle(requests[0].0.clone(), requests[0].1.clone()))
        .id()];
    // The others join while the first decodes.
    for _ in 0..2 {
        engine.app.step();
    }
    for (prompt, params) in requests.iter().skip(1) {
        let bundle = request_bundle(prompt.clone(), params.clone());
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
    let engine = || with_kv("paged-kv", "block=4,blocks=8");
    // 20, 8 and 21 tokens at the end: 5 + 2 + 6 blocks of 4 where the pool holds 8.
    let requests = three([12, 5, 9]);
    let alone = alone(&requests);
    let mut shared = engine();
    let mut all = requests.clone();
    // 36 prompt tokens need 9 blocks: never, in a pool of 8.
    all.push(((1..37).collect(), greedy(2)));
    let results = runner::generate_many(&mut shared.app, all);
    for (result, expected) in results.iter().zip(&alone) {
        assert_eq!(&result.as_ref().unwrap().tokens, expected);
    }
    let refused = format!("{:#}", results[3].as_ref().unwrap_err());
    assert!(
        refused.contains("9 more blocks of 4 tokens are needed") && refused.contains("pool's 8"),
        "{refused}"
    );
    let metrics = shared
        .app
        .world
        .resource::<vibee_core::serving::pipeline::Metrics>();
    assert!(metrics.preempted > 0, "the pool never ran short");
    let usage = shared.model.kv_usage().unwrap();
    assert_eq!((usage.blocks_in_use, usage.capacity), (0, 8));
}

/// Prompts prefilled in chunks under a per-step token budget, beside the others' decode
/// steps, and at most two requests a step: each request still gets what it gets alone.
#[test]
fn chunked_prefill_under_a_step_budget_gives_each_request_its_own_tokens() {
    let requests = three([6, 4, 5]);
    let alone = alone(&requests);
    let mut shared = load(&fixture("llama-gqa"), PLUGINS).unwrap();
    shared
        .app
        .world
        .insert_resource(vibee_core::serving::pipeline::StepBudget {
            max_num_batched_tokens: 5,
            max_num_seqs: 2,
        });
    let results = runner::generate_many(&mut shared.app, requests);
    for (result, expected) in results.iter().zip(&alone) {
        assert_eq!(&result.as_ref().unwrap().tokens, expected);
    }
    let metrics = shared
        .app
        .world
        .resource::<vibee_core::serving::pipeline::Metrics>();
    assert_eq!(metrics.largest_step_tokens, 5);
}

/// One request a step: first come first served runs the first request's whole generation
/// before the second starts; the priority policy runs the lower `priority` first.
#[test]
fn the_priority_policy_serves_lower_priority_values_first() {
    use vibee_core::serving::pipeline::StepBudget;
    let params = |priority| SamplingParams {
        temperature: 0.0,
        max_tokens: 6,
        ignore_eos: true,
        priority,
        ..SamplingParams::default()
    };
    let order = |policy: &str| {
        let mut engine = load(&fixture("llama-gqa"), &format!("{PLUGINS},{policy}")).unwrap();
        engine.app.world.insert_resource(StepBudget {
            max_num_seqs: 1,
            ..StepBudget::default()
        });
        let requests = vec![(vec![1, 17, 42], params(5)), (vec![1, 250, 3], params(-1))];
        let out: Vec<_> = runner::generate_many(&mut engine.app, requests)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        out[0].time_to_first_token_s < out[1].time_to_first_token_s
    };
    assert!(order("fcfs"), "FCFS serves the first request first");
    assert!(!order("priority"), "priority -1 goes before 5");
}

/// A request whose prompt starts as an earlier one's takes that request's cached blocks and
/// generates what it generates alone; in a pool too small to keep them all, cached blocks no
/// request holds make room (least recently used first) and nothing fails.
#[test]
fn a_prefix_cache_hit_generates_what_a_miss_does_and_evicts_when_short() {
    let shared_prefix: Vec<u32> = vec![1, 17, 42, 99, 5, 200, 31, 8, 64, 128, 12, 77];
    let mut second = shared_prefix.clone();
    second.extend([301, 2, 9]);
    let expected = alone(&[(second.clone(), greedy(6))]).remove(0);
    for blocks in [64, 6] {
        let mut cached = with_kv("prefix-cache", &format!("block=4,blocks={blocks}"));
        runner::generate(&mut cached.app, shared_prefix.clone(), greedy(6)).unwrap();
        let hit = runner::generate(&mut cached.app, second.clone(), greedy(6)).unwrap();
        assert_eq!(hit.tokens, expected, "pool of {blocks}");
        let metrics = cached
            .app
            .world
            .resource::<vibee_core::serving::pipeline::Metrics>();
        assert_eq!(metrics.prefix_hit_tokens, 12, "pool of {blocks}");
        // A third, unrelated request needs the room the cache holds.
        let other: Vec<u32> = (100..118).collect();
        runner::generate(&mut cached.app, other, greedy(6)).unwrap();
        let usage = cached.model.kv_usage().unwrap();
        assert!(usage.blocks_in_use <= blocks, "{usage:?}");
    }
    // Blocks that hold generated tokens are cached under those tokens too.
    let mut cached = with_kv("prefix-cache", "block=4,blocks=64");
    let first = runner::generate(&mut cached.app, shared_prefix.clone(), greedy(6)).unwrap();
    let mut continued = shared_prefix.clone();
    continued.extend(&first.tokens[..4]);
    continued.push(7);
    let expected_continued = alone(&[(continued.clone(), greedy(3))]).remove(0);
    let hit = runner::generate(&mut cached.app, continued, greedy(3)).unwrap();
    assert_eq!(hit.tokens, expected_continued);
    let metrics = cached
        .app
        .world
        .resource::<vibee_core::serving::pipeline::Metrics>();
    assert_eq!(metrics.prefix_hit_tokens, 16);
    // Another tenant's salt shares nothing, the same salt does.
    let mut cached = with_kv("prefix-cache", "block=4,blocks=64");
    let salted = |salt: &str| SamplingParams {
        cache_salt: Some(salt.into()),
        ..greedy(6)
    };
    runner::generate(&mut cached.app, shared_prefix.clone(), salted("a")).unwrap();
    let hit_tokens = |app: &vibee_core::App| {
        app.world
            .resource::<vibee_core::serving::pipeline::Metrics>()
            .prefix_hit_tokens
    };
    let other = runner::generate(&mut cached.app, second.clone(), salted("b")).unwrap();
    assert_eq!(
        (other.tokens.clone(), hit_tokens(&cached.app)),
        (expected.clone(), 0)
    );
    runner::generate(&mut cached.app, second.clone(), salted("a")).unwrap();
    assert_eq!(hit_tokens(&cached.app), 12);
}

/// A request cancelled between steps (its entity despawned, as a server does when the client
/// goes away) gives its blocks back at once; the others go on.
#[test]
fn a_cancelled_request_frees_its_blocks_at_the_step_boundary() {
    let mut engine = with_kv("paged-kv", "block=4,blocks=32");
    let requests = three([20, 20, 20]);
    let ids: Vec<_> = requests
        .iter()
        .map(|(prompt, params)| {
            let bundle = request_bundle(prompt.clone(), params.clone());
            engine.app.world.spawn(bundle).id()
        })
        .collect();
    for _ in 0..3 {
        engine.app.step();
    }
    let held = engine.model.kv_usage().unwrap().blocks_in_use;
    engine.app.world.despawn(ids[2]);
    let after = engine.model.kv_usage().unwrap().blocks_in_use;
    // The third request held its 12 prompt tokens and 2 new ones: 4 blocks.
    assert_eq!(held - after, 4);
    for _ in 0..40 {
        engine.app.step();
    }
    for id in &ids[..2] {
        let state = engine.app.world.get::<SeqState>(*id).unwrap();
        assert!(matches!(state, SeqState::Finished(_)), "{state:?}");
    }
}

/// One request of a schedule: its prompt and length, the step it arrives at, and the step the
/// client goes away at, if it does.
struct Planned {
    prompt: Vec<u32>,
    params: SamplingParams,
    arrives: usize,
    cancelled: Option<usize>,
}

/// The logits each generated token was sampled from, and the tokens, as the engine steps.
#[derive(Default, Clone)]
struct Trace {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Records the token and logits of every request that gained a token this step.
fn record(app: &vibee_core::App, ids: &[Option<Entity>], traces: &mut [Trace]) {
    use vibee_core::serving::pipeline::Logits;
    for (id, trace) in ids.iter().zip(traces.iter_mut()) {
        let Some(id) = id else { continue };
        let Some(tokens) = app.world.get::<Tokens>(*id) else {
            continue;
        };
        if tokens.generated.len() > trace.tokens.len() {
            assert_eq!(
                tokens.generated.len(),
                trace.tokens.len() + 1,
                "one token a step"
            );
            trace.tokens = tokens.generated.clone();
            trace
                .logits
                .push(app.world.get::<Logits>(*id).unwrap().0.clone());
        }
    }
}

fn finished(app: &vibee_core::App, id: Entity) -> bool {
    matches!(
        app.world.get::<SeqState>(id),
        Some(SeqState::Finished(_) | SeqState::Failed(_))
    )
}

/// Batch invariance over seeded random schedules: requests of random lengths arrive at random
/// steps, some share a prefix, some are cancelled; a small pool forces preemption and a small
/// step budget chunks prefills. Every request's tokens and the logits each was sampled from are
/// bit-identical to the request run alone, and afterwards every block is back in the pool.
#[test]
fn random_schedules_give_every_request_its_own_tokens_and_logits_bit_for_bit() {
    let mut alone_engine = load(&fixture("llama-gqa"), PLUGINS).unwrap();
    let mut alone = |prompt: &[u32], params: &SamplingParams| {
        let app = &mut alone_engine.app;
        let id = app
            .world
            .spawn(request_bundle(prompt.to_vec(), params.clone()))
            .id();
        let mut trace = [Trace::default()];
        while !finished(app, id) {
            app.step();
            record(app, &[Some(id)], &mut trace);
        }
        app.world.despawn(id);
        trace[0].clone()
    };
    let (mut preempted, mut hits, mut cancelled) = (0, 0, 0);
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut below = |n: usize| rng.random_range(0..n);
        let kv = ["paged-kv", "prefix-cache"][below(2)];
        let blocks = 8 + below(12);
        let shared_prefix: Vec<u32> = (0..8).map(|_| 1 + below(380) as u32).collect();
        let planned: Vec<Planned> = (0..3 + below(5))
            .map(|_| {
                let mut prompt: Vec<u32> = match below(2) {
                    0 => shared_prefix[..1 + below(8)].to_vec(),
                    _ => Vec::new(),
                };
                prompt.extend((0..1 + below(8)).map(|_| 1 + below(380) as u32));
                Planned {
                    prompt,
                    params: greedy(1 + below(8)),
                    arrives: below(6),
                    cancelled: (below(5) == 0).then(|| 1 + below(10)),
                }
            })
            .collect();
        let mut engine = with_kv(kv, &format!("block=4,blocks={blocks}"));
        engine
            .app
            .world
            .insert_resource(vibee_core::serving::pipeline::StepBudget {
                max_num_batched_tokens: 4 + below(24),
                max_num_seqs: 1 + below(4),
            });
        let mut ids = vec![None; planned.len()];
        let mut traces = vec![Trace::default(); planned.len()];
        for step in 0..400 {
            for (p, id) in planned.iter().zip(ids.iter_mut()) {
                if p.arrives == step {
                    let bundle = request_bundle(p.prompt.clone(), p.params.clone());
                    *id = Some(engine.app.world.spawn(bundle).id());
                }
                if p.cancelled == Some(step) {
                    if let Some(id) = id.take() {
                        engine.app.world.despawn(id);
                    }
                }
            }
            let arrived = planned.iter().all(|p| p.arrives <= step);
            let done = ids.iter().flatten().all(|id| finished(&engine.app, *id));
            if arrived && done {
                break;
            }
            engine.app.step();
            record(&engine.app, &ids, &mut traces);
        }
        for (i, (p, got)) in planned.iter().zip(&traces).enumerate() {
            let want = alone(&p.prompt, &p.params);
            let context = format!("seed {seed}, request {i} ({kv}, {blocks} blocks)");
            if let Some(id) = ids[i] {
                let state = engine.app.world.get::<SeqState>(id).unwrap();
                assert!(
                    matches!(state, SeqState::Finished(_)),
                    "{context}: {state:?}"
                );
                assert_eq!(got.tokens, want.tokens, "{context}");
            }
            // A cancelled request got the first tokens it gets alone, from the same logits.
            assert_eq!(got.tokens[..], want.tokens[..got.tokens.len()], "{context}");
            for (j, logits) in got.logits.iter().enumerate() {
                assert!(logits == &want.logits[j], "{context}: logits of token {j}");
            }
        }
        let metrics = engine
            .app
            .world
            .resource::<vibee_core::serving::pipeline::Metrics>();
        preempted += metrics.preempted;
        hits += metrics.prefix_hit_tokens;
        cancelled += ids.iter().filter(|id| id.is_none()).count();
        for id in ids.into_iter().flatten() {
            engine.app.world.despawn(id);
        }
        let usage = engine.model.kv_usage().unwrap();
        if kv == "paged-kv" {
            assert_eq!(usage.blocks_in_use, 0, "seed {seed}: {usage:?}");
        }
        // Every block can be had again: a request as long as the whole pool runs.
        let whole: Vec<u32> = (1..(blocks * 4) as u32).collect();
        let result = runner::generate(&mut engine.app, whole, greedy(1));
        assert!(result.is_ok(), "seed {seed}: {result:?}");
    }
    // The schedules did what they are for.
    assert!(
        preempted > 0 && hits > 0 && cancelled > 0,
        "{preempted} {hits} {cancelled}"
    );
}

/// Truncation gives back the blocks past the cut; a fork shares every block and takes one of
/// its own only when it writes into a shared, partly filled one; all come back at the end.
#[test]
fn truncating_and_forking_count_the_blocks_each_sequence_holds() {
    let engine = with_kv("paged-kv", "block=4,blocks=16");
    let model = &engine.model;
    let used = || model.kv_usage().unwrap().blocks_in_use;
    let mut kv = model.new_sequence();
    let prompt: Vec<u32> = (1..11).collect();
    model.forward(&prompt, kv.as_mut(), false).unwrap();
    assert_eq!(used(), 3, "10 tokens in blocks of 4");
    kv.truncate(5);
    assert_eq!((used(), kv.len(0)), (2, 5));
    let mut child = kv.fork();
    assert_eq!((used(), child.len(0)), (2, 5));
    model.forward(&[7], child.as_mut(), false).unwrap();
    assert_eq!(
        used(),
        3,
        "the fork copied the partly filled block it wrote into"
    );
    model.forward(&[8, 9, 10], kv.as_mut(), false).unwrap();
    assert_eq!(
        used(),
        3,
        "the original's partly filled block is its own again"
    );
    drop(child);
    assert_eq!(used(), 2);
    drop(kv);
    assert_eq!(used(), 0);
}
