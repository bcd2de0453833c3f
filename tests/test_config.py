import pytest

from atm_ray.cli import main
from atm_ray.config import PRESETS, ConfigError, load_config
from atm_ray.train.modeling import count_parameters


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    config = load_config(preset)
    assert config.name == preset
    assert config.pretrain.model in config.models


def test_override_sets_nested_values_with_types():
    config = load_config("tiny", ["pretrain.stage1.steps=7", "pretrain.stage1.engine.precision=bf16", "seed=3"])
    assert config.pretrain.stage1.steps == 7
    assert config.pretrain.stage1.engine.precision == "bf16"
    assert config.seed == 3


def test_override_into_list_by_index():
    config = load_config("tiny", ["data.written.train.0.max_records=5"])
    assert config.data.written.train[0].max_records == 5


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"pretrain\.stage1\.stepz: unknown key"):
        load_config("tiny", ["pretrain.stage1.stepz=4"])


def test_bad_value_names_the_key_and_reason():
    with pytest.raises(ConfigError, match=r"pretrain\.stage1\.steps: Input should be a valid integer"):
        load_config("tiny", ["pretrain.stage1.steps=abc"])
    with pytest.raises(ConfigError, match=r"models\.teacher: .*not divisible by num_heads 3"):
        load_config("tiny", ["models.teacher.num_heads=3"])
    with pytest.raises(ConfigError, match=r"zero_stage"):
        load_config("tiny", ["pretrain.stage1.engine.zero_stage=5"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny", ["steps"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config("tiny", ["data.written.train.99.lang=en"])


def test_pretrain_model_must_name_a_model():
    with pytest.raises(ConfigError, match="pretrain.model names 'nope'"):
        load_config("tiny", ["pretrain.model=nope"])


PAPER_NOMINAL = {
    "teacher_700m": 700e6,
    "teacher_2p3b": 2.3e9,
    "teacher_9p3b": 9.3e9,
    "intermediate": 170e6,
    "final": 17e6,
}


@pytest.mark.parametrize("name", sorted(PAPER_NOMINAL))
def test_paper_models_within_five_percent_of_nominal(name):
    config = load_config("paper")
    count = count_parameters(config.models[name], config.tokenizer.vocab_size)
    assert abs(count.non_embedding / PAPER_NOMINAL[name] - 1) <= 0.05


def test_paper_preset_is_set_for_a_cluster():
    config = load_config("paper")
    assert config.cluster.use_gpu and config.cluster.num_workers > 1
    assert config.pretrain.stage1.engine.precision == "autocast_bf16"
    assert config.pretrain.stage1.engine.zero_stage >= 1


def test_count_parameters_matches_allocated_model():
    from atm_ray.train.modeling import build_masked_lm

    config = load_config("tiny")
    shape = config.models["teacher"]
    count = count_parameters(shape, 1000)
    model = build_masked_lm(shape, 1000)
    assert count.total == sum(parameter.numel() for parameter in model.parameters())
    assert count.embedding == 1000 * shape.hidden_size + (shape.max_positions + 2) * shape.hidden_size + shape.hidden_size


def test_config_show_prints_every_model(capsys):
    assert main(["config", "show", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    for name in PAPER_NOMINAL:
        assert name in out
    assert "2,299,788,528" in out  # the 2.3B teacher's non-embedding count


def test_cli_reports_config_errors(capsys):
    assert main(["config", "show", "--preset", "tiny", "cluster.num_workerz=2"]) == 2
    assert "cluster.num_workerz: unknown key" in capsys.readouterr().err


def test_a_failing_stage_is_two_lines_and_a_saved_traceback(tmp_path, capsys, monkeypatch):
    """Not one of our errors (a worker's exception, a bug): the reason in one line, the traceback in a file
    of the run's logs folder, exit 1; -v raises it."""
    import atm_ray.train.stages

    def fail(*_args, **_kwargs):
        try:
            raise ValueError("the worker's own message\nits last line: shard 3 is empty")
        except ValueError as cause:
            raise RuntimeError("Training failed: 1 worker raised") from cause

    monkeypatch.setattr(atm_ray.train.stages, "run_pretrain_stage", fail)
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--stage", "1", "--preset", "tiny", "--run-dir", str(run_dir)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "atm-ray: pretrain failed: ValueError: its last line: shard 3 is empty"
    assert len(lines) == 2 and str(run_dir / "logs") in lines[1]
    (saved,) = (run_dir / "logs").glob("atm-ray-error-*.log")
    assert "RuntimeError: Training failed" in saved.read_text() and "ValueError" in saved.read_text()
    # -v sets it for Ray workers; setenv (not delenv, which records nothing when it is unset) makes the
    # teardown remove it, or every later test's Ray workers would print to the console
    monkeypatch.setenv("ATM_RAY_VERBOSE", "0")
    with pytest.raises(RuntimeError):
        main(["-v", "pretrain", "--stage", "1", "--preset", "tiny", "--run-dir", str(run_dir)])
    from atm_ray.utils import console_logging

    console_logging(False)  # the levels the other tests expect


def test_override_file_is_applied_before_key_value_overrides(tmp_path):
    overrides = tmp_path / "best_overrides.yaml"
    overrides.write_text("distill:\n  final:\n    temperature: 3.0\n    weights: {soft_ce: 0.5, hidden: 2.0}\n")
    config = load_config("tiny", ["distill.final.weights.hidden=1.5"], [str(overrides)])
    assert config.distill.final.temperature == 3.0
    assert config.distill.final.weights.soft_ce == 0.5
    assert config.distill.final.weights.hidden == 1.5  # key=value wins
    assert config.distill.final.weights.mlm == 1.0  # untouched keys keep the preset's value


def test_override_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  final:\n    temprature: 3.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml[\s\S]*distill.final.temprature: unknown key"):
        load_config("tiny", [], [str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", [], [str(tmp_path / "missing.yaml")])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config("tiny", [], [str(listed)])


def test_teacher_switch_direction_is_the_metrics_own_and_checked_at_load():
    from atm_ray.config import ConfigError, load_config

    assert load_config("tiny").distill.intermediate.switch.mode == "min"  # written/mlm_loss falls
    rising = load_config("tiny", ["distill.intermediate.switch.metric=spoken/mask_fill_accuracy"])
    assert rising.distill.intermediate.switch.mode == "max"
    with pytest.raises(ConfigError, match="distill.intermediate.switch.*spoken/mask_fill"):
        load_config("tiny", ["distill.intermediate.switch.metric=spoken/mask_fill"])
    with pytest.raises(ConfigError, match="held-out metric"):
        load_config("tiny", ["distill.intermediate.switch.metric=train_loss"])


def test_layer_map_is_checked_against_the_shapes_when_the_config_loads():
    config = load_config("cpu")
    assert config.distill.intermediate.layer_map == [0, 1, 2, 4] and config.distill.final.layer_map == [0, 1, 3]
    with pytest.raises(ConfigError, match=r"distill.final.layer_map \[0, 1\]: needs 3 entries"):
        load_config("cpu", ["distill.final.layer_map=[0,1]"])
    with pytest.raises(ConfigError, match=r"distill.intermediate.layer_map .*teacher layer 0..4"):
        load_config("cpu", ["distill.intermediate.layer_map=[0,1,2,5]"])
