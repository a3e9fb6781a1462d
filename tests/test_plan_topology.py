"""`lm plan --topology`: TPU slice names, the libtpu-missing error, the HLO collectives parser,
and (slow, with libtpu) the real TPU compile of a tiny config."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lm.cli import main
from lm.config import ConfigError, load_config
from lm.runtime import aot
from lm.runtime.aot import CHIPS, Collective, collective_bytes, collectives, topology_name

TINY = [
    "model.num_layers=2",
    "model.d_model=128",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.d_ff=256",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.batch_size=8",
    "mesh.data=1",
    "mesh.fsdp=-1",
]


@pytest.mark.parametrize(
    "name, topology",
    [
        ("v5e-256", "v5e:16x16"),
        ("v5litepod-8", "v5e:2x4"),
        ("v6e-64", "v6e:8x8"),
        ("v5p-8", "v5p:2x2x1"),  # v5p counts TensorCores: 4 chips
        ("v5p-128", "v5p:4x4x4"),
        ("v5p-512", "v5p:4x8x8"),
        ("V5P:2x2x1", "v5p:2x2x1"),
        ("v5e:2x2", "v5e:2x2"),
    ],
)
def test_slice_names_map_to_libtpu_topologies(name, topology):
    assert topology_name(name) == (topology, CHIPS[topology[:3]])


@pytest.mark.parametrize("name", ["v5p-12", "v5e-3", "h100-8", "v4-8", "v5e"])
def test_unknown_slices_are_refused(name):
    with pytest.raises(ConfigError):
        topology_name(name)


def test_topology_without_libtpu_is_one_sentence(monkeypatch, capsys):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    assert main(["plan", "--topology", "v5e-8", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "pip install 'lm[tpu]'" in err


# A scanned layer: the while body runs 3 times (`counter < 3`), its all-gather with it.
HLO = """\
HloModule step

