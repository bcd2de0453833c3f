"""Fault injection for the kill-and-resume tests: a step callback that ends the process abruptly, once.

The tests set ``ATM_RAY_FAIL_AT_STEP=<step>[:<rank>]`` for a stage; the runner turns it into this callback
(``LoopSettings.on_step``) in every worker, so the training loop itself holds no test code.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FAIL_AT_STEP_ENV = "ATM_RAY_FAIL_AT_STEP"  # "<step>" or "<step>:<rank>"
FAULT_EXIT_CODE = 17  # what an injected fault exits with


def fault_from_environment(stage_dir: str) -> dict:
    """The fault the environment asks for (picklable, to travel to Ray Train workers), or ``{}``."""
    value = os.environ.get(FAIL_AT_STEP_ENV)
    if not value:
        return {}
    step, _, rank = value.partition(":")
    return {"step": int(step), "rank": int(rank or 0), "marker": str(Path(stage_dir) / "fault-injected")}


@dataclass
class ExitAtStep:
    """``on_step`` callback: rank ``rank`` exits with ``FAULT_EXIT_CODE`` after step ``step``, once (a
    marker file remembers it, so the resumed run goes on)."""

    step: int
    rank: int = 0
    marker: str | None = None

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank:
            return
        if self.marker and Path(self.marker).exists():
            return
        if self.marker:
            Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
            Path(self.marker).write_text("failed once\n")
        # Ray Train V2 may drop a checkpoint reported less than one poll interval before a crash.
        time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) * 3)
        logger.warning("fault injection: exiting at step %d as asked", step)
        os._exit(FAULT_EXIT_CODE)
