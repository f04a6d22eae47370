"""The OpenAI request shapes the server accepts, its error shape, and the default chat template.

Parameters mean what OpenAI's API reference says. Our extras: `top_k` (0 or -1: off), `min_p`,
`repetition_penalty` (CTRL's, 1 = off), `stop_token_ids`. Unknown fields are refused (422) rather than silently
ignored, so a parameter we do not implement never looks as if it worked.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The chat template for models that bring none (documented in the README): each message on its own line as
# "Role: content", then "Assistant:" for the model to continue. "\nUser:" is added to the stop strings, so the
# model's reply ends where it would start writing the user's next turn.
DEFAULT_CHAT_TEMPLATE_STOP = "\nUser:"


def default_chat_prompt(messages: list[dict]) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class APIError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not 5 and 1.5 is not an int; forbid: an unknown field is an error, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None  # optional: the one model served
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted (OpenAI clients send it) and not used

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"stop takes at most 16 strings, got {len(stops)}", "stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse(cls, data) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 422 naming the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        shown = repr(first["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        where = f"{param}: " if param else ""
        raise APIError(422, f"{where}{first['msg']} (got {shown})", param, first["type"]) from None
