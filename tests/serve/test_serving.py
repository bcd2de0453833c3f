"""The Serve NLU endpoint: A/B arithmetic and request validation as plain functions, then a real Serve
application answering real HTTP requests on 127.0.0.1 (bounded request counts throughout)."""

import json
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import clean_environment, free_port

from atm_ray.serve.ab import Arm, ArmRouter, Ledger, two_proportion_test, wilson_interval
from atm_ray.serve.api import BatchRequest, ClientError, FeedbackRequest, ParseRequest, ParseResponse, decode_json_body, validate
from atm_ray.serve.app import parse_arm_arguments

# ---------------------------------------------------------------------- plain functions

RAY_DASHBOARD = False  # as `atm-ray serve` starts Ray
SERVE_INGRESS = "haproxy"  # the default ingress of `atm-ray serve` (Ray's high-throughput mode)


def test_split_is_weighted_sticky_and_salted():
    router = ArmRouter([Arm("A", "a", 90), Arm("B", "b", 10)], salt="exp-1")
    users = [f"user-{index}" for index in range(5000)]
    counts = Counter(router.assign(user) for user in users)
    assert abs(counts["B"] / len(users) - 0.10) < 0.015  # 3 standard deviations at n = 5000
    assert all(router.assign(user) == router.assign(user) for user in users[:200])
    other = ArmRouter([Arm("A", "a", 90), Arm("B", "b", 10)], salt="exp-2")
    assert sum(router.assign(user) != other.assign(user) for user in users) > 500  # a new salt reshuffles
    even = ArmRouter([Arm("A", "a", 1), Arm("B", "b", 1)], salt="s", seed=0)
    anonymous = Counter(even.assign(None) for _ in range(2000))
    assert abs(anonymous["A"] / 2000 - 0.5) < 0.05
    assert router.shares() == {"A": 0.9, "B": 0.1}
    with pytest.raises(ValueError, match="unique"):
        ArmRouter([Arm("A", "a", 1), Arm("A", "b", 1)], salt="s")


def test_report_statistics_by_hand():
    low, high = wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-4) and high == pytest.approx(0.1744, abs=1e-4)
    test = two_proportion_test(10, 100, 20, 100)  # 10% vs 20% dissatisfied
    assert test["z"] == pytest.approx(1.980, abs=1e-3) and test["p_value"] == pytest.approx(0.0477, abs=1e-3)
    ledger = Ledger(["A", "B"])
    ledger.record([
        {"event": "request", "arm": "A", "request_id": "r1", "latency_ms": 3.0, "intent": "play"},
        {"event": "request", "arm": "B", "request_id": "r2", "latency_ms": 5.0, "intent": "play"},
        {"event": "batch", "arm": "A", "size": 4},
        {"event": "shadow", "intent_agrees": True, "frame_agrees": False},
    ])
    assert ledger.add_feedback("r1", satisfied=False) == "ok"
    assert ledger.add_feedback("r1", satisfied=True) == "duplicate"
    assert ledger.add_feedback("nope", satisfied=True) == "unknown"
    report = ledger.report()
    assert report["arms"]["A"]["feedback"]["dissatisfaction_rate"] == 1.0
    assert report["arms"]["A"]["batches"]["max_size"] == 4
    assert report["shadow"] == {"compared": 1, "intent_agreement": 1, "frame_agreement": 0,
                                "intent_agreement_rate": 1.0, "frame_agreement_rate": 0.0}


