"""``import atm_ray`` registers the joint model with transformers' Auto classes without importing torch itself:
registration happens when transformers' Auto modules load, whatever the order of imports."""

import subprocess
import sys

import pytest


def _python(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A small joint model saved with save_pretrained (random weights: only loading is tested)."""
    from atm_ray.nlu.model import IntentSlotsConfig, RobertaPreLayerNormForIntentAndSlots

    config = IntentSlotsConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, intent_labels=["<unknown>", "play"], slot_labels=["<unknown>", "O"],
        slot_loss_weight=1.0, head_dropout=0.1, lowercase=True,
    )
    directory = tmp_path_factory.mktemp("export")
    RobertaPreLayerNormForIntentAndSlots(config).save_pretrained(directory)
    return directory


def test_import_atm_ray_stays_light():
    light = _python("import sys, atm_ray; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stdout + light.stderr[-2000:]


@pytest.mark.parametrize(
    "script",
    [
        # the README's order
        "import atm_ray\nfrom transformers import AutoModel\nprint(type(AutoModel.from_pretrained(path)).__name__)",
        # AutoConfig alone (configuration_auto without modeling_auto), then AutoModel
        "import atm_ray\nfrom transformers import AutoConfig\nprint(AutoConfig.from_pretrained(path).model_type)\n"
        "from transformers import AutoModel\nprint(type(AutoModel.from_pretrained(path)).__name__)",
        # transformers' Auto modules already loaded when atm_ray is imported
        "from transformers import AutoTokenizer, AutoModel\nimport atm_ray\n"
        "print(type(AutoModel.from_pretrained(path)).__name__)",
        # our model module first (it imports transformers' Auto modules while it is half-initialised)
        "from atm_ray.nlu import Parser\nfrom transformers import AutoModel\n"
        "print(type(AutoModel.from_pretrained(path)).__name__)",
        # one of our modules that imports transformers' Auto modules while it is itself half-initialised
        "import atm_ray.data.prepare\nfrom transformers import AutoModel\n"
        "print(type(AutoModel.from_pretrained(path)).__name__)",
    ],
    ids=["atm_ray-first", "autoconfig-alone", "transformers-first", "parser-first", "data-module-first"],
)
def test_export_loads_through_auto_classes_in_any_import_order(export, script):
    loaded = _python("import sys\npath = sys.argv[1]\n" + script, export)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[-1] == "RobertaPreLayerNormForIntentAndSlots"
    assert "could not register" not in loaded.stderr


def test_without_import_atm_ray_transformers_does_not_know_the_export(export):
    """The control: what the tests above load is due to the registration."""
    unknown = _python("import sys\nfrom transformers import AutoConfig\nAutoConfig.from_pretrained(sys.argv[1])", export)
    assert unknown.returncode != 0 and "atm-ray-intent-slots" in unknown.stderr
