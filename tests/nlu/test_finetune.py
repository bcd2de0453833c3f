"""Joint intent + slot fine-tuning: the model, the loop (in process), the Ray Train stage, the Parser,
and bad labelled data reaching the user as file:line."""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from atm_ray.cli import main
from atm_ray.config import load_config
from atm_ray.data.files import resolve
from atm_ray.data.readers import read_nlu
from atm_ray.nlu.finetune import NluTrainer, fit, load_nlu_data, run_finetune
from atm_ray.nlu.model import (
    UNKNOWN_LABEL,
    Parser,
    build_joint_model,
    encode_records,
    label_maps,
    predict_words,
)

SNIPS = "bundled:nlu/snips"


def _config(run_dir, *overrides):
    return load_config(
        "tiny",
        [
            f"run_dir={run_dir}",
            f"finetune.train=[{{format: jointbert, path: '{SNIPS}/train', max_records: 1200}}]",
            f"finetune.dev=[{{format: jointbert, path: '{SNIPS}/dev', max_records: 200}}]",
            f"finetune.test=[{{format: jointbert, path: '{SNIPS}/test', max_records: 300}}]",
            "finetune.max_epochs=4",
            *overrides,
        ],
    )


def test_encoder_weights_come_from_the_masked_lm_export(encoder_dir):
    from transformers import AutoModelForMaskedLM

    masked_lm = AutoModelForMaskedLM.from_pretrained(str(encoder_dir))
    model = build_joint_model(encoder_dir, [UNKNOWN_LABEL, "a"], [UNKNOWN_LABEL, "O"])
    for name, value in masked_lm.roberta_prelayernorm.state_dict().items():
        torch.testing.assert_close(model.roberta_prelayernorm.state_dict()[name], value, rtol=0, atol=0)
    scratch = build_joint_model(encoder_dir, [UNKNOWN_LABEL, "a"], [UNKNOWN_LABEL, "O"], scratch=True, seed=1)
    embeddings = "embeddings.word_embeddings.weight"
    assert not torch.equal(scratch.roberta_prelayernorm.state_dict()[embeddings], masked_lm.roberta_prelayernorm.state_dict()[embeddings])


