"""A run's PEFT LoRA adapter as a llama.cpp LoRA GGUF, applied at run time to an unmerged base GGUF (several
adapters over one base: `llama-server --lora FILE ... --lora-init-without-apply`), and its check.

The file follows what llama.cpp's loader reads (src/llama-adapter.cpp in the pinned sources; its own
converter is convert_lora_to_gguf.py): `general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`,
`general.architecture` equal to the base's, and per adapted weight `<gguf name>.lora_a` (r, in) and
`<gguf name>.lora_b` (out, r) in numpy order, named and laid out by the same rules as the base's tensors
(gguf_file.gguf_name and gguf_file.hf_arrays: lora_b's rows of Q and K get the base's rotary permutation,
lora_a is untouched since the permutation acts on output rows only). llama.cpp adds
`alpha / r · B (A x)` to each adapted matmul, r read from lora_b per tensor.

Tensors are written F32: they are small (4 bytes · r · (in + out) per adapted weight), PEFT trains them in
fp32, and llama.cpp would multiply an F16 lora_a by activations rounded to F16 where F32 keeps them exact.

Scaling: PEFT scales by alpha / r, or alpha / sqrt(r) with rsLoRA, alpha and r per module under
`alpha_pattern` / `rank_pattern`. The file's alpha is the one that makes llama.cpp's alpha / r equal PEFT's
scale at the default rank (rsLoRA: alpha · sqrt(r)); a module whose own scale differs from that (a pattern)
gets the ratio multiplied into its lora_b, which keeps a request's adapter scale linear. llama.cpp's
converter writes alpha as it is, which is wrong for rsLoRA and alpha_pattern.

Refused, by name: what llama.cpp's LoRA cannot represent (DoRA's magnitude vectors, LoRA on fused expert
parameters, biases, LoRA on a tied lm_head) and what is not converted here (modules_to_save and trained token
rows, LoRA on the embeddings, activated LoRA, and PEFT variants whose forward differs from W x + s·B A x).
"""

import ctypes
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from peft import PeftModel
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from transformers import PretrainedConfig
from transformers.integrations.gguf.reader import read_gguf_metadata

from llamatailor.config import RunConfig
from llamatailor.errors import CheckFailed
from llamatailor.export.gates import (
    LORA_EFFECT,
    LORA_GREEDY,
    LORA_LOGITS,
    ROUNDING_FACTOR,
    lora_gates,
    rounded_tolerance,
)
from llamatailor.export.gguf_file import ARCHITECTURES, export_config, gguf_name, hf_arrays, write_gguf
from llamatailor.export.merge import ANSWER_TOKENS, Probe, logits_of, max_abs_diff
from llamatailor.generation.engines import TransformersEngine
from llamatailor.models.loading import ChatTokenizer
from llamatailor.models.source import local_folder
from llamatailor.rundir import atomic_path
from llamatailor.vocabulary import GgufType

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# The base a LoRA GGUF is applied to: the type whose own rounding keeps the check against the adapter model
# tight (a quantized base would add its error under every adapter, unchecked).
LORA_BASE_TYPE: GgufType = "f16"
# PEFT's saved name of one LoRA factor: base_model.model.<module>.lora_A.weight
FACTOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# PEFT saves an adapted lm_head's or embedding's own weight beside its factors (save_embedding_layers="auto"):
# the base's, unless the vocabulary was resized, where llama.cpp refuses the factors' shape on the base
SAVED_BASE_LAYER = ".base_layer.weight"
# adapter_config.json options under which PEFT's forward is not W x + scale · B A x on linear layers
REFUSED_OPTIONS = {
    "use_dora": "DoRA divides each row of W + s · B A by its norm and multiplies it by a trained magnitude "
    "(lora_magnitude_vector), which llama.cpp's LoRA (W x + s · B A x) cannot represent; serve the merged GGUF",
    "target_parameters": "LoRA on fused parameters (Llama 4's routed experts) has no llama.cpp LoRA form",
    "modules_to_save": "modules_to_save trains whole copies of modules, which a LoRA GGUF cannot hold",
    "trainable_token_indices": "trained token rows (embeddings) are not converted",
    "lora_bias": "llama.cpp's LoRA has no bias",
    "layer_replication": "replicated layers change the base's layer stack",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts) is not a Llama layout",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not converted",
    "use_qalora": "QA-LoRA pools the input before A",
    "use_bdlora": "BD-LoRA's block-diagonal factors are not converted",
    "velora_config": "VeLoRA is not converted",
    "monteclora_config": "MonteCLoRA is not converted",
    "kasa_config": "KaSA is not converted",
    "arrow_config": "Arrow routing is not converted",
}


