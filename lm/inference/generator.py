"""Text generation from a causal model: one prefill pass, then cached decoding token by token.

The prompt batch is left-padded to a bucketed length (a power of two), run through the model
once to fill a preallocated KV cache (`lm.model.kv_cache`), and each new token costs one jitted
step that attends to that cache. Shapes depend only on (batch, prompt bucket, cache bucket), so a
session of prompts of varying length compiles a handful of times. Sampling
(`lm.inference.sampling`: temperature, top-k, top-p, min-p, repetition penalty) and beam search
(`lm.inference.beam_search`) run on device; stop strings and streaming run on the host one step
behind the device, so the next step is already queued while a token is printed. BOS, EOS and
padding ids come from the tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer, pad_id
from lm.inference.beam_search import BeamOptions, BeamSearch, beam_step
from lm.inference.decode_state import DecodeState
from lm.inference.sampling import Sampling, choose_tokens, token_logprobs
from lm.model.kv_cache import KVCache
from lm.model.transformer import Transformer
from lm.run_dir import load_run

_MIN_BUCKET = 16


@dataclasses.dataclass
class Completion:
    """One prompt's continuation: its text (cut right before a stop string), the generated
    token ids (without EOS; after a stop string, the shortest prefix that covers `text`), each
    token's log-probability under the model (before any sampling filter), and why it ended."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" | "stop" | "length"


def bucket(n: int, minimum: int = _MIN_BUCKET) -> int:
    """The static size a dimension of size `n` is padded to: a power of two, at least `minimum`
    (16 for lengths; 1 for the batch)."""
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


def special_ids(tokenizer: TextTokenizer | None) -> tuple[int | None, int | None, int]:
    """(bos, eos, pad) of generation: the tokenizer's (None where it has no such token; pad
    falls back to 0), or without a tokenizer the fixed ids of the SentencePiece models trained
    here."""
    if tokenizer is None:
        return BOS_ID, EOS_ID, PAD_ID
    return tokenizer.bos, tokenizer.eos, pad_id(tokenizer)


@dataclasses.dataclass
class _Row:
    """Host-side progress of one prompt."""

    limit: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    streamed: int = 0  # characters of `text` handed to on_token
    finish_reason: str | None = None


