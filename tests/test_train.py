"""The train step, optimizer and loop: accumulation, decay mask, schedule, divergence."""

import errno
import io
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_model

from lm.config import CheckpointConfig, MeshConfig, OptimConfig
from lm.model import Transformer
from lm.model.params import decay_mask
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.train.checkpoint import Checkpointer
from lm.train.loop import LoopSettings, RunWriteError, TrainingDiverged, run_loop
from lm.train.metrics import MetricsWriter
from lm.train.objectives import TokenCrossEntropy, token_losses
from lm.train.optim import learning_rate, make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_train_step


def one_step(grad_accum, mesh_shape=(2, 2, 2)):
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    # A large Adam eps keeps updates proportional to gradients: with the default, gradients
    # near zero turn float-rounding differences into whole learning-rate steps.
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-3), 10)
    with jax.set_mesh(mesh):
        graphdef, _, shardings, init = plan_train_state(
            lambda rngs: Transformer(tiny_model(), rngs=rngs), tx, mesh, 0
        )
        state = init()
        step = make_train_step(graphdef, tx, TokenCrossEntropy(), shardings, grad_accum=grad_accum)
        state, metrics = step(state, jax.device_put(random_batch(seed=3), batch_sharding(mesh)))
    return jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch():
    params1, metrics1 = one_step(1)
    params4, metrics4 = one_step(4)
    assert metrics4["loss"] == pytest.approx(metrics1["loss"], rel=1e-6)
    assert metrics4["grad_norm"] == pytest.approx(metrics1["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_cross_entropy_matches_numpy_and_ignores_zero_weights():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
    nll, _ = token_losses(jnp.asarray(logits), jnp.asarray(targets))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-5)
    _, z = token_losses(jnp.asarray(logits), jnp.asarray(targets), z_loss=1e-4)
    np.testing.assert_allclose(np.asarray(z), 1e-4 * np.log(np.exp(logits).sum(-1)) ** 2, rtol=1e-5)


def test_cross_entropy_gradient_equals_autodiff_of_log_softmax_with_z_loss():
    # The hand-written backward (softmax minus one-hot, z-loss through logsumexp) against JAX's
    # own derivative of the textbook formula, with unequal weights per token.
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 5)), jnp.float32)

    def ours(x):
        nll, z = token_losses(x, targets, z_loss=1e-2)
        return jnp.sum((nll + z) * weights)

    def textbook(x):
        log_probs = jax.nn.log_softmax(x, axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        return jnp.sum((nll + 1e-2 * jax.nn.logsumexp(x, axis=-1) ** 2) * weights)

    np.testing.assert_allclose(ours(logits), textbook(logits), rtol=1e-6)
    expected = jax.grad(textbook)(logits)
    np.testing.assert_allclose(jax.grad(ours)(logits), expected, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(logits), expected, atol=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings():
    from flax import nnx

    with nnx.use_eager_sharding(False):
        model = Transformer(tiny_model(tie_embeddings=False, bias=True), rngs=nnx.Rngs(0))
        params = nnx.state(model)
    mask = {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(decay_mask(params))}
    assert mask["['embed'].value"] is False
    assert mask["['final_norm']['scale'].value"] is False
    assert mask["['blocks']['attn_norm']['scale'].value"] is False
    assert mask["['blocks']['attn']['wq'].value"] is True
    assert mask["['blocks']['mlp']['w_down'].value"] is True
    assert mask["['unembed'].value"] is True
    assert mask["['blocks']['attn']['bq'].value"] is False
    assert mask["['blocks']['mlp']['b_down'].value"] is False


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_min_ratio(schedule):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    lr = learning_rate(cfg, 100)
    assert float(lr(0)) == pytest.approx(0.1)  # first update already moves
    assert float(lr(9)) == pytest.approx(1.0)
    end = 1.0 if schedule == "constant" else 0.1
    assert float(lr(99)) == pytest.approx(end, abs=1e-6)


def test_nan_loss_stops_the_run_naming_step_and_last_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every=2, async_save=False))
    losses = [3.0, 2.0, 1.5, float("nan"), 1.0, 1.0]

    def fake_step(state, batch):
        return {"w": state["w"] + 1}, {"loss": jnp.float32(losses[batch])}

    settings = LoopSettings(
        total_steps=6,
        stop_at=6,
        log_every=1,
        eval_every=100,
        checkpoint_every=2,
        tokens_per_step=1,
        flops_per_step=1.0,
        peak_flops=1.0,
    )
    writer = MetricsWriter(tmp_path, 6, stream=io.StringIO())
    state = {"w": jnp.zeros(())}
    with pytest.raises(TrainingDiverged) as error:
        run_loop(state, fake_step, lambda step: step, settings, writer, checkpointer, lambda s: {})
    message = str(error.value)
    assert "Loss became nan at step 4" in message
    assert f"last good checkpoint: step 2 in {checkpointer.directory}" in message
    assert checkpointer.latest_step() == 2  # the diverged state was never saved


