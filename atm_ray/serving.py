"""The Ray Serve NLU endpoint: intent + slots from a fine-tuned model, dynamic batching, A/B arms.

One deployment, ``NluService``, is the FastAPI ingress and holds every arm's ``Parser`` (a 17M model is
small enough for each replica to carry all arms, which saves the hop to a separate model deployment).
Each arm has its own ``@serve.batch`` queue. A one-replica ``AbLedger`` deployment keeps the A/B statistics; replicas send
their records in the background every ``ledger_flush_s``.

    POST /v1/parse        {"text": str, "user_id"?: str, "request_id"?: str}
    POST /v1/parse:batch  {"requests": [{"text": ..., ...}, ...]}
    POST /v1/feedback     {"request_id": str, "satisfied": bool}
    GET  /v1/ab/report    GET /v1/models    GET /healthz

A client's mistake is always a 4xx with ``{"error": {"code", "message", "field"}}``; see ``ClientError``.
"""


import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from atm_ray.ab import Arm, ArmRouter, Ledger
from atm_ray.utils import is_encodable

logger = logging.getLogger(__name__)

FORCE_ARM_HEADER = "x-atm-arm"


@dataclass
class ServeSettings:
    """Everything the application is built from (the Serve config's ``args``)."""

    arms: list[dict]  # [{"name", "model_dir", "weight"}]
    salt: str = "atm-ray"
    shadow: str | None = None  # an arm name: answered by the first arm, also run on this one off the path
    max_batch_size: int = 16
    # 0: a batch takes what queued while the previous one ran (no idle wait at low load)
    batch_wait_timeout_s: float = 0.0
    max_text_chars: int = 1000
    max_body_bytes: int = 64 * 1024
    max_batch_items: int = 64
    torch_threads: int = 1
    quantize: str | None = None  # "int8": dynamic int8 Linear layers (CPU); see tests for accuracy parity
    num_replicas: int = 1
    num_cpus: float = 1.0
    autoscaling: dict | None = None  # Serve's autoscaling_config; replaces num_replicas
    ledger_flush_s: float = 0.1

    def __post_init__(self):
        self.arms = [dict(arm) for arm in self.arms]
        names = [arm.get("name") for arm in self.arms]
        if not self.arms or not all(names) or len(set(names)) != len(names):
            raise ValueError("arms: give at least one arm, each with a unique 'name'")
        for arm in self.arms:
            if not (Path(arm["model_dir"]) / "config.json").is_file():
                raise FileNotFoundError(f"arm {arm['name']}: {arm['model_dir']} is not a fine-tuned model folder")
            # replicas do not run in the directory the app was built from
            arm["model_dir"] = str(Path(arm["model_dir"]).resolve())
        if self.shadow is not None and self.shadow not in names:
            raise ValueError(f"shadow arm {self.shadow!r} is not one of the arms {names}")

    @property
    def max_ongoing_requests(self) -> int:
        # Serve caps a batch at the replica's max_ongoing_requests: leave room for full batches of every arm
        return max(self.max_batch_size * len(self.arms) * 2, 32)


