"""Rebuild ``tests/fixtures/spoken_teacher``: a tiny teacher pretrained by our own Stage-1 loop on the full
spoken corpora of ../shared/data (SLURP and xSID text, 72,709 utterances) long enough to leave the unigram
plateau (about 8 minutes on 2 cores), which the distillation test learns from.

    python tools/make_test_teacher.py

Tiny masked LMs spend their first ~1,000 steps predicting the unigram distribution; a teacher still on
that plateau has nothing to teach, so tests that compare distillation with MLM alone need this one.
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from atm_ray.config import load_config  # noqa: E402
from atm_ray.train.pretrain import run_pretrain_stage  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "spoken_teacher"
SPOKEN = "[{format: text, path: pretrain/spoken/slurp_lm.txt}, {format: text, path: pretrain/spoken/xsid_train_en.txt}]"
OVERRIDES = [
    f"data.written.train={SPOKEN}",
    "data.written.heldout=[{format: slurp, path: 'bundled:nlu/slurp/devel.jsonl'}]",
    "tokenizer.vocab_size=1000",
    "models.teacher.dropout=0.1",
    "pretrain.stage1.steps=3000",
    "pretrain.stage1.eval_every=1000",
    "pretrain.stage1.checkpoint_every=3000",
    "pretrain.stage1.engine={zero_stage: 0, precision: fp32, micro_batch_size: 32, learning_rate: 2.0e-3, warmup_steps: 50}",
]


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config("tiny", [f"run_dir={run_dir}", f"data.root={Path(__file__).resolve().parents[2] / 'shared' / 'data'}", *OVERRIDES])
        result = run_pretrain_stage(config, 1, use_ray=False)
        print(result.summary())
        shutil.rmtree(FIXTURE, ignore_errors=True)
        shutil.copytree(result.export_dir, FIXTURE)
    # half precision on disk: the fixture stays small; tests load it as fp32
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(FIXTURE))
    model.to(torch.float16).save_pretrained(str(FIXTURE), safe_serialization=True)
    (FIXTURE / "README.md").write_text(
        "Built by `python tools/make_test_teacher.py` (atm-ray's own Stage-1 loop, 3,000 steps on the SLURP and\n"
        "xSID text of ../shared/data, see atm_ray/bundled_data/ATTRIBUTION.md for their licences). Held-out metrics\n"
        "at step 3000: " + "; ".join(result.summary().splitlines()[1:]).replace("  ", "") + "\n"
    )


if __name__ == "__main__":
    main()
