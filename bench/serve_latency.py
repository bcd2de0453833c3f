"""Serving against the machine's own ceiling, in one run (loopback, bounded):

1. in process, same backend and threads as a replica: the raw model forward at batch 1, ``Parser.parse``
   at batch 1 (the floor) and at batch 16 (the batched ceiling, utterances/s), for the served backend
   (default ONNX Runtime int8, as ``atm-ray serve``) and for torch fp32 and int8;
2. the Ray Serve app driven by ``wrk`` (a C load generator: a Python client would eat the cores it
   measures): 1 connection (p50, p99) and 16 connections (req/s, p99), with Ray's HAProxy ingress
   (high-throughput mode, the default) and with Serve's Python proxy;
3. the A/B layer (one arm against two arms, 90:10) and the replica layout (2 replicas x 1 thread against
   1 replica x 2 threads).

It ends with the ratios the serving goals are stated in (issue 14) and whether each is met.

    apt-get install wrk                                    # Debian; the benchmark needs it
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
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from atm_ray.config import INFERENCE_BACKENDS  # noqa: E402
from atm_ray.serve.ab import WINDOW as LEDGER_WINDOW  # noqa: E402

TEXTS = ["add this song to my workout playlist", "play some jazz by miles davis on spotify",
         "what will the weather be in paris tomorrow", "book a table for two at seven pm",
         "rate this book four out of six", "find the movie schedule for tonight"]


def build_model(directory: Path) -> Path:
    from atm_ray.config import load_config
    from atm_ray.data.files import resolve
    from atm_ray.data.readers import read_nlu
    from atm_ray.train.modeling import build_masked_lm
    from atm_ray.nlu.model import build_joint_model, label_maps
    from atm_ray.data.tokenizer import train_tokenizer

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


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"p50_ms": 1000 * ordered[len(ordered) // 2], "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def in_process(model: Path, count: int, quantize: str | None, backend: str = "torch", threads: int = 1) -> dict:
    """The raw forward and the Parser at batch 1, and the Parser's batched ceiling (batches of 16)."""
    import torch

    from atm_ray.nlu.model import Parser

    torch.set_num_threads(threads)
    parser = Parser(model, quantize=quantize, backend=backend)
    inputs = [parser.encoder([text.split()])[0] for text in TEXTS]
    # what the backend takes (ONNX Runtime: NumPy arrays; torch: tensors)
    tensors = [encoded if getattr(parser.model, "takes_numpy", False) else {name: torch.from_numpy(array) for name, array in encoded.items()}
               for encoded in inputs]

    def forward(index):
        with torch.inference_mode():
            parser.model(**tensors[index % len(tensors)])

    def parse(index):
        parser.parse([TEXTS[index % len(TEXTS)]])

    for index in range(20):
        forward(index), parse(index)
    # interleaved, so that a shared machine's slow spells fall on both alike
    forward_times, parse_times = [], []
    for index in range(count):
        for function, times in ((forward, forward_times), (parse, parse_times)):
            started = time.perf_counter()
            function(index)
            times.append(time.perf_counter() - started)
    batch = [TEXTS[index % len(TEXTS)] for index in range(16)]
    rounds = max(count // 16, 10)
    started = time.perf_counter()
    for _ in range(rounds):
        parser.parse(batch)
    ceiling = rounds * 16 / (time.perf_counter() - started)
    return {"forward": percentiles(forward_times), "parse": percentiles(parse_times), "batched_utterances_per_s": ceiling}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local texts = {%s}
local index = 0
request = function()
  index = index + 1
  return wrk.format(nil, nil, nil, '{"text": "' .. texts[index %% #texts + 1] .. '", "user_id": "u' .. index .. '"}')
end
"""


def wrk(url: str, connections: int, seconds: int) -> dict:
    """wrk's throughput and latency percentiles (its own threads: 1 per 8 connections)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(WRK_SCRIPT % ", ".join(f'"{text}"' for text in TEXTS))
    threads = max(1, connections // 8)
    output = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", handle.name, url],
                            capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def milliseconds(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        return float(value) * units[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": milliseconds("50%"), "p99_ms": milliseconds("99%"), "non_2xx": int(errors.group(1)) if errors else 0}


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def serve_app(url: str, model: Path, seconds: int, arms: int = 1, replicas: int = 1, threads: int = 1, quantize: str | None = None,
              backend: str = "onnxruntime") -> dict:
    from ray import serve

    from atm_ray.serve.app import build_app

    arm_list = [{"name": "A", "model_dir": str(model), "weight": 90}]
    if arms == 2:
        arm_list.append({"name": "B", "model_dir": str(model), "weight": 10})
    serve.run(build_app({"arms": arm_list, "num_replicas": replicas, "torch_threads": threads, "num_cpus": threads * 0.5,
                         "quantize": quantize, "backend": backend}), name="bench", route_prefix="/")
    try:
        for text in TEXTS * 5:  # warm every replica
            requests.post(f"{url}/v1/parse", json={"text": text}, timeout=30).raise_for_status()
        one = wrk(f"{url}/v1/parse", 1, seconds)
        before = batch_totals(url)
        loaded = wrk(f"{url}/v1/parse", 16, seconds)
        after = batch_totals(url)
        # the 16-connection run's own batches (the 1-connection run's batches of 1 would dilute the mean);
        # the ledger keeps the last WINDOW batch sizes, so a long run's difference would be wrong: none then
        mean_batch = (after[1] - before[1]) / max(after[0] - before[0], 1) if after[0] < LEDGER_WINDOW else None
        return {"one_connection": one, "sixteen_connections": loaded, "mean_batch_arm_A_16_connections": mean_batch}
    finally:
        serve.delete("bench")


def batch_totals(url: str) -> tuple[int, float]:
    """Arm A's batches so far, from the A/B report: (count, utterances)."""
    batches = requests.get(f"{url}/v1/ab/report", timeout=30).json()["arms"]["A"]["batches"]
    return batches["count"], batches["count"] * (batches["mean_size"] or 0)


def start_serve(ingress: str) -> str:
    import ray
    from ray import serve

    from atm_ray.serve.app import set_ingress
    from atm_ray.cluster import init_ray

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        os.environ.pop(name, None)
    set_ingress(ingress)
    init_ray(dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING", "enable_access_log": False})
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--count", type=int, default=300, help="in-process calls per measurement")
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--quantize", choices=("int8", "none"), default="int8", help="the quantisation measured through Serve")
    parser.add_argument("--backend", choices=INFERENCE_BACKENDS, default="onnxruntime", help="the backend measured through Serve")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--in-process-only", action="store_true", help="only the in-process measurements (no Ray)")
    args = parser.parse_args()
    # as in the replicas (atm_ray.cluster.init_ray): tokenizers' Rust thread pool would compete with the model
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian/Ubuntu)")
    quantize = None if args.quantize == "none" else args.quantize
    served = {"backend": args.backend, "quantize": quantize}
    results: dict = {"model": str(args.model or "paper final shape, random weights"), "serve_backend": f"{args.backend} {args.quantize}"}
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or build_model(Path(scratch))
        for name, options in (("serve", served), ("fp32", {"backend": "torch", "quantize": None}),
                              ("int8", {"backend": "torch", "quantize": "int8"})):
            results[f"in_process_{name}"] = in_process(model, args.count, **options)
            print(f"in process, {name} ({options}), 1 thread:", results[f"in_process_{name}"], flush=True)
        results["in_process_2_threads"] = in_process(model, args.count, **served, threads=2)
        print(f"in process, {results['serve_backend']}, 2 threads:", results["in_process_2_threads"], flush=True)
        if args.in_process_only:
            return
        url = start_serve("haproxy")
        for name, options in (("haproxy_1_arm", {}), ("haproxy_2_arms", {"arms": 2}),
                              ("haproxy_2_replicas_x_1_thread", {"replicas": 2}), ("haproxy_1_replica_x_2_threads", {"threads": 2})):
            results[name] = serve_app(url, model, args.seconds, **served, **options)
            print(f"{name}:", results[name], flush=True)
        url = start_serve("proxy")
        results["proxy_1_arm"] = serve_app(url, model, args.seconds, **served)
        print("proxy_1_arm:", results["proxy_1_arm"], flush=True)
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    summarize(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def summarize(results: dict) -> None:
    backend = results["serve_backend"]
    floor = results["in_process_serve"]
    one, two, pair = results["haproxy_1_arm"], results["haproxy_2_arms"], results["haproxy_2_replicas_x_1_thread"]
    overhead = floor["parse"]["p50_ms"] / floor["forward"]["p50_ms"] - 1
    goals = [
        ("1-connection p50 <= in-process batch-1 p50 + 2 ms", f"{one['one_connection']['p50_ms']:.2f} vs {floor['parse']['p50_ms']:.2f} + 2 ms",
         one["one_connection"]["p50_ms"] <= floor["parse"]["p50_ms"] + 2),
        ("16-connection throughput >= 0.85 x in-process batched ceiling", f"{one['sixteen_connections']['requests_per_second']:.0f} / "
         f"{floor['batched_utterances_per_s']:.0f} = {one['sixteen_connections']['requests_per_second'] / floor['batched_utterances_per_s']:.2f}",
         one["sixteen_connections"]["requests_per_second"] >= 0.85 * floor["batched_utterances_per_s"]),
        ("16-connection p99 <= 100 ms", f"{one['sixteen_connections']['p99_ms']:.1f} ms", one["sixteen_connections"]["p99_ms"] <= 100),
        # `atm-ray serve`'s layout uses both cores: its ceiling is the in-process Parser with 2 threads
        ("default layout (2 replicas x 1 thread) at 16 connections >= 0.85 x the 2-thread ceiling",
         f"{pair['sixteen_connections']['requests_per_second']:.0f} / {results['in_process_2_threads']['batched_utterances_per_s']:.0f} = "
         f"{pair['sixteen_connections']['requests_per_second'] / results['in_process_2_threads']['batched_utterances_per_s']:.2f}, "
         f"p99 {pair['sixteen_connections']['p99_ms']:.1f} ms",
         pair["sixteen_connections"]["requests_per_second"] >= 0.85 * results["in_process_2_threads"]["batched_utterances_per_s"]),
        ("two A/B arms vs one <= 1 ms at p50", f"{two['one_connection']['p50_ms'] - one['one_connection']['p50_ms']:+.2f} ms",
         two["one_connection"]["p50_ms"] - one["one_connection"]["p50_ms"] <= 1),
        ("Parser.parse over the raw forward <= 15% at batch 1", f"{100 * overhead:+.1f}%", overhead <= 0.15),
    ]
    print(f"\nsummary ({results['model']}; Serve backend {backend}, 1 thread per replica unless said; loopback; wrk):")
    print(f"  in process: forward p50 {floor['forward']['p50_ms']:.2f} ms, Parser p50 {floor['parse']['p50_ms']:.2f} ms, batched "
          f"{floor['batched_utterances_per_s']:.0f} utt/s; fp32 Parser p50 {results['in_process_fp32']['parse']['p50_ms']:.2f} ms / "
          f"{results['in_process_fp32']['batched_utterances_per_s']:.0f} utt/s, torch int8 {results['in_process_int8']['parse']['p50_ms']:.2f} ms / "
          f"{results['in_process_int8']['batched_utterances_per_s']:.0f} utt/s")
    for name in ("haproxy_1_arm", "haproxy_2_arms", "haproxy_2_replicas_x_1_thread", "haproxy_1_replica_x_2_threads", "proxy_1_arm"):
        row = results[name]
        print(f"  {name:32s} 1 conn p50 {row['one_connection']['p50_ms']:6.2f} ms p99 {row['one_connection']['p99_ms']:6.2f} ms | 16 conn "
              f"{row['sixteen_connections']['requests_per_second']:6.0f} req/s p99 {row['sixteen_connections']['p99_ms']:6.1f} ms "
              f"(mean batch {row['mean_batch_arm_A_16_connections'] or float('nan'):.1f}, non-2xx {row['sixteen_connections']['non_2xx']})")
    print("goals:")
    for goal, measured, met in goals:
        print(f"  [{'met' if met else 'NOT met'}] {goal}: {measured}")


if __name__ == "__main__":
    main()
