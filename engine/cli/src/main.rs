//! `vibee`: run, benchmark and inspect models and the spec registry.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vibee_architectures::arch_search::arch_calc::{self, Dtype};
use vibee_cli::{builtin_model_dir, catalog, load_external};
use vibee_core::app::registry::{SpecEntry, FAMILIES};
use vibee_core::io::tokenizer::ChatMessage;
use vibee_core::serving::external::{find_external, PluginConfigs};
use vibee_core::serving::pipeline::{SamplingParams, StepBudget};
use vibee_core::serving::reload::{PipelineFile, Reloader, Watch};
use vibee_core::Plugin;
use vibee_core::Registry;
use vibee_core::{serving::runner, Engine};

#[derive(Parser)]
#[command(
    name = "vibee",
    version,
    about = "A modular LLM engine: every technique is a plugin tied to a numbered spec"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// List the spec registry.
    Specs(SpecsArgs),
    /// Measure prefill and decode speed.
    Bench(BenchArgs),
    /// How far a model's next-token distributions are from a reference model's (KL
    /// divergence, relative logit error, top-1 agreement): quantization quality.
    Divergence(DivergenceArgs),
    /// Quantize a checkpoint directory into a new one that loads back (AutoAWQ's layout for
    /// q4/awq, GPTQ's for int8/gptq).
    Quantize(QuantizeArgs),
    /// Run specs' conformance cases and report pass/fail.
    Conformance(ConformanceArgs),
    /// Size an architecture: parameters, FLOPs/token, KV cache, memory, compute-optimal data.
    Arch(ArchArgs),
    /// Score predictions against references, line by line, with an eval-metric plugin.
    Score(ScoreArgs),
    /// Create a third-party plugin crate on vibee-sdk that builds and passes its conformance
    /// case as generated.
    NewPlugin(NewPluginArgs),
}

#[derive(Args)]
struct ScoreArgs {
    /// The eval metric's name (a plugin loaded with --plugin-path).
    #[arg(long)]
    metric: String,
    #[command(flatten)]
    external: ExternalArgs,
    /// One prediction per line.
    #[arg(long)]
    predictions: PathBuf,
    /// One reference per line, paired with the predictions.
    #[arg(long)]
    references: PathBuf,
    /// Print one JSON object with every line's score.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct NewPluginArgs {
    /// The plugin's name (lowercase letters, digits, dashes); also the crate's directory.
    name: String,
    #[arg(long, value_enum)]
    kind: vibee_cli::scaffold::Kind,
    /// Where to create the crate.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The vibee-sdk crate to depend on (default: engine/sdk of this repository).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk"))]
    sdk: PathBuf,
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors + tokenizer.json) or llama.cpp GGUF
    /// file; the built-in tiny random-weight model when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Comma-separated plugins, or `auto` for what the checkpoint needs.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    plugins: Vec<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Keep keys and values in one paged pool of this many GB shared by all requests (the
    /// `paged-kv` plugin, `memory=GB`).
    #[arg(long)]
    kv_memory: Option<f64>,
    /// Tokens one engine step runs over all requests; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = StepBudget::default().max_num_batched_tokens)]
    max_num_batched_tokens: usize,
    /// Requests one engine step runs.
    #[arg(long, default_value_t = StepBudget::default().max_num_seqs)]
    max_num_seqs: usize,
    /// Which requests a step serves first: `fcfs`, or `priority` (each request's `priority`,
    /// lower first, then first come): the plugin of that name.
    #[arg(long, default_value = "fcfs", value_parser = ["fcfs", "priority"])]
    scheduling_policy: String,
    #[command(flatten)]
    external: ExternalArgs,
}

#[derive(Args, Clone)]
struct ExternalArgs {
    /// A third-party plugin library, or a directory of them, to load (repeatable); its
    /// plugins can then be named in --plugins.
    #[arg(long = "plugin-path")]
    paths: Vec<PathBuf>,
    /// Configuration for a third-party plugin, NAME=CONFIG (repeatable).
    #[arg(long = "plugin-config", value_parser = parse_plugin_config)]
    configs: Vec<(String, String)>,
    /// Reload a third-party library when it is rebuilt in place, and load new libraries that
    /// appear in a --plugin-path directory, at the next engine step.
    #[arg(long)]
    watch: bool,
    /// A RON file `(plugins: [...], configs: {"name": "..."})` of pipeline-level plugins to
    /// run; editing it while vibee runs enables, disables and reconfigures them at the next
    /// engine step.
    #[arg(long)]
    pipeline: Option<PathBuf>,
}

