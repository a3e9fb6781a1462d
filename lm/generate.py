"""Text generation from a causal model: one prefill pass, then cached decoding token by token.

The prompt batch is left-padded to a bucketed length (a power of two), run through the model
once to fill a preallocated KV cache (`lm.model.kv_cache`), and each new token costs one jitted
step that attends to that cache. Shapes depend only on (batch, prompt bucket, cache bucket), so a
session of prompts of varying length compiles a handful of times. Sampling (temperature, top-k,
top-p, min-p, repetition penalty) runs on device; stop strings and streaming run on the host one
step behind the device, so the next step is already queued while a token is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from lm.model.kv_cache import KVCache

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings as device scalars, so changing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything one decode step reads and replaces (donated between steps)."""

    cache: KVCache
    logits_BxV: jax.Array  # next-token logits of every row
    seen_BxV: jax.Array  # tokens in the prompt or generated so far (repetition penalty)
    pads_B: jax.Array
    slot: jax.Array  # cache slot the next token goes to
    done_B: jax.Array  # row produced EOS
    key: jax.Array


def bucket(n: int, minimum: int = _MIN_BUCKET) -> int:
    """The static size a dimension of size `n` is padded to: a power of two, at least `minimum`
    (16 for lengths; 1 for the batch)."""
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


