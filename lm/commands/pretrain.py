"""`lm pretrain`: train a causal (or masked) language model from scratch, or resume a run.

Reads top to bottom: config → mesh → data → sharded state (or the newest checkpoint) →
the shared loop → final evaluation and a sample.
"""

from __future__ import annotations

import functools
import json

import jax
from etils import epath

from lm.config import Config, ConfigError, validate
from lm.data.batches import ordered_batches
from lm.data.mlm import MaskedStepBatches, masked_eval_batches, masking_for
from lm.data.pipeline import load_pretrain_data, to_global
from lm.evaluation.lm_metrics import evaluate_lm
from lm.inference.generator import sample_text
from lm.model.build import build_model
from lm.run_dir import write_run_files
from lm.runtime.distributed import initialize, process_zero_first
from lm.runtime.flops import peak_flops
from lm.runtime.mesh import batch_sharding, check_batch_fits_mesh, make_mesh
from lm.train.checkpoint import Checkpointer, checkpoint_meta
from lm.train.loop import LoopSettings, run_loop
from lm.train.metrics import MetricsWriter
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_eval_step, make_train_step


def check_objective_fits_model(cfg: Config) -> None:
    """Next-token prediction needs the causal mask: an encoder would see the targets."""
    if cfg.train.objective == "clm" and not cfg.model.causal:
        raise ConfigError(
            "train.objective=clm needs a causal model, but model.causal is false (a bidirectional "
            "encoder sees the tokens it predicts); set model.causal=true or train.objective=mlm."
        )


def pretrain(cfg: Config) -> dict[str, float]:
    """Run (or resume) pretraining as `cfg` says; returns the final validation metrics."""
    initialize()  # joins a multi-host run when the environment asks for one; before any device use
    validate(cfg, jax.device_count())
    check_objective_fits_model(cfg)
    run_dir = epath.Path(cfg.train.run_dir)  # local or gs://
    mesh = make_mesh(cfg.mesh)
    check_batch_fits_mesh(cfg, mesh)
    # Process 0 trains the run's tokenizer (if it needs one) before the others read it.
    data = process_zero_first(
        "pretrain_data", lambda: load_pretrain_data(cfg.data, run_dir, cfg.model.vocab_size)
    )
    write_run_files(run_dir, cfg)

    writer = MetricsWriter(run_dir, cfg.train.steps)
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
    with jax.set_mesh(mesh):
        graphdef, abstract, shardings, init = plan_train_state(
            lambda rngs: build_model(cfg, rngs), tx, mesh, cfg.train.seed
        )
        start = checkpointer.latest_step() or 0
        if start:
            state, _ = checkpointer.restore(start, abstract, shardings)
            writer.print(f"resumed from step {start} ({checkpointer.directory})")
        else:
            state = init()

        mlm = cfg.train.objective == "mlm"
        objective = TokenCrossEntropy(z_loss=cfg.train.z_loss)
        masking = masking_for(cfg.data, cfg.model.vocab_size, data.tokenizer) if mlm else None
        train_batches = MaskedStepBatches(data.train, masking) if mlm else data.train
        dropout_seed = cfg.train.seed + 1 if cfg.model.dropout > 0 else None
        train_step = make_train_step(
            graphdef, tx, objective, shardings, cfg.optim.grad_accum, dropout_seed
        )
        eval_step = make_eval_step(graphdef, objective)
        rows_sharding = batch_sharding(mesh)

        def batch_at(step: int):
            return to_global(train_batches.local_batch(step), rows_sharding)

        def evaluate(current, max_batches: int = cfg.train.eval_batches) -> dict[str, float]:
            if mlm:  # bits-per-byte of masked tokens alone would mean nothing
                batches = masked_eval_batches(
                    data.validation, cfg.data.batch_size, masking, max_batches
                )
                return evaluate_lm(eval_step, current.params, batches, None, rows_sharding)
            batches = ordered_batches(data.validation, cfg.data.batch_size, max_batches)
            return evaluate_lm(eval_step, current.params, batches, data.token_bytes, rows_sharding)

        meta_at = functools.partial(checkpoint_meta, cfg)
        settings = LoopSettings.for_run(cfg, peak)
        state = run_loop(
            state, train_step, batch_at, settings, writer, checkpointer, meta_at, evaluate, start
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
                graphdef,
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
    writer.close()
    return final
