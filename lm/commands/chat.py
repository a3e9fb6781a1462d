"""`lm chat`: talk to a trained causal LM in the terminal, its replies streamed token by token.

Each turn renders the conversation so far with the run's chat template (the tokenizer's own,
else the built-in one: `lm.data.chat_template`) and continues it through the Generator until
the model ends its turn (EOS / end-of-turn token) or `max_new_tokens`. The oldest exchanges
are dropped when the conversation no longer fits the context. `/reset` starts over, `/exit`
(or end of input, Ctrl-D) quits. Reads lines from stdin, so it also runs on piped input.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO

from lm.data.chat_template import ChatTemplate, Conversation, JinjaTemplate, chat_template
from lm.inference.generator import Completion, Generator

COMMANDS = "/reset clears the conversation, /exit quits"


class ChatSession:
    """A conversation with one model: the history and how a turn is generated."""

    def __init__(
        self,
        generator: Generator,
        template: ChatTemplate,
        system: str = "",
        max_new_tokens: int = 256,
        **options,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if max_new_tokens >= generator.max_len:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for the conversation in the "
                f"model's {generator.max_len}-token context; pass a smaller --max-new-tokens."
            )
        self.generator, self.template, self.system = generator, template, system
        self.max_new_tokens, self.options = max_new_tokens, options
        self.history: Conversation = []
        self.turns = 0

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> Conversation:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def _fit(self) -> tuple[list[int], int]:
        """The prompt ids of the conversation, dropping the oldest exchanges until it leaves
        room for a reply; (ids, messages dropped)."""
        dropped = 0
        room = self.generator.max_len - self.max_new_tokens
        ids = self.template.prompt(self._messages())
        while len(ids) > room and len(self.history) > 1:
            # Drop through the next user message, so the history still starts with one.
            cut = next((i for i, m in enumerate(self.history) if i and m["role"] == "user"), 0)
            if not cut:
                break
            self.history = self.history[cut:]
            dropped += cut
            ids = self.template.prompt(self._messages())
        return ids, dropped

    def reply(self, text: str, on_text=None) -> tuple[Completion, int]:
        """Generate the assistant's answer to user `text` (streamed to `on_text`); (answer,
        earlier messages dropped to fit the context)."""
        self.history.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        done = self._generate(ids, on_text)
        self.history.append({"role": "assistant", "content": done.text})
        self.turns += 1
        return done, dropped

    def _generate(self, ids: list[int], on_text) -> Completion:
        # A single message longer than the context keeps its end (`truncate_prompt`).
        options = dict(self.options)
        seed = options.pop("seed", 0) + self.turns  # a sampled chat differs from turn to turn
        [done] = self.generator.generate_ids(
            [ids],
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            on_token=None if on_text is None else lambda _, piece: on_text(piece),
            truncate_prompt=True,
            **options,
        )
        return done


def chat(
    run_dir: str,
    *,
    step: int | None = None,
    system: str = "",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    **options,
) -> None:
    """Chat with checkpoint `step` (default newest) of `run_dir`; options as `lm generate`'s
    sampling flags (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    seed)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    generator = Generator.from_run(run_dir, step=step)
    if generator.tokenizer is None:
        raise FileNotFoundError(
            f"{run_dir} has no tokenizer.model or tokenizer.json and its config names none; "
            "copy the tokenizer the run was trained with into it."
        )
    template = chat_template(generator.tokenizer)
    _warn_if_turns_do_not_end_at_eos(template, generator)
    session = ChatSession(generator, template, system, **options)
    interactive = stdin.isatty()
    if interactive:
        print(f"[chatting with {run_dir}; {COMMANDS}]", file=stdout, flush=True)

    def write(text: str) -> None:
        print(text, end="", file=stdout, flush=True)

    while True:
        text = _read_line(stdin, interactive)
        if text is None or text.strip() == "/exit":  # None: the end of the input (Ctrl-D)
            break
        if text.strip() == "/reset":
            session.reset()
            write("[conversation cleared]\n")
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            write(f"[unknown command {text.split()[0]}; {COMMANDS}]\n")
            continue
        write("assistant> ")
        start = time.perf_counter()
        done, dropped = session.reply(text, on_text=write)
        write("\n")
        if dropped:
            print(f"[{dropped} earlier messages dropped to fit the context]", file=sys.stderr)
        seconds = time.perf_counter() - start
        print(
            f"[{len(done.tokens)} tokens in {seconds:.2f} s, {done.finish_reason}]",
            file=sys.stderr,
            flush=True,
        )


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """The next line without its newline, None at the end of the input. In a terminal,
    `input` prompts and, with `readline`, lets the line be edited and recalled."""
    if not interactive or stdin is not sys.stdin:
        line = stdin.readline()
        return line.removesuffix("\n") if line else None
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (imported for its effect on input())
    try:
        return input("you> ")
    except EOFError:
        print(flush=True)
        return None


def _warn_if_turns_do_not_end_at_eos(template: ChatTemplate, generator: Generator) -> None:
    """Generation stops at EOS only: a template ending turns with another token would run every
    reply to --max-new-tokens, so say so once, with the fix."""
    end = template.turn_end() if isinstance(template, JinjaTemplate) else None
    eos = generator.eos
    if end is not None and (eos is None or generator.tokenizer.pieces()[eos] != end):
        print(
            f"[note: the chat template ends a turn with {end} but the tokenizer's EOS is not "
            f'it, so replies run to --max-new-tokens; set "eos_token": "{end}" in '
            "tokenizer_config.json]",
            file=sys.stderr,
        )