# ---------------------------------------------------------------------- requests


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and a JSON error naming the field."""

    def __init__(self, status: int, code: str, message: str, field_name: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field_name

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


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


def _optional_string(payload: dict, name: str, prefix: str, limit: int = 200) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ClientError(422, "wrong_type", f"'{prefix}{name}' must be a string, not {type(value).__name__}", prefix + name)
    if not value or len(value) > limit:
        raise ClientError(422, "bad_value", f"'{prefix}{name}' must have 1 to {limit} characters", prefix + name)
    return value


def validate_parse_request(payload: object, max_text_chars: int, prefix: str = "") -> dict:
    """``{"text", "user_id", "request_id"}`` from a parsed JSON payload, or a ``ClientError``."""
    if not isinstance(payload, dict):
        raise ClientError(422, "wrong_type", f"the request{' ' + prefix.rstrip('.') if prefix else ''} must be a JSON object, not {type(payload).__name__}", prefix.rstrip(".") or None)
    unknown = sorted(set(payload) - {"text", "user_id", "request_id"})
    if unknown:
        raise ClientError(422, "unknown_field", f"unknown field '{prefix}{unknown[0]}' (allowed: text, user_id, request_id)", prefix + unknown[0])
    if "text" not in payload:
        raise ClientError(422, "missing_field", f"'{prefix}text' is required", prefix + "text")
    text = payload["text"]
    if not isinstance(text, str):
        raise ClientError(422, "wrong_type", f"'{prefix}text' must be a string, not {type(text).__name__}", prefix + "text")
    if not text.strip():
        raise ClientError(422, "empty_text", f"'{prefix}text' is empty or only whitespace", prefix + "text")
    if len(text) > max_text_chars:
        raise ClientError(422, "text_too_long", f"'{prefix}text' has {len(text)} characters; the limit is {max_text_chars}", prefix + "text")
    if not is_encodable(text):
        raise ClientError(422, "invalid_text", f"'{prefix}text' is not valid Unicode text (a lone surrogate?)", prefix + "text")
    return {"text": text, "user_id": _optional_string(payload, "user_id", prefix), "request_id": _optional_string(payload, "request_id", prefix)}


def validate_batch_request(payload: object, max_text_chars: int, max_items: int) -> list[dict]:
    if not isinstance(payload, dict) or "requests" not in payload:
        raise ClientError(422, "missing_field", "'requests' is required: a list of {text, user_id?, request_id?}", "requests")
    if set(payload) != {"requests"}:
        raise ClientError(422, "unknown_field", f"unknown field '{sorted(set(payload) - {'requests'})[0]}'")
    items = payload["requests"]
    if not isinstance(items, list):
        raise ClientError(422, "wrong_type", f"'requests' must be a list, not {type(items).__name__}", "requests")
    if not items or len(items) > max_items:
        raise ClientError(422, "bad_value", f"'requests' must hold 1 to {max_items} items, not {len(items)}", "requests")
    return [validate_parse_request(item, max_text_chars, f"requests.{index}.") for index, item in enumerate(items)]


def validate_feedback(payload: object) -> tuple[str, bool]:
    if not isinstance(payload, dict):
        raise ClientError(422, "wrong_type", "the feedback must be a JSON object")
    for name in ("request_id", "satisfied"):
        if name not in payload:
            raise ClientError(422, "missing_field", f"'{name}' is required", name)
    unknown = sorted(set(payload) - {"request_id", "satisfied"})
    if unknown:
        raise ClientError(422, "unknown_field", f"unknown field '{unknown[0]}'", unknown[0])
    request_id = _optional_string(payload, "request_id", "")
    if request_id is None:  # present but null: a client mistake, not an unknown id
        raise ClientError(422, "wrong_type", "'request_id' must be a string, not null", "request_id")
    if not isinstance(payload["satisfied"], bool):
        raise ClientError(422, "wrong_type", f"'satisfied' must be true or false, not {type(payload['satisfied']).__name__}", "satisfied")
    return request_id, payload["satisfied"]


def model_version(model_dir: str | Path) -> str:
    """The folder name and the first 12 hex digits of the weights' SHA-256."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{model_dir.parent.name or model_dir.name}@{digest.hexdigest()[:12]}"


def frame(result: dict) -> tuple:
    return result["intent"]["name"], tuple((slot["name"], slot["start"], slot["end"]) for slot in result["slots"])


# ---------------------------------------------------------------------- Serve


