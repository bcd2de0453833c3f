"""Two-step distillation (the paper's recipe).

1. intermediate distillation: teacher -> intermediate student with MLM + soft cross-entropy (equal weights
   by default), first from the Stage-1 teacher and, once the student plateaus, from the Stage-2 teacher.
2. intermediate continuation: MLM-only continued pretraining of the intermediate on spoken text.
3. final distillation: intermediate -> final student with MLM + soft CE + hidden-state matching.
(The stages themselves are rows of ``atm_ray.train.stage_table``; this module holds their trainer.)

The teacher runs in every worker in eval mode without gradients (bf16 on a GPU); the student and the
hidden-state projection train together inside the DeepSpeed engine.
"""

from __future__ import annotations

import logging
import torch
from transformers import AutoModelForMaskedLM

from atm_ray.config import AtmRayError, DistillStageConfig
from atm_ray.train.engine import MlmTrainer, masked_lm_metrics
from atm_ray.data.teacher_folder import SAFE_LOADING
from atm_ray.train.losses import attention_mse, check_layer_map, hidden_state_mse, mlm_loss, soft_cross_entropy, uniform_layer_map
from atm_ray.data.tokenizer import SpecialTokens

logger = logging.getLogger(__name__)


class StudentWithProjection(torch.nn.Module):
    """The student and the learned projection from its width to the teacher's, trained together.
    Calling it calls the student, so evaluation and export see a plain masked LM."""

    def __init__(self, student: torch.nn.Module, teacher_width: int | None):
        super().__init__()
        self.student = student
        self.projection = torch.nn.Linear(student.config.hidden_size, teacher_width) if teacher_width else None

    def forward(self, **inputs):
        return self.student(**inputs)


# the teachers whose layers ``init: teacher_layers`` copies: the student's own architecture (exactly), and
# post-LayerNorm encoders with BERT's layer layout (mapped, see ``_copy_post_ln_layers``)
POST_LN_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
LAYER_COPY_TYPES = ("roberta-prelayernorm", *POST_LN_TYPES)


def init_from_teacher_layers(student: torch.nn.Module, teacher: torch.nn.Module, layer_map: list[int] | None = None) -> None:
    """DistilBERT-style: copy the embeddings, the LM head and every k-th teacher layer (same width only), or
    the layers an explicit ``layer_map`` names (student layer m from teacher layer layer_map[m], 1-based), so
    that a 3-layer student can start from a 4-layer teacher."""
    if student.config.hidden_size != teacher.config.hidden_size:
        raise AtmRayError(
            f"init: teacher_layers needs equal widths; the student has {student.config.hidden_size}, "
            f"the teacher {teacher.config.hidden_size}"
        )
    student_layers, teacher_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    layer_map = layer_map or uniform_layer_map(student_layers, teacher_layers)
    check_layer_map(layer_map, student_layers, teacher_layers)
    if layer_map[0] != 0 or 0 in layer_map[1:]:
        raise AtmRayError(f"layer_map {layer_map}: init: teacher_layers copies embeddings into entry 0 and a teacher layer (1..{teacher_layers}) into each other entry")
    if teacher.config.model_type in POST_LN_TYPES:
        _copy_post_ln_layers(student, teacher, layer_map)
        return
    if teacher.config.model_type != student.config.model_type:
        raise AtmRayError(
            f"init: teacher_layers copies layers from {', '.join(LAYER_COPY_TYPES)} teachers, not "
            f"{teacher.config.model_type!r}: set init: random"
        )
    student_encoder, teacher_encoder = student.roberta_prelayernorm, teacher.roberta_prelayernorm
    student_encoder.embeddings.load_state_dict(teacher_encoder.embeddings.state_dict())
    for student_layer, teacher_layer in enumerate(layer_map[1:]):
        student_encoder.encoder.layer[student_layer].load_state_dict(teacher_encoder.encoder.layer[teacher_layer - 1].state_dict())
    student_encoder.LayerNorm.load_state_dict(teacher_encoder.LayerNorm.state_dict())
    student.lm_head.load_state_dict(teacher.lm_head.state_dict())