def malformed_requests() -> list[tuple[str, bytes, dict]]:
    """(path, body, headers) triples a careless or hostile client might send: each must get a 4xx."""
    cases = []
    bodies = [b"", b"{", b"}", b"nul", b"[1,2", b'{"text": "a",}', b"\xff\xfe\xfd", b'{"text": "caf\xe9"}', b"\x00",
              b"[]", b"42", b'"text"', b"null", b"true", b"{}", b'{"txt": "hi"}', b'{"text": null}',
              b'{"text": 5}', b'{"text": ["hi"]}', b'{"text": {"a": 1}}', b'{"text": ""}', b'{"text": "   "}',
              b'{"text": "\\n\\t"}', b'{"text": "hi", "user_id": 7}', b'{"text": "hi", "user_id": ""}',
              b'{"text": "hi", "request_id": []}', b'{"text": "hi", "extra": 1}', json.dumps({"text": "a" * 1001}).encode(),
              json.dumps({"text": "hi", "user_id": "u" * 201}).encode(), b'{"text": "hi"}' + b" " * 70_000]
    for body in bodies:
        cases.append(("/v1/parse", body, {}))
        cases.append(("/v1/parse:batch", body, {}))
    batch_bodies = [{"requests": []}, {"requests": "hi"}, {"requests": [{"text": ""}]}, {"requests": [{"text": "ok"}, 5]},
                    {"requests": [{"text": "ok"}] * 65}, {"requests": [{"text": "ok"}], "more": 1}, {"items": [{"text": "hi"}]},
                    {"requests": [{"text": "ok", "user_id": 3}]}, {"requests": None}]
    cases += [("/v1/parse:batch", json.dumps(body).encode(), {}) for body in batch_bodies]
    feedback_bodies = [{}, {"request_id": "x"}, {"satisfied": True}, {"request_id": "x", "satisfied": "yes"},
                       {"request_id": 5, "satisfied": True}, {"request_id": "never-seen", "satisfied": True},
                       {"request_id": "x", "satisfied": True, "note": "!"}, {"request_id": None, "satisfied": True}, [], "x"]
    cases += [("/v1/feedback", json.dumps(body).encode(), {}) for body in feedback_bodies]
    cases += [("/v1/feedback", body, {}) for body in (b"{", b"\xff", b"")]
    for arm in ("Z", "", "a", "A B", "../A", "0" * 300):
        cases.append(("/v1/parse", b'{"text": "play jazz"}', {"x-atm-arm": arm}))
    return cases


def test_validation_rejects_every_malformed_request_as_a_client_error():
    for path, body, headers in malformed_requests():
        if headers or body == json.dumps({"request_id": "never-seen", "satisfied": True}).encode():
            continue  # well-formed bodies: an unknown arm or request id is the service's to refuse (over HTTP)
        with pytest.raises(ClientError) as caught:
            payload = decode_json_body(body, 64 * 1024)
            if path == "/v1/parse":
                validate(ParseRequest, payload, max_text_chars=1000)
            elif path == "/v1/parse:batch":
                validate(BatchRequest, payload, max_text_chars=1000, max_batch_items=64)
            else:
                validate(FeedbackRequest, payload)
        assert 400 <= caught.value.status < 500
        json.dumps(caught.value.body()).encode("utf-8")  # the error itself always travels as UTF-8
    assert validate(ParseRequest, {"text": "hi", "user_id": "u"}, max_text_chars=10) == ParseRequest(text="hi", user_id="u")
    # the error names the nested field and says what is wrong with it
    with pytest.raises(ClientError) as caught:
        validate(BatchRequest, {"requests": [{"text": "ok"}, {"text": 5}]}, max_text_chars=10)
    assert caught.value.body()["error"] | {"message": ""} == {"code": "wrong_type", "field": "requests.1.text", "message": ""}
    with pytest.raises(ClientError) as caught:
        validate(ParseRequest, {"text": "hi", "\ud800": 1})  # an unknown key the client made unencodable
    assert caught.value.status == 422 and json.dumps(caught.value.body(), ensure_ascii=False).encode("utf-8")
    with pytest.raises(ClientError, match="the limit is 3") as caught:
        validate(ParseRequest, {"text": "four"}, max_text_chars=3)
    assert caught.value.code == "text_too_long"


def test_arm_arguments(tmp_path):
    arms = parse_arm_arguments([f"A={tmp_path}", f"B={tmp_path}"], "90:10")
    assert [(arm["name"], arm["weight"]) for arm in arms] == [("A", 90.0), ("B", 10.0)]
    with pytest.raises(ValueError, match="2 weights for 1 models"):
        parse_arm_arguments([f"A={tmp_path}"], "90:10")
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_arm_arguments(["A"], None)


