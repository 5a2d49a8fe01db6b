//! Checking a config against a checkpoint's tensors before anything is loaded, so that a wrong `config.json` fails
//! at start-up with the tensor and the config key, not as a shape error deep in the forward pass.

use crate::config::TextConfig;
use crate::error::ModelError;

use super::experts::{experts_prefix, fused_name, per_expert_name};
use super::{scale_name, Checkpoint, DType, ExpertLayout};

impl Checkpoint {
    /// Checks every tensor the config implies exists with the implied shape (and that the checkpoint holds no layer
    /// or expert the config does not know). Reads no tensor data.
    pub fn check_against(&self, cfg: &TextConfig) -> Result<(), ModelError> {
        let hidden = cfg.hidden_size;
        let mut names: Vec<(&String, &super::UnsupportedTensor)> = self.unsupported.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        if let Some((name, t)) = names.first() {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                file: t.file.clone(),
                dtype: t.dtype.clone(),
            });
        }

        self.expect("model.embed_tokens.weight", &[cfg.vocab_size, hidden], "vocab_size, hidden_size")?;
        self.expect("model.norm.weight", &[hidden], "hidden_size")?;
        if !cfg.tie_word_embeddings || self.contains("lm_head.weight") {
            self.expect("lm_head.weight", &[cfg.vocab_size, hidden], "vocab_size, hidden_size")?;
        }

        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            self.expect(&format!("{p}.input_layernorm.weight"), &[hidden], "hidden_size")?;
            self.expect(&format!("{p}.post_attention_layernorm.weight"), &[hidden], "hidden_size")?;
            let q = "num_attention_heads * head_dim, hidden_size";
            let kv = "num_key_value_heads * head_dim, hidden_size";
            self.expect(&format!("{p}.self_attn.q_proj.weight"), &[cfg.q_dim(), hidden], q)?;
            self.expect(&format!("{p}.self_attn.k_proj.weight"), &[cfg.kv_dim(), hidden], kv)?;
            self.expect(&format!("{p}.self_attn.v_proj.weight"), &[cfg.kv_dim(), hidden], kv)?;
            let o = "hidden_size, num_attention_heads * head_dim";
            self.expect(&format!("{p}.self_attn.o_proj.weight"), &[hidden, cfg.q_dim()], o)?;
            if cfg.is_moe_layer(l) {
                self.check_moe_layer(l, cfg)?;
            } else {
                self.check_dense_layer(l, cfg)?;
            }
        }

        // A tensor of a layer past the config's last one means the config describes a different model.
        let mut names = self.tensor_names();
        names.retain(|n| {
            n.strip_prefix("model.layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse::<usize>().ok())
                .is_some_and(|index| index >= cfg.num_hidden_layers)
        });
        if let Some(name) = names.first() {
            return Err(self.contradiction(
                name,
                format!("the config has num_hidden_layers {} but the checkpoint has this layer", cfg.num_hidden_layers),
            ));
        }
        Ok(())
    }

    fn check_moe_layer(&self, l: usize, cfg: &TextConfig) -> Result<(), ModelError> {
        let (hidden, inter, experts) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts);
        let p = format!("model.layers.{l}.feed_forward");
        let router = format!("{p}.router.weight");
        if !self.contains(&router) {
            return Err(
                self.contradiction(&router, format!("missing: moe_layers lists layer {l}, so it needs a router"))
            );
        }
        self.expect(&router, &[experts, hidden], "num_local_experts, hidden_size")?;
        let shared = "intermediate_size, hidden_size";
        self.expect(&format!("{p}.shared_expert.gate_proj.weight"), &[inter, hidden], shared)?;
        self.expect(&format!("{p}.shared_expert.up_proj.weight"), &[inter, hidden], shared)?;
        let shared_down = "hidden_size, intermediate_size";
        self.expect(&format!("{p}.shared_expert.down_proj.weight"), &[hidden, inter], shared_down)?;

        match self.expert_layout {
            Some(ExpertLayout::Fused) => {
                let gu = "num_local_experts, hidden_size, 2 * intermediate_size";
                self.expect(&fused_name(l, "gate_up_proj"), &[experts, hidden, 2 * inter], gu)?;
                let dn = "num_local_experts, intermediate_size, hidden_size";
                self.expect(&fused_name(l, "down_proj"), &[experts, inter, hidden], dn)?;
            }
            Some(ExpertLayout::PerExpert) => {
                let prefix = experts_prefix(l);
                let beyond = self
                    .tensor_names()
                    .into_iter()
                    .filter_map(|n| {
                        let index = n.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok()?;
                        (index >= experts).then_some((index, n))
                    })
                    .min();
                if let Some((index, name)) = beyond {
                    return Err(
                        self.contradiction(name, format!("expert {index} exists but num_local_experts is {experts}"))
                    );
                }
                for e in 0..experts {
                    for (which, shape) in
                        [("gate_proj", [inter, hidden]), ("up_proj", [inter, hidden]), ("down_proj", [hidden, inter])]
                    {
                        let name = per_expert_name(l, e, which);
                        let keys = if which == "down_proj" {
                            "hidden_size, intermediate_size"
                        } else {
                            "intermediate_size, hidden_size"
                        };
                        self.expect(&name, &shape, keys)?;
                        if self.tensor_info(&name)?.dtype == DType::F8E4M3 && !self.contains(&scale_name(&name)) {
                            return Err(self.contradiction(
                                &scale_name(&name),
                                format!("missing: {name} is F8_E4M3 and needs a per-row scale"),
                            ));
                        }
                    }
                }
            }
            None => {
                return Err(self.contradiction(
                    &fused_name(l, "gate_up_proj"),
                    format!("missing: moe_layers lists layer {l} but the checkpoint has no routed experts"),
                ))
            }
        }
        Ok(())
    }

    fn check_dense_layer(&self, l: usize, cfg: &TextConfig) -> Result<(), ModelError> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size_mlp);
        let p = format!("model.layers.{l}.feed_forward");
        let router = format!("{p}.router.weight");
        if self.contains(&router) {
            return Err(self.contradiction(
                &router,
                format!("moe_layers does not list layer {l} (a dense layer) but the checkpoint has a router for it"),
            ));
        }
        let up = "intermediate_size_mlp, hidden_size";
        self.expect(&format!("{p}.gate_proj.weight"), &[inter, hidden], up)?;
        self.expect(&format!("{p}.up_proj.weight"), &[inter, hidden], up)?;
        self.expect(&format!("{p}.down_proj.weight"), &[hidden, inter], "hidden_size, intermediate_size_mlp")
    }

    /// Tensor `name` must exist with `shape`; `keys` names the config keys the shape comes from.
    fn expect(&self, name: &str, shape: &[usize], keys: &str) -> Result<(), ModelError> {
        let info = match self.tensor_info(name) {
            Ok(info) => info,
            Err(ModelError::MissingTensor { .. }) => {
                return Err(self.contradiction(name, format!("missing: the config ({keys}) implies shape {shape:?}")))
            }
            Err(other) => return Err(other),
        };
        if info.shape != shape {
            return Err(ModelError::ConfigContradictsTensors {
                name: name.to_string(),
                file: info.file.clone(),
                reason: format!("shape is {:?} but the config ({keys}) implies {shape:?}", info.shape),
            });
        }
        Ok(())
    }

    /// A contradiction about `name`, located in the tensor's file when it exists, else the checkpoint's source.
    fn contradiction(&self, name: &str, reason: String) -> ModelError {
        let file = self.tensors.get(name).map(|t| t.file.clone()).unwrap_or_else(|| self.source.clone());
        ModelError::ConfigContradictsTensors { name: name.to_string(), file, reason }
    }
}