def build_app(args: dict):
    """The Serve application (``serve run atm_ray.serving:build_app`` / the config's ``import_path``)."""
    from ray import serve
    from ray.serve.metrics import Counter, Histogram

    settings = ServeSettings(**args)
    app = FastAPI(title="atm-ray NLU", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, error: ClientError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(error.detail), "field": None}}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception):
        logger.exception("internal error")
        return JSONResponse({"error": {"code": "internal", "message": "internal server error", "field": None}}, status_code=500)

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
    class AbLedger:
        def __init__(self, arm_names: list[str]):
            self.ledger = Ledger(arm_names)

        def record(self, entries: list[dict]) -> None:
            self.ledger.record(entries)

        def feedback(self, request_id: str, satisfied: bool) -> str:
            return self.ledger.add_feedback(request_id, satisfied)

        def report(self) -> dict:
            return self.ledger.report()

    @serve.deployment(logging_config={"enable_access_log": False})
    @serve.ingress(app)
    class NluService:
        def __init__(self, settings: dict, ledger):
            import torch

            from atm_ray.nlu import Parser

            self.settings = ServeSettings(**settings)
            torch.set_num_threads(self.settings.torch_threads)
            self.ledger = ledger
            self.arms = [Arm(arm["name"], arm["model_dir"], float(arm.get("weight", 1.0))) for arm in self.settings.arms]
            routed = [arm for arm in self.arms if arm.name != self.settings.shadow] if self.settings.shadow else self.arms
            self.router = ArmRouter(routed, self.settings.salt)
            self.parsers = {arm.name: Parser(arm.model_dir, quantize=self.settings.quantize) for arm in self.arms}
            self.versions = {arm.name: model_version(arm.model_dir) for arm in self.arms}
            self.batchers = {arm.name: self._batcher(arm.name) for arm in self.arms}
            self.pending: list[dict] = []
            self.shadow_tasks: set[asyncio.Task] = set()
            tags = ("arm",)
            self.request_counter = Counter("atm_ray_requests", "parsed utterances", tag_keys=tags)
            self.error_counter = Counter("atm_ray_errors", "failed parses", tag_keys=tags)
            self.intent_counter = Counter("atm_ray_intents", "predicted intents", tag_keys=("arm", "intent"))
            self.latency = Histogram(
                "atm_ray_latency_ms", "parse latency in the replica",
                boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=tags,
            )
            self.flusher = None

        def _batcher(self, arm: str):
            parser = self.parsers[arm]

            async def parse_batch(texts: list[str]) -> list[dict | Exception]:
                self.pending.append({"kind": "batch", "arm": arm, "size": len(texts)})
                # On the loop, not in a thread: while a batch computes, requests gather in front of the
                # replica and the next batch takes them all (measured: mean batch 5.5 at 16 clients;
                # an inference thread left batches at ~1.1 on a 2-core machine, GIL contention).
                try:
                    return parser.parse(texts)
                except Exception:
                    if len(texts) == 1:
                        raise
                # one request's failure stays its own: parse them one by one, and hand each caller its
                # own result or exception (Serve fails every caller of a batch that raises)
                results: list[dict | Exception] = []
                for text in texts:
                    try:
                        results.append(parser.parse([text])[0])
                    except Exception as error:
                        results.append(error)
                return results

            return serve.batch(max_batch_size=self.settings.max_batch_size, batch_wait_timeout_s=self.settings.batch_wait_timeout_s)(parse_batch)

        def _ensure_flusher(self) -> None:
            if self.flusher is None or self.flusher.done():
                self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

        async def _flush_forever(self) -> None:
            while True:
                await asyncio.sleep(self.settings.ledger_flush_s)
                try:
                    await self._flush()
                except Exception:  # the ledger restarting must not stop the replica answering
                    logger.exception("could not send A/B records to the ledger")

        async def _flush(self) -> None:
            if self.pending:
                entries, self.pending = self.pending, []
                await self.ledger.record.remote(entries)

        def _arm_for(self, request: Request, user_id: str | None) -> str:
            forced = request.headers.get(FORCE_ARM_HEADER)
            if forced is not None:
                if forced not in self.parsers:
                    raise ClientError(400, "unknown_arm", f"header {FORCE_ARM_HEADER}: no arm {forced!r} (arms: {sorted(self.parsers)})", FORCE_ARM_HEADER)
                return forced
            return self.router.assign(user_id)

        async def _parse_one(self, request: Request, item: dict) -> dict:
            self._ensure_flusher()
            started = time.perf_counter()
            arm = self._arm_for(request, item["user_id"])
            request_id = item["request_id"] or uuid.uuid4().hex
            try:
                result = await self.batchers[arm](item["text"])
                if isinstance(result, Exception):
                    raise result
            except Exception:
                self.error_counter.inc(tags={"arm": arm})
                self.pending.append({"kind": "error", "arm": arm})
                raise
            latency_ms = (time.perf_counter() - started) * 1000
            self.request_counter.inc(tags={"arm": arm})
            self.intent_counter.inc(tags={"arm": arm, "intent": result["intent"]["name"]})
            self.latency.observe(latency_ms, tags={"arm": arm})
            self.pending.append({"kind": "request", "arm": arm, "request_id": request_id, "latency_ms": latency_ms, "intent": result["intent"]["name"]})
            if self.settings.shadow and arm != self.settings.shadow:
                task = asyncio.get_running_loop().create_task(self._shadow(item["text"], result))
                self.shadow_tasks.add(task)
                task.add_done_callback(self.shadow_tasks.discard)
            return {**result, "arm": arm, "model_version": self.versions[arm], "request_id": request_id, "latency_ms": round(latency_ms, 3)}

        async def _shadow(self, text: str, answered: dict) -> None:
            try:
                shadow = await self.batchers[self.settings.shadow](text)
                if isinstance(shadow, Exception):
                    raise shadow
            except Exception:
                logger.exception("shadow arm failed")
                self.pending.append({"kind": "error", "arm": self.settings.shadow})
                return
            self.pending.append({
                "kind": "shadow",
                "intent_agrees": shadow["intent"]["name"] == answered["intent"]["name"],
                "frame_agrees": frame(shadow) == frame(answered),
            })

        async def _json(self, request: Request) -> object:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
                raise ClientError(413, "body_too_large", f"the body has {declared} bytes; the limit is {self.settings.max_body_bytes}")
            return decode_json_body(await request.body(), self.settings.max_body_bytes)

        @app.post("/v1/parse")
        async def parse(self, request: Request):
            item = validate_parse_request(await self._json(request), self.settings.max_text_chars)
            return await self._parse_one(request, item)

        @app.post("/v1/parse:batch")
        async def parse_batch(self, request: Request):
            items = validate_batch_request(await self._json(request), self.settings.max_text_chars, self.settings.max_batch_items)
            return {"results": list(await asyncio.gather(*(self._parse_one(request, item) for item in items)))}

        @app.post("/v1/feedback")
        async def feedback(self, request: Request):
            request_id, satisfied = validate_feedback(await self._json(request))
            await self._flush()
            outcome = await self.ledger.feedback.remote(request_id, satisfied)
            if outcome == "unknown":
                raise ClientError(404, "unknown_request", f"no parsed request with request_id {request_id!r}", "request_id")
            if outcome == "duplicate":
                raise ClientError(409, "duplicate_feedback", f"feedback for {request_id!r} was already recorded", "request_id")
            return {"recorded": True, "request_id": request_id}

        @app.get("/v1/ab/report")
        async def report(self):
            await self._flush()
            report = await self.ledger.report.remote()
            return {"experiment_salt": self.settings.salt, "split": self.router.shares(), "shadow_arm": self.settings.shadow, **report}

        @app.get("/v1/models")
        async def models(self):
            shares = self.router.shares()
            return {
                "arms": [
                    {"name": arm.name, "model_dir": arm.model_dir, "model_version": self.versions[arm.name],
                     "share": shares.get(arm.name, 0.0), "intents": self.parsers[arm.name].intents}
                    for arm in self.arms
                ],
                "shadow": self.settings.shadow,
            }

        @app.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "arms": sorted(self.parsers)}

    options = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": settings.num_cpus},
    }
    if settings.autoscaling:
        options["autoscaling_config"] = settings.autoscaling
    else:
        options["num_replicas"] = settings.num_replicas
    ledger = AbLedger.bind([arm["name"] for arm in settings.arms])
    return NluService.options(**options).bind(asdict(settings), ledger)


def parse_arm_arguments(models: list[str], split: str | None) -> list[dict]:
    """``--model A=DIR --model B=DIR --split 90:10`` -> the ``arms`` setting."""
    arms = []
    for item in models:
        name, equals, directory = item.partition("=")
        if not equals or not name or not directory:
            raise ValueError(f"--model {item!r} is not NAME=DIR")
        arms.append({"name": name, "model_dir": str(Path(directory).resolve()), "weight": 1.0})
    if split:
        try:
            weights = [float(part) for part in split.split(":")]
        except ValueError:
            raise ValueError(f"--split {split!r} is not numbers separated by ':' (e.g. 90:10)") from None
        if len(weights) != len(arms):
            raise ValueError(f"--split {split!r} has {len(weights)} weights for {len(arms)} models")
        for arm, weight in zip(arms, weights):
            arm["weight"] = weight
    return arms
