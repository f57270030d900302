"""The run file's schema (pydantic v2) and its loading: YAML, `key.sub=value` overrides, clear errors.

Run files are read as UTF-8 with or without a BOM (`llamatailor.textfiles`) and parsed by a bounded YAML
loader: plain data only (no Python tags), a cap on what aliases expand to, a cap on nesting.
"""

import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from llamatailor.errors import ConfigError, EncodingError
from llamatailor.rundir import RunDir
from llamatailor.textfiles import read_text
from llamatailor.vocabulary import (
    ALL_LINEAR,
    AUTO,
    DEFAULT_PHONE_REGIONS,
    EXPERTS,
    GGUF_TYPES,
    LLAMA_LINEARS,
    PII_KINDS,
    SPLITS,
    TRAIN_SPLIT,
    Auto,
    FamilyName,
    GgufType,
    LoraTargetPreset,
    Method,
    Optimizer,
    PiiKind,
    PrecisionSetting,
    lora_linears,
)

# A run file's aliases stand for a few dozen nodes; a "billion laughs" file for 9**9 of them.
ALIAS_NODES_LIMIT = 10_000
# A full run file nests 4 levels deep; PyYAML composes recursively and overflows the stack near 300.
NESTING_LIMIT = 64


class Section(BaseModel):
    # allow_inf_nan=False: an infinite epoch count or a NaN rate passes every bound pydantic checks (or fails
    # one with a misleading message); every float field of the run file refuses them by name instead.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="An alias (smollm2-135m-instruct), a local Hugging Face folder, a hub id or a .gguf file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    family: Literal[Auto, FamilyName] = Field(
        AUTO, description="Chat format; auto detects it from the tokenizer."
    )
    chat_template: Path | None = Field(
        None, description="A Jinja file that replaces the tokenizer's template."
    )


DataFormat = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "preference"]


class DataFile(Section):
    """One input: a local file (JSON, JSONL, CSV, Parquet) or a dataset on the Hugging Face Hub."""

    path: Path | None = Field(None, description="A .json, .jsonl, .csv or .parquet file.")
    hub: str | None = Field(None, description="A hub dataset (organisation/name); needs a network.")
    hub_config: str | None = Field(None, description="The hub dataset's configuration (subset), if any.")
    hub_split: str = Field(TRAIN_SPLIT, description="The hub dataset's split to read.")
    format: DataFormat = Field("auto", description="auto: detected from the first records' keys.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Our field name -> the file's column name, e.g. {output: answer}."
    )

    @model_validator(mode="before")
    @classmethod
    def _plain_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _one_source(self) -> "DataFile":
        if (self.path is None) == (self.hub is None):
            raise ValueError(
                "give either path (a local file) or hub (a hub dataset name), not both or neither"
            )
        return self

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"hub:{self.hub}"


class CleaningSection(Section):
    unicode_nfc: bool = Field(True, description="Normalise text to Unicode NFC.")
    control_chars: bool = Field(True, description="Remove control characters (tab and newline stay).")
    whitespace: bool = Field(
        True, description="CRLF to LF, no trailing spaces on lines, no outer whitespace."
    )


class PolicySection(Section):
    empty: Literal["drop", "keep"] = Field("drop", description="A message that is empty after cleaning.")
    too_short: Literal["drop", "keep"] = Field("drop", description="An answer under min_answer_tokens.")
    too_long: Literal["truncate", "drop"] = Field("truncate", description="A sample over max_seq_len tokens.")


class DedupSection(Section):
    exact: bool = Field(True, description="Drop records whose normalised text repeats an earlier one.")
    near: bool = Field(True, description="Drop near-duplicates (Jaccard of word 3-grams >= `threshold`).")
    threshold: float = Field(
        0.8, gt=0, le=1, description="Exact Jaccard similarity of word 3-grams that makes a near-duplicate."
    )
    num_perm: int = Field(
        64, ge=16, le=512, description="MinHash permutations: more find more candidate pairs (recall)."
    )
    fold_case: bool = Field(
        True, description="Compare texts case-folded; false where case carries meaning (code, units)."
    )

    @model_validator(mode="after")
    def _bands_fit(self) -> "DedupSection":
        if self.num_perm % 4:
            raise ValueError(f"num_perm must be a multiple of 4 (bands of 4 rows), got {self.num_perm}")
        return self


