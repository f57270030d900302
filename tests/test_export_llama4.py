"""GGUF export of a tuned Llama 4 (llama.cpp's `llama4` architecture), checked with numbers.

One tiny Mixture-of-Experts `Llama4ForCausalLM` (tests/tiny_models.py: 4 layers, layer 3 without RoPE, experts on
layers 1 and 3) is taught to answer "ok" with LoRA on every linear layer and on the routed experts (`targets:
experts`), merged in fp32 and exported to f16, q8_0 and q4_k_m by the export stage, whose gates must pass. Then:
the files' keys and expert tensors against the config and the merged weights, llama.cpp's logits against the
merged model's per type, llama.cpp's token ids against the training tokenizer's (and where llama.cpp's ASCII
approximation of Llama 4's split differs), `serve` on both engines, Llama 3-style RoPE scaling under llama4,
and the configs llama.cpp would run differently, refused before writing.
"""

import json
import re
import shutil
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, Llama4ForCausalLM, Llama4TextConfig
from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table

from helpers import conversation, generated, write_jsonl, write_run_file
from llamatailor.config import ModelSection, RunConfig, load_config
from llamatailor.data.prepare import prepare
from llamatailor.data.templating import render_prompt
from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_file import export_config, write_gguf
from llamatailor.export.gguf_llama4 import check_llama4
from llamatailor.export.pre_tokenizer import pre_tokenizer_name, structural_name
from llamatailor.export.rope import gguf_rope
from llamatailor.models.loading import ChatTokenizer, load_saved_tokenizer, load_tokenizer
from llamatailor.pipeline import STAGE_BY_NAME, run_stage
from llamatailor.serve.backend import Job
from llamatailor.serve.target import ServeOptions, run_served
from llamatailor.train.sft import train_sft
from tiny_models import TINY_LLAMA4_SHAPE, build_tiny_llama4

SYSTEM_PROMPT = "You answer every question with ok."
SCOUT_CONFIG = Path(__file__).parent / "data" / "llama4-scout" / "config.json"  # Meta's, no weights
TYPES = ("f16", "q8_0", "q4_k_m")
# llama.cpp's logits against the merged model's, per file type (KV cache in f32): the root mean square of the
# difference over every position and token of the val conversations, as a share of the merged logits' root mean
# square. Measured: f32 3e-7 (test_llama3_rope_scaling_is_written_for_llama4, a random Llama 4 with every layer
# kind; 0.2 without its rope_freqs), and on the tuned model f16 0.06 %, q8_0 1.5 %, q4_k_m 4-10 % (its 64-wide
# rows fall back from K-quants to Q5_0/Q8_0); the largest single differences were 0.2 %, 4.5 % and 35 % of the
# largest |logit| (1.27: a briefly tuned random model's logits are small, so these shares are large).
LOGIT_TOLERANCE = {"f32": 1e-5, "f16": 0.005, "q8_0": 0.05, "q4_k_m": 0.25}
# Where llama.cpp's ASCII approximation of Llama 4's split (llama-vocab.cpp, pre-type GPT4O) agrees with
# transformers' on this vocabulary, and where it does not: there every non-ASCII letter is both upper and lower
# case, so a lower-case word running into a non-ASCII capital stays one piece and merges across the join.
SAME_IDS = [
    "HTTPServer getHTTPResponse iPhone McDonald's I'VE DON'T",
    "Привет Мир ПРИВЕТмир ÉCOLE École éCOLE naïve café ÜberCool",
    "नमस्ते दुनिया ภาษาไทย e\u0301te\u0301 ΑΒΓ αβγ 日本語テキスト İstanbul straße",
    "a/b/c\n/x ١٢٣ 12345 🦙🚀 ok",
]
DIFFERENT_IDS = ["данныеМир", " данныеДанные"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[RunConfig, ChatTokenizer, list[dict]]:
    """A run trained with `targets: experts`, merged in fp32 and exported to TYPES (gates passed): the run,
    its training tokenizer and the export report's rows."""
    root = tmp_path_factory.mktemp("llama4")
    base = build_tiny_llama4(root / "base", seed=1, max_position_embeddings=256)
    chat = load_tokenizer(ModelSection(base=str(base)))
    rows = [conversation(f"Question number {n}?", "ok") for n in range(24)]
    run_file = write_run_file(
        root,
        base,
        [write_jsonl(root / "sft.jsonl", rows)],
        data={"system_prompt": SYSTEM_PROMPT, "max_seq_len": 96, "val_ratio": 0.15, "test_ratio": 0.15},
        train={
            "max_steps": 24,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "save_steps": 100,
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "experts"},
        },
        eval={"max_new_tokens": 6, "json_fields": None, "batch_size": 8},
        export={"check_samples": 3, "gguf": list(TYPES)},
    )
    config = load_config(run_file)
    prepare(config, chat)
    train_sft(config)
    run_stage(STAGE_BY_NAME["eval"], config)  # with perplexity: TRL's fused head on Llama 4's decoder
    run_stage(STAGE_BY_NAME["merge"], config)
    exported = run_stage(STAGE_BY_NAME["export"], config)  # raises on any failed gate
    return config, chat, exported.files


