"""The Parser's ONNX Runtime backend, the fastest on a CPU (``bench/cpu_backends.py``: the 17M student's
dynamic int8 forward at batch 1 in 0.4-0.7x torch int8's time, the same batched throughput, exact match
within 0.14 points on SNIPS test).

The joint model is exported once per weights: the file is cached under ``ATM_RAY_CACHE`` (default
``~/.cache/atm-ray``) keyed by the SHA-256 of the model's config and weights and the torch/onnxruntime
versions, so replicas and restarts reuse it and a new model is never served with an old graph.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from atm_ray.config import AtmRayError
from atm_ray.utils import file_sha256, settings_hash

logger = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("intent_logits", "slot_logits")


class Logits(torch.nn.Module):
    """The joint model with plain tensor outputs (what the exporter traces)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return output.intent_logits, output.slot_logits


def cache_dir() -> Path:
    return Path(os.environ.get("ATM_RAY_CACHE") or Path.home() / ".cache" / "atm-ray") / "onnx"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise AtmRayError(
            "backend 'onnxruntime' needs the onnxruntime and onnx packages (`pip install onnxruntime onnx`); "
            "or choose the torch backend (--backend torch)"
        ) from error
    return onnxruntime


def model_key(model_dir: Path, quantize: str | None) -> str:
    """What the exported graph depends on: config, weights, quantisation and the exporting versions."""
    onnxruntime = _onnxruntime()
    paths = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors")), *sorted(model_dir.glob("*.bin"))]
    return settings_hash({"versions": [torch.__version__, onnxruntime.__version__], "quantize": quantize,
                          "files": {path.name: file_sha256(path) for path in paths}})


def export_onnx(model: torch.nn.Module, model_dir: Path, quantize: str | None) -> Path:
    """The ONNX file of ``model`` (loaded from ``model_dir``), from the cache or exported now (~2 s for 17M)."""
    suffix = ".int8.onnx" if quantize == "int8" else ".onnx"
    name = f"{model_key(model_dir, quantize)}{suffix}"
    target = cache_dir() / name
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only home (some containers): this process's own temporary folder
        target = Path(tempfile.mkdtemp(prefix="atm-ray-onnx-")) / name
        logger.warning("cannot write the ONNX cache %s (%s); exporting to %s (set ATM_RAY_CACHE to keep it)", cache_dir(), error, target.parent)
    # export into a private folder and rename: replicas starting together never read a half-written file
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        fp32 = Path(scratch) / "model.onnx"
        # a padded example row, so the graph keeps the attention mask's effect on padded batches
        example = (torch.full((2, 8), 5, dtype=torch.long), torch.tensor([[1] * 8, [1] * 5 + [0] * 3]))
        with warnings.catch_warnings():
            # torch's TorchScript exporter: 1.5 s and one self-contained file for the 17M student, where the
            # dynamo exporter takes 15 s and needs onnxscript for the same graph (same outputs to 1e-6). Its
            # warnings (deprecation, trace-time constants) do not apply to this fixed-control-flow model.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Logits(model).eval(), example, str(fp32), input_names=list(INPUTS), output_names=list(OUTPUTS), dynamo=False,
                dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                              "intent_logits": {0: "batch"}, "slot_logits": {0: "batch", 1: "length"}},
            )
        result = fp32
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            result = Path(scratch) / "model.int8.onnx"
            quiet = logging.getLogger()  # quantize_dynamic logs a pre-processing hint on the root logger
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                quantize_dynamic(str(fp32), str(result), weight_type=QuantType.QInt8)
            finally:
                quiet.setLevel(level)
        os.replace(result, target)
    return target


class OnnxJointModel:
    """Called like the torch joint model by ``predict_words``: ``model(input_ids=, attention_mask=)`` gives
    ``intent_logits`` and ``slot_logits``, as NumPy arrays in and out (``takes_numpy``)."""

    training = False
    takes_numpy = True

    def __init__(self, model: torch.nn.Module, model_dir: Path, quantize: str | None):
        onnxruntime = _onnxruntime()
        self.config = model.config
        self.path = export_onnx(model, model_dir, quantize)
        options = onnxruntime.SessionOptions()
        # as many threads as torch was given (the serve replica's torch_threads), and no spinning: idle
        # threads that spin would take the cores HAProxy and the other replicas need
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> SimpleNamespace:
        intent, slots = self.session.run(list(OUTPUTS), {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask)})
        return SimpleNamespace(intent_logits=intent, slot_logits=slots)
