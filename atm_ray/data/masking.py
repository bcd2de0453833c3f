"""Masked-LM data: tokenise and pack text into fixed-length rows, and mask them dynamically."""

from __future__ import annotations

import functools

import numpy as np
import torch

from atm_ray.config import AtmRayError
from atm_ray.data.tokenizer import SpecialTokens

IGNORE_INDEX = -100
OURS = SpecialTokens()  # our own tokenizer's ids; a teacher's tokenizer brings its own


def is_noun(tag: str) -> bool:
    """NOUN/PROPN in Universal POS, NN/NNS/NNP/NNPS in Penn Treebank tags (SLURP)."""
    return tag in ("NOUN", "PROPN") or tag.startswith("NN")


def _word_spans(text: str, words: list[str]) -> list[tuple[int, int] | None]:
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for word in words:
        start = text.find(word, cursor)
        if start < 0:
            spans.append(None)
            continue
        spans.append((start, start + len(word)))
        cursor = start + len(word)
    return spans


def tokenize_batch(batch: dict[str, list], tokenizer) -> dict[str, list]:
    """Sub-word ids without special tokens, and a flag per sub-word: part of a noun word."""
    encoded = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True)
    all_flags = []
    for text, words, tags, offsets in zip(batch["text"], batch["words"], batch["pos"], encoded["offset_mapping"]):
        flags = [0] * len(offsets)
        if words and tags:
            noun_spans = [span for span, tag in zip(_word_spans(text, words), tags) if span and is_noun(tag)]
            for index, (start, end) in enumerate(offsets):
                if end > start and any(start < noun_end and noun_start < end for noun_start, noun_end in noun_spans):
                    flags[index] = 1
        all_flags.append(flags)
    return {"token_ids": encoded["input_ids"], "noun_flags": all_flags}


def pack_batch(batch: dict[str, list], seq_len: int, special: SpecialTokens = OURS) -> dict[str, list]:
    """Greedily pack ``<s> a </s> b </s> ...`` (BERT: ``[CLS] a [SEP] b [SEP] ...``) into rows of ``seq_len``,
    padded at the end.

    A sentence never straddles two rows unless it alone is longer than a row, in which case it is
    cut into row-sized pieces.
    """
    rows_ids: list[list[int]] = []
    rows_nouns: list[list[int]] = []
    room = seq_len - 2
    current_ids, current_nouns = [special.bos], [0]

    def flush() -> None:
        nonlocal current_ids, current_nouns
        if len(current_ids) > 1:
            padding = seq_len - len(current_ids)
            rows_ids.append(current_ids + [special.pad] * padding)
            rows_nouns.append(current_nouns + [0] * padding)
        current_ids, current_nouns = [special.bos], [0]

    for token_ids, noun_flags in zip(batch["token_ids"], batch["noun_flags"]):
        for start in range(0, len(token_ids), room):
            piece_ids, piece_nouns = token_ids[start : start + room], noun_flags[start : start + room]
            if len(current_ids) + len(piece_ids) + 1 > seq_len:
                flush()
            current_ids += piece_ids + [special.eos]
            current_nouns += piece_nouns + [0]
    flush()
    return {"input_ids": rows_ids, "noun_mask": rows_nouns}


def most_frequent_token(input_ids: np.ndarray, special: SpecialTokens = OURS) -> int:
    """The most frequent ordinary token of packed rows: always guessing it is the unigram plateau's
    mask-filling accuracy, the reference a model must beat to have learned anything from context."""
    counts = np.bincount(np.asarray(input_ids).ravel(), minlength=max(special.special) + 2)
    counts[list(special.never_masked)] = 0
    return int(counts.argmax())


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    candidates: torch.Tensor | None = None,
    replace_all: bool = False,
    special: SpecialTokens = OURS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the tokens; of those 80% become ``<mask>``, 10% a random
    token and 10% stay. Special and padding tokens are never chosen; ``candidates`` (a 0/1 tensor)
    narrows the choice further (noun mode), and ``replace_all`` masks every chosen token (evaluation).

    Returns the corrupted ids and the labels (the original id where chosen, -100 elsewhere).
    """
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    for token_id in special.never_masked:
        eligible &= input_ids != token_id
    if candidates is not None:
        eligible &= candidates.bool()
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = eligible & (draw < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    corrupted = input_ids.clone()
    if replace_all:
        corrupted[chosen] = special.mask
        return corrupted, labels
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    corrupted[chosen & (action < 0.8)] = special.mask
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    # a random ordinary token: an index into the non-special ids (for ours, 5.., as randint(5, vocab) drew)
    ordinary = _ordinary_ids(vocab_size, special.special).to(input_ids.device)
    random_ids = ordinary[torch.randint(0, len(ordinary), input_ids.shape, generator=generator, device=input_ids.device)]
    corrupted[randomised] = random_ids[randomised]
    return corrupted, labels


@functools.lru_cache(maxsize=8)
def _ordinary_ids(vocab_size: int, special: tuple[int, ...]) -> torch.Tensor:
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[token_id for token_id in special if token_id < vocab_size]] = False
    return keep.nonzero().flatten()


class MaskingCollator:
    """Turns a batch of packed rows into model inputs with fresh masks on every call.

    ``mode="random"`` is training-time BERT masking; ``mode="noun"`` masks only sub-words of nouns
    (every chosen one becomes ``<mask>``) for noun mask-filling accuracy.
    """

    def __init__(self, vocab_size: int, probability: float = 0.15, mode: str = "random", seed: int = 0,
                 special: SpecialTokens = OURS):
        if mode not in ("random", "noun", "eval"):
            raise AtmRayError(f"mode must be 'random', 'eval' or 'noun', not {mode!r}")
        self.vocab_size, self.probability, self.mode, self.special = vocab_size, probability, mode, special
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        input_ids = _as_matrix(batch["input_ids"])
        candidates = _as_matrix(batch["noun_mask"]) if self.mode == "noun" else None
        corrupted, labels = mask_tokens(
            input_ids,
            self.vocab_size,
            self.probability,
            self.generator,
            candidates=candidates,
            replace_all=self.mode != "random",
            special=self.special,
        )
        return {"input_ids": corrupted, "attention_mask": (input_ids != self.special.pad).long(), "labels": labels}


def _as_matrix(column) -> torch.Tensor:
    """Rows of equal length as a 2-D tensor (Ray Data hands list columns over as arrays of arrays)."""
    array = np.asarray(column)
    if array.dtype == object:
        array = np.stack(list(array))
    return torch.tensor(array, dtype=torch.long)
