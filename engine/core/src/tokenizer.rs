//! `tokenizer.json` through the Hugging Face `tokenizers` crate, and the chat template of
//! `tokenizer_config.json` rendered with minijinja the way transformers renders it.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    chat: Option<ChatTemplate>,
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
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot load {}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let chat = match std::fs::read_to_string(&config_path) {
            Err(_) => None,
            Ok(text) => {
                let config: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
                config["chat_template"].as_str().map(|source| ChatTemplate {
                    source: source.to_string(),
                    bos_token: special(&config, "bos_token"),
                    eos_token: special(&config, "eos_token"),
                })
            }
        };
        Ok(Self { inner, bos, chat })
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
