"""Llama ↔ this project: RoPE (rotate-half), RMSNorm pre-norm blocks, SwiGLU, GQA, untied head."""

from __future__ import annotations

from lm.config import ModelConfig
from lm.interop.mapping import Tensors, linear, out_linear, tensor

ARCHITECTURES = {"LlamaForCausalLM": "model."}
EXPORT_ARCHITECTURE = "LlamaForCausalLM"


def _rope(hf: dict) -> dict:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=float(theta))
    if kind not in ("linear", "llama3"):
        raise ValueError(
            f"Llama rope_type '{kind}' is not supported; use default, linear or llama3."
        )
    out = dict(rope_theta=float(theta), rope_scaling=kind, rope_scaling_factor=params["factor"])
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=params["low_freq_factor"],
            rope_high_freq_factor=params["high_freq_factor"],
            rope_original_max_len=params["original_max_position_embeddings"],
        )
    return out


def model_config(hf: dict) -> dict:
    """ModelConfig fields of a Llama config.json."""
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act '{hf['hidden_act']}' is not supported; use silu.")
    if hf.get("head_dim", d // heads) != d // heads:
        raise ValueError(
            f"Llama head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = "
            f"{d // heads}, which this model requires."
        )
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise ValueError(
            "Llama config.json sets attention_bias and mlp_bias differently; model.bias covers "
            "both, so they must be equal."
        )
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        position="rope",
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=bool(hf.get("attention_bias", False)),
        **_rope(hf),
    )


def hf_config(m: ModelConfig) -> dict:
    """config.json of a LlamaForCausalLM for `m`."""
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        rope.update(rope_type=m.rope_scaling, factor=m.rope_scaling_factor)
    if m.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=m.rope_low_freq_factor,
            high_freq_factor=m.rope_high_freq_factor,
            original_max_position_embeddings=m.rope_original_max_len,
        )
    return {
        "model_type": "llama",
        "architectures": [EXPORT_ARCHITECTURE],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "intermediate_size": m.d_ff,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "rope_theta": m.rope_theta,
        "rope_parameters": rope,
    }


def entries(m: ModelConfig, prefix: str) -> list[Tensors]:
    """Backbone (and untied output) tensors; `prefix` is 'model.' for LlamaForCausalLM files."""
    d, h, g, k, f = m.d_model, m.num_heads, m.kv_heads, m.head_dim, m.d_ff
    layer = f"{prefix}layers.{{i}}."
    out = [
        tensor("embed", f"{prefix}embed_tokens.weight"),
        tensor("blocks/attn_norm/scale", layer + "input_layernorm.weight"),
        linear("blocks/attn/wq", layer + "self_attn.q_proj.weight", (d, h, k)),
        linear("blocks/attn/wk", layer + "self_attn.k_proj.weight", (d, g, k)),
        linear("blocks/attn/wv", layer + "self_attn.v_proj.weight", (d, g, k)),
        out_linear("blocks/attn/wo", layer + "self_attn.o_proj.weight", (h, k, d)),
        tensor("blocks/mlp_norm/scale", layer + "post_attention_layernorm.weight"),
        linear("blocks/mlp/w_gate", layer + "mlp.gate_proj.weight", (d, f)),
        linear("blocks/mlp/w_up", layer + "mlp.up_proj.weight", (d, f)),
        linear("blocks/mlp/w_down", layer + "mlp.down_proj.weight", (f, d)),
        tensor("final_norm/scale", f"{prefix}norm.weight"),
    ]
    if m.bias:
        out += [
            tensor(
                f"blocks/attn/b{name}",
                layer + f"self_attn.{name}_proj.bias",
                lambda b, heads=heads: b.reshape(heads, k),
                lambda b: b.reshape(-1),
            )
            for name, heads in (("q", h), ("k", g), ("v", g))
        ]
        out += [
            tensor("blocks/attn/bo", layer + "self_attn.o_proj.bias"),
            tensor("blocks/mlp/b_gate", layer + "mlp.gate_proj.bias"),
            tensor("blocks/mlp/b_up", layer + "mlp.up_proj.bias"),
            tensor("blocks/mlp/b_down", layer + "mlp.down_proj.bias"),
        ]
    if not m.tie_embeddings:
        out.append(tensor("unembed", "lm_head.weight"))
    return out