fn parse_plugin_config(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, config)| (name.to_string(), config.to_string()))
        .ok_or_else(|| format!("`{text}` is not NAME=CONFIG"))
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Many requests at once, one JSON object a line: `prompt` (text) or `prompt_ids`, and
    /// any sampling field (`max_tokens`, `temperature`, `top_p`, `seed`, …; the others come
    /// from this command's flags). Prints one `--json` result a line, in input order.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids", "chat"])]
    prompts: Option<PathBuf>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Send --prompt as a user message through the model's chat template.
    #[arg(long, conflicts_with = "prompt_ids")]
    chat: bool,
    /// A system message to put before the user message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Always take the most likely token (temperature 0).
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object: tokens, text and timings.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SpecsArgs {
    #[arg(long)]
    family: Option<String>,
    /// Also list the third-party plugins in this library or directory (repeatable).
    #[arg(long = "plugin-path")]
    plugin_paths: Vec<PathBuf>,
    /// implemented or planned
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Runs to take the best of.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Measure the first run too, instead of running one unmeasured first (as llama-bench's
    /// warm-up does) so that no run pays for first use: pages not yet in memory, allocations.
    #[arg(long)]
    no_warmup: bool,
    /// Requests run at once, one level after another (e.g. `1,8,32`): each level's aggregate
    /// and per-sequence speeds, the requests sharing every step's batched forward.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DivergenceArgs {
    /// The model measured (e.g. with `--plugins auto,int8`, or a quantized GGUF file).
    #[command(flatten)]
    model: ModelArgs,
    /// The reference checkpoint (e.g. the f32 weights).
    #[arg(long)]
    reference: PathBuf,
    /// The reference's plugins.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    reference_plugins: Vec<String>,
    /// Tokens fed to both (the same deterministic ids `vibee bench` uses, or the first of
    /// --text).
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Measure on this text (tokenized by the model's tokenizer) instead of spread ids.
    #[arg(long)]
    text: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QuantizeArgs {
    /// int8, q4, awq, gptq or hqq.
    #[arg(long)]
    method: String,
    /// The full-precision checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// The new directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Calibration text file (awq, gptq).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration tokens used at most.
    #[arg(long, default_value_t = 2048)]
    calib_tokens: usize,
    /// Memory for calibration statistics, in GB: layers calibrate in windows that fit, one
    /// pass over the text per window.
    #[arg(long, default_value_t = 8.0)]
    calib_memory_gb: f64,
    /// Weights per quantization group (q4, awq, gptq, hqq): 32, 64 or 128.
    #[arg(long, default_value_t = 128)]
    group: usize,
    /// GPTQ's bit width: 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// GPTQ: quantize input features in decreasing order of activation energy (desc_act).
    #[arg(long)]
    act_order: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct ConformanceArgs {
    /// One spec, by id (v2202) or name (gqa).
    #[arg(long)]
    spec: Option<String>,
    /// Every implemented spec of one family.
    #[arg(long)]
    family: Option<String>,
    /// Backend to run on: cpu (the only one in this build) or all.
    #[arg(long, default_value = "all")]
    device: String,
    /// Repository root holding specs/ and tests/fixtures/ (the paths cases name).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Run the cases a third-party plugin library ships (repeatable) instead of the
    /// built-in specs'.
    #[arg(long = "plugin", conflicts_with_all = ["spec", "family"])]
    plugins: Vec<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the results as JUnit XML to this file.
    #[arg(long)]
    junit: Option<PathBuf>,
}

#[derive(Args)]
struct ArchArgs {
    /// A Hugging Face config.json.
    #[arg(long, conflicts_with_all = ["hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "head_dim", "experts", "experts_per_token", "tied"])]
    config: Option<PathBuf>,
    /// Hidden size of a Llama-style decoder given by flags (RMSNorm, SwiGLU, no biases).
    #[arg(long)]
    hidden: Option<u64>,
    /// Decoder layers.
    #[arg(long)]
    layers: Option<u64>,
    /// Attention (query) heads.
    #[arg(long)]
    heads: Option<u64>,
    /// Key/value heads (default: one per head; with --sweep, GQA with this many).
    #[arg(long)]
    kv_heads: Option<u64>,
    /// Feed-forward width (of each expert, with --experts).
    #[arg(long)]
    intermediate: Option<u64>,
    /// Vocabulary size (with --sweep: default 32000).
    #[arg(long)]
    vocab: Option<u64>,
    /// Default: hidden / heads.
    #[arg(long)]
    head_dim: Option<u64>,
    /// Routed experts in every layer (Mixtral-style).
    #[arg(long)]
    experts: Option<u64>,
    /// Routed experts each token runs through (top-k).
    #[arg(long)]
    experts_per_token: Option<u64>,
    /// The lm_head shares the embedding matrix.
    #[arg(long)]
    tied: bool,
    /// Positions a decoded token attends to, and the KV length per sequence for memory.
    #[arg(long, default_value_t = 2048)]
    context: u64,
    /// Tokens in the prefill FLOPs estimate.
    #[arg(long, default_value_t = 512)]
    prompt: u64,
    /// Sequences held in the KV cache for the memory estimate.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Weights' dtype: f32, f16, bf16 or int8.
    #[arg(long, default_value = "bf16")]
    dtype: Dtype,
    /// KV-cache dtype: f32, f16, bf16 or int8 (default: --dtype).
    #[arg(long)]
    kv_dtype: Option<Dtype>,
    /// A training compute budget (e.g. 1e23): its compute-optimal parameters and tokens.
    #[arg(long, value_parser = arch_calc::parse_quantity)]
    flops: Option<f64>,
    /// Llama-style shapes within ±10% of this many parameters (e.g. 7e9 or 7B).
    #[arg(long, value_parser = arch_calc::parse_quantity, conflicts_with_all = ["config", "hidden", "layers", "heads", "intermediate", "head_dim", "experts", "experts_per_token", "flops", "prompt", "batch"])]
    sweep: Option<f64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIBEE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Specs(args) => specs(args),
        Command::Bench(args) => bench(args),
        Command::Divergence(args) => divergence(args),
        Command::Quantize(args) => quantize(args),
        Command::Conformance(args) => conformance(args),
        Command::Arch(args) => arch(args),
        Command::Score(args) => score(args),
        Command::NewPlugin(args) => {
            let root =
                vibee_cli::scaffold::new_plugin(&args.name, args.kind, &args.dir, &args.sdk)?;
            println!(
                "created {}: build it with `cargo build --release` there, then run \
                 `vibee conformance --root {} --plugin {}/target/release/{}{}{}`",
                root.display(),
                root.display(),
                root.display(),
                std::env::consts::DLL_PREFIX,
                args.name.replace('-', "_"),
                std::env::consts::DLL_SUFFIX
            );
            Ok(())
        }
    }
}

/// Threads per available core that `--threads` accepts. A few more threads than cores can
/// make sense (a core count that under-reports, an experiment); far more only makes every
/// parallel section wait for the scheduler to get round to all of them.
const MAX_THREADS_PER_CORE: usize = 4;

/// Starts the global thread pool with `threads` workers (default: all cores).
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    // Without --threads, rayon (whose count the worker pool takes) reads RAYON_NUM_THREADS.
    let from_env = || {
        let n: usize = std::env::var("RAYON_NUM_THREADS")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (n > 0).then_some((n, "RAYON_NUM_THREADS="))
    };
    if let Some((threads, source)) = threads.map(|n| (n, "--threads ")).or_else(from_env) {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        let cores = vibee_core::backend::cpu::pool::available_cores();
        let limit = cores * MAX_THREADS_PER_CORE;
        if threads > limit {
            bail!(
                "{source}{threads} is more than this machine can use: it has {cores} cores \
                 available, and vibee runs at most {MAX_THREADS_PER_CORE} threads per core \
                 ({limit}); leave it out to use every core"
            );
        }
        if threads > cores {
            tracing::warn!(
                "{source}{threads} is more than the {cores} cores available: threads will \
                 share cores, which is usually slower than {source}{cores}"
            );
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    Ok(())
}

fn load(args: &ModelArgs) -> anyhow::Result<Engine> {
    set_threads(args.threads)?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => builtin_model_dir()?,
    };
    let started = Instant::now();
    let external = load_external(&args.external.paths)?;
    let watch = Watch {
        libraries: external
            .iter()
            .filter(|_| args.external.watch)
            .map(|p| (p.origin.clone(), p.spec().name))
            .collect(),
        directories: (args.external.paths.iter())
            .filter(|p| args.external.watch && p.is_dir())
            .cloned()
            .collect(),
        pipeline: args.external.pipeline.clone(),
    };
    let mut plugins = args.plugins.clone();
    let mut configs = PluginConfigs(args.external.configs.iter().cloned().collect());
    if let Some(file) = &args.external.pipeline {
        let file = PipelineFile::read(file)?;
        plugins.extend(file.plugins);
        configs.0.extend(file.configs);
    }
    // `fcfs` is the default that fills the slot when nothing else does.
    if args.scheduling_policy != "fcfs" && !plugins.contains(&args.scheduling_policy) {
        plugins.push(args.scheduling_policy.clone());
    }
    if let Some(gb) = args.kv_memory {
        if !plugins.iter().any(|p| p == "paged-kv") {
            plugins.push("paged-kv".into());
        }
        let paged = configs.0.entry("paged-kv".into()).or_default();
        if paged.contains("memory=") || paged.contains("blocks=") {
            bail!("--kv-memory and --plugin-config paged-kv={paged} both size the pool");
        }
        let sep = if paged.is_empty() { "" } else { "," };
        *paged = format!("{paged}{sep}memory={gb}");
    }
    if let Some(unknown) = configs.0.keys().find(|name| !plugins.contains(name)) {
        bail!("a configuration names `{unknown}`, which is not among the plugins");
    }
    let (registry, catalog) = catalog(external)?;
    if args.max_num_batched_tokens == 0 || args.max_num_seqs == 0 {
        bail!("--max-num-batched-tokens and --max-num-seqs must be at least 1");
    }
    let mut engine = Engine::load(&dir, &plugins, &registry, &catalog, &configs)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    engine.app.world.insert_resource(StepBudget {
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
    });
    if args.external.watch || args.external.pipeline.is_some() {
        Reloader::new(registry, catalog, watch)?.install(&mut engine.app);
    }
    tracing::info!(
        "loaded {} in {:.2}s with {:?}",
        dir.display(),
        started.elapsed().as_secs_f64(),
        engine
            .app
            .enabled()
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
    );
    Ok(engine)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut engine = load(&args.model)?;
    if let Some(file) = &args.prompts {
        return run_many(&mut engine, file, sampling(&args));
    }
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) if text.is_empty() => bail!("the prompt is empty: give some text"),
        (Some(text), None) => {
            let tokenizer = text_tokenizer(&engine, "pass --prompt-ids instead of --prompt")?;
            if args.chat {
                let message = |role: &str, content: &str| ChatMessage {
                    role: role.into(),
                    content: content.into(),
                };
                let mut messages: Vec<ChatMessage> =
                    args.system.iter().map(|s| message("system", s)).collect();
                messages.push(message("user", text));
                tokenizer.encode_chat(&messages, true)?
            } else {
                tokenizer.encode(text)?
            }
        }
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let params = sampling(&args);
    check_sampling(&params)?;
    if args.json {
        let out = runner::generate(&mut engine.app, prompt, params)?;
        println!("{}", serde_json::to_value(&out)?);
        return Ok(());
    }
    let has_text = engine.tokenizer.is_some();
    let out = runner::generate_streaming(&mut engine.app, prompt, params, |streamed| {
        if has_text {
            print!("{}", streamed.text);
        } else {
            print!("{} ", streamed.token);
        }
        let _ = std::io::stdout().flush();
    })?;
    println!();
    for flag in &out.flags {
        eprintln!("[flagged: {flag}]");
    }
    eprintln!(
        "[{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s, first token {:.3}s]",
        out.prompt_tokens,
        out.tokens.len(),
        out.finish_reason,
        out.prefill_tokens_per_s,
        out.decode_tokens_per_s,
        out.time_to_first_token_s
    );
    Ok(())
}

/// The model's tokenizer, or why text cannot be tokenized (`instead`: what to give instead).
fn text_tokenizer<'e>(
    engine: &'e Engine,
    instead: &str,
) -> anyhow::Result<&'e vibee_core::io::tokenizer::Tokenizer> {
    match (&engine.tokenizer, &engine.tokenizer_error) {
        (Some(tokenizer), _) => Ok(tokenizer),
        (None, Some(why)) => bail!("{why}"),
        (None, None) => bail!("this model has no tokenizer.json; {instead}"),
    }
}

