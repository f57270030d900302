"""What the Eval page shows of a run: eval/metrics.json as rows base vs tuned (per group too), the training
verdict and the failure probes, and eval/samples.jsonl's samples, ordered, filtered, paged, each answer's
word-level differences from the reference (difflib) as (op, text) segments the template wraps in tags."""

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from llamatailor.ui.paths import RUN_NAME, OutsideRunsFolder, RunsFolder

# The samples' orders: by delta (tuned_score - base_score) ascending, descending; as written.
Order = Literal["worst", "best", "file"]
# The samples' filters: every one; regressions (tuned_score < base_score); runaway (tuned not stopped).
Only = Literal["all", "regressions", "runaway"]
ORDERS: tuple[str, ...] = get_args(Order)
FILTERS: tuple[str, ...] = get_args(Only)
PER_PAGE = 25
REPORT_FILES = ("report.md", "scores.png")  # what eval writes beside its metrics, linked from the page
SAMPLE_TEXTS = ("prompt", "reference", "base", "tuned")  # the fields every samples.jsonl line must hold
WORD = re.compile(r"(\S+)(\s*)")
# What samples.jsonl's base_score and tuned_score measure, by metrics.json's headline: eval scores each
# answer (evaluate.metrics.example_score) with its headline metric (headline_metric) on that answer alone,
# chrF at sentence level divided by 100, so 0 to 1 where the metric table's corpus chrF is 0 to 100.
SAMPLE_METRICS = {
    "chrf": "measured on this answer alone (sacrebleu's sentence chrF ÷ 100: 0 to 1)",
    "json_field_f1": "measured on this answer alone (0 to 1)",
}

Segment = tuple[str, str]  # ("equal" | "ins" | "del", text): text is plain text, escaped by the template


@dataclass(frozen=True)
class MetricRow:
    """One metric of the table: `field` is set on a row of a nested metric (json_field_accuracy.module);
    `delta` is tuned - base when both are numbers, `better` whether that change is an improvement."""

    name: str
    base: Any
    tuned: Any
    field: str = ""
    headline: bool = False
    delta: float | None = None
    better: bool | None = None


@dataclass(frozen=True)
class Sample:
    """One samples.jsonl line (`line`: its 1-based number) with the scores as numbers or None."""

    line: int
    row: dict[str, Any]
    base_score: float | None
    tuned_score: float | None

    @property
    def delta(self) -> float | None:
        """tuned_score - base_score, None when either is missing."""
        if self.base_score is None or self.tuned_score is None:
            return None
        return self.tuned_score - self.base_score


