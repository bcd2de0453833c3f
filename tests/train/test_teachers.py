"""Teachers a user already has (teachers.stage1 / teachers.stage2): small BERT and XLM-R teachers with their
own tokenizers, built here from transformers' classes and saved with save_pretrained, go through the
pipeline; unusable folders are refused before any work starts."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHORT_STAGES, clean_environment

from atm_ray.config import ConfigError, load_config

WIDTH = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512}  # the tiny students' shape
FINETUNE = ["finetune.train.0.max_records=300", "finetune.dev.0.max_records=100", "finetune.test.0.max_records=100",
            "finetune.max_epochs=2"]


def _texts() -> list[str]:
    from atm_ray.data.files import resolve
    from atm_ray.data.readers import read_nlu

    records, _ = read_nlu("jointbert", resolve("bundled:nlu/snips/train"))
    return [" ".join(record["tokens"]) for record in records]


def bert_tokenizer(texts):
    """A WordPiece tokenizer with BERT's conventions but its own ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def save_teacher(directory: Path, kind: str, texts) -> Path:
    """A random-weight teacher of the students' width (``bert`` or ``xlm-roberta``) with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    from atm_ray.data.tokenizer import train_tokenizer

    torch.manual_seed(0)
    if kind == "bert":
        tokenizer = bert_tokenizer(texts)
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), num_hidden_layers=2, max_position_embeddings=80,
                                           pad_token_id=tokenizer.pad_token_id, **WIDTH))
    else:
        tokenizer = train_tokenizer(texts, vocab_size=600, lowercase=True)
        model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, max_position_embeddings=80,
                                                       pad_token_id=tokenizer.pad_token_id, **WIDTH))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def texts():
    return _texts()


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory, texts):
    return save_teacher(tmp_path_factory.mktemp("bert-teacher"), "bert", texts)


# ---------------------------------------------------------------------- refused before any work


def _refused(folder, *overrides, match):
    from atm_ray.train.stages import run_stages

    config = load_config("tiny", [f"run_dir={folder.parent / 'run'}", f"teachers.stage1={folder}", *overrides])
    with pytest.raises(ConfigError, match=match):
        run_stages(config, ("teacher_stage1",), use_ray=False)
    assert not (folder.parent / "run" / "prepare" / "manifest.json").exists()


def test_unsafe_or_unusable_teacher_folders_are_refused_naming_the_setting(bert_teacher, tmp_path):
    import shutil

    def copy(name):
        return Path(shutil.copytree(bert_teacher, tmp_path / name))

    pickled = copy("pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    _refused(pickled, match=r"teachers.stage1: .*pickled weights \(pytorch_model.bin\)")

    remote = copy("remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForMaskedLM": "modeling.Model"}}))
    _refused(remote, match="needs remote code.*trust_remote_code")

    code = copy("code")
    (code / "modeling_custom.py").write_text("raise SystemExit")
    _refused(code, match=r"needs remote code \(modeling_custom.py\)")

    no_weights = copy("no-weights")
    (no_weights / "model.safetensors").unlink()
    _refused(no_weights, match="no \\*.safetensors weights")

    no_tokenizer = copy("no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    (no_tokenizer / "tokenizer_config.json").unlink()
    _refused(no_tokenizer, match="has no tokenizer")

    broken = copy("broken")
    (broken / "config.json").write_text('{\n  "model_type": "bert",\n  "vocab_size": ,\n  "hidden_size": 128\n}')
    _refused(broken, match=r"config.json, line 3: not valid JSON")

    _refused(tmp_path / "missing", match="is not a folder")
    _refused(bert_teacher, "data.max_seq_len=100", "models.teacher.max_positions=128", "models.intermediate.max_positions=128",
             "models.final.max_positions=128", match="reads at most 80 positions .* data.max_seq_len 100")
    # a student that cannot take the teacher's layers: named, with the two ways out
    _refused(bert_teacher, "models.intermediate.hidden_size=64", "models.intermediate.num_heads=4",
             match=r"distill.intermediate.init: teacher_layers .* hidden_size 128 \(student 64\)")


def test_a_stage2_teacher_with_another_vocabulary_is_refused(bert_teacher, tmp_path, texts):
    other = save_teacher(tmp_path / "xlmr", "xlm-roberta", texts)
    _refused(bert_teacher, f"teachers.stage2={other}", match="teachers.stage2: its vocabulary differs")
    with pytest.raises(ConfigError, match="stage2 needs stage1"):
        load_config("tiny", [f"teachers.stage2={other}"])


# ---------------------------------------------------------------------- the pieces


def test_special_tokens_come_from_the_teachers_tokenizer(bert_teacher):
    from atm_ray.data.masking import mask_tokens, pack_batch, tokenize_batch
    from atm_ray.data.tokenizer import SpecialTokens
    from atm_ray.data.teacher_folder import load_teacher_tokenizer

    tokenizer = load_teacher_tokenizer(str(bert_teacher))
    special = SpecialTokens.from_tokenizer(tokenizer)
    assert (special.bos, special.eos, special.pad, special.mask) == (2, 3, 0, 4)
    tokens = tokenize_batch({"text": ["play some jazz", "wake me up"], "words": [None, None], "pos": [None, None]}, tokenizer)
    rows = pack_batch(tokens, 16, special)["input_ids"]
    assert rows[0][0] == 2 and rows[0].count(3) == 2 and rows[0][-1] == 0
    ids = torch.tensor(rows * 200)
    corrupted, labels = mask_tokens(ids, len(tokenizer), 0.5, torch.Generator().manual_seed(0), special=special)
    chosen = labels != -100
    assert not chosen[torch.isin(ids, torch.tensor(special.never_masked))].any()
    replaced = chosen & (corrupted != 4) & (corrupted != ids)
    assert replaced.any() and not torch.isin(corrupted[replaced], torch.tensor(special.special)).any()


def test_our_own_tokenizers_masks_are_unchanged():
    """The same random draws as before teachers' tokenizers existed (randint over 5..vocab): our runs stay
    reproducible."""
    from atm_ray.data.masking import mask_tokens

    ids = torch.randint(5, 300, (64, 32), generator=torch.Generator().manual_seed(1))
    corrupted, _ = mask_tokens(ids, 300, 0.3, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    draw, action = torch.rand(ids.shape, generator=generator), torch.rand(ids.shape, generator=generator)
    expected = ids.clone()
    chosen = draw < 0.3
    expected[chosen & (action < 0.8)] = 4
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    expected[randomised] = torch.randint(5, 300, ids.shape, generator=generator)[randomised]
    assert torch.equal(corrupted, expected)


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_pre_ln_student_takes_a_post_ln_teachers_layers(kind, tmp_path, texts):
    from transformers import AutoModelForMaskedLM

    from atm_ray.config import ModelShape
    from atm_ray.data.tokenizer import SpecialTokens
    from atm_ray.train.distill import init_from_teacher_layers
    from atm_ray.train.modeling import build_masked_lm
    from atm_ray.data.teacher_folder import SAFE_LOADING, load_teacher_tokenizer

    folder = save_teacher(tmp_path / kind, kind, texts)
    teacher = AutoModelForMaskedLM.from_pretrained(folder, **SAFE_LOADING)
    special = SpecialTokens.from_tokenizer(load_teacher_tokenizer(str(folder)))
    shape = ModelShape(num_layers=1, hidden_size=128, num_heads=4, intermediate_size=512, max_positions=64)
    student = build_masked_lm(shape, teacher.config.vocab_size, seed=1, special=special)
    init_from_teacher_layers(student, teacher)
    base, encoder = teacher.base_model, student.roberta_prelayernorm
    # student layer 1 <- teacher layer 2 (every 2nd), its pre-attention norm <- teacher layer 1's output norm
    assert torch.equal(encoder.encoder.layer[0].attention.self.query.weight, base.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(encoder.encoder.layer[0].output.dense.weight, base.encoder.layer[1].output.dense.weight)
    assert torch.equal(encoder.encoder.layer[0].attention.LayerNorm.weight, base.encoder.layer[0].output.LayerNorm.weight)
    assert torch.equal(encoder.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    # positions: RoBERTa-style tables start after the padding id, BERT's at 0
    teacher_first = (teacher.config.pad_token_id + 1) if kind == "xlm-roberta" else 0
    student_first = special.pad + 1
    assert torch.equal(encoder.embeddings.position_embeddings.weight[student_first],
                       base.embeddings.position_embeddings.weight[teacher_first])
    batch = torch.tensor([[special.bos, 10, 11, special.eos, special.pad]])
    logits = student(input_ids=batch, attention_mask=(batch != special.pad).long()).logits
    assert logits.shape == (1, 5, teacher.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_a_deberta_v2_teacher_teaches_a_student_from_random_weights(tmp_path, texts):
    """DeBERTa-v2's layers do not map onto the student's: init: teacher_layers is refused before any work
    (with the way out), and with init: random the student learns from it (soft targets and hidden states)."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    from atm_ray.data.tokenizer import train_tokenizer
    from atm_ray.train.stages import run_stages
    from atm_ray.utils import read_json

    folder = tmp_path / "deberta"
    tokenizer = train_tokenizer(texts, vocab_size=500, lowercase=True)
    DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=len(tokenizer), num_hidden_layers=2, max_position_embeddings=80,
                                         pad_token_id=tokenizer.pad_token_id, **WIDTH)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _refused(folder, match="init: teacher_layers copies layers from .* not 'deberta-v2': set distill.intermediate.init: random")
    config = load_config("tiny", [f"run_dir={tmp_path / 'run'}", *SHORT_STAGES, f"teachers.stage1={folder}",
                                  "teachers.stage2=skip", "distill.intermediate.init=random",
                                  "distill.intermediate.weights.hidden=1.0"])
    (distilled,) = run_stages(config, ("intermediate_distill",), use_ray=False)
    last = read_json(distilled.stage_dir / "metrics.json")[-1]
    assert last["soft_ce_loss"] > 0 and last["hidden_loss"] > 0


