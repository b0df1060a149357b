"""Text for the HTTP API: incremental detokenisation with stop strings, and chat prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Turns generated token ids into text deltas.

    The text is decoded from all tokens so far (a token may complete a multi-byte character or a
    word piece of the previous one) and only what is safe is released: never a trailing
    replacement character (an incomplete UTF-8 sequence), never an ending that could still grow
    into a stop string. When a stop string appears, the text ends before it and `stopped` is set.
    """

    def __init__(self, tok: Any, stops: Sequence[str] = ()):
        self.tok, self.stops = tok, list(stops)
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def _text(self) -> str:
        return self.tok.decode(self.tokens)

    def push(self, token: int) -> str:
        """The new text that `token` makes safe to send ('' if none)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        safe = text[: len(text) - self._hold] if self._hold else text
        return self._release(safe.rstrip("\ufffd"))

    def flush(self) -> str:
        """The held-back rest at the end of generation."""
        return "" if self.stopped else self._release(self._text())

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.sent) or len(upto) <= len(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent) :], upto
        return delta


def render_chat(tok: Any, messages: list[tuple[str, str]]) -> str:
    """The prompt text of a chat: the tokenizer's chat template (Jinja, as `transformers` renders
    it, with the generation prompt) when it has one, else `role: content` lines and `assistant:`."""
    template = getattr(tok, "chat_template", None)
    if not template:
        lines = [f"{role}: {content}" for role, content in messages]
        return "\n".join([*lines, "assistant:"])
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=True,
        bos_token="",  # the engine adds the bos token itself
        eos_token="",
    )