@dataclass
class EvalPage:
    """Everything the Eval page renders. `folder` is the results' folder relative to the run directory
    (eval, or eval/candidates/<name>); `problems` name the file and line of what could not be read."""

    folder: str
    found: bool = False
    headline: str = ""
    sample_metric: str = "score"  # the per-sample scores' metric (SAMPLE_METRICS), "score" when unknown
    sample_metric_note: str = ""
    tuned_source: str = ""
    metrics: list[MetricRow] = field(default_factory=list)
    groups: dict[str, list[MetricRow]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # of REPORT_FILES, those present


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def metric_table(metrics: dict[str, Any], headline: str) -> list[MetricRow]:
    """The rows of a {"base": {...}, "tuned": {...}} metrics dict, in base's order, nested dicts flattened
    (the flattening of evaluate.report.metric_rows). Raises KeyError or TypeError when tuned lacks a field
    that base has."""
    # evaluate.report draws with matplotlib: imported when an eval page is asked for, not when the UI starts
    from llamatailor.evaluate.report import LOWER_IS_BETTER, metric_rows

    rows = []
    for name, base, tuned in metric_rows(metrics):
        parent, _, child = name.partition(".")
        nested = bool(child) and isinstance(metrics["base"].get(parent), dict)
        b, t = _number(base), _number(tuned)
        delta = None if b is None or t is None else t - b
        lower = any(key in name for key in LOWER_IS_BETTER)
        better = None if not delta else (delta < 0) == lower
        rows.append(MetricRow(name, base, tuned, child if nested else "", name == headline, delta, better))
    return rows


def word_diff(output: str, reference: str) -> list[Segment]:
    """`output` as segments against `reference`, word by word (whitespace-separated words compared with
    difflib.SequenceMatcher, no autojunk): "ins" for the output's words the reference lacks, "del" for the
    reference's words the output lacks (shown where they would be, a space apart), "equal" for the rest; the
    output's own whitespace (line breaks too) is kept."""
    out, ref = WORD.findall(output), WORD.findall(reference)
    leading = output[: len(output) - len(output.lstrip())]
    segments: list[Segment] = [("equal", leading)] if leading else []
    matcher = difflib.SequenceMatcher(None, [w for w, _ in ref], [w for w, _ in out], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            segments.append(("equal", "".join(w + s for w, s in out[j1:j2])))
            continue
        if tag in ("delete", "replace"):
            if j1 == len(out) and segments and not segments[-1][1][-1:].isspace():
                segments.append(("equal", " "))  # reference words missing at the end: apart from the last
            segments.append(("del", " ".join(w for w, _ in ref[i1:i2])))
            segments.append(("equal", " " if j1 < len(out) else ""))
        if tag in ("insert", "replace"):
            words = "".join(w + s for w, s in out[j1:j2])
            text = words.rstrip()
            segments += [("ins", text), ("equal", words[len(text) :])]
    return _merged(segments)


def _merged(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for op, text in segments:
        if not text:
            continue
        if merged and merged[-1][0] == op:
            merged[-1] = (op, merged[-1][1] + text)
        else:
            merged.append((op, text))
    return merged


def load_eval(runs: RunsFolder, name: str, candidate: str = "") -> EvalPage:
    """The eval results of run `name` (or of its candidate model `candidate`, eval/candidates/<candidate>).

    A missing eval/metrics.json leaves `found` False (the page says to run eval); a file that is not JSON,
    metrics without base and tuned, or samples.jsonl lines that are not sample objects are listed in
    `problems` by file and line. Raises OutsideRunsFolder for a run or candidate name that is not one folder's
    name, or a run that does not exist."""
    runs.run(name)
    if candidate and not RUN_NAME.match(candidate):
        raise OutsideRunsFolder(f"{candidate!r} is not a candidate's name")
    page = EvalPage("eval/candidates/" + candidate if candidate else "eval")
    metrics = _file(runs, name, f"{page.folder}/metrics.json")
    if metrics is None:
        return page
    page.found = True
    try:
        saved = json.loads(metrics.read_text(encoding="utf-8", errors="replace"))
    except ValueError as exc:
        page.problems.append(f"{page.folder}/metrics.json: not JSON ({exc})")
        saved = {}
    _read_metrics(page, saved)
    samples = _file(runs, name, f"{page.folder}/samples.jsonl")
    if samples is None:
        page.problems.append(f"{page.folder}/samples.jsonl: missing")
    else:
        page.samples = read_samples(samples, f"{page.folder}/samples.jsonl", page.problems)
    page.probes = probe_rows(saved, page.samples)
    page.files = [file for file in REPORT_FILES if _file(runs, name, f"{page.folder}/{file}")]
    return page


def _file(runs: RunsFolder, name: str, relative: str) -> Path | None:
    try:
        return runs.file(name, relative)
    except OutsideRunsFolder:  # missing, or a symlink leading out: neither is read
        return None


def _read_metrics(page: EvalPage, saved: Any) -> None:
    label = f"{page.folder}/metrics.json"
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("base", "tuned")):
        page.problems.append(f"{label}: no 'base' and 'tuned' metrics")
        return
    page.headline = str(saved.get("headline", ""))
    if page.headline in SAMPLE_METRICS:
        page.sample_metric, page.sample_metric_note = page.headline, SAMPLE_METRICS[page.headline]
    page.tuned_source = str(saved.get("tuned_source", ""))
    training = saved.get("training")
    page.training = training if isinstance(training, dict) else {}
    try:
        page.metrics = metric_table(saved, page.headline)
        groups = saved.get("groups") or {}
        page.groups = {
            str(value): metric_table(by_model, page.headline) for value, by_model in groups.items()
        }
    except (KeyError, TypeError, AttributeError) as exc:
        page.problems.append(f"{label}: base and tuned do not hold the same metrics ({exc!r})")


def read_samples(path: Path, label: str, problems: list[str]) -> list[Sample]:
    """The samples of eval/samples.jsonl at `path` (one JSON object a line, each with text in prompt,
    reference, base and tuned); a line that is not one is left out and named in `problems` as
    "<label> line N: why"."""
    samples = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                problems.append(f"{label} line {number}: not JSON ({exc})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{label} line {number}: not a JSON object")
                continue
            missing = [key for key in SAMPLE_TEXTS if not isinstance(row.get(key), str)]
            if missing:
                problems.append(f"{label} line {number}: no text in {', '.join(missing)}")
                continue
            samples.append(
                Sample(number, row, _number(row.get("base_score")), _number(row.get("tuned_score")))
            )
    return samples


def probe_rows(saved: Any, samples: list[Sample]) -> list[dict[str, Any]]:
    """The failure probes eval recorded (evaluate/probes.py), base vs tuned: the runaway share (answers that
    ran to max_new_tokens without the end-of-turn token; with their count in samples.jsonl's stopped flags)
    and the memorised share (answers repeating eval.memorisation_tokens tokens of a training answer)."""
    base = saved.get("base") if isinstance(saved, dict) else None
    tuned = saved.get("tuned") if isinstance(saved, dict) else None
    if not isinstance(base, dict) or not isinstance(tuned, dict):
        return []
    runaway = {
        model: sum(s.row.get(f"{model}_stopped") is False for s in samples) for model in ("base", "tuned")
    }
    probes = [
        {
            "key": "runaway_share",
            "what": "answers that ran to the token limit without ending",
            "base": base.get("runaway_share"),
            "tuned": tuned.get("runaway_share"),
            "counts": runaway,
        },
        {
            "key": "memorised_share",
            "what": "answers repeating a training answer's tokens verbatim",
            "base": base.get("memorised_share"),
            "tuned": tuned.get("memorised_share"),
            "counts": None,
        },
    ]
    return [probe for probe in probes if probe["base"] is not None or probe["tuned"] is not None]


def select_samples(samples: list[Sample], order: str, only: str) -> list[Sample]:
    """`samples` filtered by `only` (a FILTERS name) and ordered by `order` (an ORDERS name); samples without
    both scores come last, ties keep the file's order."""
    if only == "regressions":
        samples = [s for s in samples if s.delta is not None and s.delta < 0]
    elif only == "runaway":
        samples = [s for s in samples if s.row.get("tuned_stopped") is False]
    if order == "file":
        return list(samples)
    scored = sorted(
        (s for s in samples if s.delta is not None), key=lambda s: s.delta or 0.0, reverse=order == "best"
    )
    return scored + [s for s in samples if s.delta is None]


@dataclass(frozen=True)
class SamplePage:
    """One page of selected samples, each with its base and tuned answers' word diffs against the
    reference; `page` is 1-based and within 1..pages."""

    items: list[tuple[Sample, list[Segment], list[Segment]]]
    page: int
    pages: int
    total: int
    first: int  # the 1-based rank of the page's first sample among the selected


def page_of(samples: list[Sample], page: int, per_page: int = PER_PAGE) -> SamplePage:
    """Page `page` (clamped to the pages there are) of `samples`; diffs are computed for its samples only."""
    pages = max(1, math.ceil(len(samples) / per_page))
    page = min(max(page, 1), pages)
    start = (page - 1) * per_page
    items = [
        (s, word_diff(s.row["base"], s.row["reference"]), word_diff(s.row["tuned"], s.row["reference"]))
        for s in samples[start : start + per_page]
    ]
    return SamplePage(items, page, pages, len(samples), start + 1)


def candidates(runs: RunsFolder, name: str) -> list[str]:
    """Names of the run's candidate evaluations (eval/candidates/<name>/metrics.json, `eval --model`)."""
    folder = runs.run(name).eval / "candidates"
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if RUN_NAME.match(entry.name) and _file(runs, name, f"eval/candidates/{entry.name}/metrics.json")
    )