def refusals(lora: dict[str, Any]) -> list[str]:
    """What in an adapter_config.json (as a dict) the LoRA GGUF cannot carry: one reason per option set."""
    problems = []
    if lora.get("peft_type") != "LORA":
        problems.append(f"peft_type is {lora.get('peft_type')!r}; only LORA adapters are converted")
    for option, reason in REFUSED_OPTIONS.items():
        if lora.get(option):
            problems.append(f"{option} is set: {reason}")
    if lora.get("bias", "none") != "none":
        problems.append(f"bias is {lora['bias']!r}: trained biases of the base are not converted")
    if not lora.get("lora_alpha", 0) > 0:
        problems.append(f"lora_alpha is {lora.get('lora_alpha')!r}; llama.cpp reads alpha 0 as scale 1")
    return problems


def peft_scale(lora: dict[str, Any], module: str, rank: int) -> float:
    """PEFT 0.21's scale of `module`'s adapter of rank `rank` (LoraLayer.update_layer): alpha / r, or
    alpha / sqrt(r) with use_rslora; alpha from alpha_pattern (keys matched at the end of the module name,
    peft's get_pattern_key), else lora_alpha."""
    patterns = lora.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), lora["lora_alpha"])
    return float(alpha) / (math.sqrt(rank) if lora.get("use_rslora") else rank)


