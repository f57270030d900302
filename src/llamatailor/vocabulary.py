"""The names a run file and the code share, each set spelled once.

Each set is a `Literal` type (what the schema validates and a type checker reads) and the tuple of its
names derived from it (what code loops over and messages list). The spelling is the YAML one users write.
This module is the ground floor: it imports nothing from llamatailor, and nothing heavy, so the schema and
the CLI's help read it at no cost. Facts about a name (an optimizer's trainer name, its state bytes) live
with the code that uses them, in tables keyed by these names; tests check each table covers its set.
"""

from collections.abc import Iterable
from typing import Literal, get_args

Auto = Literal["auto"]
AUTO: Auto = "auto"  # a setting resolved from the hardware or the model at run time

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = SPLITS

Precision = Literal["fp32", "bf16", "fp16"]  # a compute dtype, resolved
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
FP32, BF16, FP16 = PRECISIONS
PrecisionSetting = Literal[Auto, Precision]  # what a run file writes

FamilyName = Literal["llama2", "llama3", "llama4", "chatml"]  # chat formats (models.families)

Method = Literal["lora", "qlora", "full"]
METHODS: tuple[Method, ...] = get_args(Method)
# How training state is split across GPUs: DeepSpeed ZeRO stage 2 or 3, or PyTorch FSDP.
Sharding = Literal["none", "zero2", "zero3", "fsdp"]
SHARDINGS: tuple[Sharding, ...] = get_args(Sharding)

Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
CPU_OPTIMIZER: Optimizer = "adamw"  # the others are bitsandbytes kernels, which need a CUDA GPU

# Every Llama-architecture model names its linear layers the same way.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LLAMA_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
LoraTargetPreset = Literal["attention", "mlp", "all-linear", "experts"]
LORA_TARGET_PRESETS: tuple[LoraTargetPreset, ...] = get_args(LoraTargetPreset)
ALL_LINEAR: LoraTargetPreset = "all-linear"  # every linear layer the model's family has
# all-linear plus a Mixture-of-Experts model's routed experts (fused 3-D parameters, not linear layers)
EXPERTS: LoraTargetPreset = "experts"
PRESET_LINEARS: dict[str, tuple[str, ...]] = {"attention": ATTENTION_LINEARS, "mlp": MLP_LINEARS}

PiiKind = Literal["email", "phone", "card", "ip", "iban", "national_id", "secret"]
PII_KINDS: tuple[PiiKind, ...] = get_args(PiiKind)
# Without +, national numbers are read in these plans' formats ("US" covers every +1 country).
DEFAULT_PHONE_REGIONS = ("US", "GB")

# llama.cpp's file types that `export` writes (f32/f16/bf16 by its converter, the rest by its quantizer).
GgufType = Literal[
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "q4_0",
    "q3_k_m",
    "q2_k",
]
GGUF_TYPES: tuple[GgufType, ...] = get_args(GgufType)


def unknown_name(kind: str, name: object, known: Iterable[str]) -> str:
    """The message for a name outside its set: it names the name and every known one, e.g.
    "unknown optimizer 'adamw9': expected one of adamw, adamw_8bit, ..."."""
    return f"unknown {kind} {name!r}: expected one of {', '.join(known)}"


def lora_linears(targets: str | Iterable[str], all_linear: Iterable[str] = LLAMA_LINEARS) -> tuple[str, ...]:
    """The module names a LoRA `targets` setting stands for: a preset's linear layers, or the names given.

    A string is a preset: attention, mlp, or all-linear (`all_linear`, the model family's linear layers);
    experts has the same linear layers (its routed-expert parameters are resolved by `models.moe`); any
    other iterable holds module names, kept as given. Raises ValueError (with `unknown_name`'s message)
    for a string that is not a preset.
    """
    if not isinstance(targets, str):
        return tuple(targets)
    if targets in (ALL_LINEAR, EXPERTS):
        return tuple(all_linear)
    if targets not in PRESET_LINEARS:
        raise ValueError(unknown_name("LoRA target preset", targets, LORA_TARGET_PRESETS))
    return PRESET_LINEARS[targets]