def gguf_file(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], str, int]]]:
    """A GGUF file's metadata and {tensor: (shape in numpy order, ggml type name, absolute offset)}, by
    transformers' reader (0.1 s; gguf.GGUFReader takes 14 s on a 128k vocabulary, and transformers'
    GgufHeader refuses the Q5_0 tensors q4_k_m falls back to)."""
    blob = _mapped(str(path))
    fields, count, position = _read_metadata(blob, str(path))
    entries, position = _read_tensor_table(blob, count, position)
    alignment = fields.get("general.alignment", 32)
    start = (position + alignment - 1) // alignment * alignment
    tensors = {
        name: (shape, gguf.GGMLQuantizationType(kind).name, start + offset)
        for name, shape, kind, offset in entries
    }
    return fields, tensors


def merged_tensor(config: RunConfig, key: str) -> np.ndarray:
    with safe_open(config.run_dir.merged / "model.safetensors", framework="pt") as handle:
        return handle.get_tensor(key).float().numpy()


def test_eval_scores_base_and_tuned_with_perplexity(tuned):
    """The eval stage on a Llama 4 run: the tuned model answers "ok" where the random base does not, and the
    answers' perplexity is computed for both (Llama 4's decoder reached through `base_model`)."""
    config = tuned[0]
    metrics = json.loads((config.run_dir.root / "eval" / "metrics.json").read_text(encoding="utf-8"))
    base, tuned_metrics = metrics["base"], metrics["tuned"]
    assert base["exact_match"] == 0.0 and tuned_metrics["exact_match"] == 1.0
    for split in ("val", "test"):
        name = f"answer_perplexity_{split}"
        assert 1.0 < tuned_metrics[name] < base[name], (name, base[name], tuned_metrics[name])


def test_every_gate_passes_and_the_chat_answer_stops(tuned):
    config, _, rows = tuned
    assert [row["gguf_type"] for row in rows] == list(TYPES)
    for row in rows:
        assert row["metadata_problems"] == [] and row["failures"] == [], row
        assert row["tokenizer_mismatches"] == 0 and row["tokenizer_texts"] == 8
        assert row["chat_answer"].strip() == "ok" and row["chat_finish_reason"] == "stop", row
        assert row["perplexity_increase_pct"] <= row["gate_pct"] and row["top1_agreement"] >= 0.95, row
    modelfile = (config.run_dir.gguf / "Modelfile").read_text(encoding="utf-8")
    assert "<|header_start|>" in modelfile and 'PARAMETER stop "<|eot|>"' in modelfile


def test_keys_and_expert_tensors_are_the_configs(tuned):
    """Architecture, MoE and attention keys equal the merged config's; experts split and transposed as
    llama.cpp's loader reads them (gate/up {hidden, I, E} in ggml order, numpy's reverse), Q/K not permuted,
    the router F32 in every type, the experts quantized with the file's type (q4_k_m's K-quants fall back
    to Q5_0/Q8_0: rows 64 wide are no multiple of 256)."""
    config, _, _ = tuned
    hf = AutoConfig.from_pretrained(config.run_dir.merged)
    experts, width, hidden = hf.num_local_experts, hf.intermediate_size, hf.hidden_size
    expert_types = {"f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q5_0", "Q8_0"}}
    for gguf_type in TYPES:
        fields, tensors = gguf_file(config.run_dir.gguf_file(config.name, gguf_type))
        assert fields["general.architecture"] == "llama4" and fields["tokenizer.ggml.pre"] == "llama4"
        for key, name in (
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "intermediate_size"),
            ("feed_forward_length", "intermediate_size_mlp"),  # the dense layers'
            ("interleave_moe_layer_step", "interleave_moe_layer_step"),
        ):
            assert fields[f"llama4.{key}"] == getattr(hf, name) == TINY_LLAMA4_SHAPE[name], key
        assert fields["llama4.attention.key_length"] == fields["llama4.rope.dimension_count"] == hf.head_dim
        assert "llama4.attention.sliding_window" not in fields  # llama.cpp's chunked attention stays on
        for layer in (1, 3):
            for part in ("gate", "up"):
                assert tensors[f"blk.{layer}.ffn_{part}_exps.weight"][0] == (experts, width, hidden)
            assert tensors[f"blk.{layer}.ffn_down_exps.weight"][0] == (experts, hidden, width)
            assert tensors[f"blk.{layer}.ffn_gate_inp.weight"][1] == "F32"
            kinds = {tensors[f"blk.{layer}.ffn_{part}_exps.weight"][1] for part in ("gate", "up", "down")}
            assert kinds <= expert_types[gguf_type], (gguf_type, layer, kinds)
        assert "blk.0.ffn_gate_exps.weight" not in tensors and "blk.0.ffn_gate.weight" in tensors
    path = config.run_dir.gguf_file(config.name, "f16")
    _, tensors = gguf_file(path)

    def stored(name: str) -> np.ndarray:
        shape, _, offset = tensors[name]
        return np.memmap(path, np.float16, "r", offset, shape).astype(np.float32)

    gate_up = merged_tensor(config, "model.layers.3.feed_forward.experts.gate_up_proj")
    down = merged_tensor(config, "model.layers.3.feed_forward.experts.down_proj")
    q = merged_tensor(config, "model.layers.0.self_attn.q_proj.weight")
    for name, expected in (
        ("blk.3.ffn_gate_exps.weight", gate_up[..., :width].transpose(0, 2, 1)),
        ("blk.3.ffn_up_exps.weight", gate_up[..., width:].transpose(0, 2, 1)),
        ("blk.3.ffn_down_exps.weight", down.transpose(0, 2, 1)),
        ("blk.0.attn_q.weight", q),
    ):
        np.testing.assert_allclose(stored(name), expected, rtol=1e-3, atol=1e-4, err_msg=name)


