"""`lm evaluate`: score a trained run on a data split and write a JSON report into the run.

Causal models: cross-entropy, perplexity and bits-per-byte, with long documents packed,
truncated to their first `seq_len` tokens, or covered by sliding windows every `stride` tokens
(each token scored once, with up to `seq_len - stride` tokens of left context). Masked LMs:
masked-token loss and accuracy under a fixed masking seed, and optionally pseudo-perplexity
(each token masked in turn). Reads top to bottom: config → mesh → params → rows → metrics.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
from etils import epath
from tqdm import tqdm

from lm.config import Config, ConfigError, load_config, to_dict, validate
from lm.data.batches import ordered_batches
from lm.data.mlm import masked_eval_batches, masking_for, pseudo_perplexity_batches
from lm.data.pipeline import IndexedRows, rows_for, tokenize_documents
from lm.data.prepared import prepared_rows
from lm.data.sources import load_documents
from lm.data.tokenizer import pad_id
from lm.evaluation.lm_metrics import evaluate_lm
from lm.run_dir import configured_tokenizer, load_run, read_run_config
from lm.runtime.distributed import initialize, process_zero_first
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.runtime.platforms import for_platform
from lm.tasks import task_named
from lm.train.objectives import TokenCrossEntropy
from lm.train.step import make_eval_step


def evaluation_config(
    run_dir: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """The run's config (or `config_path`) with `overrides`; the model must stay the run's."""
    trained = read_run_config(run_dir)
    cfg = load_config(config_path or Path(run_dir) / "config.yaml", overrides)
    if cfg.model != trained.model or cfg.train.objective != trained.train.objective:
        raise ConfigError(
            f"lm evaluate scores the model stored in {run_dir}, so model.* and train.objective "
            "must match the run's; drop those overrides (or use the run's own config.yaml)."
        )
    return cfg


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(text).name or text).strip("-")


def _report_path(
    run_dir: epath.Path, cfg: Config, split: str, step: int, max_batches: int, pseudo: bool
) -> epath.Path:
    """RUN/eval/<source>-<split>-<layout>-L<seq_len>-step<N>[-first<B>][-pseudo].json"""
    d = cfg.data
    layout = f"window{d.stride or d.seq_len}" if d.packing == "window" else d.packing
    source = d.mixture or d.prepared or d.source
    name = f"{_slug(source)}-{split}-{layout}-L{d.seq_len}-step{step}"
    name += (f"-first{max_batches}" if max_batches else "") + ("-pseudo" if pseudo else "")
    return run_dir / "eval" / f"{name}.json"


def _progress(batches: Iterable, total: int, label: str) -> Iterable:
    hidden = jax.process_index() != 0 or not sys.stderr.isatty()
    return tqdm(batches, total=total, desc=label, unit="batch", disable=hidden, leave=False)


def evaluate_run(
    run_dir: str | Path,
    cfg: Config,
    *,
    step: int | None = None,
    split: str = "validation",
    max_batches: int = 0,
    pseudo_perplexity: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    output: str | Path | None = None,
) -> dict:
    """Evaluate checkpoint `step` (default newest) of `run_dir` on `split` of `cfg.data`.

    Returns the report, also written as JSON to `output` (default `RUN/eval/<name>.json`).
    `max_batches` > 0 stops early (a quick estimate). `mesh` defaults to `cfg.mesh`.
    """
    started = time.perf_counter()
    initialize()  # joins a multi-host run when the environment asks for one
    run_dir = epath.Path(run_dir)  # local or gs://
    if cfg.finetune.task and not task_named(cfg.finetune.task).predicts_tokens:
        raise ValueError(
            f"{run_dir} is a finetune.task={cfg.finetune.task} run, whose model outputs task "
            "predictions, not tokens; lm evaluate scores language models (its task metrics are "
            "in the run's final_eval.json)."
        )
    validate(cfg, None if mesh is not None else jax.device_count())
    mesh = mesh or make_mesh(cfg.mesh)
    mlm = cfg.train.objective == "mlm"
    if pseudo_perplexity and not mlm:
        raise ConfigError(
            "Pseudo-perplexity is for masked-LM runs; a causal run reports perplexity directly, "
            "so drop --pseudo-perplexity."
        )
    run = load_run(run_dir, step=step, mesh=mesh)
    run.tokenizer = configured_tokenizer(run, cfg)  # a data.tokenizer=PATH override wins
    if run.tokenizer is None:
        raise FileNotFoundError(
            f"{run_dir} has no tokenizer.model or tokenizer.json and its config names none; set "
            "data.tokenizer=PATH to the tokenizer the run was trained with."
        )
    d = cfg.data
    if d.prepared or d.mixture:  # read by row from `lm data prepare`'s shards
        rows, stats = prepared_rows(d, split, run.tokenizer)
        if pseudo_perplexity:  # masks every token of every row: the rows are held in memory
            if not isinstance(rows, IndexedRows):
                raise ConfigError(
                    "--pseudo-perplexity scores one prepared directory; set data.prepared to "
                    "one of the mixture's directories (and data.mixture= empty)."
                )
            rows = rows.all()
    else:
        # Process 0 builds a local source's TFDS copy (if it needs one) before the others read it.
        documents = process_zero_first(
            "evaluate_data",
            lambda: load_documents(
                d.source, d.data_dir, d.validation_fraction, d.text_key or None, d.text_unit
            ),
        )
        if split not in documents:
            raise ValueError(
                f"Data source {d.source} has no '{split}' split; choose one of {sorted(documents)}."
            )
        rows, stats = rows_for(
            tokenize_documents(run.tokenizer, documents[split]),
            d.seq_len,
            d.packing,
            d.stride,
            pad_id(run.tokenizer),
        )
    # Rows split evenly over the batch-sharded devices; padding rows fill the last batch.
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-d.batch_size // shards) * shards
    count = -(-len(rows) // batch_size)
    count = min(count, max_batches) if max_batches else count
    sharding = batch_sharding(mesh)
    token_bytes = run.tokenizer.token_bytes()

    with jax.set_mesh(mesh):
        objective = TokenCrossEntropy(loss_chunk=for_platform(cfg).train.loss_chunk)
        eval_step = make_eval_step(run.graphdef, objective)

        def score(batches: Iterable, total: int, label: str, bytes_V) -> dict[str, float]:
            batches = _progress(batches, total, label)
            return evaluate_lm(eval_step, run.params, batches, bytes_V, sharding)

        if mlm:
            masking = masking_for(d, cfg.model.vocab_size, run.tokenizer)
            batches = masked_eval_batches(rows, batch_size, masking, max_batches)
            metrics = score(batches, count, "masked", None)  # a sample of tokens: no bytes
            if pseudo_perplexity:
                total, batches = pseudo_perplexity_batches(rows, batch_size, masking, max_batches)
                pseudo = score(batches, total, "pseudo-perplexity", token_bytes)
                metrics |= {f"pseudo_{k}": v for k, v in pseudo.items()}
        else:
            batches = ordered_batches(rows, batch_size, max_batches)
            metrics = score(batches, count, "evaluate", token_bytes)

    report = {
        "run_dir": str(run_dir),
        "step": run.step,
        "objective": cfg.train.objective,
        "source": d.source,
        "split": split,
        "seq_len": d.seq_len,
        "packing": d.packing,
        "stride": (d.stride or d.seq_len) if d.packing == "window" else None,
        "documents": stats.documents,
        "rows": stats.rows,
        "batches": count,
        "mesh": dict(mesh.shape),
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "data": to_dict(cfg)["data"],
    }
    default = _report_path(run_dir, cfg, split, run.step, max_batches, pseudo_perplexity)
    path = epath.Path(output or default)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    report["path"] = str(path)
    return report


def format_report(report: dict) -> str:
    """A short table of the report's metrics, headed by what was evaluated."""
    stride = f", stride {report['stride']}" if report["stride"] else ""
    lines = [
        f"{report['run_dir']} @ step {report['step']} on {report['source']} {report['split']}: "
        f"{report['documents']:,} documents → {report['rows']:,} rows "
        f"({report['packing']}, seq_len {report['seq_len']}{stride})",
        f"{'metric':<26}{'value':>14}",
    ]
    for key, value in report["metrics"].items():
        shown = f"{value:,.0f}" if key.endswith("tokens") else f"{value:.4f}"
        lines.append(f"{key:<26}{shown:>14}")
    lines.append(f"report: {report['path']} ({report['seconds']:.1f} s)")
    return "\n".join(lines)
