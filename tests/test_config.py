"""The run file: schema, overrides, and error messages that name the key, the value and a fix."""

from pathlib import Path

import pytest

from llamatailor.config import load_config, parse_override
from llamatailor.errors import ConfigError

GOOD = """\
name: demo
data:
  train: [data/a.jsonl]
train:
  learning_rate: 0.001
  lora:
    r: 8
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_file_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.train.learning_rate == 0.001
    assert config.train.lora.r == 8
    assert config.train.lora.alpha == 32
    assert config.model.base == "smollm2-135m-instruct"
    assert config.run_dir.root == Path("runs/demo")


def test_overrides_are_typed_and_create_nested_keys(tmp_path):
    config = load_config(
        write(tmp_path, GOOD),
        ["train.lora.r=32", "train.max_steps=10", "data.val=[v.jsonl]", "eval.json_fields=[a, b]", "seed=3"],
    )
    assert config.train.lora.r == 32
    assert config.train.max_steps == 10
    assert [source.path for source in config.data.val] == [Path("v.jsonl")]
    assert config.eval.json_fields == ["a", "b"]
    assert config.seed == 3


def test_typo_in_key_names_path_line_value_and_suggestion(tmp_path):
    path = write(tmp_path, GOOD.replace("  learning_rate: 0.001", "  learnig_rate: 0.001"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.learnig_rate (run.yaml line 5)" in message
    assert "unknown key (value 0.001)" in message
    assert "did you mean 'train.learning_rate'?" in message


def test_bad_choice_lists_allowed_values_and_closest(tmp_path):
    path = write(tmp_path, GOOD + "  lr_scheduler: cosin\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.lr_scheduler (run.yaml line 8)" in message
    assert "got 'cosin', expected one of 'cosine', 'linear' or 'constant'; did you mean 'cosine'?" in message


def test_wrong_type_and_range(tmp_path):
    path = write(tmp_path, GOOD.replace("r: 8", "r: eight") + "  batch_size: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "2 problems" in message
    assert "train.lora.r (run.yaml line 7): got 'eight'" in message
    assert "train.batch_size (run.yaml line 8): got 0: Input should be greater than or equal to 1" in message


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train \(run.yaml line 2\): required key is missing"):
        load_config(write(tmp_path, "name: x\ndata:\n  val: [a.jsonl]\n"))


def test_error_from_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), ["train.lora.rank=4"])
    message = str(info.value)
    assert "train.lora.rank (from override 'train.lora.rank=4')" in message
    assert "did you mean 'train.lora.r'?" not in message  # too far from 'rank' for a confident hint
    assert "Allowed here: r, alpha, dropout, targets" in message


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match=r"expected key\.sub=value"):
        parse_override("train.learning_rate")
    with pytest.raises(ConfigError, match=r"data\.train is a value, not a section"):
        load_config(write(tmp_path, GOOD), ["data.train.x=1"])


def test_split_ratios_must_leave_training_data(tmp_path):
    with pytest.raises(ConfigError, match=r"val_ratio \+ test_ratio is 0\.9"):
        load_config(write(tmp_path, GOOD), ["data.val_ratio=0.5", "data.test_ratio=0.4"])


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="run file not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_tracks_only_named_sections(tmp_path):
    base = load_config(write(tmp_path, GOOD))
    changed_train = load_config(write(tmp_path, GOOD), ["train.learning_rate=0.01"])
    assert base.section_hash("data") == changed_train.section_hash("data")
    assert base.section_hash("train") != changed_train.section_hash("train")


def test_run_directory_stands_for_its_resolved_config(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(config.resolved()), encoding="utf-8")
    again = load_config(run)
    assert again.data.train[0].path == Path("data/a.jsonl").resolve()
    assert again.model.base == "smollm2-135m-instruct"


def test_local_model_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    config = load_config(write(tmp_path, GOOD), ["model.base=models/mine"])
    assert config.resolved()["model"]["base"] == str(tmp_path / "models" / "mine")


def test_gates_point_at_the_bad_gguf_type_and_value(tmp_path):
    text = GOOD + "export:\n  gguf: [q5_k_m]\n  gates:\n    q5_k_m: 2.0\n"
    assert load_config(write(tmp_path, text)).export.gates == {"q5_k_m": 2.0}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text + "    q9_k: 1\n    q4_k_m: -1\n"))
    message = str(info.value)
    assert "export.gates.q9_k (run.yaml line 12): got 'q9_k', expected one of 'f32'" in message
    assert "did you mean 'q6_k'?" in message
    assert "export.gates.q4_k_m (run.yaml line 13): got -1: Input should be greater than 0" in message
