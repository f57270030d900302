"""The OpenAI request bodies the server accepts, and the error shape it answers with.

A field OpenAI has but the engine does not implement (penalties, logit_bias, logprobs, n, echo, ...) is
accepted at the value that leaves the output as it is (0, {}, false, 1, or null), as clients such as
LangChain send them; any other value is refused with 400 naming the field and saying what is supported
(`code` "unsupported_value", as OpenAI answers for a value a model does not support), so that a
parameter the server would ignore never looks as if it had been applied. Unknown fields are refused with
400 naming the field. A null stands for the field's default.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
UNSUPPORTED = "unsupported_value"  # pydantic error type and OpenAI error code of a refused value


def neutral_only(neutral: Any, reason: str) -> AfterValidator:
    """Accept `neutral` (the value that changes nothing; None: no value does) or null, after the field's
    type and range checks; refuse anything else, saying `reason`."""
    accepted = "null" if neutral is None else f"{json.dumps(neutral)} or null"

    def check(value: Any) -> Any:
        if value is None or value == neutral:
            return value
        raise PydanticCustomError(
            UNSUPPORTED, f"{json.dumps(value)} is not supported ({reason}); only {accepted} is accepted"
        )

    return AfterValidator(check)


Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]
NO_PENALTIES = "this server applies no penalties"
NO_LOGPROBS = "this server returns no log-probabilities"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI reads null as "not given": nulls are dropped, so that each field's default applies."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: Annotated[
        bool | None, neutral_only(False, "this server adds no obfuscation padding to its chunks")
    ] = None


class Sampling(Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    stop: str | list[str] | None = Field(None)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Annotated[int | None, Field(ge=1), neutral_only(1, "this server gives one choice per request")] = None
    frequency_penalty: Annotated[Penalty, neutral_only(0, NO_PENALTIES)] = None
    presence_penalty: Annotated[Penalty, neutral_only(0, NO_PENALTIES)] = None
    logit_bias: Annotated[
        dict[str, float] | None, neutral_only({}, "this server does not bias token logits")
    ] = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        return value

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: Annotated[bool | None, neutral_only(False, NO_LOGPROBS)] = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20), neutral_only(0, NO_LOGPROBS)] = None
    store: Annotated[bool | None, neutral_only(False, "this server stores no completions")] = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str
    logprobs: Annotated[int | None, Field(ge=0, le=5), neutral_only(None, NO_LOGPROBS)] = None
    echo: Annotated[bool | None, neutral_only(False, "this server does not echo the prompt")] = None
    best_of: Annotated[
        int | None, Field(ge=1), neutral_only(1, "this server generates one candidate per request")
    ] = None
    suffix: Annotated[str | None, neutral_only("", "this server does not insert text before a suffix")] = None

    def token_budget(self) -> int | None:
        return self.max_tokens


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
