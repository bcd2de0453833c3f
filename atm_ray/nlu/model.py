"""The joint intent + slot model, its word-level encoding, and ``Parser`` (the inference API Serve uses).

``RobertaPreLayerNormForIntentAndSlots`` is the pre-LN RoBERTa encoder with an intent head on the first
token and a slot head on every token; a word's slot is predicted from its first sub-word. Label maps and
text handling live in the model's config, so ``save_pretrained`` folders are self-contained.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormModel,
    RobertaPreLayerNormPreTrainedModel,
)
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging as hf_logging

from atm_ray.config import INFERENCE_BACKENDS, AtmRayError
from atm_ray.data.masking import IGNORE_INDEX
from atm_ray.nlu.metrics import slot_spans
from atm_ray.utils import is_encodable

UNKNOWN_LABEL = "<unknown>"  # index 0 of both label maps: dev/test labels never seen in training
WORD = re.compile(r"\S+")


@dataclass
class IntentSlotOutput(ModelOutput):
    loss: torch.Tensor | None = None
    intent_loss: torch.Tensor | None = None
    slot_loss: torch.Tensor | None = None
    intent_logits: torch.Tensor | None = None
    slot_logits: torch.Tensor | None = None


class IntentSlotsConfig(RobertaPreLayerNormConfig):
    """The encoder's config plus ``intent_labels``, ``slot_labels``, ``slot_loss_weight``, ``head_dropout``,
    ``intent_pooling`` (``first``: the first token's state; ``mean``: the mean over the utterance's tokens)
    and ``lowercase`` (whether training text was lower-case, so the parser lower-cases too). Its own
    ``model_type`` lets transformers' Auto classes find the joint model (see ``register_auto_classes``)."""

    model_type = "atm-ray-intent-slots"


class RobertaPreLayerNormForIntentAndSlots(RobertaPreLayerNormPreTrainedModel):
    """Encoder + intent head (first token) + slot head (every token); loss = intent CE + w · slot CE."""

    config_class = IntentSlotsConfig
    base_model_prefix = "roberta_prelayernorm"

    def __init__(self, config: RobertaPreLayerNormConfig):
        super().__init__(config)
        self.roberta_prelayernorm = RobertaPreLayerNormModel(config, add_pooling_layer=False)
        self.dropout = torch.nn.Dropout(config.head_dropout)
        self.intent_head = torch.nn.Linear(config.hidden_size, len(config.intent_labels))
        self.slot_head = torch.nn.Linear(config.hidden_size, len(config.slot_labels))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, intent_labels=None, slot_labels=None, **_) -> IntentSlotOutput:
        hidden = self.roberta_prelayernorm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = self.dropout(hidden)
        if getattr(self.config, "intent_pooling", "first") == "mean" and attention_mask is not None:
            # the mean over the utterance's tokens: a masked LM never trains its first token's output,
            # every other position it does
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        intent_logits = self.intent_head(pooled)
        slot_logits = self.slot_head(hidden)
        output = IntentSlotOutput(intent_logits=intent_logits, slot_logits=slot_logits)
        if intent_labels is not None and slot_labels is not None:
            output.intent_loss = torch.nn.functional.cross_entropy(intent_logits.float(), intent_labels)
            output.slot_loss = torch.nn.functional.cross_entropy(
                slot_logits.float().flatten(0, 1), slot_labels.flatten(), ignore_index=IGNORE_INDEX
            )
            output.loss = output.intent_loss + self.config.slot_loss_weight * output.slot_loss
        return output

    def encoder_parameters(self):
        return self.roberta_prelayernorm.parameters()


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModel`` load an atm-ray export as the joint model, without
    ``trust_remote_code``. Called at the end of this module, which ``atm_ray.hf_auto`` imports once
    transformers' Auto modules load in a process that imported ``atm_ray``."""
    AutoConfig.register(IntentSlotsConfig.model_type, IntentSlotsConfig, exist_ok=True)
    AutoModel.register(IntentSlotsConfig, RobertaPreLayerNormForIntentAndSlots, exist_ok=True)