fn sampling(args: &RunArgs) -> SamplingParams {
    SamplingParams {
        temperature: if args.greedy { 0.0 } else { args.temperature },
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        priority: 0,
        cache_salt: None,
    }
}

/// `vibee run --prompts FILE`: every line's request through one engine at once. A line that
/// cannot be read stops the command before anything runs, naming the line; a request that
/// fails while running gives its line an `error` and leaves the others be.
fn run_many(engine: &mut Engine, file: &Path, defaults: SamplingParams) -> anyhow::Result<()> {
    let text = vibee_core::io::read_regular_text(file, vibee_core::io::LARGE_FILE)?;
    let mut requests = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", file.display(), n + 1);
        let request = parse_request(engine, line, &defaults).with_context(at)?;
        check_sampling(&request.1).with_context(at)?;
        requests.push(request);
    }
    if requests.is_empty() {
        bail!("{} holds no requests", file.display());
    }
    for result in runner::generate_many(&mut engine.app, requests) {
        let line = match result {
            Ok(out) => serde_json::to_value(&out)?,
            Err(e) => json!({ "error": format!("{e:#}") }),
        };
        println!("{line}");
    }
    Ok(())
}

/// One line of a `--prompts` file: its prompt's ids and its sampling (the line's fields over
/// `defaults`).
fn parse_request(
    engine: &Engine,
    line: &str,
    defaults: &SamplingParams,
) -> anyhow::Result<(Vec<u32>, SamplingParams)> {
    let serde_json::Value::Object(mut fields) = serde_json::from_str(line)? else {
        bail!("a request is a JSON object");
    };
    let prompt = match (fields.remove("prompt"), fields.remove("prompt_ids")) {
        (Some(_), Some(_)) => bail!("give `prompt` or `prompt_ids`, not both"),
        (None, Some(ids)) => serde_json::from_value(ids).context("`prompt_ids`")?,
        (Some(serde_json::Value::String(text)), None) => {
            text_tokenizer(engine, "give `prompt_ids`")?.encode(&text)?
        }
        (Some(other), None) => bail!("`prompt` must be text, got {other}"),
        (None, None) => bail!("the request has neither `prompt` nor `prompt_ids`"),
    };
    let mut params = serde_json::to_value(defaults)?;
    for (key, value) in fields {
        params[key] = value;
    }
    Ok((prompt, serde_json::from_value(params)?))
}

