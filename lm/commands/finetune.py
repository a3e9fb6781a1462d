"""`lm finetune`: classification, regression, token labelling or text-to-text SFT.

Reads top to bottom: config → mesh → tokenizer and task examples → sharded state (a fresh head
on `init_from`'s backbone, or this run's newest checkpoint) → the shared train step and loop,
evaluating task metrics, keeping the best checkpoint and stopping early → final metrics, and
for LoRA a merged export. Only the objective, the head, the data and the initial parameters
differ from `lm pretrain`. A run stopped by SIGTERM or Ctrl-C checkpoints its step and ends
there (`Preempted`), without the final evaluation.
"""

from __future__ import annotations

import json

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from lm.config import Config, check_finetuning, to_dict
from lm.data.batches import ArrayTable, StepBatcher
from lm.data.task_data import encode, finetune_tokenizer, stats_line, task_examples
from lm.evaluation.tasks import AnswerScorer, evaluate_task
from lm.model.lora import LoraModel, merge_lora
from lm.run_dir import export_merged, load_run, write_run_files
from lm.runtime.flops import peak_flops
from lm.runtime.mesh import batch_sharding
from lm.tasks import Task, task_for
from lm.train.checkpoint import BestCheckpoint, Checkpointer
from lm.train.curves import write_run_curves
from lm.train.freeze import finetune_optimizer, gate_frozen
from lm.train.init_from import backbone_prefix, copy_backbone
from lm.train.loop import run_mesh, start_session
from lm.train.metrics import MetricsWriter
from lm.train.run_lock import claim_run_dir
from lm.train.state import TrainState
from lm.train.step import make_eval_step


def finetune(cfg: Config) -> dict[str, float]:
    """Run (or resume) fine-tuning as `cfg.finetune` says; returns the final validation metrics."""
    check_finetuning(cfg)
    mesh = run_mesh(cfg)
    task = task_for(cfg)
    run_dir = epath.Path(cfg.train.run_dir)  # local or gs://
    with claim_run_dir(run_dir, print):
        return _finetune(cfg, task, mesh, run_dir)


def _finetune(cfg: Config, task: Task, mesh: Mesh, run_dir: epath.Path) -> dict[str, float]:
    """The run, once this process owns `run_dir`."""
    f = cfg.finetune
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    source = None
    if f.init_from and not checkpointer.latest_step():
        source = load_run(f.init_from, step=None if f.init_step < 0 else f.init_step, mesh=mesh)

    examples, notes = task_examples(cfg)
    tokenizer = finetune_tokenizer(
        cfg, run_dir, source.tokenizer if source else None, examples["train"][0]
    )
    encoded = {split: encode(cfg, tokenizer, ex) for split, ex in examples.items()}
    train = encoded["train"][0]
    write_run_files(run_dir, cfg, tokenizer)

    writer = MetricsWriter(run_dir, cfg.train.steps, wandb=cfg.train.wandb, config=to_dict(cfg))
    for note in notes:
        writer.print(note)
    for split, (_, stats) in encoded.items():
        writer.print(stats_line(split, stats, cfg.data.seq_len))
    tx = finetune_optimizer(cfg)
    best = BestCheckpoint(run_dir / "best", cfg)  # a run dir of its own
    write_run_files(best.directory, cfg, tokenizer)
    peak = peak_flops(jax.devices())  # measured outside the mesh context

    def with_backbone(state: TrainState) -> TrainState:
        """A fresh state with `init_from`'s backbone copied in."""
        if source is None:
            return state
        params = copy_backbone(state.params, source.params, backbone_prefix(cfg), f.init_from)
        fresh = "; head fresh" if backbone_prefix(cfg)[-1:] == ("backbone",) else ""
        writer.print(f"backbone from {f.init_from} (step {source.step}){fresh}")
        return state.replace(params=params)

    with jax.set_mesh(mesh), writer:
        session = start_session(cfg, mesh, tx, checkpointer, writer, fresh=with_backbone)
        graphdef = session.graphdef
        objective = gate_frozen(cfg, task.objective(cfg, train))
        eval_step = make_eval_step(graphdef, objective)
        rows_sharding = batch_sharding(mesh)
        batches = StepBatcher(ArrayTable(train), cfg.data.batch_size, cfg.data.seed)
        answer_scores = AnswerScorer(cfg, tokenizer, mesh)

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

        try:
            state = session.train(
                objective,
                batches.local_batch,
                writer,
                checkpointer,
                evaluate,
                peak,
                should_stop=best.should_stop,
            )
        except Exception:
            best.close()  # the loop waited for its own saves; a best one in flight ends whole too
            raise
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
        if (curves := write_run_curves(run_dir)) is not None:  # needs matplotlib
            writer.print(f"curves: {curves}")
    return final