@torch.no_grad()
def _copy_post_ln_layers(student: torch.nn.Module, teacher: torch.nn.Module, layer_map: list[int]) -> None:
    """A post-LN teacher (BERT, RoBERTa, XLM-R) into the pre-LN student: every linear map is copied as is;
    each LayerNorm goes to the place that normalises the same sub-layer's input (the norm after a teacher
    layer's feed-forward, or the embeddings' norm, feeds the next attention; the norm after its attention
    feeds its feed-forward; the last layer's output norm is the student's final norm). The two orders of
    residual and norm differ, so this is a start for distillation, not the same function."""

    def copy(target: torch.nn.Module, source: torch.nn.Module) -> None:
        target.load_state_dict(source.state_dict())

    base, encoder = teacher.base_model, student.roberta_prelayernorm
    embeddings = base.embeddings
    encoder.embeddings.word_embeddings.weight.copy_(embeddings.word_embeddings.weight)
    encoder.embeddings.token_type_embeddings.weight.copy_(embeddings.token_type_embeddings.weight[:1])
    copy(encoder.embeddings.LayerNorm, embeddings.LayerNorm)
    # RoBERTa-style position tables start after the padding id; BERT's at 0
    teacher_offset = embeddings.padding_idx + 1 if hasattr(embeddings, "padding_idx") else 0
    student_offset = encoder.embeddings.padding_idx + 1
    rows = min(encoder.embeddings.position_embeddings.num_embeddings - student_offset,
               embeddings.position_embeddings.num_embeddings - teacher_offset)
    encoder.embeddings.position_embeddings.weight[student_offset : student_offset + rows].copy_(
        embeddings.position_embeddings.weight[teacher_offset : teacher_offset + rows]
    )
    teacher_layers = base.encoder.layer
    for student_index, teacher_number in enumerate(layer_map[1:]):
        target, source = encoder.encoder.layer[student_index], teacher_layers[teacher_number - 1]
        for name in ("query", "key", "value"):
            copy(getattr(target.attention.self, name), getattr(source.attention.self, name))
        copy(target.attention.output.dense, source.attention.output.dense)
        copy(target.intermediate.dense, source.intermediate.dense)
        copy(target.output.dense, source.output.dense)
        before = embeddings.LayerNorm if teacher_number == 1 else teacher_layers[teacher_number - 2].output.LayerNorm
        copy(target.attention.LayerNorm, before)
        copy(target.intermediate.LayerNorm, source.attention.output.LayerNorm)
    copy(encoder.LayerNorm, teacher_layers[layer_map[-1] - 1].output.LayerNorm if layer_map[-1] else embeddings.LayerNorm)
    if hasattr(teacher, "lm_head"):  # RoBERTa, XLM-R
        head = teacher.lm_head
        dense, norm, bias = head.dense, head.layer_norm, head.bias
    else:  # BERT
        head = teacher.cls.predictions
        dense, norm, bias = head.transform.dense, head.transform.LayerNorm, head.bias
    copy(student.lm_head.dense, dense)
    copy(student.lm_head.layer_norm, norm)
    student.lm_head.bias.copy_(bias)


