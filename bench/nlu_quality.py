"""NLU quality: fine-tune the pipeline's final student and the scratch baseline (same architecture, random
weights) on SNIPS and on SLURP devel, and print intent accuracy, slot F1, exact match and the relative
error change against the baseline, beside the JointBERT anchors.

    python bench/nlu_quality.py --preset cpu            # after `atm-ray pipeline --preset cpu`
    python bench/nlu_quality.py --preset tiny --run-dir runs/tiny

Data come from the preset's data.root (../shared/data); where a corpus is not there, the slice bundled in
the package is used and the table says so. SLURP devel has no train/test split: 10% of it is held out for
dev and 10% for test. Results go to <run>/nlu_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.config import NluSource, load_config  # noqa: E402
from atm_ray.data import files  # noqa: E402
from atm_ray.engine import EXPORT_DIR  # noqa: E402
from atm_ray.evaluate import compare_models  # noqa: E402
from atm_ray.finetune import load_nlu_data, plan_finetune, run_finetune_stage, split_sources  # noqa: E402
from atm_ray.nlu_metrics import comparison_markdown  # noqa: E402

DATASETS = {
    "snips": ("jointbert", "nlu/snips", "bundled:nlu/snips"),
    "slurp_devel": ("slurp", "nlu/slurp/devel.jsonl", "bundled:nlu/slurp/devel.jsonl"),
}
ANCHORS = """JointBERT anchors (SNIPS test): BERT-base 99.14 intent / 96.90 slot F1 / 93.00 exact match;
DistilBERT 98.00 / 96.10 / 91.00."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--no-ray", action="store_true", help="fine-tune in this process")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.preset, args.overrides)
    run_dir = Path(args.run_dir or config.resolved_run_dir())
    student = run_dir / "final_distill" / EXPORT_DIR
    if not (student / "config.json").is_file():
        sys.exit(f"{student}: no final student; run `atm-ray pipeline --preset {args.preset}` first")

    sections, results = [], {}
    for name, (source_format, path, bundled) in DATASETS.items():
        located = path if files.exists(files.resolve(path, config.data.root)) else bundled
        splits = split_sources([NluSource(format=source_format, path=located)], config.data.root)
        settings = config.finetune.model_copy(update=splits)
        data_config = config.model_copy(update={"finetune": settings})
        data = load_nlu_data(settings, config.data.root, config.data.strict, config.seed)
        exports = {}
        for model, scratch in (("scratch", True), ("student", False)):
            plan = plan_finetune(data_config, data, student, f"nlu_quality_{name}_{model}", scratch, run_dir)
            exports[model] = run_finetune_stage(data_config, plan, data, use_ray=not args.no_ray)["outputs"]["export"]
        result = compare_models(exports, data.test, "scratch")
        results[name] = result
        title = f"{name} ({located}; {len(data.train)} train / {len(data.dev)} dev / {len(data.test)} test)"
        sections.append(comparison_markdown(result["overall"], title))

    report = f"# NLU quality, preset {config.name}\n\n" + "\n".join(sections) + "\n" + ANCHORS + "\n"
    print(report)
    (run_dir / "nlu_quality.md").write_text(report)
    (run_dir / "nlu_quality.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
