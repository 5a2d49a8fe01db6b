//! Which experts a worker holds: the `--experts` spec.
//!
//! Three forms, written the way an operator thinks about placement:
//! - `all`: every expert of every MoE layer (and `none`: no expert, for a worker the coordinator fills);
//! - `0-3,8`: these experts in every MoE layer;
//! - `1:0-3;3:4-7`: per decoder layer, `layer:list` parts separated by `;` (a list may also be `all`); layers not
//!   named hold none.
//!
//! Ranges are inclusive. Parsing checks only the syntax; [`ExpertSpec::resolve`] checks the spec against a model
//! (expert ids below `num_local_experts`, named layers are MoE layers) and gives the experts per layer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use switchyard_model::config::TextConfig;

/// Experts by decoder layer index: what a worker holds, loads or unloads.
pub type ExpertsByLayer = BTreeMap<usize, BTreeSet<u32>>;

/// A parsed `--experts` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSpec {
    /// Every expert of every MoE layer.
    All,
    /// These experts in every MoE layer.
    Every(BTreeSet<u32>),
    /// Per decoder layer; a `None` list means every expert of that layer. Layers not named hold none.
    PerLayer(BTreeMap<usize, Option<BTreeSet<u32>>>),
}

/// A spec that cannot be parsed, or that does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not a spec; `part` is the piece at fault.
    #[error(
        "invalid expert spec {spec:?} at {part:?}: {reason} (expected `all`, `none`, a list like `0-3,8`, or per layer \
         `1:0-3;3:4-7`)"
    )]
    Syntax {
        /// The whole spec.
        spec: String,
        /// The piece at fault.
        part: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The spec names a layer or expert the model does not have.
    #[error("expert spec {spec} does not fit the model: {reason}")]
    Model {
        /// The spec (its canonical form).
        spec: String,
        /// What does not fit, naming the layer or expert and the model's limit.
        reason: String,
    },
}

impl FromStr for ExpertSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let syntax = |part: &str, reason: &str| SpecError::Syntax {
            spec: spec.to_string(),
            part: part.to_string(),
            reason: reason.to_string(),
        };
        let text = spec.trim();
        if text.is_empty() {
            return Err(syntax(text, "empty"));
        }
        if text.eq_ignore_ascii_case("all") {
            return Ok(ExpertSpec::All);
        }
        if text.eq_ignore_ascii_case("none") {
            return Ok(ExpertSpec::none());
        }
        if !text.contains(':') {
            if text.contains(';') {
                return Err(syntax(text, "`;` separates per-layer parts, written `layer:list`"));
            }
            return parse_list(text).map(ExpertSpec::Every).map_err(|(part, reason)| syntax(&part, &reason));
        }
        let mut layers = BTreeMap::new();
        for part in text.split(';') {
            let part = part.trim();
            let Some((layer, list)) = part.split_once(':') else {
                return Err(syntax(part, "not `layer:list`"));
            };
            let layer: usize = layer.trim().parse().map_err(|_| syntax(part, "no layer number before `:`"))?;
            let list = list.trim();
            let experts = if list.eq_ignore_ascii_case("all") {
                None
            } else {
                Some(
                    parse_list(list)
                        .map_err(|(bad, reason)| syntax(&bad, &format!("{reason} (in layer part {part:?})")))?,
                )
            };
            if layers.insert(layer, experts).is_some() {
                return Err(syntax(part, &format!("layer {layer} named a second time")));
            }
        }
        Ok(ExpertSpec::PerLayer(layers))
    }
}

/// Largest expert id a spec may name: far above any Llama 4 model (Maverick has 128), low enough that a typo like
/// `0-4000000000` is refused at parsing instead of filling memory.
pub const MAX_EXPERT_ID: u32 = 65_535;

