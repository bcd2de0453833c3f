"""Cut the small slice of ../shared/data that the `tiny` preset and the tests need into the package.

    python tools/make_bundled_data.py [--source ../shared/data]

Files are unmodified prefixes of the originals (whole sentences / records; the Tatoeba English file joins
the first 1,000 lines of several pairs' English sides); see
atm_ray/bundled_data/ATTRIBUTION.md for sources and licences.
"""

import argparse
import shutil
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / "atm_ray" / "bundled_data"

# (source file, target file, how many records to keep, record kind)
SLICES = [
    ("pretrain/written/ud/en_ewt-ud-train.conllu", "written/en_ewt-ud-train.conllu", 1000, "blocks"),
    ("pretrain/written/ud/en_ewt-ud-dev.conllu", "written/en_ewt-ud-dev.conllu", 300, "blocks"),
    ("pretrain/written/ud/de_pud-ud-test.conllu", "written/de_pud-ud-test.conllu", 150, "blocks"),
    ("pretrain/written/ud/fr_pud-ud-test.conllu", "written/fr_pud-ud-test.conllu", 150, "blocks"),
    ("pretrain/written/ud/es_pud-ud-test.conllu", "written/es_pud-ud-test.conllu", 150, "blocks"),
    ("pretrain/written/wikiann/train-en.tsv", "written/wikiann-en.tsv", 600, "blocks"),
    ("pretrain/written/wikiann/train-de.tsv", "written/wikiann-de.tsv", 400, "blocks"),
    ("pretrain/written/wikiann/train-es.tsv", "written/wikiann-es.tsv", 400, "blocks"),
    ("pretrain/written/tatoeba/tatoeba.fra-eng.fra", "written/tatoeba.fra-eng.fra", 400, "lines"),
    ("pretrain/spoken/slurp_lm.txt", "spoken/slurp_lm.txt", 12000, "lines"),
    ("pretrain/spoken/xsid_train_en.txt", "spoken/xsid_train_en.txt", 12000, "lines"),
    ("nlu/slurp/devel.jsonl", "nlu/slurp/devel.jsonl", 400, "lines"),
    ("nlu/snips/train/seq.in", "nlu/snips/train/seq.in", 2000, "lines"),
    ("nlu/snips/train/seq.out", "nlu/snips/train/seq.out", 2000, "lines"),
    ("nlu/snips/train/label", "nlu/snips/train/label", 2000, "lines"),
]
WHOLE = ["nlu/snips/dev", "nlu/snips/test"]
# everyday English sentences (the English sides of Tatoeba pairs): short written text close to what people
# say to an assistant, which a tiny Stage-1 teacher learns from in minutes
TATOEBA_ENGLISH = ("deu", "fra", "spa", "ita", "por", "nld", "rus", "pol", "tur", "jpn", "swe", "ukr")
TATOEBA_ENGLISH_TARGET = "written/tatoeba-eng.eng"
LICENCES = [
    ("nlu/slurp/LICENSE.txt", "nlu/slurp/LICENSE.txt"),
]


def take(text: str, count: int, kind: str) -> str:
    if kind == "lines":
        return "".join(text.splitlines(keepends=True)[:count])
    blocks = text.split("\n\n")
    return "\n\n".join(blocks[:count]).rstrip("\n") + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    for source, target, count, kind in SLICES:
        destination = TARGET / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(take((args.source / source).read_text(encoding="utf-8"), count, kind), encoding="utf-8")
    english = [take((args.source / f"pretrain/written/tatoeba/tatoeba.{lang}-eng.eng").read_text(encoding="utf-8"), 1000, "lines")
               for lang in TATOEBA_ENGLISH]
    (TARGET / TATOEBA_ENGLISH_TARGET).write_text("".join(english), encoding="utf-8")
    for folder in WHOLE:
        shutil.copytree(args.source / folder, TARGET / folder, dirs_exist_ok=True)
    for source, target in LICENCES:
        shutil.copy(args.source / source, TARGET / target)
    print(f"bundled data written to {TARGET}")


if __name__ == "__main__":
    main()
