import json

import pytest

from atm_ray.data.readers import (
    NLU_SCHEMA,
    TEXT_SCHEMA,
    DataFormatError,
    check_bio,
    parse_bracket_annotation,
    read_nlu,
    read_text_source,
    spoken_form,
    to_spoken_form,
    to_table,
)
from conftest import FIXTURES

# Record counts from ../shared/data/README.md
TEXT_COUNTS = [
    ("conllu", "pretrain/written/ud/en_ewt-ud-train.conllu", 12544),
    ("conllu", "pretrain/written/ud/en_ewt-ud-dev.conllu", 2001),
    ("conllu", "pretrain/written/ud/en_ewt-ud-test.conllu", 2077),
    ("conllu", "pretrain/written/ud/fr_pud-ud-test.conllu", 1000),
    ("wikiann", "pretrain/written/wikiann/train-de.tsv", 20000),
    ("tatoeba", "pretrain/written/tatoeba/tatoeba.deu-eng.deu", 1000),
    ("text", "pretrain/spoken/slurp_lm.txt", 29104),
    ("text", "pretrain/spoken/xsid_train_en.txt", 43605),  # the README says 43,606; the file has 43,605 lines
    ("slurp", "nlu/slurp/devel.jsonl", 2033),
]

NLU_COUNTS = [
    ("jointbert", "nlu/snips/train", 13084),
    ("jointbert", "nlu/snips/dev", 700),
    ("jointbert", "nlu/snips/test", 700),
    ("slurp", "nlu/slurp/devel.jsonl", 2033),
    ("hwu64", "nlu/hwu64/train", 9960),
    ("hwu64", "nlu/hwu64/test", 1076),
    ("xsid", "nlu/xsid/de-st.valid.conll", 300),
    ("xsid", "nlu/xsid/en.test.conll", 500),
    ("xsid", "nlu/xsid/ja.test.conll", 250),  # ja has 250 test sentences, not the 500 of the others
    ("xsid", "nlu/xsid/no.test.conll", 5500),  # 11 Norwegian dialects x 500
    ("schuster", "nlu/schuster/train-es.tsv", 3616),
    ("schuster", "nlu/schuster/eval-es.tsv", 1983),
    ("schuster", "nlu/schuster/test-th.tsv", 1692),
]


@pytest.mark.parametrize("source_format,path,count", TEXT_COUNTS)
def test_text_readers_on_real_files(shared_data, source_format, path, count):
    records, report = read_text_source(source_format, str(shared_data / path))
    assert len(records) == count == report.records
    table = to_table(records, TEXT_SCHEMA)
    assert table.schema == TEXT_SCHEMA
    assert all(record["text"] for record in records)


def test_conllu_keeps_upos_and_multiword_tokens(shared_data):
    records, _ = read_text_source("conllu", str(shared_data / "pretrain/written/ud/en_ewt-ud-dev.conllu"))
    first = records[0]
    assert first["text"] == "From the AP comes this story :"  # as in the file's "# text"
    assert first["words"] == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert first["pos"] == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]
    assert first["lang"] == "en"
    french, _ = read_text_source("conllu", str(shared_data / "pretrain/written/ud/fr_pud-ud-test.conllu"))
    # "du" = "de" + "le" is one surface word tagged with its first part's UPOS
    assert any("du" in record["words"] for record in french)
    assert all(len(record["words"]) == len(record["pos"]) and "" not in record["pos"] for record in french)


def test_wikiann_joins_unspaced_scripts(shared_data):
    records, _ = read_text_source("wikiann", str(shared_data / "pretrain/written/wikiann/train-ja.tsv"), max_records=5)
    assert records[0]["lang"] == "ja" and " " not in records[0]["text"]
    english, _ = read_text_source("wikiann", str(shared_data / "pretrain/written/wikiann/train-en.tsv"), max_records=1)
    assert english[0]["text"] == "R.H. Saunders ( St. Lawrence River ) ( 968 MW )"


@pytest.mark.parametrize("source_format,path,count", NLU_COUNTS)
def test_nlu_readers_on_real_files(shared_data, source_format, path, count):
    records, report = read_nlu(source_format, str(shared_data / path))
    assert len(records) == count
    assert not report.skipped
    table = to_table(records, NLU_SCHEMA)
    assert table.schema == NLU_SCHEMA
    for record in records:
        assert len(record["tokens"]) == len(record["slot_tags"]) and record["intent"]


def test_slurp_annotation_to_bio(shared_data):
    records, _ = read_nlu("slurp", str(shared_data / "nlu/slurp/devel.jsonl"), max_records=1)
    assert records[0]["tokens"] == "siri what is one american dollar in japanese yen".split()
    assert records[0]["slot_tags"] == ["O"] * 4 + ["B-currency_name", "I-currency_name", "O", "B-currency_name", "I-currency_name"]
    assert records[0]["intent"] == "qa_currency"


