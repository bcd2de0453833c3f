"""The ONNX Runtime backend (the CPU default of `atm-ray serve` and `atm-ray predict`) against torch, the
reference: same logits in fp32 on padded batches, accuracy parity in int8, and one export per weights."""

import sys

import numpy as np
import pytest
import torch

from atm_ray.config import AtmRayError
from atm_ray.data.files import resolve
from atm_ray.data.readers import read_nlu
from atm_ray.nlu.metrics import nlu_scores
from atm_ray.nlu.model import Parser, encode_words

SNIPS = "bundled:nlu/snips"


def test_fp32_graph_gives_torchs_logits_on_padded_batches(nlu_models):
    reference, exported = Parser(nlu_models["A"]), Parser(nlu_models["A"], backend="onnxruntime")
    records, _ = read_nlu("jointbert", resolve(f"{SNIPS}/test"))
    # rows of different lengths in one batch: the graph must keep the attention mask's effect
    words = [record["tokens"] for record in records[:48]]
    inputs, _ = encode_words(reference.tokenizer, words, 64, reference.model.config.lowercase)
    assert (inputs["attention_mask"] == 0).any()
    tensors = {name: torch.from_numpy(array) for name, array in inputs.items()}
    with torch.inference_mode():
        wanted = reference.model(**tensors)
    got = exported.model(**inputs)  # NumPy in and out
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(got.intent_logits, wanted.intent_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.slot_logits[real], wanted.slot_logits.numpy()[real], atol=1e-4)


def test_int8_keeps_accuracy_and_each_model_is_exported_once(nlu_models):
    records, _ = read_nlu("jointbert", resolve(f"{SNIPS}/test"))
    words = [record["tokens"] for record in records]
    full = nlu_scores(records, Parser(nlu_models["A"]).predict(words))
    int8 = Parser(nlu_models["A"], quantize="int8", backend="onnxruntime")
    scores = nlu_scores(records, int8.predict(words))
    print(f"torch fp32 vs onnxruntime int8 on SNIPS test: exact match {full['exact_match']:.4f} / {scores['exact_match']:.4f}")
    for metric in ("intent_accuracy", "slot_f1", "exact_match"):
        assert abs(full[metric] - scores[metric]) <= 0.01, (metric, full[metric], scores[metric])

    path, written = int8.model.path, int8.model.path.stat().st_mtime_ns
    assert path.name.endswith(".int8.onnx") and path.stat().st_size < 0.5 * Parser(nlu_models["A"], backend="onnxruntime").model.path.stat().st_size
    again = Parser(nlu_models["A"], quantize="int8", backend="onnxruntime")
    assert again.model.path == path and path.stat().st_mtime_ns == written  # from the cache, not exported again
    other = Parser(nlu_models["B"], quantize="int8", backend="onnxruntime")  # other weights, another graph
    assert other.model.path != path and other.parse(["play some jazz"])[0]["intent"]["name"] in other.intents


def test_a_cache_that_cannot_be_written_falls_back_to_a_temporary_folder(nlu_models, monkeypatch, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("ATM_RAY_CACHE", str(blocked))  # mkdir under a file fails, as under a read-only home
    parser = Parser(nlu_models["A"], backend="onnxruntime")
    assert parser.model.path.is_file() and not parser.model.path.is_relative_to(blocked)
    assert "cannot write the ONNX cache" in caplog.text and parser.parse(["play some jazz"])[0]["intent"]["name"] in parser.intents


def test_a_missing_onnxruntime_or_a_gpu_names_the_way_out(nlu_models, monkeypatch):
    with pytest.raises(AtmRayError, match="cuda.*use backend 'torch'"):
        Parser(nlu_models["A"], device="cuda", backend="onnxruntime")
    with pytest.raises(AtmRayError, match="backend must be one of"):
        Parser(nlu_models["A"], backend="tensorrt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the package gives
    with pytest.raises(AtmRayError, match="pip install onnxruntime onnx.*--backend torch"):
        Parser(nlu_models["A"], backend="onnxruntime")