/// STREAM-like copy bandwidth (bytes read + written per second) over the worker pool, best of
/// three copies of 512 MiB, the way the benchmarks' bound is defined.
fn copy_bandwidth() -> f64 {
    const LEN: usize = 1 << 27;
    let src = vec![1.0f32; LEN];
    let mut dst = vec![0.0f32; LEN];
    let pool = vibee_core::backend::cpu::pool::pool();
    let chunk = LEN.div_ceil(pool.threads());
    (0..3)
        .map(|_| {
            let started = Instant::now();
            pool.for_each_chunk(&mut dst, chunk, |i, out| {
                out.copy_from_slice(&src[i * chunk..i * chunk + out.len()])
            });
            (2 * LEN * 4) as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// A text file the user gave (calibration, evaluation or divergence text).
fn read_text(path: &Path) -> anyhow::Result<String> {
    Ok(vibee_core::io::read_regular_text(
        path,
        vibee_core::io::LARGE_FILE,
    )?)
}

fn check_sampling(p: &SamplingParams) -> anyhow::Result<()> {
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0");
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        bail!("--min-p must be in [0, 1]");
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
        bail!("--repetition-penalty must be a finite number > 0");
    }
    Ok(())
}

fn specs(args: SpecsArgs) -> anyhow::Result<()> {
    if let Some(family) = &args.family {
        if !FAMILIES.iter().any(|(f, ..)| f == family) {
            let names: Vec<_> = FAMILIES.iter().map(|(f, ..)| *f).collect();
            bail!("unknown family `{family}`; families: {}", names.join(", "));
        }
    }
    if let Some(status) = &args.status {
        if status != "implemented" && status != "planned" {
            bail!("--status must be `implemented` or `planned`");
        }
    }
    let (registry, _) = catalog(load_external(&args.plugin_paths)?)?;
    let selected: Vec<_> = registry
        .specs
        .iter()
        .filter(|s| args.family.as_ref().is_none_or(|f| &s.family == f))
        .filter(|s| {
            args.status
                .as_ref()
                .is_none_or(|st| s.status.to_string() == *st)
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&selected)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<22} {:<14} {:<12} summary",
        "id", "name", "family", "status"
    );
    for s in selected {
        let origin = s
            .origin
            .as_ref()
            .map(|o| format!(" [from {o}]"))
            .unwrap_or_default();
        println!(
            "{:<6} {:<22} {:<14} {:<12} {}{origin}",
            s.id,
            s.name,
            s.family,
            s.status.to_string(),
            s.summary
        );
    }
    Ok(())
}

fn divergence(args: DivergenceArgs) -> anyhow::Result<()> {
    if args.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let engine = load(&args.model)?;
    let reference = load(&ModelArgs {
        model: Some(args.reference.clone()),
        plugins: args.reference_plugins.clone(),
        threads: None,
        kv_memory: None,
        max_num_batched_tokens: args.model.max_num_batched_tokens,
        max_num_seqs: args.model.max_num_seqs,
        scheduling_policy: args.model.scheduling_policy.clone(),
        external: ExternalArgs {
            configs: Vec::new(),
            ..args.model.external.clone()
        },
    })?;
    let vocab = engine.model.config.vocab_size;
    if reference.model.config.vocab_size != vocab {
        bail!(
            "the reference's vocabulary ({}) differs from the model's ({vocab})",
            reference.model.config.vocab_size
        );
    }
    let tokens = match &args.text {
        None => bench_tokens(args.tokens, vocab),
        Some(path) => {
            let text = read_text(path)?;
            let tokenizer = engine
                .tokenizer
                .as_ref()
                .context("--text needs the model's tokenizer")?;
            let mut ids = tokenizer.encode(&text)?;
            ids.truncate(args.tokens);
            ids
        }
    };
    let logits = |engine: &Engine| {
        let mut kv = engine.model.new_sequence();
        engine.model.forward(&tokens, kv.as_mut(), true)
    };
    let d = vibee_core::tools::divergence::divergence(&logits(&reference)?, &logits(&engine)?);
    if args.json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        println!(
            "{} positions · mean KL {:.3e} nats (max {:.3e}) · relative logit error {:.3e} · top-1 agreement {:.1}%",
            d.positions,
            d.mean_kl,
            d.max_kl,
            d.relative_error,
            100.0 * d.top1_agreement
        );
    }
    Ok(())
}

fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    use vibee_inference::quantization::offline::{quantize_checkpoint, Method, Options};
    set_threads(args.threads)?;
    let method = Method::parse(&args.method)?;
    if args.calib_memory_gb.is_nan() || args.calib_memory_gb <= 0.0 {
        bail!("--calib-memory-gb must be a positive number of GB");
    }
    let calibration = args
        .calib
        .as_ref()
        .map(|path| read_text(path).context("cannot read the calibration text"))
        .transpose()?;
    let options = Options {
        method,
        group: args.group,
        bits: args.bits,
        act_order: args.act_order,
        calibration,
        calibration_tokens: args.calib_tokens,
        hessian_budget: (args.calib_memory_gb * 1e9) as usize,
    };
    let (registry, catalog) = catalog(Vec::new())?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len} ({elapsed})")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let summary = quantize_checkpoint(
        &args.model,
        &args.out,
        &options,
        &registry,
        &catalog,
        &mut |stage, done, total| {
            bar.set_message(stage.to_string());
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    println!(
        "quantized {} linear layers with {} in {:.1}s ({} calibration tokens): {:.1} MB → {:.1} MB, written to {}",
        summary.quantized,
        args.method,
        started.elapsed().as_secs_f64(),
        summary.calibration_tokens,
        summary.bytes_before as f64 / 1e6,
        summary.bytes_after as f64 / 1e6,
        args.out.display()
    );
    if !summary.kept.is_empty() {
        println!("kept in full precision: {}", summary.kept.join(", "));
    }
    Ok(())
}

