"""Teachers a user already has (``teachers.stage1`` / ``teachers.stage2``): which stage each replaces, the
checks run before any work starts (the folders, as ``atm_ray.data.teacher_folder`` checks them; their
vocabularies; the students' layer copies), and the hash of its weights the manifests record.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from atm_ray.config import Config, ConfigError
from atm_ray.data.teacher_folder import check_teacher_folder, load_teacher_tokenizer, usable_positions
from atm_ray.train.stage_table import TEACHER_STAGE1, TEACHER_STAGE2

SKIP = "skip"  # teachers.stage2: no Stage 2, the Stage-1 teacher teaches throughout


def provided_teacher(config: Config, stage: str) -> str | None:
    """The folder that replaces ``stage`` (a teacher stage), or None when the stage trains its teacher."""
    teachers = config.teachers
    if stage == TEACHER_STAGE1:
        return teachers.stage1
    if stage == TEACHER_STAGE2 and teachers.stage2 is not None:
        return teachers.stage1 if teachers.stage2 == SKIP else teachers.stage2
    return None


def check_teachers(config: Config) -> None:
    """Everything about the given teachers that can be wrong, checked before any work starts: the folders,
    their tokenizers (one vocabulary for both stages), and each student's vocabulary and layer copy."""
    teachers = config.teachers
    if teachers.stage1 is None:
        return
    folders = {"teachers.stage1": teachers.stage1}
    if teachers.stage2 not in (None, SKIP):
        folders["teachers.stage2"] = teachers.stage2
    model_configs = {field: check_teacher_folder(path, field) for field, path in folders.items()}
    tokenizers = {field: load_teacher_tokenizer(path, field) for field, path in folders.items()}
    for field, model_config in model_configs.items():
        vocab_size, pieces = model_config.get("vocab_size"), len(tokenizers[field])
        if not isinstance(vocab_size, int) or vocab_size < pieces:
            raise ConfigError(
                f"{field}: config.json's vocab_size {vocab_size} does not cover its tokenizer's {pieces} pieces: "
                "the model and the tokenizer in that folder do not belong together"
            )
    if "teachers.stage2" in folders and (
        tokenizers["teachers.stage2"].get_vocab() != tokenizers["teachers.stage1"].get_vocab()
        or model_configs["teachers.stage2"]["vocab_size"] != model_configs["teachers.stage1"]["vocab_size"]
    ):
        raise ConfigError(
            "teachers.stage2: its vocabulary differs from teachers.stage1's: a student learns from both, so they "
            "must share one tokenizer"
        )
    for field, model_config in model_configs.items():
        usable = usable_positions(model_config)
        if usable is not None and usable < config.data.max_seq_len:
            raise ConfigError(
                f"{field}: the teacher reads at most {usable} positions (max_position_embeddings in its config.json), "
                f"fewer than data.max_seq_len {config.data.max_seq_len}: lower data.max_seq_len"
            )
    # the intermediate student copies the Stage-2 teacher's layers (the Stage-1 teacher's shape when Stage 2
    # continues it)
    settings = config.distill.intermediate
    if settings.init == "teacher_layers":
        teacher_config = model_configs.get("teachers.stage2", model_configs["teachers.stage1"])
        check_layer_copy(teacher_config, config.models[settings.student], "distill.intermediate")


def check_layer_copy(teacher_config: dict, student, key: str) -> None:
    """``init: teacher_layers`` copies weights: the student's width, heads and feed-forward size must be the
    teacher's, and the teacher an architecture whose layers map onto the student's."""
    pairs = {"hidden_size": student.hidden_size, "num_attention_heads": student.num_heads,
             "intermediate_size": student.intermediate_size}
    differing = [f"{name} {teacher_config.get(name)} (student {value})" for name, value in pairs.items()
                 if teacher_config.get(name) != value]
    if differing:
        raise ConfigError(
            f"{key}.init: teacher_layers copies the teacher's layers, but the teacher's {', '.join(differing)} "
            f"differ: give the student ({key}.student) the teacher's shape, or set {key}.init: random"
        )
    from atm_ray.train.distill import LAYER_COPY_TYPES

    if teacher_config.get("model_type") not in LAYER_COPY_TYPES:
        raise ConfigError(
            f"{key}.init: teacher_layers copies layers from {', '.join(sorted(LAYER_COPY_TYPES))} teachers, not "
            f"{teacher_config.get('model_type')!r}: set {key}.init: random (the student still learns from it)"
        )


def weights_hash(path: str) -> str:
    """SHA-256 over the folder's safetensors files (name and bytes, in name order); read once per process
    while the files' sizes and times stay the same."""
    files = sorted(Path(path).expanduser().glob("*.safetensors"))
    return _weights_hash(tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files))


@functools.lru_cache(maxsize=16)
def _weights_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        file = Path(name)
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
