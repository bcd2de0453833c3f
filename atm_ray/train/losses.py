"""Distillation losses: masked-LM cross-entropy, soft cross-entropy to a teacher, TinyBERT-style hidden-state
(and optional attention) matching through a learned projection and a layer map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atm_ray.config import AtmRayError
from atm_ray.data.masking import IGNORE_INDEX


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the masked positions (labels != -100)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, positions: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over ``positions`` of -sum_v p_teacher(v) log p_student(v), both at ``temperature``, times T²
    (Hinton et al.: keeps the gradient scale independent of T)."""
    chosen = positions.bool()
    student = student_logits[chosen].float() / temperature
    teacher = teacher_logits[chosen].float() / temperature
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    loss = -(F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1)).sum(-1).mean()
    return loss * temperature**2


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's g(m) = k·m, k = N / M: student layer m (0 = embeddings) learns from teacher layer g(m)."""
    if teacher_layers % student_layers:
        raise AtmRayError(
            f"a uniform layer map needs the teacher's {teacher_layers} layers to be a multiple of the student's "
            f"{student_layers}; give distill.<student>.layer_map explicitly"
        )
    step = teacher_layers // student_layers
    return [step * layer for layer in range(student_layers + 1)]


def check_layer_map(layer_map: list[int], student_layers: int, teacher_layers: int) -> None:
    if len(layer_map) != student_layers + 1:
        raise AtmRayError(f"layer_map has {len(layer_map)} entries; the student needs {student_layers + 1} (embeddings + layers)")
    if any(not 0 <= layer <= teacher_layers for layer in layer_map):
        raise AtmRayError(f"layer_map {layer_map} names a teacher layer outside 0..{teacher_layers}")


def hidden_state_mse(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    projection: torch.nn.Module,
    layer_map: list[int],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean over mapped layers of the MSE between projected student states and teacher states, on real
    (non-pad) tokens. ``*_hidden[0]`` is the embedding output, as transformers returns it."""
    keep = attention_mask.bool()
    losses = []
    for student_layer, teacher_layer in enumerate(layer_map):
        projected = projection(student_hidden[student_layer][keep].float())
        losses.append(F.mse_loss(projected, teacher_hidden[teacher_layer][keep].float()))
    return torch.stack(losses).mean()


def attention_mse(
    student_attentions: tuple[torch.Tensor, ...],
    teacher_attentions: tuple[torch.Tensor, ...],
    layer_map: list[int],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """MSE between head-averaged attention maps of student layer m and teacher layer g(m), m >= 1
    (averaging over heads lets students with fewer heads learn from the teacher). Zero when no student
    layer maps to a teacher layer (a map of embeddings only)."""
    keep = attention_mask.bool()
    pairs = keep[:, :, None] & keep[:, None, :]
    losses = []
    for student_layer, teacher_layer in list(enumerate(layer_map))[1:]:
        if teacher_layer == 0:
            continue
        student = student_attentions[student_layer - 1].float().mean(1)
        teacher = teacher_attentions[teacher_layer - 1].float().mean(1)
        losses.append(F.mse_loss(student[pairs], teacher[pairs]))
    if not losses:
        return attention_mask.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()
