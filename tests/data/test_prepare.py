import os
import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from atm_ray.cli import main
from atm_ray.config import load_config
from atm_ray.data.prepare import prepare


def test_tiny_prepare_outputs(tiny_prepared):
    config, prepared = tiny_prepared
    manifest = prepared.manifest
    assert manifest["vocab_size"] <= config.tokenizer.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(str(prepared.tokenizer_dir))
    assert len(tokenizer) == manifest["vocab_size"]
    for domain in ("written", "spoken"):
        for split in ("train", "heldout"):
            table = pq.read_table(str(prepared.shard_dir(domain, split)))
            assert table.num_rows == manifest["counts"][domain][split]["rows"] > 0
            ids = np.asarray(table["input_ids"].to_pylist())
            assert ids.shape[1] == config.data.max_seq_len
            assert (ids[:, 0] == tokenizer.bos_token_id).all()
            assert ids.max() < manifest["vocab_size"]
        heldout = pq.read_table(str(prepared.shard_dir(domain, "heldout")))
        noun_share = np.asarray(heldout["noun_mask"].to_pylist()).sum() / (np.asarray(heldout["input_ids"].to_pylist()) > 4).sum()
        # UD (UPOS) and SLURP (PTB) held-out text carries POS tags: a good share of sub-words are nouns
        assert 0.15 < noun_share < 0.6
    spoken = pq.read_table(str(prepared.shard_dir("spoken", "train")))
    decoded = tokenizer.decode(spoken["input_ids"][0].as_py(), skip_special_tokens=True)
    assert decoded == decoded.lower()  # spoken form


def test_prepare_is_skipped_when_up_to_date(tiny_prepared):
    config, prepared = tiny_prepared
    stamp = (prepared.root / "manifest.json").stat().st_mtime_ns
    assert prepare(config).root == prepared.root
    assert (prepared.root / "manifest.json").stat().st_mtime_ns == stamp


def test_prepare_reads_pyarrow_uris(tmp_path):
    from atm_ray.data.files import bundled_root

    uri = "file://" + str(bundled_root() / "spoken" / "slurp_lm.txt")
    config = load_config(
        "tiny",
        [
            f"run_dir={tmp_path}",
            "data.written.train=[{format: conllu, path: 'bundled:written/en_ewt-ud-dev.conllu'}]",
            "data.written.heldout=[]",
            f"data.spoken.train=[{{format: text, path: '{uri}', lang: en, max_records: 500}}]",
            "data.spoken.heldout=[]",
            "tokenizer.vocab_size=500",
        ],
    )
    prepared = prepare(config)
    assert prepared.manifest["counts"]["spoken"]["train"]["records"] + prepared.manifest["counts"]["spoken"]["heldout"]["records"] == 500


def test_bad_corpus_file_fails_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.conllu"
    bad.write_text("# text = a b\n1\ta\ta\tDET\t_\t_\t0\troot\t_\t_\n2\tb\n\n")
    code = main(
        ["prepare", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), f"data.written.train=[{{format: conllu, path: '{bad}'}}]"]
    )
    assert code == 2
    assert f"{bad}:3: CoNLL-U token line has 2 columns, expected 10" in capsys.readouterr().err


def test_lenient_mode_skips_and_reports(tmp_path):
    bad = tmp_path / "bad.conllu"
    good_sentence = "# text = a cat\n1\ta\ta\tDET\t_\t_\t2\tdet\t_\t_\n2\tcat\tcat\tNOUN\t_\t_\t0\troot\t_\t_\n\n"
    bad.write_text(good_sentence * 30 + "# text = x\n1\tx\n\n")
    config = load_config(
        "tiny",
        [f"run_dir={tmp_path / 'run'}", "data.strict=false", f"data.written.train=[{{format: conllu, path: '{bad}'}}]", "tokenizer.vocab_size=300"],
    )
    prepared = prepare(config)
    assert any("skipped 1" in line for line in prepared.manifest["read"])


