import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from atm_ray.utils import VERBOSE_ENV

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the ONNX exports of the serving and prediction tests go here, not to the user's ~/.cache/atm-ray
if "ATM_RAY_CACHE" not in os.environ:
    os.environ["ATM_RAY_CACHE"] = tempfile.mkdtemp(prefix="atm-ray-cache-")
    atexit.register(shutil.rmtree, os.environ["ATM_RAY_CACHE"], ignore_errors=True)

SHARED_DATA = Path(os.environ.get("ATM_RAY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# the rendezvous variables a test process sets for its own process group (init_single_process_group)
DISTRIBUTED = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"}


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child command that starts its own process group, Ray and
    Serve: without the rendezvous, Ray address, Serve ingress and ``-v`` variables the tests set here."""
    environment = {
        name: value for name, value in os.environ.items()
        if name not in DISTRIBUTED and name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", VERBOSE_ENV)
        and not name.startswith("RAY_SERVE_")
    }
    return {**environment, **extra}


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``directory``: tag -> [(step, value)], read
    record by record (length, CRC, Event proto, CRC), without TensorBoard itself."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# Every training stage of the tiny preset cut to a few steps (the teacher switch happens on the first
# evaluation without a gain of 100, that is the second one).
SHORT_STAGES = [
    "pretrain.stage1.steps=40", "pretrain.stage1.eval_every=20", "pretrain.stage1.checkpoint_every=40",
    "pretrain.stage2.steps=10", "pretrain.stage2.eval_every=10", "pretrain.stage2.checkpoint_every=10",
    "distill.intermediate.steps=12", "distill.intermediate.eval_every=3", "distill.intermediate.checkpoint_every=3",
    "distill.intermediate.engine.warmup_steps=2",
    "distill.intermediate.switch={metric: written/mlm_loss, patience: 1, min_delta: 100.0}",
    "distill.continuation.steps=4", "distill.continuation.eval_every=2", "distill.continuation.checkpoint_every=2",
    "distill.final.steps=6", "distill.final.eval_every=3", "distill.final.checkpoint_every=3",
    "distill.final.engine.warmup_steps=2",
]


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
    from atm_ray.data.prepare import prepare

    run_dir = tmp_path_factory.mktemp("tiny-run")
    config = load_config("tiny", [f"run_dir={run_dir}"])
    return config, prepare(config)


@pytest.fixture(scope="module")
def local_ray(request):
    """A real local Ray cluster for the module, shut down afterwards (with its dashboard, as the CLI
    starts it, unless the module sets ``RAY_DASHBOARD = False``: Serve needs no state API). A module
    that sets ``SERVE_INGRESS`` gets Ray started as ``atm-ray serve --ingress ...`` starts it."""
    import ray

    from atm_ray.cluster import init_ray

    saved = dict(os.environ)
    ingress = getattr(request.module, "SERVE_INGRESS", None)
    if ingress:
        from atm_ray.serve.app import set_ingress

        set_ingress(ingress)
    init_ray(dashboard=getattr(request.module, "RAY_DASHBOARD", True))
    yield ray
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A small masked-LM export with a tokenizer trained on SNIPS text (what a distilled student looks like)."""
    from atm_ray.config import ModelShape
    from atm_ray.data.files import resolve
    from atm_ray.data.readers import read_nlu
    from atm_ray.train.modeling import build_masked_lm
    from atm_ray.data.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("encoder")
    records, _ = read_nlu("jointbert", resolve("bundled:nlu/snips/train"))
    tokenizer = train_tokenizer([" ".join(record["tokens"]) for record in records], vocab_size=800)
    shape = ModelShape(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128, max_positions=48, dropout=0.0)
    build_masked_lm(shape, len(tokenizer), seed=0).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def nlu_models(encoder_dir, tmp_path_factory):
    """Two fine-tuned arms for serving tests: A (3 epochs) and B (1 epoch), trained in this process."""
    from atm_ray.config import load_config
    from atm_ray.nlu.finetune import run_finetune

    run_dir = tmp_path_factory.mktemp("nlu-models")
    exports = {}
    for name, epochs in (("A", 3), ("B", 1)):
        config = load_config("tiny", [f"run_dir={run_dir}", f"finetune.max_epochs={epochs}"])
        exports[name] = run_finetune(config, encoder_dir, name=f"arm_{name}", use_ray=False)["outputs"]["export"]
    return exports
