"""BERT ↔ this project: a post-LayerNorm bidirectional encoder with learned positions, token types
and an embedding LayerNorm; the masked-LM head (tied decoder + bias) and the pooler + classifier
of sequence classification map onto `MlmHead` and `PooledHead(pooler=True)`."""

from __future__ import annotations

from lm.config import FinetuneConfig, ModelConfig
from lm.interop.mapping import Tensors, linear, out_linear, tensor

ARCHITECTURES = {
    "BertModel": "",
    "BertForMaskedLM": "bert.",
    "BertForSequenceClassification": "bert.",
}
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def model_config(hf: dict) -> dict:
    """ModelConfig fields of a BERT config.json."""
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"BERT hidden_act '{act}' is not supported; use gelu.")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"BERT position_embedding_type '{kind}' is not supported; use absolute.")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported.")
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp=_ACTIVATIONS[act],
        tie_embeddings=True,
        bias=True,
        norm_position="post",
        embed_norm=True,
        type_vocab_size=hf.get("type_vocab_size", 2),
        causal=False,
    )


def finetune_config(hf: dict) -> dict:
    """FinetuneConfig fields of a BertForSequenceClassification: its labels and head, and the
    `problem_type` (regression or single_label_classification) that decides the task."""
    problem = hf.get("problem_type")
    if problem == "multi_label_classification":
        raise ValueError("BERT problem_type multi_label_classification is not supported.")
    id2label = hf.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    names = [id2label[str(i)] for i in range(len(id2label))]
    regression = problem == "regression" or len(names) == 1  # as transformers decides
    dropout = hf.get("classifier_dropout")
    return dict(
        problem_type="regression" if regression else "single_label_classification",
        num_labels=len(names),
        labels="" if regression or any("," in n for n in names) else ",".join(names),
        pooling="first",
        pooler=True,
        head_dropout=hf.get("hidden_dropout_prob", 0.1) if dropout is None else dropout,
    )


def hf_config(m: ModelConfig, architecture: str, f: FinetuneConfig, problem_type: str = "") -> dict:
    """config.json of a BERT `architecture` for `m` (and the classifier `f` describes, whose
    task has BERT's `problem_type`)."""
    labels = f.label_names or [f"LABEL_{i}" for i in range(f.num_outputs)]
    classifier = {
        "problem_type": problem_type,
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "classifier_dropout": f.head_dropout,
    }
    return {
        **(classifier if architecture == "BertForSequenceClassification" else {}),
        "model_type": "bert",
        "architectures": [architecture],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.d_ff,
        "max_position_embeddings": m.max_seq_len,
        "type_vocab_size": m.type_vocab_size,
        "layer_norm_eps": m.norm_eps,
        "hidden_act": "gelu" if m.mlp == "gelu_exact" else "gelu_new",
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": m.dropout,
        "attention_probs_dropout_prob": 0.0,
        "tie_word_embeddings": True,
    }


def entries(m: ModelConfig, prefix: str) -> list[Tensors]:
    """Encoder tensors; `prefix` is 'bert.' inside the task models."""
    d, h, k, f = m.d_model, m.num_heads, m.head_dim, m.d_ff
    emb, layer = f"{prefix}embeddings.", f"{prefix}encoder.layer.{{i}}."
    heads = lambda b: b.reshape(h, k)
    flat = lambda b: b.reshape(-1)
    out = [
        tensor("embed", emb + "word_embeddings.weight"),
        tensor("pos_embed", emb + "position_embeddings.weight"),
        tensor("embed_norm/scale", emb + "LayerNorm.weight"),
        tensor("embed_norm/bias", emb + "LayerNorm.bias"),
        out_linear("blocks/attn/wo", layer + "attention.output.dense.weight", (h, k, d)),
        tensor("blocks/attn/bo", layer + "attention.output.dense.bias"),
        tensor("blocks/attn_norm/scale", layer + "attention.output.LayerNorm.weight"),
        tensor("blocks/attn_norm/bias", layer + "attention.output.LayerNorm.bias"),
        linear("blocks/mlp/w_up", layer + "intermediate.dense.weight", (d, f)),
        tensor("blocks/mlp/b_up", layer + "intermediate.dense.bias"),
        linear("blocks/mlp/w_down", layer + "output.dense.weight", (f, d)),
        tensor("blocks/mlp/b_down", layer + "output.dense.bias"),
        tensor("blocks/mlp_norm/scale", layer + "output.LayerNorm.weight"),
        tensor("blocks/mlp_norm/bias", layer + "output.LayerNorm.bias"),
    ]
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        hf = f"{layer}attention.self.{theirs}"
        out.append(linear(f"blocks/attn/w{ours}", hf + ".weight", (d, h, k)))
        out.append(tensor(f"blocks/attn/b{ours}", hf + ".bias", heads, flat))
    if m.type_vocab_size:
        out.append(tensor("type_embed", emb + "token_type_embeddings.weight"))
    return out


def mlm_entries() -> list[Tensors]:
    """BertForMaskedLM's `cls.predictions` head onto `MlmHead` (its decoder is the tied embed)."""
    head = "cls.predictions."
    transpose = lambda w: w.T
    return [
        tensor("w_transform", head + "transform.dense.weight", transpose, transpose),
        tensor("b_transform", head + "transform.dense.bias"),
        tensor("norm/scale", head + "transform.LayerNorm.weight"),
        tensor("norm/bias", head + "transform.LayerNorm.bias"),
        tensor("b_output", head + "bias"),
    ]


def classifier_entries() -> list[Tensors]:
    """BertForSequenceClassification's pooler and classifier onto `PooledHead`."""
    transpose = lambda w: w.T
    return [
        tensor("pooler/kernel", "bert.pooler.dense.weight", transpose, transpose),
        tensor("pooler/bias", "bert.pooler.dense.bias"),
        tensor("classifier/kernel", "classifier.weight", transpose, transpose),
        tensor("classifier/bias", "classifier.bias"),
    ]
