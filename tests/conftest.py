import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("ATM_RAY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full corpora of ../shared/data (present in CI; a user's clone may not have them)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not here (set ATM_RAY_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """The tiny preset's prepare stage, run once for the session."""
    from atm_ray.config import load_config
    from atm_ray.prepare import prepare

    run_dir = tmp_path_factory.mktemp("tiny-run")
    config = load_config("tiny", [f"run_dir={run_dir}"])
    return config, prepare(config)


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster for the module, shut down afterwards."""
    import ray

    from atm_ray.stages import init_ray

    init_ray()
    yield ray
    ray.shutdown()