def test_ledger_state_round_trips(tmp_path):
    """What the A/B ledger deployment writes to its state_dir brings back every count and verdict."""
    ledger = Ledger(["A", "B"])
    ledger.record([{"event": "request", "arm": arm, "request_id": f"r{index}", "latency_ms": float(index), "intent": "play"}
                   for index, arm in enumerate("AABAB")] + [{"event": "error", "arm": "B"}, {"event": "batch", "arm": "A", "size": 3},
                                                           {"event": "shadow", "intent_agrees": True, "frame_agrees": True}])
    assert ledger.add_feedback("r0", satisfied=False) == "ok"
    restored = Ledger.from_state(["A", "B"], json.loads(json.dumps(ledger.state())))
    assert restored.report() == ledger.report()
    assert restored.add_feedback("r0", satisfied=True) == "duplicate" and restored.add_feedback("r1", satisfied=True) == "ok"
    # an arm dropped from the deployment keeps its counts in the state, and they return with it
    narrowed = Ledger.from_state(["A"], ledger.state())
    assert list(narrowed.report()["arms"]) == ["A"] and Ledger.from_state(["A", "B"], narrowed.state()).report() == ledger.report()
    with pytest.raises(ValueError, match="version"):
        Ledger.from_state(["A"], {"version": 99})


def test_the_report_waits_for_records_another_replica_has_not_flushed():
    """The ledger deployment's own class on one event loop, with two replicas flushing as NluService does:
    a request answered by the second replica just before the report is in the report; one that went
    silent is not waited for beyond ``silent_s``."""
    import asyncio

    from atm_ray.serve.app import AbLedger

    def request(request_id):
        return {"event": "request", "arm": "A", "request_id": request_id, "latency_ms": 1.0, "intent": "play"}

    async def scenario():
        ledger = AbLedger.func_or_class(["A", "B"])
        pending = {"r1": [], "r2": []}

        async def replica(name, interval):  # NluService._flush_forever: one flush at a time
            while True:
                await asyncio.sleep(interval)
                entries, pending[name] = pending[name], []
                await ledger.record(entries, name)

        flushers = [asyncio.create_task(replica("r1", 0.01)), asyncio.create_task(replica("r2", 0.2))]
        await asyncio.sleep(0.5)  # both replicas known to the ledger, drained
        pending["r2"].append(request("late"))  # answered by the slow replica, not flushed yet
        assert (await ledger.report())["arms"]["A"]["requests"] == 0  # without settling, it is not there
        assert (await ledger.report(settle_s=2.0, silent_s=1.0))["arms"]["A"]["requests"] == 1
        pending["r2"].append(request("later"))
        assert await ledger.feedback("later", True, settle_s=2.0, silent_s=1.0) == "ok"

        flushers[1].cancel()  # r2 stops: after silent_s the report stops waiting for it
        started = time.monotonic()
        assert await ledger.settle(timeout_s=5.0, silent_s=0.5)
        assert time.monotonic() - started < 1.0
        flushers[0].cancel()
        assert await ledger.feedback("never-seen", True, settle_s=2.0, silent_s=1.0) == "unknown"

    asyncio.run(scenario())


# ---------------------------------------------------------------------- a real Serve application


def _deploy(models, weights=(90, 10), **settings):
    from ray import serve

    from atm_ray.serve.app import build_app

    args = {
        "arms": [{"name": "A", "model_dir": models["A"], "weight": weights[0]}, {"name": "B", "model_dir": models["B"], "weight": weights[1]}],
        "salt": "test",
        "num_cpus": 0.5,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.005,
        # fp32, so answers compare exactly with the in-process parser whatever the batch (int8, the default,
        # scales activations per batch; `atm-ray serve` runs it in test_cli_serve_stops_cleanly_on_sigterm)
        "quantize": None,
        **settings,
    }
    serve.run(build_app(args), name="nlu", route_prefix="/")


@pytest.fixture(scope="module")
def endpoint(nlu_models, local_ray):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING", "enable_access_log": False})
    _deploy(nlu_models)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post(url, payload, **kwargs):
    return requests.post(url, json=payload, timeout=30, **kwargs)


