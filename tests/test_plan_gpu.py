"""`lm plan --gpu`: the cards, the refusals, and (slow, with JAX's CUDA plugin) the real GPU
compile of every shipped GPU config for the card its comment names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_plan_topology import TINY as TPU_TINY

from lm.cli import main
from lm.runtime import gpus

ROOT = Path(__file__).resolve().parent.parent
# The TPU tests' tiny model, in bf16 on 128-token rows (cuDNN's fused attention needs bf16).
TINY = [*TPU_TINY, "model.max_seq_len=128", "data.seq_len=128", "model.dtype=bfloat16"]


def test_the_cards_one_gpu_users_rent_are_described():
    assert {"h100", "h200", "a100-80gb", "a100-40gb", "l4", "rtx4090"} <= set(gpus.gpu_names())


@pytest.mark.parametrize("card", gpus.gpu_names())
def test_each_card_becomes_a_gpu_target_description(card):
    spec = gpus.gpu_spec(card)
    chip = gpus.gpu_chip(spec)
    assert chip.memory_bytes == spec["memory_mib"] * 2**20
    assert 100e12 < chip.peak_bf16_flops < 2000e12  # dense bf16 peaks of these generations
    text = gpus.target_config(spec) if gpus.cuda_plugin_available() else None
    if text is not None:
        major, minor = spec["compute_capability"].split(".")
        assert f"core_count: {spec['sms']}\n" in text
        assert f"device_memory_size: {chip.memory_bytes}\n" in text
        assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text


@pytest.mark.parametrize(
    "args, words",
    [
        (["--gpu", "h800"], ["unknown GPU 'h800'", "h100"]),
        (["--gpu", "h100:0"], ["at least 1"]),
        (["--gpu", "h100", "--topology", "v5e-8"], ["give one"]),
        (["--decode"], ["--topology", "--gpu h100"]),
    ],
)
def test_bad_gpu_requests_are_one_sentence(args, words, capsys):
    assert main(["plan", *args, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_gpu_without_the_cuda_plugin_is_one_sentence(monkeypatch, capsys):
    monkeypatch.setattr(gpus, "cuda_plugin_available", lambda: False)
    assert main(["plan", "--gpu", "h100", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lm[cuda]'" in err, err


def _plan(capsys, *args: str) -> tuple[str, dict]:
    pytest.importorskip("jax_plugins.xla_cuda12", reason="JAX's CUDA plugin (lm[cuda]) absent")
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


# Each shipped GPU config names the card it is for in its first comment line: "(… on CARD)".
GPU_CONFIGS = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


def _card(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    found = re.search(r"lm plan --gpu ([\w.-]+)", path.read_text())
    assert found, f"{path.name} does not say which card it is for (`lm plan --gpu CARD`)"
    assert first.startswith("#")
    return found.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_every_gpu_config_fits_its_card_with_headroom_as_compiled(path, capsys):
    card = _card(path)
    out, summary = _plan(capsys, "--gpu", card, "--config", str(path))
    assert summary["fits"] is True
    headroom = 1 - summary["compiled_peak_bytes_per_chip"] / summary["hbm_per_chip_bytes"]
    assert headroom >= 0.10, out
    # The analytic plan stays within 15% of XLA's peak for the configs we ship.
    ratio = summary["analytic_peak_bytes_per_chip"] / summary["compiled_peak_bytes_per_chip"]
    assert 0.85 <= ratio <= 1.15, out
    # The config's comment quotes the compiled peak (GiB, two decimals).
    peak = f"{summary['compiled_peak_bytes_per_chip'] / 2**30:.2f} GiB"
    assert peak in path.read_text(), f"{path.name} should quote the compiled peak {peak}"
    # cuDNN's fused attention is what the GPU profile's `auto` kernel compiles to.
    assert any(k.startswith("__cudnn$fmha") for k in summary["custom_calls"]), out


@pytest.mark.slow
def test_tiny_config_compiles_for_two_gpus_of_one_host_with_fsdp(capsys):
    out, summary = _plan(capsys, "--gpu", "h100:2", *TINY, "mesh.data=1", "mesh.fsdp=-1")
    assert summary["chips"] == 2 and summary["mesh"]["fsdp"] == 2
    assert summary["collective_bytes_per_step"] > 0, out  # FSDP gathers weights
    assert "NVLink" in out and 0 < summary["estimated_mfu"] <= 1


@pytest.mark.slow
def test_decode_step_compiles_for_a_gpu(capsys):
    out, summary = _plan(capsys, "--gpu", "l4", "--decode", *TINY)
    assert summary["fits"] is True and summary["kv_cache_bytes_per_chip"] > 0, out


def test_gpu_config_comments_name_a_known_card():
    for path in GPU_CONFIGS:
        assert _card(path) in gpus.gpu_names(), path.name
        yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_sft_rows_reach_cudnn_with_its_causal_padding_mask_and_no_dense_bias():
    """One example per row: cuDNN masks by length (mask type PADDING_CAUSAL), so no [B, 1, L, L]
    bias is built or read (`__cudnn$fmhaScaleBias...` would take one)."""
    pytest.importorskip("jax_plugins.xla_cuda12", reason="JAX's CUDA plugin (lm[cuda]) absent")
    from lm.config import load_config
    from lm.runtime.aot import compile_train_step

    cfg = load_config(str(ROOT / "configs/gpu/llama_1b_sft.yaml"), ["data.seq_len=4096"])
    step = compile_train_step(cfg, gpus.gpu_target("h100").devices)
    assert step.custom_calls.get("__cudnn$fmhaSoftmax") and step.custom_calls.get(
        "__cudnn$fmhaSoftmaxBackward"
    ), step.custom_calls
    assert not any("Bias" in name for name in step.custom_calls), step.custom_calls
    assert set(re.findall(r'"mask_type": ?"(\w+)"', step.hlo)) == {"PADDING_CAUSAL"}
