//! Rotary position settings: `rope_theta` + `rope_scaling` (transformers 4.x) or
//! `rope_parameters` (5.x).

use serde_json::Value;

use super::families::Defaults;
use super::fields::{invalid, Fields};
use super::{ConfigError, RopeScaling};

/// Reads `rope_theta` + `rope_scaling` (4.x) or `rope_parameters` (5.x).
/// Returns the base, the frequency scaling and the fraction of each head that rotates.
pub fn rope<'a>(
    f: &mut Fields<'a>,
    max_position_embeddings: usize,
    defaults: &Defaults,
) -> Result<(f64, RopeScaling, f64), ConfigError> {
    let top_theta = f.positive("rope_theta")?;
    let top_partial = f.f64("partial_rotary_factor")?;
    // A top-level `original_max_position_embeddings` (Phi-3's form) is read only by the
    // config classes that define it, where it overrides the scaling's own (transformers 5.24).
    let top_original = match defaults.original_max_position_embeddings {
        Some(default) => Some(
            f.usize("original_max_position_embeddings")?
                .unwrap_or(default),
        ),
        None => {
            f.ignore(&["original_max_position_embeddings"]);
            None
        }
    };
    let (params, key) =
        match (f.get("rope_parameters"), f.get("rope_scaling")) {
            (Some(_), Some(_)) => return Err(invalid(
                "both `rope_parameters` and `rope_scaling` are given: one config form or the other"
                    .into(),
            )),
            (Some(p), None) => (Some(p), "rope_parameters"),
            (None, scaling) => (scaling, "rope_scaling"),
        };
    let Some(params) = params else {
        return Ok((
            top_theta.unwrap_or(defaults.rope_theta),
            RopeScaling::None,
            top_partial.unwrap_or(defaults.partial_rotary),
        ));
    };
    let map = params
        .as_object()
        .ok_or_else(|| invalid(format!("`{key}` must be an object")))?;
    let mut p = Fields::new(map);
    // Where neither gives it, transformers takes max_position_embeddings.
    let original = |p: &mut Fields<'a>| -> Result<usize, ConfigError> {
        let inner = p.usize("original_max_position_embeddings")?;
        match top_original.or(inner).unwrap_or(max_position_embeddings) {
            0 => Err(invalid(
                "original_max_position_embeddings must be positive".into(),
            )),
            n => Ok(n),
        }
    };
    // Scaling settings that no model uses and that turn the frequencies into infinities or
    // NaNs: refused by name.
    let positive = |name: &str, value: f64| match value > 0.0 && value.is_finite() {
        true => Ok(value),
        false => Err(invalid(format!(
            "`{key}.{name}` must be positive, got {value}"
        ))),
    };
    let theta = p
        .positive("rope_theta")?
        .or(top_theta)
        .unwrap_or(defaults.rope_theta);
    let partial = p
        .f64("partial_rotary_factor")?
        .or(top_partial)
        .unwrap_or(defaults.partial_rotary);
    // transformers 5 converts a 4.x `type` into `rope_type` and may leave the old key beside
    // it; the two must then agree.
    let kind = match (p.string("rope_type")?, p.string("type")?) {
        (Some(kind), Some(legacy)) if kind != legacy => {
            return Err(invalid(format!(
                "`{key}` has rope_type `{kind}` but type `{legacy}`"
            )))
        }
        (Some(kind), _) | (None, Some(kind)) => kind,
        (None, None) => "default".into(),
    };
    let mut factor = || {
        p.positive("factor")?
            .ok_or_else(|| invalid(format!("`{key}` of type {kind} needs `factor`")))
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => {
            let factor = factor()?;
            let mut need = |name| {
                p.f64(name)?
                    .ok_or_else(|| invalid(format!("`{key}` of type llama3 needs `{name}`")))
            };
            let low_freq_factor = positive("low_freq_factor", need("low_freq_factor")?)?;
            let high_freq_factor = positive("high_freq_factor", need("high_freq_factor")?)?;
            if high_freq_factor <= low_freq_factor {
                return Err(invalid(format!(
                    "`{key}.high_freq_factor` ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"
                )));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original(&mut p)?,
            }
        }
        "yarn" => {
            let factor = factor()?;
            let original = original(&mut p)?;
            let mscale = p.f64("mscale")?;
            let mscale_all_dim = p.f64("mscale_all_dim")?;
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention_factor = match (p.f64("attention_factor")?, mscale, mscale_all_dim) {
                (Some(a), ..) => positive("attention_factor", a)?,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => get_mscale(factor, m) / get_mscale(factor, all),
                _ => get_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: positive("beta_fast", p.f64("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0))?,
                beta_slow: positive("beta_slow", p.f64("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0))?,
                truncate: p.bool("truncate")?.unwrap_or(true),
                attention_factor,
                // Latent attention scales its softmax by this squared (DeepSeek's yarn_apply_mscale).
                softmax_mscale: mscale_all_dim.filter(|m| *m != 0.0).map_or(1.0, |m| get_mscale(factor, m)),
            }
        }
        // "su" is the name Phi-3's first configs gave longrope.
        "longrope" | "su" => {
            let original = original(&mut p)?;
            let mut list = |name| -> Result<Vec<f64>, ConfigError> {
                p.get(name)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| invalid(format!("`{key}.{name}` must be a list of numbers")))
            };
            let (short, long) = (list("short_factor")?, list("long_factor")?);
            for (name, factors) in [("short_factor", &short), ("long_factor", &long)] {
                if let Some(bad) = factors.iter().find(|f| !(**f > 0.0 && f.is_finite())) {
                    return Err(invalid(format!(
                        "`{key}.{name}` holds {bad}: every factor must be positive"
                    )));
                }
            }
            let attention = p.f64("attention_factor")?;
            let factor = p.f64("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
            let attention_factor = match attention {
                Some(a) => positive("attention_factor", a)?,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short,
                long,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(invalid(format!(
                "{key}.rope_type `{other}` is not supported (supported: default, linear, dynamic, llama3, yarn, longrope)"
            )))
        }
    };
    if kind == "dynamic" {
        // transformers grows the base past `max_position_embeddings`, whatever this says.
        p.usize("original_max_position_embeddings")?;
    }
    f.adopt(key, &p, |_| false);
    Ok((theta, scaling, partial))
}
