//! A JSON object whose keys are ticked off as they are read, so that what no reader asked for
//! can be reported.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::ConfigError;

pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    read: BTreeSet<&'a str>,
    /// Keys of nested objects (`rope_parameters.x`) that their readers did not ask for.
    nested: Vec<String>,
}

/// A count: a non-negative integer, also when written as an integral float (`4096.0`, as
/// some converters write).
fn count(v: &Value) -> Option<usize> {
    let exact = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.007_199_254_740_992e15)
            .map(|f| f as u64)
    });
    exact.and_then(|n| usize::try_from(n).ok())
}

pub fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            read: BTreeSet::new(),
            nested: Vec::new(),
        }
    }

    /// The value of `key` unless absent or null; either way the key counts as read.
    pub fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        self.read.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether the config has `key`, null or not (a null can mean "none" where absence means
    /// the family's default).
    pub fn present(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn is_read(&self, key: &str) -> bool {
        self.read.contains(key)
    }

    /// Marks keys read without looking at them: settings that change nothing here.
    pub fn ignore(&mut self, keys: &[&'a str]) {
        self.read.extend(keys);
    }

    pub fn usize(&mut self, key: &'a str) -> Result<Option<usize>, ConfigError> {
        self.get(key)
            .map(|v| {
                count(v).ok_or_else(|| {
                    invalid(format!("`{key}` must be a non-negative integer, got {v}"))
                })
            })
            .transpose()
    }

    pub fn required_usize(&mut self, key: &'a str) -> Result<usize, ConfigError> {
        match self.usize(key)? {
            Some(0) => Err(invalid(format!("`{key}` must be positive"))),
            Some(n) => Ok(n),
            None => Err(invalid(format!("missing required key `{key}`"))),
        }
    }

    pub fn f64(&mut self, key: &'a str) -> Result<Option<f64>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| invalid(format!("`{key}` must be a number, got {v}")))
            })
            .transpose()
    }

    /// A number that must be above zero where given.
    pub fn positive(&mut self, key: &'a str) -> Result<Option<f64>, ConfigError> {
        match self.f64(key)? {
            Some(v) if v <= 0.0 || !v.is_finite() => Err(invalid(format!(
                "`{key}` must be a positive number, got {v}"
            ))),
            other => Ok(other),
        }
    }

    pub fn bool(&mut self, key: &'a str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| invalid(format!("`{key}` must be true or false, got {v}")))
            })
            .transpose()
    }

    pub fn string(&mut self, key: &'a str) -> Result<Option<String>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("`{key}` must be a string, got {v}")))
            })
            .transpose()
    }

    /// Refuses `key` unless it is absent, null or `supported`: a setting whose other values
    /// change the forward pass in ways no vibee operator implements.
    pub fn only(
        &mut self,
        key: &'a str,
        supported: &Value,
        family: &str,
    ) -> Result<(), ConfigError> {
        match self.get(key) {
            Some(v) if v != supported => Err(invalid(format!(
                "{family}: `{key}: {v}` is not supported (only {supported})"
            ))),
            _ => Ok(()),
        }
    }

    /// A list of layer indices.
    pub fn indices(&mut self, key: &'a str) -> Result<Vec<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(count)
                .collect::<Option<_>>()
                .ok_or_else(|| invalid(format!("`{key}` must be a list of layer indices"))),
            Some(other) => Err(invalid(format!("`{key}` must be a list, got {other}"))),
        }
    }

    /// Every key no reader asked for and `inert` does not name, in the file's order, then
    /// those of nested objects.
    pub fn unread(&self, inert: impl Fn(&str) -> bool) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.read.contains(k.as_str()) && !inert(k))
            .cloned()
            .chain(self.nested.iter().cloned())
            .collect()
    }

    /// Hands the unread keys of the nested object `inner` (this object's `key`) up to this
    /// one's report, as `key.inner_key`, so that one error names every unknown key.
    pub fn adopt(&mut self, key: &str, inner: &Fields<'_>, inert: impl Fn(&str) -> bool) {
        let unread = inner.unread(inert);
        self.nested
            .extend(unread.into_iter().map(|k| format!("{key}.{k}")));
    }
}
