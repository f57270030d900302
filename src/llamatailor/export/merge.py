"""The `merge` stage: fold the adapter into a full-precision base and prove the result equals the adapter model.

The base is always loaded unquantized in fp32 (for a QLoRA run too: merging into 4-bit weights would round
the update away). The check compares logits on val conversations and greedy answers on val prompts, before
and after the merge, then reloads the saved folder with plain transformers and compares again: within the
tolerance when saved in fp32; saved in bf16 or fp16, within the tolerance plus ROUNDING_FACTOR times the
yardstick for rounding, measured on the same conversations: the larger of how far the adapter model itself
moves when its base is loaded in that dtype (a merge in bf16 may not be less faithful than running the adapter
on a bf16 base) and how far the merged model moves when its own weights are rounded to that dtype. The second
is the only rounding there is when the base is already stored in that dtype (Llama checkpoints are bf16): its
adapter model moves not at all on a bf16 base, while W + ΔW must still be rounded to bf16.
"""

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from llamatailor.config import RunConfig
from llamatailor.data.templating import render_for_training
from llamatailor.errors import CheckFailed
from llamatailor.export.gates import (
    MERGE_GREEDY,
    MERGE_LOGITS,
    MERGE_RELOAD,
    MERGE_SAVED,
    ROUNDING_FACTOR,
    failed,
    merge_gates,
    rounded_tolerance,
)
from llamatailor.generation.answers import answer_all
from llamatailor.generation.engines import TransformersEngine
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.models.loading import ChatTokenizer, load_saved_tokenizer, load_tuned_model, torch_dtype
from llamatailor.models.source import resolve_source
from llamatailor.rundir import atomic_path, write_json
from llamatailor.stage_contract import Stage, files_in, weights
from llamatailor.vocabulary import AUTO, TEST_SPLIT, VAL_SPLIT

ANSWER_TOKENS = 48  # greedy tokens compared per val prompt


@dataclass(frozen=True)
class MergeResult:
    folder: Path
    source: str
    dtype: str
    max_abs_logit_diff: float  # adapter model vs merged model, fp32, in memory
    saved_max_abs_logit_diff: float  # adapter model vs merged/ reloaded by plain transformers
    # merged/ reloaded vs the merged model in memory with its weights rounded to `dtype`: the save itself
    reload_max_abs_logit_diff: float
    greedy_identical: int
    greedy_compared: int
    tolerance: float
    # The larger of: the adapter model on an fp32 vs a `dtype` base; the merged model vs its weights in `dtype`.
    rounding_max_abs_logit_diff: float | None = None  # (not fp32)

    @property
    def saved_tolerance(self) -> float:
        """What the saved folder may differ by: the tolerance, plus ROUNDING_FACTOR x the rounding yardstick."""
        return rounded_tolerance(self.tolerance, self.rounding_max_abs_logit_diff)


@dataclass(frozen=True)
class Probe:
    sequences: list[list[int]]
    labels: list[list[int]]  # -100 outside the answers
    prompts: list[list[int]]


