"""The OpenAI request bodies the server accepts, and the error shape it answers with.

The sampling fields of `serve.backend.SAMPLING_FIELDS` (n, penalties, logit_bias, logprobs, response_format)
are checked here for type and range; whether the engine applies them is the API's check (`serve.app`). A
field no engine implements (echo, best_of, suffix, store) is accepted at the value that leaves the output as
it is (false, 1, "" or null), as clients such as LangChain send them; any other value is refused with 400
naming the field and saying what is supported (`code` "unsupported_value", as OpenAI answers for a value a
model does not support), so that a parameter the server would ignore never looks as if it had been applied.
Unknown fields are refused with 400 naming the field. A null stands for the field's default.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llamatailor.serve.json_schema import SchemaError, check_schema

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
MAX_CHOICES = 16  # n: choices per request (each takes a slot's worth of decoding)


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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(default_factory=dict)
    response_format: "ResponseFormat | None" = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float]) -> dict[str, float]:
        wrong = [key for key in value if not key.isdigit()]
        if wrong:
            raise ValueError(f"keys are token ids (digits), got {wrong[0]!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        return value

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match; None for free text."""
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.type == "json_object":
            return {"type": "object"}
        assert self.response_format.json_schema is not None  # the model's validator
        return self.response_format.json_schema.schema_ or {"type": "object"}


class JsonSchema(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc}") from None
            except RecursionError:  # the body cap allows nesting deeper than Python's stack
                raise ValueError("not a valid JSON schema: nested too deeply") from None
        return value


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return self


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    store: Annotated[bool | None, neutral_only(False, "this server stores no completions")] = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_asked(self) -> int | None:
        """None: no log-probabilities; k: each token's and its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Annotated[bool | None, neutral_only(False, "this server does not echo the prompt")] = None
    best_of: Annotated[
        int | None, Field(ge=1), neutral_only(1, "this server generates one candidate per request")
    ] = None
    suffix: Annotated[str | None, neutral_only("", "this server does not insert text before a suffix")] = None

    def token_budget(self) -> int | None:
        return self.max_tokens

    def logprobs_asked(self) -> int | None:
        return self.logprobs


Sampling.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


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