def label_maps(records: list[dict]) -> tuple[list[str], list[str]]:
    """Intent and slot label lists from training records, each starting with ``UNKNOWN_LABEL``."""
    intents = sorted({record["intent"] for record in records})
    slots = sorted({tag for record in records for tag in record["slot_tags"]} | {"O"})
    return [UNKNOWN_LABEL] + intents, [UNKNOWN_LABEL] + slots


def build_joint_model(
    encoder_dir: str | Path,
    intent_labels: list[str],
    slot_labels: list[str],
    *,
    slot_loss_weight: float = 1.0,
    head_dropout: float = 0.1,
    intent_pooling: str = "first",
    lowercase: bool = False,
    scratch: bool = False,
    seed: int = 0,
) -> RobertaPreLayerNormForIntentAndSlots:
    """The joint model on the encoder saved in ``encoder_dir`` (a masked-LM export), or on the same
    architecture with random weights when ``scratch`` (the baseline)."""
    config_file = Path(encoder_dir) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if config_file.is_file() and model_type not in (RobertaPreLayerNormConfig.model_type, IntentSlotsConfig.model_type):
        # loading another architecture's weights into this one would only warn, and train from noise
        raise AtmRayError(
            f"{encoder_dir}: a {model_type} model; the joint model takes atm-ray's pre-LN RoBERTa encoders (its "
            "students and teachers). To use this model, distil a student from it: teachers.stage1="
            f"{encoder_dir} (README: Bringing your own teacher)"
        )
    encoder_config = RobertaPreLayerNormConfig.from_pretrained(str(encoder_dir))
    config = IntentSlotsConfig(**{key: value for key, value in encoder_config.to_dict().items() if key != "model_type"})
    config.architectures = [RobertaPreLayerNormForIntentAndSlots.__name__]
    config.update(
        {
            "intent_labels": intent_labels,
            "slot_labels": slot_labels,
            "slot_loss_weight": slot_loss_weight,
            "head_dropout": head_dropout,
            "intent_pooling": intent_pooling,
            "lowercase": lowercase,
            "id2label": dict(enumerate(intent_labels)),
            "label2id": {label: index for index, label in enumerate(intent_labels)},
        }
    )
    torch.manual_seed(seed)
    if scratch:
        return RobertaPreLayerNormForIntentAndSlots(config)
    # the load report lists the new heads and the unused masked-LM head, as expected; keep it quiet
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return RobertaPreLayerNormForIntentAndSlots.from_pretrained(str(encoder_dir), config=config, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)


