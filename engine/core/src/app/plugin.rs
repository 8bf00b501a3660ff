//! Plugins and the resolution of a `--plugins` list against the registry.
//!
//! A plugin names its spec; what it requires, conflicts with and which exclusive slot it fills
//! are read from that spec's registry entry, so the registry is the single source of truth.

use std::collections::BTreeSet;

use crate::app::registry::{Registry, Status};
use crate::app::App;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PluginSpec {
    pub id: &'static str,
    pub name: &'static str,
}

pub trait Plugin: Send + Sync + 'static {
    fn spec(&self) -> PluginSpec;
    /// Adds the plugin's resources, systems and operators to `app`; an error (a third-party
    /// plugin refusing its configuration) leaves the plugin disabled.
    fn build(&self, app: &mut App) -> anyhow::Result<()>;

    /// The library behind a third-party plugin (a `serving::external::ExternalPlugin`), for
    /// what it offers outside the pipeline (an eval metric).
    fn library(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Implements [`Plugin`] for a unit struct whose whole contribution is one operator: the struct
/// is also the operator's factory. `operator_plugin!(Gqa, "v2202", "gqa", Attention)`.
#[macro_export]
macro_rules! operator_plugin {
    ($plugin:ident, $id:literal, $name:literal, $variant:ident) => {
        impl $crate::Plugin for $plugin {
            fn spec(&self) -> $crate::PluginSpec {
                $crate::PluginSpec {
                    id: $id,
                    name: $name,
                }
            }

            fn build(&self, app: &mut $crate::App) -> ::anyhow::Result<()> {
                app.register_operator($crate::model::ops::Operator::$variant(
                    ::std::sync::Arc::new($plugin),
                ));
                Ok(())
            }
        }
    };
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ResolveError {
    #[error("unknown plugin `{name}`{}", suggestion(.closest))]
    Unknown {
        name: String,
        closest: Option<String>,
    },
    #[error("plugin `{name}` ({id}) is planned, not implemented yet")]
    Planned { name: String, id: String },
    #[error("plugin `{plugin}` requires `{missing}`; add it to --plugins")]
    MissingRequirement { plugin: String, missing: String },
    #[error("`-{name}` leaves out a default plugin, but `{name}` is not one that is enabled by default (or it is also requested)")]
    NotDefault { name: String },
    #[error("plugins `{a}` and `{b}` conflict; enable only one")]
    Conflict { a: String, b: String },
    #[error("plugins `{a}` and `{b}` both fill the exclusive `{slot}` slot; choose one")]
    SlotTaken { a: String, b: String, slot: String },
}

fn suggestion(closest: &Option<String>) -> String {
    closest
        .as_ref()
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

/// Turns requested plugin names into the plugins to enable, in request order, followed by
/// defaults for the slots nothing requested fills. `-NAME` leaves default `NAME` out.
pub fn resolve<'a>(
    requested: &[String],
    registry: &Registry,
    catalog: &'a [Box<dyn Plugin>],
) -> Result<Vec<&'a dyn Plugin>, ResolveError> {
    let find = |name: &str| {
        catalog
            .iter()
            .find(|p| p.spec().name == name)
            .map(|p| p.as_ref())
    };
    let (left_out, requested): (Vec<&String>, Vec<&String>) =
        requested.iter().partition(|n| n.starts_with('-'));
    let left_out: BTreeSet<&str> = left_out.iter().map(|n| &n[1..]).collect();
    for name in &left_out {
        match registry.get(name) {
            Some(entry) if entry.default => {}
            _ => {
                return Err(ResolveError::NotDefault {
                    name: name.to_string(),
                })
            }
        }
    }
    let mut chosen: Vec<&dyn Plugin> = Vec::new();
    for name in requested {
        if left_out.contains(name.as_str()) {
            return Err(ResolveError::NotDefault { name: name.clone() });
        }
        if chosen.iter().any(|p| p.spec().name == name) {
            continue;
        }
        match (find(name), registry.get(name)) {
            (Some(p), _) => chosen.push(p),
            (None, Some(entry)) if entry.status == Status::Planned => {
                return Err(ResolveError::Planned {
                    name: name.clone(),
                    id: entry.id.clone(),
                })
            }
            _ => {
                let closest = registry
                    .specs
                    .iter()
                    .map(|s| (strsim::damerau_levenshtein(name, &s.name), &s.name))
                    .filter(|(d, _)| *d <= 3)
                    .min()
                    .map(|(_, n)| n.clone());
                return Err(ResolveError::Unknown {
                    name: name.clone(),
                    closest,
                });
            }
        }
    }
    let slot_of = |p: &dyn Plugin| registry.get(p.spec().name).and_then(|e| e.provides.clone());
    let filled: BTreeSet<String> = chosen.iter().filter_map(|p| slot_of(*p)).collect();
    for entry in registry
        .specs
        .iter()
        .filter(|e| e.default && !left_out.contains(e.name.as_str()))
    {
        let slot_free = entry.provides.as_ref().is_none_or(|s| !filled.contains(s));
        if let (true, Some(p)) = (slot_free, find(&entry.name)) {
            if !chosen.iter().any(|c| c.spec().name == entry.name) {
                chosen.push(p);
            }
        }
    }
    for (i, a) in chosen.iter().enumerate() {
        let a_name = a.spec().name;
        let entry = registry.get(a_name);
        for needed in entry.map(|e| e.requires.as_slice()).unwrap_or_default() {
            if !chosen.iter().any(|p| p.spec().name == needed) {
                return Err(ResolveError::MissingRequirement {
                    plugin: a_name.into(),
                    missing: needed.clone(),
                });
            }
        }
        for b in &chosen[i + 1..] {
            let b_name = b.spec().name;
            let conflicts = |x: &str, y: &str| {
                registry
                    .get(x)
                    .is_some_and(|e| e.conflicts.iter().any(|c| c == y))
            };
            if conflicts(a_name, b_name) || conflicts(b_name, a_name) {
                return Err(ResolveError::Conflict {
                    a: a_name.into(),
                    b: b_name.into(),
                });
            }
            if let (Some(sa), Some(sb)) = (slot_of(*a), slot_of(*b)) {
                if sa == sb {
                    return Err(ResolveError::SlotTaken {
                        a: a_name.into(),
                        b: b_name.into(),
                        slot: sa,
                    });
                }
            }
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::registry::SpecEntry;

    struct Named(&'static str);

    impl Plugin for Named {
        fn spec(&self) -> PluginSpec {
            PluginSpec {
                id: "v2100",
                name: self.0,
            }
        }

        fn build(&self, _app: &mut App) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn entry(
        name: &str,
        requires: &[&str],
        conflicts: &[&str],
        provides: Option<&str>,
        default: bool,
    ) -> SpecEntry {
        SpecEntry {
            id: format!("v21{:02}", name.len()),
            name: name.into(),
            family: "training".into(),
            summary: String::new(),
            status: Status::Implemented,
            requires: requires.iter().map(|s| s.to_string()).collect(),
            conflicts: conflicts.iter().map(|s| s.to_string()).collect(),
            provides: provides.map(str::to_string),
            default,
            conformance: None,
            origin: None,
        }
    }

    fn setup() -> (Registry, Vec<Box<dyn Plugin>>) {
        let registry = Registry {
            specs: vec![
                entry("lora", &["adamw"], &[], None, false),
                entry("adamw", &[], &["sgd"], Some("optimizer"), true),
                entry("sgd", &[], &[], Some("optimizer"), false),
                entry("muon", &[], &[], Some("optimizer"), false),
            ],
        };
        let catalog: Vec<Box<dyn Plugin>> = ["lora", "adamw", "sgd", "muon"]
            .into_iter()
            .map(|n| Box::new(Named(n)) as Box<dyn Plugin>)
            .collect();
        (registry, catalog)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_fill_free_slots_only() {
        let (registry, catalog) = setup();
        let chosen: Vec<_> = resolve(&names(&["lora"]), &registry, &catalog)
            .unwrap()
            .iter()
            .map(|p| p.spec().name)
            .collect();
        assert_eq!(chosen, ["lora", "adamw"]);
        let chosen: Vec<_> = resolve(&names(&["muon"]), &registry, &catalog)
            .unwrap()
            .iter()
            .map(|p| p.spec().name)
            .collect();
        assert_eq!(chosen, ["muon"]);
    }

    #[test]
    fn a_minus_leaves_a_default_out_and_only_a_default() {
        let (registry, catalog) = setup();
        let chosen = resolve(&names(&["-adamw"]), &registry, &catalog).unwrap();
        assert!(chosen.is_empty());
        for list in [&["-sgd"][..], &["-adamw", "adamw"], &["-nothing"]] {
            let err = resolve(&names(list), &registry, &catalog).err();
            assert!(
                matches!(err, Some(ResolveError::NotDefault { .. })),
                "{list:?}: {err:?}"
            );
        }
        assert_eq!(
            resolve(&names(&["lora", "-adamw"]), &registry, &catalog).err(),
            Some(ResolveError::MissingRequirement {
                plugin: "lora".into(),
                missing: "adamw".into()
            })
        );
    }

    #[test]
    fn missing_requirement_conflict_and_slot_clash_are_errors() {
        let (registry, catalog) = setup();
        assert_eq!(
            resolve(&names(&["lora", "muon"]), &registry, &catalog).err(),
            Some(ResolveError::MissingRequirement {
                plugin: "lora".into(),
                missing: "adamw".into()
            })
        );
        assert_eq!(
            resolve(&names(&["adamw", "sgd"]), &registry, &catalog).err(),
            Some(ResolveError::Conflict {
                a: "adamw".into(),
                b: "sgd".into()
            })
        );
        assert_eq!(
            resolve(&names(&["sgd", "muon"]), &registry, &catalog).err(),
            Some(ResolveError::SlotTaken {
                a: "sgd".into(),
                b: "muon".into(),
                slot: "optimizer".into()
            })
        );
        assert_eq!(
            resolve(&names(&["adamx"]), &registry, &catalog).err(),
            Some(ResolveError::Unknown {
                name: "adamx".into(),
                closest: Some("adamw".into())
            })
        );
    }
}
