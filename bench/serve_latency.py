"""Serving latency and throughput on loopback, bounded, in one run:

1. the in-process ``Parser`` at batch 1 (the floor);
2. the Ray Serve app over HTTP: 1 client (p50, p99) and 16 clients (req/s, p99);
3. a plain single-process FastAPI + uvicorn app serving the same model (what a user would otherwise write);
4. the A/B layer's cost: the same Serve app with one arm against two arms (90:10), and the router + ledger
   bookkeeping per request measured in process.

    python bench/serve_latency.py                          # a 17M-parameter model (the paper's final shape)
    python bench/serve_latency.py --model runs/tiny/finetune_student/export

Without ``--model`` it builds a fine-tuning export of the ``paper`` preset's ``final`` shape (17M
non-embedding parameters) with random weights, a tokenizer trained on SNIPS and SNIPS label maps: latency
does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

TEXTS = ["add this song to my workout playlist", "play some jazz by miles davis on spotify",
         "what will the weather be in paris tomorrow", "book a table for two at seven pm",
         "rate this book four out of six", "find the movie schedule for tonight"]


def build_model(directory: Path) -> Path:
    from atm_ray.config import load_config
    from atm_ray.data.files import resolve
    from atm_ray.data.readers import read_nlu
    from atm_ray.modeling import build_masked_lm
    from atm_ray.nlu import build_joint_model, label_maps
    from atm_ray.tokenizer import train_tokenizer

    records, _ = read_nlu("jointbert", resolve("bundled:nlu/snips/train"))
    tokenizer = train_tokenizer([" ".join(record["tokens"]) for record in records], vocab_size=4000)
    shape = load_config("paper").models["final"]
    encoder = directory / "encoder"
    build_masked_lm(shape.model_copy(update={"dropout": 0.0}), len(tokenizer), seed=0).save_pretrained(str(encoder))
    tokenizer.save_pretrained(str(encoder))
    intents, slots = label_maps(records)
    model = build_joint_model(encoder, intents, slots, lowercase=True)
    export = directory / "export"
    model.save_pretrained(str(export))
    tokenizer.save_pretrained(str(export))
    return export


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"p50_ms": 1000 * ordered[len(ordered) // 2], "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def in_process(model: Path, count: int, quantize: str | None = None) -> dict:
    import torch

    from atm_ray.nlu import Parser

    torch.set_num_threads(1)
    parser = Parser(model, quantize=quantize)
    for text in TEXTS:
        parser.parse([text])
    times = []
    for index in range(count):
        started = time.perf_counter()
        parser.parse([TEXTS[index % len(TEXTS)]])
        times.append(time.perf_counter() - started)
    return percentiles(times)


def http_load(url: str, sequential: int, concurrent: int, clients: int = 16) -> dict:
    session = requests.Session()
    for text in TEXTS:
        session.post(url, json={"text": text}, timeout=30).raise_for_status()
    times, inside = [], []
    for index in range(sequential):
        started = time.perf_counter()
        response = session.post(url, json={"text": TEXTS[index % len(TEXTS)], "user_id": f"u{index}"}, timeout=30)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
        if "latency_ms" in response.json():
            inside.append(response.json()["latency_ms"] / 1000)
    one = percentiles(times)
    if inside:
        one["in_replica_p50_ms"] = percentiles(inside)["p50_ms"]
    sessions = [requests.Session() for _ in range(clients)]

    def call(index: int) -> float:
        started = time.perf_counter()
        sessions[index % clients].post(url, json={"text": TEXTS[index % len(TEXTS)], "user_id": f"c{index}"}, timeout=30).raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        loaded = list(pool.map(call, range(concurrent)))
    elapsed = time.perf_counter() - started
    return {"one_client": one, "clients": clients, "requests_per_second": concurrent / elapsed, "loaded": percentiles(loaded)}


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


PLAIN_APP = '''
import sys, torch
from fastapi import FastAPI, Request
from atm_ray.nlu import Parser
torch.set_num_threads(1)
parser = Parser(sys.argv[1])
app = FastAPI()

@app.post("/v1/parse")
async def parse(request: Request):
    body = await request.json()
    return parser.parse([body["text"]])[0]

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
'''


def plain_fastapi(model: Path, sequential: int, concurrent: int) -> dict:
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(PLAIN_APP)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen([sys.executable, handle.name, str(model), str(port)], env=environment)
    try:
        url = f"http://127.0.0.1:{port}/v1/parse"
        deadline = time.time() + 120
        while True:
            try:
                requests.post(url, json={"text": "hi"}, timeout=5)
                break
            except requests.ConnectionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        return http_load(url, sequential, concurrent)
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(handle.name)


def serve_app(model: Path, arms: int, sequential: int, concurrent: int, batch: int, quantize: str | None = None) -> dict:
    from ray import serve

    from atm_ray.serving import build_app

    arm_list = [{"name": "A", "model_dir": str(model), "weight": 90}]
    if arms == 2:
        arm_list.append({"name": "B", "model_dir": str(model), "weight": 10})
    serve.run(build_app({"arms": arm_list, "max_batch_size": batch, "num_cpus": 1, "quantize": quantize}), name="bench", route_prefix="/")
    try:
        result = http_load(f"{SERVE_URL}/v1/parse", sequential, concurrent)
        batches = requests.get(f"{SERVE_URL}/v1/ab/report", timeout=30).json()["arms"]["A"]["batches"]
        return {**result, "batches_arm_A": batches}
    finally:
        serve.delete("bench")


def ab_bookkeeping(count: int = 100_000) -> float:
    """Microseconds per request of routing by user id and recording the request for the report."""
    from atm_ray.ab import Arm, ArmRouter, Ledger

    router = ArmRouter([Arm("A", "", 90), Arm("B", "", 10)], salt="bench")
    ledger = Ledger(["A", "B"])
    started = time.perf_counter()
    pending = []
    for index in range(count):
        arm = router.assign(f"user-{index}")
        pending.append({"kind": "request", "arm": arm, "request_id": str(index), "latency_ms": 1.0, "intent": "x"})
        if len(pending) == 64:
            ledger.record(pending)
            pending = []
    return (time.perf_counter() - started) / count * 1e6


SERVE_URL = ""


def main() -> None:
    global SERVE_URL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=800)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or build_model(Path(scratch))
        from ray import serve

        from atm_ray.stages import init_ray

        results = {"model": str(args.model or "paper final shape, random weights")}
        for quantize in (None, "int8"):
            results[f"in_process_{quantize or 'fp32'}"] = in_process(model, args.sequential, quantize)
            print(f"in-process Parser ({quantize or 'fp32'}), batch 1:", results[f"in_process_{quantize or 'fp32'}"], flush=True)
        results["plain_fastapi"] = plain_fastapi(model, args.sequential, args.concurrent)
        print("plain FastAPI + uvicorn (fp32):", results["plain_fastapi"], flush=True)
        init_ray()
        port = free_port()
        SERVE_URL = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, arms, quantize in (("serve_1_arm", 1, None), ("serve_2_arm", 2, None), ("serve_2_arm_int8", 2, "int8")):
            results[name] = serve_app(model, arms, args.sequential, args.concurrent, args.max_batch_size, quantize)
            print(f"{name}:", results[name], flush=True)
        serve.shutdown()
    results["ab_bookkeeping_us"] = ab_bookkeeping()
    floor = results["in_process_fp32"]["p50_ms"]
    serve_one, serve_two, plain = results["serve_1_arm"], results["serve_2_arm"], results["plain_fastapi"]
    print("\nsummary (loopback; fp32 unless int8 is named):")
    print(f"  in-process p50 {floor:.2f} ms (int8 {results['in_process_int8']['p50_ms']:.2f} ms); Serve 1 client p50 "
          f"{serve_two['one_client']['p50_ms']:.2f} ms (+{serve_two['one_client']['p50_ms'] - floor:.2f} ms; in the replica "
          f"{serve_two['one_client']['in_replica_p50_ms']:.2f} ms), p99 {serve_two['one_client']['p99_ms']:.2f} ms")
    print(f"  16 clients: Serve {serve_two['requests_per_second']:.0f} req/s (p99 {serve_two['loaded']['p99_ms']:.1f} ms, "
          f"mean batch {serve_two['batches_arm_A']['mean_size']:.1f}), int8 {results['serve_2_arm_int8']['requests_per_second']:.0f} req/s "
          f"(p99 {results['serve_2_arm_int8']['loaded']['p99_ms']:.1f} ms); plain FastAPI {plain['requests_per_second']:.0f} req/s "
          f"(p99 {plain['loaded']['p99_ms']:.1f} ms): Serve / plain {serve_two['requests_per_second'] / plain['requests_per_second']:.2f}x")
    print(f"  1 client: Serve p50 / plain FastAPI p50 = {serve_two['one_client']['p50_ms'] / plain['one_client']['p50_ms']:.2f}x")
    print(f"  A/B layer: 2 arms vs 1 arm p50 {serve_two['one_client']['p50_ms'] - serve_one['one_client']['p50_ms']:+.2f} ms; "
          f"routing + recording {results['ab_bookkeeping_us']:.1f} us per request in process")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
