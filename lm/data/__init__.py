"""Text data: the Shakespeare demo corpus, TFDS builds of local text, SentencePiece, packing."""
