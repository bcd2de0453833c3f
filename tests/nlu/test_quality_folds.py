"""The quality bench's cross-validation folds (bench/nlu_quality.py --folds): disjoint test splits of a
dataset cut from one file, fold 0 being the split every earlier run used."""

import importlib.util
from pathlib import Path

import pytest

from atm_ray.config import NluSource, load_config
from atm_ray.nlu.finetune import load_nlu_data

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nlu_quality.py"


def _bench():
    spec = importlib.util.spec_from_file_location("nlu_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folds_test_each_utterance_once_and_fold_zero_is_the_default_split(tmp_path):
    bench = _bench()
    config = load_config("tiny", [f"run_dir={tmp_path}"])
    settings = config.finetune.model_copy(update={"train": [NluSource(format="slurp", path="bundled:nlu/slurp/devel.jsonl")],
                                                  "dev": [], "test": []})
    data = load_nlu_data(settings, config.data.root, False, seed=0)
    texts = lambda records: [" ".join(record["tokens"]) for record in records]  # noqa: E731
    parts = bench.folds(data, 10)

    assert (texts(parts[0].train), texts(parts[0].dev), texts(parts[0].test)) == (texts(data.train), texts(data.dev), texts(data.test))
    everything = sorted(texts(data.train + data.dev + data.test))
    tested = []
    for part in parts:
        assert len(part.test) == len(data.test) and len(part.dev) == len(data.dev)
        assert sorted(texts(part.train + part.dev + part.test)) == everything  # nothing lost or repeated
        # no record (by position in the shuffled list, texts can repeat) is both trained on and tested
        assert not {id(r) for r in part.test} & {id(r) for r in part.train + part.dev}
        tested += [id(r) for r in part.test]
    assert len(set(tested)) == 10 * len(data.test)
    with pytest.raises(SystemExit, match="--folds 11"):
        bench.folds(data, 11)
