//! Every implemented spec's conformance cases pass on the CPU backend, and the registry agrees
//! with the compiled plugins and the spec files.

use vibee_core::app::registry::{Registry, Status};
use vibee_core::tools::conformance::{load_cases, run_cases};
use vibee_tests::repo_root;

#[test]
fn registry_is_consistent_with_plugins_and_spec_files() {
    let plugins: Vec<_> = vibee_cli::builtin_plugins()
        .iter()
        .map(|p| p.spec())
        .collect();
    Registry::builtin()
        .validate(&plugins, Some(&repo_root()))
        .unwrap();
}

#[test]
fn every_implemented_spec_passes_its_conformance_cases() {
    let root = repo_root();
    let registry = Registry::builtin();
    let catalog = vibee_cli::builtin_plugins();
    let mut failures = Vec::new();
    let mut ran = 0;
    for entry in registry
        .specs
        .iter()
        .filter(|s| s.status == Status::Implemented)
    {
        let file = entry
            .conformance
            .as_ref()
            .expect("validated: implemented specs have a file");
        let cases = load_cases(&root.join(file)).unwrap();
        assert_eq!(cases.spec, entry.id, "{file} is for another spec");
        for result in run_cases(&cases, &root, &registry, &catalog) {
            ran += 1;
            if !result.passed {
                failures.push(format!(
                    "{} {}: {}",
                    result.spec, result.case, result.detail
                ));
            }
        }
    }
    assert!(ran > 20, "only {ran} cases ran");
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}