@torch.inference_mode()
def logits_of(model: PreTrainedModel, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The model's logits on each sequence, one unpadded forward pass per sequence.

    Args:
        model: A causal LM (with or without adapters), in eval mode.
        sequences: Token ids per sequence (lengths may differ).

    Returns:
        Per sequence, a (len, vocab) fp32 tensor on the CPU: row i is the logits for token i + 1.
    """
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in sequences]


def max_abs_diff(left: list[torch.Tensor], right: list[torch.Tensor]) -> float:
    """The largest |left - right| over all sequences and positions: max |Δlogit|, in logits' units.

    Args:
        left: Per sequence, (len, vocab) logits, as from `logits_of`.
        right: The same sequences' logits from another model, of the same shapes.

    Returns:
        The maximum absolute difference, a float.

    Raises:
        ValueError: the lists differ in length (a shape mismatch raises torch's RuntimeError).
    """
    return max(float((a - b).abs().max()) for a, b in zip(left, right, strict=True))


def merge_run(config: RunConfig) -> MergeResult:
    """Run the `merge` stage: fold the final adapter into the base and check merged/ against it.

    The merge is PEFT 0.21's `merge_and_unload` (W + scale x BA for LoRA and rsLoRA; DoRA's magnitude
    and direction recombined), in fp32; a fully fine-tuned model is saved again as it is. The checks are
    described in the module docstring; merge_report.json is written before they are enforced.

    Args:
        config: The resolved run file; reads `model`, `data`, `dpo.enabled`, `eval.batch_size` and
            `export` (`merge_dtype`, `merge_tolerance`, `check_samples`).

    Returns:
        MergeResult: merged/, its dtype, the max |Δlogit| of each comparison, the greedy answers equal
        out of compared (`ANSWER_TOKENS` tokens each), and the tolerances applied.

    Raises:
        CheckFailed: the merged model (in memory or reloaded from merged/) differs from the adapter
            model beyond the tolerance, or a greedy answer differs.
        ModelLoadError: the trained adapter or model, its tokenizer, or the base cannot be loaded.
        StageError: the val (or, when val is empty, test) split is missing.
    """
    run, settings = config.run_dir, config.export
    final = run.final(config.dpo.enabled)
    chat = load_saved_tokenizer(final, config.model)
    probe = build_probe(config, chat)
    model = load_tuned_model(config.model, final).eval()
    before = logits_of(model, probe.sequences)
    answers_before = greedy_answers(model, chat, probe.prompts, config.eval.batch_size)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    after = logits_of(model, probe.sequences)
    answers_after = greedy_answers(model, chat, probe.prompts, config.eval.batch_size)
    dtype = merged_dtype(settings.merge_dtype, config, final)
    rounded = after if dtype == torch.float32 else logits_of(round_weights(model, dtype), probe.sequences)
    save_merged(model.to(dtype), chat, run.merged, final)
    del model
    gc.collect()
    reloaded = AutoModelForCausalLM.from_pretrained(run.merged, dtype=torch.float32).eval()
    saved = logits_of(reloaded, probe.sequences)
    del reloaded
    rounding = None
    if dtype != torch.float32:
        on_rounded_base = rounding_yardstick(config, dtype, probe.sequences, before)
        rounding = max(on_rounded_base, max_abs_diff(before, rounded))
    identical = sum(a == b for a, b in zip(answers_before, answers_after, strict=True))
    result = MergeResult(
        folder=run.merged,
        source=str(final),
        dtype=str(dtype).removeprefix("torch."),
        max_abs_logit_diff=max_abs_diff(before, after),
        saved_max_abs_logit_diff=max_abs_diff(before, saved),
        reload_max_abs_logit_diff=max_abs_diff(rounded, saved),
        greedy_identical=identical,
        greedy_compared=len(probe.prompts),
        tolerance=settings.merge_tolerance,
        rounding_max_abs_logit_diff=rounding,
    )
    write_merge_report(result)
    check_merge(result)
    return result


STAGE = Stage(
    "merge",
    config_keys=(
        "model",
        "dpo.enabled",
        "data.system_prompt",
        "data.max_seq_len",
        "eval.batch_size",
        "export.merge_dtype",
        "export.merge_tolerance",
        "export.check_samples",
    ),
    # test.jsonl: the check conversations where val has none
    inputs=lambda config: [
        config.run_dir.split(VAL_SPLIT),
        config.run_dir.split(TEST_SPLIT),
        *files_in(config.run_dir.final(config.dpo.enabled)),
    ],
    outputs=lambda config: [
        config.run_dir.merged / "config.json",
        config.run_dir.merged / "merge_report.json",
        *weights(config.run_dir.merged),
    ],
    action=merge_run,
    enabled=lambda config: bool(config.export.gguf),
    activity="merging and checking the merged model against the adapter model",
)


def rounding_yardstick(
    config: RunConfig, dtype: torch.dtype, sequences: list[list[int]], expected: list[torch.Tensor]
) -> float:
    """Max |Δlogit| between `expected` (the adapter model in fp32) and the adapter model loaded on a base in
    `dtype` (computed in fp32), on the check conversations: what running in `dtype` costs without a merge.
    For a fully fine-tuned model it is the model itself in `dtype`."""
    final = config.run_dir.final(config.dpo.enabled)
    rounded = load_tuned_model(config.model, final, dtype).float().eval()
    return max_abs_diff(expected, logits_of(rounded, sequences))


@torch.no_grad()
def round_weights(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """`model` with every weight rounded to `dtype` in place, still held in its own dtype: what the weights
    saved in `dtype` compute when loaded back in fp32. Buffers (RoPE's frequencies) are left alone, as a
    reloaded model recomputes them."""
    for param in model.parameters():
        param.copy_(param.to(dtype))
    return model


def build_probe(config: RunConfig, chat: ChatTokenizer) -> Probe:
    """The check conversations of merge and export: the first `export.check_samples` val records (test
    records when val is empty), rendered as for training.

    Args:
        config: The run file (`export.check_samples`, `data.max_seq_len`, `data.system_prompt`).
        chat: The tokenizer and chat template saved with the trained model.

    Returns:
        Probe: per record, the training ids and labels (lists of one length, at most `data.max_seq_len`
        tokens; labels -100 outside the answers), and the prompt ids up to the last answer.

    Raises:
        StageError: the val split (or, when it is empty, the test split) is missing.
        RenderError: a record no longer renders with this tokenizer (a ValueError, not a stage error).
    """
    records = config.run_dir.read_split(VAL_SPLIT)[: config.export.check_samples]
    if not records:
        records = config.run_dir.read_split(TEST_SPLIT)[: config.export.check_samples]
    prompter = TokenizerPrompter(chat, config.data.system_prompt)
    rows = [(record["messages"], record.get("tools")) for record in records]
    samples = [
        render_for_training(chat, messages, config.data.max_seq_len, tools) for messages, tools in rows
    ]
    return Probe(
        sequences=[sample.input_ids for sample in samples],
        labels=[sample.labels for sample in samples],
        prompts=[prompter.chat_ids(messages[:-1], tools) for messages, tools in rows],
    )


def greedy_answers(
    model: PreTrainedModel, chat: ChatTokenizer, prompts: list[list[int]], batch: int
) -> list[str]:
    """Greedy answers of `model` to `prompts` (prompt ids), at most `ANSWER_TOKENS` tokens each, cut at
    the chat's stop tokens; `batch` prompts per generate call. Returns the decoded texts, in order."""
    engine = TransformersEngine("merge", model, chat.tokenizer.pad_token_id, batch)
    return [g.text for g in answer_all(engine, TokenizerPrompter(chat), prompts, ANSWER_TOKENS)]


def merged_dtype(requested: str, config: RunConfig, final: Path) -> torch.dtype:
    """The dtype of merged/: the one asked for, or for auto the dtype in which the weights merged into are
    stored: the base's config.json (a fully fine-tuned model's own). The merged model's config cannot say:
    loading the base in fp32 for the merge rewrites its dtype (transformers 5.23)."""
    if requested != AUTO:
        return torch_dtype(requested)  # type: ignore[arg-type]
    if (final / "config.json").is_file():
        stored = AutoConfig.from_pretrained(final).dtype
    else:
        source = resolve_source(config.model.base)
        revision = config.model.revision if source.kind == "hub" else None
        stored = AutoConfig.from_pretrained(source.location, revision=revision).dtype
    if stored is None:
        return torch.float32
    return stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored))


