//! Where a model comes from: a Hugging Face directory (config.json, safetensors, tokenizer.json)
//! or a llama.cpp GGUF file, which carries all three.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::{ModelConfig, QkvLayout};
use crate::io::gguf::Gguf;
use crate::io::tokenizer::Tokenizer;
use crate::io::weights::Weights;

pub enum Checkpoint {
    Hf(PathBuf),
    Gguf { path: PathBuf, file: Gguf },
}

impl Checkpoint {
    /// `path` is a directory with a config.json, a GGUF file, or a directory holding one GGUF
    /// file and no config.json.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let gguf = |path: &Path| {
            Ok(Checkpoint::Gguf {
                file: Gguf::open(path)?,
                path: path.to_path_buf(),
            })
        };
        if !path.exists() {
            bail!(
                "there is no model at {}: give a model directory or a .gguf file",
                path.display()
            );
        }
        if path.is_file() {
            return gguf(path);
        }
        if path.join("config.json").exists() {
            return Ok(Checkpoint::Hf(path.to_path_buf()));
        }
        let entries = std::fs::read_dir(path)
            .with_context(|| format!("cannot read the model directory {}", path.display()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        match files.len() {
            0 => bail!(
                "{} has neither a config.json nor a .gguf file",
                path.display()
            ),
            1 => gguf(&files[0]),
            _ => {
                files.sort();
                bail!(
                    "{} holds several .gguf files ({}): name the one to load",
                    path.display(),
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }

    pub fn config(&self) -> anyhow::Result<ModelConfig> {
        match self {
            Checkpoint::Hf(dir) => Ok(ModelConfig::from_dir(dir)?),
            Checkpoint::Gguf { file, .. } => {
                let mut config =
                    ModelConfig::from_json(&crate::config::gguf::hf_config(file)?.to_string())
                        .context("the file's metadata does not make a valid config")?;
                let form = crate::config::gguf::family(file).and_then(|f| f.gguf.as_ref());
                let form = form.expect("checked by hf_config");
                (form.stored)(&mut config);
                let fused = file
                    .tensors
                    .iter()
                    .any(|t| t.name.ends_with(".attn_qkv.weight"));
                if fused && config.layout.qkv == QkvLayout::Separate {
                    bail!(
                        "the file fuses q/k/v into attn_qkv (llama.cpp's --fuse-qkv), which vibee does not read for {} yet",
                        config.model_type
                    );
                }
                if file.tensors.iter().any(|t| t.kind.is_quantized()) {
                    config.quantization = Some("gguf");
                }
                Ok(config)
            }
        }
    }

    /// The tensors, under their Hugging Face names in `config`'s layout (this checkpoint's
    /// `config()`).
    pub fn weights(&self, config: &ModelConfig) -> anyhow::Result<Weights> {
        Ok(match self {
            Checkpoint::Hf(dir) => Weights::open(dir)?,
            Checkpoint::Gguf { path, file } => crate::config::gguf::weights(path, file, config)?,
        })
    }

    /// The tokenizer.json beside the weights, else the GGUF file's own vocabulary, if any.
    pub fn tokenizer(&self, config: &ModelConfig) -> anyhow::Result<Option<Tokenizer>> {
        let dir = match self {
            Checkpoint::Hf(dir) => dir.as_path(),
            Checkpoint::Gguf { path, .. } => path.parent().unwrap_or(Path::new(".")),
        };
        if dir.join("tokenizer.json").exists() {
            return Ok(Some(Tokenizer::from_dir(dir, config.bos_token_id)?));
        }
        match self {
            Checkpoint::Hf(_) => Ok(None),
            Checkpoint::Gguf { file, .. } => Tokenizer::from_gguf(file),
        }
    }
}