@pytest.mark.slow
def test_parses_match_the_in_process_parser(endpoint, nlu_models):
    from atm_ray.nlu.model import Parser

    texts = ["add this song to my workout playlist", "play some jazz by miles davis on spotify",
             "what will the weather be in paris tomorrow", "book a table for two at 7 pm"]
    expected = Parser(nlu_models["A"]).parse(texts)
    for text, wanted in zip(texts, expected):
        response = _post(f"{endpoint}/v1/parse", {"text": text, "request_id": f"id-{text[:5]}"}, headers={"x-atm-arm": "A"})
        assert response.status_code == 200, response.text
        body = response.json()
        ParseResponse.model_validate(body)  # the route returns its dict as is: it must be what the API documents
        assert body["arm"] == "A" and body["request_id"] == f"id-{text[:5]}" and body["latency_ms"] > 0
        assert body["intent"]["name"] == wanted["intent"]["name"] and body["fallback"] is False
        assert body["intent"]["confidence"] == pytest.approx(wanted["intent"]["confidence"], abs=1e-5)
        # the ranking and the slots' confidences, as the in-process parser gives them (batches pad differently)
        assert [intent["name"] for intent in body["intents"]] == [intent["name"] for intent in wanted["intents"]]
        assert [intent["confidence"] for intent in body["intents"]] == pytest.approx([intent["confidence"] for intent in wanted["intents"]], abs=1e-5)
        assert [{**slot, "confidence": 0} for slot in body["slots"]] == [{**slot, "confidence": 0} for slot in wanted["slots"]]
        assert [slot["confidence"] for slot in body["slots"]] == pytest.approx([slot["confidence"] for slot in wanted["slots"]], abs=1e-5)
        assert body["model_version"].startswith("arm_A@")
    batch = _post(f"{endpoint}/v1/parse:batch", {"requests": [{"text": text} for text in texts]}, headers={"x-atm-arm": "A"}).json()["results"]
    assert len({result["request_id"] for result in batch}) == len(texts)
    # each answer lines up with its own input
    def frame(result):
        return result["intent"]["name"], [(slot["name"], slot["start"], slot["end"]) for slot in result["slots"]]

    assert [frame(result) for result in batch] == [frame(wanted) for wanted in expected]
    models = requests.get(f"{endpoint}/v1/models", timeout=10).json()
    assert [arm["name"] for arm in models["arms"]] == ["A", "B"] and models["arms"][1]["share"] == 0.1
    assert requests.get(f"{endpoint}/healthz", timeout=10).json()["status"] == "ok"


@pytest.mark.slow
def test_concurrent_load_is_batched(endpoint):
    def call(index):
        return _post(f"{endpoint}/v1/parse", {"text": f"play song number {index} on spotify"}, headers={"x-atm-arm": "A"}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(96)))
    assert codes == [200] * 96
    report = requests.get(f"{endpoint}/v1/ab/report", timeout=10).json()
    assert report["arms"]["A"]["batches"]["max_size"] > 1, report["arms"]["A"]["batches"]


@pytest.mark.slow
def test_split_stickiness_and_feedback(endpoint):
    users = [f"user-{index}" for index in range(2000)]

    def arm_of(user):
        return _post(f"{endpoint}/v1/parse", {"text": "play music", "user_id": user}).json()["arm"]

    with ThreadPoolExecutor(16) as pool:
        arms = list(pool.map(arm_of, users))
    share_b = arms.count("B") / len(arms)
    assert abs(share_b - 0.10) < 0.02, share_b
    expected = ArmRouter([Arm("A", "", 90), Arm("B", "", 10)], salt="test")
    assert arms == [expected.assign(user) for user in users]  # the service routes as the router says
    assert len({arm_of("alice") for _ in range(15)}) == 1

    before_report = requests.get(f"{endpoint}/v1/ab/report", timeout=10).json()
    before = before_report["arms"]["A"]["feedback"]
    request_ids = [_post(f"{endpoint}/v1/parse", {"text": "stop"}, headers={"x-atm-arm": "A"}).json()["request_id"] for _ in range(6)]
    for index, request_id in enumerate(request_ids):
        response = _post(f"{endpoint}/v1/feedback", {"request_id": request_id, "satisfied": index % 3 != 0})
        assert response.status_code == 200, response.text
    assert _post(f"{endpoint}/v1/feedback", {"request_id": request_ids[0], "satisfied": True}).status_code == 409
    assert _post(f"{endpoint}/v1/feedback", {"request_id": "never-seen", "satisfied": True}).status_code == 404
    after = requests.get(f"{endpoint}/v1/ab/report", timeout=10).json()
    feedback = after["arms"]["A"]["feedback"]
    assert feedback["dissatisfied"] - before["dissatisfied"] == 2 and feedback["satisfied"] - before["satisfied"] == 4
    assert "B_vs_A" in after["dissatisfaction_tests"]
    assert after["arms"]["A"]["requests"] - before_report["arms"]["A"]["requests"] == 6  # each request counted once
    assert after["arms"]["A"]["latency_ms"]["p50"] > 0


