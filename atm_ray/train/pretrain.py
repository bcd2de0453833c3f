"""Teacher pretraining: Stage 1 on written text, Stage 2 continuing on spoken in-domain utterances
(from the Stage-1 weights, a fresh learning-rate schedule, an optional replay share of written text)."""

from __future__ import annotations

from pathlib import Path

from atm_ray.config import Config
from atm_ray.data.prepare import PreparedData, prepare
from atm_ray.train.stages import StagePlan, StageResult, make_plan, run_stage, run_stage_local


def plan_pretrain_stage(config: Config, stage: int, prepared: PreparedData, run_dir: Path) -> StagePlan:
    if stage == 1:
        return make_plan(
            config, prepared, run_dir, name="teacher_stage1", kind="mlm", settings_key="pretrain.stage1",
            model=config.pretrain.model, train="written", replay=None, replay_fraction=0.0,
        )
    return make_plan(
        config, prepared, run_dir, name="teacher_stage2", kind="mlm", settings_key="pretrain.stage2",
        model=config.pretrain.model, train="spoken", replay="written",
        replay_fraction=config.pretrain.stage2.replay_fraction, upstream={"init_from": "teacher_stage1"},
    )


def run_pretrain_stage(config: Config, stage: int, run_dir: Path | None = None, use_ray: bool = True) -> StageResult:
    """Run (or resume, or skip when finished) teacher pretraining Stage 1 or 2."""
    run_dir = Path(run_dir or config.resolved_run_dir())
    prepared = prepare(config, run_dir)
    plan = plan_pretrain_stage(config, stage, prepared, run_dir)
    return (run_stage if use_ray else run_stage_local)(config, plan, prepared)


def run_pretrain_stage_local(config: Config, stage: int, run_dir: Path | None = None) -> StageResult:
    """The same stage in this process, without Ray."""
    return run_pretrain_stage(config, stage, run_dir, use_ray=False)