def written_alpha(lora: dict[str, Any]) -> float:
    """adapter.lora.alpha: the alpha with which llama.cpp's alpha / r equals PEFT's scale at rank `r`
    (lora_alpha; lora_alpha · sqrt(r) for rsLoRA)."""
    return peft_scale({**lora, "alpha_pattern": {}}, "", lora["r"]) * lora["r"]


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """adapter_config.json as a dict, and per adapted module ("model.layers.0.self_attn.q_proj") its factors
    {"A": (r, in), "B": (out, r)} as fp32 arrays.

    Raises CheckFailed naming the folder and the option or tensor for everything `refusals` lists, a tensor
    that is not a LoRA factor (DoRA's lora_magnitude_vector, lora_embedding_A/B, a saved module), a module
    missing a factor, and a folder without the two files."""
    files = [adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CheckFailed(f"{adapter_dir}: no {' or '.join(missing)}; expected a PEFT LoRA adapter folder")
    lora = json.loads(files[0].read_text(encoding="utf-8"))
    problems = refusals(lora)
    factors: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(files[1], framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key.endswith(SAVED_BASE_LAYER):
                continue
            match = FACTOR.match(key)
            if match is None:
                problems.append(f"tensor {key} is not a LoRA factor ({unexpected_tensor(key)})")
                continue
            array = handle.get_tensor(key).to(torch.float32).numpy()
            factors.setdefault(match["module"], {})[match["factor"]] = array
    problems += [
        f"{module} has only lora_{next(iter(pair))}" for module, pair in factors.items() if len(pair) != 2
    ]
    if problems:
        raise CheckFailed(
            f"{adapter_dir}: cannot be written as a llama.cpp LoRA GGUF: " + "; ".join(problems)
        )
    return lora, factors


def unexpected_tensor(key: str) -> str:
    """Why a saved adapter tensor other than lora_A/lora_B weights is refused, from its name."""
    if "lora_magnitude_vector" in key:
        return "DoRA's magnitude vector: llama.cpp's LoRA cannot represent it"
    if "lora_embedding" in key or "embed_tokens" in key or "token_adapter" in key:
        return "trained embeddings are not converted"
    return "only lora_A and lora_B weights are converted"


def lora_tensors(
    lora: dict[str, Any],
    factors: dict[str, dict[str, np.ndarray]],
    config: PretrainedConfig,
    arch: gguf.MODEL_ARCH,
    where: Path,
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name, fp32 array) for each factor: `<base tensor's GGUF name>.lora_a` (r, in) and
    `.lora_b` (out, r), lora_b laid out as hf_arrays lays out the base weight and multiplied by PEFT's
    scale over the one llama.cpp will compute (1 but under alpha_pattern, or rank_pattern with rsLoRA)."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    alpha = written_alpha(lora)
    for module, pair in sorted(factors.items()):
        if module.endswith("lm_head") and config.tie_word_embeddings:
            raise CheckFailed(
                f"{where}: LoRA on lm_head of a model with tied embeddings: the base GGUF has no output.weight "
                "(llama.cpp computes the output with token_embd), so the adapter has nothing to attach to"
            )
        rank = pair["A"].shape[0]
        ratio = peft_scale(lora, module, rank) / (alpha / rank)
        # one tensor: only Llama 4's fused experts are split, and their adapters are refused
        [(hf_name, lora_b)] = hf_arrays(f"{module}.weight", pair["B"], config)
        name = gguf_name(names, hf_name, arch, where)
        yield f"{name}.lora_a", np.ascontiguousarray(pair["A"])
        scaled = lora_b if math.isclose(ratio, 1.0, rel_tol=1e-9) else lora_b * np.float32(ratio)
        yield f"{name}.lora_b", np.ascontiguousarray(scaled, dtype=np.float32)


def write_lora_gguf(adapter_dir: Path, base: Path | PretrainedConfig, target: Path) -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir` (adapter_config.json + adapter_model.safetensors) as a
    llama.cpp LoRA GGUF, F32 tensors, for the base model `base` (its folder, or its config).

    Args:
        adapter_dir: The adapter folder (a run's adapter/ or dpo/adapter/).
        base: The base model's folder (config.json) or its config; the architecture must be one our GGUF
            writer handles (gguf_file.ARCHITECTURES: llama, llama4_text).
        target: The file to write (atomically).

    Returns:
        `target`.

    Raises:
        CheckFailed: before anything is written, for an adapter option or tensor llama.cpp's LoRA cannot
            represent or that is not converted (module docstring), another architecture, or an adapted module
            that has no GGUF name.
    """
    if isinstance(base, PretrainedConfig):
        config, arch = base, ARCHITECTURES.get(base.model_type)
        if arch is None:
            raise CheckFailed(
                f"{adapter_dir}: base model_type {base.model_type!r} has no GGUF architecture here"
            )
    else:
        config, arch = export_config(base)
    lora, factors = read_adapter(adapter_dir)
    arrays = list(lora_tensors(lora, factors, config, arch, adapter_dir))
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha(lora))
        writer.add_name(adapter_dir.name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array in arrays:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def lora_gguf_paths(config: RunConfig) -> tuple[Path, Path]:
    """The two files `export.lora_gguf` makes export write, for serving the run's adapter on an unmerged
    base: (gguf/<name>-base-f16.gguf, the untuned base model at f16; gguf/<name>-lora.gguf, the run's final
    adapter: dpo/adapter/ when DPO is on, else adapter/)."""
    run = config.run_dir
    return run.gguf_file(f"{config.name}-base", LORA_BASE_TYPE), run.gguf / f"{config.name}-lora.gguf"


def write_lora_files(config: RunConfig, chat: ChatTokenizer, tokenizer_folder: Path) -> tuple[Path, Path]:
    """Write `lora_gguf_paths(config)`: the adapter first (it is refused before anything big is written),
    then the base, f16, with the run's tokenizer and chat template from `tokenizer_folder` (what the merged
    GGUF files carry) and `chat`'s stop tokens. Returns (base GGUF, adapter GGUF).

    Raises:
        CheckFailed: the run has no LoRA adapter (a full fine-tune), the adapter is refused
            (`write_lora_gguf`), or the base cannot be written (`gguf_file.write_gguf`).
        ModelLoadError: the base model's folder cannot be found (`models.source.local_folder`).
    """
    final = config.run_dir.final(config.dpo.enabled)
    if not (final / ADAPTER_CONFIG).is_file():
        raise CheckFailed(
            f"export.lora_gguf: {final} holds no LoRA adapter (a full fine-tune?); a LoRA GGUF is made "
            "from a LoRA, rsLoRA or QLoRA run"
        )
    base, adapter = lora_gguf_paths(config)
    folder = local_folder(config.model.base, config.model.revision)
    write_lora_gguf(final, folder, adapter)
    write_gguf(folder, base, LORA_BASE_TYPE, chat, f"{config.name}-base", tokenizer_folder=tokenizer_folder)
    return base, adapter


def attach_lora(llm: Any, adapter: Path, scale: float = 1.0) -> None:
    """Load the LoRA GGUF `adapter` onto `llm`'s model (a llama_cpp.Llama) and apply it with `scale` on its
    context, replacing any adapter there (llama.cpp's llama_adapter_lora_init and llama_set_adapters_lora;
    the adapter lives as long as the model). The KV cache is dropped: it holds states of the old adapters.

    Raises CheckFailed when llama.cpp refuses the file (another architecture, a tensor the base lacks or
    of another shape: llama.cpp's log names it)."""
    import llama_cpp

    handle = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter).encode())
    if not handle:
        raise CheckFailed(f"{adapter}: llama.cpp refused this LoRA GGUF on {llm.model_path}")
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, (ctypes.c_float * 1)(scale)):
        raise CheckFailed(f"{adapter}: llama.cpp could not apply this LoRA GGUF")
    llm.reset()


@dataclass
class LoraCheck:
    """A LoRA GGUF on its base GGUF against the adapter model (transformers + PEFT, fp32); |Δlogit| in
    logits' units, over every position of the check conversations."""

    base: str
    adapter: str
    base_size_mb: float
    adapter_size_mb: float
    alpha: float  # adapter.lora.alpha as written
    max_abs_logit_diff: float  # base GGUF + adapter vs the adapter model
    base_max_abs_logit_diff: float  # base GGUF alone vs the base model: the yardstick
    tolerance: float  # export.merge_tolerance + ROUNDING_FACTOR x the yardstick
    adapter_max_abs_logit_diff: float  # base GGUF + adapter vs base GGUF alone: what the adapter changes
    greedy_identical: int
    greedy_compared: int
    # answers that part where the adapter model's own top-2 logits are within 2 x tolerance: a tie
    greedy_near_ties: int = 0
    file_check: dict[str, Any] | None = None  # the export stage's checks of every GGUF file, adapter applied
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LlamaCppRun:
    """What llama.cpp computed on the check conversations: per sequence (len, vocab) fp32 logits of the
    base GGUF alone and with the adapter, and per prompt the adapter's greedy answer ids."""

    alone: list[torch.Tensor]
    applied: list[torch.Tensor]
    answers: list[list[int]]


def run_llama_cpp(base: Path, adapter: Path, probe: Probe, stop_ids: set[int]) -> LlamaCppRun:
    """The base GGUF in llama.cpp, alone and then with `adapter`, on `probe`'s sequences, and greedy answers
    (ANSWER_TOKENS at most, up to and including a stop id) to its prompts with the adapter. The KV cache is
    F32: llama.cpp's default F16 cache moves logits by up to 4e-3 on its own (measured on the tiny models,
    F32 base), which would hide a conversion fault."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(base),
        n_ctx=max(max(map(len, probe.sequences)), max(map(len, probe.prompts)) + ANSWER_TOKENS),
        logits_all=True,
        verbose=False,
        seed=0,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )

    def logits(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    def greedy(prompt: list[int]) -> list[int]:
        answer = [int(logits(prompt)[-1].argmax())]
        while answer[-1] not in stop_ids and len(answer) < ANSWER_TOKENS:
            llm.eval(answer[-1:])
            answer.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return answer

    try:
        alone = [logits(ids) for ids in probe.sequences]
        attach_lora(llm, adapter)
        return LlamaCppRun(
            alone, [logits(ids) for ids in probe.sequences], [greedy(p) for p in probe.prompts]
        )
    finally:
        llm.close()


@torch.inference_mode()
def parting_margin(model: PeftModel, prompt: list[int], expected: list[int], got: list[int]) -> float:
    """Where two greedy answers to `prompt` first differ, how much the model preferred its own token
    (`expected`'s) over the other's: the difference of their logits there (0.0 when neither differs)."""
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    if at is None:
        return 0.0
    logits = model(input_ids=torch.tensor([prompt + expected[:at]])).logits[0, -1]
    return float(logits[expected[at]] - logits[got[at]])


def check_lora(
    model: PeftModel, chat: ChatTokenizer, base: Path, adapter: Path, probe: Probe, merge_tolerance: float
) -> LoraCheck:
    """The LoRA GGUF `adapter` applied by llama.cpp to the base GGUF `base`, against `model` (the base with
    the same adapter, transformers + PEFT, fp32, eval mode) on the check conversations.

    The tolerance follows the merge's rule for a rounded model: `merge_tolerance` plus ROUNDING_FACTOR times
    what rounding alone costs, here how far the base GGUF alone is from the base model (`model` with its
    adapter disabled). Greedy answers (ANSWER_TOKENS, as the merge check) must be equal; one that parts
    where the adapter model's own two candidates are within 2 x tolerance is a tie, counted apart.

    Args:
        model: The adapter model.
        chat: The run's tokenizer and stop tokens.
        base: The untuned base model's GGUF (f32 or f16).
        adapter: Its LoRA GGUF (`write_lora_gguf`).
        probe: The check conversations (merge.build_probe): sequences for logits, prompts for greedy answers.
        merge_tolerance: export.merge_tolerance.

    Returns:
        LoraCheck with the measured max |Δlogit|s and greedy counts; `failures` (`lora_failures`) empty when
        the file passes.
    """
    expected = logits_of(model, probe.sequences)
    with model.disable_adapter():
        expected_base = logits_of(model, probe.sequences)
    stop_ids = set(chat.stop_ids)
    answers = TransformersEngine("adapter model", model, chat.tokenizer.pad_token_id, batch_size=1).greedy(
        probe.prompts, ANSWER_TOKENS, stop_ids, lambda count: None
    )
    run = run_llama_cpp(base, adapter, probe, stop_ids)
    yardstick = max_abs_diff(expected_base, run.alone)
    tolerance = rounded_tolerance(merge_tolerance, yardstick)
    rows = zip(probe.prompts, answers, run.answers, strict=True)
    margins = [parting_margin(model, prompt, a, b) for prompt, a, b in rows if a != b]
    fields, _ = read_gguf_metadata(str(adapter))
    result = LoraCheck(
        base=str(base),
        adapter=str(adapter),
        base_size_mb=round(base.stat().st_size / 2**20, 1),
        adapter_size_mb=round(adapter.stat().st_size / 2**20, 2),
        alpha=float(fields[gguf.Keys.Adapter.LORA_ALPHA]),
        max_abs_logit_diff=max_abs_diff(expected, run.applied),
        base_max_abs_logit_diff=yardstick,
        tolerance=tolerance,
        adapter_max_abs_logit_diff=max_abs_diff(run.alone, run.applied),
        greedy_identical=len(answers) - len(margins),
        greedy_compared=len(answers),
        greedy_near_ties=sum(abs(margin) <= 2 * tolerance for margin in margins),
    )
    result.failures = lora_failures(result)
    return result


def lora_failures(result: LoraCheck) -> list[str]:
    """What fails in a LoRA check (gates.lora_gates decides), each naming the measured value and what was
    allowed: base + adapter beyond the tolerance; an adapter whose effect is within it (not applied, or
    doing nothing: the comparison could not tell) or not finite; greedy answers that differ other than at a
    near-tie."""
    gates = {gate.name: gate for gate in lora_gates(asdict(result))}
    failures = []
    if not gates[LORA_LOGITS].passed:
        failures.append(
            f"the base GGUF with the adapter differs from the adapter model by {result.max_abs_logit_diff:.2e}; "
            f"allowed {result.tolerance:.2e} (export.merge_tolerance + {ROUNDING_FACTOR:g} x "
            f"{result.base_max_abs_logit_diff:.2e}, the base GGUF alone against the base model)"
        )
    if not gates[LORA_EFFECT].passed:
        failures.append(
            f"the adapter moves llama.cpp's logits by only {result.adapter_max_abs_logit_diff:.2e}, within the "
            f"tolerance {result.tolerance:.2e}: it was not applied, or it does nothing"
            if math.isfinite(result.adapter_max_abs_logit_diff)
            else f"the adapter moves llama.cpp's logits by {result.adapter_max_abs_logit_diff:.2e}: its logits "
            "with or without the adapter are not finite"
        )
    if not gates[LORA_GREEDY].passed:
        failures.append(
            f"greedy answers differ from the adapter model's on {gates[LORA_GREEDY].value} of "
            f"{result.greedy_compared} prompts (not at a near-tie: the adapter model preferred its token by more "
            "than 2 x the tolerance)"
        )
    return failures
