"""The prepare stage: read the corpora, train the tokenizer, pack MLM shards for each domain (written, spoken).

Output, under ``<run_dir>/prepare``::

    tokenizer/                      Hugging Face tokenizer (AutoTokenizer.from_pretrained)
    shards/{written,spoken}/{train,heldout}/shard-00000.parquet
    tokenizer_stats.json            unknown-token rate and sub-words per word, per language
    manifest.json                   config hash, counts, read reports (written last)
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from atm_ray.config import DOMAINS, Config, CorpusConfig
from atm_ray.data import files
from atm_ray.data.readers import read_nlu, read_text_source, to_spoken_form
from atm_ray.data.masking import most_frequent_token, pack_batch, tokenize_batch
from atm_ray.data.tokenizer import SpecialTokens, load_tokenizer, tokenizer_statistics, train_tokenizer
from atm_ray.data.teacher_folder import TOKENIZER_FILES, check_teacher_folder, load_teacher_tokenizer
from atm_ray.utils import atomic_write_json, file_sha256, read_json, settings_hash

# besides TOKENIZER_FILES, what save_pretrained may write for a tokenizer (hashed when present)
EXTRA_TOKENIZER_FILES = ("special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spm.model")


def files_hash(folder: Path, names: tuple[str, ...]) -> str:
    return settings_hash({name: file_sha256(folder / name) for name in names if (folder / name).is_file()})

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
SHARD_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("noun_mask", pa.list_(pa.int8()))])
PREPARE_SECTIONS = ("seed", "data", "tokenizer")


@dataclass(frozen=True)
class PreparedData:
    """Where the prepare stage left its outputs."""

    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def shard_dir(self, domain: str, split: str) -> Path:
        return self.root / "shards" / domain / split

    @property
    def manifest(self) -> dict:
        return read_json(self.root / "manifest.json")

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens.from_dict(self.manifest.get("special_tokens"))

    def unigram_tokens(self) -> dict[str, int]:
        """The most frequent training token of each domain (the unigram plateau's guess)."""
        recorded = self.manifest.get("most_frequent_token")
        if recorded:
            return recorded
        # prepared before this was recorded: count it from the shards
        return {domain: most_frequent_token(pq.read_table(self.shard_dir(domain, "train"), columns=["input_ids"])
                                          .column("input_ids").combine_chunks().flatten().to_numpy(), self.special_tokens)
                for domain in DOMAINS}


def read_corpus(corpus: CorpusConfig, root: str, strict: bool, seed: int) -> tuple[dict[str, list[dict]], list[str]]:
    """Train and held-out records of one domain (written or spoken), and a line per file read."""
    reports = []

    def read_all(sources) -> list[dict]:
        records = []
        for source in sources:
            location = files.resolve(source.path, root)
            read, report = read_text_source(source.format, location, source.lang, strict, source.max_records)
            reports.append(report.summary())
            records.extend(read)
        if corpus.spoken_form:
            records = [normalised for normalised in map(to_spoken_form, records) if normalised is not None]
        return records

    train = read_all(corpus.train)
    if corpus.heldout:
        heldout = read_all(corpus.heldout)
    else:
        random.Random(seed).shuffle(train)
        cut = max(1, int(len(train) * corpus.heldout_fraction))
        heldout, train = train[:cut], train[cut:]
    return {"train": train, "heldout": heldout}, reports


def evaluation_sources(config: Config) -> list:
    """The labelled sets whose utterances pretraining must not see (``data.decontaminate``)."""
    if not config.data.decontaminate:
        return []
    return [*config.finetune.dev, *config.finetune.test, *config.data.exclude]


def _match_key(text: str) -> str:
    # letters and digits only: labelled sets are tokenised ("what 's", "7 am"), pretraining text is not
    return "".join(character for character in text.lower() if character.isalnum())


def decontaminate(corpora: dict[str, dict[str, list[dict]]], sources: list, root: str) -> dict[str, int]:
    """Drop training texts that also appear in a held-out text or a labelled set of ``sources``; returns how
    many per domain.

    Texts match when their letters and digits are equal, lower-cased. A set that is not there (pretraining
    on a machine without the labelled data) is skipped with a warning.
    """
    held = {_match_key(record["text"]) for domain in DOMAINS for record in corpora[domain]["heldout"]}
    for source in sources:
        location = files.resolve(source.path, root)
        if not files.exists(location):
            logger.warning("prepare: %s not found: pretraining text is not checked against it", location)
            continue
        records, _ = read_nlu(source.format, location, source.lang, strict=False)
        held.update(_match_key(" ".join(record["tokens"])) for record in records)
    held.discard("")
    removed = {}
    for domain in DOMAINS:
        train = corpora[domain]["train"]
        kept = [record for record in train if _match_key(record["text"]) not in held]
        removed[domain] = len(train) - len(kept)
        corpora[domain]["train"] = kept
    return removed


def write_shards(table: pa.Table, directory: Path, rows_per_shard: int) -> int:
    """Write ``table`` as numbered Parquet shards; each file appears only when complete."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        final = directory / f"shard-{index:05d}.parquet"
        partial = final.with_suffix(".parquet.partial")
        pq.write_table(table.slice(start, rows_per_shard), partial)
        partial.replace(final)
    return table.num_rows


def tokenize_and_pack(records: list[dict], tokenizer, seq_len: int, num_proc: int, special: SpecialTokens) -> pa.Table:
    if not records:
        return SHARD_SCHEMA.empty_table()
    dataset = datasets.Dataset.from_list(records)
    steps = ((tokenize_batch, {"tokenizer": tokenizer}, "tokenise"), (pack_batch, {"seq_len": seq_len, "special": special}, "pack"))
    for function, arguments, description in steps:
        dataset = dataset.map(
            function,
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=dataset.column_names,
            fn_kwargs=arguments,
            desc=description,
        )
    return dataset.with_format("arrow")[:].cast(SHARD_SCHEMA)


def prepare(config: Config, run_dir: Path | None = None, force: bool = False) -> PreparedData:
    """Run the prepare stage, or return its outputs when a finished run with the same config exists."""
    run_dir = Path(run_dir or config.resolved_run_dir())
    output = PreparedData(run_dir / "prepare")
    teacher = config.teachers.stage1  # its tokenizer replaces the one we would train
    # a folder that cannot be used is refused before any work (its tokenizer is loaded once, below)
    teacher_config = check_teacher_folder(teacher, "teachers.stage1") if teacher else None
    config_hash = config.section_hash(*PREPARE_SECTIONS)
    evaluation = evaluation_sources(config)
    if evaluation:  # the shards depend on the sets they were checked against
        config_hash = settings_hash({"sections": config_hash,
                                     "evaluation": [source.model_dump(mode="json") for source in evaluation]})
    if teacher:  # the teacher's tokenizer replaces ours: its files are part of what the shards depend on
        config_hash = settings_hash({"sections": config_hash, "tokenizer": str(Path(teacher).expanduser().resolve()),
                                     "files": files_hash(Path(teacher).expanduser(), TOKENIZER_FILES + EXTRA_TOKENIZER_FILES)})
    manifest_path = output.root / "manifest.json"
    if not force and manifest_path.is_file() and read_json(manifest_path).get("config_hash") == config_hash:
        logger.info("prepare: up to date in %s", output.root)
        return output
    if manifest_path.exists():
        manifest_path.unlink()
    output.root.mkdir(parents=True, exist_ok=True)

    # progress bars on a terminal; in a log file they are noise
    were_disabled = datasets.are_progress_bars_disabled()
    bars = sys.stderr.isatty() and not were_disabled
    if not bars:
        datasets.disable_progress_bars()
    try:
        return _prepare(config, output, config_hash, manifest_path, bars, teacher_config)
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def _prepare(config: Config, output: PreparedData, config_hash: str, manifest_path: Path, bars: bool,
             teacher_config: dict | None) -> PreparedData:
    data = config.data
    corpora: dict[str, dict[str, list[dict]]] = {}
    reports: list[str] = []
    for domain in tqdm(DOMAINS, desc="prepare: read corpora", disable=not bars):
        corpora[domain], domain_reports = read_corpus(getattr(data, domain), data.root, data.strict, config.seed)
        reports += domain_reports
    for line in reports:
        logger.debug("read %s", line)  # all of them are in the manifest's "read"
    logger.info("prepare: read %d files, %s", len(reports),
                ", ".join(f"{len(corpora[domain]['train'])} {domain} training texts" for domain in DOMAINS))
    removed = decontaminate(corpora, evaluation_sources(config), data.root) if data.decontaminate else {}
    if any(removed.values()):
        logger.info("prepare: dropped %s training texts that are in held-out or evaluation sets (data.decontaminate)",
                    " and ".join(f"{count} {domain}" for domain, count in removed.items()))

    teacher = config.teachers.stage1
    if teacher:
        logger.info("prepare: the tokenizer of teacher %s (tokenizer.vocab_size of the preset is not used)", teacher)
        tokenizer = load_teacher_tokenizer(teacher)
        vocab_size = teacher_config["vocab_size"]  # the model's (may exceed the tokenizer's)
    else:
        training_text = [record["text"] for domain in DOMAINS for record in corpora[domain]["train"]]
        logger.info("prepare: training a %d-piece tokenizer on %d texts", config.tokenizer.vocab_size, len(training_text))
        tokenizer = train_tokenizer(training_text, config.tokenizer.vocab_size, lowercase=config.tokenizer.lowercase)
    tokenizer.save_pretrained(str(output.tokenizer_dir))
    tokenizer = load_tokenizer(output.tokenizer_dir)
    special = SpecialTokens.from_tokenizer(tokenizer)
    if not teacher:
        vocab_size = len(tokenizer)

    statistics = {
        domain: tokenizer_statistics(tokenizer, corpora[domain]["heldout"] + corpora[domain]["train"]) for domain in DOMAINS
    }
    atomic_write_json(output.root / "tokenizer_stats.json", statistics)

    counts: dict[str, dict[str, dict[str, int]]] = {}
    unigram: dict[str, int] = {}
    for domain in DOMAINS:
        counts[domain] = {}
        for split in SPLITS:
            records = corpora[domain][split]
            table = tokenize_and_pack(records, tokenizer, data.max_seq_len, data.num_proc, special)
            rows = write_shards(table, output.shard_dir(domain, split), data.shard_rows)
            counts[domain][split] = {"records": len(records), "rows": rows}
            if split == "train":
                unigram[domain] = most_frequent_token(table.column("input_ids").combine_chunks().flatten().to_numpy(), special)

    atomic_write_json(
        manifest_path,
        {
            "stage": "prepare",
            "config_hash": config_hash,
            "vocab_size": vocab_size,
            "special_tokens": special.to_dict(),
            "tokenizer_from": str(Path(teacher).expanduser().resolve()) if teacher else None,
            "seq_len": data.max_seq_len,
            "counts": counts,
            "most_frequent_token": unigram,
            "decontaminated": removed,
            "read": reports,
        },
    )
    return output


def format_summary(prepared: PreparedData) -> str:
    manifest = prepared.manifest
    lines = [f"prepared data in {prepared.root}", f"  tokenizer: {prepared.tokenizer_dir} ({manifest['vocab_size']} pieces)"]
    for domain, splits in manifest["counts"].items():
        for split, count in splits.items():
            lines.append(
                f"  {domain}/{split}: {count['records']} texts -> {count['rows']} rows of {manifest['seq_len']} "
                f"in {prepared.shard_dir(domain, split)}"
            )
    statistics = json.loads((prepared.root / "tokenizer_stats.json").read_text())
    lines.append("  tokenizer per language (unknown rate, sub-words per word):")
    for domain, languages in statistics.items():
        for lang, values in languages.items():
            lines.append(
                f"    {domain:8s} {lang:6s} {values['unknown_rate']:.4f}  {values['subwords_per_word']:.2f}"
            )
    return "\n".join(lines)