@pytest.mark.parametrize("missing", ["bundled:written/nope.conllu", "nope/nothing.txt"])
def test_missing_corpus_is_a_clear_error(tmp_path, capsys, missing):
    code = main(["prepare", "--preset", "tiny", "--run-dir", str(tmp_path), f"data.written.train.0.path={missing}"])
    assert code == 2
    assert "no such file" in capsys.readouterr().err


def test_second_run_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    """Two commands writing into one run folder would overwrite each other: the second is refused with
    the holder's PID; a lock left by a process that has died is taken over."""
    import json
    import subprocess
    import sys

    from atm_ray.utils import LOCK_FILE, run_folder_lock

    run_dir = tmp_path / "run"
    with run_folder_lock(run_dir, "atm-ray pretrain --stage 1"):
        code = main(["prepare", "--preset", "tiny", "--run-dir", str(run_dir)])
        assert code == 2
        error = capsys.readouterr().err
        assert f"in use by process {os.getpid()}" in error and "atm-ray pretrain --stage 1" in error
        assert not (run_dir / "prepare").exists()  # nothing was written
    assert not (run_dir / LOCK_FILE).exists()  # released

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "x"}))
    with run_folder_lock(run_dir, "second"):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()


def _jointbert(folder, utterances):
    folder.mkdir(parents=True)
    (folder / "seq.in").write_text("".join(f"{text}\n" for text in utterances))
    (folder / "seq.out").write_text("".join(" ".join("O" for _ in text.split()) + "\n" for text in utterances))
    (folder / "label").write_text("".join("PlayMusic\n" for _ in utterances))
    return folder


@pytest.mark.parametrize("decontaminate", [True, False])
def test_pretraining_text_in_evaluation_sets_is_dropped(tmp_path, decontaminate):
    """Public assistant corpora overlap (xSID's training text holds most of SNIPS's test utterances): a
    pretraining text equal to a held-out, finetune.dev/test or data.exclude utterance, up to case and
    punctuation, is dropped from training; the rest is kept."""
    filler = [f"remind me to call person number {index} tomorrow" for index in range(300)]
    leaked = ["Play some Jazz music!", "what's the weather in paris", "book a table for two", "wake me up at 7"]
    (tmp_path / "spoken.txt").write_text("\n".join(filler + leaked) + "\n")
    (tmp_path / "heldout.txt").write_text("wake me up at 7\nsomething never said in training\n")
    test = _jointbert(tmp_path / "test", ["play some jazz music", "an utterance pretraining never saw"])
    dev = _jointbert(tmp_path / "dev", ["what 's the weather in paris"])
    extra = _jointbert(tmp_path / "extra", ["book a table for two"])
    config = load_config("tiny", [
        f"run_dir={tmp_path / 'run'}",
        "data.written.train=[{format: conllu, path: 'bundled:written/en_ewt-ud-dev.conllu', max_records: 300}]",
        "data.written.heldout=[]",
        f"data.spoken.train=[{{format: text, path: '{tmp_path / 'spoken.txt'}', lang: en}}]",
        f"data.spoken.heldout=[{{format: text, path: '{tmp_path / 'heldout.txt'}', lang: en}}]",
        f"finetune.test=[{{format: jointbert, path: '{test}'}}]",
        f"finetune.dev=[{{format: jointbert, path: '{dev}'}}]",
        f"data.exclude=[{{format: jointbert, path: '{extra}'}}]",
        f"data.decontaminate={str(decontaminate).lower()}",
        "tokenizer.vocab_size=300",
    ])
    manifest = prepare(config).manifest
    expected = len(filler) if decontaminate else len(filler) + len(leaked)
    assert manifest["counts"]["spoken"]["train"]["records"] == expected
    assert manifest["decontaminated"] == ({"written": 0, "spoken": len(leaked)} if decontaminate else {})
