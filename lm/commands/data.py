"""`lm data prepare`: tokenize `data.source` once into sharded token files under
`data.prepared` (local or gs://), which `lm pretrain` and `lm evaluate` then read by row.

Reads top to bottom: config → source → tokenizer → shards (resumed, or reused when done) →
manifest. See `lm.data.prepared_write` for what is written and when.
"""

from __future__ import annotations

from lm.config import Config, ConfigError, validate
from lm.data.prepared_write import SourceSpec, prepare


def prepare_data(
    cfg: Config,
    *,
    shards: int = 0,
    workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> dict | None:
    """Prepare `cfg.data.source` into `cfg.data.prepared`; the manifest, or None while other
    processes' shards are missing."""
    validate(cfg)
    d = cfg.data
    if not d.prepared:
        raise ConfigError(
            "lm data prepare writes into data.prepared, which is empty; set "
            "data.prepared=DIR (a local directory or gs://bucket/path)."
        )
    if not 0 <= process_index < process_count:
        raise ConfigError(
            f"--process-index {process_index} is not in [0, --process-count {process_count})."
        )
    spec = SourceSpec(d.source, d.data_dir, d.validation_fraction, d.text_key, d.text_unit)
    return prepare(
        spec,
        d.prepared,
        d.tokenizer,
        cfg.model.vocab_size,
        d.tokenizer_type,
        shards=shards,
        workers=workers,
        process_index=process_index,
        process_count=process_count,
    )
