from transformers import AutoTokenizer

from atm_ray.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from atm_ray.data.tokenizer import tokenizer_statistics, train_tokenizer

TEXTS = [
    "set an alarm for seven am",
    "what is the weather like in paris tomorrow",
    "Quel temps fait-il à Paris demain ?",
    "Wie wird das Wetter morgen in Berlin?",
    "東京の天気はどうですか",
] * 40


def test_trained_tokenizer_saves_and_loads_with_autotokenizer(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.convert_ids_to_tokens([BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID]) == list(SPECIAL_TOKENS)
    assert (loaded.bos_token_id, loaded.pad_token_id, loaded.eos_token_id, loaded.mask_token_id) == (BOS_ID, PAD_ID, EOS_ID, MASK_ID)
    encoded = loaded("set an alarm")["input_ids"]
    assert encoded[0] == BOS_ID and encoded[-1] == EOS_ID
    assert loaded.decode(encoded, skip_special_tokens=True) == "set an alarm"
    assert len(loaded) <= 300


def test_rare_characters_become_unknown_instead_of_failing():
    # more distinct characters than half the vocabulary: the rarest are left out, as SentencePiece does
    texts = ["abc"] * 100 + [chr(0x4E00 + index) for index in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=100)
    assert tokenizer.unk_token_id in tokenizer(chr(0x4E00 + 150), add_special_tokens=False)["input_ids"]


def test_statistics_per_language():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    records = [
        {"text": "set an alarm for seven am", "lang": "en", "words": None},
        {"text": "zzqx unseen ☃", "lang": "xx", "words": None},
    ]
    statistics = tokenizer_statistics(tokenizer, records)
    assert statistics["en"]["unknown_rate"] == 0.0
    assert statistics["en"]["subwords_per_word"] >= 1.0
    assert statistics["xx"]["unknown_rate"] > 0.0
    assert statistics["xx"]["words"] == 3


def test_lowercase_tokenizer_gives_cased_and_lower_text_the_same_pieces(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, lowercase=True)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded("Set An ALARM")["input_ids"] == loaded("set an alarm")["input_ids"]
    encoded = loaded("Wie wird das Wetter", add_special_tokens=False, return_offsets_mapping=True)
    pieces = [("Wie wird das Wetter")[start:end] for start, end in encoded["offset_mapping"]]
    assert "".join(pieces).replace(" ", "") == "WiewirddasWetter"  # offsets point into the text as given
    assert train_tokenizer(TEXTS, vocab_size=300)("Set")["input_ids"] != train_tokenizer(TEXTS, vocab_size=300)("set")["input_ids"]
