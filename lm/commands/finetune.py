"""`lm finetune`: classification, regression, token labelling or text-to-text SFT.

Reads top to bottom: config → mesh → tokenizer and task examples → sharded state (a fresh head
on `init_from`'s backbone, or this run's newest checkpoint) → the shared train step and loop,
evaluating task metrics, keeping the best checkpoint and stopping early → final metrics, and
for LoRA a merged export. Only the objective, the head, the data and the initial parameters
differ from `lm pretrain`.
"""

from __future__ import annotations

import functools
import json

import jax
from etils import epath
from flax import nnx

from lm.config import Config, ConfigError, validate
from lm.data.batches import ArrayTable, StepBatcher
from lm.data.pipeline import to_global
from lm.data.task_data import encode, finetune_tokenizer, stats_line, task_examples
from lm.evaluation.tasks import AnswerScorer, evaluate_task
from lm.model.build import build_model
from lm.model.lora import LoraModel, merge_lora
from lm.run_dir import export_merged, load_run, write_run_files
from lm.runtime.flops import peak_flops
from lm.runtime.mesh import batch_sharding, check_batch_fits_mesh, make_mesh
from lm.tasks import task_for
from lm.train.checkpoint import BestCheckpoint, Checkpointer, checkpoint_meta
from lm.train.freeze import finetune_optimizer, gate_frozen
from lm.train.init_from import backbone_prefix, copy_backbone
from lm.train.loop import LoopSettings, run_loop
from lm.train.metrics import MetricsWriter
from lm.train.state import TrainState, plan_train_state
from lm.train.step import make_eval_step, make_train_step


def finetune(cfg: Config) -> dict[str, float]:
    """Run (or resume) fine-tuning as `cfg.finetune` says; returns the final validation metrics."""
    validate(cfg, jax.device_count())
    f = cfg.finetune
    if not f.task:
        raise ConfigError(
            "finetune.task is empty; set it to classification, regression, token_labels or "
            "text_to_text (see configs/finetune/)."
        )
    task = task_for(cfg)
    run_dir = epath.Path(cfg.train.run_dir)  # local or gs://
    mesh = make_mesh(cfg.mesh)
    check_batch_fits_mesh(cfg, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = checkpointer.latest_step() or 0
    source = None
    if f.init_from and not start:
        source = load_run(f.init_from, step=None if f.init_step < 0 else f.init_step, mesh=mesh)

    examples, notes = task_examples(cfg)
    tokenizer = finetune_tokenizer(
        cfg, run_dir, source.tokenizer if source else None, examples["train"][0]
    )
    encoded = {split: encode(cfg, tokenizer, ex) for split, ex in examples.items()}
    train = encoded["train"][0]
    write_run_files(run_dir, cfg, tokenizer)

    writer = MetricsWriter(run_dir, cfg.train.steps)
    for note in notes:
        writer.print(note)
    for split, (_, stats) in encoded.items():
        writer.print(stats_line(split, stats, cfg.data.seq_len))
    tx = finetune_optimizer(cfg)
    best = BestCheckpoint(run_dir / "best", cfg)  # a run dir of its own
    write_run_files(best.directory, cfg, tokenizer)
    peak = peak_flops(jax.devices())  # measured outside the mesh context
    with jax.set_mesh(mesh):
        graphdef, abstract, shardings, init = plan_train_state(
            lambda rngs: build_model(cfg, rngs), tx, mesh, cfg.train.seed
        )
        if start:
            state, _ = checkpointer.restore(start, abstract, shardings)
            writer.print(f"resumed from step {start} ({checkpointer.directory})")
        else:
            state = init()
            if source is not None:
                params = copy_backbone(
                    state.params, source.params, backbone_prefix(cfg), f.init_from
                )
                state = state.replace(params=params)
                fresh = "; head fresh" if backbone_prefix(cfg)[-1:] == ("backbone",) else ""
                writer.print(f"backbone from {f.init_from} (step {source.step}){fresh}")

        objective = gate_frozen(cfg, task.objective(cfg, train))
        dropout_seed = cfg.train.seed + 1 if cfg.model.dropout or f.head_dropout else None
        train_step = make_train_step(
            graphdef, tx, objective, shardings, cfg.optim.grad_accum, dropout_seed
        )
        eval_step = make_eval_step(graphdef, objective)
        rows_sharding = batch_sharding(mesh)
        batches = StepBatcher(ArrayTable(train), cfg.data.batch_size, cfg.data.seed)
        answer_scores = AnswerScorer(cfg, tokenizer, mesh)

        def batch_at(step: int):
            return to_global(batches.local_batch(step), rows_sharding)

        def evaluate_split(current: TrainState, split: str, limit: int) -> dict[str, float]:
            generate = None
            if task.predicts_tokens:
                model = nnx.merge(graphdef, current.params)
                model = merge_lora(model) if isinstance(model, LoraModel) else model

                def generate():
                    return answer_scores(model, examples[split])

            return evaluate_task(
                cfg, eval_step, current.params, encoded[split][0], rows_sharding, generate, limit
            )

        def evaluate(current: TrainState) -> dict[str, float]:
            results = evaluate_split(current, "validation", f.eval_examples)
            best.update(int(current.step), current, results)
            return results

        state = run_loop(
            state,
            train_step,
            batch_at,
            LoopSettings.for_run(cfg, peak),
            writer,
            checkpointer,
            functools.partial(checkpoint_meta, cfg),
            evaluate,
            start,
            should_stop=best.should_stop,
        )
        final = {f"validation/{k}": v for k, v in evaluate_split(state, "validation", 0).items()}
        if "test" in encoded:
            final.update({f"test/{k}": v for k, v in evaluate_split(state, "test", 0).items()})
        final.update({"best/step": best.record["step"], "best/value": best.record["value"]})
        checkpointer.close()
        best.close()
        writer.print(
            "final: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items() if v is not None)
        )
        if f.lora_rank:
            export_merged(cfg, graphdef, state.params, run_dir, tokenizer)
            writer.print(f"LoRA merged into the base weights: {run_dir / 'merged'}")
    if jax.process_index() == 0:
        (run_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
    writer.close()
    return final
