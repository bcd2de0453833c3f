"""Readers for the real corpora: text for pretraining and labelled intent/slot data.

Every reader yields records in one of two canonical schemas (``TEXT_SCHEMA``, ``NLU_SCHEMA``) or a
``BadRecord`` naming the line and reason; ``read_text_source`` / ``read_nlu`` raise on the first bad
record in strict mode and count them in lenient mode.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow as pa

from atm_ray.config import AtmRayError
from atm_ray.data import files

TEXT_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("lang", pa.string()),
        ("source", pa.string()),
        ("words", pa.list_(pa.string())),  # null when the corpus has no word segmentation
        ("pos", pa.list_(pa.string())),  # one tag per word: UPOS (UD) or PTB (SLURP); may be null
    ]
)

NLU_SCHEMA = pa.schema(
    [
        ("tokens", pa.list_(pa.string())),
        ("slot_tags", pa.list_(pa.string())),  # BIO, one per token
        ("intent", pa.string()),
        ("lang", pa.string()),
        ("source", pa.string()),
    ]
)

# Scripts written without spaces between words: WikiANN splits them into characters.
UNSPACED_LANGUAGES = {"ja", "zh", "th", "jpn", "cmn", "tha", "wuu", "yue"}


class DataFormatError(AtmRayError):
    """A record in a user's file is malformed; the message names file, line and reason."""

    def __init__(self, location: str, line: int, reason: str):
        super().__init__(f"{location}:{line}: {reason}")
        self.location, self.line, self.reason = location, line, reason


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str


@dataclass
class ReadReport:
    location: str
    records: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.location}: {self.records} records"
        if self.skipped:
            reasons = "; ".join(f"{count} × {reason}" for reason, count in self.skipped.most_common())
            text += f", skipped {sum(self.skipped.values())} ({reasons})"
        return text


def _collect(location: str, records: Iterable, strict: bool, limit: int | None) -> tuple[list[dict], ReadReport]:
    report = ReadReport(location)
    kept: list[dict] = []
    for record in records:
        if isinstance(record, BadRecord):
            if strict:
                raise DataFormatError(location, record.line, record.reason)
            report.skipped[record.reason] += 1
            continue
        kept.append(record)
        if limit is not None and len(kept) >= limit:
            break
    report.records = len(kept)
    return kept, report


# ---------------------------------------------------------------- spoken-form normalisation


def spoken_form(text: str) -> str:
    """Lower-case, drop punctuation and symbols, squeeze spaces.

    Digits are kept as digits ("7 am" stays "7 am"): spelling numbers out is language-specific and
    the spoken corpora mix both forms. Apostrophes inside words ("let's") are kept.
    """
    characters = []
    for index, character in enumerate(text):
        category = unicodedata.category(character)
        if character == "'" and 0 < index < len(text) - 1 and text[index - 1].isalnum() and text[index + 1].isalnum():
            characters.append(character)
        elif category[0] in "PS":
            characters.append(" ")
        else:
            characters.append(character)
    return " ".join("".join(characters).lower().split())


def to_spoken_form(record: dict) -> dict | None:
    """Normalise a text record; words that vanish (punctuation) are dropped with their POS tags."""
    if record.get("words") is None:
        text = spoken_form(record["text"])
        return {**record, "text": text} if text else None
    words, tags = [], []
    for index, word in enumerate(record["words"]):
        normalised = spoken_form(word)
        if normalised:
            words.append(normalised)
            if record.get("pos") is not None:
                tags.append(record["pos"][index])
    if not words:
        return None
    return {**record, "text": " ".join(words), "words": words, "pos": tags if record.get("pos") is not None else None}


# ---------------------------------------------------------------- text corpora


def _text_record(text: str, lang: str, source: str, words=None, pos=None) -> dict:
    return {"text": text, "lang": lang, "source": source, "words": words, "pos": pos}


