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


def _reference_encoding(tokenizer, word_lists, max_seq_len, lowercase):
    """The transformers wrapper's encoding, which ``WordEncoder`` must reproduce."""
    if lowercase:
        word_lists = [[word.lower() for word in words] for words in word_lists]
    encoded = tokenizer(word_lists, is_split_into_words=True, truncation=True, max_length=max_seq_len)
    return encoded["input_ids"], [encoded.word_ids(row) for row in range(len(word_lists))]


def test_word_encoder_gives_the_wrappers_ids_and_first_pieces(tmp_path):
    """The Parser's WordEncoder calls the Rust tokenizer directly; for our Unigram tokenizer, a BERT
    WordPiece one and a RoBERTa byte-level BPE one it must give the ids (truncation included) and
    first sub-word positions that the transformers wrapper gives."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, RobertaTokenizerFast

    from atm_ray.nlu.model import WordEncoder

    bert = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = normalizers.BertNormalizer(lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    bert.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    byte_level.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    byte_level.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizers = {
        "unigram": train_tokenizer(TEXTS, vocab_size=300),
        "wordpiece": BertTokenizerFast(tokenizer_object=bert, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]"),
        "byte-level": RobertaTokenizerFast(tokenizer_object=byte_level, add_prefix_space=True, bos_token="<s>", eos_token="</s>",
                                           pad_token="<pad>", unk_token="<unk>", mask_token="<mask>"),
    }
    word_lists = [text.split() for text in TEXTS[:5]] + [["Play", "SOME", "jazz", "🎷", "café"], ["word"] * 40, ["x"]]
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(str(tmp_path / name))
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / name))  # as the Parser loads it
        for max_seq_len, lowercase in ((64, False), (16, True), (4, False)):
            inputs, first_positions = WordEncoder(tokenizer, max_seq_len, lowercase)(word_lists)
            ids, word_ids = _reference_encoding(tokenizer, word_lists, max_seq_len, lowercase)
            assert inputs["input_ids"].shape == (len(word_lists), max(len(row) for row in ids)), name
            for row, (row_ids, row_words) in enumerate(zip(ids, word_ids)):
                assert inputs["input_ids"][row, : len(row_ids)].tolist() == row_ids, (name, max_seq_len, row)
                assert (inputs["input_ids"][row, len(row_ids):] == tokenizer.pad_token_id).all()
                assert inputs["attention_mask"][row].tolist() == [1] * len(row_ids) + [0] * (inputs["input_ids"].shape[1] - len(row_ids))
                expected = [row_words.index(word) if word in row_words else -1 for word in range(len(word_lists[row]))]
                assert first_positions[row] == expected, (name, max_seq_len, row)
            assert max(len(row) for row in ids) <= max_seq_len
            for row, words in enumerate(word_lists):  # one utterance (the encoder's own path for it)
                alone, positions = WordEncoder(tokenizer, max_seq_len, lowercase)([words])
                assert alone["input_ids"][0].tolist() == ids[row] and positions[0] == first_positions[row], (name, row)
