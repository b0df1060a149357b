"""Request bodies of the OpenAI-compatible API (and its GRC extensions), and OpenAI-style errors.

Fields follow OpenAI's reference; fields it defines that this server does not implement are
accepted only at their neutral value (`n=1`, no `logprobs`, no penalties, no `echo`) and refused
otherwise with a 400 naming the field, rather than silently ignored. Unknown fields are ignored,
as OpenAI's API does. Extensions: `memories` (ids of `/v1/memories`) on completions and chat,
`top_k`, `self_reason` on embeddings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    """An error the server answers with `{"error": {...}}` and `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str


class _Sampling(_Body):
    """Generation settings shared by completions, chat and rag."""

    max_tokens: int | None = Field(default=None, description="new tokens at most")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="extension: keep the k most likely (0: off)")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    memories: list[str] = Field(default_factory=list, description="extension: memory ids")

    @model_validator(mode="after")
    def _supported(self):
        unsupported = {
            "n": self.n != 1,
            "logprobs": self.logprobs not in (None, False, 0),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        for field, bad in unsupported.items():
            if bad:
                raise ValueError(f"{field}: not supported by this server (leave it unset)")
        return self

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop: empty strings cannot stop anything")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.echo:
            raise ValueError("echo: not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: not supported by this server")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise ValueError("prompt: expected a non-empty string or list of non-empty strings")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.tools:
            raise ValueError("tools: not supported by this server")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class EmbeddingRequest(_Body):
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    self_reason: bool = False
    max_reasoning: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _texts(self):
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("input: expected a non-empty string or list of non-empty strings")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class MemoryRequest(_Body):
    """A text to compress (`input`), or a memory file made elsewhere (`data`: the base64 of a
    `grc compress` .safetensors file; refused if another model made it)."""

    input: str | None = None
    data: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.input is None) == (self.data is None):
            raise ValueError("give exactly one of `input` (text to compress) and `data`")
        if self.input is not None and not self.input.strip():
            raise ValueError("input: expected non-empty text")
        return self


class RagRequest(_Sampling):
    question: str = Field(min_length=1)
    k: int = Field(default=3, ge=1)
    self_reason: bool = False
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