class WordEncoder:
    """Word lists -> padded ``input_ids`` / ``attention_mask`` and, per utterance, the position of each
    word's first sub-word (-1 for words cut off by ``max_seq_len``).

    It calls the tokenizer's Rust backend (``tokenizers``) directly: at batch 1 the transformers wrapper
    around it (argument checks, special-token look-ups) cost as much as the encoding itself. Like the
    wrapper, it sets the backend's truncation on every call (0.4 µs; the backend is shared with the wrapper,
    which sets its own). The ids are the wrapper's (``tests/data/test_tokenizer.py`` compares them); a
    tokenizer without a Rust backend goes through the wrapper.
    """

    def __init__(self, tokenizer, max_seq_len: int, lowercase: bool = False):
        self.tokenizer, self.max_seq_len, self.lowercase = tokenizer, max_seq_len, lowercase
        self.pad_id = tokenizer.pad_token_id
        self.backend = getattr(tokenizer, "backend_tokenizer", None)

    @classmethod
    def for_model(cls, tokenizer, config) -> "WordEncoder":
        """The encoder for a joint model's config (its length, its lower-casing)."""
        # RoBERTa's positions start after the padding id
        return cls(tokenizer, config.max_position_embeddings - config.pad_token_id - 1, config.lowercase)

    def __call__(self, word_lists: list[list[str]]) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        if self.lowercase:
            word_lists = [[word.lower() for word in words] for words in word_lists]
        if self.backend is not None:
            self.backend.enable_truncation(self.max_seq_len)
            self.backend.no_padding()
            if len(word_lists) == 1:  # a third faster than encode_batch for one: a serving replica's usual batch
                encodings = [self.backend.encode(word_lists[0], is_pretokenized=True)]
            else:
                encodings = self.backend.encode_batch(word_lists, is_pretokenized=True)
            ids_lists, word_ids = [encoding.ids for encoding in encodings], [encoding.word_ids for encoding in encodings]
        else:
            encoded = self.tokenizer(word_lists, is_split_into_words=True, truncation=True, max_length=self.max_seq_len)
            ids_lists, word_ids = encoded["input_ids"], [encoded.word_ids(row) for row in range(len(word_lists))]
        if len(ids_lists) == 1:  # nothing to pad
            input_ids = np.array(ids_lists, dtype=np.int64)
            attention_mask = np.ones_like(input_ids)
        else:
            length = max(len(ids) for ids in ids_lists)
            input_ids = np.full((len(word_lists), length), self.pad_id, dtype=np.int64)
            attention_mask = np.zeros((len(word_lists), length), dtype=np.int64)
            for row, ids in enumerate(ids_lists):
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
        first_positions = []
        for row, ids in enumerate(ids_lists):
            positions = [-1] * len(word_lists[row])
            for position, word in enumerate(word_ids[row]):
                if word is not None and positions[word] < 0:
                    positions[word] = position
            first_positions.append(positions)
        return {"input_ids": input_ids, "attention_mask": attention_mask}, first_positions


def encode_words(
    tokenizer,
    word_lists: list[list[str]],
    max_seq_len: int,
    lowercase: bool = False,
) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """``WordEncoder(tokenizer, max_seq_len, lowercase)(word_lists)``, for a single call."""
    return WordEncoder(tokenizer, max_seq_len, lowercase)(word_lists)


