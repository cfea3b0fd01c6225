"""What every supported family reads the same way from a Hugging Face checkpoint.

A family module supplies `config_from_hf(hf_config, dtype)` and a tensor map: a list of
`TensorSpec(ours, theirs, transpose)` with `{layer}`/`{expert}` already filled in. `ours` is a
dotted path in the checkpoint jaxmoe writes: the model's own parameter path, except that routed
experts are stored as `layers.{l}.mlp.experts.{e}.gate`, `.up` and `.down`, each [I, D] (see
`transformer.Expert`), and fused linears (q/k/v, gate/up) kept apart; `theirs` is the tensor name
in the safetensors files. Linear weights keep PyTorch's [out, in]; `transpose` is set only for an
expert's down projection, stored [I, D] like its gate and up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmoe.config import ModelConfig


class UnsupportedModelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    ours: str
    theirs: str
    transpose: bool


def hf_dtype(hf: dict[str, Any], override: str | None) -> str:
    """The dtype to run in: the override, else the checkpoint's own (`dtype` or `torch_dtype`)."""
    dtype = override or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UnsupportedModelError(f"checkpoint dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return dtype


def rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base; only unscaled ('default') rotary embeddings are supported."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; jaxmoe implements default RoPE only")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def eos_ids(hf: dict[str, Any], generation: dict[str, Any] | None) -> tuple[int, ...]:
    eos = (generation or {}).get("eos_token_id", hf.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def common_fields(hf: dict[str, Any], dtype: str | None, generation: dict[str, Any] | None) -> dict[str, Any]:
    """The fields named identically across the Llama-style MoE families."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=rope_theta(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        dtype=hf_dtype(hf, dtype),
        bos_token_id=(generation or {}).get("bos_token_id", hf.get("bos_token_id")),
        eos_token_ids=eos_ids(hf, generation),
    )


def num_experts(hf: dict[str, Any]) -> int:
    """Routed experts per layer; transformers 5 writes `num_local_experts` where older files say `num_experts`."""
    return int(hf.get("num_experts", hf.get("num_local_experts")) or 0)


def sparse_layers(hf: dict[str, Any]) -> tuple[bool, ...]:
    """Qwen-style choice of MoE layers: `mlp_only_layers` and `decoder_sparse_step`."""
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    n = hf["num_hidden_layers"]
    return tuple(i not in dense and num_experts(hf) > 0 and (i + 1) % step == 0 for i in range(n))


def attention_tensors(c: ModelConfig, layer: int) -> list[TensorSpec]:
    src = f"model.layers.{layer}"
    dst = f"layers.{layer}"
    specs = [
        TensorSpec(f"{dst}.attn_norm.scale", f"{src}.input_layernorm.weight", False),
        TensorSpec(f"{dst}.mlp_norm.scale", f"{src}.post_attention_layernorm.weight", False),
    ]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        specs.append(TensorSpec(f"{dst}.attn.{ours}.weight", f"{src}.self_attn.{theirs}.weight", False))
        if (c.qkv_bias and ours != "o") or (c.o_bias and ours == "o"):
            specs.append(TensorSpec(f"{dst}.attn.{ours}.bias", f"{src}.self_attn.{theirs}.bias", False))
    if c.qk_norm != "none":
        specs.append(TensorSpec(f"{dst}.attn.q_norm.scale", f"{src}.self_attn.q_norm.weight", False))
        specs.append(TensorSpec(f"{dst}.attn.k_norm.scale", f"{src}.self_attn.k_norm.weight", False))
    return specs


def dense_mlp_tensors(ours: str, theirs: str) -> list[TensorSpec]:
    return [TensorSpec(f"{ours}.{p}.weight", f"{theirs}.{p}_proj.weight", False) for p in ("gate", "up", "down")]


def expert_tensors(c: ModelConfig, layer: int, theirs: str, names: tuple[str, str, str]) -> list[TensorSpec]:
    """Routed experts; `names` are the checkpoint's (gate, up, down) names. Down is stored [D, I]
    by PyTorch and transposed to [I, D] so every matrix of an expert is intermediate-major."""
    specs = []
    for e in range(c.num_experts):
        ours = f"layers.{layer}.mlp.experts.{e}"
        src = f"{theirs}.experts.{e}"
        g, u, d = names
        specs += [
            TensorSpec(f"{ours}.gate", f"{src}.{g}.weight", False),
            TensorSpec(f"{ours}.up", f"{src}.{u}.weight", False),
            TensorSpec(f"{ours}.down", f"{src}.{d}.weight", True),
        ]
    return specs


def outer_tensors(c: ModelConfig) -> list[TensorSpec]:
    specs = [
        TensorSpec("embed.embedding", "model.embed_tokens.weight", False),
        TensorSpec("final_norm.scale", "model.norm.weight", False),
    ]
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", "lm_head.weight", False))
    return specs


def moe_tensor_map(c: ModelConfig, block: str, expert_names: tuple[str, str, str]) -> list[TensorSpec]:
    """The whole map of a Llama-style MoE checkpoint whose MoE block is `model.layers.{l}.<block>`
    (router `gate`, experts with `expert_names`, Qwen-style `shared_expert` when configured) and
    whose dense layers are `model.layers.{l}.mlp`."""
    specs = outer_tensors(c)
    for layer in range(c.num_layers):
        ours, theirs = f"layers.{layer}.mlp", f"model.layers.{layer}.{block}"
        specs += attention_tensors(c, layer)
        if not c.moe_layers[layer]:
            specs += dense_mlp_tensors(ours, f"model.layers.{layer}.mlp")
            continue
        specs.append(TensorSpec(f"{ours}.router.weight", f"{theirs}.gate.weight", False))
        specs += expert_tensors(c, layer, theirs, expert_names)
        if c.shared_expert_intermediate_size:
            specs += dense_mlp_tensors(f"{ours}.shared", f"{theirs}.shared_expert")
            specs.append(TensorSpec(f"{ours}.shared_gate.weight", f"{theirs}.shared_expert_gate.weight", False))
    return specs