@pytest.mark.slow
def test_malformed_requests_get_json_4xx_never_5xx(endpoint):
    cases = malformed_requests() + [("/v1/nowhere", b"{}", {})]
    assert len({(path, body, tuple(headers.items())) for path, body, headers in cases}) == len(cases)  # no padding
    statuses = Counter()
    for path, body, headers in cases:
        response = requests.post(f"{endpoint}{path}", data=body, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        if path == "/v1/parse" and body == b'{"text": "hi", "user_id": 7}':
            assert response.status_code == 422  # user_id must be a string
        if path == "/v1/feedback" and body == b'{"request_id": null, "satisfied": true}':
            assert response.status_code == 422 and response.json()["error"]["field"] == "request_id"
        assert 400 <= response.status_code < 500, (path, body[:80], headers, response.status_code, response.text)
        error = response.json()["error"]
        assert error["code"] and error["message"]
    wrong_method = requests.get(f"{endpoint}/v1/parse", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    print(f"malformed requests: {sum(statuses.values())}, status codes {dict(statuses)}")


@pytest.mark.slow
def test_a_hostile_request_inside_a_concurrent_batch_fails_alone(endpoint):
    """Lone surrogates are valid JSON that no tokenizer can encode: 422 naming the field, while the valid
    requests sent at the same moment (batched with it) are all answered; generated Unicode never 5xx."""
    import random

    hostile = b'{"text": "play \\ud800 now"}'

    def call(index):
        if index % 16 == 7:
            response = requests.post(f"{endpoint}/v1/parse", data=hostile, headers={"x-atm-arm": "A"}, timeout=30)
        else:
            response = _post(f"{endpoint}/v1/parse", {"text": f"play song {index}"}, headers={"x-atm-arm": "A"})
        return index, response.status_code, response.json()

    for _ in range(3):
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(16)))
        for index, status, body in outcomes:
            if index % 16 == 7:
                assert status == 422 and body["error"]["field"] == "text", body
            else:
                assert status == 200, body
    generator = random.Random(0)
    for _ in range(60):
        text = "".join(chr(generator.choice([generator.randrange(0x20, 0x7F), generator.randrange(0xA0, 0xD800),
                                              generator.randrange(0xD800, 0xE000), generator.randrange(0xE000, 0x110000)]))
                       for _ in range(generator.randrange(1, 12)))
        body = json.dumps({"text": text}).encode()  # ensure_ascii: surrogates travel as \\u escapes
        response = requests.post(f"{endpoint}/v1/parse", data=body, timeout=30)
        assert response.status_code < 500, (text, response.text)
        assert response.status_code in (200, 422), (text, response.text)


def test_parser_names_the_utterance_it_cannot_encode(nlu_models):
    from atm_ray.nlu.model import Parser

    with pytest.raises(ValueError, match="utterance 1 is not valid Unicode"):
        Parser(nlu_models["A"]).parse(["play jazz", "play \ud800"])
    with pytest.raises(ClientError) as caught:
        validate(ParseRequest, {"text": "a \udfff b"}, max_text_chars=100)
    assert caught.value.status == 422 and caught.value.body()["error"]["field"] == "text"