def test_slot_labels_sit_on_first_sub_words_and_unseen_labels_are_unknown(encoder_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    train = [{"tokens": ["wake", "me", "at", "seven"], "slot_tags": ["O", "O", "O", "B-time"], "intent": "alarm"}]
    intents, slots = label_maps(train)
    assert intents == [UNKNOWN_LABEL, "alarm"] and slots == [UNKNOWN_LABEL, "B-time", "O"]
    dev = [{"tokens": ["play", "supercalifragilistic", "now"], "slot_tags": ["O", "B-song", "O"], "intent": "play"}]
    encoded = encode_records(tokenizer, dev, intents, slots, 16, lowercase=False)
    assert encoded["intent_labels"].tolist() == [0]  # "play" was never seen in training
    labelled = np.flatnonzero(encoded["slot_labels"][0] != -100)
    assert len(labelled) == 3  # one label per word, however many sub-words the long word has
    assert encoded["slot_labels"][0][labelled].tolist() == [slots.index("O"), 0, slots.index("O")]
    pieces = tokenizer(["play", "supercalifragilistic", "now"], is_split_into_words=True)
    assert labelled.tolist() == [pieces.word_ids().index(word) for word in range(3)]


def test_export_round_trips_and_the_parser_gives_character_spans(encoder_dir, tmp_path):
    from transformers import AutoTokenizer

    config = _config(tmp_path, "finetune.max_epochs=1")
    data = load_nlu_data(config.finetune, config.data.root, True, 0)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    intents, slots = label_maps(data.train)
    model = build_joint_model(encoder_dir, intents, slots)
    encoded = encode_records(tokenizer, data.train, intents, slots, 48, lowercase=True)
    trainer = NluTrainer(model, config.finetune, steps_per_epoch=len(data.train) // 32 + 1)

    def batches(epoch):
        for start in range(0, len(data.train), 32):
            yield {name: array[start : start + 32] for name, array in encoded.items()}

    reports = []
    fit(trainer, model, batches, data.dev, tokenizer, torch.device("cpu"), lambda metrics, _: reports.append(metrics))
    assert [metrics["epoch"] for metrics in reports] == [1]
    trainer.export(tmp_path / "export", tokenizer)
    words = [record["tokens"] for record in data.test[:50]]
    parser = Parser(tmp_path / "export")
    assert parser.predict(words) == predict_words(model, tokenizer, words, top_k=parser.top_k)

    text = "  play some   music by the beatles  "
    (parsed,) = parser.parse([text])
    assert parsed["intent"]["name"] in intents and 0 < parsed["intent"]["confidence"] <= 1
    for slot in parsed["slots"]:
        assert text[slot["start"] : slot["end"]] == slot["value"] and slot["value"].strip() == slot["value"]
    # the ranking: the answer first, most probable first, probabilities of one distribution
    ranking = [item["confidence"] for item in parsed["intents"]]
    assert parsed["intents"][0] == parsed["intent"] and len(ranking) == min(3, len(intents) - 1)
    assert ranking == sorted(ranking, reverse=True) and sum(ranking) <= 1 + 1e-6
    # a slot's confidence is its least sure word's tag probability
    (prediction,) = parser.predict([text.split()])
    spans = [(tag, probability) for tag, probability in zip(prediction["slot_tags"], prediction["tag_confidences"])]
    assert all(0 < probability <= 1 for _, probability in spans)
    if parsed["slots"]:
        first = parsed["slots"][0]
        word_index = len(text[: first["start"]].split())
        words_in_slot = len(first["value"].split())
        assert first["confidence"] == min(probability for _, probability in spans[word_index : word_index + words_in_slot])
    # below the threshold the configured fallback intent answers; the ranking still shows the guesses
    unsure = Parser(tmp_path / "export", fallback_intent="not_understood", fallback_threshold=1.0).parse([text])[0]
    assert unsure["fallback"] and unsure["intent"]["name"] == "not_understood" and unsure["intents"] == parsed["intents"]
    assert not parsed["fallback"]
    with pytest.raises(ValueError, match="utterance 1 is empty"):
        parser.parse(["hello", "   "])


def test_min_steps_gives_a_small_training_set_more_epochs_and_patience(encoder_dir, tmp_path):
    """SLURP devel makes 52 steps an epoch against SNIPS's 409: ``min_steps`` gives it the epochs that reach the
    same budget, and early stopping a patience in proportion; a large set keeps ``max_epochs``."""
    from transformers import AutoTokenizer

    config = _config(tmp_path, "finetune.max_epochs=2", "finetune.patience=1", "finetune.min_steps=6")
    assert config.finetune.schedule(steps_per_epoch=1) == (6, 3)
    assert config.finetune.schedule(steps_per_epoch=4) == (2, 1)  # 8 steps already reach the budget
    assert config.finetune.model_copy(update={"min_steps": 0}).schedule(1) == (2, 1)

    data = load_nlu_data(config.finetune, config.data.root, True, 0)
    train = data.train[:48]  # 2 batches of 32 rows: 2 steps an epoch, so 3 epochs reach 6 steps
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    intents, slots = label_maps(data.train)
    encoded = encode_records(tokenizer, train, intents, slots, 48, lowercase=True)
    trainer = NluTrainer(build_joint_model(encoder_dir, intents, slots), config.finetune, steps_per_epoch=2)
    assert (trainer.max_epochs, trainer.patience) == (3, 2)

    def batches(epoch):
        for start in range(0, len(train), 32):
            yield {name: array[start : start + 32] for name, array in encoded.items()}

    reports = []
    fit(trainer, trainer.model, batches, data.dev[:50], tokenizer, torch.device("cpu"), lambda metrics, _: reports.append(metrics))
    # patience 2 cannot stop 3 epochs early; the linear schedule reaches 0 at the budget's last step
    assert [metrics["epoch"] for metrics in reports] == [1, 2, 3]
    assert trainer.scheduler.get_last_lr()[0] == 0


def test_export_loads_through_transformers_auto_classes(nlu_models):
    """One call, no trust_remote_code, in a fresh interpreter where only `import atm_ray` ran."""
    import subprocess
    import sys

    script = (
        "import sys, atm_ray, torch\n"
        "from transformers import AutoConfig, AutoModel, AutoTokenizer\n"
        "model = AutoModel.from_pretrained(sys.argv[1]).eval()\n"
        "assert type(model).__name__ == 'RobertaPreLayerNormForIntentAndSlots', type(model)\n"
        "assert AutoConfig.from_pretrained(sys.argv[1]).model_type == 'atm-ray-intent-slots'\n"
        "inputs = AutoTokenizer.from_pretrained(sys.argv[1])(['play some jazz'], return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    print(model(**inputs).intent_logits.argmax(-1).item())\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script, nlu_models["A"]], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    parser = Parser(nlu_models["A"])
    expected = parser.model.config.intent_labels.index(parser.parse(["play some jazz"])[0]["intent"]["name"])
    assert int(loaded.stdout.split()[-1]) == expected


def test_frozen_encoder_leaves_encoder_weights_unchanged(encoder_dir, tmp_path):
    config = _config(tmp_path, "finetune.max_epochs=1", "finetune.freeze_encoder=true")
    manifest = run_finetune(config, encoder_dir, name="frozen", use_ray=False)
    # the model card opens with the metadata block the Hugging Face Hub reads, its scores the test's
    import yaml

    card = (Path(manifest["outputs"]["export"]) / "README.md").read_text()
    assert card.startswith("---\n")
    metadata = yaml.safe_load(card.split("---\n")[1])
    scores = {metric["name"]: metric["value"] for metric in metadata["model-index"][0]["results"][0]["metrics"]}
    test_scores = json.loads((Path(manifest["outputs"]["export"]).parent / "test_scores.json").read_text())
    assert scores["exact match"] == round(100 * test_scores["exact_match"], 2)
    assert metadata["library_name"] == "transformers" and metadata["base_model"] == str(encoder_dir) and metadata["datasets"]
    from atm_ray.nlu.model import RobertaPreLayerNormForIntentAndSlots

    tuned = RobertaPreLayerNormForIntentAndSlots.from_pretrained(manifest["outputs"]["export"])
    initial = build_joint_model(encoder_dir, tuned.config.intent_labels, tuned.config.slot_labels, seed=config.seed)
    for name, value in initial.roberta_prelayernorm.state_dict().items():
        torch.testing.assert_close(tuned.roberta_prelayernorm.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(tuned.intent_head.weight, initial.intent_head.weight)
    assert not torch.equal(tuned.slot_head.weight, initial.slot_head.weight)


@pytest.mark.slow
def test_ray_fine_tune_beats_the_majority_intent_by_a_wide_margin(encoder_dir, tmp_path, local_ray):
    config = _config(tmp_path)
    manifest = run_finetune(config, encoder_dir, use_ray=True)
    data = load_nlu_data(config.finetune, config.data.root, True, 0)
    majority = Counter(record["intent"] for record in data.test).most_common(1)[0][1] / len(data.test)
    metrics = manifest["metrics"]
    assert metrics["test/intent_accuracy"] >= majority + 0.4, (majority, metrics)
    assert metrics["test/slot_f1"] > 0.2 and metrics["test/count"] == 300
    export = tmp_path / "finetune_student" / "export"
    card = (export / "README.md").read_text()
    assert str(encoder_dir) in card and "early stopping on dev exact match" in card
    # a rerun with the same settings is skipped: nothing retrained, nothing rewritten
    written = {path: path.stat().st_mtime_ns for path in (tmp_path / "finetune_student").rglob("*") if path.is_file()}
    assert run_finetune(config, encoder_dir, use_ray=True) == manifest
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "finetune_student").rglob("*") if path.is_file()} == written


def test_several_languages_are_scored_per_language(encoder_dir, tmp_path, shared_data):
    xsid = shared_data / "nlu" / "xsid"
    config = _config(
        tmp_path,
        "finetune.max_epochs=1",
        f"finetune.train=[{{format: xsid, path: '{xsid}/de.valid.conll'}}, {{format: xsid, path: '{xsid}/da.valid.conll'}}]",
        "finetune.dev=[]",
        "finetune.test=[]",
    )
    manifest = run_finetune(config, encoder_dir, use_ray=False)
    import json

    by_lang = json.loads((tmp_path / "finetune_student" / "test_scores.json").read_text())["by_lang"]
    assert set(by_lang) == {"de", "da"}
    assert sum(scores["count"] for scores in by_lang.values()) == manifest["metrics"]["test/count"]


@pytest.mark.parametrize(
    "tags, reason",
    [("O O\nO O\n", "3 tokens but 2 slot tags"), ("O O\nO I-x O\n", "'I-x' follows 'O'")],
)
def test_bad_labelled_data_names_file_and_line(encoder_dir, tmp_path, capsys, tags, reason):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "seq.in").write_text("hi there\nplay some jazz\n")
    (folder / "seq.out").write_text(tags)
    (folder / "label").write_text("Greet\nPlay\n")
    code = main(["finetune", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--model", str(encoder_dir), "--data", f"jointbert:{folder}"])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{folder}:2: " in error and reason in error


def test_evaluate_command_writes_the_comparison(encoder_dir, tmp_path, capsys):
    config = _config(tmp_path, "finetune.max_epochs=1")
    export = run_finetune(config, encoder_dir, name="one", use_ray=False)["outputs"]["export"]
    output = tmp_path / "comparison"
    code = main(["evaluate", "--preset", "tiny", "--models", f"base={export}", f"same={export}",
                 "--data", f"jointbert:{SNIPS}", "--output", str(output)])
    assert code == 0
    import json

    result = json.loads((output / "comparison.json").read_text())
    assert result["overall"]["baseline"] == "base"
    same = result["overall"]["models"]["same"]
    assert same["count"] == 700  # the bundled SNIPS test split
    assert same["exact_match_relative_error"] == 0.0
    assert "| same |" in (output / "comparison.md").read_text() and "| same |" in capsys.readouterr().out


def test_int8_parser_keeps_accuracy(nlu_models):
    """Dynamic int8 quantisation (the serving option for CPUs) changes scores by at most a point."""
    from atm_ray.nlu.metrics import nlu_scores

    records, _ = read_nlu("jointbert", resolve(f"{SNIPS}/test"))
    words = [record["tokens"] for record in records]
    full = nlu_scores(records, Parser(nlu_models["A"]).predict(words))
    quantized = Parser(nlu_models["A"], quantize="int8")
    assert any("quantized" in type(module).__module__ for module in quantized.model.modules())
    int8 = nlu_scores(records, quantized.predict(words))
    print(f"fp32 vs int8 on SNIPS test: intent {full['intent_accuracy']:.4f} / {int8['intent_accuracy']:.4f}, "
          f"slot F1 {full['slot_f1']:.4f} / {int8['slot_f1']:.4f}, exact match {full['exact_match']:.4f} / {int8['exact_match']:.4f}")
    for metric in ("intent_accuracy", "slot_f1", "exact_match"):
        assert abs(full[metric] - int8[metric]) <= 0.01, (metric, full[metric], int8[metric])


def test_mean_pooled_intent_head_ignores_padding_and_round_trips(encoder_dir, tmp_path):
    records, _ = read_nlu("jointbert", resolve(f"{SNIPS}/train"), max_records=200)
    intents, slots = label_maps(records)
    model = build_joint_model(encoder_dir, intents, slots, intent_pooling="mean").eval()
    first = build_joint_model(encoder_dir, intents, slots).eval()  # same weights, the first token's state
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    words = [record["tokens"] for record in records[:8]]
    batch = encode_records(tokenizer, records[:8], intents, slots, 48, lowercase=True)
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode():
        padded = model(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"]))
        for row in range(8):
            length = int(batch["attention_mask"][row].sum())
            alone = model(input_ids=torch.from_numpy(batch["input_ids"][row : row + 1, :length]),
                          attention_mask=torch.from_numpy(batch["attention_mask"][row : row + 1, :length]))
            torch.testing.assert_close(padded.intent_logits[row], alone.intent_logits[0], atol=1e-5, rtol=1e-5)
        reference = first(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"]))
    assert not torch.allclose(padded.intent_logits, reference.intent_logits)  # the setting reaches the head
    torch.testing.assert_close(padded.slot_logits, reference.slot_logits)  # and only the intent head
    model.save_pretrained(str(tmp_path / "export"))
    tokenizer.save_pretrained(str(tmp_path / "export"))
    for backend in ("torch", "onnxruntime"):
        parser = Parser(tmp_path / "export", backend=backend)
        assert parser.model.config.intent_pooling == "mean"
        got = parser.predict(words)
        wanted = predict_words(model, tokenizer, words, top_k=parser.top_k)
        assert [item["intent"] for item in got] == [item["intent"] for item in wanted]
        np.testing.assert_allclose([item["confidence"] for item in got], [item["confidence"] for item in wanted], atol=1e-4)


def test_a_fine_tuning_is_stale_when_its_records_change_not_only_their_count(tmp_path):
    # a corrected label file of the same size must not find the old fine-tuning up to date
    from atm_ray.nlu.finetune import plan_finetune

    config = _config(tmp_path)
    data = load_nlu_data(config.finetune, config.data.root, True, 0)
    encoder = Path(__file__).resolve().parents[1] / "fixtures" / "spoken_teacher"
    plan = lambda d: plan_finetune(config, d, encoder, "finetune_student", False, tmp_path).config_hash  # noqa: E731
    relabelled = [dict(record) for record in data.train]
    relabelled[5]["intent"] = next(r["intent"] for r in data.train if r["intent"] != relabelled[5]["intent"])

    assert plan(data) == plan(load_nlu_data(config.finetune, config.data.root, True, 0))
    assert plan(replace(data, train=relabelled)) != plan(data)
