"""`lm generate`: continue prompts with a trained causal LM, streamed or as JSON lines."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lm.config import Config, ConfigError, load_config
from lm.inference.generator import Generator
from lm.run_dir import configured_tokenizer, load_run, read_run_config
from lm.runtime.mesh import make_mesh


def generate(
    run_dir: str,
    prompts: Sequence[str],
    prompts_file: str | None,
    *,
    step: int | None,
    as_json: bool,
    batch_size: int,
    overrides: Sequence[str] = (),
    **options,
) -> None:
    """Continue the prompts with checkpoint `step` (default newest) of `run_dir`; `overrides`
    (`data.tokenizer=PATH`, `mesh.*=N`) change the run's config for this command."""
    collected = read_prompts(prompts, prompts_file)
    cfg = generation_config(run_dir, overrides)
    touches_mesh = any(o.strip().startswith("mesh.") for o in overrides)
    run = load_run(run_dir, step=step, mesh=make_mesh(cfg.mesh) if touches_mesh else None)
    tokenizer = configured_tokenizer(run, cfg)
    if tokenizer is None:  # said before any prompt is printed
        raise FileNotFoundError(
            f"{run_dir} has no tokenizer.model or tokenizer.json and its config names none; "
            "pass data.tokenizer=PATH to the tokenizer the run was trained with."
        )
    generator = Generator(run.model, tokenizer, mesh=run.mesh)
    print_generations(generator, collected, as_json=as_json, batch_size=batch_size, **options)


def generation_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The run's config with `overrides`, which may name the tokenizer and the mesh only (the
    model is the run's, and no other setting changes what is generated)."""
    cfg = read_run_config(run_dir)
    if not overrides:
        return cfg
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key != "data.tokenizer" and not key.startswith("mesh."):
            raise ConfigError(
                f"lm generate takes data.tokenizer=PATH and mesh.* overrides only, not {key}; "
                "sampling has its own options (see lm generate --help)."
            )
    return load_config(Path(run_dir) / "config.yaml", overrides)


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line, then one per non-blank line of `prompts_file`."""
    collected = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"Prompts file {path} does not exist; pass a text file.")
        collected += [line for line in path.read_text().splitlines() if line.strip()]
    if not collected:
        raise ValueError("No prompts given; pass --prompt TEXT or --prompts-file FILE.")
    return collected


def print_generations(
    generator: Generator, prompts: list[str], *, as_json: bool, batch_size: int, **options
) -> None:
    """Stream each prompt's continuation to stdout (timing on stderr), or with `as_json` print
    one JSON object per prompt (text, tokens, log-probs, finish reason, timing), in batches."""
    if not as_json:
        for prompt in prompts:
            print(prompt, end="", flush=True)
            start = time.perf_counter()
            [done] = generator.generate(
                [prompt], on_token=lambda _, text: print(text, end="", flush=True), **options
            )
            seconds = time.perf_counter() - start
            print(flush=True)
            print(
                f"[{len(done.tokens)} tokens in {seconds:.2f} s, {done.finish_reason}]",
                file=sys.stderr,
            )
        return
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        start = time.perf_counter()
        completions = generator.generate(batch, **options)
        seconds = time.perf_counter() - start
        new_tokens = sum(len(c.tokens) for c in completions)
        for prompt, done in zip(batch, completions, strict=True):
            record = {"prompt": prompt, **dataclasses.asdict(done)}
            record |= {"seconds": seconds, "batch_tokens_per_s": new_tokens / seconds}
            print(json.dumps(record), flush=True)
