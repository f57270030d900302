"""Tests that need a CUDA GPU (marker `gpu`: skipped without one; `bench/gpu_check.sh` runs them on the GPU machine).

On CUDA, in bf16: LoRA and full fine-tuning; QLoRA on an NF4 base with double quantization, and its merge;
bitsandbytes' 8-bit AdamW, paged and not; padding-free rows under SDPA (and flash attention 2 when it is
installed) against padded batches; and a resume after SIGKILL. Every test trains the tiny random Llama 3 (real
128k vocabulary) stored in bf16, as Llama checkpoints are. The device and precision are set once, in DEVICE
and PRECISION: what llamatailor resolves by itself (`precision: auto`) on a GPU with bf16, which each test
asserts before relying on it. This module does not import tests/helpers.py: that module imports httpx2 and
openai, which the GPU machine lacks.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, set_seed

from llamatailor.config import RunConfig, load_config
from llamatailor.data.prepare import prepare
from llamatailor.data.templating import IGNORE_INDEX
from llamatailor.export.merge import logits_of, max_abs_diff
from llamatailor.hardware import resolve_precision
from llamatailor.models.loading import (
    base_model_of,
    load_tokenizer,
    load_tuned_model,
    torch_dtype,
)
from llamatailor.train.arguments import TRAINER_OPTIMIZERS
from llamatailor.train.batching import padding_free
from llamatailor.train.checkpoints import MARKER
from llamatailor.train.model_setup import quantized_base, trainable_model
from llamatailor.train.session import run_trainer, save_trained
from llamatailor.train.sft import AnswerLossTrainer, build_trainer, sft_checkpoint_key
from tiny_models import build_tiny_model

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
PRECISION = "bf16"
COMPUTE_DTYPE = torch_dtype(PRECISION)
CLI = [sys.executable, "-m", "llamatailor"]  # no console script on the GPU machine
QUICK = {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 100}
LAYERS, LINEARS_PER_LAYER = 2, 7  # the tiny model's shape (tiny_models.TINY_SHAPE), all-linear LoRA targets


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama 3 saved in bf16 (its tokenizer files copied as they are)."""
    root = tmp_path_factory.mktemp("gpu-base")
    random = build_tiny_model("llama3", root / "random")
    folder = root / "bf16"
    shutil.copytree(random, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_pretrained(random, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def conversations(count: int) -> list[dict[str, Any]]:
    """Distinct conversations whose answers run from 1 to 8 numbers, so that batches hold padding."""
    rows = []
    for n in range(count):
        answer = json.dumps({"next": list(range(n + 1, n + 2 + n % 8))})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Give the {1 + n % 8} numbers after {n} as JSON."},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def prepared(
    folder: Path, base: Path, count: int = 32, data: dict[str, Any] | None = None, **train: Any
) -> Path:
    """A run file over `count` conversations, prepared in-process; `train` replaces or extends QUICK."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "train.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in conversations(count)), encoding="utf-8")
    config = {
        "name": "gpu",
        "output_dir": str(folder / "runs"),
        "seed": 7,
        "model": {"base": str(base)},
        "data": {
            "train": [str(source)],
            "val_ratio": 0.0,  # no val: the result is the last step's weights, not a best checkpoint
            "test_ratio": 0.0,
            "max_seq_len": 128,
            "dedup": {"near": False},  # templated records, near-duplicates by design
            **(data or {}),
        },
        "train": {**QUICK, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, **train},
    }
    run_file = folder / "run.yaml"
    run_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    prepare(load_config(run_file))
    return run_file


def train_here(config: RunConfig, attention: str = "sdpa") -> tuple[torch.nn.Module, AnswerLossTrainer]:
    """What the train stage does (`train_sft`), in this process so that the model stays at hand: the seed,
    the precision resolved from the run file, the model (with `attention`), the trainer, the training."""
    set_seed(config.seed)
    precision = resolve_precision(config.train.precision)
    assert precision == PRECISION, f"precision auto resolved to {precision}"
    chat = load_tokenizer(config.model)
    model = trainable_model(config, chat, precision)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    trainer = build_trainer(config, chat, model, precision)
    assert trainer.args.bf16 == (PRECISION == "bf16")
    assert trainer.accelerator.mixed_precision == ("no" if PRECISION == "fp32" else PRECISION)
    outcome = run_trainer(trainer, "train", sft_checkpoint_key(config), None, config.run_dir.metrics)
    assert outcome.steps == config.train.max_steps
    return model, trainer


def saved_and_unwrapped(
    config: RunConfig, trainer: AnswerLossTrainer, model: torch.nn.Module
) -> torch.nn.Module:
    """Save the result as the stage does; return the trained model without the autocast wrapper that
    accelerate put on its forward, so that it computes as a model loaded from the saved files does."""
    folder = config.run_dir.model if config.train.method == "full" else config.run_dir.adapter
    chat = load_tokenizer(config.model)
    save_trained(trainer, chat, folder, {"base": config.model.base, "method": config.train.method})
    return trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()


def answer_loss(logits: list[torch.Tensor], labels: list[list[int]]) -> float:
    """Mean cross-entropy over the answer tokens (each label scores the logits one position before it)."""
    total, count = 0.0, 0
    for row_logits, row_labels in zip(logits, labels, strict=True):
        targets = torch.tensor(row_labels[1:])
        scored = targets != IGNORE_INDEX
        total += float(F.cross_entropy(row_logits[:-1][scored], targets[scored], reduction="sum"))
        count += int(scored.sum())
    return total / count


# Nats by which training must lower the answer loss on the first training rows (the same rows before and
# after, so no batch-to-batch noise). The tiny model's frozen random head (hidden 64) lets LoRA lower it by
# about a nat at most; on CPU (fp32) 8 LoRA or QLoRA steps lowered it by 0.6, 6-8 full ones by 1.4-1.7.
LOSS_DROP = 0.25
PROBE_ROWS = 8


def assert_learned(
    trained: list[torch.Tensor], untrained: list[torch.Tensor], labels: list[list[int]]
) -> None:
    before, after = answer_loss(untrained, labels), answer_loss(trained, labels)
    assert after < before - LOSS_DROP, f"answer loss {before:.3f} before training, {after:.3f} after"


def assert_placement(model: torch.nn.Module, method: str) -> None:
    """Every weight on the GPU, in the dtype the code keeps it in: adapter weights in fp32 (PEFT; the
    planner's adapter_bytes), a LoRA base and every weight of a full run in the compute dtype (autocast does
    the mixed precision), a QLoRA base's linear layers 4-bit, its norms fp32 and its embeddings and head in
    the compute dtype (model_setup.quantized_base)."""
    for name, param in model.named_parameters():
        assert param.device.type == DEVICE.type, name
        if param.requires_grad:
            expected = COMPUTE_DTYPE if method == "full" else torch.float32
            assert method == "full" or ".lora_" in name, f"{name} trains in a {method} run"
        elif method != "qlora":
            expected = COMPUTE_DTYPE
        elif isinstance(param, bnb.nn.Params4bit):
            expected = torch.uint8
        else:
            expected = torch.float32 if "norm" in name else COMPUTE_DTYPE
        assert param.dtype == expected, f"{name}: {param.dtype}, expected {expected}"


def assert_same_logits(
    trained: list[torch.Tensor], reloaded: list[torch.Tensor], untrained: list[torch.Tensor]
) -> None:
    """The reloaded model holds the same weights and runs the same kernels as the trained one, so its logits
    should be bitwise equal; one rounding step of the compute dtype at the largest logit (eps x max|logit|) is
    allowed should a kernel sum in another order. Training moved the logits by far more than that."""
    tolerance = torch.finfo(COMPUTE_DTYPE).eps * max(float(t.abs().max()) for t in trained)
    assert max_abs_diff(trained, reloaded) <= tolerance, (max_abs_diff(trained, reloaded), tolerance)
    assert max_abs_diff(trained, untrained) > 10 * tolerance, "training must move the logits to test a reload"


@pytest.mark.parametrize(("method", "learning_rate"), [("lora", 2e-2), ("full", 5e-3)])
def test_bf16_training_lowers_the_loss_and_reloads_to_the_same_logits(tmp_path, base, method, learning_rate):
    config = load_config(prepared(tmp_path, base, method=method, learning_rate=learning_rate))
    model, trainer = train_here(config)
    assert_placement(model, method)
    model = saved_and_unwrapped(config, trainer, model)
    rows = trainer.train_dataset[:PROBE_ROWS]
    trained = logits_of(model, rows["input_ids"])
    with base_model_of(model, config.model) as untrained:
        before = logits_of(untrained, rows["input_ids"])
    assert_learned(trained, before, rows["labels"])
    folder = config.run_dir.model if method == "full" else config.run_dir.adapter
    reloaded = logits_of(load_tuned_model(config.model, folder, COMPUTE_DTYPE).eval(), rows["input_ids"])
    assert_same_logits(trained, reloaded, before)


def assert_nf4_double_quant(model: torch.nn.Module) -> None:
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == LAYERS * LINEARS_PER_LAYER
    for layer in quantized:
        state = layer.weight.quant_state
        assert layer.weight.dtype == torch.uint8 and state.quant_type == "nf4"
        # Double quantization: the blocks' absmax constants are themselves 8-bit, with a state of their own.
        assert state.nested and state.state2 is not None and state.absmax.dtype == torch.uint8
        assert layer.compute_dtype == COMPUTE_DTYPE


def test_qlora_nf4_trains_reloads_and_merges_into_the_bf16_base(tmp_path, base):
    """QLoRA on an NF4, double-quantized base: it trains, the adapter reloads onto a fresh NF4 base with the
    same logits, and `llamatailor merge` folds it into the base.

    Which comparison: `merge` folds the adapter into the original bf16 base, not into the dequantized NF4
    weights (export/merge.py: merging into 4-bit would round the update away, and the dequantized weights
    would carry NF4's rounding into the served model). So merged = W + s·B·A, while the model that trained
    computes dequant(NF4(W)) + s·B·A: they differ by NF4's rounding of the base, which the adapter never saw.
    Hence three checks: (1) what merge adds is exact: every merged weight is bf16(W + s·B·A) within one bf16
    rounding, every other weight is the base's bit for bit; (2) merge's own check (its report): the merged
    model equals the adapter on the unquantized base within export.merge_tolerance, with the same greedy
    answers; (3) against the adapter on the NF4 base, the merged model's logits differ by at most
    NF4_FACTOR times what NF4 does to the base alone (the base's logits against the NF4 base's), and the
    adapter's own effect is larger than that bound, so a merge without it could not pass.
    """
    run_file = prepared(tmp_path, base, data={"val_ratio": 0.25}, method="qlora", learning_rate=2e-2)
    config = load_config(run_file)
    model, trainer = train_here(config)
    assert_nf4_double_quant(model)
    assert_placement(model, "qlora")
    model = saved_and_unwrapped(config, trainer, model)
    rows = trainer.train_dataset[:PROBE_ROWS]
    probe = rows["input_ids"]
    trained = logits_of(model, probe)
    with model.disable_adapter():
        nf4_base = logits_of(model, probe)
    assert_learned(trained, nf4_base, rows["labels"])
    fresh = PeftModel.from_pretrained(quantized_base(config, PRECISION), config.run_dir.adapter).eval()
    assert_nf4_double_quant(fresh)
    assert_same_logits(trained, logits_of(fresh, probe), nf4_base)
    del fresh

    assert run_cli(["merge", str(run_file)], tmp_path / "merge.log") == 0, tail(tmp_path / "merge.log")
    assert_merged_is_base_plus_adapter(base, config)
    report = json.loads((config.run_dir.merged / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16", "merge_dtype auto keeps the base's own dtype"
    assert report["max_abs_logit_diff"] <= report["tolerance"], report
    assert report["greedy_identical"] == report["greedy_compared"] > 0, report
    assert_merged_near_the_nf4_model(config, probe, trained, nf4_base)


NF4_FACTOR = 2.0


def assert_merged_near_the_nf4_model(
    config: RunConfig, probe: list[list[int]], trained: list[torch.Tensor], nf4_base: list[torch.Tensor]
) -> None:
    """Check (3) of the QLoRA test. NF4_FACTOR: the adapter changes the activations through which the base's
    rounding acts, so the gap with it is not exactly the gap without it; twice the yardstick leaves room."""
    merged = AutoModelForCausalLM.from_pretrained(
        config.run_dir.merged, dtype=COMPUTE_DTYPE, device_map=DEVICE
    )
    gap = max_abs_diff(logits_of(merged.eval(), probe), trained)
    del merged
    with base_model_of(
        load_tuned_model(config.model, config.run_dir.adapter, COMPUTE_DTYPE), config.model
    ) as plain:
        nf4_yardstick = max_abs_diff(logits_of(plain.eval(), probe), nf4_base)
    adapter_effect = max_abs_diff(trained, nf4_base)
    assert gap <= NF4_FACTOR * nf4_yardstick, (gap, nf4_yardstick)
    assert adapter_effect > NF4_FACTOR * nf4_yardstick, (adapter_effect, nf4_yardstick)


def assert_merged_is_base_plus_adapter(base: Path, config: RunConfig) -> None:
    """Check (1) of the QLoRA test: each adapted weight of merged/ is W + s·B·A rounded once to bf16, W the bf16
    base's own; the other weights are the base's exactly. Allowed per element: one bf16 step (2^-8 of the value:
    rounding is half a step, and fp32 sums in another order may land on the other side of a boundary), plus
    1e-6 of the tensor's largest value for the fp32 rounding of values that cancel to almost nothing."""
    original, merged = weights(base), weights(config.run_dir.merged)
    adapter = load_file(config.run_dir.adapter / "adapter_model.safetensors")
    settings = json.loads((config.run_dir.adapter / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    assert merged.keys() == original.keys()
    adapted = 0
    for name, weight in original.items():
        assert merged[name].dtype == torch.bfloat16, name
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{prefix}.lora_A.weight" not in adapter:
            assert torch.equal(merged[name], weight), f"{name} is not the base's"
            continue
        adapted += 1
        update = adapter[f"{prefix}.lora_B.weight"].double() @ adapter[f"{prefix}.lora_A.weight"].double()
        expected = weight.double() + scaling * update
        error = (merged[name].double() - expected).abs()
        allowed = 2**-8 * expected.abs() + 1e-6 * expected.abs().max()
        assert (error <= allowed).all(), (name, float((error - allowed).max()))
    assert adapted == LAYERS * LINEARS_PER_LAYER


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for path in sorted(folder.glob("*.safetensors")) for name, t in load_file(path).items()}


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_keep_8bit_states_and_lower_the_loss(tmp_path, base, optimizer):
    """Full fine-tuning (the only method whose tiny weights are big enough for 8-bit states) with
    bitsandbytes' AdamW as transformers builds it for our optimizer names. bitsandbytes keeps fp32 states for
    tensors under min_8bit_size (4,096) elements, transformers for embeddings (a stability override), and
    pages only states of 100,000 elements or more; all others must be uint8."""
    config = load_config(prepared(tmp_path, base, method="full", optimizer=optimizer, max_steps=6))
    model, trainer = train_here(config)
    assert trainer.args.optim == TRAINER_OPTIMIZERS[optimizer]
    adamw = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper, if any
    paged = optimizer.startswith("paged")
    assert type(adamw) is bnb.optim.AdamW and adamw.args.optim_bits == 8 and adamw.is_paged == paged
    embedding = model.get_input_embeddings().weight
    eight_bit = set()
    for name, param in model.named_parameters():
        state = adamw.state[param]
        quantized = param.numel() >= adamw.args.min_8bit_size and param is not embedding
        expected = torch.uint8 if quantized else torch.float32
        assert state["state1"].dtype == state["state2"].dtype == expected, name
        assert getattr(state["state1"], "is_paged", False) == (paged and param.numel() >= 100_000), name
        eight_bit |= {name} if quantized else set()
    assert "lm_head.weight" in eight_bit and len(eight_bit) > LAYERS * 4
    rows = trainer.train_dataset[:PROBE_ROWS]
    with base_model_of(model, config.model) as untrained:
        before = logits_of(untrained, rows["input_ids"])
    assert_learned(logits_of(model.eval(), rows["input_ids"]), before, rows["labels"])


@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_padding_free_rows_give_the_padded_loss_and_gradients(tmp_path, base, attention):
    """One batch as padded rows and as one padding-free row (position ids restarting at each sample), after
    two LoRA steps (so that A and B both have gradients), through the trainer's own step: bf16 autocast, and
    activation checkpointing as on any GPU.

    Tolerances: both forms run the same arithmetic through kernels of other shapes (GEMMs over other row
    counts, attention masked another way), so fp32 sums run in another order and now and then a bf16 value
    rounds one step the other way. The loss may differ by LOSS_RTOL: a rounding step of a logit here
    (~1e-3) on every answer token at once, where such steps mostly average out. The gradients of all LoRA
    tensors together may differ by GRAD_RTOL of their norm: on CPU in bf16 they differed by 1.5e-3 (the worst
    tensor 2.9e-3), CUDA's kernels are others. The tiny model's loss hardly depends on attention (its frozen
    random head dominates): joined rows whose samples attend to each other (positions counting on) moved it
    by only 2e-4 of itself on CPU, but the gradients by 35%; so the gradients are what must be able to fail,
    and the test asserts that such a leak exceeds 5 x GRAD_RTOL."""
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    run_file = prepared(tmp_path, base, count=24, batch_size=8, max_steps=2, warmup_ratio=0.0, packing=True)
    model, trainer = train_here(load_config(run_file), attention)
    assert trainer.packing
    batch = next(iter(trainer.get_train_dataloader()))
    assert not batch["attention_mask"].all(), "the batch must hold padding"
    padded_loss, padded = loss_and_gradients(trainer, model, batch, packing=False)
    joined_loss, joined = loss_and_gradients(trainer, model, batch, packing=True)
    assert all(float(g.abs().max()) > 0 for g in padded.values()), "every LoRA tensor has a gradient"
    assert joined_loss == pytest.approx(padded_loss, rel=LOSS_RTOL)
    assert relative_difference(joined, padded) <= GRAD_RTOL, relative_difference(joined, padded)
    leak = relative_difference(leaky_gradients(trainer, model, batch), joined)
    assert leak > 5 * GRAD_RTOL, leak


LOSS_RTOL, GRAD_RTOL = 1e-4, 2e-2


def loss_and_gradients(
    trainer: AnswerLossTrainer, model: torch.nn.Module, batch: dict[str, Any], packing: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's own step over `batch`, padded or padding-free: its loss and the LoRA gradients."""
    trainer.packing = packing
    model.zero_grad(set_to_none=True)
    loss = float(trainer.training_step(model, dict(batch)))
    return loss, gradients(model)


def leaky_gradients(
    trainer: AnswerLossTrainer, model: torch.nn.Module, batch: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The gradients of `batch` as one row whose position ids count on across samples: one causal sequence,
    each sample attending to the ones before it. Normalised by the same answer-token count."""
    rows = padding_free(batch)
    rows["position_ids"] = torch.arange(rows["input_ids"].size(1), device=rows["input_ids"].device)[None]
    model.zero_grad(set_to_none=True)
    count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    trainer.compute_loss(model, rows, num_items_in_batch=count).backward()
    return gradients(model)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}


def relative_difference(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """|values - reference| / |reference|, Euclidean norms over all tensors together."""
    error = sum(float(((values[name] - t) ** 2).sum()) for name, t in reference.items())
    return (error / sum(float((t**2).sum()) for t in reference.values())) ** 0.5


# The CPU resume test's settings (tests/test_training_resilience.py, which this module cannot import: it imports
# tests/helpers.py), so that the two measure the same thing.
RESUME_TRAIN = {
    "max_steps": 24,
    "save_steps": 4,
    "save_total_limit": 3,
    "learning_rate": 3e-3,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the resumed RNG state matters
}
CLI_TIMEOUT = 300


def test_resume_after_sigkill_on_cuda_ends_with_the_uninterrupted_adapter(tmp_path, base):
    """tests/test_training_resilience.py's resume test, on the GPU, through `python -m llamatailor train`.

    Tolerance: CUDA kernels need not be bitwise deterministic (atomic adds in attention's backward pass; a
    bf16 rounding that an fp32 sum in another order flips), and training does not turn on torch's
    deterministic algorithms. The resumed adapter must equal the uninterrupted one within 1e-5 (the CPU
    test's bound) or 1% of how far the training moved the adapter (max |lora_B|: B starts at zero), whichever
    is larger. A resume that loses the optimizer's or the RNG's state (dropout), or the place in the data,
    changes the 16 steps after the kill by far more. A second uninterrupted run, alongside, measures the
    kernels' own noise, which a failure reports."""
    runs = {
        name: prepared(tmp_path / name, base, count=64, **RESUME_TRAIN)
        for name in ("straight", "again", "killed")
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("straight", "again", "killed", "resumed")}
    processes = {
        name: start_cli(["train", str(runs[name])], logs[name]) for name in ("straight", "again", "killed")
    }
    try:
        killed = tmp_path / "killed" / "runs" / "gpu"
        kill_at_checkpoint(
            processes["killed"], killed / "checkpoints" / "checkpoint-8" / MARKER, logs["killed"]
        )
        assert not (killed / "adapter").exists(), "the run must be killed before it finished"
        assert read_manifest(killed)["stages"]["train"]["status"] == "running"
        resumed = start_cli(["train", str(runs["killed"]), "--resume"], logs["resumed"])
        assert resumed.wait(timeout=CLI_TIMEOUT) == 0, tail(logs["resumed"])
        for name in ("straight", "again"):
            assert processes[name].wait(timeout=CLI_TIMEOUT) == 0, tail(logs[name])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    summary = read_manifest(killed)["stages"]["train"]["summary"]
    assert summary["resumed_from"] == str(killed / "checkpoints" / "checkpoint-8")
    assert summary["precision"] == PRECISION and summary["steps"] == 24
    straight, again, after_kill = (
        adapter_weights(tmp_path / name / "runs" / "gpu") for name in ("straight", "again", "killed")
    )
    noise, worst = largest_difference(straight, again), largest_difference(straight, after_kill)
    moved = max(float(t.abs().max()) for name, t in straight.items() if ".lora_B." in name)
    assert worst <= max(1e-5, 1e-2 * moved), (
        f"resumed differs by {worst:.2e}; moved {moved:.2e}; noise {noise:.2e}"
    )
    steps = [row["step"] for row in read_rows(killed / "metrics.jsonl") if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "the log continues where the checkpoint left off"


def kill_at_checkpoint(process: subprocess.Popen, marker: Path, log: Path) -> None:
    """SIGKILL `process` once `marker` (a checkpoint's completeness marker) exists."""
    deadline = time.monotonic() + CLI_TIMEOUT
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), tail(log)


def start_cli(arguments: list[str], log: Path) -> subprocess.Popen:
    """`python -m llamatailor ARGUMENTS`, its output going to `log`."""
    with log.open("w") as output:
        return subprocess.Popen(
            [*CLI, *arguments],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def run_cli(arguments: list[str], log: Path) -> int:
    return start_cli(arguments, log).wait(timeout=CLI_TIMEOUT)


def tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-3000:]


def read_manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text(encoding="utf-8"))


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def largest_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max(float((left[name] - right[name]).abs().max()) for name in left)