def _fake_run(tmp_path, metrics_at, steps: int = 4, **settings_overrides):
    """run_loop over a fake step whose metrics at step index i are `metrics_at(i)`; returns
    the checkpointer and what the loop printed."""
    checkpointer = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every=2, async_save=True))
    stream = io.StringIO()
    settings = LoopSettings(
        total_steps=steps,
        stop_at=steps,
        log_every=1,
        eval_every=100,
        checkpoint_every=2,
        tokens_per_step=1,
        flops_per_step=1.0,
        peak_flops=1.0,
        **settings_overrides,
    )

    def fake_step(state, batch):
        return {"w": state["w"] + 1}, {k: jnp.float32(v) for k, v in metrics_at(batch).items()}

    writer = MetricsWriter(tmp_path, steps, stream=stream)
    state = {"w": jnp.zeros(())}
    try:
        run_loop(state, fake_step, lambda step: step, settings, writer, checkpointer, lambda s: {})
    finally:
        writer.close()
        stream.seek(0)
    return checkpointer, stream


class _DiskFullAfter:
    """A metrics file that takes `lines` lines, then fails as a full disk does."""

    def __init__(self, lines: int):
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines -= 1
        if self.lines < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None: ...

    def close(self) -> None: ...


def test_full_disk_refusing_the_metrics_stops_naming_the_file_and_newest_checkpoint(
    tmp_path, monkeypatch
):
    opened = MetricsWriter.write

    def write_to_full_disk(self, step, scalars, prefix="train"):
        if self._jsonl is None:
            self._tb = SimpleNamespace(add_scalar=lambda *args: None, close=lambda: None)
            self._jsonl = _DiskFullAfter(2)
        opened(self, step, scalars, prefix)

    monkeypatch.setattr(MetricsWriter, "write", write_to_full_disk)
    with pytest.raises(RunWriteError) as error:
        _fake_run(tmp_path, lambda i: {"loss": 2.0}, steps=6)
    message = str(error.value)
    assert message.startswith(f"Writing {tmp_path / 'metrics.jsonl'} failed (No space left on")
    assert "older checkpoints are kept (newest: step 2)" in message
    assert (tmp_path / "ckpt" / "2").is_dir()


def test_a_full_disk_at_close_does_not_hide_the_error_that_stopped_training(tmp_path):
    def flush_fails() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = MetricsWriter(tmp_path, 2, stream=io.StringIO())
    writer.write(1, {"loss": 2.0})
    writer._tb.close = flush_fails
    with pytest.raises(TrainingDiverged), writer:
        raise TrainingDiverged("Loss became nan at step 2")
    with pytest.raises(OSError, match="No space left"), writer:  # nothing else to report
        pass


def test_infinite_gradient_norm_stops_the_run_naming_a_finished_checkpoint(tmp_path):
    norms = [1.0, 1.0, float("inf"), 1.0]
    with pytest.raises(TrainingDiverged) as error:
        _fake_run(tmp_path, lambda i: {"loss": 2.0, "grad_norm": norms[i]})
    message = str(error.value)
    assert message.startswith("Gradient norm became inf at step 3; last good checkpoint: step 2")
    assert "optim.clip_norm" in message
    assert (tmp_path / "ckpt" / "2").is_dir()  # the async save it names had finished


def test_loss_at_ln_vocab_with_zero_gradient_warns_once_that_the_model_is_not_learning(tmp_path):
    uniform = float(np.log(300))
    _, out = _fake_run(
        tmp_path, lambda i: {"loss": uniform, "grad_norm": 0.0}, uniform_loss=uniform
    )
    warnings = [line for line in out.read().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "at step 1" in warnings[0] and "not learning" in warnings[0]


def test_learning_model_gets_no_warning(tmp_path):
    uniform = float(np.log(300))
    _, out = _fake_run(
        tmp_path, lambda i: {"loss": uniform, "grad_norm": 0.5}, uniform_loss=uniform
    )
    assert "warning" not in out.read()
