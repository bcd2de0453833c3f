"""Batch prediction over a file: ``atm-ray predict --model DIR --input FILE --output FILE``.

Input: plain text (one utterance per line), JSONL (a ``text`` field per line) or Parquet (a ``text``
column). Output (JSONL or Parquet, by its extension): one row per utterance with its input line and the
endpoint's fields (``intent``, ``intents``, ``slots``, ``fallback``). A malformed line (not valid UTF-8 or
JSON, no ``text``, empty, unencodable) is an error naming the file and line, or, with ``on_error="skip"``,
reported with its line number and left out: never dropped silently.

Small files are parsed in this process; large ones (or ``use_ray=True``) go through Ray Data, with
``map_batches`` on a pool of model actors, one model per actor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from atm_ray.config import AtmRayError
from atm_ray.utils import atomic_output, atomic_write_text, is_encodable

logger = logging.getLogger(__name__)

# above this many utterances the default is Ray Data (a pool of actors); below, this process
RAY_THRESHOLD = 20_000
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class PredictSummary:
    output: Path
    utterances: int
    seconds: float
    runner: str  # this process, or Ray Data's actor pool
    skipped: list[str] = field(default_factory=list)  # "FILE:LINE: reason" of each malformed line

    @property
    def utterances_per_second(self) -> float:
        return self.utterances / self.seconds if self.seconds > 0 else math.inf

    def summary(self) -> str:
        lines = [f"predicted {self.utterances} utterances in {self.seconds:.1f} s ({self.utterances_per_second:.0f}/s, "
                 f"{self.runner}) -> {self.output}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} malformed lines:")
            lines += [f"  {problem}" for problem in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def file_format(path: Path, field_name: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AtmRayError(f"{field_name} {path}: unknown format {path.suffix!r}; one of {sorted(FORMATS)}")
    return fmt


def read_utterances(path: Path, on_error: str = "fail") -> tuple[list[dict], list[str]]:
    """``[{"line": n, "text": ...}]`` (lines from 1; Parquet rows from 1) and the malformed lines skipped."""
    if on_error not in ("fail", "skip"):
        raise AtmRayError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    fmt = file_format(path, "--input")
    rows, problems = [], []

    def bad(line: int, reason: str) -> None:
        problem = f"{path}:{line}: {reason}"
        if on_error == "fail":
            raise AtmRayError(f"{problem} (--on-error skip leaves such lines out, reported)")
        problems.append(problem)

    def accept(line: int, text) -> None:
        if not isinstance(text, str):
            bad(line, f"'text' is {type(text).__name__}, not a string")
        elif not text.strip():
            bad(line, "empty utterance")
        elif not is_encodable(text):
            bad(line, "not valid Unicode text (a lone surrogate?)")
        else:
            rows.append({"line": line, "text": text})

    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise AtmRayError(f"--input {path}: no 'text' column (columns: {table.column_names})")
        for index, text in enumerate(table.column("text").to_pylist(), start=1):
            accept(index, text)
        return rows, problems
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                bad(number, f"not UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not line.strip():
                bad(number, "empty line")
                continue
            if fmt == "text":
                accept(number, line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                bad(number, f"not JSON ({error.msg}, column {error.colno})")
                continue
            if not isinstance(record, dict) or "text" not in record:
                bad(number, "no 'text' field")
                continue
            accept(number, record["text"])
    return rows, problems


class ParseBatch:
    """Ray Data's model actor: one ``Parser`` per actor, a batch of utterances per call."""

    def __init__(self, model_dir: str, quantize: str | None, top_k: int, threads: int, backend: str):
        import torch

        from atm_ray.nlu.model import Parser

        torch.set_num_threads(threads)
        self.parser = Parser(model_dir, quantize=quantize, top_k=top_k, backend=backend)

    def __call__(self, batch: dict) -> dict:
        results = self.parser.parse([str(text) for text in batch["text"]])
        # one JSON string per row: Arrow need not infer a schema for the nested answer
        return {"line": batch["line"], "text": batch["text"], "answer": [json.dumps(result) for result in results]}


def _parse_here(rows: list[dict], model_dir: Path, quantize: str | None, top_k: int, batch_size: int, backend: str) -> list[dict]:
    from tqdm import tqdm

    from atm_ray.nlu.model import Parser

    parser = Parser(model_dir, quantize=quantize, top_k=top_k, backend=backend)
    answers = []
    with tqdm(total=len(rows), desc="predict", unit="utt", disable=None) as progress:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            answers.extend(parser.parse([row["text"] for row in chunk]))
            progress.update(len(chunk))
    return [{**row, **answer} for row, answer in zip(rows, answers)]


def _parse_with_ray(rows: list[dict], model_dir: Path, quantize: str | None, top_k: int, batch_size: int, backend: str,
                    actors: int, threads: int, address: str | None) -> list[dict]:
    import ray.data

    from atm_ray.cluster import init_ray

    init_ray(address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own summary says how it went
    # a few large blocks: per-block scheduling and serialisation cost more than a small model's forward
    blocks = max(2 * actors, min(64, len(rows) // 2000))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        ParseBatch,
        fn_constructor_kwargs={"model_dir": str(model_dir.resolve()), "quantize": quantize, "top_k": top_k, "threads": threads,
                               "backend": backend},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,
    )
    predicted = [{"line": int(row["line"]), "text": str(row["text"]), **json.loads(row["answer"])} for row in dataset.iter_rows()]
    return sorted(predicted, key=lambda row: row["line"])


def write_predictions(rows: list[dict], output: Path) -> None:
    """JSONL or Parquet, written whole to a temporary file and renamed (never half a file)."""
    if file_format(output, "--output") == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_output(output) as temporary:
            pq.write_table(pa.Table.from_pylist(rows), temporary)
        return
    atomic_write_text(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def predict_file(
    model_dir: Path,
    input_path: Path,
    output: Path,
    *,
    use_ray: bool | None = None,
    on_error: str = "fail",
    quantize: str | None = "int8",
    backend: str = "onnxruntime",
    top_k: int = 3,
    batch_size: int = 64,
    actors: int = 2,
    threads_per_actor: int = 1,
    address: str | None = None,
) -> PredictSummary:
    """Parse every utterance of ``input_path`` and write the answers to ``output``; ``use_ray=None``
    picks Ray Data for large files (more than ``RAY_THRESHOLD`` utterances) or a given cluster."""
    model_dir, input_path, output = Path(model_dir), Path(input_path), Path(output)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (not a fine-tuned model folder)")
    file_format(output, "--output")
    rows, skipped = read_utterances(input_path, on_error)
    for problem in skipped:
        logger.warning("skipped %s", problem)
    if use_ray is None:
        use_ray = address is not None or len(rows) > RAY_THRESHOLD
    started = time.perf_counter()
    if not rows:
        predicted = []
    elif use_ray:
        predicted = _parse_with_ray(rows, model_dir, quantize, top_k, batch_size, backend, actors, threads_per_actor, address)
    else:
        predicted = _parse_here(rows, model_dir, quantize, top_k, batch_size, backend)
    seconds = time.perf_counter() - started
    write_predictions(predicted, output)
    runner = f"Ray Data, {actors} actors x {threads_per_actor} threads" if use_ray else "this process"
    return PredictSummary(output, len(predicted), seconds, runner, skipped)
