"""GPT-2 ↔ this project: learned positions, LayerNorm pre-norm blocks, biases, gelu_new, tied head.

GPT-2 stores its projections as `Conv1D` weights [in, out] and fuses q, k and v into one
`c_attn` tensor [D, 3D] (and bias [3D]).
"""

from __future__ import annotations

import numpy as np

from lm.config import ModelConfig
from lm.interop.mapping import Tensors, tensor

ARCHITECTURES = {"GPT2LMHeadModel": "transformer.", "GPT2Model": ""}
EXPORT_ARCHITECTURE = "GPT2LMHeadModel"
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


def model_config(hf: dict) -> dict:
    """ModelConfig fields of a GPT-2 config.json."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function '{act}' is not supported; use gelu_new.")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            raise ValueError(f"GPT-2 config.json sets {key}=true, which is not supported.")
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        max_seq_len=hf["n_positions"],
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=_ACTIVATIONS[act],
        tie_embeddings=True,
        bias=True,
    )


def hf_config(m: ModelConfig) -> dict:
    """config.json of a GPT2LMHeadModel for `m`."""
    return {
        "model_type": "gpt2",
        "architectures": [EXPORT_ARCHITECTURE],
        "vocab_size": m.vocab_size,
        "n_embd": m.d_model,
        "n_layer": m.num_layers,
        "n_head": m.num_heads,
        "n_inner": m.d_ff,
        "n_positions": m.max_seq_len,
        "layer_norm_epsilon": m.norm_eps,
        "activation_function": "gelu_new" if m.mlp == "gelu" else "gelu",
        "tie_word_embeddings": True,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": 0.0,
    }


def entries(m: ModelConfig, prefix: str) -> list[Tensors]:
    """Backbone tensors; `prefix` is 'transformer.' for GPT2LMHeadModel files."""
    d, h, k = m.d_model, m.num_heads, m.head_dim
    layer = f"{prefix}h.{{i}}."

    def split_qkv(w):  # [D, 3D] (bias: [3D]) -> q, k, v as [D, H, K] ([H, K])
        parts = w.reshape(*w.shape[:-1], 3, h, k)
        return parts[..., 0, :, :], parts[..., 1, :, :], parts[..., 2, :, :]

    def join_qkv(q, kk, v):
        return (np.concatenate([x.reshape(*x.shape[:-2], h * k) for x in (q, kk, v)], -1),)

    qkv = ("blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv")
    qkv_bias = ("blocks/attn/bq", "blocks/attn/bk", "blocks/attn/bv")
    return [
        tensor("embed", f"{prefix}wte.weight"),
        tensor("pos_embed", f"{prefix}wpe.weight"),
        tensor("blocks/attn_norm/scale", layer + "ln_1.weight"),
        tensor("blocks/attn_norm/bias", layer + "ln_1.bias"),
        Tensors(qkv, (layer + "attn.c_attn.weight",), split_qkv, join_qkv),
        Tensors(qkv_bias, (layer + "attn.c_attn.bias",), split_qkv, join_qkv),
        tensor(
            "blocks/attn/wo",
            layer + "attn.c_proj.weight",
            lambda w: w.reshape(h, k, d),
            lambda w: w.reshape(h * k, d),
        ),
        tensor("blocks/attn/bo", layer + "attn.c_proj.bias"),
        tensor("blocks/mlp_norm/scale", layer + "ln_2.weight"),
        tensor("blocks/mlp_norm/bias", layer + "ln_2.bias"),
        tensor("blocks/mlp/w_up", layer + "mlp.c_fc.weight"),
        tensor("blocks/mlp/b_up", layer + "mlp.c_fc.bias"),
        tensor("blocks/mlp/w_down", layer + "mlp.c_proj.weight"),
        tensor("blocks/mlp/b_down", layer + "mlp.c_proj.bias"),
        tensor("final_norm/scale", f"{prefix}ln_f.weight"),
        tensor("final_norm/bias", f"{prefix}ln_f.bias"),
    ]