# ---------------------------------------------------------------------- through the pipeline


@pytest.mark.slow
def test_pipeline_in_process_from_a_bert_teacher_with_stage2_on_it(bert_teacher, tmp_path):
    """BERT teacher with its own WordPiece ids; Stage 2 continues its masked LM on spoken text (no Ray)."""
    from atm_ray.nlu import Parser
    from atm_ray.nlu.finetune import run_finetune
    from atm_ray.train.stage_table import MASKED_LM_STAGES
    from atm_ray.train.stages import run_stages
    from atm_ray.utils import read_json

    run_dir = tmp_path / "run"
    config = load_config("tiny", [f"run_dir={run_dir}", *SHORT_STAGES, *FINETUNE, f"teachers.stage1={bert_teacher}"])
    results = dict(zip(MASKED_LM_STAGES, run_stages(config, MASKED_LM_STAGES, use_ray=False)))

    prepared = read_json(run_dir / "prepare" / "manifest.json")
    assert prepared["tokenizer_from"] == str(bert_teacher.resolve()) and prepared["special_tokens"]["pad"] == 0
    stage1 = read_json(run_dir / "teacher_stage1" / "manifest.json")
    assert stage1["provided"] and stage1["inputs"]["teacher"] == str(bert_teacher.resolve())
    assert stage1["weights_sha256"] == hashlib.sha256(
        b"model.safetensors" + (bert_teacher / "model.safetensors").read_bytes()).hexdigest()
    assert not (run_dir / "teacher_stage1" / "export").exists()  # nothing trained
    stage2 = read_json(results["teacher_stage2"].export_dir / "config.json")
    assert stage2["model_type"] == "bert"  # Stage 2 continued the brought teacher
    assert read_json(run_dir / "teacher_stage2" / "manifest.json")["inputs"]["init_from"] == str(bert_teacher.resolve())
    final = read_json(results["final_distill"].export_dir / "config.json")
    assert final["model_type"] == "roberta-prelayernorm" and final["vocab_size"] == stage2["vocab_size"]
    assert final["pad_token_id"] == 0
    assert read_json(run_dir / "final_distill" / "metrics.json")[-1]["hidden_loss"] > 0

    from atm_ray.config import AtmRayError

    with pytest.raises(AtmRayError, match="a bert model; the joint model takes atm-ray's pre-LN RoBERTa encoders"):
        run_finetune(config, results["teacher_stage2"].export_dir, name="finetune_teacher", use_ray=False)
    manifest = run_finetune(config, results["final_distill"].export_dir, name="finetune_student", use_ray=False)
    parser = Parser(manifest["outputs"]["export"])
    assert parser.tokenizer.get_vocab() == __import__("transformers").AutoTokenizer.from_pretrained(bert_teacher).get_vocab()
    parsed = parser.parse(["play some jazz music"])[0]
    assert parsed["intent"]["name"] and 0 <= parsed["intent"]["confidence"] <= 1


