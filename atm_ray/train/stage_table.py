"""The pipeline's training stages as data: one row per stage, and the names everybody else uses.

A row says what the stage optimises (``objective``: ``mlm`` masked LM, ``distill`` distillation,
``finetune`` joint intent + slot fine-tuning), where its settings live in the config, which model shape it
builds when it does not start from another stage's export, which text it trains on (with an optional replay
share of the other kind), and which upstream stages it starts from (``init_from``) or learns from
(``teachers``). The runner (``atm_ray.train.stages``) turns a row into a plan; pipeline, sweep, report,
CLI and benchmarks name stages through the constants below, never through string literals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from atm_ray.config import DOMAINS

TEACHER_STAGE1 = "teacher_stage1"
TEACHER_STAGE2 = "teacher_stage2"
INTERMEDIATE_DISTILL = "intermediate_distill"
INTERMEDIATE_CONTINUE = "intermediate_continue"
FINAL_DISTILL = "final_distill"
FINETUNE_SCRATCH = "finetune_scratch"
FINETUNE_STUDENT = "finetune_student"
PREPARE = "prepare"


Objective = Literal["mlm", "distill", "finetune"]


@dataclass(frozen=True)
class Stage:
    name: str  # the stage's folder under the run directory
    objective: Objective
    settings_key: str  # dotted path of its settings in the config, e.g. "distill.final"
    description: str
    model_key: str | None = None  # dotted path of the name of its model shape (in config.models)
    train: str | None = None  # the domain it trains on
    replay: str | None = None  # the other domain, mixed into each batch
    replay_fraction_key: str | None = None  # dotted path of the replay share
    init_from: str | None = None  # the upstream stage whose export it starts from
    # the upstream stages it learns from; several are taken in turn when the stage's ``switch`` is set,
    # otherwise the last one alone
    teachers: tuple[str, ...] = ()

    @property
    def upstream(self) -> tuple[str, ...]:
        return ((self.init_from,) if self.init_from else ()) + self.teachers


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(TEACHER_STAGE1, "mlm", "pretrain.stage1", "teacher, Stage 1 (written)",
              model_key="pretrain.model", train="written"),
        Stage(TEACHER_STAGE2, "mlm", "pretrain.stage2", "teacher, Stage 2 (spoken)",
              model_key="pretrain.model", train="spoken", replay="written",
              replay_fraction_key="pretrain.stage2.replay_fraction", init_from=TEACHER_STAGE1),
        Stage(INTERMEDIATE_DISTILL, "distill", "distill.intermediate", "intermediate student, distillation",
              model_key="distill.intermediate.student", train="written", replay="spoken",
              replay_fraction_key="distill.intermediate.spoken_fraction", teachers=(TEACHER_STAGE1, TEACHER_STAGE2)),
        Stage(INTERMEDIATE_CONTINUE, "mlm", "distill.continuation", "intermediate student, in-domain continuation",
              model_key="distill.intermediate.student", train="spoken", replay="written",
              replay_fraction_key="distill.continuation.replay_fraction", init_from=INTERMEDIATE_DISTILL),
        Stage(FINAL_DISTILL, "distill", "distill.final", "final student, distillation",
              model_key="distill.final.student", train="written", replay="spoken",
              replay_fraction_key="distill.final.spoken_fraction", teachers=(INTERMEDIATE_CONTINUE,)),
        # the scratch baseline takes only the architecture and the tokenizer of its parent
        Stage(FINETUNE_SCRATCH, "finetune", "finetune", "scratch baseline", init_from=FINAL_DISTILL),
        Stage(FINETUNE_STUDENT, "finetune", "finetune", "pipeline student", init_from=FINAL_DISTILL),
    )
}

# what `atm-ray pretrain --stage N` and `atm-ray distill --student S` run, in order
PRETRAIN_STAGES = {1: (TEACHER_STAGE1,), 2: (TEACHER_STAGE2,)}
DISTILL_STAGES = {"intermediate": (INTERMEDIATE_DISTILL, INTERMEDIATE_CONTINUE), "final": (FINAL_DISTILL,)}
MASKED_LM_STAGES = tuple(name for name, stage in STAGES.items() if stage.objective != "finetune")
FINETUNE_STAGES = tuple(name for name, stage in STAGES.items() if stage.objective == "finetune")


def settings_at(config: Any, key: str) -> Any:
    """The value at a dotted ``key`` of the config, e.g. ``distill.final``."""
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def ancestors(name: str) -> tuple[str, ...]:
    """Every stage ``name`` needs finished before it runs, in the table's (the pipeline's) order."""
    needed: set[str] = set()
    pending = list(STAGES[name].upstream)
    while pending:
        upstream = pending.pop()
        if upstream not in needed:
            needed.add(upstream)
            pending.extend(STAGES[upstream].upstream)
    return tuple(stage for stage in STAGES if stage in needed)


def check_table() -> None:
    """Every upstream stage comes earlier in the table (the table is the pipeline's order), and every
    masked-LM stage trains on a known domain."""
    seen: set[str] = set()
    for name, stage in STAGES.items():
        if stage.objective != "finetune" and (stage.train not in DOMAINS or stage.replay not in (None, *DOMAINS)):
            raise AssertionError(f"stage {name}: train/replay must be one of {DOMAINS}")
        missing = [upstream for upstream in stage.upstream if upstream not in seen]
        if missing:
            raise AssertionError(f"stage {name}: upstream {missing} must come before it")
        seen.add(name)
