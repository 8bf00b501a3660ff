//! The spec registry (`registry.ron`): every technique vibee knows or plans, by numbered id.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::app::plugin::PluginSpec;

/// Each family owns a range of ids: five branches of five families of 20 (v2200–v2699), and
/// the training family of its own (v2100–v2199).
pub const FAMILIES: &[(&str, &str, u32, u32)] = &[
    ("training", "Hyperion", 2100, 2199),
    ("attention", "Architectures", 2200, 2219),
    ("position", "Architectures", 2220, 2239),
    ("norm", "Architectures", 2240, 2259),
    ("ffn", "Architectures", 2260, 2279),
    ("arch-search", "Architectures", 2280, 2299),
    ("kv-cache", "Inference", 2300, 2319),
    ("batching", "Inference", 2320, 2339),
    ("quantization", "Inference", 2340, 2359),
    ("speculative", "Inference", 2360, 2379),
    ("serving", "Inference", 2380, 2399),
    ("content-safety", "Safety", 2400, 2419),
    ("alignment", "Safety", 2420, 2439),
    ("robustness", "Safety", 2440, 2459),
    ("privacy", "Safety", 2460, 2479),
    ("safety-monitoring", "Safety", 2480, 2499),
    ("language", "Evaluation", 2500, 2519),
    ("reasoning", "Evaluation", 2520, 2539),
    ("knowledge", "Evaluation", 2540, 2559),
    ("code", "Evaluation", 2560, 2579),
    ("safety-eval", "Evaluation", 2580, 2599),
    ("serving-node", "Deployment", 2600, 2619),
    ("scaling", "Deployment", 2620, 2639),
    ("observability", "Deployment", 2640, 2659),
    ("cost", "Deployment", 2660, 2679),
    ("operations", "Deployment", 2680, 2699),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Implemented,
    Planned,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Implemented => "implemented",
            Status::Planned => "planned",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecEntry {
    /// `v` followed by the number, e.g. `v2202`.
    pub id: String,
    /// The short CLI name, e.g. `gqa`.
    pub name: String,
    pub family: String,
    pub summary: String,
    pub status: Status,
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default)]
    pub conflicts: Vec<String>,
    /// The exclusive slot this technique fills, if any.
    #[serde(default)]
    pub provides: Option<String>,
    /// Used when nothing else enabled fills `provides`.
    #[serde(default)]
    pub default: bool,
    /// Path of the conformance cases, relative to the repository root.
    #[serde(default)]
    pub conformance: Option<String>,
    /// Where a third-party plugin's entry came from (its library and version); built-in
    /// entries have none.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl SpecEntry {
    pub fn number(&self) -> Option<u32> {
        self.id.strip_prefix('v')?.parse().ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry.ron:{line}:{column}: {message}")]
    Parse {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("registry.ron is inconsistent:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub specs: Vec<SpecEntry>,
}

/// The registry compiled into vibee.
pub const BUILTIN_REGISTRY: &str = include_str!("../../../../registry.ron");

impl Registry {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        ron::from_str(text).map_err(|e| RegistryError::Parse {
            line: e.position.line,
            column: e.position.col,
            message: e.code.to_string(),
        })
    }

    pub fn builtin() -> Self {
        Self::parse(BUILTIN_REGISTRY).expect("the built-in registry is checked by tests")
    }

    /// Adds a third-party plugin's entry: its name must be new, and an id it shares with an
    /// existing spec must be of the same family (it implements that spec).
    pub fn add_external(&mut self, entry: SpecEntry) -> anyhow::Result<()> {
        let origin = |s: &SpecEntry| s.origin.clone().unwrap_or_else(|| "built in".into());
        if let Some(taken) = self.specs.iter().find(|s| s.name == entry.name) {
            anyhow::bail!(
                "plugin name `{}` ({}) is already taken by {} ({})",
                entry.name,
                origin(&entry),
                taken.id,
                origin(taken)
            );
        }
        if let Some(other) = self
            .specs
            .iter()
            .find(|s| s.id == entry.id && s.family != entry.family)
        {
            anyhow::bail!(
                "plugin `{}` claims {} as a {} spec, but {} is `{}` of family {}",
                entry.name,
                entry.id,
                entry.family,
                other.id,
                other.name,
                other.family
            );
        }
        self.specs.push(entry);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&SpecEntry> {
        self.specs.iter().find(|s| s.name == name || s.id == name)
    }

    /// Checks the registry's own rules and its agreement with the compiled plugins. With a
    /// repository root, also checks that every implemented spec has its conformance file.
    pub fn validate(
        &self,
        plugins: &[PluginSpec],
        root: Option<&Path>,
    ) -> Result<(), RegistryError> {
        let mut problems = Vec::new();
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for s in &self.specs {
            if !ids.insert(&s.id) {
                problems.push(format!("id {} is used twice", s.id));
            }
            if !names.insert(&s.name) {
                problems.push(format!("name `{}` is used twice", s.name));
            }
            match (FAMILIES.iter().find(|(f, ..)| *f == s.family), s.number()) {
                (None, _) => problems.push(format!(
                    "{} `{}`: unknown family `{}`",
                    s.id, s.name, s.family
                )),
                (_, None) => problems.push(format!(
                    "`{}`: id `{}` is not of the form v2200",
                    s.name, s.id
                )),
                (Some((family, _, lo, hi)), Some(n)) if n < *lo || n > *hi => {
                    problems.push(format!(
                        "{} `{}` is outside family {family}'s range v{lo}–v{hi}",
                        s.id, s.name
                    ))
                }
                _ => {}
            }
            for other in s.requires.iter().chain(&s.conflicts) {
                if !self.specs.iter().any(|e| &e.name == other) {
                    problems.push(format!(
                        "{} `{}` names unknown spec `{other}`",
                        s.id, s.name
                    ));
                }
            }
            let compiled = plugins.iter().find(|p| p.name == s.name);
            if s.status == Status::Implemented {
                if compiled.is_none() {
                    problems.push(format!(
                        "{} `{}` is implemented but no plugin is compiled for it",
                        s.id, s.name
                    ));
                }
                match (&s.conformance, root) {
                    (None, _) => problems.push(format!(
                        "{} `{}` is implemented but has no conformance file",
                        s.id, s.name
                    )),
                    (Some(file), Some(root)) if !root.join(file).is_file() => {
                        problems.push(format!(
                            "{} `{}`: conformance file {file} does not exist",
                            s.id, s.name
                        ))
                    }
                    _ => {}
                }
            }
            if let Some(p) = compiled {
                if p.id != s.id {
                    problems.push(format!(
                        "plugin `{}` claims {}, the registry says {}",
                        p.name, p.id, s.id
                    ));
                }
            }
        }
        for p in plugins {
            if self.get(p.name).is_none() {
                problems.push(format!(
                    "compiled plugin `{}` ({}) has no registry entry",
                    p.name, p.id
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_registry_reports_line_and_column() {
        let err = Registry::parse("(specs: [\n  (id: \"v2200\", name: 3)\n])").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("registry.ron:2:"), "{text}");
    }

    #[test]
    fn validation_catches_range_duplicates_and_missing_plugins() {
        let entry = |id: &str, name: &str, family: &str, status| SpecEntry {
            id: id.into(),
            name: name.into(),
            family: family.into(),
            summary: String::new(),
            status,
            requires: vec!["nope".into()],
            conflicts: vec![],
            provides: None,
            default: false,
            conformance: None,
            origin: None,
        };
        let registry = Registry {
            specs: vec![
                entry("v2250", "a", "attention", Status::Planned),
                entry("v2250", "a", "norm", Status::Implemented),
            ],
        };
        let plugins = [PluginSpec {
            id: "v2201",
            name: "b",
        }];
        let RegistryError::Invalid(problems) = registry.validate(&plugins, None).unwrap_err()
        else {
            panic!("expected validation errors")
        };
        let all = problems.join("\n");
        for needle in [
            "id v2250 is used twice",
            "name `a` is used twice",
            "outside family attention's range",
            "unknown spec `nope`",
            "no plugin is compiled",
            "has no conformance file",
            "compiled plugin `b` (v2201) has no registry entry",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }
}