def encode_records(tokenizer, records: list[dict], intent_labels: list[str], slot_labels: list[str], max_seq_len: int, lowercase: bool) -> dict[str, np.ndarray]:
    """Model inputs and labels for labelled records, padded to ``max_seq_len``; the slot label sits on
    each word's first sub-word, the rest are ignored; unseen labels map to ``UNKNOWN_LABEL``."""
    inputs, first_positions = encode_words(tokenizer, [record["tokens"] for record in records], max_seq_len, lowercase)
    count, length = inputs["input_ids"].shape
    padded = {name: np.pad(array, ((0, 0), (0, max_seq_len - length)), constant_values=tokenizer.pad_token_id if name == "input_ids" else 0) for name, array in inputs.items()}
    intent_index = {label: index for index, label in enumerate(intent_labels)}
    slot_index = {label: index for index, label in enumerate(slot_labels)}
    slots = np.full((count, max_seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, (record, positions) in enumerate(zip(records, first_positions)):
        for tag, position in zip(record["slot_tags"], positions):
            if position >= 0:
                slots[row, position] = slot_index.get(tag, 0)
    padded["intent_labels"] = np.array([intent_index.get(record["intent"], 0) for record in records], dtype=np.int64)
    padded["slot_labels"] = slots
    return padded


def all_lowercase(records: list[dict]) -> bool:
    return all(word == word.lower() for record in records for word in record["tokens"])


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def as_numpy(logits) -> np.ndarray:
    return logits if isinstance(logits, np.ndarray) else logits.float().cpu().numpy()


def predict_words(model, tokenizer, word_lists: list[list[str]], batch_size: int = 64, top_k: int = 1,
                  encoder: WordEncoder | None = None, labels: tuple[list[str], list[str]] | None = None) -> list[dict]:
    """Per word list: the intent and its probability, the ``top_k`` most probable intents, and a BIO tag
    per word with its probability (words past the model's length get ``O`` with probability 1).
    ``encoder``: a ``WordEncoder`` made once for this model (``Parser`` keeps one); else one per call.
    ``labels``: the config's (intent, slot) label lists, read once (``Parser`` keeps them)."""
    config = model.config
    # each attribute read of a transformers config costs microseconds, and a parse reads labels per word
    intent_labels, slot_labels = labels or (config.intent_labels, config.slot_labels)
    encoder = encoder or WordEncoder.for_model(tokenizer, config)
    top_k = max(1, min(top_k, len(intent_labels) - 1))
    # the ONNX Runtime backend takes and gives NumPy arrays, and needs no autograd mode (entering
    # inference_mode costs as much as the rest of the post-processing at batch 1); the post-processing
    # is NumPy too, as a dozen torch calls on batch-1 tensors cost more than the arithmetic
    takes_numpy = getattr(model, "takes_numpy", False)
    if takes_numpy:
        return _predict(model, encoder, word_lists, batch_size, top_k, intent_labels, slot_labels, None)
    if model.training:  # eval() walks every module: ~2 ms a call for the 17M student, more than the parse's other work
        model.eval()
    with torch.inference_mode():
        return _predict(model, encoder, word_lists, batch_size, top_k, intent_labels, slot_labels, model.device)


def _predict(model, encoder, word_lists, batch_size, top_k, intent_labels, slot_labels, device) -> list[dict]:
    predictions = []
    for start in range(0, len(word_lists), batch_size):
        chunk = word_lists[start : start + batch_size]
        inputs, first_positions = encoder(chunk)
        output = model(**(inputs if device is None else {name: torch.from_numpy(array).to(device) for name, array in inputs.items()}))
        intent_logits, slot_logits = as_numpy(output.intent_logits), as_numpy(output.slot_logits)
        intent_logits[:, 0] = -np.inf  # never answer "unknown": it has no training examples
        slot_logits[:, :, 0] = -np.inf
        intent_probabilities = softmax(intent_logits).tolist()
        top_intents = np.argsort(-intent_logits, axis=-1, kind="stable")[:, :top_k].tolist()
        # only the best tag and its probability: softmax's maximum is 1 / sum(exp(logits - max))
        slot_ids = slot_logits.argmax(-1).tolist()
        tag_probabilities = (1.0 / np.exp(slot_logits - slot_logits.max(-1, keepdims=True)).sum(-1)).tolist()
        for row, positions in enumerate(first_positions):
            row_probabilities, row_ids, row_tags = intent_probabilities[row], slot_ids[row], tag_probabilities[row]
            ranking = [(intent_labels[index], row_probabilities[index]) for index in top_intents[row]]
            predictions.append({
                "intent": ranking[0][0],
                "confidence": ranking[0][1],
                "ranking": ranking,
                "slot_tags": [slot_labels[row_ids[position]] if position >= 0 else "O" for position in positions],
                "tag_confidences": [row_tags[position] if position >= 0 else 1.0 for position in positions],
            })
    return predictions


def tags_to_slots(tags: list[str], spans: list[tuple[int, int]], text: str, confidences: list[float] | None = None) -> list[dict]:
    """BIO tags over words with character ``spans`` in ``text`` -> slots with their text and span; with
    per-word tag ``confidences``, each slot's confidence is the lowest of its words' (a slot is only as
    sure as its least sure word)."""
    slots = []
    for name, first, last in sorted(slot_spans(tags), key=lambda span: span[1]):
        start, end = spans[first][0], spans[last][1]
        slot = {"name": name, "value": text[start:end], "start": start, "end": end}
        if confidences is not None:
            slot["confidence"] = min(confidences[first : last + 1])
        slots.append(slot)
    return slots


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every Linear layer (CPU inference): weights stored in int8,
    activations quantised on the fly. About 2x faster at batch 1 for the 17M student on a CPU core."""
    import warnings

    with warnings.catch_warnings():
        # torch.ao's eager quantisation is marked deprecated in favour of torchao, which is not in our stack
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class Parser:
    """Utterances in, intents and slots out: ``Parser(model_dir).parse(["set an alarm for 7 am"])``.

    Each result is ``{"intent": {"name", "confidence"}, "intents": [the top_k {"name", "confidence"}],
    "slots": [{"name", "value", "start", "end", "confidence"}], "fallback": bool}`` with character spans
    (end exclusive) into the original string. With ``fallback_intent`` set, an utterance whose best intent
    is less probable than ``fallback_threshold`` is answered with that intent (``fallback: true``; the
    ranking still shows the model's guesses) — what an assistant does with "sorry, I did not get that".

    ``backend``: ``torch`` (eager; ``quantize="int8"`` makes its Linear layers dynamic int8) or
    ``onnxruntime`` (CPU only: the model exported to ONNX once and cached, ``quantize="int8"`` quantised by
    ONNX Runtime; what ``atm-ray serve`` and ``atm-ray predict`` use by default).
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 64, quantize: str | None = None,
                 top_k: int = 3, fallback_intent: str | None = None, fallback_threshold: float = 0.0, backend: str = "torch"):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (not a fine-tuned model folder)")
        if not 0.0 <= fallback_threshold <= 1.0:
            raise AtmRayError(f"fallback_threshold must lie in [0, 1], not {fallback_threshold}")
        if quantize not in ("int8", None):
            raise AtmRayError(f"quantize must be 'int8' or None, not {quantize!r}")
        if backend not in INFERENCE_BACKENDS:
            raise AtmRayError(f"backend must be one of {INFERENCE_BACKENDS}, not {backend!r}")
        if backend == "onnxruntime" and torch.device(device).type != "cpu":
            raise AtmRayError(f"backend 'onnxruntime' runs on the CPU, not on {device!r}; use backend 'torch'")
        self.model = RobertaPreLayerNormForIntentAndSlots.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        if backend == "onnxruntime":
            from atm_ray.nlu.onnx_backend import OnnxJointModel

            self.model = OnnxJointModel(self.model, model_dir, quantize)
        elif quantize == "int8":
            self.model = quantize_int8(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.encoder = WordEncoder.for_model(self.tokenizer, self.model.config)
        self.labels = (self.model.config.intent_labels, self.model.config.slot_labels)
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.top_k = top_k
        self.fallback_intent, self.fallback_threshold = fallback_intent, fallback_threshold

    @property
    def intents(self) -> list[str]:
        return list(self.model.config.intent_labels[1:])

    def predict(self, word_lists: list[list[str]]) -> list[dict]:
        return predict_words(self.model, self.tokenizer, word_lists, self.batch_size, self.top_k, self.encoder, self.labels)

    def parse(self, texts: list[str]) -> list[dict]:
        spans = [[match.span() for match in WORD.finditer(text)] for text in texts]
        words = [[text[start:end] for start, end in text_spans] for text, text_spans in zip(texts, spans)]
        for index, (text, word_list) in enumerate(zip(texts, words)):
            if not word_list:
                raise AtmRayError(f"utterance {index} is empty")
            if not is_encodable(text):
                raise AtmRayError(f"utterance {index} is not valid Unicode text (a lone surrogate?): {text!r}")
        results = []
        for prediction, text_spans, text in zip(self.predict(words), spans, texts):
            fallback = self.fallback_intent is not None and prediction["confidence"] < self.fallback_threshold
            results.append({
                "intent": {"name": self.fallback_intent if fallback else prediction["intent"], "confidence": prediction["confidence"]},
                "intents": [{"name": name, "confidence": confidence} for name, confidence in prediction["ranking"]],
                "slots": tags_to_slots(prediction["slot_tags"], text_spans, text, prediction["tag_confidences"]),
                "fallback": fallback,
            })
        return results


register_auto_classes()
