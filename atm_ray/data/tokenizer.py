"""A multilingual SentencePiece-style Unigram tokenizer trained with ``tokenizers`` on our corpora."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# RoBERTa's convention: <s>=0, <pad>=1, </s>=2, <unk>=3; our tokenizer trainer keeps it.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the masked-LM data needs from a tokenizer: the row's start and separator (``<s>``/``</s>``,
    or BERT's ``[CLS]``/``[SEP]``), padding and mask, and every special id (never a random replacement).
    The defaults are our own tokenizer's; a teacher's tokenizer brings its own (``from_tokenizer``)."""

    bos: int = BOS_ID
    eos: int = EOS_ID
    pad: int = PAD_ID
    mask: int = MASK_ID
    special: tuple[int, ...] = tuple(range(len(SPECIAL_TOKENS)))

    @property
    def never_masked(self) -> tuple[int, ...]:
        return (self.bos, self.pad, self.eos, self.mask)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        found = {"start (cls_token or bos_token)": bos, "separator (sep_token or eos_token)": eos,
                 "pad_token": tokenizer.pad_token_id, "mask_token": tokenizer.mask_token_id}
        missing = [role for role, token_id in found.items() if token_id is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)}: a masked LM's tokenizer needs them")
        return cls(bos, eos, tokenizer.pad_token_id, tokenizer.mask_token_id, tuple(sorted(set(tokenizer.all_special_ids))))

    @classmethod
    def from_dict(cls, values: dict | None) -> "SpecialTokens":
        """From a manifest's record (absent in runs prepared before teachers' tokenizers: our defaults)."""
        return cls(**{**values, "special": tuple(values["special"])}) if values else cls()

    def to_dict(self) -> dict:
        return asdict(self)


def _covered_characters(texts: list[str], coverage: float, max_characters: int) -> set[str]:
    counts = Counter(character for text in texts for character in text)
    total = sum(counts.values())
    kept: set[str] = set()
    seen = 0
    for character, count in counts.most_common(max_characters):
        if seen >= coverage * total:
            break
        kept.add(character)
        seen += count
    return kept


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    character_coverage: float = 0.9995,
    max_piece_length: int = 16,
    lowercase: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a Unigram model over NFKC-normalised (and, with ``lowercase``, lower-cased) text split on
    whitespace (Metaspace, as SentencePiece).

    As SentencePiece's ``character_coverage``, the rarest characters (beyond ``character_coverage`` of
    all characters, and beyond half the vocabulary) are left out of training and become ``<unk>``.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]) if lowercase else normalizers.NFKC()
    texts = [normalizer.normalize_str(text) for text in texts]
    alphabet = _covered_characters(texts, character_coverage, vocab_size // 2)
    texts = ["".join(character for character in text if character in alphabet or character == " ") for text in texts]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        unk_token="<unk>",
        max_piece_length=max_piece_length,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos, eos = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, BOS_ID), (eos, EOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=100_000,
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer.json (run `atm-ray prepare` first)")
    return AutoTokenizer.from_pretrained(str(directory))


def tokenizer_statistics(tokenizer: PreTrainedTokenizerFast, records: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per language: unknown-token rate (share of sub-words that are <unk>) and sub-words per word.

    Words are whitespace-separated, or the reader's word list for scripts written without spaces.
    """
    sub_words: dict[str, int] = defaultdict(int)
    unknown: dict[str, int] = defaultdict(int)
    words: dict[str, int] = defaultdict(int)
    batch: list[dict] = []

    def flush() -> None:
        encoded = tokenizer([record["text"] for record in batch], add_special_tokens=False)["input_ids"]
        for record, ids in zip(batch, encoded):
            lang = record["lang"]
            sub_words[lang] += len(ids)
            unknown[lang] += sum(1 for token_id in ids if token_id == tokenizer.unk_token_id)
            words[lang] += len(record["words"]) if record.get("words") else len(record["text"].split())
        batch.clear()

    for record in records:
        batch.append(record)
        if len(batch) == 1024:
            flush()
    if batch:
        flush()
    return {
        lang: {
            "unknown_rate": unknown[lang] / max(sub_words[lang], 1),
            "subwords_per_word": sub_words[lang] / max(words[lang], 1),
            "words": words[lang],
        }
        for lang in sorted(words)
    }