/// Deterministic token ids spread over the vocabulary.
fn bench_tokens(count: usize, vocab: usize) -> Vec<u32> {
    (0..count)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect()
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens < 2 || args.repeat == 0 {
        bail!("--prompt-tokens must be ≥ 1, --gen-tokens ≥ 2 and --repeat ≥ 1");
    }
    if !args.concurrency.is_empty() {
        return bench_concurrency(args);
    }
    let mut engine = load(&args.model)?;
    let config = engine.model.config.clone();
    let prompt = bench_tokens(args.prompt_tokens, config.vocab_size);
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: args.gen_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let weight_bytes = engine.model.weight_bytes_per_token();
    warm_up(&mut engine.app, &args, config.vocab_size, &params)?;
    let mut best = None::<runner::GenerateOutput>;
    // The host's memory bandwidth drifts, so each run is judged against a copy measured just
    // before it: the fraction of the bandwidth bound is the best over runs of the same pairing.
    let (mut best_fraction, mut bandwidth_at_best) = (0.0f64, 0.0f64);
    for _ in 0..args.repeat {
        let bandwidth = copy_bandwidth();
        let out = runner::generate(&mut engine.app, prompt.clone(), params.clone())?;
        let fraction = out.decode_tokens_per_s * weight_bytes as f64 / bandwidth;
        if fraction > best_fraction {
            (best_fraction, bandwidth_at_best) = (fraction, bandwidth);
        }
        best = Some(match best {
            None => out,
            Some(b) => runner::GenerateOutput {
                prefill_tokens_per_s: b.prefill_tokens_per_s.max(out.prefill_tokens_per_s),
                decode_tokens_per_s: b.decode_tokens_per_s.max(out.decode_tokens_per_s),
                time_to_first_token_s: b.time_to_first_token_s.min(out.time_to_first_token_s),
                ..out
            },
        });
    }
    let best = best.expect("at least one run");
    let mut report = bench_header(&args);
    report.extend(
        json!({
            "prefill_tokens_per_s": best.prefill_tokens_per_s,
            "decode_tokens_per_s": best.decode_tokens_per_s,
            "time_to_first_token_s": best.time_to_first_token_s,
            "weight_bytes": weight_bytes,
            "decode_weight_gb_per_s": weight_bytes as f64 * best.decode_tokens_per_s / 1e9,
            "copy_gb_per_s": bandwidth_at_best / 1e9,
            "decode_fraction_of_bandwidth_bound": best_fraction,
        })
        .as_object()
        .cloned()
        .expect("an object"),
    );
    let report = serde_json::Value::Object(report);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "prefill {:.1} tok/s · decode {:.2} tok/s · first token {:.3}s · {:.2} GB weights → {:.1} GB/s while decoding ({} threads)",
            best.prefill_tokens_per_s,
            best.decode_tokens_per_s,
            best.time_to_first_token_s,
            weight_bytes as f64 / 1e9,
            report["decode_weight_gb_per_s"].as_f64().unwrap_or_default(),
            rayon::current_num_threads()
        );
        println!(
            "decode reaches {:.0}% of the memory-bandwidth bound (STREAM-like copy just before the run: {:.1} GB/s read+write)",
            best_fraction * 100.0,
            bandwidth_at_best / 1e9
        );
    }
    Ok(())
}

/// Unless `--no-warmup`: one unmeasured run, of two new tokens so that prefill and decode have
/// both run once, on a prompt as long as the measured ones but sharing no prefix with them
/// (reversed), so that a prefix cache does not serve them from it.
fn warm_up(
    app: &mut vibee_core::app::App,
    args: &BenchArgs,
    vocab: usize,
    params: &SamplingParams,
) -> anyhow::Result<()> {
    if args.no_warmup {
        return Ok(());
    }
    let mut prompt = bench_tokens(args.prompt_tokens, vocab);
    prompt.reverse();
    let params = SamplingParams {
        max_tokens: 2,
        ..params.clone()
    };
    runner::generate(app, prompt, params)?;
    Ok(())
}

/// What every `vibee bench` report starts with: the engine, the model and the run's shape.
fn bench_header(args: &BenchArgs) -> serde_json::Map<String, serde_json::Value> {
    let header = json!({
        "engine": "vibee",
        "model": args.model.model.as_deref().map(Path::display).map(|d| d.to_string()),
        "threads": rayon::current_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
    });
    header.as_object().cloned().expect("an object")
}

/// The most requests one `--concurrency` level may hold.
const MAX_CONCURRENCY: usize = 4096;

/// `vibee bench --concurrency`: per level, the best of `--repeat` runs of that many requests
/// at once (distinct prompts of the same length, greedy, the same number of new tokens).
fn bench_concurrency(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(bad) = args
        .concurrency
        .iter()
        .find(|c| **c == 0 || **c > MAX_CONCURRENCY)
    {
        bail!("--concurrency {bad}: each level must be 1 to {MAX_CONCURRENCY} requests");
    }
    let mut engine = load(&args.model)?;
    let vocab = engine.model.config.vocab_size;
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: args.gen_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    warm_up(&mut engine.app, &args, vocab, &params)?;
    let configured = *engine.app.world.resource::<StepBudget>();
    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        // Every prompt in the first step, as llama-batched-bench runs them: the decode steps
        // measured after it are decode alone.
        engine.app.world.insert_resource(StepBudget {
            max_num_batched_tokens: configured
                .max_num_batched_tokens
                .max(concurrency * (args.prompt_tokens + concurrency)),
            max_num_seqs: configured.max_num_seqs.max(concurrency),
        });
        let mut best: Option<serde_json::Value> = None;
        for _ in 0..args.repeat {
            let requests = (0..concurrency)
                .map(|i| {
                    let prompt = bench_tokens(args.prompt_tokens + i, vocab)[i..].to_vec();
                    (prompt, params.clone())
                })
                .collect();
            let outputs = runner::generate_many(&mut engine.app, requests)
                .into_iter()
                .collect::<anyhow::Result<Vec<_>>>()?;
            let level = concurrency_report(concurrency, &outputs);
            let key = |v: &serde_json::Value| v["aggregate_decode_tokens_per_s"].as_f64();
            if best.as_ref().is_none_or(|b| key(&level) > key(b)) {
                best = Some(level);
            }
        }
        levels.push(best.expect("at least one run"));
    }
    let mut report = bench_header(&args);
    report.insert("levels".into(), json!(levels));
    report.insert("peak_resident_bytes".into(), json!(peak_resident_bytes()));
    report.insert("kv".into(), json!(engine.model.kv_usage()));
    let report = serde_json::Value::Object(report);
    if args.json {
        println!("{report}");
    } else {
        for level in &levels {
            println!(
                "concurrency {:>4}: decode {:.1} tok/s aggregate, {:.2} per sequence · prefill {:.1} tok/s · first token {:.3}s",
                level["concurrency"],
                level["aggregate_decode_tokens_per_s"].as_f64().unwrap_or_default(),
                level["per_sequence_decode_tokens_per_s"].as_f64().unwrap_or_default(),
                level["aggregate_prefill_tokens_per_s"].as_f64().unwrap_or_default(),
                level["time_to_first_token_s"].as_f64().unwrap_or_default(),
            );
        }
    }
    Ok(())
}