class PiiSection(Section):
    mode: Literal["report", "mask", "drop"] = Field(
        "report", description="report: count only; mask: replace with [KIND]; drop: reject the record."
    )
    kinds: list[PiiKind] = Field(default_factory=lambda: list(PII_KINDS))
    phone_regions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PHONE_REGIONS),
        description="Countries (ISO 3166 codes) whose national phone formats count without a leading +; "
        "a number written with + is checked in its own country's plan whatever this says.",
    )

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, regions: list[str]) -> list[str]:
        import phonenumbers  # only when a run file sets it: `--help` stays light

        unknown = [region for region in regions if region not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(
                f"unknown region {unknown[0]!r}: expected ISO 3166 country codes as libphonenumber knows them, "
                "upper case (US, GB, AU, IN, DE, FR...)"
            )
        return regions


class DataSection(Section):
    train: list[DataFile] = Field(min_length=1, description="Training inputs; val/test are drawn from them.")
    val: list[DataFile] = Field(default_factory=list, description="Validation inputs; else drawn from train.")
    test: list[DataFile] = Field(default_factory=list, description="Test inputs; else drawn from train.")
    val_ratio: float = Field(0.1, ge=0, lt=1)
    test_ratio: float = Field(0.1, ge=0, lt=1)
    meta_fields: list[str] = Field(
        default_factory=list, description="Record fields kept beside each sample (e.g. language) for eval."
    )
    stratify_by: str | None = Field(
        None, description="A record field whose values keep their shares per split."
    )
    system_prompt: str | None = Field(None, description="Added to conversations that have no system message.")
    max_seq_len: int = Field(
        1024, ge=16, description="Longer samples are truncated or dropped (policy.too_long)."
    )
    min_answer_tokens: int = Field(
        1, ge=0, description="Shorter answers are dropped or kept (policy.too_short)."
    )
    max_record_bytes: int = Field(1_000_000, ge=1, description="Larger records are rejected unparsed.")
    clean: CleaningSection = Field(default_factory=CleaningSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    pii: PiiSection = Field(default_factory=PiiSection)

    @model_validator(mode="after")
    def _ratios_leave_training_data(self) -> "DataSection":
        taken = (0 if self.val else self.val_ratio) + (0 if self.test else self.test_ratio)
        if taken >= 0.9:
            raise ValueError(
                f"val_ratio + test_ratio is {taken:g}; keep it below 0.9 so training data remains"
            )
        return self

    def inputs(self) -> list[tuple[str, DataFile]]:
        """(split, input) pairs in reading order: train inputs first, so earlier copies win."""
        return [(split, item) for split in SPLITS for item in getattr(self, split)]


# What PEFT 0.21's adapter on fused expert parameters (lora.ParamWrapper) lacks, by train.lora key.
NOT_ON_EXPERTS = {
    "dora": "DoRA cannot go with targets: experts (PEFT has no DoRA for fused expert parameters); use "
    "targets: all-linear for DoRA, or dora: false",
    "dropout": "dropout cannot go with targets: experts (PEFT applies none to fused expert parameters); set "
    "dropout: 0",
}


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    # targets comes before dropout and dora: their validators read it.
    targets: LoraTargetPreset | list[str] = Field(
        ALL_LINEAR,
        description="attention, mlp, all-linear (the family's linear layers), experts (all-linear plus a "
        "Mixture-of-Experts model's routed experts), or module names.",
    )
    expert_r: int | Auto = Field(
        AUTO, description="LoRA rank per routed expert (targets: experts); auto: max(1, r // experts)."
    )
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the adapter's input; 0 with targets: experts (none there)."
    )
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")

    # PEFT 0.21's adapter on fused expert parameters (lora.ParamWrapper) has neither dropout nor DoRA.
    @model_validator(mode="before")
    @classmethod
    def _no_dropout_on_experts(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("targets") == EXPERTS and "dropout" not in data:
            return {**data, "dropout": 0.0}
        return data

    @field_validator("expert_r", mode="before")
    @classmethod
    def _expert_rank(cls, value: Any) -> Any:
        if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("expected a whole number of at least 1, or auto")

    @field_validator("dropout", "dora")
    @classmethod
    def _plain_on_experts(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("targets") == EXPERTS:
            raise ValueError(NOT_ON_EXPERTS[str(info.field_name)])
        return value

    def linears(self, all_linear: tuple[str, ...] = LLAMA_LINEARS) -> tuple[str, ...]:
        """The module names the adapter goes on: the preset's (all-linear: `all_linear`, the family's linear
        layers) or those listed. The planner and the trainer both resolve `targets` here.

        Raises ConfigError naming a preset llamatailor does not know (one set past validation) and the known
        ones.
        """
        try:
            return lora_linears(self.targets, all_linear)
        except ValueError as exc:
            raise ConfigError(f"train.lora.targets: {exc}") from None


class QuantizationSection(Section):
    """The frozen base of a QLoRA run (bitsandbytes)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (4-bit).")
    compute_dtype: PrecisionSetting = Field(
        AUTO, description="auto: the run's precision (bf16 on GPUs that have it, fp32 on CPU)."
    )


class Schedule(Section):
    """Optimisation settings; the SFT (`train`) and DPO (`dpo`) sections both have them."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="If set, overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    optimizer: Optimizer = Field(
        "adamw", description="The 8-bit and paged variants (bitsandbytes) need a CUDA GPU."
    )
    batch_size: int = Field(8, ge=1, description="Per process.")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: Literal[Auto, True, False] = Field(
        AUTO,
        description="Recompute activations to save memory; auto: on for GPUs, off on CPU (pure cost there).",
    )
    precision: PrecisionSetting = Field(
        AUTO, description="auto: bf16 on GPUs that have it, fp16 (loss-scaled) on older GPUs, fp32 on CPU."
    )
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps; default: save_steps."
    )
    save_steps: int = Field(100, ge=1, description="A checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep the last K checkpoints (and the best one).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without a better val loss."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="The least improvement that counts.")
    trackers: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list, description="Besides TensorBoard (always on), when installed."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch; default: torch's own choice, at most the CPUs this process may use "
        "(its affinity and cgroup CPU quota).",
    )
    micro_batch_tokens: Auto | int | None = Field(
        AUTO,
        description="Split a batch into passes of at most this many padded tokens (the same gradient, less "
        "activation memory); auto: 2048 on CPU, no split on GPUs; null: never split.",
    )

    @model_validator(mode="after")
    def _saves_fall_on_evaluations(self) -> "Schedule":
        # Checkpoints are ranked by val loss, so every saved step must be an evaluated one.
        if self.eval_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}): "
                "checkpoints are kept by their val loss"
            )
        return self