def penalize_repeats(logits_BxV: jax.Array, seen_BxV: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL's repetition penalty: seen tokens' logits divided by `penalty` (multiplied if < 0)."""
    penalized = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
    return jnp.where(seen_BxV, penalized, logits_BxV)


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array):
    """Logits with every token outside the top-k, the top-p nucleus or the min-p set at -inf.

    The filters compose as Hugging Face's logits warpers (top-k, then top-p on the top-k's
    renormalized distribution, then min-p). top_k = 0, top_p = 1 and min_p = 0 each disable
    their filter; the most likely token always survives. Ties at a cut-off are kept.
    """
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    vocab = logits_BxV.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jnp.take(sorted_BxV, k - 1, axis=-1)[:, None]
    sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Nucleus: a token stays while the mass strictly before it is below top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    last_in_nucleus_B = jnp.sum(mass_before_BxV < top_p, axis=-1) - 1
    nucleus_Bx1 = jnp.take_along_axis(sorted_BxV, last_in_nucleus_B[:, None], axis=-1)
    # min-p: p >= min_p * p_max  <=>  logit >= logit_max + log(min_p).
    min_p_Bx1 = sorted_BxV[:, :1] + jnp.log(jnp.maximum(min_p, 1e-30))
    threshold_Bx1 = jnp.maximum(jnp.maximum(kth_Bx1, nucleus_Bx1), min_p_Bx1)
    threshold_Bx1 = jnp.minimum(threshold_Bx1, sorted_BxV[:, :1])
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def choose_tokens(
    logits_BxV: jax.Array, seen_BxV: jax.Array, sampling: Sampling, key: jax.Array, greedy: bool
) -> jax.Array:
    """Next token of every row: argmax, or a draw from the penalized, tempered, filtered logits."""
    logits_BxV = penalize_repeats(logits_BxV, seen_BxV, sampling.repetition_penalty)
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(
        logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
    )
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def _token_logprobs(logits_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), tokens_B[:, None], -1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Beams:
    """N hypotheses per prompt (B) over T generated positions, best first."""

    scores_BxN: jax.Array  # running: summed log-probs; finished: length-penalized, -inf = empty
    lengths_BxN: jax.Array  # generated tokens, EOS included
    tokens_BxNxT: jax.Array
    logprobs_BxNxT: jax.Array  # each token's log-probability under the model

    @classmethod
    def empty(cls, batch: int, num_beams: int, steps: int, scores_BxN: jax.Array) -> _Beams:
        return cls(
            scores_BxN=scores_BxN,
            lengths_BxN=jnp.zeros((batch, num_beams), jnp.int32),
            tokens_BxNxT=jnp.full((batch, num_beams, steps), PAD_ID, jnp.int32),
            logprobs_BxNxT=jnp.zeros((batch, num_beams, steps), jnp.float32),
        )

    def take(self, index_BxK: jax.Array) -> _Beams:
        """Hypotheses `index_BxK` of every prompt."""
        pick = lambda x: jnp.take_along_axis(  # noqa: E731
            x, index_BxK.reshape(index_BxK.shape + (1,) * (x.ndim - 2)), axis=1
        )
        return jax.tree.map(pick, self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _BeamSearch:
    """Hugging Face's beam search state: the running beams that are extended, the best finished
    hypotheses, and whether each prompt may still improve them."""

    running: _Beams
    finished: _Beams
    open_B: jax.Array
    step: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _BeamOptions:
    """Beam search settings as device scalars, so changing them never recompiles."""

    length_penalty: jax.Array
    repetition_penalty: jax.Array
    stop_when_full: jax.Array  # early_stopping=True
    assume_longest: jax.Array  # early_stopping="never"
    steps: jax.Array  # decode steps of this call (the last one ends every beam)


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
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Tokenizer | None,
        *,
        mesh: Mesh | None = None,
        max_len: int | None = None,
    ):
        if not hasattr(model, "hidden_cached") or not model.cfg.causal:
            raise ValueError(
                f"{type(model).__name__} is not a causal language model; generation needs a "
                "run trained with objective clm (a Transformer)."
            )
        self.tokenizer = tokenizer
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
        from lm.runs import load_run

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
        cache = KVCache.zeros(self.cfg, batch, slots)
        h_BxPxD, cache = model.hidden_cached(tokens_BxP, cache, jnp.int32(0), pads_B)
        logits_BxV = model.logits(h_BxPxD[:, -1:])[:, 0]
        real_BxP = jnp.arange(length)[None] >= pads_B[:, None]
        seen_BxV = jnp.zeros(logits_BxV.shape, bool)
        seen_BxV = seen_BxV.at[jnp.arange(batch)[:, None], tokens_BxP].max(real_BxP)
        done_B = jnp.zeros((batch,), bool)
        return DecodeState(cache, logits_BxV, seen_BxV, pads_B, jnp.int32(length), done_B, key)

    def _forward_one(self, model, state: DecodeState, tokens_B: jax.Array):
        h_Bx1xD, cache = model.hidden_cached(
            tokens_B[:, None], state.cache, state.slot, state.pads_B
        )
        return model.logits(h_Bx1xD)[:, 0], cache

    def _step_fn(self, params, state: DecodeState, sampling: Sampling, *, greedy: bool):
        self.compiles += 1
        model = nnx.merge(self.graphdef, params)
        key, sub = jax.random.split(state.key)
        tokens_B = choose_tokens(state.logits_BxV, state.seen_BxV, sampling, sub, greedy)
        tokens_B = jnp.where(state.done_B, PAD_ID, tokens_B)
        logprobs_B = _token_logprobs(state.logits_BxV, tokens_B)
        seen_BxV = state.seen_BxV.at[jnp.arange(tokens_B.shape[0]), tokens_B].set(True)
        logits_BxV, cache = self._forward_one(model, state, tokens_B)
        state = DecodeState(
            cache,
            logits_BxV,
            seen_BxV,
            state.pads_B,
            state.slot + 1,
            state.done_B | (tokens_B == EOS_ID),
            key,
        )
        return state, tokens_B, logprobs_B

    def _beam_step_fn(self, params, state: DecodeState, search: _BeamSearch, options: _BeamOptions):
        """One step of Hugging Face's beam search (`GenerationMixin._beam_search`): extend the
        running beams, move the best candidates that end (EOS, or the last step) into the
        finished set scored by summed log-prob / length ** length_penalty, continue with the
        best N that did not end, and close prompts that can no longer improve."""
        self.compiles += 1
        model = nnx.merge(self.graphdef, params)
        prompts, num_beams = search.open_B.shape[0], search.running.scores_BxN.shape[1]
        vocab = state.logits_BxV.shape[-1]
        logp_BxV = jax.nn.log_softmax(state.logits_BxV, -1)
        # Like HF, beam search applies the repetition penalty to log-probabilities.
        scored_BxV = penalize_repeats(logp_BxV, state.seen_BxV, options.repetition_penalty)
        total_BxNV = (
            search.running.scores_BxN[..., None] + scored_BxV.reshape(prompts, num_beams, vocab)
        ).reshape(prompts, -1)
        # 2N candidates: even if N of them end in EOS, N remain to continue.
        scores_BxC, flat_BxC = jax.lax.top_k(total_BxNV, 2 * num_beams)
        parent_BxC, tokens_BxC = flat_BxC // vocab, (flat_BxC % vocab).astype(jnp.int32)
        parents = search.running.take(parent_BxC)
        candidates = _Beams(
            scores_BxN=scores_BxC,
            lengths_BxN=parents.lengths_BxN + 1,
            tokens_BxNxT=parents.tokens_BxNxT.at[:, :, search.step].set(tokens_BxC),
            logprobs_BxNxT=parents.logprobs_BxNxT.at[:, :, search.step].set(
                jnp.take_along_axis(logp_BxV.reshape(prompts, -1), flat_BxC, axis=1)
            ),
        )
        ends_BxC = (tokens_BxC == EOS_ID) | (search.step == options.steps - 1)

        _, keep_BxN = jax.lax.top_k(jnp.where(ends_BxC, -jnp.inf, scores_BxC), num_beams)
        running = candidates.take(keep_BxN)

        length = (search.step + 1).astype(jnp.float32)
        was_full_B = jnp.all(jnp.isfinite(search.finished.scores_BxN), axis=-1)
        accepting_B = search.open_B & ~(options.stop_when_full & was_full_B)
        # Only the best N candidates may finish; the other N are spares for the running set.
        new_BxC = ends_BxC & (jnp.arange(2 * num_beams) < num_beams) & accepting_B[:, None]
        ended = dataclasses.replace(
            candidates,
            scores_BxN=jnp.where(new_BxC, scores_BxC / length**options.length_penalty, -jnp.inf),
        )
        merged = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), search.finished, ended)
        finished = merged.take(jax.lax.top_k(merged.scores_BxN, num_beams)[1])

        # HF's early_stopping=False heuristic: a prompt stays open while its best running beam,
        # scored at its current length (with "never" and length_penalty > 0: at the longest),
        # beats its worst finished hypothesis (or the finished set is not full yet).
        assume_longest = options.assume_longest & (options.length_penalty > 0)
        best_length = jnp.where(assume_longest, options.steps.astype(jnp.float32), length)
        best_possible_B = running.scores_BxN[:, 0] / best_length**options.length_penalty
        worst_B = jnp.min(finished.scores_BxN, axis=-1)
        full_B = jnp.all(jnp.isfinite(finished.scores_BxN), axis=-1)
        open_B = search.open_B & (~full_B | (best_possible_B > worst_B))
        search = _BeamSearch(running, finished, open_B, search.step + 1)

        rows = (
            jnp.arange(prompts)[:, None] * num_beams
            + jnp.take_along_axis(parent_BxC, keep_BxN, axis=1)
        ).reshape(-1)
        tokens_R = running.tokens_BxNxT[:, :, search.step - 1].reshape(-1)
        seen_RxV = state.seen_BxV[rows].at[jnp.arange(rows.shape[0]), tokens_R].set(True)
        state = dataclasses.replace(state, cache=state.cache.select_rows(rows), seen_BxV=seen_RxV)
        logits_BxV, cache = self._forward_one(model, state, tokens_R)
        state = dataclasses.replace(state, cache=cache, logits_BxV=logits_BxV, slot=state.slot + 1)
        searching = jnp.any(open_B & ~(options.stop_when_full & full_B))
        return state, search, searching

    # ---- public API ---------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        *,
        truncate_prompt: bool = False,
        **options,
    ) -> list[Completion]:
        """Continue each text prompt (BOS-prefixed); options as in `generate_ids`."""
        tokenizer = self._need_tokenizer("text prompts")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(
                    f"Prompt {i} is empty; give some text to continue (for an unconditional "
                    f"sample, call generate_ids with [[{BOS_ID}]], the BOS id)."
                )
        ids = [[BOS_ID, *row] for row in tokenizer.encode_batch(prompts)]
        return self.generate_ids(ids, truncate_prompt=truncate_prompt, **options)

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
        self._check_options(
            max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, num_beams
        )
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

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"This generator has no tokenizer, which {what} need; pass one to Generator or "
                "use a run directory that holds tokenizer.model."
            )
        return self.tokenizer

    def _check_options(
        self, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, num_beams
    ) -> None:
        problems = [
            (max_new_tokens < 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
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
        steps. P and the slots are bucketed, and so is B: dummy rows (a lone BOS) fill the batch
        to a power of two, so varying batch sizes share compilations; their output is dropped."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        prompts = self._fit_prompts(prompts, truncate)
        longest = max(len(p) for p in prompts)
        steps = min(max_new_tokens, self.max_len - longest)
        length = bucket(longest)
        slots = bucket(length + steps)
        prompts = prompts + [[BOS_ID]] * (bucket(len(prompts), minimum=1) - len(prompts))
        tokens_BxP = np.full((len(prompts), length), PAD_ID, np.int32)
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
            if token == EOS_ID:
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
        if early_stopping not in (False, True, "never"):
            raise ValueError(
                f"early_stopping must be False, True or 'never', got {early_stopping!r}."
            )
        tokens_BxP, pads_B, slots, steps = self._pack(prompts, max_new_tokens, truncate_prompt)
        batch = tokens_BxP.shape[0]
        options = _BeamOptions(
            length_penalty=jnp.float32(length_penalty),
            repetition_penalty=jnp.float32(repetition_penalty),
            stop_when_full=jnp.bool_(early_stopping is True),
            assume_longest=jnp.bool_(early_stopping == "never"),
            steps=jnp.int32(steps),
        )
        # Only the first beam is live at the start: the others would duplicate it.
        first_only_BxN = jnp.tile(jnp.where(jnp.arange(num_beams) == 0, 0.0, -jnp.inf), (batch, 1))
        history = bucket(steps)  # a static length for the token history, as for the cache
        search = _BeamSearch(
            running=_Beams.empty(batch, num_beams, history, first_only_BxN),
            finished=_Beams.empty(
                batch, num_beams, history, jnp.full((batch, num_beams), -jnp.inf)
            ),
            open_B=jnp.arange(batch) < len(prompts),  # dummy rows never finish anything
            step=jnp.int32(0),
        )
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
            ended = n > 0 and tokens[index, n - 1] == EOS_ID
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
    tokenizer: Tokenizer,
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
        [[BOS_ID, *tokenizer.encode(prompt)]],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    return prompt + completion.text


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
