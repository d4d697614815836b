"""OpenAI request schemas (pydantic) and their translation to :class:`SamplingParams`."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swiftkv.sampling_params import SamplingParams

logger = logging.getLogger("swiftkv.server")


class StreamOptions(BaseModel):
    include_usage: bool = False


def check_text(value: Any) -> Any:
    """Reject strings that are not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``,
    which JSON allows): the tokenizer cannot encode them."""
    for s in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"contains a lone UTF-16 surrogate ({s[e.start]!r} at character {e.start}), "
                                 "which is not valid Unicode text") from None
    return value


def _loggable(text: str, limit: int = 64) -> str:
    """``text`` as one safe log token: ``repr`` (no raw newline or escape code) cut to ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


class _Common(BaseModel):
    """Fields common to completions and chat. A field this server does not know is ignored, with a warning in
    the server's log naming it (vLLM's rule; OpenAI's own API refuses them): clients written for other
    servers keep working. A known field it cannot honour is refused (400) with what to change."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    frequency_penalty: float | None = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int = Field(default=0, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = Field(default=1.0, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(default=0, ge=0)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # prefix cache per tenant (vLLM)
    # swiftkv: draft tokens per step for this request on a server with --speculative-config (0: none)
    num_speculative_tokens: int | None = Field(default=None, ge=0)

    _check_stop = field_validator("stop")(check_text)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:  # repr'd and cut: a client's key may hold newlines, escape codes or 100 KB
                logger.warning("request fields ignored (not known to this server): %s%s",
                               ", ".join(_loggable(k) for k in unknown[:20]), " ..." if len(unknown) > 20 else "")
        return data

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        greedy_top_p = self.top_p == 0  # OpenAI allows 0: only the most likely token
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=1.0 if greedy_top_p else self.top_p,
            top_k=1 if greedy_top_p else self.top_k, seed=self.seed,
            max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos, logprobs=logprobs, min_tokens=self.min_tokens,
            frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            num_speculative_tokens=self.num_speculative_tokens,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    _check_prompt = field_validator("prompt")(check_text)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it out, or equal to n)")
        return self._sampling(self.max_tokens if self.max_tokens is not None else default_max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value):
        if isinstance(value, list):
            check_text([part.get("text") for part in value if isinstance(part, dict)])
        return check_text(value)

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("messages: only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tools and tool_choice are not supported by this server (no function calling)")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported (only 'text')")
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(mt if mt is not None else default_max_tokens, lp)

    def conversation(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer (OpenAI's error format)."""

    error: ErrorDetail


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI-style error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
