"""`lm pretrain`: train a causal (or masked) language model from scratch, or resume a run.

Reads top to bottom: config → mesh → data → sharded state (or the newest checkpoint) →
the shared loop (`lm.train.loop`) → final evaluation and a sample. A run stopped by SIGTERM or
Ctrl-C checkpoints its step and ends there (`Preempted`), without the final evaluation.
"""

from __future__ import annotations

import json

import jax
from etils import epath
from jax.sharding import Mesh

from lm.config import Config, check_pretraining, to_dict
from lm.data.batches import ordered_batches
from lm.data.mixture import MixtureBatcher
from lm.data.mlm import MaskedStepBatches, masked_eval_batches, masking_for
from lm.data.pipeline import load_pretrain_data
from lm.data.prepared import load_prepared_data
from lm.evaluation.lm_metrics import evaluate_lm
from lm.inference.generator import sample_text
from lm.run_dir import write_run_files
from lm.runtime.distributed import initialize, process_zero_first
from lm.runtime.flops import peak_flops
from lm.runtime.mesh import batch_sharding
from lm.runtime.platforms import for_platform
from lm.train.checkpoint import Checkpointer
from lm.train.curves import write_run_curves
from lm.train.loop import run_mesh, start_session
from lm.train.metrics import MetricsWriter
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer
from lm.train.run_lock import claim_run_dir
from lm.train.step import make_eval_step


def pretrain(cfg: Config) -> dict[str, float]:
    """Run (or resume) pretraining as `cfg` says; returns the final validation metrics."""
    initialize()  # joins a multi-host run when the environment asks for one; before any device use
    check_pretraining(cfg)
    mesh = run_mesh(cfg)
    run_dir = epath.Path(cfg.train.run_dir)  # local or gs://
    with claim_run_dir(run_dir, print):
        return _pretrain(cfg, mesh, run_dir)


def _pretrain(cfg: Config, mesh: Mesh, run_dir: epath.Path) -> dict[str, float]:
    """The run, once this process owns `run_dir`."""
    # Prepared data (`lm data prepare`) is read by row; otherwise every split is tokenized
    # here, process 0 training the run's tokenizer (if it needs one) before the others read it.
    prepared = bool(cfg.data.prepared or cfg.data.mixture)
    load = load_prepared_data if prepared else load_pretrain_data
    data = process_zero_first(
        "pretrain_data", lambda: load(cfg.data, run_dir, cfg.model.vocab_size)
    )
    # A prepared run keeps the tokenizer its data was made with, for evaluation and generation.
    write_run_files(run_dir, cfg, data.tokenizer if prepared else None)

    writer = MetricsWriter(run_dir, cfg.train.steps, wandb=cfg.train.wandb, config=to_dict(cfg))
    if isinstance(data.train, MixtureBatcher):  # per-source shares and token counts
        for line in data.train.describe(cfg.data.seq_len, cfg.train.steps):
            writer.print(line)
    for split, stats in (("train", data.train_stats), ("validation", data.validation_stats)):
        writer.print(
            f"{split}: {stats.documents:,} documents → {stats.rows:,} rows of {cfg.data.seq_len} "
            f"tokens ({cfg.data.packing}; {stats.padding_fraction:.2%} padding, "
            f"{stats.truncated_documents:,} documents truncated, {stats.dropped_tokens:,} tokens "
            "dropped)"
        )
    peak = peak_flops(jax.devices())
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    with jax.set_mesh(mesh), writer:
        session = start_session(cfg, mesh, tx, checkpointer, writer)

        mlm = cfg.train.objective == "mlm"
        objective = TokenCrossEntropy(cfg.train.z_loss, for_platform(cfg).train.loss_chunk)
        masking = masking_for(cfg.data, cfg.model.vocab_size, data.tokenizer) if mlm else None
        train_batches = MaskedStepBatches(data.train, masking) if mlm else data.train
        eval_step = make_eval_step(session.graphdef, objective)
        rows_sharding = batch_sharding(mesh)

        def evaluate(current, max_batches: int = cfg.train.eval_batches) -> dict[str, float]:
            if mlm:  # bits-per-byte of masked tokens alone would mean nothing
                batches = masked_eval_batches(
                    data.validation, cfg.data.batch_size, masking, max_batches
                )
                return evaluate_lm(eval_step, current.params, batches, None, rows_sharding)
            batches = ordered_batches(data.validation, cfg.data.batch_size, max_batches)
            return evaluate_lm(eval_step, current.params, batches, data.token_bytes, rows_sharding)

        state = session.train(
            objective, train_batches.local_batch, writer, checkpointer, evaluate, peak
        )
        final = evaluate(state, max_batches=0)  # the whole validation split
        checkpointer.close()
        if mlm:
            writer.print(
                f"validation: masked-token loss {final['loss']:.4f} nats/token, "
                f"perplexity {final['perplexity']:.2f}, accuracy {final['accuracy']:.2%}"
            )
        else:
            writer.print(
                f"validation: loss {final['loss']:.4f} nats/token, "
                f"perplexity {final['perplexity']:.2f}, bits-per-byte {final['bits_per_byte']:.4f}"
            )
        if cfg.train.sample_tokens and not mlm:  # an encoder does not generate text
            text = sample_text(
                session.graphdef,
                state.params,
                data.tokenizer,
                cfg.train.sample_prompt,
                cfg.train.sample_tokens,
                max_len=cfg.data.seq_len,
                mesh=mesh,
                seed=cfg.train.seed,
            )
            writer.print(f"sample:\n{text}")
    if jax.process_index() == 0:
        (run_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
        if (curves := write_run_curves(run_dir)) is not None:  # needs matplotlib
            writer.print(f"curves: {curves}")
    return final