def test_schuster_character_spans_to_word_bio(shared_data):
    records, _ = read_nlu("schuster", str(shared_data / "nlu/schuster/train-es.tsv"), max_records=1)
    assert records[0]["tokens"] == ["Cambiar", "alarma", "de", "7am", "a", "7pm", "por", "favor"]
    assert records[0]["slot_tags"] == ["O", "O", "O", "B-datetime", "B-alarm/alarm_modifier", "B-datetime", "O", "O"]
    assert records[0]["lang"] == "es"


def test_hwu64_intent_is_scenario_and_intent(shared_data):
    records, _ = read_nlu("hwu64", str(shared_data / "nlu/hwu64/train"))
    assert len({record["intent"] for record in records}) == 64
    assert any(tag.startswith("B-date") for record in records for tag in record["slot_tags"])


def test_xsid_training_pair_has_real_malformed_records(shared_data):
    path = str(shared_data / "nlu/xsid/en.train.text")
    with pytest.raises(DataFormatError, match=r"en\.train\.text:\d+: tag \d+ '.*'"):
        read_nlu("xsid", path)
    records, report = read_nlu("xsid", path, strict=False)
    assert len(records) + sum(report.skipped.values()) == 43605  # lines in the file
    assert 0 < sum(report.skipped.values()) < 1000
    assert "skipped" in report.summary()


def test_massive_fixture():
    records, _ = read_nlu("massive", str(FIXTURES / "massive_sample.jsonl"))
    assert [record["lang"] for record in records] == ["en", "de", "fr"]
    assert records[0]["slot_tags"] == ["O", "O", "O", "O", "B-time", "I-time", "O", "B-date"]
    assert records[1]["slot_tags"] == ["O", "O"]
    assert records[2]["tokens"][-2:] == ["paris", "demain"]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_malformed_jointbert_strict_and_lenient(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    _write(folder / "seq.in", ["play some jazz", "wake me up"])
    _write(folder / "seq.out", ["O O B-genre", "O O"])
    _write(folder / "label", ["PlayMusic", "SetAlarm"])
    with pytest.raises(DataFormatError) as error:
        read_nlu("jointbert", str(folder))
    assert error.value.line == 2 and "3 tokens but 2 slot tags" in str(error.value)
    assert str(folder) in str(error.value)
    records, report = read_nlu("jointbert", str(folder), strict=False)
    assert len(records) == 1 and report.skipped == {"3 tokens but 2 slot tags": 1}


def test_bad_json_and_broken_annotation(tmp_path):
    good = json.dumps({"sentence_annotation": "wake me at [time : six]", "intent": "alarm_set"})
    broken = json.dumps({"sentence_annotation": "wake me at [time : six", "intent": "alarm_set"})
    path = _write(tmp_path / "data.jsonl", [good, "{not json", broken])
    with pytest.raises(DataFormatError, match=r"data\.jsonl:2: bad JSON"):
        read_nlu("slurp", path)
    records, report = read_nlu("slurp", path, strict=False)
    assert len(records) == 1
    reasons = list(report.skipped)
    assert any(reason.startswith("bad JSON") for reason in reasons)
    assert any(reason.startswith("broken annotation") for reason in reasons)


def test_bad_bio_transition_names_the_line(tmp_path):
    path = _write(tmp_path / "en.valid.conll", ["# text = play jazz", "# intent = play", "1\tplay\tplay\tO", "2\tjazz\tplay\tI-genre", ""])
    with pytest.raises(DataFormatError, match=r"en\.valid\.conll:1: tag 2 'I-genre' follows 'O'"):
        read_nlu("xsid", path)


def test_conllu_with_wrong_column_count(tmp_path):
    path = _write(tmp_path / "bad.conllu", ["# text = a b", "1\ta\ta\tDET\t_\t_\t0\troot\t_\t_", "2\tb\tb", ""])
    with pytest.raises(DataFormatError, match=r"bad\.conllu:3: CoNLL-U token line has 3 columns"):
        read_text_source("conllu", path)


def test_bracket_annotation_and_bio_checks():
    assert parse_bracket_annotation("set [time : 7 am] alarm") == (["set", "7", "am", "alarm"], ["O", "B-time", "I-time", "O"])
    with pytest.raises(ValueError, match="empty slot"):
        parse_bracket_annotation("set [time : ] alarm")
    assert check_bio(["B-a", "I-a", "O", "B-b"]) is None
    assert "not O, B-<slot> or I-<slot>" in check_bio(["Oa"])


def test_spoken_form_normalisation():
    assert spoken_form("Wake me up at 7:30, please!") == "wake me up at 7 30 please"
    assert spoken_form("Let's go to O'Brien's.") == "let's go to o'brien's"
    record = {"text": "The cat, sat.", "lang": "en", "source": "x", "words": ["The", "cat", ",", "sat", "."], "pos": ["DET", "NOUN", "PUNCT", "VERB", "PUNCT"]}
    normalised = to_spoken_form(record)
    assert normalised["text"] == "the cat sat"
    assert normalised["pos"] == ["DET", "NOUN", "VERB"]
    assert to_spoken_form({"text": "?!", "lang": "en", "source": "x", "words": None, "pos": None}) is None


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_nlu("jointbert", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_text_source("text", str(tmp_path / "nope.txt"))
