//! Shared helpers for the cross-crate tests.

use std::path::{Path, PathBuf};

use vibee_core::app::registry::Registry;
use vibee_core::Engine;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

pub fn plugins(list: &str) -> Vec<String> {
    list.split(',').map(str::to_string).collect()
}

/// Loads a checkpoint directory with a comma-separated plugin list.
pub fn load(dir: &Path, list: &str) -> anyhow::Result<Engine> {
    Engine::load(
        dir,
        &plugins(list),
        &Registry::builtin(),
        &vibee_cli::builtin_plugins(),
        &Default::default(),
    )
}

/// A scratch copy of a fixture that a test may damage.
pub fn scratch_copy(name: &str) -> tempdir::ScratchDir {
    tempdir::ScratchDir::copy_of(&fixture(name))
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory under the system temp dir, removed on drop.
    pub struct ScratchDir(pub PathBuf);

    impl ScratchDir {
        pub fn copy_of(src: &Path) -> Self {
            let unique = format!(
                "vibee-test-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let dir = std::env::temp_dir().join(unique);
            std::fs::create_dir_all(&dir).unwrap();
            for entry in std::fs::read_dir(src).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
