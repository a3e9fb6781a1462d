"""`lm tokenizer train`: a byte-fallback SentencePiece model from local text or the demo corpus."""

from __future__ import annotations

from lm.data import tokenizer as tok
from lm.data.shakespeare import shakespeare_documents
from lm.data.sources import local_text_documents


def train(
    source: str, output: str, vocab_size: int, model_type: str, validation_fraction: float
) -> str:
    """Train on the train split of `source` ('shakespeare' or local text); returns a summary."""
    if source == "shakespeare":
        texts = shakespeare_documents("train")
    else:
        texts = local_text_documents(source, validation_fraction)["train"]
    trained = tok.train_tokenizer(texts, output, vocab_size, model_type)
    return (
        f"{trained.path}: vocab_size={trained.vocab_size} pad={tok.PAD_ID} unk={tok.UNK_ID} "
        f"bos={tok.BOS_ID} eos={tok.EOS_ID} mask={tok.MASK_ID} sep={tok.SEP_ID} cls={tok.CLS_ID}"
    )
