import numpy as np
import pytest
import torch

from atm_ray.data.masking import IGNORE_INDEX, MaskingCollator, is_noun, mask_tokens, pack_batch, tokenize_batch
from atm_ray.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS
from atm_ray.data.tokenizer import train_tokenizer

VOCAB = 1000


def _rows(count=400, length=128, pad_from=100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_TOKENS), VOCAB, (count, length), generator=generator)
    ids[:, 0] = BOS_ID
    ids[:, 50] = EOS_ID
    ids[:, pad_from:] = PAD_ID
    return ids


def test_masking_rates_are_bert_rates():
    ids = _rows()
    corrupted, labels = mask_tokens(ids, VOCAB, 0.15, torch.Generator().manual_seed(1))
    eligible = (ids != BOS_ID) & (ids != EOS_ID) & (ids != PAD_ID)
    chosen = labels != IGNORE_INDEX
    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    # binomial: 3 standard deviations
    assert abs(n_chosen / n_eligible - 0.15) < 3 * (0.15 * 0.85 / n_eligible) ** 0.5
    assert torch.equal(labels[chosen], ids[chosen])
    became_mask = (corrupted == MASK_ID) & chosen
    unchanged = (corrupted == ids) & chosen
    randomised = chosen & ~became_mask & ~unchanged
    for share, expected in ((became_mask, 0.8), (randomised, 0.1), (unchanged, 0.1)):
        # a random replacement can draw the original id: a sliver of "unchanged" is random
        assert abs(int(share.sum()) / n_chosen - expected) < 3 * (expected * (1 - expected) / n_chosen) ** 0.5 + 0.002
    assert int((corrupted[randomised] < len(SPECIAL_TOKENS)).sum()) == 0


def test_special_and_padding_tokens_never_chosen():
    ids = _rows()
    _, labels = mask_tokens(ids, VOCAB, 0.9, torch.Generator().manual_seed(2))
    special = (ids == BOS_ID) | (ids == EOS_ID) | (ids == PAD_ID)
    assert int((labels[special] != IGNORE_INDEX).sum()) == 0


def test_noun_mode_masks_only_noun_subwords():
    ids = _rows()
    nouns = torch.zeros_like(ids)
    nouns[:, 10:20] = 1
    collator = MaskingCollator(VOCAB, 0.5, "noun", seed=3)
    batch = collator({"input_ids": ids.numpy(), "noun_mask": nouns.numpy()})
    chosen = batch["labels"] != IGNORE_INDEX
    assert chosen[:, 10:20].float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert int(chosen[:, :10].sum()) == 0 and int(chosen[:, 20:].sum()) == 0
    assert bool((batch["input_ids"][chosen] == MASK_ID).all())
    assert torch.equal(batch["attention_mask"], (ids != PAD_ID).long())


def test_collator_draws_fresh_masks_and_eval_mode_is_reproducible():
    rows = {"input_ids": _rows(8).numpy(), "noun_mask": np.zeros((8, 128), dtype=np.int64)}
    training = MaskingCollator(VOCAB, 0.15, "random", seed=0)
    assert not torch.equal(training(rows)["labels"], training(rows)["labels"])
    first = MaskingCollator(VOCAB, 0.15, "eval", seed=5)(rows)
    second = MaskingCollator(VOCAB, 0.15, "eval", seed=5)(rows)
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_is_noun_covers_upos_and_ptb():
    assert all(map(is_noun, ["NOUN", "PROPN", "NN", "NNS", "NNP", "NNPS"]))
    assert not any(map(is_noun, ["VERB", "DET", "VB", "JJ", "PRON"]))


def test_pack_keeps_sentences_whole_and_rows_fixed():
    batch = {"token_ids": [[10] * 5, [11] * 3, [12] * 20, [13] * 2], "noun_flags": [[0] * 5, [1] * 3, [0] * 20, [0] * 2]}
    packed = pack_batch(batch, seq_len=12)
    rows = packed["input_ids"]
    assert all(len(row) == 12 for row in rows)
    assert rows[0] == [BOS_ID] + [10] * 5 + [EOS_ID] + [11] * 3 + [EOS_ID] + [PAD_ID]
    assert packed["noun_mask"][0] == [0] * 7 + [1] * 3 + [0, 0]
    # the 20-token sentence is longer than a row: cut into pieces of 10
    assert rows[1] == [BOS_ID] + [12] * 10 + [EOS_ID]
    assert rows[2][:12] == [BOS_ID] + [12] * 10 + [EOS_ID]
    assert rows[3] == [BOS_ID] + [13] * 2 + [EOS_ID] + [PAD_ID] * 8
    total_real = sum(1 for row in rows for token in row if token not in (BOS_ID, EOS_ID, PAD_ID))
    assert total_real == 30


def test_tokenize_flags_noun_subwords():
    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran to the park"] * 50, vocab_size=60)
    batch = {
        "text": ["the cat sat"],
        "words": [["the", "cat", "sat"]],
        "pos": [["DET", "NOUN", "VERB"]],
    }
    out = tokenize_batch(batch, tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(out["token_ids"][0])
    flagged = "".join(piece for piece, flag in zip(pieces, out["noun_flags"][0]) if flag).replace("▁", "")
    assert flagged == "cat"
