//! `tokenizer.json` through the Hugging Face `tokenizers` crate.

use std::path::Path;

use anyhow::Context;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`; `bos` is prepended to prompts unless the tokenizer adds it.
    pub fn from_dir(dir: &Path, bos: Option<u32>) -> anyhow::Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot load {}", path.display()))?;
        Ok(Self { inner, bos })
    }

    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }
}
