"""The run file: schema, overrides, and error messages that name the key, the value and a fix."""

import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from llamatailor.config import ModelSection, RunConfig, _section_type, load_config, parse_override
from llamatailor.errors import ConfigError, EncodingError

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


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "  optimizer: adamw_8bits\n",
            "train.optimizer (run.yaml line 8): got 'adamw_8bits', expected one of 'adamw', 'adamw_8bit', "
            "'paged_adamw_8bit' or 'paged_adamw_32bit'; did you mean 'adamw_8bit'?",
        ),
        (
            "  precision: bf61\n",
            "train.precision (run.yaml line 8): got 'bf61', expected one of 'auto', 'fp32', 'bf16' or 'fp16'; "
            "did you mean 'bf16'?",
        ),
        (
            "  method: qlora4\n",
            "train.method (run.yaml line 8): got 'qlora4', expected one of 'lora', 'qlora' or 'full'; "
            "did you mean 'qlora'?",
        ),
    ],
    ids=["optimizer", "precision", "method"],
)
def test_vocabulary_choices_are_listed_in_the_yaml_spelling(tmp_path, line, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + line))
    assert expected in str(info.value)


def test_the_schema_offers_exactly_the_chat_families_there_are():
    from llamatailor.models.families import FAMILIES

    offered = set(typing.get_args(ModelSection.model_fields["family"].annotation))
    assert offered - {"auto"} == set(FAMILIES) == {"llama2", "llama3", "llama4", "chatml"}
    assert "auto" in offered


def test_the_schema_loads_without_torch_or_the_data_package():
    # The CLI's --help and every command read the schema first; the PII defaults live in the vocabulary.
    code = (
        "import sys, llamatailor.config as c; "
        "print(sorted(m for m in ('torch', 'phonenumbers', 'llamatailor.data') if m in sys.modules)); "
        "print(c.PiiSection().phone_regions, c.PiiSection().kinds[:2])"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown == "[]\n['US', 'GB'] ['email', 'phone']\n"


def test_wrong_type_and_range(tmp_path):
    path = write(tmp_path, GOOD.replace("r: 8", "r: eight") + "  batch_size: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "2 problems" in message
    assert "train.lora.r (run.yaml line 7): got 'eight'" in message
    assert "train.batch_size (run.yaml line 8): got 0: Input should be greater than or equal to 1" in message


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of the run file's float fields under `model` (a dict of floats as `<path>.f16`)."""
    keys = []
    for name, field in model.model_fields.items():
        section = _section_type(field.annotation)
        if section is not None:
            keys += _float_keys(section, f"{prefix}{name}.")
        elif field.annotation is float or float in typing.get_args(field.annotation):
            keys.append(prefix + name)
        elif typing.get_origin(field.annotation) is dict and "float" in repr(field.annotation):
            keys.append(f"{prefix}{name}.f16")
    return keys


def test_every_float_field_refuses_infinity_and_nan(tmp_path):
    """1e400 overflows to inf and slips past `gt=0`; NaN fails a bound with a misleading message."""
    keys = _float_keys(RunConfig)
    assert {"train.epochs", "dpo.beta", "data.dedup.threshold", "export.gates.f16"} <= set(keys)
    assert len(keys) >= 15
    judge = ["eval.judge.base_url=http://127.0.0.1:9/v1", "eval.judge.model=judge"]
    for key in keys:
        for value, shown in ((".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")):
            with pytest.raises(ConfigError) as info:
                load_config(write(tmp_path, GOOD), [*judge, f"{key}={value}"])
            assert str(info.value).endswith(
                f"  - {key} (from override '{key}={value}'): got {shown}: Input should be a finite number"
            ), str(info.value)


def test_infinite_and_nan_floats_in_the_run_file_are_refused_by_line(tmp_path):
    """PyYAML reads 1e400 (no dot) as a string, which pydantic turns into inf."""
    path = write(
        tmp_path, GOOD.replace("  learning_rate: 0.001\n", "  epochs: 1e400\n  warmup_ratio: .nan\n")
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: invalid run file (2 problems)",
        "  - train.epochs (run.yaml line 5): got '1e400': Input should be a finite number",
        "  - train.warmup_ratio (run.yaml line 6): got nan: Input should be a finite number",
    ]
    assert load_config(path, ["train.epochs=2.5", "train.warmup_ratio=0.1"]).train.epochs == 2.5


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train \(run.yaml line 2\): required key is missing"):
        load_config(write(tmp_path, "name: x\ndata:\n  val: [a.jsonl]\n"))


def test_error_from_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), ["train.lora.rank=4"])
    message = str(info.value)
    assert "train.lora.rank (from override 'train.lora.rank=4')" in message
    assert "did you mean 'train.lora.r'?" not in message  # too far from 'rank' for a confident hint
    assert "Allowed here: r, alpha, targets, expert_r, dropout" in message


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


