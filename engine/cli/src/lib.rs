//! What the `vibee` command is made of: the built-in plugin catalog and the built-in tiny model.

pub mod scaffold;

use std::path::PathBuf;

use anyhow::Context;
use vibee_core::serving::external::{self, ExternalPlugin};
use vibee_core::{Plugin, Registry};

/// Every plugin compiled into vibee.
pub fn builtin_plugins() -> Vec<Box<dyn Plugin>> {
    let mut plugins = vibee_architectures::plugins();
    plugins.extend(vibee_inference::plugins());
    plugins
}

/// Loads the third-party plugin libraries at `paths` (files or directories).
pub fn load_external(paths: &[PathBuf]) -> anyhow::Result<Vec<ExternalPlugin>> {
    let mut loaded = Vec::new();
    for path in paths {
        loaded.extend(external::load_path(path)?);
    }
    Ok(loaded)
}

/// The registry and plugins a command runs with: the built-in ones and `external`.
pub fn catalog(external: Vec<ExternalPlugin>) -> anyhow::Result<(Registry, Vec<Box<dyn Plugin>>)> {
    let mut registry = Registry::builtin();
    let mut plugins = builtin_plugins();
    for plugin in external {
        registry.add_external(plugin.registry_entry())?;
        plugins.push(Box::new(plugin));
    }
    Ok((registry, plugins))
}

/// The built-in tiny model: a 2-layer random-weight Llama (the `llama-gqa` reference fixture),
/// so `vibee run` works on a fresh machine. Its output is gibberish by construction.
const TINY_MODEL: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../../tests/fixtures/llama-gqa/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../tests/fixtures/llama-gqa/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../tests/fixtures/llama-gqa/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../tests/fixtures/llama-gqa/tokenizer_config.json"),
    ),
];

/// Writes the built-in model to the user's cache (once per content) and returns its directory.
pub fn builtin_model_dir() -> anyhow::Result<PathBuf> {
    let hash = TINY_MODEL
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, (name, bytes)| {
            name.bytes()
                .chain(bytes.iter().copied())
                .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
        });
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = cache.join("vibee").join(format!("tiny-llama-{hash:016x}"));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    // Written under a temporary name and renamed, so a crash never leaves half a model.
    let staging = cache
        .join("vibee")
        .join(format!(".tiny-llama-{hash:016x}-{}", std::process::id()));
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    for (name, bytes) in TINY_MODEL {
        std::fs::write(staging.join(name), bytes)
            .with_context(|| format!("cannot write {}", staging.join(name).display()))?;
    }
    if std::fs::rename(&staging, &dir).is_err() && !dir.join("config.json").exists() {
        anyhow::bail!("cannot install the built-in model into {}", dir.display());
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(dir)
}