def read_plain_text(content: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    for line in content.splitlines():
        line = line.strip()
        if line:
            yield _text_record(line, lang, source)


def read_conllu(content: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    """CoNLL-U sentences; a multiword token ("don't", "du") is one word with its first part's UPOS."""
    words: list[str] = []
    tags: list[str] = []
    spaces: list[bool] = []
    multiword_end = 0
    bad: BadRecord | None = None
    for line_number, line in enumerate(content.splitlines() + [""], start=1):
        if not line.strip():
            if bad is not None:
                yield bad
            elif words:
                text = "".join(word + (" " if space else "") for word, space in zip(words, spaces)).strip()
                yield _text_record(text, lang, source, words, tags)
            words, tags, spaces, multiword_end, bad = [], [], [], 0, None
            continue
        if line.startswith("#") or bad is not None:
            continue
        columns = line.split("\t")
        if len(columns) != 10:
            bad = BadRecord(line_number, f"CoNLL-U token line has {len(columns)} columns, expected 10")
            continue
        token_id, form, upos, misc = columns[0], columns[1], columns[3], columns[9]
        space_after = "SpaceAfter=No" not in misc
        if "." in token_id:
            continue  # empty nodes of enhanced dependencies carry no surface text
        if "-" in token_id:
            first, _, last = token_id.partition("-")
            if not (first.isdigit() and last.isdigit()):
                bad = BadRecord(line_number, f"bad multiword token id {token_id!r}")
                continue
            multiword_end = int(last)
            words.append(form)
            tags.append("")  # filled by the first part's UPOS
            spaces.append(space_after)
            continue
        if not token_id.isdigit():
            bad = BadRecord(line_number, f"bad token id {token_id!r}")
            continue
        if int(token_id) <= multiword_end:
            if tags and tags[-1] == "":
                tags[-1] = upos
            continue
        words.append(form)
        tags.append(upos)
        spaces.append(space_after)


def read_wikiann(content: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    joiner = "" if lang in UNSPACED_LANGUAGES else " "
    words: list[str] = []
    bad: BadRecord | None = None
    for line_number, line in enumerate(content.splitlines() + [""], start=1):
        if not line.strip():
            if bad is not None:
                yield bad
            elif words:
                yield _text_record(joiner.join(words), lang, source, words if joiner else None)
            words, bad = [], None
            continue
        if bad is not None:
            continue
        token, tab, _tag = line.partition("\t")
        if not tab or not token:
            bad = BadRecord(line_number, "expected 'token<TAB>tag'")
            continue
        words.append(token)


def read_slurp_text(content: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    """SLURP jsonl as text: the sentence, its words and their PTB POS tags."""
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        record = _json_line(line, line_number)
        if isinstance(record, BadRecord):
            yield record
            continue
        sentence = record.get("sentence")
        tokens = record.get("tokens")
        if not isinstance(sentence, str) or not isinstance(tokens, list):
            yield BadRecord(line_number, "missing 'sentence' or 'tokens'")
            continue
        try:
            words = [token["surface"] for token in tokens]
            tags = [token["pos"] for token in tokens]
        except (KeyError, TypeError):
            yield BadRecord(line_number, "a token lacks 'surface' or 'pos'")
            continue
        yield _text_record(sentence, lang, source, words, tags)


TEXT_READERS = {
    "text": read_plain_text,
    "tatoeba": read_plain_text,
    "conllu": read_conllu,
    "wikiann": read_wikiann,
    "slurp": read_slurp_text,
}


def _guess_lang(source_format: str, location: str) -> str:
    name = PurePosixPath(location).name
    if source_format == "tatoeba":  # tatoeba.deu-eng.deu
        return name.rsplit(".", 1)[-1]
    if source_format == "wikiann":  # train-de.tsv
        match = re.search(r"-([a-z]{2,3})\.tsv$", name)
        if match:
            return match.group(1)
    if source_format == "conllu":  # de_pud-ud-test.conllu
        match = re.match(r"([a-z]{2,3})_", name)
        if match:
            return match.group(1)
    if source_format == "slurp":
        return "en"
    return "und"


def read_text_source(
    source_format: str,
    location: str,
    lang: str | None = None,
    strict: bool = True,
    max_records: int | None = None,
) -> tuple[list[dict], ReadReport]:
    """Read one text corpus file into ``TEXT_SCHEMA`` records."""
    if source_format not in TEXT_READERS:
        raise DataFormatError(f"{location}: unknown text format {source_format!r}; one of {sorted(TEXT_READERS)}")
    lang = lang or _guess_lang(source_format, location)
    source = f"{source_format}:{PurePosixPath(location).name}"
    content = files.read_text(location)
    return _collect(location, TEXT_READERS[source_format](content, lang, source), strict, max_records)


# ---------------------------------------------------------------- labelled NLU data

_ANNOTATION = re.compile(r"\[([^\[\]:]+?)\s*:\s*([^\[\]]*?)\s*\]")


def parse_bracket_annotation(annotation: str) -> tuple[list[str], list[str]]:
    """Words and BIO tags from "wake me at [time : seven am]" (SLURP, MASSIVE, HWU64)."""
    tokens: list[str] = []
    tags: list[str] = []
    position = 0
    for match in _ANNOTATION.finditer(annotation):
        outside = annotation[position : match.start()]
        if "[" in outside or "]" in outside:
            raise ValueError(f"unbalanced bracket near {outside.strip()!r}")
        tokens.extend(outside.split())
        tags.extend("O" for _ in outside.split())
        slot, value = match.group(1).strip(), match.group(2).split()
        if not slot or not value:
            raise ValueError(f"empty slot name or value in {match.group(0)!r}")
        slot = slot.replace(" ", "_")
        tokens.extend(value)
        tags.extend([f"B-{slot}"] + [f"I-{slot}"] * (len(value) - 1))
        position = match.end()
    rest = annotation[position:]
    if "[" in rest or "]" in rest:
        raise ValueError(f"unbalanced bracket near {rest.strip()!r}")
    tokens.extend(rest.split())
    tags.extend("O" for _ in rest.split())
    return tokens, tags


def check_bio(tags: list[str]) -> str | None:
    """The reason ``tags`` is not a valid BIO sequence, or None."""
    previous = "O"
    for index, tag in enumerate(tags):
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            return f"tag {index + 1} {tag!r} is not O, B-<slot> or I-<slot>"
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return f"tag {index + 1} {tag!r} follows {previous!r} (an I- tag must continue its slot)"
        previous = tag
    return None


def _nlu_record(tokens, tags, intent, lang, source, line_number) -> dict | BadRecord:
    if len(tokens) != len(tags):
        return BadRecord(line_number, f"{len(tokens)} tokens but {len(tags)} slot tags")
    if not tokens:
        return BadRecord(line_number, "empty utterance")
    if not intent:
        return BadRecord(line_number, "missing intent")
    problem = check_bio(tags)
    if problem:
        return BadRecord(line_number, problem)
    return {"tokens": tokens, "slot_tags": tags, "intent": intent, "lang": lang, "source": source}


def _json_line(line: str, line_number: int) -> dict | BadRecord:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return BadRecord(line_number, f"bad JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict):
        return BadRecord(line_number, "a JSON line must be an object")
    return record


def read_jointbert(location: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    """A JointBERT split folder (SNIPS, ATIS): seq.in, seq.out and label, a line each."""
    utterances = files.read_text(files.join(location, "seq.in")).splitlines()
    tag_lines = files.read_text(files.join(location, "seq.out")).splitlines()
    intents = files.read_text(files.join(location, "label")).splitlines()
    if not (len(utterances) == len(tag_lines) == len(intents)):
        yield BadRecord(
            min(len(utterances), len(tag_lines), len(intents)) + 1,
            f"seq.in has {len(utterances)} lines, seq.out {len(tag_lines)}, label {len(intents)}",
        )
    for line_number, (utterance, tags, intent) in enumerate(zip(utterances, tag_lines, intents), start=1):
        yield _nlu_record(utterance.split(), tags.split(), intent.strip(), lang, source, line_number)


def _bracketed_records(content, lang, source, text_key, intent_key, lang_key=None):
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        record = _json_line(line, line_number)
        if isinstance(record, BadRecord):
            yield record
            continue
        annotation, intent = record.get(text_key), record.get(intent_key)
        if not isinstance(annotation, str) or not isinstance(intent, str):
            yield BadRecord(line_number, f"missing or non-string '{text_key}' or '{intent_key}'")
            continue
        try:
            tokens, tags = parse_bracket_annotation(annotation)
        except ValueError as error:
            yield BadRecord(line_number, f"broken annotation: {error}")
            continue
        record_lang = lang
        if lang_key and isinstance(record.get(lang_key), str):
            record_lang = record[lang_key].split("-")[0].split("_")[0]
        yield _nlu_record(tokens, tags, intent, record_lang, source, line_number)


def read_slurp(location: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    yield from _bracketed_records(files.read_text(location), lang, source, "sentence_annotation", "intent")


def read_massive(location: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    yield from _bracketed_records(files.read_text(location), lang, source, "annot_utt", "intent", "locale")


def read_xsid(location: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    """xSID conll (``# text``, ``# intent``, ``id<TAB>token<TAB>intent<TAB>slot``), or the English
    training pair ``en.train.text`` + ``en.train.label`` (``BIO tags<TAB>intent`` lines)."""
    if location.endswith(".text"):
        texts = files.read_text(location).splitlines()
        labels = files.read_text(location[: -len(".text")] + ".label").splitlines()
        if len(texts) != len(labels):
            yield BadRecord(min(len(texts), len(labels)) + 1, f"{len(texts)} text lines but {len(labels)} label lines")
        for line_number, (text, label) in enumerate(zip(texts, labels), start=1):
            tags, tab, intent = label.partition("\t")
            if not tab:
                yield BadRecord(line_number, "label line is not 'BIO tags<TAB>intent'")
                continue
            yield _nlu_record(text.split(), tags.split(), intent.strip(), lang, source, line_number)
        return
    tokens: list[str] = []
    tags: list[str] = []
    intent = ""
    bad: BadRecord | None = None
    start = 1
    for line_number, line in enumerate(files.read_text(location).splitlines() + [""], start=1):
        # a blank line ends a sentence; some files (ja) start the next one's comments without it
        ends_sentence = not line.strip() or (line.startswith("#") and (tokens or bad is not None))
        if ends_sentence:
            if bad is not None:
                yield bad
            elif tokens:
                yield _nlu_record(tokens, tags, intent, lang, source, start)
            tokens, tags, intent, bad = [], [], "", None
            start = line_number + (0 if line.strip() else 1)
            if not line.strip():
                continue
        if bad is not None:
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip() == "intent":
                intent = value.strip()
            continue
        columns = line.split("\t")
        if len(columns) != 4:
            bad = BadRecord(line_number, f"token line has {len(columns)} columns, expected 4")
            continue
        tokens.append(columns[1])
        tags.append(columns[3])


def read_hwu64(location: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    """HWU64 csv (``;``-separated); a folder of them is read file by file. Intent = scenario_intent."""
    if files.is_dir(location):
        for path in files.list_files(location, ".csv"):
            yield from read_hwu64(path, lang, f"hwu64:{PurePosixPath(path).name}")
        return
    reader = csv.DictReader(io.StringIO(files.read_text(location)), delimiter=";")
    required = {"scenario", "intent", "answer_annotation"}
    if not required <= set(reader.fieldnames or ()):
        yield BadRecord(1, f"header lacks {sorted(required - set(reader.fieldnames or ()))}")
        return
    for row in reader:
        line_number = reader.line_num
        try:
            tokens, tags = parse_bracket_annotation(row["answer_annotation"] or "")
        except ValueError as error:
            yield BadRecord(line_number, f"broken annotation: {error}")
            continue
        intent = f"{row['scenario']}_{row['intent']}" if row["scenario"] and row["intent"] else ""
        yield _nlu_record(tokens, tags, intent, lang, source, line_number)


def read_schuster(location: str, lang: str, source: str) -> Iterator[dict | BadRecord]:
    """Schuster et al. tsv: ``intent<TAB>start:end:slot,...<TAB>text<TAB>lang<TAB>tokenization json``;
    character spans (end exclusive) become word-level BIO over the given tokenization."""
    for line_number, line in enumerate(files.read_text(location).splitlines(), start=1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 5:
            yield BadRecord(line_number, f"{len(columns)} columns, expected 5")
            continue
        intent, span_field, text, record_lang, tokenization = columns
        try:
            token_spans = json.loads(tokenization)["tokenizations"][0]["tokenSpans"]
            words = [(span["start"], span["start"] + span["length"]) for span in token_spans]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            yield BadRecord(line_number, "bad tokenization JSON")
            continue
        slots = []
        try:
            for item in filter(None, span_field.split(",")):
                start, end, slot = item.split(":", 2)
                slots.append((int(start), int(end), slot))
        except ValueError:
            yield BadRecord(line_number, f"bad slot span list {span_field!r}")
            continue
        tags = []
        for word_start, word_end in words:
            tag = "O"
            for slot_start, slot_end, slot in slots:
                if word_start < slot_end and slot_start < word_end:
                    continue_slot = tags and tags[-1] != "O" and tags[-1][2:] == slot and word_start > slot_start
                    tag = ("I-" if continue_slot else "B-") + slot
                    break
            tags.append(tag)
        if any(end > len(text) for _, end, _ in slots):
            yield BadRecord(line_number, "a slot span ends past the text")
            continue
        tokens = [text[start:end] for start, end in words]
        yield _nlu_record(tokens, tags, intent, record_lang.split("_")[0] or lang, source, line_number)


def _guess_nlu_lang(source_format: str, name: str) -> str:
    if source_format == "xsid":  # de-st.valid.conll
        return name.split(".")[0]
    match = re.search(r"-([a-z]{2,3})\.tsv$", name)  # train-es.tsv
    return match.group(1) if source_format == "schuster" and match else "en"


NLU_READERS = {
    "jointbert": read_jointbert,
    "slurp": read_slurp,
    "massive": read_massive,
    "xsid": read_xsid,
    "hwu64": read_hwu64,
    "schuster": read_schuster,
}


def read_nlu(
    source_format: str,
    location: str,
    lang: str | None = None,
    strict: bool = True,
    max_records: int | None = None,
) -> tuple[list[dict], ReadReport]:
    """Read labelled intent/slot data into ``NLU_SCHEMA`` records."""
    if source_format not in NLU_READERS:
        raise DataFormatError(f"{location}: unknown NLU format {source_format!r}; one of {sorted(NLU_READERS)}")
    if not files.exists(location):
        raise FileNotFoundError(f"{location}: no such file or folder")
    if lang is None:
        lang = _guess_nlu_lang(source_format, PurePosixPath(location).name)
    source = f"{source_format}:{PurePosixPath(location).name}"
    return _collect(location, NLU_READERS[source_format](location, lang, source), strict, max_records)


def to_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(records, schema=schema)
