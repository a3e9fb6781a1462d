"""Every test runs on 8 CPU-emulated devices with JAX's persistent compilation cache."""

import importlib.util
import os
import pathlib
import signal

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ctrl-C as in a terminal, however the tests were started: a shell's background job starts with
# SIGINT ignored, which `lm` rightly leaves alone (nohup), and which its children would inherit;
# a handler instead is reset to the default in every `lm` subprocess the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# XLA's SPMD partitioner warns about resharding the embedding gather on meshes that use both
# fsdp and tensor axes; correct, just slower, and noise in test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests compile hundreds of tiny programs and run each a few times: XLA's CPU backend optimizations
# cost more compile time than they save (half the suite's time). Numerics stay deterministic, and
# every parity and bitwise test compares runs made under these same flags. LM_TEST_XLA_OPT=1
# keeps XLA's defaults, as does a machine with libtpu, whose TPU-topology compiles
# (test_plan_topology) measure memory these flags could change. Subprocesses inherit XLA_FLAGS.
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
if os.environ.get("LM_TEST_XLA_OPT") != "1" and importlib.util.find_spec("libtpu") is None:
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_XLA_FLAGS]
    ).strip()

from lm.runtime.host_memory import keep_freed_memory  # noqa: E402

# As `lm` commands do, before JAX starts its backend. pytest's processes already run a thread or
# two, which may have fixed glibc's arena limit, so here it removes only part of the page faults.
keep_freed_memory()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# LM_TEST_CACHE_DIR points the cache elsewhere, e.g. at an empty folder to time a cold run.
_CACHE = pathlib.Path(
    os.environ.get("LM_TEST_CACHE_DIR")
    or pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm.config import Config, ModelConfig, load_config  # noqa: E402

# `make test` runs a pytest-xdist worker per core, each taking whole files in this order: the
# longest files start first, so no worker is left alone with one at the end.
_LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_pretrain_cli.py",
    "test_finetune.py",
    "test_checkpoint.py",
    "test_parallel.py",
    "test_generate.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def tiny_model(**overrides) -> ModelConfig:
    """A model small enough to compile in a second or two."""
    base = dict(
        vocab_size=64,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        d_ff=64,
        max_seq_len=16,
    )
    return ModelConfig(**{**base, **overrides})


def random_batch(rows: int = 8, length: int = 16, vocab: int = 64, seed: int = 0, docs: int = 2):
    """A packed-looking batch: each row holds `docs` documents with their own positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
    bounds = np.sort(rng.choice(np.arange(1, length), docs - 1, replace=False))
    segment = np.searchsorted(bounds, np.arange(length), side="right").astype(np.int32) + 1
    starts = np.concatenate([[0], bounds])
    positions = (np.arange(length) - starts[segment - 1]).astype(np.int32)
    weights = np.ones((rows, length), np.float32)
    weights[:, bounds - 1] = 0.0  # no target across a document boundary
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": weights,
        "segment_ids": np.tile(segment, (rows, 1)),
        "positions": np.tile(positions, (rows, 1)),
    }


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of an `lm` subprocess in tests: CPU devices, the shared compilation
    cache, short multi-host timeouts, no launcher variables from the outer shell; plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LM_", "SLURM_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=str(_CACHE),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        LM_HEARTBEAT_S="5",
        LM_SHUTDOWN_TIMEOUT_S="10",
        **extra,
    )
    return env


def subprocess_run_config(
    corpus: pathlib.Path, data_dir: pathlib.Path, tokenizer: pathlib.Path, mesh: dict, train: dict
) -> dict:
    """A YAML-ready config tree of a tiny model on `corpus`, for runs of `lm` in subprocesses."""
    return {
        "model": dict(
            vocab_size=300, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=16
        ),
        "data": dict(
            source=str(corpus),
            data_dir=str(data_dir),
            tokenizer=str(tokenizer),
            seq_len=16,
            batch_size=8,
            validation_fraction=0.2,
        ),
        "mesh": mesh,
        "train": dict(log_every=1, eval_batches=1, sample_tokens=0, **train),
        "checkpoint": dict(every=5),
    }


def write_tiny_corpus(directory: pathlib.Path) -> pathlib.Path:
    """12 small text files of random words from an 11-word vocabulary in `directory/corpus`."""
    corpus = directory / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou"]
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words, 9)) for _ in range(40))
        (corpus / f"doc{i:02d}.txt").write_text(text + "\n")
    return corpus


# The model of every whole tiny run in the tests (16-token rows, a 300-piece tokenizer).
TINY_RUN_MODEL = [
    "model.vocab_size=300",
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.d_ff=64",
    "model.max_seq_len=16",
]


@pytest.fixture
def tiny_text_config(tmp_path) -> Config:
    """A whole run on a small local text corpus: tiny model, few steps, run dir in tmp."""
    corpus = write_tiny_corpus(tmp_path)
    return load_config(
        None,
        [
            f"data.source={corpus}",
            f"data.data_dir={tmp_path / 'tfds'}",
            "data.seq_len=16",
            "data.batch_size=8",
            "data.validation_fraction=0.2",
            *TINY_RUN_MODEL,
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=6",
            "train.log_every=1",
            "train.eval_every=3",
            "train.eval_batches=2",
            "train.sample_tokens=8",
            "checkpoint.every=3",
            "mesh.data=-1",
        ],
    )