def save_merged(model: PreTrainedModel, chat: ChatTokenizer, folder: Path, source: Path) -> None:
    """safetensors, the training tokenizer and template, and a generation config that stops at every
    end-of-turn token (so plain transformers and vLLM stop where training taught the model to)."""
    model.generation_config = GenerationConfig(
        bos_token_id=chat.tokenizer.bos_token_id,
        eos_token_id=chat.stop_ids,
        pad_token_id=chat.tokenizer.pad_token_id,
    )
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        chat.tokenizer.save_pretrained(tmp)
        facts = {"merged_from": str(source), "family": chat.family.name, "stop_token_ids": chat.stop_ids}
        (tmp / "llamatailor.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")


def write_merge_report(result: MergeResult) -> None:
    write_json(result.folder / "merge_report.json", {**asdict(result), "folder": str(result.folder)})


def check_merge(result: MergeResult) -> None:
    """Enforce the merge checks on measured differences (max |Δlogit|, logits' units).

    Raises:
        CheckFailed: naming merged/ and every failure: the in-memory merge over `tolerance`; the reloaded
            folder over `saved_tolerance`; the reload over `tolerance` from the rounded in-memory model
            (the save changed weights); or any greedy answer that differs.
    """
    failing = failed(merge_gates(asdict(result)))
    problems = []
    if MERGE_LOGITS in failing:
        problems.append(
            f"max |logit| difference {result.max_abs_logit_diff:.2e} exceeds export.merge_tolerance "
            f"{result.tolerance:.0e}"
        )
    if MERGE_SAVED in failing:
        yardstick = (
            f" (tolerance {result.tolerance:.0e} + {ROUNDING_FACTOR:g} x {result.rounding_max_abs_logit_diff:.2e}, what the adapter "
            f"model moves on a {result.dtype} base)"
            if result.rounding_max_abs_logit_diff is not None
            else ""
        )
        problems.append(
            f"the saved folder differs by {result.saved_max_abs_logit_diff:.2e} after reloading; "
            f"allowed {result.saved_tolerance:.2e}{yardstick}"
        )
    if MERGE_RELOAD in failing:
        problems.append(
            f"merged/ reloaded differs by {result.reload_max_abs_logit_diff:.2e} from the merged model it was "
            f"saved from (tolerance {result.tolerance:.0e}): the save lost or changed weights"
        )
    if MERGE_GREEDY in failing:
        problems.append(
            f"greedy answers differ on {result.greedy_compared - result.greedy_identical} of "
            f"{result.greedy_compared} val prompts"
        )
    if problems:
        raise CheckFailed(
            f"{result.folder}: the merged model is not the adapter model: {'; '.join(problems)}"
        )