/// One level's speeds from its requests' outputs: they ran in lockstep, so the level's decode
/// (prefill) wall time is the longest any request spent decoding (prefilling).
fn concurrency_report(concurrency: usize, outputs: &[runner::GenerateOutput]) -> serde_json::Value {
    // n / rate for a time, n / time for a rate: both zero where the divisor is.
    let per = |n: f64, by: f64| if by > 0.0 { n / by } else { 0.0 };
    let seconds = per;
    let decoded: f64 = outputs.iter().map(|o| o.tokens.len() as f64 - 1.0).sum();
    let decode_wall = outputs
        .iter()
        .map(|o| seconds(o.tokens.len() as f64 - 1.0, o.decode_tokens_per_s))
        .fold(0.0, f64::max);
    let prompted: f64 = outputs.iter().map(|o| o.prompt_tokens as f64).sum();
    let prefill_wall = outputs
        .iter()
        .map(|o| seconds(o.prompt_tokens as f64, o.prefill_tokens_per_s))
        .fold(0.0, f64::max);
    let per_sequence =
        outputs.iter().map(|o| o.decode_tokens_per_s).sum::<f64>() / outputs.len() as f64;
    let first_token = outputs
        .iter()
        .map(|o| o.time_to_first_token_s)
        .fold(0.0, f64::max);
    json!({
        "concurrency": concurrency,
        "aggregate_decode_tokens_per_s": per(decoded, decode_wall),
        "per_sequence_decode_tokens_per_s": per_sequence,
        "aggregate_prefill_tokens_per_s": per(prompted, prefill_wall),
        "time_to_first_token_s": first_token,
    })
}

/// The process's peak resident memory (Linux `VmHWM`), when the system says.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn conformance(args: ConformanceArgs) -> anyhow::Result<()> {
    use vibee_core::app::registry::Status;
    use vibee_core::tools::conformance::{load_cases, parse_cases, run_cases, CaseResult};

    if args.device != "cpu" && args.device != "all" {
        bail!(
            "backend `{}` is not available in this build (available: cpu)",
            args.device
        );
    }
    if args.plugins.is_empty() && !args.root.join("specs").is_dir() {
        bail!(
            "{} has no specs/ directory: run from the vibee repository or pass --root",
            args.root.display()
        );
    }
    let external = load_external(&args.plugins)?;
    let shipped: Vec<(String, String)> = external
        .iter()
        .map(|p| {
            let origin = format!("{} (plugin `{}`)", p.origin.display(), p.manifest.name);
            (origin, p.manifest.conformance.to_string())
        })
        .collect();
    // A plugin that implements a built-in spec is held to that spec's cases too.
    let claimed: Vec<(SpecEntry, String)> = external
        .iter()
        .filter_map(|p| {
            Registry::builtin()
                .specs
                .into_iter()
                .find(|s| s.id == p.manifest.spec.as_str() && s.status == Status::Implemented)
                .map(|entry| (entry, p.manifest.name.to_string()))
        })
        .collect();
    let (registry, catalog) = catalog(external)?;
    let mut suites = Vec::new();
    for (entry, plugin) in &claimed {
        let file = entry
            .conformance
            .as_ref()
            .with_context(|| format!("{} has no conformance file", entry.id))?;
        let cases = load_cases(&args.root.join(file)).with_context(|| {
            format!(
                "`{plugin}` implements {} `{}`, whose cases live in the vibee repository: run \
                 from it or pass --root",
                entry.id, entry.name
            )
        })?;
        suites.push(cases.for_plugin(&entry.name, plugin));
    }
    if args.plugins.is_empty() {
        let selected: Vec<_> = registry
            .specs
            .iter()
            .filter(|s| s.status == Status::Implemented)
            .filter(|s| {
                args.spec
                    .as_ref()
                    .is_none_or(|want| &s.id == want || &s.name == want)
            })
            .filter(|s| args.family.as_ref().is_none_or(|f| &s.family == f))
            .collect();
        if selected.is_empty() {
            bail!("no implemented spec matches the selection");
        }
        for entry in selected {
            let file = entry
                .conformance
                .as_ref()
                .with_context(|| format!("{} has no conformance file", entry.id))?;
            suites.push(load_cases(&args.root.join(file))?);
        }
    }
    for (origin, text) in &shipped {
        if text.is_empty() {
            bail!("{origin} ships no conformance cases");
        }
        suites.push(parse_cases(text, origin)?);
    }
    let mut results: Vec<CaseResult> = Vec::new();
    for cases in &suites {
        results.extend(run_cases(cases, &args.root, &registry, &catalog));
    }
    println!(
        "{:<6} {:<72} {:<7} {:>10}  result",
        "spec", "case", "backend", "max err"
    );
    for r in &results {
        let err = r.max_err.map_or("-".to_string(), |e| format!("{e:.2e}"));
        let verdict = if r.passed {
            "pass".to_string()
        } else {
            format!("FAIL: {}", r.detail)
        };
        println!(
            "{:<6} {:<72} {:<7} {:>10}  {verdict}",
            r.spec, r.case, r.backend, err
        );
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!("{} passed, {failed} failed", results.len() - failed);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, junit(&results))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} conformance case(s) failed");
    }
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let (predictions, references) = (read_text(&args.predictions)?, read_text(&args.references)?);
    let (predictions, references): (Vec<&str>, Vec<&str>) =
        (predictions.lines().collect(), references.lines().collect());
    if predictions.len() != references.len() {
        bail!(
            "{} has {} lines but {} has {}",
            args.predictions.display(),
            predictions.len(),
            args.references.display(),
            references.len()
        );
    }
    if predictions.is_empty() {
        bail!("there is nothing to score");
    }
    let (_, catalog) = catalog(load_external(&args.external.paths)?)?;
    let external = find_external(&catalog, &args.metric).with_context(|| {
        format!(
            "no eval metric `{}` is loaded (give its library with --plugin-path)",
            args.metric
        )
    })?;
    let config = args
        .external
        .configs
        .iter()
        .find(|(name, _)| *name == args.metric)
        .map_or("", |(_, config)| config.as_str());
    let mut metric = external.eval_metric(config)?;
    let scores = predictions
        .iter()
        .zip(&references)
        .map(|(p, r)| metric.score(p, r))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    if args.json {
        println!(
            "{}",
            json!({"metric": args.metric, "mean": mean, "scores": scores})
        );
    } else {
        println!(
            "{}: {mean:.4} (mean of {} lines)",
            args.metric,
            scores.len()
        );
    }
    Ok(())
}

