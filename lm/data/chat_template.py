"""Conversations as token ids, with the assistant tokens a chat fine-tune learns marked.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
It is rendered with the tokenizer's own chat template when its Hugging Face
`tokenizer_config.json` (or a `chat_template.jinja` beside `tokenizer.json`) has one, as
`transformers`' `apply_chat_template` renders it (Jinja in a sandbox, the same globals and
filters), else with the built-in template (`BuiltinTemplate`, for the SentencePiece models
trained here).

Which tokens are learnt is decided from the rendered text, not from `{% generation %}`
markers (few templates carry them): an assistant turn spans from the end of the prompt that
precedes it (the conversation so far, rendered with the generation prompt) to the end of its
content and the end-of-turn special token right after it (`<|im_end|>`, `<|eot_id|>`, EOS).
A token is learnt when its characters overlap a span, as `return_assistant_tokens_mask` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from lm.data.hf_tokenizer import CHAT_TEMPLATE, TOKENIZER_CONFIG, HfTokenizer
from lm.data.tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
Conversation = list[Message]
# The built-in template's role labels: `"{label}{content}\n"` per message, an assistant's
# content ending with EOS instead of the newline.
BUILTIN_LABELS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation as token ids and, per token, 1 if it is learnt (assistant) else 0."""

    ids: list[int]
    mask: list[int]


def conversation_of(record: dict[str, Any], where: str) -> Conversation:
    """The messages of a record: `messages`, or a `prompt`/`completion` pair (each a string or a
    list of messages); `where` names the record in errors (e.g. 'data.jsonl line 3')."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        messages = [
            *([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt),
            *(
                [{"role": "assistant", "content": completion}]
                if isinstance(completion, str)
                else completion
            ),
        ]
    else:
        raise ValueError(
            f"{where} has neither 'messages' nor 'prompt' and 'completion'; give each record "
            '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}.'
        )
    return check_messages(messages, where)


def check_messages(messages: object, where: str) -> Conversation:
    """`messages` as a list of {role, content} dicts with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of messages.")
    out = []
    for i, message in enumerate(messages):
        ok = isinstance(message, dict) and message.get("role") in ROLES
        if not ok or not isinstance(message.get("content"), str):
            raise ValueError(
                f'{where}: message {i} is not {{"role": one of {list(ROLES)}, "content": '
                f"a string}}; got {json.dumps(message)[:80]}."
            )
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where} has no assistant message to learn; add one.")
    return out


def last_answer(messages: Conversation) -> tuple[Conversation, str]:
    """(the messages before the last assistant turn, that turn's content): a scored question."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


class ChatTemplate(Protocol):
    """Renders conversations for training and prompts for generation."""

    def render(self, messages: Conversation) -> Rendered:
        """Token ids of the whole conversation and its assistant-token mask."""
        ...

    def render_all(self, conversations: Sequence[Conversation]) -> list[Rendered]:
        """`render` of each conversation."""
        ...

    def prompt(self, messages: Conversation) -> list[int]:
        """Token ids of `messages` followed by the header of the assistant's next turn."""
        ...


class BuiltinTemplate:
    """The template of tokenizers without one (the SentencePiece models trained here):

        [BOS] System: {system}\\n User: {user}\\n Assistant: {answer}[EOS] User: ...

    (without the spaces after the newlines). Each label, content and newline is encoded on its
    own, so a message's tokens never depend on its neighbours; the assistant's content and its
    EOS are learnt, and EOS is where generation stops.
    """

    def __init__(self, tokenizer: TextTokenizer):
        if tokenizer.bos is None or tokenizer.eos is None:
            raise ValueError(
                f"Tokenizer {tokenizer.path} has no BOS or EOS token, which the built-in chat "
                f"template needs; use one that has both or one with a chat template."
            )
        self.tokenizer = tokenizer

    @functools.cached_property
    def _pieces(self) -> dict[str, list[int]]:
        texts = [*BUILTIN_LABELS.values(), "\n"]
        return dict(zip(texts, self.tokenizer.encode_batch(texts), strict=True))

    def render_all(self, conversations: Sequence[Conversation]) -> list[Rendered]:
        """`render` of each conversation, encoding all contents in one batch."""
        contents = [m["content"] for c in conversations for m in c]
        encoded = iter(self.tokenizer.encode_batch(contents) if contents else [])
        out = []
        for messages in conversations:
            ids, mask = [self.tokenizer.bos], [0]
            for m in messages:
                label = self._pieces[BUILTIN_LABELS[m["role"]]]
                learnt = m["role"] == "assistant"
                end = [self.tokenizer.eos] if learnt else self._pieces["\n"]
                tail = [*next(encoded), *end]
                ids += [*label, *tail]
                mask += [0] * len(label) + [int(learnt)] * len(tail)
            out.append(Rendered(ids, mask))
        return out

    def render(self, messages: Conversation) -> Rendered:
        return self.render_all([messages])[0]

    def prompt(self, messages: Conversation) -> list[int]:
        ids = self.render_all([messages])[0].ids if messages else [self.tokenizer.bos]
        return ids + self._pieces[BUILTIN_LABELS["assistant"]]

    @staticmethod
    def text(messages: Conversation) -> str:
        """The template's text without BOS and EOS (what a new tokenizer trains on)."""
        return "".join(
            f"{BUILTIN_LABELS[m['role']]}{m['content']}"
            + ("" if m["role"] == "assistant" else "\n")
            for m in messages
        )


