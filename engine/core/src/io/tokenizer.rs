//! `tokenizer.json` (or a GGUF file's embedded vocabulary) through the Hugging Face
//! `tokenizers` crate, and the chat template of `tokenizer_config.json` rendered with minijinja
//! the way transformers renders it.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::io::gguf::{Gguf, Value};

/// Llama 3's pre-tokenizer split (digits in groups of up to three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral NeMo's (Tekken): words split before capitals, single digits, no contractions.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// BLOOM's: runs of anything but whitespace and a few punctuation marks, with a leading space
/// (llama.cpp's reading of its tokenizer.json).
const BLOOM_SPLIT: &str = " ?[^(\\s|.,!?…。，、।۔،)]+";
/// DeepSeek-LLM's (DeepSeek-V2's), split after split as llama.cpp runs them: line breaks, then
/// runs of letters of the alphabetic scripts, of ASCII and full-width punctuation, trailing
/// whitespace, CJK and Hangul, digits.
const DEEPSEEK_LLM_SPLITS: [&str; 6] = [
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];

/// A GGUF array of strings.
fn gguf_strings<'a>(file: &'a Gguf, key: &str) -> anyhow::Result<Vec<&'a str>> {
    match file.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => bail!("{key} holds a non-string"),
            })
            .collect(),
        _ => bail!("the file has no {key}"),
    }
}

fn gguf_false(file: &Gguf, key: &str) -> bool {
    matches!(file.metadata.get(key), Some(Value::Bool(false)))
}

/// What a `tokenizer.ggml.pre` name means: the normalizer and pre-tokenizer of the published
/// tokenizer.json that llama.cpp's converter gives that name, and whether a word the vocabulary
/// holds whole skips the merges (`ignore_merges`, as llama.cpp sets it per name).
fn byte_level_pre(pre: &str) -> Option<(serde_json::Value, serde_json::Value, bool)> {
    // The byte mapping's own regex is GPT-2's split.
    let byte_level = |regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |regexes: &[&str]| {
        let mut steps: Vec<serde_json::Value> = regexes
            .iter()
            .map(|regex| serde_json::json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false}))
            .collect();
        steps.push(byte_level(false));
        serde_json::json!({"type": "Sequence", "pretokenizers": steps})
    };
    let none = serde_json::Value::Null;
    Some(match pre {
        "default" | "gpt-2" => (none, byte_level(true), false),
        // GPT-NeoX-20B's tokenizer (Pythia, MPT) composes text first.
        "mpt" => (serde_json::json!({"type": "NFC"}), byte_level(true), false),
        "llama3" | "llama-bpe" => (none, split(&[LLAMA3_SPLIT]), true),
        // DBRX's and OLMo 2's: Llama 3's split, merges always applied.
        "dbrx" => (none, split(&[LLAMA3_SPLIT]), false),
        "qwen2" | "deepseek-r1-qwen" => (none, split(&[QWEN2_SPLIT]), false),
        "tekken" => (none, split(&[TEKKEN_SPLIT]), true),
        "bloom" => (none, split(&[BLOOM_SPLIT]), false),
        "deepseek-llm" => (none, split(&DEEPSEEK_LLM_SPLITS), false),
        "falcon" => (
            none,
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Punctuation", "behavior": "Contiguous"},
                byte_level(true),
                {"type": "Digits", "individual_digits": false},
                {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": false},
            ]}),
            false,
        ),
        // StarCoder2's and SmolLM's: every digit alone.
        "starcoder" | "smollm" => (
            none,
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        _ => return None,
    })
}

/// A byte-level BPE (GPT-2, Llama 3, …): the split the file's pre-tokenizer name means, its
/// merges.
fn byte_level(file: &Gguf, merges: Vec<&str>) -> anyhow::Result<serde_json::Value> {
    let (normalizer, pre_tokenizer, ignore_merges) = match file.metadata.get("tokenizer.ggml.pre") {
        None => byte_level_pre("default").expect("a known name"),
        Some(Value::String(pre)) => byte_level_pre(pre).with_context(|| {
            format!(
                "the file's pre-tokenizer `{pre}` is not supported yet: put the model's \
                 tokenizer.json next to the file, or give token ids"
            )
        })?,
        Some(other) => bail!("tokenizer.ggml.pre is {other:?}, not a string"),
    };
    Ok(serde_json::json!({
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "merges": merges,
        },
    }))
}