/// `0-3,8` as a set; on error, the bad item and why.
fn parse_list(list: &str) -> Result<BTreeSet<u32>, (String, String)> {
    let mut experts = BTreeSet::new();
    for item in list.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err((list.to_string(), "empty item".to_string()));
        }
        let number = |s: &str| -> Result<u32, (String, String)> {
            s.trim().parse().map_err(|_| (item.to_string(), format!("{:?} is not an expert id", s.trim())))
        };
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let id = number(item)?;
                (id, id)
            }
        };
        if first > last {
            return Err((item.to_string(), format!("reversed range: {first} > {last}")));
        }
        if last > MAX_EXPERT_ID {
            return Err((item.to_string(), format!("past the largest expert id supported, {MAX_EXPERT_ID}")));
        }
        experts.extend(first..=last);
    }
    Ok(experts)
}

impl ExpertSpec {
    /// No expert at all: a worker in a coordinated cluster starts empty and loads what the coordinator assigns.
    pub fn none() -> Self {
        ExpertSpec::PerLayer(BTreeMap::new())
    }

    /// The experts this spec names in `text`'s model, by MoE layer; every MoE layer of an `all` or list spec
    /// appears, even when a list holds no expert of it. Refuses expert ids at or past `num_local_experts` and layers
    /// that are not MoE layers.
    pub fn resolve(&self, text: &TextConfig) -> Result<ExpertsByLayer, SpecError> {
        let every: BTreeSet<u32> = (0..text.num_local_experts).map(|e| e as u32).collect();
        let selected: ExpertsByLayer = match self {
            ExpertSpec::All => text.moe_layers.iter().map(|&layer| (layer, every.clone())).collect(),
            ExpertSpec::Every(experts) => text.moe_layers.iter().map(|&layer| (layer, experts.clone())).collect(),
            ExpertSpec::PerLayer(layers) => layers
                .iter()
                .map(|(&layer, experts)| (layer, experts.clone().unwrap_or_else(|| every.clone())))
                .collect(),
        };
        check_experts(text, &selected).map_err(|reason| SpecError::Model { spec: self.to_string(), reason })?;
        Ok(selected)
    }
}

/// Checks that every layer of `experts` is an MoE layer of `text` and every id is below `num_local_experts`; the
/// error names the first offender and the model's limits.
pub fn check_experts(text: &TextConfig, experts: &ExpertsByLayer) -> Result<(), String> {
    for (&layer, ids) in experts {
        if layer >= text.num_hidden_layers || !text.is_moe_layer(layer) {
            return Err(format!(
                "layer {layer} is not an MoE layer (the model has {} layers; MoE layers {:?})",
                text.num_hidden_layers, text.moe_layers
            ));
        }
        if let Some(&expert) = ids.iter().find(|&&e| e as usize >= text.num_local_experts) {
            return Err(format!(
                "expert {expert} of layer {layer} does not exist: num_local_experts is {}",
                text.num_local_experts
            ));
        }
    }
    Ok(())
}

/// Writes ids with consecutive runs as ranges: `0-3,8`.
fn write_list(f: &mut fmt::Formatter<'_>, experts: &BTreeSet<u32>) -> fmt::Result {
    let mut iter = experts.iter().copied().peekable();
    let mut first = true;
    while let Some(start) = iter.next() {
        let mut end = start;
        while end < u32::MAX && iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        if !first {
            f.write_str(",")?;
        }
        first = false;
        if start == end {
            write!(f, "{start}")?;
        } else {
            write!(f, "{start}-{end}")?;
        }
    }
    Ok(())
}

/// The canonical form, which parses back to an equal spec (an empty list prints as nothing and does not).
impl fmt::Display for ExpertSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpertSpec::All => f.write_str("all"),
            ExpertSpec::Every(experts) => write_list(f, experts),
            ExpertSpec::PerLayer(layers) if layers.is_empty() => f.write_str("none"),
            ExpertSpec::PerLayer(layers) => {
                for (i, (layer, experts)) in layers.iter().enumerate() {
                    if i > 0 {
                        f.write_str(";")?;
                    }
                    write!(f, "{layer}:")?;
                    match experts {
                        None => f.write_str("all")?,
                        Some(experts) => write_list(f, experts)?,
                    }
                }
                Ok(())
            }
        }
    }
}