class DistillTrainer(MlmTrainer):
    """A student distilled from one teacher, or from a sequence of teachers switched on a plateau."""

    def __init__(
        self,
        student: torch.nn.Module,
        settings: DistillStageConfig,
        teachers: list[str],
        vocab_size: int,
        mask_probability: float = 0.15,
        seed: int = 0,
        special: SpecialTokens = SpecialTokens(),
    ):
        if not teachers:
            raise AtmRayError("a distillation stage needs at least one teacher")
        self.settings = settings
        self.teacher_paths = teachers
        self.teacher_index = 0
        # SDPA and flash attention return no attention maps: attention matching needs the eager kernels
        self.attention_implementation = "eager" if settings.weights.attention > 0 else None
        if self.attention_implementation:
            student.set_attn_implementation(self.attention_implementation)
        self.switch_step: int | None = None
        self.best_metric: float | None = None
        self.evaluations_without_gain = 0
        first_teacher = self._load_teacher(teachers[0], vocab_size)
        weights = settings.weights
        needs_hidden = weights.hidden > 0
        if settings.init == "teacher_layers":
            # the last teacher of a switch sequence is the most trained one (Stage 2 = Stage 1 + in-domain text)
            last = first_teacher if len(teachers) == 1 else self._load_teacher(teachers[-1], vocab_size)
            init_from_teacher_layers(student, last, settings.layer_map)
        self.layer_map = None
        if needs_hidden or weights.attention > 0:
            student_layers, teacher_layers = student.config.num_hidden_layers, first_teacher.config.num_hidden_layers
            self.layer_map = settings.layer_map or uniform_layer_map(student_layers, teacher_layers)
            check_layer_map(self.layer_map, student_layers, teacher_layers)
        wrapper = StudentWithProjection(student, first_teacher.config.hidden_size if needs_hidden else None)
        super().__init__(wrapper, settings.engine, settings.steps, vocab_size, mask_probability, seed, special)
        self.teacher = self._place(first_teacher)
        self.term_sums: dict[str, torch.Tensor] = {}
        self.term_count = 0
        self.teacher_metrics: dict[str, float] = {}

    def _load_teacher(self, path: str, vocab_size: int) -> torch.nn.Module:
        # an export may be stored in half precision: fp32 on the CPU, bf16 on the GPU (where it runs in bf16)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        extra = {"attn_implementation": self.attention_implementation} if self.attention_implementation else {}
        # a teacher may be a folder the user brought: disk only, safetensors only, no remote code
        teacher = AutoModelForMaskedLM.from_pretrained(path, dtype=dtype, **extra, **SAFE_LOADING)
        if teacher.config.vocab_size != vocab_size:
            raise AtmRayError(
                f"teacher {path} has a vocabulary of {teacher.config.vocab_size}, the student {vocab_size}: "
                "teacher and student must share the tokenizer"
            )
        return teacher

    def _place(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        return teacher.to(torch.bfloat16) if self.device.type == "cuda" else teacher

    def _switch_to(self, index: int) -> None:
        self.teacher_index = index
        self.teacher = self._place(self._load_teacher(self.teacher_paths[index], self.vocab_size))
        self.teacher_metrics = {}

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # under autocast_bf16 the losses run in autocast too, as a plain PyTorch loop would write them
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.engine_config.precision == "autocast_bf16"):
            return self._distillation_loss(batch)

    def _distillation_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.settings.weights
        needs_hidden = weights.hidden > 0
        needs_attention = weights.attention > 0
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=needs_hidden, output_attentions=needs_attention)
        student_out = self.engine(**inputs, output_hidden_states=needs_hidden, output_attentions=needs_attention)
        masked = batch["labels"] != -100
        positions = masked if self.settings.soft_targets == "masked" else batch["attention_mask"].bool()
        terms = {
            "mlm_loss": mlm_loss(student_out.logits, batch["labels"]),
            "soft_ce_loss": soft_cross_entropy(student_out.logits, teacher_out.logits, positions, self.settings.temperature),
        }
        total = weights.mlm * terms["mlm_loss"] + weights.soft_ce * terms["soft_ce_loss"]
        if needs_hidden:
            terms["hidden_loss"] = hidden_state_mse(
                student_out.hidden_states,
                teacher_out.hidden_states,
                self.engine.module.projection,
                self.layer_map,
                batch["attention_mask"],
            )
            total = total + weights.hidden * terms["hidden_loss"]
        if needs_attention:
            terms["attention_loss"] = attention_mse(
                student_out.attentions, teacher_out.attentions, self.layer_map, batch["attention_mask"]
            )
            total = total + weights.attention * terms["attention_loss"]
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0.0) + value.detach()
        self.term_count += 1
        return total

    def loss_terms(self) -> dict[str, float]:
        terms = {name: float(value) / max(self.term_count, 1) for name, value in self.term_sums.items()}
        if terms:
            terms = dict(zip(terms, self.all_reduce_mean(list(terms.values()))))
        self.term_sums, self.term_count = {}, 0
        return terms

    # ------------------------------------------------------------------ evaluation and the teacher switch

    def evaluate(self, heldout, batches: int, batch_size: int, unigram_token: int | None = None) -> dict[str, float]:
        metrics = super().evaluate(heldout, batches, batch_size, unigram_token)
        key = id(heldout)  # the same held-out rows each time: the teacher is scored once per domain
        if key not in self.teacher_metrics:
            self.teacher_metrics[key] = masked_lm_metrics(
                self.teacher, heldout, batches, batch_size, self.vocab_size, self.mask_probability, self.seed, self.device,
                special=self.special,
            )
        teacher = self.teacher_metrics[key]
        metrics["teacher_perplexity"] = teacher["perplexity"]
        metrics["teacher_mask_fill_accuracy"] = teacher["mask_fill_accuracy"]
        metrics["teacher_noun_mask_fill_accuracy"] = teacher["noun_mask_fill_accuracy"]
        metrics["perplexity_gap"] = metrics["perplexity"] - teacher["perplexity"]
        metrics["mask_fill_accuracy_gap"] = teacher["mask_fill_accuracy"] - metrics["mask_fill_accuracy"]
        return metrics

    def after_evaluation(self, metrics: dict) -> None:
        metrics["teacher_index"] = self.teacher_index
        switch = self.settings.switch
        if switch is None or self.teacher_index + 1 >= len(self.teacher_paths):
            if self.switch_step is not None:
                metrics["teacher_switch_step"] = self.switch_step
            return
        value = metrics[switch.metric]  # a held-out metric, checked with the config
        improved = self.best_metric is None or (
            (self.best_metric - value if switch.mode == "min" else value - self.best_metric) >= switch.min_delta
        )
        if improved:
            self.best_metric, self.evaluations_without_gain = value, 0
        else:
            self.evaluations_without_gain += 1
        plateau = self.evaluations_without_gain >= switch.patience
        capped = switch.max_steps is not None and self.step >= switch.max_steps
        if plateau or capped:
            self.switch_step = self.step
            logger.info("step %d: switching to teacher %s (%s)", self.step, self.teacher_paths[self.teacher_index + 1],
                        "plateau" if plateau else "step cap")
            self._switch_to(self.teacher_index + 1)
            self.best_metric, self.evaluations_without_gain = None, 0
            metrics["teacher_switch_step"] = self.switch_step

    def export_module(self) -> torch.nn.Module:
        return self.engine.module.student  # not the projection to the teacher's width

    def extra_state(self) -> dict:
        return {
            "teacher_index": self.teacher_index,
            "switch_step": self.switch_step,
            "best_metric": self.best_metric,
            "evaluations_without_gain": self.evaluations_without_gain,
        }

    def load_extra_state(self, state: dict) -> None:
        if state.get("teacher_index", 0) != self.teacher_index:
            self._switch_to(state["teacher_index"])
        self.switch_step = state.get("switch_step")
        self.best_metric = state.get("best_metric")
        self.evaluations_without_gain = state.get("evaluations_without_gain", 0)