/// A SentencePiece BPE vocabulary as llama.cpp runs it: spaces become `▁`, one is prepended
/// (unless the file says not to), the whole text is merged best score first, and characters
/// outside the vocabulary fall back to `<0xNN>` byte tokens.
fn sentencepiece(
    file: &Gguf,
    tokens: &[&str],
    unknown: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let scores: Vec<f64> = match file.metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::F32(s) => Ok(*s as f64),
                _ => bail!("tokenizer.ggml.scores holds a non-f32"),
            })
            .collect::<anyhow::Result<_>>()?,
        _ => bail!("the file's SentencePiece vocabulary has no tokenizer.ggml.scores"),
    };
    if scores.len() != tokens.len() {
        bail!(
            "the file has {} token scores for {} tokens",
            scores.len(),
            tokens.len()
        );
    }
    let prefix = !gguf_false(file, "tokenizer.ggml.add_space_prefix");
    let mut normalizers = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
    ];
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if prefix {
        normalizers.insert(
            0,
            serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}),
        );
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(serde_json::json!({
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unknown,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "merges": merges_from_scores(tokens, &scores),
        },
    }))
}

/// BPE merges equivalent to merging the best-scoring pair first: every split of a token into
/// two tokens is a merge ranked by the whole token's score (ties: longer left, then longer
/// right part first; then vocabulary order), as transformers recovers them.
fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<[String; 2]> {
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (token, score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (ids[l], ids[r]));
        merges.extend(
            local
                .into_iter()
                .map(|(l, r)| (*score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // Stable, descending on (score, left length, right length), as Python's reverse sort.
    merges.sort_by(|a, b| {
        (b.0, b.1, b.2)
            .partial_cmp(&(a.0, a.1, a.2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| [l.to_string(), r.to_string()])
        .collect()
}

/// The `tokenizers` tokenizer a parsed tokenizer.json describes. The JSON is parsed first
/// because the crate panics on some syntax errors (in a truncated file, say) rather than
/// returning them; a panic it still raises on a malformed file becomes an error too.
fn parse(json: serde_json::Value) -> anyhow::Result<tokenizers::Tokenizer> {
    let parsed = std::panic::catch_unwind(|| serde_json::from_value(json));
    match parsed {
        Ok(tokenizer) => Ok(tokenizer?),
        Err(_) => bail!("the tokenizers library cannot read it (it panicked)"),
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    chat: Option<ChatTemplate>,
    /// The SentencePiece byte-fallback tokens (`<0x0A>`).
    byte_tokens: HashSet<u32>,
}

struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A special token in tokenizer_config.json: a string, or an object with `content`.
fn special(config: &serde_json::Value, key: &str) -> String {
    match &config[key] {
        serde_json::Value::String(s) => s.clone(),
        other => other["content"].as_str().unwrap_or_default().to_string(),
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (and the chat template of `dir/tokenizer_config.json`, when
    /// there is one); `bos` is prepended to plain prompts unless the tokenizer adds it.
    pub fn from_dir(dir: &Path, bos: Option<u32>) -> anyhow::Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = crate::io::read_regular_file(&path, crate::io::LARGE_FILE)?;
        let inner = serde_json::from_slice(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(parse)
            .with_context(|| format!("cannot load {}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let chat = if config_path.exists() {
            let text = crate::io::read_regular_text(&config_path, crate::io::LARGE_FILE)?;
            let config: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
            config["chat_template"].as_str().map(|source| ChatTemplate {
                source: source.to_string(),
                bos_token: special(&config, "bos_token"),
                eos_token: special(&config, "eos_token"),
            })
        } else {
            None
        };
        Ok(Self::new(inner, bos, chat))
    }

    fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, chat: Option<ChatTemplate>) -> Self {
        let byte_fallback = matches!(
            inner.get_model(),
            tokenizers::ModelWrapper::BPE(bpe) if bpe.byte_fallback
        );
        // A set, not a table by id: a hostile tokenizer.json can give a token id near u32::MAX.
        let byte_tokens = if byte_fallback {
            (inner.get_vocab(true).into_iter())
                .filter(|(token, _)| {
                    let hex = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'));
                    hex.is_some_and(|h| h.len() == 2)
                })
                .map(|(_, id)| id)
                .collect()
        } else {
            HashSet::new()
        };
        Self {
            inner,
            bos,
            chat,
            byte_tokens,
        }
    }

    /// Whether `id` stands for one raw byte. A run of them decodes together (into characters,
    /// or replacement characters where the bytes are not UTF-8), so text ending in one may
    /// still change.
    pub fn is_byte(&self, id: u32) -> bool {
        self.byte_tokens.contains(&id)
    }

    /// The tokenizer embedded in a GGUF file (`tokenizer.ggml.*`) as the equivalent `tokenizers`
    /// BPE: llama.cpp's byte-level vocabularies (`gpt2`) with their merges, and SentencePiece
    /// ones (`llama`) with merges recovered from the scores; with the file's chat template.
    pub fn from_gguf(file: &Gguf) -> anyhow::Result<Option<Self>> {
        let model = match file.metadata.get("tokenizer.ggml.model") {
            None => return Ok(None),
            Some(Value::String(model)) => model.as_str(),
            Some(other) => bail!("tokenizer.ggml.model is {other:?}, not a string"),
        };
        let tokens = gguf_strings(file, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match file.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(t) => *t as i64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        // llama.cpp's token types: 3 is a control token, 4 user-defined (added) text.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, t))| **t == 3 || **t == 4)
            .map(|(id, (content, t))| {
                serde_json::json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": *t == 4, "special": *t == 3,
                })
            })
            .collect();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), id.into()))
            .collect();
        let token = |key: &str| {
            file.number(key)
                .and_then(|id| tokens.get(id as usize))
                .map(|t| t.to_string())
        };
        let mut json = match model {
            "gpt2" => byte_level(file, gguf_strings(file, "tokenizer.ggml.merges")?)?,
            "llama" => sentencepiece(file, &tokens, token("tokenizer.ggml.unknown_token_id"))?,
            other => bail!(
                "the file's tokenizer (`{other}`) is not supported yet (byte-level BPE `gpt2` and \
                 SentencePiece `llama` are): put the model's tokenizer.json next to the file, or \
                 give token ids"
            ),
        };
        json["version"] = "1.0".into();
        json["added_tokens"] = added.into();
        json["post_processor"] = serde_json::Value::Null;
        json["model"]["vocab"] = vocab.into();
        let inner = parse(json).context("the file's tokenizer does not load")?;
        let chat = file
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| match v {
                Value::String(source) => Some(ChatTemplate {
                    source: source.clone(),
                    bos_token: token("tokenizer.ggml.bos_token_id").unwrap_or_default(),
                    eos_token: token("tokenizer.ggml.eos_token_id").unwrap_or_default(),
                }),
                _ => None,
            });
        // llama.cpp prepends BOS unless the file says not to.
        let bos = file
            .number("tokenizer.ggml.bos_token_id")
            .filter(|_| !gguf_false(file, "tokenizer.ggml.add_bos_token"))
            .map(|id| id as u32);
        Ok(Some(Self::new(inner, bos, chat)))
    }

    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = self.encode_raw(text, true)?;
        if let Some(bos) = self.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    fn encode_raw(&self, text: &str, special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, special_tokens)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The conversation rendered by the checkpoint's chat template (as transformers'
    /// `apply_chat_template`: trimmed blocks, Python string methods, `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let chat = self
            .chat
            .as_ref()
            .context("this model's tokenizer_config.json has no chat_template")?;
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", &chat.source)
            .context("the chat template does not parse")?;
        let template = env.get_template("chat").expect("just added");
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &chat.bos_token,
                eos_token => &chat.eos_token,
            })
            .context("cannot render the chat template")
    }

    /// The token ids of a rendered conversation; the template places any special tokens itself.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> anyhow::Result<Vec<u32>> {
        self.encode_raw(
            &self.apply_chat_template(messages, add_generation_prompt)?,
            false,
        )
    }

    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }
}
