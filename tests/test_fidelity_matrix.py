"""The fidelity matrix: every hand-off, checked with numbers, for every chat family and training method.

Families: ChatML (SmolLM2's vocabulary), Llama 2 (32k SentencePiece), Llama 3.1, 3.2 and 3.3 (Meta's own
templates on the 128k vocabulary, on a base with Llama 3's RoPE scaling), Llama 4 (a Mixture-of-Experts
`Llama4ForCausalLM` with Llama 4's pre-tokenizer, special tokens and template: tests/tiny_models.py). Methods:
LoRA, DoRA, rsLoRA, QLoRA (4-bit NF4 base), full fine-tuning, LoRA then DPO. Each cell trains a tiny model for a few steps to
answer "ok" and stop, then merges it in fp32 and in bf16 and exports each merge to GGUF. ChatML and Llama 2 run
every method. The three Llama 3.x families share one vocabulary, RoPE scaling and random weights and differ only
in their template, which no method sees (methods train on rendered ids): each runs two of the methods
(SPLIT_METHODS), so every method runs on the 128k vocabulary and every template through every hand-off; Llama
4 runs LoRA then DPO here; LoRA on its routed experts (targets: experts) goes through the same hand-offs in
tests/test_export_llama4.py, with every GGUF type, and QLoRA (routed experts unquantized) through training and
merge in tests/test_llama4.py (the export sees only the merged model). The checks:

* rendered ids = `apply_chat_template`, the loss mask = the assistant spans and their end-of-turn token
  (per family: the method never sees the template);
* merged = adapter model (the merge stage's gate: fp32 within 1e-3; bf16 within 1e-3 plus four times
  what the adapter model moves on a bf16 base);
* GGUF: llama.cpp's token ids = the training tokenizer's, its logits against the merged model's within the
  file type's gate, and a greedy chat answer through the file's own template that says "ok" and stops;
* the Modelfile's TEMPLATE renders the training template's text;
* `serve` renders the training ids for the same conversation on llama.cpp and on transformers.
"""

import json
from pathlib import Path

import pytest

from helpers import conversation, labelled_runs, write_jsonl, write_run_file
from llamatailor.config import ModelSection, RunConfig, load_config
from llamatailor.data.prepare import prepare
from llamatailor.data.templating import render_for_training, render_prompt
from llamatailor.models.loading import ChatTokenizer, load_saved_tokenizer, load_tokenizer
from llamatailor.pipeline import STAGE_BY_NAME, run_stage
from llamatailor.serve.target import ServeOptions, run_served
from llamatailor.train.dpo import train_dpo
from llamatailor.train.sft import train_sft
from tiny_models import TINY_SHAPE, build_tiny_llama4, llama_cpp_model_file, real_tokenizer, save_random_llama

SYSTEM_PROMPT = "You answer every question with ok."
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
FAMILIES = {  # name: (vocabulary, Meta's template file or None for the tokenizer's own, RoPE parameters)
    "chatml": ("chatml", None, None),
    "llama2": ("llama2", None, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama3.1": ("llama3", "meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3_ROPE),
    "llama3.2": ("llama3", "meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3_ROPE),
    "llama3.3": ("llama3", "meta-llama-Llama-3.3-70B-Instruct.jinja", LLAMA3_ROPE),
    "llama4": ("llama4", None, None),  # built by build_tiny_llama4, its own tokenizer and template
}
METHODS = {
    "lora": {"method": "lora"},
    "dora": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "dora": True}},
    "rslora": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "rslora": True}},
    "qlora": {"method": "qlora"},
    "full": {"method": "full", "learning_rate": 2e-3},
    "lora+dpo": {"method": "lora"},
}
# The Llama 3.x and 4 families split the methods between them; ChatML and Llama 2 run all six.
SPLIT_METHODS = {
    "llama3.1": ("lora", "qlora"),
    "llama3.2": ("dora", "lora+dpo"),
    "llama3.3": ("rslora", "full"),
    "llama4": ("lora+dpo",),
}
CELLS = [(family, method) for family in FAMILIES for method in SPLIT_METHODS.get(family, METHODS)]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    folders = {}
    llama3 = real_tokenizer("llama3")  # loaded once (a 128k vocabulary); each save below takes its template
    for name, (vocabulary, template, rope) in FAMILIES.items():
        if vocabulary == "llama4":
            folders[name] = build_tiny_llama4(root / name, seed=1, max_position_embeddings=256)
            continue
        tokenizer = llama3 if vocabulary == "llama3" else real_tokenizer(vocabulary)
        if template:
            tokenizer.chat_template = llama_cpp_model_file(f"templates/{template}").read_text(
                encoding="utf-8"
            )
        shape = {"rope_parameters": rope} if rope else {}
        folders[name] = save_random_llama(
            tokenizer,
            root / name,
            seed=1,
            max_position_embeddings=256,
            **TINY_SHAPE,
            **shape,
        )
    return folders


@pytest.fixture(scope="session")
def training_tokenizers(family_models) -> dict[str, ChatTokenizer]:
    """Per family, what `load_tokenizer` gives each stage of a cell (the run file sets only model.base):
    loaded once per session and handed to `prepare` (a 128k vocabulary takes over a second to load)."""
    return {name: load_tokenizer(ModelSection(base=str(folder))) for name, folder in family_models.items()}