def logit_error(path: Path, sequences: list[list[int]], reference: list[np.ndarray]) -> float:
    """Root mean square of llama.cpp's logits minus `reference` over every position of `sequences`, as a
    share of the reference's root mean square; KV cache in f32 (llama.cpp's default f16 adds ~1e-3)."""
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False, type_k=f32, type_v=f32
    )
    try:
        rows = []
        for ids in sequences:
            llm.reset()
            llm.eval(ids)
            rows.append(np.array(llm.scores[: len(ids)]))  # a copy: the next eval overwrites it
    finally:
        llm.close()
    got, expected = np.concatenate(rows), np.concatenate(reference)
    return float(np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean()))


@torch.inference_mode()
def test_llama_cpp_logits_match_the_merged_model_per_type(tuned):
    config, chat, _ = tuned
    texts = [
        chat.tokenizer.apply_chat_template(record["messages"], tokenize=False)
        for record in config.run_dir.read_split("val")
    ]
    sequences = [chat.tokenizer.encode(text, add_special_tokens=False) for text in texts]
    model = AutoModelForCausalLM.from_pretrained(config.run_dir.merged, dtype="float32").eval()
    reference = [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in sequences]
    files = {gguf_type: config.run_dir.gguf_file(config.name, gguf_type) for gguf_type in TYPES}
    measured = {gguf_type: logit_error(path, sequences, reference) for gguf_type, path in files.items()}
    assert all(measured[t] <= LOGIT_TOLERANCE[t] for t in files), measured
    assert measured["f16"] < measured["q8_0"] < measured["q4_k_m"], measured  # each loses what it should


def test_llama_cpp_tokenizes_like_the_training_tokenizer(tuned):
    """Equal ids on mixed-script text; the known difference of llama.cpp's ASCII approximation pinned."""
    config, chat, _ = tuned
    llm = llama_cpp.Llama(
        model_path=str(config.run_dir.gguf_file(config.name, "f16")), vocab_only=True, verbose=False
    )
    try:
        for text in [*SAME_IDS, *DIFFERENT_IDS]:
            expected = chat.tokenizer.encode(text, add_special_tokens=False)
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert (got == expected) == (text in SAME_IDS), (text, expected, got)
    finally:
        llm.close()


def test_pre_tokenizer_is_recognised_by_its_structure(tuned):
    """The tiny tokenizer's check-text ids hash as Llama 3's (its vocabulary), but its split is Llama 4's."""
    config, chat, _ = tuned
    tokenizer_json = json.loads((config.run_dir.merged / "tokenizer.json").read_text(encoding="utf-8"))
    assert structural_name(tokenizer_json) == "llama4"
    assert pre_tokenizer_name(chat.tokenizer, tokenizer_json) == "llama4"
    tokenizer_json["model"]["ignore_merges"] = True  # llama.cpp's llama4 merges every piece: no name fits
    assert structural_name(tokenizer_json) is None


