"""The endpoint's typed HTTP API: pydantic request and response models, and the error every client
mistake gets (``{"error": {"code", "message", "field"}}`` with a 4xx, never a 5xx).

Requests are read and validated here rather than by FastAPI's body parameters: a body is refused by size
before it is read, must be UTF-8 JSON whatever its content type (``curl -d`` sends form encoding), and the
length limits come from the deployment's settings (passed as pydantic validation context). The models
still document every route in ``/openapi.json`` and ``/docs``.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from atm_ray.utils import is_encodable

FORCE_ARM_HEADER = "x-atm-arm"


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and a JSON error naming the field."""

    def __init__(self, status: int, code: str, message: str, field_name: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field_name

    def body(self) -> dict:
        # field names come from the client (an unknown key): escape what UTF-8 cannot carry, keep it short
        return {"error": {"code": self.code, "message": _printable(self.message, 500), "field": None if self.field is None else _printable(self.field, 100)}}


class LedgerUnavailable(Exception):
    """The A/B ledger did not answer in time (it is restarting): 503 with ``Retry-After``; nothing the
    client sent is lost (records wait in the replica; feedback can be sent again)."""

    retry_after_s = 5

    def body(self) -> dict:
        return {"error": {"code": "ab_ledger_unavailable", "field": None,
                          "message": f"the A/B ledger is restarting; retry in {self.retry_after_s} s"}}


def _printable(text: str, limit: int) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


# ---------------------------------------------------------------------- requests


def _check_encodable(value: str | None) -> str | None:
    if value is not None and not is_encodable(value):
        raise PydanticCustomError("invalid_text", "is not valid Unicode text (a lone surrogate?)")
    return value


Identifier = Annotated[StrictStr, Field(min_length=1, max_length=200)]


class ParseRequest(BaseModel):
    """One utterance to parse."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(description="the utterance; at most the deployment's max_text_chars", examples=["play some jazz on spotify"])
    user_id: Identifier | None = Field(None, description="sticky A/B assignment: one user always meets the same arm")
    request_id: Identifier | None = Field(None, description="your id for this request (for feedback); generated if absent")

    @field_validator("text")
    @classmethod
    def _text(cls, text: str, info: ValidationInfo) -> str:
        if not text.strip():
            raise PydanticCustomError("empty_text", "is empty or only whitespace")
        limit = (info.context or {}).get("max_text_chars")
        if limit is not None and len(text) > limit:
            raise PydanticCustomError("text_too_long", "has {length} characters; the limit is {limit}", {"length": len(text), "limit": limit})
        return _check_encodable(text)

    @field_validator("user_id", "request_id")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        return _check_encodable(value)


class BatchRequest(BaseModel):
    """Several utterances in one call (answered in order)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[ParseRequest] = Field(min_length=1, description="at most the deployment's max_batch_items")

    @field_validator("requests")
    @classmethod
    def _count(cls, requests: list[ParseRequest], info: ValidationInfo) -> list[ParseRequest]:
        limit = (info.context or {}).get("max_batch_items")
        if limit is not None and len(requests) > limit:
            raise PydanticCustomError("too_many_items", "has {count} items; the limit is {limit}", {"count": len(requests), "limit": limit})
        return requests


class FeedbackRequest(BaseModel):
    """The user's verdict on a parsed request (the paper's online measure is dissatisfaction)."""

    model_config = ConfigDict(extra="forbid")

    request_id: Identifier
    satisfied: StrictBool

    @field_validator("request_id")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_encodable(value)


# ---------------------------------------------------------------------- responses


class IntentScore(BaseModel):
    name: str
    confidence: float = Field(description="the model's probability of this intent")


class Slot(BaseModel):
    name: str
    value: str = Field(description="text[start:end]")
    start: int = Field(description="character offset into the request's text")
    end: int = Field(description="character offset, exclusive")
    confidence: float = Field(description="the lowest tag probability among the slot's words")


class ParseResponse(BaseModel):
    intent: IntentScore = Field(description="the answer (the fallback intent when the model was unsure)")
    intents: list[IntentScore] = Field(description="the model's most probable intents, best first (top_k)")
    slots: list[Slot]
    fallback: bool = Field(description="true when confidence fell below the threshold and the fallback intent answered")
    arm: str
    model_version: str = Field(description="the arm's folder and the first 12 hex digits of its weights' SHA-256")
    request_id: str
    latency_ms: float


class BatchResponse(BaseModel):
    results: list[ParseResponse]


class FeedbackResponse(BaseModel):
    recorded: bool
    request_id: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = Field(description="the offending field, dotted for nested ones (requests.3.text)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "not JSON, not UTF-8, or an unknown arm header", 413: "body over the size limit",
    422: "a field is missing, of the wrong type or out of range",
}.items()}
LEDGER_RESPONSES = {503: {"model": ErrorResponse, "description": "the A/B ledger is restarting (Retry-After)"}}

REQUEST_MODELS = (ParseRequest, BatchRequest, FeedbackRequest)


def request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose body is read by hand: the schema lives in the components."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def add_request_schemas(openapi: dict) -> dict:
    from pydantic.json_schema import models_json_schema

    _, schemas = models_json_schema([(model, "validation") for model in REQUEST_MODELS], ref_template="#/components/schemas/{model}")
    openapi.setdefault("components", {}).setdefault("schemas", {}).update(schemas["$defs"])
    return openapi


# ---------------------------------------------------------------------- reading a request


def decode_json_body(body: bytes, max_body_bytes: int) -> object:
    if len(body) > max_body_bytes:
        raise ClientError(413, "body_too_large", f"the body has {len(body)} bytes; the limit is {max_body_bytes}")
    if not body:
        raise ClientError(400, "empty_body", "the body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ClientError(400, "not_utf8", f"the body is not UTF-8 (byte {error.start}: {error.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ClientError(400, "invalid_json", f"the body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise ClientError(400, "invalid_json", "the body nests too deeply") from None


# pydantic's error types -> our codes (custom errors already carry ours)
_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field", "string_unicode": "invalid_text", "too_short": "bad_value", "too_long": "bad_value",
          "string_too_short": "bad_value", "string_too_long": "bad_value"}


def client_error(error: ValidationError) -> ClientError:
    """The first problem pydantic found, as a 422 naming the field (``requests.3.text``)."""
    first = error.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    error_type = first["type"]
    code = _CODES.get(error_type, "wrong_type" if error_type.endswith("_type") or error_type.endswith("_parsing") else error_type)
    where = f"'{field}'" if field else "the request"
    return ClientError(422, code, f"{where}: {first['msg']}", field)


def validate(model: type[BaseModel], payload: object, **limits) -> BaseModel:
    try:
        return model.model_validate(payload, context=limits)
    except ValidationError as error:
        raise client_error(error) from None