@pytest.mark.slow
def test_pipeline_with_ray_from_an_xlmr_teacher_without_stage2(tmp_path, texts):
    """The README's command with `teachers.stage1=DIR teachers.stage2=skip`: Ray Train, every stage to the
    comparison table, the XLM-R teacher teaching both distillation phases."""
    teacher = save_teacher(tmp_path / "xlmr", "xlm-roberta", texts)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "atm_ray.cli", "pipeline", "--preset", "tiny", "--run-dir", str(run_dir),
               *SHORT_STAGES, *FINETUNE, "cluster.num_workers=1", f"teachers.stage1={teacher}", "teachers.stage2=skip"]
    finished = subprocess.run(command, env=clean_environment(), capture_output=True, text=True, timeout=1500)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for stage in ("teacher_stage1", "teacher_stage2"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["provided"] and manifest["inputs"]["teacher"] == str(teacher.resolve()), stage
    assert "the teacher you gave" in finished.stdout
    # transformers' per-model "Loading weights" bars stay off the console (evaluation loads four models)
    assert "Loading weights" not in finished.stdout + finished.stderr
    distilled = json.loads((run_dir / "intermediate_distill" / "manifest.json").read_text())
    assert set(distilled["inputs"]["teachers"]) == {str(teacher.resolve())}
    assert (run_dir / "evaluation" / "comparison.md").is_file()
    assert f"your teacher (teachers.*), not trained here | – | – | – | – | – | – | {teacher.resolve()} |" in (run_dir / "report.md").read_text()
