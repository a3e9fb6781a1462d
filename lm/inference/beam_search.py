"""Hugging Face's beam search (`GenerationMixin._beam_search`) as one jittable step over device
state: N running beams per prompt are extended, the best candidates that end join the N best
finished hypotheses, and a prompt closes once no running beam can improve them.

`Generator.beam_search` (lm/inference/generator.py) drives it; the model call is passed in
(`forward_one`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lm.inference.decode_state import DecodeState
from lm.inference.sampling import penalize_repeats
from lm.model.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Beams:
    """N hypotheses per prompt (B) over T generated positions, best first."""

    scores_BxN: jax.Array  # running: summed log-probs; finished: length-penalized, -inf = empty
    lengths_BxN: jax.Array  # generated tokens, EOS included
    tokens_BxNxT: jax.Array
    logprobs_BxNxT: jax.Array  # each token's log-probability under the model

    @classmethod
    def empty(cls, num_beams: int, steps: int, scores_BxN: jax.Array, pad: int) -> Beams:
        batch = scores_BxN.shape[0]
        return cls(
            scores_BxN=scores_BxN,
            lengths_BxN=jnp.zeros((batch, num_beams), jnp.int32),
            tokens_BxNxT=jnp.full((batch, num_beams, steps), pad, jnp.int32),
            logprobs_BxNxT=jnp.zeros((batch, num_beams, steps), jnp.float32),
        )

    def take(self, index_BxK: jax.Array) -> Beams:
        """Hypotheses `index_BxK` of every prompt."""
        pick = lambda x: jnp.take_along_axis(  # noqa: E731
            x, index_BxK.reshape(index_BxK.shape + (1,) * (x.ndim - 2)), axis=1
        )
        return jax.tree.map(pick, self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """Hugging Face's beam search state: the running beams that are extended, the best finished
    hypotheses, and whether each prompt may still improve them."""

    running: Beams
    finished: Beams
    open_B: jax.Array
    step: jax.Array

    @classmethod
    def start(cls, batch: int, prompts: int, num_beams: int, history: int, pad: int) -> BeamSearch:
        """A fresh search over `batch` rows of which the first `prompts` are real; `history`
        is the static length of the token history."""
        # Only the first beam is live at the start: the others would duplicate it.
        first_only_BxN = jnp.tile(jnp.where(jnp.arange(num_beams) == 0, 0.0, -jnp.inf), (batch, 1))
        return cls(
            running=Beams.empty(num_beams, history, first_only_BxN, pad),
            finished=Beams.empty(num_beams, history, jnp.full((batch, num_beams), -jnp.inf), pad),
            open_B=jnp.arange(batch) < prompts,  # dummy rows never finish anything
            step=jnp.int32(0),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamOptions:
    """Beam search settings as device scalars, so changing them never recompiles."""

    length_penalty: jax.Array
    repetition_penalty: jax.Array
    stop_when_full: jax.Array  # early_stopping=True
    assume_longest: jax.Array  # early_stopping="never"
    steps: jax.Array  # decode steps of this call (the last one ends every beam)

    @classmethod
    def of(
        cls,
        length_penalty: float,
        early_stopping: bool | str,
        repetition_penalty: float,
        steps: int,
    ) -> BeamOptions:
        """Options for `steps` decode steps; `early_stopping` as in HF: False, True or "never"."""
        if early_stopping not in (False, True, "never"):
            raise ValueError(
                f"early_stopping must be False, True or 'never', got {early_stopping!r}."
            )
        return cls(
            length_penalty=jnp.float32(length_penalty),
            repetition_penalty=jnp.float32(repetition_penalty),
            stop_when_full=jnp.bool_(early_stopping is True),
            assume_longest=jnp.bool_(early_stopping == "never"),
            steps=jnp.int32(steps),
        )


def beam_step(
    state: DecodeState,
    search: BeamSearch,
    options: BeamOptions,
    forward_one: Callable[[DecodeState, jax.Array], tuple[jax.Array, KVCache]],
    eos: int,
) -> tuple[DecodeState, BeamSearch, jax.Array]:
    """One step of Hugging Face's beam search: extend the running beams, move the best
    candidates that end (token `eos`, or the last step) into the finished set scored by summed
    log-prob / length ** length_penalty, continue with the best N that did not end, and close
    prompts that can no longer improve. Returns the new state and search, and whether any
    prompt is still searching."""
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
    candidates = Beams(
        scores_BxN=scores_BxC,
        lengths_BxN=parents.lengths_BxN + 1,
        tokens_BxNxT=parents.tokens_BxNxT.at[:, :, search.step].set(tokens_BxC),
        logprobs_BxNxT=parents.logprobs_BxNxT.at[:, :, search.step].set(
            jnp.take_along_axis(logp_BxV.reshape(prompts, -1), flat_BxC, axis=1)
        ),
    )
    ends_BxC = (tokens_BxC == eos) | (search.step == options.steps - 1)

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
    search = BeamSearch(running, finished, open_B, search.step + 1)

    rows = (
        jnp.arange(prompts)[:, None] * num_beams + jnp.take_along_axis(parent_BxC, keep_BxN, axis=1)
    ).reshape(-1)
    tokens_R = running.tokens_BxNxT[:, :, search.step - 1].reshape(-1)
    seen_RxV = state.seen_BxV[rows].at[jnp.arange(rows.shape[0]), tokens_R].set(True)
    state = dataclasses.replace(state, cache=state.cache.select_rows(rows), seen_BxV=seen_RxV)
    logits_BxV, cache = forward_one(state, tokens_R)
    state = dataclasses.replace(state, cache=cache, logits_BxV=logits_BxV)
    searching = jnp.any(open_B & ~(options.stop_when_full & full_B))
    return state, search, searching
