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


def test_paired_gains_compare_run_by_run_and_say_whether_the_gain_clears_twice_the_spread():
    bench = _bench()
    # folds of unequal difficulty: each row's own spread is wide, the run-by-run gain is steady
    scratch = [0.30, 0.40, 0.50]
    scores = {"scratch": {"exact_match": scratch},
              "final": {"exact_match": [0.35, 0.44, 0.56]},
              "noisy": {"exact_match": [0.40, 0.36, 0.52]}}
    lines = bench.paired_gains(scores).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("- final − scratch") and "+5.00 (std 1.00" in lines[0] and "beyond 2σ = 2.00: yes" in lines[0]
    assert lines[1].startswith("- noisy − scratch") and "+2.67" in lines[1] and lines[1].endswith(": no)")
    with pytest.raises(ValueError):  # a row with a missing run is not paired silently
        bench.paired_gains({"scratch": {"exact_match": scratch}, "final": {"exact_match": [0.35]}})