%cond (p: (s32[], bf16[64,704])) -> pred[] {
  %p = (s32[], bf16[64,704]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (q: (s32[], bf16[64,704])) -> (s32[], bf16[64,704]) {
  %q = (s32[], bf16[64,704]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %w = bf16[64,704]{1,0} get-tuple-element(%q), index=1
  %ag = bf16[256,704]{1,0:T(8,128)(2,1)} all-gather(bf16[64,704]{1,0} %w), dimensions={0}
  ROOT %t = (s32[], bf16[64,704]{1,0}) tuple(%j, %w)
}

ENTRY %main (a: f32[], b: f32[256]) -> f32[16] {
  %ar = (f32[], f32[256]{0}) all-reduce(f32[] %a, f32[256]{0} %b), to_apply=%add
  %ags = (bf16[8,16]{1,0}, bf16[32,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %x)
  %agd = bf16[32,16]{1,0} all-gather-done((bf16[8,16]{1,0}, bf16[32,16]{1,0}) %ags)
  %loop = (s32[], bf16[64,704]{1,0}) while(%init), condition=%cond, body=%body
  %add = f32[4]{0} add(f32[4]{0} %u, f32[4]{0} %v)
  %g2 = bf16[128,8]{1,0:T(8,128)(2,1)} fusion(%u), kind=kLoop, calls=%f
  %rs2 = bf16[32,8]{1,0} reduce-scatter(%g2), dimensions={0}
  ROOT %rs = f32[16]{0} reduce-scatter(f32[64]{0} %g), dimensions={0}
}
"""


def test_collectives_parser_counts_ring_traffic_and_loop_trips():
    found = collectives(HLO)
    assert found == [
        Collective("all-gather", ("bf16[256,704]",), 256 * 704 * 2, 3, 256 * 704 * 2),
        # An all-reduce sends its bytes twice (reduce-scatter, then all-gather).
        Collective("all-reduce", ("f32[]", "f32[256]"), 4 + 256 * 4, 1, 2 * (4 + 256 * 4)),
        Collective("all-gather", ("bf16[32,16]",), 32 * 16 * 2, 1, 32 * 16 * 2),  # at -start
        # A reduce-scatter sends its operand's bytes, found by name where not written inline.
        Collective("reduce-scatter", ("bf16[32,8]",), 32 * 8 * 2, 1, 128 * 8 * 2),
        Collective("reduce-scatter", ("f32[16]",), 16 * 4, 1, 64 * 4),
    ]
    assert collective_bytes(found) == sum(c.traffic * c.count for c in found)
    assert collective_bytes(found[:1]) == 3 * 256 * 704 * 2


@pytest.fixture
def no_compilation_cache():
    """TPU executables cannot be read back on a CPU host: keep them out of the tests' cache."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


@pytest.mark.slow
@pytest.mark.usefixtures("no_compilation_cache")
@pytest.mark.parametrize("topology, chips", [("v5e:2x2", 4), ("v5p:2x2x1", 4)])
def test_tiny_config_compiles_for_a_tpu_slice_and_fits(topology, chips, capsys):
    pytest.importorskip("libtpu")
    assert main(["plan", "--topology", topology, *TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["fits"] is True
    assert summary["chips"] == chips and summary["mesh"]["fsdp"] == chips
    assert summary["hbm_per_chip_bytes"] == CHIPS[topology[:3]].memory_bytes
    assert 0 < summary["compiled_peak_bytes_per_chip"] < summary["hbm_per_chip_bytes"]
    assert summary["collective_bytes_per_step"] > 0  # FSDP gathers weights
    assert summary["fsdp_ideal_collective_bytes_per_step"] > 0
    assert 0 < summary["estimated_mfu"] <= 1


def test_decode_plan_without_a_topology_is_one_sentence(capsys):
    assert main(["plan", "--decode", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--topology" in err, err


@pytest.mark.slow
@pytest.mark.usefixtures("no_compilation_cache")
def test_decode_step_compiles_for_a_tpu_slice_with_the_cache_it_holds(capsys):
    pytest.importorskip("libtpu")
    assert main(["plan", "--topology", "v5e:2x2", "--decode", *TINY]) == 0
    decode = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = load_config(None, TINY)
    m = cfg.model
    # Keys and values of every layer, rows split over the 4 chips (fsdp shards the batch).
    itemsize = np.dtype(m.dtype).itemsize
    cache = 2 * m.num_layers * cfg.data.batch_size * m.kv_heads * m.max_seq_len * m.head_dim
    cache *= itemsize
    assert decode["kv_cache_bytes_per_chip"] == cache // 4
    assert decode["rows"] == cfg.data.batch_size and decode["cache_slots"] == m.max_seq_len
    assert decode["fits"] is True
    assert decode["params_bytes_per_chip"] < decode["compiled_peak_bytes_per_chip"]
    assert decode["estimated_tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.usefixtures("no_compilation_cache")
def test_a_step_that_cannot_fit_is_one_sentence_with_the_fix(capsys):
    pytest.importorskip("libtpu")
    huge = [*TINY, "model.vocab_size=32768", "data.batch_size=16384"]  # 34 GiB of logits a chip
    assert main(["plan", "--topology", "v5e:2x2", *huge]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit in device memory" in err, err
    assert "mesh.fsdp=-1" in err


@pytest.mark.slow
@pytest.mark.usefixtures("no_compilation_cache")
@pytest.mark.parametrize("name", ["v5p-128", "v5e-256"])
def test_pod_1b_slice_configs_compile_and_fit_with_headroom(name, capsys):
    pytest.importorskip("libtpu")
    assert main(["plan", "--topology", name, "--config", f"configs/tpu/pod_1b_{name}.yaml"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fits"] is True
    assert summary["compiled_peak_bytes_per_chip"] <= 0.9 * summary["hbm_per_chip_bytes"]
    # Every weight is gathered forward and backward and every gradient reduced: at least the
    # FSDP ideal moves; measured 2.39x on v5p-128 and 2.90x on v5e-256 (docs/scaling.md).
    ratio = summary["collective_bytes_per_step"] / summary["fsdp_ideal_collective_bytes_per_step"]
    assert 1 <= ratio <= 3, ratio