def test_serve_renders_the_training_ids_and_answers_ok_on_both_engines(tuned):
    config, _, _ = tuned
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    record = config.run_dir.read_split("test")[0]
    trained = render_prompt(chat, record["messages"][:-1])
    for engine, described in (("llama.cpp", "llama-server"), ("transformers", "transformers")):
        served = run_served(config, ServeOptions(engine, context=256, slots=1))
        try:
            prompt = served.chat_prompt(record["messages"][1:-1])  # the run's system prompt added
            assert prompt == trained, engine
            deltas = generated(served, Job(served.model_ids()[0], prompt, 8, [], temperature=0.0))
            assert "".join(d.text for d in deltas).strip() == "ok" and deltas[-1].finish_reason == "stop", (
                engine
            )
            assert served.description.startswith(described)
        finally:
            served.close()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"attention_chunk_size": 4096}, "attention_chunk_size is 4096, llama.cpp assumes 8192"),
        ({"no_rope_layer_interval": 2}, "no_rope_layers is [1, 0, 1, 0], llama.cpp assumes [1, 1, 1, 0]"),
        ({"moe_layers": [0, 1, 2, 3]}, "moe_layers is [0, 1, 2, 3], llama.cpp assumes [1, 3]"),
        ({"use_qk_norm": False}, "use_qk_norm is False, llama.cpp assumes True"),
        ({"floor_scale": 4096}, "floor_scale is 4096, llama.cpp assumes 8192"),
        ({"attn_scale": 0.2}, "attn_scale is 0.2, llama.cpp assumes 0.1"),
        ({"attn_temperature_tuning": False}, "attn_temperature_tuning is False, llama.cpp assumes True"),
    ],
)
def test_configs_llama_cpp_runs_differently_are_refused(change, named):
    config = Llama4TextConfig(num_hidden_layers=4, num_local_experts=4, interleave_moe_layer_step=2, **change)
    with pytest.raises(CheckFailed, match=re.escape(named)):
        check_llama4(config, "model")


def test_a_refused_config_writes_nothing(tuned, tmp_path):
    config, chat, _ = tuned
    folder = tmp_path / "merged"  # the config is all that is read before refusing
    folder.mkdir()
    settings = json.loads((config.run_dir.merged / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(
        json.dumps({**settings, "attention_chunk_size": 1024}), encoding="utf-8"
    )
    with pytest.raises(CheckFailed, match=re.escape("attention_chunk_size is 1024, llama.cpp assumes 8192")):
        write_gguf(folder, tmp_path / "out.gguf", "f16", chat, "tiny")
    assert list(tmp_path.glob("*.gguf")) == []
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama4", "text_config": settings}), encoding="utf-8"
    )
    with pytest.raises(CheckFailed, match="Llama4ForConditionalGeneration"):
        export_config(folder)


def test_llama3_rope_scaling_is_written_for_llama4(tuned, tmp_path):
    """Meta's Llama 4 Scout config passes every llama.cpp check, and its RoPE (rope_type llama3 with both band
    factors 1) is proven against transformers' Llama4TextRotaryEmbedding; then an f32 file of a random Llama 4
    with that RoPE, its original context shrunk to 32 tokens, runs in llama.cpp to position 160: its logits
    equal transformers' (exact layout, no Q/K permutation, experts, the no-RoPE layer, QK norm, rope_freqs)."""
    text = json.loads(SCOUT_CONFIG.read_text(encoding="utf-8"))["text_config"]
    scout = Llama4TextConfig(**{**text, "attn_temperature_tuning": True})  # 4 in the file; transformers: on
    check_llama4(scout, "Scout")
    rope = gguf_rope(scout, "Scout")
    assert rope.keys("llama4") == {"llama4.rope.freq_base": 500000.0}
    assert sorted(set(rope.factors.tolist())) == [
        1.0,
        16.0,
    ]  # pairs turning slower than once in 8192 tokens: 16
    config, chat, _ = tuned
    settings = AutoConfig.from_pretrained(config.run_dir.merged).to_dict()
    settings["rope_parameters"] = {**scout.rope_parameters, "original_max_position_embeddings": 32}
    torch.manual_seed(3)
    model = Llama4ForCausalLM(Llama4TextConfig(**settings)).eval()
    folder = tmp_path / "scaled"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(config.run_dir.merged / name, folder / name)
    assert sorted(set(gguf_rope(model.config).factors.tolist())) == [1.0, 16.0]
    path = write_gguf(folder, tmp_path / "scaled-f32.gguf", "f32", chat, "scaled")
    ids = chat.tokenizer.encode(" ".join(f"word{n}" for n in range(80)), add_special_tokens=False)[:160]
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert logit_error(path, [ids], [expected]) <= LOGIT_TOLERANCE["f32"]  # 0.2 without rope_freqs