class JinjaTemplate:
    """A Hugging Face chat template (Jinja), rendered as `apply_chat_template` renders it and
    tokenized by `tokenizer` without adding special tokens (the template writes them)."""

    def __init__(self, source: str, tokenizer: HfTokenizer):
        self.source = source
        self.tokenizer = tokenizer
        self._template = _compile(source)
        pieces = tokenizer.pieces()
        roles = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
        self.special_tokens = {
            f"{role}_token": pieces[getattr(tokenizer, role)]
            for role in roles
            if getattr(tokenizer, role) is not None
        }
        # Longest first, so a token is matched before any token it contains.
        self._control_texts = sorted(tokenizer.special_token_texts(), key=len, reverse=True)
        pattern = "|".join(map(re.escape, self._control_texts))
        self._controls = re.compile(pattern) if pattern else None

    def text(self, messages: Conversation, add_generation_prompt: bool = False) -> str:
        """The rendered text, as `apply_chat_template(..., tokenize=False)` returns it."""
        import jinja2  # loaded by _compile already

        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"The chat template refused the conversation: {e}") from None

    def spans(self, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered text, the [start, end) characters of each assistant turn)."""
        full = self.text(messages)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.text(messages[:i], add_generation_prompt=True)
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix
            # property; the content is then searched after the previous turn.
            start = len(prefix) if full.startswith(prefix) and len(prefix) >= cursor else None
            content = m["content"]
            at = full.find(content, cursor if start is None else start)
            if at < 0 and content.strip():
                content = content.strip()  # templates often `| trim` the content
                at = full.find(content, cursor if start is None else start)
            if at < 0:
                raise ValueError(
                    f"The chat template does not write assistant message {i} verbatim, so its "
                    "tokens cannot be found; use a template that renders message content as is."
                )
            end = at + len(content)
            # The end-of-turn token right after the content, which the model must learn to emit
            # (one: a second is the next turn's header, as `<|eot_id|><|start_header_id|>`).
            if self._controls is not None and (hit := self._controls.match(full, end)):
                end = hit.end()
            spans.append((at if start is None else start, end))
            cursor = end
        return full, spans

    def turn_end(self) -> str | None:
        """The special token that ends an assistant turn (`<|im_end|>`, ...), if there is one."""
        try:
            full, [(_, end)] = self.spans(_PROBE)
        except ValueError:  # a template that insists on, say, a system message
            return None
        return next((t for t in self._control_texts if full[:end].endswith(t)), None)

    def render(self, messages: Conversation) -> Rendered:
        text, spans = self.spans(messages)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        mask = [0] * len(ids)
        for k, (start, end) in enumerate(offsets):
            mask[k] = int(any(start < b and end > a for a, b in spans))
        return Rendered(ids, mask)

    def render_all(self, conversations: Sequence[Conversation]) -> list[Rendered]:
        return [self.render(c) for c in conversations]

    def prompt(self, messages: Conversation) -> list[int]:
        return self.tokenizer.encode(self.text(messages, add_generation_prompt=True))


def template_source(tokenizer: TextTokenizer) -> str | None:
    """The Jinja chat template beside a `tokenizer.json`: `chat_template.jinja`, else the
    `chat_template` of `tokenizer_config.json` (the one named 'default' when several are)."""
    if not isinstance(tokenizer, HfTokenizer):
        return None
    folder = tokenizer.path.parent
    if (folder / CHAT_TEMPLATE).is_file():
        return (folder / CHAT_TEMPLATE).read_text()
    if not (folder / TOKENIZER_CONFIG).is_file():
        return None
    source = json.loads((folder / TOKENIZER_CONFIG).read_text()).get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) and source else None


def chat_template(tokenizer: TextTokenizer) -> ChatTemplate:
    """The tokenizer's own chat template when it has one, else the built-in one."""
    source = template_source(tokenizer)
    if source is not None:
        assert isinstance(tokenizer, HfTokenizer)  # template_source checked it
        return JinjaTemplate(source, tokenizer)
    return BuiltinTemplate(tokenizer)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """The template compiled in the environment `transformers` renders chat templates in."""
    # Imported here: only runs with a Hugging Face chat template need Jinja.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (markers are not used)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        where = f"{e.message}, line {e.lineno}"
        raise ValueError(f"The chat template is not valid Jinja ({where}).") from None
