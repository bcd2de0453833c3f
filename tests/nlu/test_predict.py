"""Batch prediction over files: formats, malformed lines by number, the answers the Parser gives, and
the same answers through Ray Data's actor pool."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atm_ray.cli import main
from atm_ray.config import AtmRayError
from atm_ray.nlu.model import Parser
from atm_ray.nlu.predict import predict_file, read_utterances

UTTERANCES = ["play some jazz", "set an alarm for 7 am", "what is the weather in paris", "book a table for two"]


def _text_file(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_malformed_lines_are_named_by_line_in_every_format(tmp_path):
    text = _text_file(tmp_path / "in.txt", [b"play some jazz", b"", b"caf\xe9 au lait", b"book a table"])
    rows, problems = read_utterances(text, "skip")
    assert [row["line"] for row in rows] == [1, 4]
    assert problems == [f"{text}:2: empty line", f"{text}:3: not UTF-8 (invalid continuation byte at byte 3)"]
    with pytest.raises(AtmRayError, match=rf"{text}:2: empty line"):
        read_utterances(text, "fail")

    jsonl = _text_file(tmp_path / "in.jsonl", [b'{"text": "play some jazz"}', b'{"text": 3}', b'{"utterance": "x"}',
                                               b"{oops", b'{"text": "\\ud800"}', b'["text"]', b'{"text": "  "}',
                                               b'{"text": "set an alarm", "id": 7}'])
    rows, problems = read_utterances(jsonl, "skip")
    assert [(row["line"], row["text"]) for row in rows] == [(1, "play some jazz"), (8, "set an alarm")]
    assert [problem.split(": ", 1)[0] for problem in problems] == [f"{jsonl}:{line}" for line in (2, 3, 4, 5, 6, 7)]
    assert "not JSON" in problems[2] and "lone surrogate" in problems[3] and "empty utterance" in problems[5]

    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["play some jazz", None, "book a table"]}), parquet)
    rows, problems = read_utterances(parquet, "skip")
    assert [row["line"] for row in rows] == [1, 3] and problems == [f"{parquet}:2: 'text' is NoneType, not a string"]
    pq.write_table(pa.table({"utterance": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(AtmRayError, match="no 'text' column"):
        read_utterances(tmp_path / "other.parquet")
    with pytest.raises(AtmRayError, match="unknown format '.csv'"):
        read_utterances(_text_file(tmp_path / "in.csv", [b"x"]))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_answers_are_the_parsers_with_their_input_lines(nlu_models, tmp_path, suffix):
    source = _text_file(tmp_path / "in.txt", [text.encode() for text in UTTERANCES[:2]] + [b""] + [text.encode() for text in UTTERANCES[2:]])
    summary = predict_file(nlu_models["A"], source, tmp_path / f"out{suffix}", on_error="skip", use_ray=False)
    assert summary.utterances == 4 and summary.skipped == [f"{source}:3: empty line"] and summary.utterances_per_second > 0
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    else:
        rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    expected = Parser(nlu_models["A"], quantize="int8", backend="onnxruntime").parse(UTTERANCES)  # predict's defaults
    assert [row["line"] for row in rows] == [1, 2, 4, 5] and [row["text"] for row in rows] == UTTERANCES
    for row, wanted in zip(rows, expected):
        assert row["intent"]["name"] == wanted["intent"]["name"] and row["fallback"] == wanted["fallback"]
        assert [slot["name"] for slot in row["slots"]] == [slot["name"] for slot in wanted["slots"]]
        assert [intent["name"] for intent in row["intents"]] == [intent["name"] for intent in wanted["intents"]]


def test_cli_stops_at_a_malformed_line_or_skips_it_by_flag(nlu_models, tmp_path, capsys):
    source = _text_file(tmp_path / "in.jsonl", [b'{"text": "play some jazz"}', b"not json"])
    output = tmp_path / "out.jsonl"
    assert main(["predict", "--model", nlu_models["A"], "--input", str(source), "--output", str(output)]) == 2
    assert f"{source}:2: not JSON" in capsys.readouterr().err and not output.exists()
    assert main(["predict", "--model", nlu_models["A"], "--input", str(source), "--output", str(output), "--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "predicted 1 utterances" in printed and f"{source}:2: not JSON" in printed
    assert len(output.read_text().splitlines()) == 1


@pytest.mark.slow
def test_ray_data_actor_pool_gives_the_same_answers(nlu_models, tmp_path, local_ray):
    texts = [UTTERANCES[index % len(UTTERANCES)] + f" number {index}" for index in range(300)]
    source = _text_file(tmp_path / "in.txt", [text.encode() for text in texts])
    # fp32: int8's dynamic quantisation scales activations per batch, so answers depend on batch-mates
    here = predict_file(nlu_models["A"], source, tmp_path / "here.jsonl", use_ray=False, quantize=None)
    with_ray = predict_file(nlu_models["A"], source, tmp_path / "ray.jsonl", use_ray=True, actors=2, batch_size=32, quantize=None)
    assert here.utterances == with_ray.utterances == 300 and with_ray.runner.startswith("Ray Data")
    here_rows = [json.loads(line) for line in (tmp_path / "here.jsonl").read_text().splitlines()]
    ray_rows = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert [row["line"] for row in ray_rows] == list(range(1, 301))
    for mine, theirs in zip(here_rows, ray_rows):
        assert mine["text"] == theirs["text"] and mine["intent"]["name"] == theirs["intent"]["name"]
        assert mine["intent"]["confidence"] == pytest.approx(theirs["intent"]["confidence"], abs=1e-4)
        assert [slot["value"] for slot in mine["slots"]] == [slot["value"] for slot in theirs["slots"]]
