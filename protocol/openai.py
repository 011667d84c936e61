"""Pydantic models of the OpenAI chat/completions API subset that prefixroute serves and forwards."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from protocol.errors import APIError


class _Strict(BaseModel):
    # OpenAI rejects "5" for an integer: no lax coercion of JSON types. Unknown fields are ignored, as vLLM does.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, raw in enumerate(self.content):
            if raw.get("type") != "text":
                # The value is not echoed: a client's content must never reach an error body (or a log of one).
                raise APIError(400, "This content part type is not supported; only 'text' is.",
                               param=f"messages.content.{i}.type", code="unsupported_content")
            try:
                parts.append(TextPart.model_validate(raw).text)
            except ValidationError:  # pydantic's message would echo the part: a 400 of our own instead
                raise APIError(400, "A text content part needs a string 'text' and nothing else.",
                               param=f"messages.content.{i}.text") from None
        return "".join(parts)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields common to both endpoints. Extensions beyond OpenAI follow vLLM's names (top_k, cache_salt)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: int | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    cache_salt: str | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "Only n=1 is supported.", param="n", code="unsupported_value")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(400, f"'{name}' is not supported.", param=name, code="unsupported_value")
        if self.top_k is not None and self.top_k < -1:
            raise APIError(400, "'top_k' must be -1 (disabled) or a positive integer.", param="top_k")
        if self.cache_salt is not None and not self.cache_salt:
            raise APIError(400, "'cache_salt' must be a non-empty string when given.", param="cache_salt")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise APIError(400, "Stop strings must be non-empty.", param="stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def prefix_version(self, header: str | None) -> str | None:
        """The prompt's prefix version (for hit stats by rollout): the `x-prefix-version` header, else
        `metadata.prefix_version`."""
        return header or (self.metadata or {}).get("prefix_version")


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise APIError(400, "'logprobs' is not supported.", param="logprobs", code="unsupported_value")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                raise APIError(400, f"'{name}' is not supported.", param=name, code="unsupported_value")
        if self.best_of not in (None, 1):
            raise APIError(400, "Only best_of=1 is supported.", param="best_of", code="unsupported_value")

    def single_prompt(self) -> str | list[int]:
        """The one prompt this request carries (text or token ids); batches of prompts answer 400."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise APIError(400, "'prompt' must not be empty.", param="prompt")
        if all(isinstance(x, int) for x in p):
            return list(p)  # type: ignore[arg-type]
        if len(p) == 1:
            return p[0]  # type: ignore[return-value]
        raise APIError(400, "Only one prompt per request is supported.", param="prompt", code="unsupported_value")

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- responses -------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


FinishReason = Literal["stop", "length"] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _Response(BaseModel):
    id: str
    created: int
    model: str


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends only the fields a delta carries: {"content": "x"}, and {} on the final chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefixroute"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
