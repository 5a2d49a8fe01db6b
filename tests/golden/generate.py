#!/usr/bin/env python3
"""Writes the Llama 4 golden fixtures that the Rust forward pass is tested against.

Every fixture is a tiny checkpoint plus `reference.safetensors`, the logits HuggingFace transformers'
`Llama4ForCausalLM` (float32, eager attention) computes on it. Weights, prompts and every choice below come
from fixed seeds, so running this again rewrites byte-identical checkpoints (see README.md).

Run it through `generate.sh`, which pins the versions in requirements.txt.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Llama4Config, Llama4ForCausalLM, Llama4TextConfig
from transformers.models.llama4 import modeling_llama4

HERE = Path(__file__).resolve().parent

PROMPT_LEN = 21
NEW_TOKENS = 20
# A 1e-4 numerical difference on the Rust side must never flip a greedy token.
MIN_GREEDY_MARGIN = 1e-3
# Switching temperature tuning / llama3 scaling / chunking off must move the logits by more than this,
# otherwise the fixture would not exercise the feature.
MIN_FEATURE_EFFECT = 1e-3
FP8_E4M3_MAX = 448.0
# How many consecutive seeds to try before giving up on a fixture (margin or expert coverage too small).
SEED_ATTEMPTS = 50

# Output-logit gain: logits have std ~LOGIT_GAIN, so the greedy choice is well separated.
LOGIT_GAIN = 2.0
# Router-logit gain: large enough that the sigmoid scores vary, small enough that routing follows the input.
ROUTER_GAIN = 2.0

# Special token ids inside the tiny vocabulary (the real ones, 200000+, do not fit).
BOS_ID = 1
EOS_IDS = [2, 3, 4]
PAD_ID = 5

MAVERICK_TEXT = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 32,
    "intermediate_size_mlp": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "num_local_experts": 8,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "use_qk_norm": False,
    "attention_chunk_size": 8,
    "attn_temperature_tuning": True,
    "floor_scale": 4,
    "attn_scale": 0.5,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_IDS,
    "pad_token_id": PAD_ID,
}
MAVERICK_ROPE_THETA = 10000.0

SCOUT_TEXT = {
    **MAVERICK_TEXT,
    "num_local_experts": 4,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
}
SCOUT_ROPE_THETA = 10000.0
# Small original_max_position_embeddings so that the llama3 scaling changes the angles at these positions.
SCOUT_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


class FixtureRejected(Exception):
    """The weights drawn from one seed make a weak fixture (tiny greedy margin, idle experts)."""


# ----------------------------------------------------------------------------------------------------------
# Model construction


def text_config(base: dict, rope_theta: float, rope_scaling: dict | None) -> Llama4TextConfig:
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters = {**rope_scaling, "rope_theta": rope_theta}
    config = Llama4TextConfig(**base, rope_parameters=rope_parameters)
    config._attn_implementation = "eager"
    return config


def build_model(config: Llama4TextConfig) -> Llama4ForCausalLM:
    model = Llama4ForCausalLM(config)
    model.config._attn_implementation = "eager"
    model.eval()
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() != emb.data_ptr(), "lm_head must not be tied"
    return model


def fill_random_weights(model: Llama4ForCausalLM, seed: int) -> None:
    """std ~ 1/sqrt(fan_in) everywhere, so activations stay O(1) through the layers (not HF's 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]

            def randn(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen, dtype=torch.float32)

            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * randn(*t.shape)
            elif name.endswith("embed_tokens.weight"):
                value = randn(*t.shape)
            elif name.endswith("experts.gate_up_proj"):
                e, h, i2 = t.shape
                value = randn(e, h, i2) / math.sqrt(h)
            elif name.endswith("experts.down_proj"):
                e, i, h = t.shape
                value = randn(e, i, h) / math.sqrt(i)
            elif name.endswith("router.weight"):
                value = ROUTER_GAIN * randn(*t.shape) / math.sqrt(t.shape[1])
            elif name == "lm_head.weight":
                value = LOGIT_GAIN * randn(*t.shape) / math.sqrt(t.shape[1])
            elif t.dim() == 2:
                value = randn(*t.shape) / math.sqrt(t.shape[1])
            else:
                raise ValueError(f"no init rule for {name} {tuple(t.shape)}")
            t.copy_(value)


# ----------------------------------------------------------------------------------------------------------
# Reference computation


@torch.no_grad()
def logits_of(model: Llama4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """One uncached forward over `ids` [T]; logits [T, vocab] at every position."""
    out = model(input_ids=ids[None], use_cache=False)
    return out.logits[0].float()


@contextlib.contextmanager
def routed_experts(model: Llama4ForCausalLM):
    """Collects, per MoE layer, the top-1 expert each token was routed to."""
    choices: dict[int, list[torch.Tensor]] = {}
    handles = []
    for idx, layer in enumerate(model.model.layers):
        if not layer.is_moe_layer:
            continue
        choices[idx] = []

        def hook(_module, _inputs, output, idx=idx):
            _scores, router_logits = output
            choices[idx].append(router_logits.argmax(dim=-1))

        handles.append(layer.feed_forward.router.register_forward_hook(hook))
    try:
        yield choices
    finally:
        for h in handles:
            h.remove()


def expert_counts(model: Llama4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Tokens routed to each expert, [num_moe_layers, num_experts], over one forward of `ids`."""
    num_experts = model.config.num_local_experts
    with routed_experts(model) as choices:
        logits_of(model, ids)
    rows = []
    for idx in sorted(choices):
        (chosen,) = choices[idx]
        rows.append(torch.bincount(chosen, minlength=num_experts))
    return torch.stack(rows).to(torch.int64)


def greedy_reference(model: Llama4ForCausalLM, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    prompt_logits = logits_of(model, prompt)
    seq = prompt.clone()
    tokens, decode_logits = [], []
    for step in range(NEW_TOKENS):
        # Ground truth: a full forward over prompt + tokens so far, no KV cache.
        last = logits_of(model, seq)[-1]
        top2 = torch.topk(last, 2).values
        margin = float(top2[0] - top2[1])
        if margin < MIN_GREEDY_MARGIN:
            raise FixtureRejected(f"greedy margin {margin:.2e} at decode step {step}")
        token = int(last.argmax())
        if token in EOS_IDS:
            # A runtime that stops at EOS would end the continuation early.
            raise FixtureRejected(f"greedy picks EOS id {token} at decode step {step}")
        tokens.append(token)
        decode_logits.append(last)
        seq = torch.cat([seq, torch.tensor([token], dtype=torch.int64)])
    decode = torch.stack(decode_logits)
    assert torch.equal(decode[0], prompt_logits[-1]), "decode_logits[0] must equal prompt_logits[P-1]"
    return {
        "prompt_ids": prompt.clone(),
        "prompt_logits": prompt_logits.contiguous(),
        "greedy_tokens": torch.tensor(tokens, dtype=torch.int64),
        "decode_logits": decode.contiguous(),
    }


@torch.no_grad()
def check_cached_generate(model: Llama4ForCausalLM, ref: dict[str, torch.Tensor]) -> float:
    """HF's own KV-cached greedy generate must pick the same tokens as the uncached ground truth."""
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.pad_token_id = PAD_ID
    gen_config.do_sample = False
    gen_config.max_new_tokens = NEW_TOKENS
    gen_config.output_logits = True
    gen_config.return_dict_in_generate = True
    # Never stop at an EOS id: all NEW_TOKENS steps are compared. generate() fills a None eos_token_id from
    # model.generation_config, so that one has to lose it too while generating.
    gen_config.eos_token_id = None
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(ref["prompt_ids"][None], generation_config=gen_config)
    finally:
        model.generation_config.eos_token_id = saved_eos
    cached_tokens = out.sequences[0, PROMPT_LEN:]
    assert len(out.logits) == NEW_TOKENS, f"generate stopped after {len(out.logits)} tokens"
    if not torch.equal(cached_tokens, ref["greedy_tokens"]):
        raise AssertionError(f"cached generate {cached_tokens.tolist()} != {ref['greedy_tokens'].tolist()}")
    cached_logits = torch.stack([l[0].float() for l in out.logits])
    diff = float((cached_logits - ref["decode_logits"]).abs().max())
    assert diff < 1e-3, f"cached generate logits differ from uncached by {diff}"
    return diff


def full_sequence(ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """Prompt plus every greedy token whose successor was decoded: all positions the reference covers."""
    return torch.cat([ref["prompt_ids"], ref["greedy_tokens"][:-1]])


def effect_of(model: Llama4ForCausalLM, ids: torch.Tensor, switch_off) -> float:
    """Max |logit change| over `ids` when `switch_off(model)` (a context manager) disables a feature."""
    base = logits_of(model, ids)
    with switch_off(model):
        changed = logits_of(model, ids)
    return float((base - changed).abs().max())


@contextlib.contextmanager
def no_temperature_tuning(model: Llama4ForCausalLM):
    attns = [layer.self_attn for layer in model.model.layers]
    saved = [a.attn_temperature_tuning for a in attns]
    for a in attns:
        a.attn_temperature_tuning = False
    try:
        yield
    finally:
        for a, s in zip(attns, saved):
            a.attn_temperature_tuning = s


@contextlib.contextmanager
def no_chunking(model: Llama4ForCausalLM):
    saved = model.config.attention_chunk_size
    model.config.attention_chunk_size = 1 << 30
    try:
        yield
    finally:
        model.config.attention_chunk_size = saved


@contextlib.contextmanager
def unscaled_rope(model: Llama4ForCausalLM):
    rotary = model.model.rotary_emb
    saved = rotary.inv_freq.clone()
    theta = model.config.rope_parameters["rope_theta"]
    dim = model.config.head_dim
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    assert not torch.equal(plain, saved), "llama3 scaling left inv_freq unchanged"
    rotary.inv_freq.copy_(plain)
    try:
        yield
    finally:
        rotary.inv_freq.copy_(saved)


def f64_noise(model: Llama4ForCausalLM, ids: torch.Tensor) -> float:
    """How far float32 logits sit from a float64 run (RoPE stays f32 inside HF): a floor for tolerances."""
    m64 = copy.deepcopy(model).double()
    return float((logits_of(model, ids).double() - logits_of(m64, ids)).abs().max())


def random_prompt(seed: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (PROMPT_LEN,), generator=gen, dtype=torch.int64)


def check_routing(counts: torch.Tensor, min_used: int) -> None:
    for row, layer_counts in enumerate(counts):
        used = int((layer_counts > 0).sum())
        if used < min_used:
            raise FixtureRejected(f"MoE layer #{row} routes the prompt to only {used} experts")


def print_summary(name: str, model: Llama4ForCausalLM, ref: dict[str, torch.Tensor], extra: dict) -> None:
    moe_layers = [i for i, layer in enumerate(model.model.layers) if layer.is_moe_layer]
    print(f"[{name}] greedy tokens: {ref['greedy_tokens'].tolist()}")
    margins = []
    for row in ref["decode_logits"]:
        top2 = torch.topk(row, 2).values
        margins.append(float(top2[0] - top2[1]))
    print(f"[{name}] min greedy margin {min(margins):.4f}; prompt logits std {float(ref['prompt_logits'].std()):.3f}")
    for layer, counts in zip(moe_layers, ref["router_expert_counts"]):
        print(f"[{name}] layer {layer} prompt tokens per expert: {counts.tolist()}")
    for key, value in extra.items():
        print(f"[{name}] {key}: {value}")


def save_reference(folder: Path, ref: dict[str, torch.Tensor], seeds: dict[str, int]) -> None:
    # One key only: safetensors writes metadata in hash-map order, so several keys would make the file
    # differ from run to run.
    described = ", ".join(f"{k} {v}" for k, v in seeds.items())
    metadata = {
        "generated_by": f"tests/golden/generate.py (transformers {transformers.__version__}, "
        f"torch {torch.__version__.split('+')[0]}, {described})"
    }
    save_file({k: v.contiguous() for k, v in ref.items()}, str(folder / "reference.safetensors"), metadata)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


def search_seed(name: str, base_seed: int, attempt_fn):
    """Tries seeds base_seed, base_seed+1, ... until `attempt_fn(seed)` accepts one; deterministic."""
    for seed in range(base_seed, base_seed + SEED_ATTEMPTS):
        try:
            return seed, attempt_fn(seed)
        except FixtureRejected as why:
            print(f"[{name}] seed {seed} rejected: {why}")
    raise SystemExit(f"[{name}] no acceptable seed in {SEED_ATTEMPTS} tries")


def hf_fixture(
    name: str,
    config: Llama4TextConfig,
    base_seed: int,
    min_used_experts: int,
    legacy_rope: dict | None,
    checks: dict,
) -> dict:
    """A checkpoint written by HF's save_pretrained, plus its reference logits."""
    folder = HERE / name
    model = build_model(config)
    prompt = random_prompt(base_seed + 1000, config.vocab_size)

    def attempt(seed: int):
        fill_random_weights(model, seed)
        counts = expert_counts(model, prompt)
        check_routing(counts, min_used_experts)
        ref = greedy_reference(model, prompt)
        ref["router_expert_counts"] = counts
        return ref

    seed, ref = search_seed(name, base_seed, attempt)
    ids = full_sequence(ref)
    extra = {"weight seed": seed, "prompt seed": base_seed + 1000}
    for label, switch_off in checks.items():
        effect = effect_of(model, ids, switch_off)
        assert effect > MIN_FEATURE_EFFECT, f"{label} moves the logits by only {effect}"
        extra[f"max |logit change| without {label}"] = f"{effect:.4f}"
    extra["cached generate max |logit diff| vs uncached"] = f"{check_cached_generate(model, ref):.3e}"
    extra["f32 vs f64 max |logit diff|"] = f"{f64_noise(model, ids):.3e}"

    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if legacy_rope is not None:
        rewrite_rope_as_hub_config(folder / "config.json", legacy_rope)
    save_reference(folder, ref, {"weight_seed": seed, "prompt_seed": base_seed + 1000})

    # The files alone must reproduce the reference: reload them as any user of transformers would.
    reloaded = Llama4ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    reloaded.eval()
    reload_diff = float((logits_of(reloaded, ids) - logits_of(model, ids)).abs().max())
    assert reload_diff == 0.0, f"reloaded {name} differs by {reload_diff}"
    print_summary(name, model, ref, extra)
    return {"folder": folder, "model": model, "ref": ref}


def rewrite_rope_as_hub_config(path: Path, legacy_rope: dict) -> None:
    """Writes RoPE the way the hub's Llama 4 configs do (`rope_theta` + `rope_scaling`).

    transformers 5 saves a `rope_parameters` dict instead; it still reads the hub's keys, which the reload
    check right after proves.
    """
    config = json.loads(path.read_text())
    del config["rope_parameters"]
    config["rope_theta"] = legacy_rope["rope_theta"]
    config["rope_scaling"] = legacy_rope["rope_scaling"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The FP8 (compressed-tensors) Maverick layout


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear weight [out, in] -> (e4m3 codes [out, in], float32 scale [out, 1]), symmetric per row."""
    amax = weight.abs().amax(dim=1, keepdim=True)
    assert bool((amax > 0).all()), "an all-zero row cannot be scaled"
    scale = (amax / FP8_E4M3_MAX).to(torch.float32)
    codes = (weight / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale


def fp8_checkpoint_tensors(model: Llama4ForCausalLM) -> dict[str, torch.Tensor]:
    """Turns the float32 model into the FP8 checkpoint's tensors and makes the model hold exactly those values.

    Routed experts: per expert, unfused, e4m3 with per-output-channel scales. Everything else: bf16.
    """
    inter = model.config.intermediate_size
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                continue
            stored = t.to(torch.bfloat16)
            t.copy_(stored.to(torch.float32))
            out["language_model." + name] = stored.contiguous()
        for idx, layer in enumerate(model.model.layers):
            if not layer.is_moe_layer:
                continue
            experts = layer.feed_forward.experts
            prefix = f"language_model.model.layers.{idx}.feed_forward.experts"
            for e in range(experts.gate_up_proj.shape[0]):
                linear = {
                    "gate_proj": experts.gate_up_proj[e][:, :inter].T,
                    "up_proj": experts.gate_up_proj[e][:, inter:].T,
                    "down_proj": experts.down_proj[e].T,
                }
                deq = {}
                for proj, weight in linear.items():
                    codes, scale = quantize_fp8_per_channel(weight.contiguous())
                    out[f"{prefix}.{e}.{proj}.weight"] = codes.contiguous()
                    out[f"{prefix}.{e}.{proj}.weight_scale"] = scale.contiguous()
                    deq[proj] = dequantize_fp8(codes, scale)
                experts.gate_up_proj[e][:, :inter].copy_(deq["gate_proj"].T)
                experts.gate_up_proj[e][:, inter:].copy_(deq["up_proj"].T)
                experts.down_proj[e].copy_(deq["down_proj"].T)
    return out


def fp8_ignore_list(model: Llama4ForCausalLM) -> list[str]:
    """Every nn.Linear the FP8 checkpoint keeps in bf16: all but the routed experts."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.append("language_model." + name)
    return sorted(names, key=natural_key)


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.replace(".", " . ").split()]


def fp8_config(model: Llama4ForCausalLM, text: dict) -> dict:
    """Nested `llama4` config in the style of the hub's Maverick FP8 checkpoint.

    `moe_layers`, `no_rope_layers` and `layer_types` are left out on purpose: a loader must derive them from
    `interleave_moe_layer_step` and the default NoPE interval (the f32 fixtures spell them out instead).
    """
    group = {
        "input_activations": {
            "actorder": None,
            "block_structure": None,
            "dynamic": True,
            "group_size": None,
            "num_bits": 8,
            "observer": None,
            "observer_kwargs": {},
            "strategy": "token",
            "symmetric": True,
            "type": "float",
        },
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {
            "actorder": None,
            "block_structure": None,
            "dynamic": False,
            "group_size": None,
            "num_bits": 8,
            "observer": "minmax",
            "observer_kwargs": {},
            "strategy": "channel",
            "symmetric": True,
            "type": "float",
        },
    }
    text_config = {
        "model_type": "llama4_text",
        **text,
        "rope_theta": MAVERICK_ROPE_THETA,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": text_config,
        "quantization_config": {
            "config_groups": {"group_0": group},
            "format": "float-quantized",
            "global_compression_ratio": None,
            "ignore": fp8_ignore_list(model),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        },
    }


def shard_of(name: str, split_layer: int, split_expert: int) -> int:
    """Shard 1 holds the embeddings and everything before (layer split_layer, expert split_expert); shard 2
    the rest. Splitting inside one layer's experts makes a loader follow the index per tensor."""
    if name.startswith("language_model.model.embed_tokens"):
        return 1
    if not name.startswith("language_model.model.layers."):
        return 2
    parts = name.split(".")
    layer = int(parts[3])
    if layer != split_layer:
        return 1 if layer < split_layer else 2
    if parts[5] == "experts":
        return 1 if int(parts[6]) < split_expert else 2
    return 1


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], split_layer: int, split_expert: int) -> None:
    files = {i: f"model-{i:05d}-of-00002.safetensors" for i in (1, 2)}
    shards: dict[int, dict[str, torch.Tensor]] = {1: {}, 2: {}}
    weight_map = {}
    for name in sorted(tensors, key=natural_key):
        shard = shard_of(name, split_layer, split_expert)
        shards[shard][name] = tensors[name]
        weight_map[name] = files[shard]
    for shard, part in shards.items():
        assert part, f"shard {shard} is empty"
        save_file(part, str(folder / files[shard]), {"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_back_fp8(folder: Path, model: Llama4ForCausalLM) -> None:
    """Rebuilds the f32 weights from the written shards alone and checks they are what the reference ran on."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        part = load_file(str(folder / file))
        for name in part:
            assert index["weight_map"][name] == file, f"{name} is in {file}, index says otherwise"
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"]), "index and shards list different tensors"
    for name, expected in model.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base = "language_model." + name.rsplit(".", 1)[0]
            experts = []
            for e in range(expected.shape[0]):

                def deq(proj: str, e: int = e) -> torch.Tensor:
                    codes = tensors[f"{base}.{e}.{proj}.weight"]
                    scale = tensors[f"{base}.{e}.{proj}.weight_scale"]
                    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
                    assert scale.shape == (codes.shape[0], 1)
                    return dequantize_fp8(codes, scale)

                if name.endswith("gate_up_proj"):
                    experts.append(torch.cat([deq("gate_proj").T, deq("up_proj").T], dim=1))
                else:
                    experts.append(deq("down_proj").T)
            rebuilt = torch.stack(experts)
        else:
            stored = tensors["language_model." + name]
            assert stored.dtype == torch.bfloat16, f"{name} is {stored.dtype}"
            rebuilt = stored.to(torch.float32)
        assert torch.equal(rebuilt, expected), f"{name} read back differently"


def emulated_activation_fp8_effect(model: Llama4ForCausalLM, ids: torch.Tensor) -> float:
    """Informational: logit change if expert inputs and SwiGLU outputs were also quantised per token (W8A8).

    The stored reference does NOT do this (transformers runs the dequantised weights on f32 activations).
    """

    def quant_dequant_rows(x: torch.Tensor) -> torch.Tensor:
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
        return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
        gate_up = torch.bmm(quant_dequant_rows(hidden_states), self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        swiglu = quant_dequant_rows(up * self.act_fn(gate))
        return torch.bmm(swiglu, self.down_proj).view(-1, self.hidden_size)

    base = logits_of(model, ids)
    original = modeling_llama4.Llama4TextExperts.forward
    modeling_llama4.Llama4TextExperts.forward = forward
    try:
        emulated = logits_of(model, ids)
    finally:
        modeling_llama4.Llama4TextExperts.forward = original
    return float((base - emulated).abs().max())


def check_hf_reads_fp8_config(folder: Path, model: Llama4ForCausalLM) -> None:
    """transformers must derive the same text settings from the nested config that the reference used."""
    parsed = Llama4Config.from_pretrained(folder).text_config
    used = model.config
    for key in ("moe_layers", "no_rope_layers", "layer_types", "hidden_size", "head_dim", "num_local_experts",
                "attention_chunk_size", "floor_scale", "attn_scale", "attn_temperature_tuning", "use_qk_norm",
                "intermediate_size", "intermediate_size_mlp", "rms_norm_eps"):
        assert getattr(parsed, key) == getattr(used, key), f"text_config.{key}: {getattr(parsed, key)} != {getattr(used, key)}"
    assert parsed.rope_parameters["rope_theta"] == used.rope_parameters["rope_theta"]
    assert parsed.rope_parameters["rope_type"] == "default"


def fp8_fixture(base_seed: int) -> None:
    name = "maverick-fp8"
    folder = HERE / name
    config = text_config(MAVERICK_TEXT, MAVERICK_ROPE_THETA, None)
    model = build_model(config)
    prompt = random_prompt(base_seed + 1000, config.vocab_size)
    holder: dict[str, dict[str, torch.Tensor]] = {}

    def attempt(seed: int):
        fill_random_weights(model, seed)
        holder["tensors"] = fp8_checkpoint_tensors(model)
        counts = expert_counts(model, prompt)
        check_routing(counts, config.num_local_experts - 2)
        ref = greedy_reference(model, prompt)
        ref["router_expert_counts"] = counts
        return ref

    seed, ref = search_seed(name, base_seed, attempt)
    ids = full_sequence(ref)
    extra = {"weight seed": seed, "prompt seed": base_seed + 1000}
    extra["cached generate max |logit diff| vs uncached"] = f"{check_cached_generate(model, ref):.3e}"
    extra["f32 vs f64 max |logit diff|"] = f"{f64_noise(model, ids):.3e}"
    extra["max |logit change| if activations were also fp8 per token (not in reference)"] = (
        f"{emulated_activation_fp8_effect(model, ids):.4f}"
    )

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(fp8_config(model, MAVERICK_TEXT), indent=2) + "\n")
    first_moe = config.moe_layers[0]
    write_sharded(folder, holder["tensors"], split_layer=first_moe, split_expert=config.num_local_experts // 2)
    save_reference(folder, ref, {"weight_seed": seed, "prompt_seed": base_seed + 1000})
    read_back_fp8(folder, model)
    check_hf_reads_fp8_config(folder, model)
    print_summary(name, model, ref, extra)


# ----------------------------------------------------------------------------------------------------------
# An independent re-implementation, written from docs/llama4-maverick.md rather than from transformers' code.
# It reads only the fixture files, the way the Rust loader does; agreeing with the reference to ~1e-5 shows
# that the files are complete and that the model doc describes what transformers computes.


def load_fixture(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(flat text config, float32 weights named without `language_model.`, experts fused as in HF)."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    index_path = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        for name, t in load_file(str(folder / file)).items():
            raw[name.removeprefix("language_model.")] = t
    weights: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, int, str], torch.Tensor] = {}
    for name, t in raw.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            if name.endswith(".weight_scale"):
                continue
            at = parts.index("experts")
            base = ".".join(parts[: at + 1])
            codes = t
            scale = raw[name + "_scale"]
            per_expert[(base, int(parts[at + 1]), parts[at + 2])] = codes.to(torch.float32) * scale.to(torch.float32)
        else:
            weights[name] = t.to(torch.float32)
    for base in sorted({k[0] for k in per_expert}):
        count = 1 + max(k[1] for k in per_expert if k[0] == base)
        weights[base + ".gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[(base, e, "gate_proj")].T, per_expert[(base, e, "up_proj")].T], dim=1) for e in range(count)]
        )
        weights[base + ".down_proj"] = torch.stack([per_expert[(base, e, "down_proj")].T for e in range(count)])
    return text, weights


def doc_inv_freq(text: dict) -> torch.Tensor:
    rope = text.get("rope_parameters") or {}
    theta = rope.get("rope_theta", text.get("rope_theta"))
    scaling = text.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    dim = text["head_dim"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    assert scaling["rope_type"] == "llama3"
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def doc_forward(text: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    layers, eps = text["num_hidden_layers"], text["rms_norm_eps"]
    n_q, n_kv, hd = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    step = text.get("interleave_moe_layer_step", 1)
    moe_layers = set(text.get("moe_layers") or range(step - 1, layers, step))
    uses_rope = text.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(layers)]
    chunk = text["attention_chunk_size"]
    t_len = ids.shape[0]
    pos = torch.arange(t_len)
    inv_freq = doc_inv_freq(text)
    angles = pos[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]

    def rms(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if weight is None else y * weight

    def rotate(x: torch.Tensor) -> torch.Tensor:  # interleaved pairs (x[2i], x[2i+1])
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def mlp(x: torch.Tensor, prefix: str) -> torch.Tensor:
        gate = x @ w[prefix + "gate_proj.weight"].T
        return (torch.nn.functional.silu(gate) * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T

    i_idx, j_idx = pos[:, None], pos[None, :]
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(t_len, n_q, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(t_len, n_kv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t_len, n_kv, hd)
        visible = j_idx <= i_idx
        if uses_rope[layer]:
            q, k = rotate(q), rotate(k)
            if text.get("use_qk_norm", False):
                q, k = rms(q, None), rms(k, None)
            visible = visible & (j_idx // chunk == i_idx // chunk)
        elif text.get("attn_temperature_tuning", True):
            scale = torch.log(torch.floor((pos.float() + 1) / text["floor_scale"]) + 1) * text["attn_scale"] + 1
            q = q * scale[:, None, None]
        group = n_q // n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        attn = torch.einsum("hij,jhd->ihd", probs, v).reshape(t_len, n_q * hd)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        if layer in moe_layers:
            f = p + "feed_forward."
            router_logits = h @ w[f + "router.weight"].T
            top = router_logits.argmax(dim=-1)
            score = torch.sigmoid(router_logits.gather(1, top[:, None]))
            y = mlp(h, f + "shared_expert.")
            inter = text["intermediate_size"]
            for t in range(t_len):
                e = int(top[t])
                gu = (score[t] * h[t]) @ w[f + "experts.gate_up_proj"][e]
                y[t] += (gu[inter:] * torch.nn.functional.silu(gu[:inter])) @ w[f + "experts.down_proj"][e]
        else:
            y = mlp(h, p + "feed_forward.")
        x = x + y
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def check_doc_forward(folder: Path) -> float:
    text, weights = load_fixture(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    ids = full_sequence(ref)
    with torch.no_grad():
        logits = doc_forward(text, weights, ids)
    p = ref["prompt_ids"].shape[0]
    diff = max(
        float((logits[:p] - ref["prompt_logits"]).abs().max()),
        float((logits[p - 1 :] - ref["decode_logits"]).abs().max()),
    )
    assert diff < 1e-4, f"{folder.name}: the doc's forward pass is off the reference by {diff}"
    print(f"[{folder.name}] forward written from the model doc, on the files alone: max |logit diff| {diff:.3e}")
    return diff


def describe(folder: Path) -> None:
    print(f"--- {folder.name}: tensors")
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in sorted(f.keys(), key=natural_key):
                s = f.get_slice(key)
                print(f"  {file.name}: {key} {s.get_dtype()} {s.get_shape()}")


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")

    hf_fixture(
        "maverick-f32",
        text_config(MAVERICK_TEXT, MAVERICK_ROPE_THETA, None),
        base_seed=1000,
        min_used_experts=MAVERICK_TEXT["num_local_experts"] - 2,
        legacy_rope=None,
        checks={"temperature tuning": no_temperature_tuning, "chunking": no_chunking},
    )
    hf_fixture(
        "scout-f32",
        text_config(SCOUT_TEXT, SCOUT_ROPE_THETA, SCOUT_ROPE_SCALING),
        base_seed=2000,
        min_used_experts=SCOUT_TEXT["num_local_experts"],
        legacy_rope={"rope_theta": SCOUT_ROPE_THETA, "rope_scaling": SCOUT_ROPE_SCALING},
        checks={
            "temperature tuning": no_temperature_tuning,
            "chunking": no_chunking,
            "llama3 rope scaling": unscaled_rope,
        },
    )
    fp8_fixture(base_seed=3000)
    for name in ("maverick-f32", "scout-f32", "maverick-fp8"):
        check_doc_forward(HERE / name)
    for name in ("maverick-f32", "scout-f32", "maverick-fp8"):
        describe(HERE / name)


if __name__ == "__main__":
    main()