@pytest.mark.slow
def test_shadow_arm_agreement_is_recorded(endpoint, nlu_models):
    _deploy(nlu_models, shadow="B")
    try:
        texts = [f"play track {index} from my favourites" for index in range(30)]
        arms = [_post(f"{endpoint}/v1/parse", {"text": text, "user_id": f"shadow-{index}"}).json()["arm"] for index, text in enumerate(texts)]
        assert set(arms) == {"A"}  # B only runs off the request path
        deadline = time.time() + 15
        while time.time() < deadline:
            shadow = requests.get(f"{endpoint}/v1/ab/report", timeout=10).json()["shadow"]
            if shadow["compared"] >= 30:
                break
            time.sleep(0.2)
        assert shadow["compared"] == 30, shadow
        # agreement as the two models give it in this process
        from atm_ray.nlu.model import Parser

        mine, theirs = Parser(nlu_models["A"]).parse(texts), Parser(nlu_models["B"]).parse(texts)
        assert shadow["intent_agreement"] == sum(a["intent"]["name"] == b["intent"]["name"] for a, b in zip(mine, theirs))
    finally:
        _deploy(nlu_models)


@pytest.mark.slow
def test_service_recovers_from_a_killed_replica(endpoint, nlu_models):
    import ray
    from ray import serve

    _deploy(nlu_models, num_replicas=2, num_cpus=0.25)
    outcomes = []

    def call(index):
        try:
            response = _post(f"{endpoint}/v1/parse", {"text": f"set an alarm for {index % 12 + 1} am"})
            return response.status_code
        except requests.RequestException:
            return "connection error"

    try:
        with ThreadPoolExecutor(4) as pool:
            outcomes += list(pool.map(call, range(40)))
            victim = _replica_names()[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            outcomes += list(pool.map(call, range(40, 200)))
        deadline = time.time() + 60
        while time.time() < deadline and not (
            serve.status().applications["nlu"].status == "RUNNING" and len(_replica_names()) == 2 and victim not in _replica_names()
        ):
            time.sleep(0.5)
        assert victim not in _replica_names() and len(_replica_names()) == 2  # Serve replaced the killed replica
        final = [call(index) for index in range(20)]
        failed = sum(outcome != 200 for outcome in outcomes)
        print(f"replica killed under load: {failed} of {len(outcomes)} requests failed; then {final.count(200)}/20 succeeded")
        assert final == [200] * 20
        assert failed < len(outcomes) // 2
    finally:
        _deploy(nlu_models)


def _replica_names(app: str = "nlu") -> list[str]:
    """The live NluService replica actors of ``app`` (Serve names its replicas in the namespace "serve")."""
    import ray

    names = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and f"::{app}#NluService" in entry["name"] and "REPLICA" in entry["name"].upper():
            try:
                ray.get_actor(entry["name"], namespace="serve")
            except ValueError:
                continue
            names.append(entry["name"])
    return sorted(names)


def test_serve_config_is_valid_for_serve_deploy():
    """serve/config.yaml passes Ray's own schema, binds loopback, and its import path is our builder."""
    import importlib
    import sys
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from atm_ray.serve.app import ServeSettings, Traffic, build_app

    root = Path(__file__).resolve().parents[2]
    schema = ServeDeploySchema.model_validate(yaml.safe_load((root / "serve" / "config.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
    (application,) = schema.applications
    module_name, _, attribute = application.import_path.partition(":")
    sys.path.insert(0, str(root))
    try:
        assert getattr(importlib.import_module(module_name), attribute) is build_app
    finally:
        sys.path.remove(str(root))
    fields = set(ServeSettings.model_fields)
    assert set(application.args) <= fields, set(application.args) - fields
    (deployment,) = application.deployments  # the traffic split is the ingress deployment's user_config
    assert deployment.name == "NluService"
    assert set(Traffic.model_validate(deployment.user_config).weights) == {arm["name"] for arm in application.args["arms"]}
    assert schema.logging_config.log_level == "WARNING" and not schema.logging_config.enable_access_log


@pytest.mark.slow
def test_the_api_is_documented(endpoint):
    """OpenAPI at /openapi.json with the request and response models; Swagger UI at /docs."""
    document = requests.get(f"{endpoint}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    for path, request_model, response_model in [("/v1/parse", "ParseRequest", "ParseResponse"),
                                                ("/v1/parse:batch", "BatchRequest", "BatchResponse"),
                                                ("/v1/feedback", "FeedbackRequest", "FeedbackResponse")]:
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{request_model}"
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{response_model}"
        assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
        assert request_model in schemas and response_model in schemas
    assert set(schemas["ParseRequest"]["properties"]) == {"text", "user_id", "request_id"}
    assert {"intent", "intents", "slots", "fallback"} <= set(schemas["ParseResponse"]["required"])
    docs = requests.get(f"{endpoint}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def _declare(models, tmp_path, weights, **settings) -> str:
    """Apply a Serve config with `serve run CONFIG --non-blocking`, as a user updates a running cluster
    (a config deploy is what lets Serve apply a changed user_config in place); returns the app's URL path."""
    import subprocess
    import sys
    from pathlib import Path

    import ray
    import yaml
    from ray import serve

    config = {"applications": [{
        "name": "declared", "route_prefix": "/declared", "import_path": "atm_ray.serve.app:build_app",
        "args": {"arms": [{"name": "A", "model_dir": models["A"]}, {"name": "B", "model_dir": models["B"]}],
                 "salt": "test", "max_batch_size": 8, **settings},
        "deployments": [{"name": "NluService", "user_config": {"weights": {"A": weights[0], "B": weights[1]}}}],
    }]}
    path = tmp_path / f"serve-{weights[0]}-{weights[1]}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "serve"), "run", str(path), "--non-blocking", "--address", ray.get_runtime_context().gcs_address]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        application = serve.status().applications.get("declared")
        if application is not None and application.status == "RUNNING":
            deployment = application.deployments["NluService"]
            if deployment.status == "HEALTHY" and sum(deployment.replica_states.values()) == settings.get("num_replicas", 1):
                return "/declared"
        time.sleep(0.5)
    raise AssertionError(f"the declared app did not become healthy: {serve.status().applications.get('declared')}")


@pytest.mark.slow
def test_ab_state_survives_replicas_restarts_redeploys_and_new_splits(endpoint, nlu_models, tmp_path):
    """Two replicas: feedback is accepted whichever replica parsed the request; a new split arrives through
    the Serve config's user_config without restarting replicas or losing counts; a killed ledger and a
    deleted-and-redeployed app come back with every count and verdict from state_dir."""
    import ray
    from ray import serve

    state = tmp_path / "ab-state"
    settings = {"num_replicas": 2, "num_cpus": 0.25, "state_dir": str(state), "persist_s": 0.2}
    url = endpoint + _declare(nlu_models, tmp_path, (90, 10), **settings)
    try:
        replicas = _replica_names("declared")
        assert len(replicas) == 2
        ids = [_post(f"{url}/v1/parse", {"text": f"wake me up at {index} am"}, headers={"x-atm-arm": "A"}).json()["request_id"]
               for index in range(1, 21)]
        verdicts = [_post(f"{url}/v1/feedback", {"request_id": request_id, "satisfied": index % 4 != 0})
                    for index, request_id in enumerate(ids)]
        assert [response.status_code for response in verdicts] == [200] * 20, [response.text for response in verdicts if response.status_code != 200]

        def counts():
            arm = requests.get(f"{url}/v1/ab/report", timeout=10).json()["arms"]["A"]
            return arm["requests"], arm["feedback"]["satisfied"], arm["feedback"]["dissatisfied"]

        assert counts() == (20, 15, 5)

        _declare(nlu_models, tmp_path, (50, 50), **settings)  # only user_config changes
        assert _replica_names("declared") == replicas  # applied in place: no replica restarted
        for _ in range(10):  # every replica answers with the new split
            shares = {arm["name"]: arm["share"] for arm in requests.get(f"{url}/v1/models", timeout=10).json()["arms"]}
            assert shares == {"A": 0.5, "B": 0.5}
        assert counts() == (20, 15, 5)
        users = [f"user-{index}" for index in range(300)]
        arms = Counter(_post(f"{url}/v1/parse", {"text": "play music", "user_id": user}).json()["arm"] for user in users)
        assert abs(arms["B"] / len(users) - 0.5) < 0.1, arms
        expected = (20 + arms["A"], 15, 5)
        assert counts() == expected

        time.sleep(1.0)  # past persist_s: the ledger has written its state
        def ledgers():
            return [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                    if entry["namespace"] == "serve" and "declared#AbLedger" in entry["name"]]

        (killed,) = ledgers()
        ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
        # ray.kill only asks, and the old ledger may answer for a moment: done when Serve has started
        # another ledger replica (it reads state_dir) and the report answers
        deadline, answers = time.time() + 120, []
        while time.time() < deadline:
            started = time.perf_counter()
            response = requests.get(f"{url}/v1/ab/report", timeout=30)
            answers.append((response.status_code, round(time.perf_counter() - started, 2)))
            # meanwhile: a quick 503 that says when to retry, never a 500 or a request left hanging
            assert response.status_code in (200, 503) and answers[-1][1] < 3.0 + 2.0, (answers, response.text)
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "ab_ledger_unavailable" and response.headers["retry-after"]
            elif [name for name in ledgers() if name != killed]:
                break
            time.sleep(0.5)
        assert answers[-1][0] == 200 and [name for name in ledgers() if name != killed], answers
        assert counts() == expected

        time.sleep(1.0)
        serve.delete("declared")
        _declare(nlu_models, tmp_path, (50, 50), **settings)
        assert counts() == expected
        assert _post(f"{url}/v1/feedback", {"request_id": ids[0], "satisfied": True}).status_code == 409  # verdicts kept
        assert json.loads((state / "ab_ledger.json").read_text())["version"] == 1
    finally:
        serve.delete("declared")


@pytest.mark.slow
def test_cli_serve_stops_cleanly_on_sigterm(nlu_models, tmp_path):
    """`atm-ray serve` (its own local Ray, HAProxy ingress by default) answers, logs no line per request,
    and exits 0 on SIGTERM, after which its A/B state is on disk."""
    import signal
    import subprocess
    import sys

    port = free_port()
    log = tmp_path / "serve.log"
    environment = clean_environment()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "atm_ray.cli", "serve", "--model", f"A={nlu_models['A']}", "--port", str(port),
             "--state-dir", str(tmp_path / "state")],
            stdout=handle, stderr=subprocess.STDOUT, env=environment,
        )
    try:
        deadline, ready = time.time() + 300, False
        while not ready and time.time() < deadline and process.poll() is None:
            time.sleep(1)
            ready = "serving on http" in log.read_text()
        assert ready, log.read_text()[-3000:]
        codes = [_post(f"http://127.0.0.1:{port}/v1/parse", {"text": f"play track {index}"}).status_code for index in range(30)]
        assert codes == [200] * 30, log.read_text()[-3000:]
        time.sleep(3)  # the ledger's records arrive and are written (persist_s)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "ingress: haproxy" in output and "stopped" in output.splitlines(), output[-3000:]
    assert "Aborted" not in output and "Traceback" not in output, output[-3000:]
    assert sum("/v1/parse" in line for line in output.splitlines()) <= 1, output[-3000:]  # only the "serving on" line
    assert json.loads((tmp_path / "state" / "ab_ledger.json").read_text())["requests"] == {"A": 30}


def test_a_missing_haproxy_binary_is_named_with_the_way_out(monkeypatch, tmp_path):
    from atm_ray.config import AtmRayError
    from atm_ray.serve.app import haproxy_binary, set_ingress

    assert haproxy_binary()  # this environment has the binary that ray[serve] brings
    broken = tmp_path / "haproxy"
    broken.write_text("not a program")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(broken))
    with pytest.raises(AtmRayError, match="--ingress proxy") as caught:
        set_ingress("haproxy")
    assert str(broken) in str(caught.value)
    with pytest.raises(AtmRayError, match="ingress must be one of"):
        set_ingress("nginx")


def test_haproxy_side_ports_move_when_taken(monkeypatch):
    """HAProxy's fixed metrics (9101) and stats (8404) ports: taken by another Serve on the machine, the
    next one gets free ports instead of an HAProxy that exits at start."""
    import os

    from atm_ray.serve.app import set_ingress

    for name in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_ENABLE_HA_PROXY",
                 "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    held = []
    for port in (9101, 8404):
        handle = socket.socket()
        try:
            handle.bind(("0.0.0.0", port))
            held.append(handle)
        except OSError:
            handle.close()  # already taken (a Serve of this test session): just as good
    try:
        set_ingress("haproxy")
    finally:
        for handle in held:
            handle.close()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]) not in (9101, 8404)
    assert int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]) not in (9101, 8404)