def cell_run(folder: Path, model: Path, method: str, chat: ChatTokenizer) -> RunConfig:
    """A prepared run that teaches `model` (whose tokenizer is `chat`) to answer "ok" (and, for lora+dpo,
    to prefer it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        write_jsonl(folder / "sft.jsonl", [conversation(f"Question number {n}?", "ok") for n in range(24)])
    ]
    dpo = {}
    if method == "lora+dpo":
        pairs = [
            {"prompt": f"Question {n}?", "chosen": "ok", "rejected": "I do not know."} for n in range(16)
        ]
        files.append(write_jsonl(folder / "preferences.jsonl", pairs))
        # What DPO learns is test_dpo.py's to prove; here its adapter only has to be the one handed on.
        dpo = {"enabled": True, "max_steps": 2, "batch_size": 2, "learning_rate": 5e-3, "save_steps": 100}
    train = {"max_steps": 24, "batch_size": 8, "learning_rate": 1e-2, "save_steps": 100, **METHODS[method]}
    run_file = write_run_file(
        folder,
        model,
        files,
        data={"system_prompt": SYSTEM_PROMPT, "max_seq_len": 96, "val_ratio": 0.15, "test_ratio": 0.15},
        train=train,
        dpo=dpo,
        eval={"max_new_tokens": 6, "json_fields": None, "batch_size": 8, "perplexity": False},
        export={"check_samples": 3},
    )
    config = load_config(run_file)
    prepare(config, chat)
    return config


def with_export(config: RunConfig, dtype: str) -> RunConfig:
    gguf_type = {"fp32": "f32", "bf16": "bf16"}[dtype]
    export = config.export.model_copy(update={"merge_dtype": dtype, "gguf": [gguf_type]})
    return config.model_copy(update={"export": export})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rendered_ids_and_loss_masks(family, family_models, training_tokenizers, tmp_path):
    """The training ids are `apply_chat_template`'s, and the labels are exactly each answer's tokens and its
    end-of-turn token, on prepared conversations extended to two turns."""
    chat = training_tokenizers[family]
    config = cell_run(tmp_path, family_models[family], "lora", chat)
    for record in config.run_dir.read_split("train")[:4]:
        messages = [*record["messages"], {"role": "user", "content": "And again?"}]
        messages.append({"role": "assistant", "content": "ok, again"})
        sample = render_for_training(chat, messages, 512)
        rendered = chat.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert sample.input_ids == list(rendered)
        runs = labelled_runs(sample.labels)
        assert [chat.tokenizer.decode(run[:-1]).strip() for run in runs] == ["ok", "ok, again"]
        assert all(run[-1] == chat.stop_ids[0] for run in runs), "each answer ends with the end-of-turn token"


@pytest.mark.parametrize(("family", "method"), [pytest.param(*cell, id="-".join(cell)) for cell in CELLS])
def test_every_hand_off(family, method, family_models, training_tokenizers, tmp_path):
    config = cell_run(tmp_path, family_models[family], method, training_tokenizers[family])
    trained = train_sft(config).output
    if config.dpo.enabled:
        trained = train_dpo(config).output
    for dtype in ("fp32", "bf16"):
        checked = with_export(config, dtype)
        merged = run_stage(STAGE_BY_NAME["merge"], checked)  # raises when the merge is not the adapter model
        assert Path(merged.source) == trained  # what the last training stage wrote (DPO's adapter after DPO)
        assert merged.greedy_identical == merged.greedy_compared
        assert merged.max_abs_logit_diff <= 1e-3
        exported = run_stage(STAGE_BY_NAME["export"], checked)  # raises on any failed gate; in the manifest
        (row,) = exported.files
        assert row["tokenizer_mismatches"] == 0 and row["metadata_problems"] == []
        assert row["chat_finish_reason"] == "stop" and row["chat_answer"].strip() == "ok", row
        assert row["perplexity_increase_pct"] <= row["gate_pct"]
        assert exported.modelfile_template  # rendered like the training template, or it would not be written
        chat = load_saved_tokenizer(checked.run_dir.merged, checked.model)
        stop = json.dumps(chat.tokenizer.convert_ids_to_tokens(chat.stop_ids[0]))
        assert f"PARAMETER stop {stop}" in Path(exported.modelfile).read_text(encoding="utf-8")
    assert_serve_renders_training_ids(checked)  # the bf16 files; prompts do not depend on the dtype
    report = json.loads((config.run_dir.merged / "merge_report.json").read_text(encoding="utf-8"))
    assert report["dtype"] == "bfloat16" and report["rounding_max_abs_logit_diff"] > 0


def assert_serve_renders_training_ids(config: RunConfig) -> None:
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    record = config.run_dir.read_split("test")[0]
    trained = render_prompt(chat, record["messages"][:-1])
    for engine in ("llama.cpp", "transformers"):
        served = run_served(config, ServeOptions(engine, context=512, slots=1))
        try:
            assert served.chat_prompt(record["messages"][1:-1]) == trained, engine
        finally:
            served.close()