def billion_laughs(levels: int) -> str:
    """Nine aliases of the level below on each level: 9**levels strings once the aliases are expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_the_alias_that_passes_the_limit(tmp_path):
    path = write(tmp_path, GOOD + billion_laughs(9))  # l0 on line 8
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    elapsed = time.perf_counter() - started
    # Reached through aliases: 9*10 (l1) + 9*91 (l2) + 9*820 (l3) = 8,289; the first *l3 adds 7,381 more.
    assert str(info.value).startswith(
        f"{path} line 12: alias *l3 takes the nodes reached through aliases past"
    )
    assert "10,000" in str(info.value)
    assert elapsed < 0.5, elapsed
    with pytest.raises(ConfigError, match=r"^override 'seed=\[&a \[1, 1.*: alias \*b takes the nodes"):
        load_config(
            write(tmp_path, GOOD),
            [f"seed=[&a [{', '.join(['1'] * 100)}], &b [{', '.join(['*a'] * 99)}], [*b, *b]]"],
        )


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path):
    text = """\
name: demo
data:
  train: &files [data/a.jsonl, data/b.jsonl]
  test: *files
train:
  <<: &schedule {learning_rate: 0.001, batch_size: 2}
  lora: {r: 8}
dpo:
  <<: *schedule
"""
    config = load_config(write(tmp_path, text))
    assert [item.path for item in config.data.test] == [Path("data/a.jsonl"), Path("data/b.jsonl")]
    assert (config.dpo.learning_rate, config.dpo.batch_size, config.train.lora.r) == (0.001, 2, 8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed: &a [1, *a]\n", r"run.yaml line 1: alias \*a refers to a node that contains it"),
        ("seed: " + "[" * 1000 + "]" * 1000 + "\n", r"run.yaml line 1: nested deeper than 64 levels"),
        ("name: !!python/object/apply:os.getcwd []\n", r"not valid YAML: could not determine a constructor"),
    ],
    ids=["recursive-alias", "deep-nesting", "python-tag"],
)
def test_hostile_yaml_shapes_are_refused(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def with_output_dir(value: str) -> str:
    return GOOD.replace("name: demo\n", f"name: demo\noutput_dir: {value}\n")  # on line 2


def test_output_dir_at_the_filesystem_root_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, with_output_dir("/")))
    assert str(info.value) == (
        "output_dir (run.yaml line 2) is '/', the filesystem root; name a folder for runs, such as runs"
    )
    with pytest.raises(
        ConfigError, match=r"^output_dir \(from override 'output_dir=/'\) is '/', the filesystem"
    ):
        load_config(write(tmp_path, GOOD), ["output_dir=/"])


@pytest.mark.parametrize("under", ["", "/sub", "/../afile"], ids=["is-a-file", "under-a-file", "dotdot"])
def test_output_dir_meeting_a_file_is_refused(tmp_path, under):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    value = f"{tmp_path / 'afile'}{under}"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, with_output_dir(value)))
    assert str(info.value) == (
        f"output_dir (run.yaml line 2) is {value!r}, but {tmp_path / 'afile'} is a file, "
        f"so the run directory {Path(value).resolve() / 'demo'} cannot be created"
    )


def test_run_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "demo").write_text("x", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"^output_dir \(run.yaml line 2\) is '.*', but .*/demo is a file, so the run"
    ):
        load_config(write(tmp_path, with_output_dir(str(tmp_path))))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_output_dir_loads_but_no_stage_starts(tmp_path):
    """/proc takes no new folders, not even from root (for whom os.access says yes)."""
    from llamatailor.pipeline import STAGE_BY_NAME, run_stage

    config = load_config(write(tmp_path, with_output_dir("/proc/llamatailor-runs")))  # reading stays possible
    expected = (
        "output_dir (run.yaml line 2) is '/proc/llamatailor-runs', but the run directory "
        "/proc/llamatailor-runs/demo cannot be created: "
    )
    with pytest.raises(ConfigError) as info:
        config.create_run_dir()
    assert str(info.value).startswith(expected)
    assert str(info.value).endswith("; choose a folder you can write to (e.g. output_dir=runs)")
    with pytest.raises(
        ConfigError, match=r"^output_dir \(run.yaml line 2\) is '/proc/llamatailor-runs', but"
    ):
        run_stage(STAGE_BY_NAME["train"], config)  # (prepare first finds its data file missing)


def test_writable_output_dir_is_created_for_a_stage(tmp_path):
    config = load_config(write(tmp_path, with_output_dir(str(tmp_path / "new" / "runs"))))
    assert not (tmp_path / "new").exists()  # loading writes nothing
    assert config.create_run_dir().root == tmp_path / "new" / "runs" / "demo"
    assert (tmp_path / "new" / "runs" / "demo").is_dir()


def test_run_file_with_a_byte_order_mark_loads_as_without(tmp_path):
    plain = load_config(write(tmp_path, GOOD))
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("learning_rate", "learnig_rate").encode("utf-8"))
    with pytest.raises(ConfigError, match=r"train\.learnig_rate \(bom\.yaml line 5\)"):  # lines still count
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode("utf-8"))
    assert load_config(path).model_dump() == plain.model_dump()


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (b"\xff\xfe" + GOOD.encode("utf-16-le"), "the file is UTF-16 LE (byte-order mark found)"),
        (GOOD.encode("utf-16-le"), "the file looks like UTF-16 without a byte-order mark"),
        (GOOD.replace("demo", "démo").encode("latin-1"), "not UTF-8 (byte 7: b'\\xe9')"),
    ],
    ids=["utf16-bom", "utf16", "latin1"],
)
def test_run_file_in_another_encoding_is_refused_by_name(tmp_path, data, found):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {found}")
    assert str(info.value).endswith("save it as UTF-8 (with or without a byte-order mark) and run again")


def test_chat_template_file_with_a_byte_order_mark(tmp_path):
    from llamatailor.models.loading import prepare_tokenizer
    from tiny_models import real_tokenizer

    stock = prepare_tokenizer(real_tokenizer("chatml"), ModelSection())
    template = tmp_path / "chat.jinja"
    template.write_bytes(b"\xef\xbb\xbf" + stock.tokenizer.chat_template.encode("utf-8"))
    chat = prepare_tokenizer(real_tokenizer("chatml"), ModelSection(chat_template=template))
    assert chat.tokenizer.chat_template == stock.tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    rendered = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n")  # no BOM character before the first turn
    assert rendered == stock.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    template.write_bytes(b"\xff\xfe" + "{{ x }}".encode("utf-16-le"))
    with pytest.raises(EncodingError, match=rf"^{template}: the file is UTF-16 LE"):
        prepare_tokenizer(stock.tokenizer, ModelSection(chat_template=template))


def test_the_demo_run_file_loads_and_its_data_matches_what_it_scores(monkeypatch):
    """examples/demo.yaml (what `make demo` runs) validates, and its 420 records answer with exactly the
    JSON keys its eval scores, the module and function taken from the signature in the input."""
    import json

    from llamatailor.models.source import EMBEDDED_MODELS

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    config = load_config(Path("examples/demo.yaml"))
    assert config.model.base in EMBEDDED_MODELS and config.train.method == "lora"
    assert config.train.save_steps % config.train.eval_steps == 0 and config.export.gguf == [
        "f16",
        "q8_0",
        "q4_k_m",
    ]
    [(split, source)] = config.data.inputs()
    lines = source.path.read_text(encoding="utf-8").splitlines()
    assert split == "train" and len(lines) == 420
    for line in lines:
        record = json.loads(line)
        answer = json.loads(record["output"])
        assert list(answer) == config.eval.json_fields
        name = f"{answer['module']}.{answer['function']}"
        assert record["input"].startswith(f"{name}("), (record["input"], name)
        assert all(isinstance(answer[key], list) for key in ("required", "optional"))


def test_phone_regions_are_checked_against_libphonenumber(tmp_path):
    config = load_config(
        write(tmp_path, GOOD.replace("data:\n", "data:\n  pii: {phone_regions: [AU, IN]}\n"))
    )
    assert config.data.pii.phone_regions == ["AU", "IN"]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace("data:\n", "data:\n  pii:\n    phone_regions: [AU, uk]\n")))
    assert "data.pii.phone_regions (run.yaml line 4)" in str(info.value)
    assert "unknown region 'uk': expected ISO 3166 country codes" in str(info.value)


@pytest.mark.parametrize(
    ("text", "mark", "note"),
    [
        (
            "name: demo\noutput_dir: !!python/object/apply:os.getcwd []\n",
            "line 2, column 13",
            "Python tags are not allowed in a run file: !!python/object/apply:os.getcwd (line 2) would build "
            "a Python object; a run file holds plain data (text, numbers, lists, mappings), so remove the tag",
        ),
        (
            "name: demo\ndata:\n\ttrain: [data/a.jsonl]\n",
            "line 3, column 1",
            "YAML indents with spaces, not tabs: replace the tab on line 3 with spaces",
        ),
    ],
    ids=["python-tag", "tab"],
)
def test_python_tags_and_tabs_say_what_to_change(tmp_path, text, mark, note):
    """PyYAML's own words ("could not determine a constructor", "found character '\\t'") end with what to do,
    and its marks name the run file rather than "<unicode string>"."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert f'in "{path}", {mark}:' in message
    assert message.endswith(f"\n{note}")
