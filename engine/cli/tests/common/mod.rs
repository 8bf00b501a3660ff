//! Running the `vibee` binary from the CLI tests.

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `vibee` in the repository root with a private cache directory.
pub fn vibee(args: &[&str]) -> Output {
    let cache = std::env::temp_dir().join(format!("vibee-cli-test-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_vibee"))
        .args(args)
        .current_dir(repo())
        .env("XDG_CACHE_HOME", cache)
        .output()
        .expect("vibee runs")
}

pub fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vibee failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The error text of a run that must fail with exit status `code`, not a panic.
pub fn failure(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected a clean failure, got {:?}",
        out.status
    );
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    err
}