fn arch(args: ArchArgs) -> anyhow::Result<()> {
    let kv_dtype = args.kv_dtype.unwrap_or(args.dtype);
    let print = |table: String, json: String| {
        if args.json {
            println!("{json}");
        } else {
            print!("{table}");
        }
    };
    if let Some(budget) = args.sweep {
        let sweep = arch_calc::sweep(&arch_calc::SweepOptions {
            budget,
            vocab: args.vocab.unwrap_or(32000),
            kv_heads: args.kv_heads,
            tied: args.tied,
            context: args.context,
            kv_dtype,
        })?;
        print(sweep.table(), serde_json::to_string(&sweep)?);
        return Ok(());
    }
    let dims = arch_calc::Dims {
        hidden: args.hidden,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        intermediate: args.intermediate,
        vocab: args.vocab,
        head_dim: args.head_dim,
        experts: args.experts,
        experts_per_token: args.experts_per_token,
        tied: args.tied,
    };
    let (arch, source) = match &args.config {
        Some(path) => {
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let (arch, unknown_keys) = arch_calc::read_config(path)?;
            if !unknown_keys.is_empty() {
                eprintln!(
                    "warning: `vibee run` would refuse this config: {} not understood ({}); the sizes below do not depend on {}",
                    if unknown_keys.len() == 1 { "a key is" } else { "keys are" },
                    unknown_keys.join(", "),
                    if unknown_keys.len() == 1 { "it" } else { "them" },
                );
            }
            (arch, name)
        }
        None if dims.any() => (arch_calc::from_dims(&dims)?, "flags".to_string()),
        None => match args.flops {
            Some(flops) => {
                let budget = arch_calc::compute_optimal(flops)?;
                print(budget.table(), serde_json::to_string(&budget)?);
                return Ok(());
            }
            None => bail!(
                "describe a model: --config PATH/config.json, or --hidden, --layers, --heads, --intermediate and --vocab; or give --sweep BUDGET or --flops C"
            ),
        },
    };
    let report = arch_calc::report(
        &arch,
        &source,
        &arch_calc::Options {
            context: args.context,
            prompt: args.prompt,
            batch: args.batch,
            dtype: args.dtype,
            kv_dtype,
            flops_budget: args.flops,
        },
    )?;
    print(report.table(), serde_json::to_string(&report)?);
    Ok(())
}

fn junit(results: &[vibee_core::tools::conformance::CaseResult]) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let failures = results.iter().filter(|r| !r.passed).count();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"vibee conformance\" tests=\"{}\" failures=\"{failures}\">\n",
        results.len()
    );
    for r in results {
        let name = escape(&format!("{} [{}]", r.case, r.backend));
        xml.push_str(&format!(
            "  <testcase classname=\"{}\" name=\"{name}\">",
            escape(&r.spec)
        ));
        if !r.passed {
            xml.push_str(&format!("<failure message=\"{}\"/>", escape(&r.detail)));
        }
        xml.push_str("</testcase>\n");
    }
    xml.push_str("</testsuite>\n</testsuites>\n");
    xml
}