class TrainSection(Schedule):
    method: Method = Field(
        "lora",
        description="lora: adapter on a 16/32-bit base; qlora: adapter on a 4/8-bit base; full: every weight.",
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    packing: bool = Field(
        False,
        description="Padding-free rows: each micro-batch joined into one sequence, samples kept apart by "
        "position ids. For flash attention on GPUs; slower on CPU, where a block mask spans the whole row.",
    )


class DpoSection(Schedule):
    """Direct preference optimisation after SFT, continuing the SFT adapter on data/preference/."""

    enabled: bool = Field(False, description="Run the dpo stage in `llamatailor run`.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the SFT model.")
    loss_type: Literal[
        "sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair"
    ] = "sigmoid"
    learning_rate: float = Field(5e-6, gt=0, lt=1)
    batch_size: int = Field(4, ge=1, description="Preference pairs per process.")


class JudgeSection(Section):
    """An LLM judge behind any OpenAI-compatible endpoint, scoring answers 1 to 5 against the reference."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1, or a local server's /v1.")
    model: str = Field(description="The judge model's name at that endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    max_samples: int | None = Field(None, ge=1, description="Judge the first N test answers only.")
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")


class EvalSection(Section):
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    max_samples: int | None = Field(None, ge=1, description="Evaluate on the first N test records only.")
    show: int = Field(3, ge=0, description="How many held-out answers to print, base vs tuned.")
    json_fields: list[str] | None = Field(
        None, description="Score answers as JSON on these keys (field precision/recall/F1)."
    )
    semantic: bool = Field(True, description="Semantic similarity with all-MiniLM-L6-v2 (offline).")
    perplexity: bool = Field(
        True, description="Perplexity on val and test, answers only and whole sequences."
    )
    memorisation_tokens: int = Field(
        32, ge=4, description="An answer repeating this many tokens of a training answer counts as memorised."
    )
    group_by: str | None = Field(
        None,
        description="A record field kept by prepare (data.meta_fields), e.g. language: metrics per value.",
    )
    judge: JudgeSection | None = Field(None, description="Optional LLM judge.")


DEFAULT_GGUF_TYPES: tuple[GgufType, ...] = ("q8_0",)


class ExportSection(Section):
    """merge (the adapter folded into the base) and export (GGUF files, an Ollama Modelfile), with gates."""

    merge_dtype: PrecisionSetting = Field(
        AUTO, description="dtype of merged/: auto keeps the base's own (fp32 for the embedded model)."
    )
    merge_tolerance: float = Field(
        1e-3, gt=0, description="Largest |logit| difference allowed between adapter and merged model (fp32)."
    )
    check_samples: int = Field(
        8, ge=1, description="Val conversations used for the merge check, perplexity and top-1 agreement."
    )
    gguf: list[GgufType] = Field(
        default_factory=lambda: list(DEFAULT_GGUF_TYPES),
        description=f"GGUF types to write: {', '.join(GGUF_TYPES)}.",
    )
    gates: dict[GgufType, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Largest perplexity increase over the merged model, in percent, per GGUF type; "
        "a type not named here gets its default (export.gguf_gates.DEFAULT_GATES_PCT).",
    )
    modelfile_from: GgufType | None = Field(
        None, description="The GGUF type the Ollama Modelfile points at; default: the first in gguf."
    )
    lora_gguf: bool = Field(
        False,
        description="Also write gguf/<name>-base-f16.gguf (the untuned base) and gguf/<name>-lora.gguf (the "
        "adapter as a llama.cpp LoRA GGUF), checked together against the adapter model: several adapters "
        "served over one base. LoRA, rsLoRA and QLoRA runs; not DoRA, full fine-tuning or Llama 4 experts.",
    )

    @model_validator(mode="after")
    def _modelfile_type_is_exported(self) -> "ExportSection":
        if self.modelfile_from and self.modelfile_from not in self.gguf:
            raise ValueError(f"modelfile_from {self.modelfile_from!r} is not among gguf {self.gguf}")
        return self

    @model_validator(mode="after")
    def _lora_gguf_is_exported(self) -> "ExportSection":
        if self.lora_gguf and not self.gguf:
            raise ValueError(
                "lora_gguf needs a type in gguf: the export stage, which writes it, runs only then"
            )
        return self


class RunConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The run's name and folder.")
    output_dir: Path = Field(Path("runs"), description="Runs go to <output_dir>/<name>.")
    seed: int = 42
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    dpo: DpoSection = Field(default_factory=DpoSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    # Where output_dir was set (" (run.yaml line 3)", " (from override ...)"), for messages; load_config sets it.
    _output_dir_origin: str = PrivateAttr("")

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.output_dir / self.name)

    def create_run_dir(self) -> RunDir:
        """Create `<output_dir>/<name>` for a stage to write into, and return it.

        Called where a stage starts writing, not at load: commands that only read a run (serve, chat) work
        on a read-only run directory. The folder is really created (rather than asked about with os.access,
        which says yes to root almost everywhere). Raises ConfigError naming output_dir, its value and where
        it was set when the folder cannot be created or written.
        """
        run = self.run_dir
        try:
            run.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"the run directory {run.root} cannot be created: {exc.strerror or exc}"
        else:
            if os.access(run.root, os.W_OK | os.X_OK):
                return run
            problem = f"the run directory {run.root} is not writable"
        raise ConfigError(
            f"output_dir{self._output_dir_origin} is {str(self.output_dir)!r}, but {problem}; "
            "choose a folder you can write to (e.g. output_dir=runs)"
        )

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, with paths made absolute so the run dir's copy works from anywhere."""
        return _absolute_paths(self).model_dump(mode="json")

    def section_hash(self, *keys: str) -> str:
        """Hash of the named parts of the resolved config (`data`, `train`, `data.max_seq_len`...)."""
        resolved = self.resolved()
        picked = {key: _lookup(resolved, key.split(".")) for key in keys}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def _absolute_paths(config: RunConfig) -> RunConfig:
    data = config.data.model_copy(
        update={split: [_absolute_file(item) for item in getattr(config.data, split)] for split in SPLITS}
    )
    chat_template = config.model.chat_template.resolve() if config.model.chat_template else None
    local_base = Path(config.model.base).expanduser()
    base = str(local_base.resolve()) if local_base.exists() else config.model.base  # aliases, hub ids stay
    model = config.model.model_copy(update={"chat_template": chat_template, "base": base})
    return config.model_copy(update={"output_dir": config.output_dir.resolve(), "data": data, "model": model})


def _absolute_file(item: DataFile) -> DataFile:
    return item.model_copy(update={"path": item.path.resolve()}) if item.path is not None else item


def _lookup(tree: dict[str, Any], parts: list[str]) -> Any:
    node: Any = tree
    for part in parts:
        node = node[part]
    return node


def load_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run file, apply `key.sub=value` overrides, validate; raise ConfigError naming what is wrong.

    Besides the schema, output_dir must be able to hold a run directory: not a filesystem root, not a file
    or a path beneath one (whether it is writable is checked when a stage writes: RunConfig.create_run_dir).
    """
    path = resolve_config_path(path)
    text = _read_run_file(path)
    try:
        raw = load_yaml(text, path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the run file must be a mapping of keys to values, found {type(raw).__name__}"
        )
    override_origin: dict[tuple[str, ...], str] = {}
    for override in overrides or []:
        key_path, value = parse_override(override)
        set_key(raw, key_path, value, override)
        override_origin[key_path] = override
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, text, override_origin)) from None
    config._output_dir_origin = _origin(("output_dir",), path, text, override_origin)
    check_output_dir(config)
    return config


def _read_run_file(path: Path) -> str:
    try:
        return read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: run file not found (working directory: {Path.cwd()})") from None
    except EncodingError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the run file: {exc.strerror or exc}") from None


def check_output_dir(config: RunConfig) -> None:
    """Raise ConfigError when `<output_dir>/<name>` cannot be a folder: output_dir is a filesystem root
    (runs would land beside the system's folders), or the path meets an existing file."""
    folder = config.output_dir.resolve()
    if folder == folder.parent:
        problem = "the filesystem root; name a folder for runs, such as runs"
    else:
        run_root = folder / config.name
        # os.path.exists is False behind a folder that cannot be searched, where Path.exists raises.
        existing = next(part for part in (run_root, *run_root.parents) if os.path.exists(part))  # noqa: PTH110
        if existing.is_dir():
            return
        problem = f"but {existing} is a file, so the run directory {run_root} cannot be created"
    raise ConfigError(f"output_dir{config._output_dir_origin} is {str(config.output_dir)!r}, {problem}")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data: no Python tags) that refuses alias bombs and deep nesting.

    Composing shares an anchored node among its aliases, but the data built from it is walked as a tree
    (validation, error messages, the resolved config), so nine levels of nine aliases ("billion laughs")
    stand for 9**9 nodes. Each alias adds the size of the node it stands for, counted with its own aliases
    expanded; past ALIAS_NODES_LIMIT the text is refused at that alias, before any data is built.
    """

    def __init__(self, text: str, source: Path | str) -> None:
        super().__init__(text)
        self.name = str(source)  # PyYAML's marks say `in "<unicode string>"` for text; name the file instead
        self.source = source
        self.sizes: dict[int, int] = {}  # id(node) -> nodes in its expansion, for finished nodes
        self.through_aliases = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self._compose(parent, index)
            self._count_alias(event, node)
            return node
        self.depth += 1
        if self.depth > NESTING_LIMIT:
            raise ConfigError(f"{self._where(event)}: nested deeper than {NESTING_LIMIT} levels")
        node = self._compose(parent, index)
        self.depth -= 1
        self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in _children(node))
        return node

    def _compose(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        node = super().compose_node(parent, index)
        # PyYAML's compose_node returns the alias's node or the one it composed, or raises; never None
        # (the stubs type it as get_node, which returns None at the end of the stream).
        assert node is not None
        return node

    def _count_alias(self, event: yaml.AliasEvent, node: yaml.Node) -> None:
        size = self.sizes.get(id(node))
        if size is None:  # the anchored node is still being composed: the alias is inside it
            raise ConfigError(
                f"{self._where(event)}: alias *{event.anchor} refers to a node that contains it; "
                "a run file cannot be recursive"
            )
        self.through_aliases += size
        if self.through_aliases > ALIAS_NODES_LIMIT:
            raise ConfigError(
                f"{self._where(event)}: alias *{event.anchor} takes the nodes reached through aliases past "
                f"{ALIAS_NODES_LIMIT:,} (aliases nested to expand exponentially?); a run file needs only "
                "a few small aliases"
            )

    def _where(self, event: yaml.Event) -> str:
        if not isinstance(self.source, Path):
            return self.source
        mark = event.start_mark  # the parser marks every event it makes; the stubs allow None
        return f"{self.source} line {mark.line + 1}" if mark is not None else str(self.source)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str, source: Path | str) -> Any:
    """The data of one YAML document, read by the bounded loader; `source` (a file, or a label such as an
    override) is named in messages, with the line for a file.

    Raises yaml.YAMLError for bad syntax or a Python tag (the safe constructor builds plain data only; its
    note says why a Python tag or a tab is refused, and how to fix it), and
    ConfigError for aliases expanding past ALIAS_NODES_LIMIT nodes, a recursive alias, or nesting deeper
    than NESTING_LIMIT.
    """
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        exc.note = _yaml_note(exc) or exc.note
        raise
    finally:
        loader.dispose()


YAML_TAG_PREFIX = "tag:yaml.org,2002:"


def _yaml_note(exc: yaml.MarkedYAMLError) -> str | None:
    """What PyYAML's words leave unsaid, for the errors a run file's author meets: a Python tag (the safe
    loader knows no constructor for it) and a tab (YAML indents with spaces only)."""
    problem, mark = exc.problem or "", exc.problem_mark
    line = f" (line {mark.line + 1})" if mark is not None else ""
    if problem.startswith(f"could not determine a constructor for the tag '{YAML_TAG_PREFIX}python/"):
        tag = "!!" + problem.split("'")[1].removeprefix(YAML_TAG_PREFIX)
        return (
            f"Python tags are not allowed in a run file: {tag}{line} would build a Python object; a run file "
            "holds plain data (text, numbers, lists, mappings), so remove the tag"
        )
    if "'\\t'" in problem:
        on_line = f" on line {mark.line + 1}" if mark is not None else ""
        return f"YAML indents with spaces, not tabs: replace the tab{on_line} with spaces"
    return None


def resolve_config_path(path: Path) -> Path:
    """A run directory stands for its resolved `config.yaml`."""
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    return path


def parse_override(override: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.sub=value, e.g. train.learning_rate=1e-4")
    try:
        value = load_yaml(value_text, f"override {override!r}") if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {exc}") from None
    return tuple(part.strip() for part in key.split(".")), value


def set_key(raw: dict[str, Any], key_path: tuple[str, ...], value: Any, override: str) -> None:
    node = raw
    for depth, part in enumerate(key_path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(key_path[: depth + 1])
            raise ConfigError(f"override {override!r}: {where} is a value, not a section")
        node = child
    node[key_path[-1]] = value


def format_validation_error(
    exc: ValidationError, path: Path, text: str, override_origin: dict[tuple[str, ...], str]
) -> str:
    lines = [f"{path}: invalid run file ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"] if part != "[key]")  # a mapping's bad key: its name
        key = ".".join(loc) or "(top level)"
        origin = _origin(loc, path, text, override_origin)
        lines.append(f"  - {key}{origin}: {describe_error(error, loc)}")
    return "\n".join(lines)


def _origin(loc: tuple[str, ...], path: Path, text: str, override_origin: dict[tuple[str, ...], str]) -> str:
    for length in range(len(loc), 0, -1):
        if loc[:length] in override_origin:
            return f" (from override {override_origin[loc[:length]]!r})"
    line = yaml_line_of(text, loc)
    return f" ({path.name} line {line})" if line else ""


def describe_error(error: ErrorDetails, loc: tuple[str, ...]) -> str:
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = allowed_keys(loc[:-1])
        hint = _closest(loc[-1], allowed)
        suggestion = f"; did you mean '{'.'.join((*loc[:-1], hint))}'?" if hint else ""
        return f"unknown key (value {value!r}){suggestion} Allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        options = [part.strip(" '") for part in expected.replace(" or ", ", ").split(",")]
        hint = _closest(str(value), options)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return f"got {value!r}, expected one of {expected}{suggestion}"
    reason = error.get("ctx", {}).get("error") if kind == "value_error" else None  # without "Value error, "
    if isinstance(value, dict) and reason is not None:
        # A section's own rule (save_steps against eval_steps) is given the whole section: show the keys its
        # message names, not every key of the section (a form sends them all).
        named = set("".join(char if char.isalnum() or char == "_" else " " for char in str(reason)).split())
        value = {key: item for key, item in value.items() if key in named}
        if not value:
            return str(reason)
    return f"got {value!r}: {reason or error['msg']}"


def _closest(word: str, options: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return matches[0] if matches else None


def allowed_keys(loc: tuple[str, ...]) -> list[str]:
    """The keys the schema allows at a section path (empty when the path is not a section)."""
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if model else None
        model = _section_type(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found:
                return found
    return None


def yaml_line_of(text: str, loc: tuple[str, ...]) -> int | None:
    """1-based line of the deepest key of `loc` present in the YAML text (None if it does not compose)."""
    loader = _BoundedLoader(text, "run file")
    try:
        node = loader.get_single_node()
    except (yaml.YAMLError, ConfigError):
        return None
    finally:
        loader.dispose()
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((item for item in node.value if item[0].value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line