class Generator:
    """Batched text generation with a KV cache; see the module docstring.

    `model` is a causal-LM `Transformer` (params already placed, e.g. sharded on `mesh` as in
    training); `max_len` caps prompt + generated tokens (default: the model's context).
    Text prompts are led by the tokenizer's BOS (nothing where it has none: GPT-2's BOS is its
    <|endoftext|>, Llama's <s>) and a row ends at its EOS; see `special_ids`.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: TextTokenizer | None,
        *,
        mesh: Mesh | None = None,
        max_len: int | None = None,
    ):
        if not isinstance(model, Transformer) or not model.cfg.causal:
            raise ValueError(
                f"{type(model).__name__} is not a causal language model; generation needs a "
                "run trained with objective clm (a Transformer)."
            )
        self.tokenizer = tokenizer
        self.bos, self.eos, self.pad = special_ids(tokenizer)
        # Without an EOS no row ends early: no token has id -1.
        self._stop_id = -1 if self.eos is None else self.eos
        self.mesh = mesh
        self.cfg = model.cfg
        self.max_len = max_len or model.cfg.max_seq_len
        if model.cfg.position == "learned" and self.max_len > model.cfg.max_seq_len:
            raise ValueError(
                f"max_len={self.max_len} exceeds the {model.cfg.max_seq_len} positions this "
                "model learned; pass max_len <= model.max_seq_len."
            )
        self.graphdef, self.params = nnx.split(model)
        self.compiles = 0  # traces of the jitted functions: each is one XLA compilation
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("slots",))
        self._step = jax.jit(self._step_fn, static_argnames=("greedy",), donate_argnums=1)
        self._beam_step = jax.jit(self._beam_step_fn, donate_argnums=(1, 2))

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, step: int | None = None, mesh: Mesh | None = None
    ) -> Generator:
        """A generator for the params of checkpoint `step` (default newest) of `run_dir`."""
        run = load_run(run_dir, step=step, mesh=mesh)
        return cls(run.model, run.tokenizer, mesh=run.mesh)

    def set_weights(self, model: nnx.Module) -> None:
        """Generate with `model`'s weights from now on (e.g. after more training steps).

        `model` must have this generator's architecture; with the same shapes and shardings
        the compiled functions are reused, with no new compilation.
        """
        graphdef, params = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError(
                f"set_weights got a {type(model).__name__} of another architecture than this "
                "generator's; build a new Generator for it."
            )
        self.params = params

    # ---- jitted pieces ------------------------------------------------------------------

    def _prefill_fn(self, params, tokens_BxP, pads_B, key, *, slots: int) -> DecodeState:
        self.compiles += 1
        model = nnx.merge(self.graphdef, params)
        batch, length = tokens_BxP.shape
        cache = KVCache.zeros(self.cfg, pads_B, slots)
        h_BxPxD, cache = model.hidden(tokens_BxP, cache=cache)
        logits_BxV = model.logits(h_BxPxD[:, -1:])[:, 0]  # only the last token's are needed
        real_BxP = jnp.arange(length)[None] >= pads_B[:, None]
        seen_BxV = jnp.zeros(logits_BxV.shape, bool)
        seen_BxV = seen_BxV.at[jnp.arange(batch)[:, None], tokens_BxP].max(real_BxP)
        done_B = jnp.zeros((batch,), bool)
        return DecodeState(cache, logits_BxV, seen_BxV, done_B, key)

    def _forward_one(self, model, state: DecodeState, tokens_B: jax.Array):
        logits_Bx1xV, cache = model(tokens_B[:, None], cache=state.cache)
        return logits_Bx1xV[:, 0], cache

    def _step_fn(self, params, state: DecodeState, sampling: Sampling, *, greedy: bool):
        self.compiles += 1
        model = nnx.merge(self.graphdef, params)
        key, sub = jax.random.split(state.key)
        tokens_B = choose_tokens(state.logits_BxV, state.seen_BxV, sampling, sub, greedy)
        tokens_B = jnp.where(state.done_B, self.pad, tokens_B)
        logprobs_B = token_logprobs(state.logits_BxV, tokens_B)
        seen_BxV = state.seen_BxV.at[jnp.arange(tokens_B.shape[0]), tokens_B].set(True)
        logits_BxV, cache = self._forward_one(model, state, tokens_B)
        done_B = state.done_B | (tokens_B == self._stop_id)
        state = DecodeState(cache, logits_BxV, seen_BxV, done_B, key)
        return state, tokens_B, logprobs_B

    def _beam_step_fn(self, params, state: DecodeState, search: BeamSearch, options: BeamOptions):
        self.compiles += 1
        model = nnx.merge(self.graphdef, params)
        forward_one = functools.partial(self._forward_one, model)
        return beam_step(state, search, options, forward_one, self._stop_id)

    # ---- public API ---------------------------------------------------------------------

    def generate(self, prompts: list[str], **options) -> list[Completion]:
        """Continue each text prompt (led by BOS, if the tokenizer has one); options as in
        `generate_ids`."""
        self._need_tokenizer("text prompts")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(
                    f"Prompt {i} is empty; give some text to continue (for an unconditional "
                    f"sample, call generate_ids with [[{self.bos}]], the BOS id)."
                )
        return self.generate_ids(self.prompt_ids(prompts), **options)

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text prompt, led by BOS where the tokenizer has one."""
        lead = [] if self.bos is None else [self.bos]
        return [lead + row for row in self._need_tokenizer("text prompts").encode_batch(prompts)]

    def generate_ids(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        stop: Sequence[str] = (),
        seed: int = 0,
        on_token: Callable[[int, str], None] | None = None,
        truncate_prompt: bool = False,
    ) -> list[Completion]:
        """Continue each prompt of token ids by up to `max_new_tokens` tokens.

        temperature 0 is greedy decoding; otherwise tokens are drawn (reproducibly for a given
        `seed`) after the repetition penalty, temperature, top-k, top-p and min-p filters.
        num_beams > 1 runs Hugging Face's beam search (see `beam_search`; length_penalty and
        early_stopping as in HF, repetition_penalty on log-probs). A row stops at EOS, at the
        first of the `stop` strings (the text is cut right before it), or after max_new_tokens
        or the context (`max_len`) is full; the batch generates at most max_len - (longest
        prompt) tokens. `on_token(row, text)` receives each row's new text as soon as it is known
        (with beams: at the end).
        Prompts longer than the context raise ValueError unless `truncate_prompt` keeps their
        last max_len - 1 tokens.
        """
        if stop:
            self._need_tokenizer("stop strings")
        self._check_options(temperature, top_k, top_p, min_p, repetition_penalty, num_beams)
        if num_beams > 1:
            return self.beam_search(
                prompts,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                repetition_penalty=repetition_penalty,
                stop=stop,
                on_token=on_token,
                truncate_prompt=truncate_prompt,
            )
        tokens_BxP, pads_B, slots, steps = self._pack(prompts, max_new_tokens, truncate_prompt)
        sampling = Sampling(
            jnp.float32(max(temperature, 1e-6)),
            jnp.int32(top_k),
            jnp.float32(top_p),
            jnp.float32(min_p),
            jnp.float32(repetition_penalty),
        )
        rows = [_Row(limit=steps) for _ in prompts]
        with self._mesh_context():
            state = self._prefill(
                self.params, tokens_BxP, pads_B, jax.random.key(seed), slots=slots
            )
            pending = None
            for _ in range(steps):
                state, tokens_B, logprobs_B = self._step(
                    self.params, state, sampling, greedy=temperature == 0.0
                )
                # Read the previous step's tokens while this one computes.
                if pending is not None and self._advance(rows, *pending, stop, on_token):
                    pending = None
                    break
                pending = (tokens_B, logprobs_B)
            if pending is not None:
                self._advance(rows, *pending, stop, on_token)
        return [self._completion(row) for row in rows]

    # ---- host-side bookkeeping ----------------------------------------------------------

    def _need_tokenizer(self, what: str) -> TextTokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"This generator has no tokenizer, which {what} need; pass one to Generator or "
                "use a run directory that holds tokenizer.model."
            )
        return self.tokenizer

    def _check_options(
        self, temperature, top_k, top_p, min_p, repetition_penalty, num_beams
    ) -> None:
        problems = [
            (temperature < 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
            (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
            (not 0 < top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {top_p}"),
            (not 0 <= min_p < 1, f"min_p must be in [0, 1) (0 = off), got {min_p}"),
            (repetition_penalty <= 0, f"repetition_penalty must be > 0, got {repetition_penalty}"),
            (num_beams < 1, f"num_beams must be at least 1, got {num_beams}"),
            (
                num_beams > 1 and temperature > 0,
                "beam search is deterministic; use temperature=0 with num_beams > 1",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message + ".")

    def _pack(self, prompts: list[list[int]], max_new_tokens: int, truncate: bool):
        """Left-padded [B, P] prompt tokens, padding per row, cache slots and the number of decode
        steps. P and the slots are bucketed, and so is B: dummy rows (a lone pad token) fill the
        batch to a power of two, so varying batch sizes share compilations; their output is
        dropped."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        prompts = self._fit_prompts(prompts, truncate)
        longest = max(len(p) for p in prompts)
        steps = min(max_new_tokens, self.max_len - longest)
        length = bucket(longest)
        slots = bucket(length + steps)
        prompts = prompts + [[self.pad]] * (bucket(len(prompts), minimum=1) - len(prompts))
        tokens_BxP = np.full((len(prompts), length), self.pad, np.int32)
        pads_B = np.array([length - len(p) for p in prompts], np.int32)
        for row, prompt in enumerate(prompts):
            tokens_BxP[row, pads_B[row] :] = prompt
        return tokens_BxP, pads_B, slots, steps

    def _fit_prompts(self, prompts: list[list[int]], truncate: bool) -> list[list[int]]:
        if not prompts:
            raise ValueError("No prompts given; pass at least one prompt.")
        room = self.max_len - 1  # at least one new token must fit
        fitted = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"Prompt {i} has no tokens; give at least one (e.g. BOS).")
            if len(prompt) > room:
                if not truncate:
                    raise ValueError(
                        f"Prompt {i} has {len(prompt)} tokens but the model's context is "
                        f"{self.max_len} (room for {room} prompt tokens); shorten it or allow "
                        "left-truncation (truncate_prompt=True, `lm generate --truncate`)."
                    )
                prompt = prompt[-room:]
            fitted.append([int(t) for t in prompt])
        return fitted

    def _advance(self, rows, tokens_B, logprobs_B, stop, on_token) -> bool:
        """Append one step's tokens to the unfinished rows; True when every row is finished."""
        tokens, logprobs = jax.device_get((tokens_B, logprobs_B))
        for index, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            token = int(tokens[index])
            if token == self._stop_id:
                row.finish_reason = "eos"
            else:
                row.tokens.append(token)
                row.logprobs.append(float(logprobs[index]))
                if len(row.tokens) == row.limit:
                    row.finish_reason = "length"
            self._update_text(index, row, stop, on_token)
        return all(row.finish_reason is not None for row in rows)

    def _update_text(self, index: int, row: _Row, stop: Sequence[str], on_token) -> None:
        if self.tokenizer is None:
            return
        row.text = self.tokenizer.decode(row.tokens)
        cuts = [row.text.find(s) for s in stop if s and s in row.text]
        if cuts:
            row.text = row.text[: min(cuts)]
            row.tokens, row.logprobs = self._cut_at_text(row)
            row.finish_reason = "stop"
        if on_token is None:
            return
        ready = len(row.text)
        if row.finish_reason is None:
            # Hold back a tail that may still become a stop string, or an unfinished
            # multi-byte character (decoded as U+FFFD for now).
            ready = min(ready, len(row.text.rstrip("\ufffd")))
            for s in stop:
                for n in range(min(len(s) - 1, ready), 0, -1):
                    if row.text[:ready].endswith(s[:n]):
                        ready -= n
                        break
        if ready > row.streamed:
            on_token(index, row.text[row.streamed : ready])
            row.streamed = ready

    def _completion(self, row: _Row) -> Completion:
        return Completion(row.text, row.tokens, row.logprobs, row.finish_reason or "length")

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def beam_search(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        num_beams: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        on_token: Callable[[int, str], None] | None = None,
        truncate_prompt: bool = False,
    ) -> list[Completion]:
        """Beam search as Hugging Face's `generate(num_beams=..., length_penalty=...,
        early_stopping=...)`: a hypothesis that emits EOS (or reaches the last step) joins its
        prompt's N best finished ones, scored by summed log-prob / generated length (EOS
        included) ** length_penalty; the search goes on with the best N beams that did not end
        until `early_stopping` says no running beam can improve the finished set (False: HF's
        heuristic at the current length; True: as soon as N are finished; "never": at the longest
        length when length_penalty > 0). Returns each prompt's best finished hypothesis; stop
        strings then cut it."""
        if stop:
            self._need_tokenizer("stop strings")
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}.")
        tokens_BxP, pads_B, slots, steps = self._pack(prompts, max_new_tokens, truncate_prompt)
        batch = tokens_BxP.shape[0]
        options = BeamOptions.of(length_penalty, early_stopping, repetition_penalty, steps)
        # A static length for the token history, as for the cache.
        search = BeamSearch.start(batch, len(prompts), num_beams, bucket(steps), self.pad)
        with self._mesh_context():
            state = self._prefill(
                self.params,
                np.repeat(tokens_BxP, num_beams, axis=0),
                np.repeat(pads_B, num_beams),
                jax.random.key(0),
                slots=slots,
            )
            searching = None
            for _ in range(steps):
                # Read the previous step's flag while this one computes.
                previous = searching
                state, search, searching = self._beam_step(self.params, state, search, options)
                if previous is not None and not previous:
                    break
            best = search.finished.take(jnp.zeros((batch, 1), jnp.int32))
            lengths, tokens, logprobs = jax.device_get(
                (best.lengths_BxN[:, 0], best.tokens_BxNxT[:, 0], best.logprobs_BxNxT[:, 0])
            )
        completions = []
        for index in range(len(prompts)):
            n = int(lengths[index])
            ended = n > 0 and tokens[index, n - 1] == self._stop_id
            kept = n - 1 if ended else n
            row = _Row(
                limit=steps,
                tokens=[int(t) for t in tokens[index, :kept]],
                logprobs=[float(x) for x in logprobs[index, :kept]],
                finish_reason="eos" if ended else "length",
            )
            self._update_text(index, row, stop, on_token)
            completions.append(self._completion(row))
        return completions

    def _cut_at_text(self, row: _Row) -> tuple[list[int], list[float]]:
        """The shortest token prefix whose text contains the (cut) text of `row`."""
        for n in range(len(row.tokens) + 1):
            if self.tokenizer.decode(row.tokens[:n]).startswith(row.text):
                return row.tokens[:n], row.logprobs[:n]
        return row.tokens, row.logprobs


def sample_text(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    max_len: int,
    mesh: Mesh | None = None,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """`prompt` (may be empty: an unconditional sample) and its sampled continuation."""
    generator = Generator(nnx.merge(graphdef, params), tokenizer, mesh=mesh, max_len=max_len)
    [completion] = generator.generate_ids(
        generator.prompt_ids([prompt]),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    return prompt + completion.text
