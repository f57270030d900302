"""The New run form (/new and its JSON routes) and a run's start / stop page (/runs/NAME/job): writing a run
file into the runs folder, starting `llamatailor run` on it in the background, following its log, stopping
and resuming it."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from llamatailor.errors import LlamatailorError
from llamatailor.rundir import RunDir
from llamatailor.ui import jobs as jobs_module
from llamatailor.ui.jobs import LOG_NAME, JobConflict, Jobs, read_log
from llamatailor.ui.pages import render
from llamatailor.ui.paths import RUN_NAME, OutsideRunsFolder, RunsFolder
from llamatailor.ui.run_form import (
    DEFAULT_GPU_GIB,
    FieldError,
    FormConflict,
    check_form,
    form_schema,
    plan_verdict,
    starting_value,
    write_run_file,
)
from llamatailor.ui.runs import UNREADABLE, read_manifest, summarize_run
from llamatailor.ui.settings import runs_of, settings_of

router = APIRouter()
JOBS_KEY = jobs_module.__name__
MAX_GPU_GIB = 65536.0


class FormRequest(BaseModel):
    """What the New run page sends: the form's value, the GPU size to plan for (GiB), and whether an existing
    run of that name is to be resumed with this run file."""

    config: dict[str, Any]
    gpu_mem_gib: float | None = DEFAULT_GPU_GIB
    resume: bool = False


def jobs_of(request: Request) -> Jobs:
    """This UI's jobs (created on first use, kept in `settings.services`)."""
    jobs = settings_of(request).services.setdefault(JOBS_KEY, Jobs())
    assert isinstance(jobs, Jobs)
    return jobs


def _conflict(exc: LlamatailorError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=409)


def _errors(problems: list[FieldError]) -> list[dict[str, str]]:
    return [asdict(problem) for problem in problems]


@router.get("/new", response_class=HTMLResponse)
def new_run_page(request: Request) -> HTMLResponse:
    """The New run form (drawn by json-editor from /api/run-form/schema) beside the plan's verdict."""
    return render(request, "new.html", folder=str(runs_of(request).root), gpu_gib=DEFAULT_GPU_GIB)


@router.get("/api/run-form/schema")
def run_form_schema(request: Request) -> dict[str, Any]:
    """{schema: the form's JSON schema (run_form.form_schema), start: the form's first value}."""
    return {"schema": form_schema(), "start": starting_value(runs_of(request).root)}


@router.post("/api/run-form/validate")
def validate_form(request: Request, body: FormRequest) -> dict[str, Any]:
    """The form's problems and notes ({field, message} each), whether a run of its name `exists` (the page
    then offers to resume it), and, where the schema accepts it and model.base resolves, `plan`'s verdict
    for one GPU of `gpu_mem_gib` GiB; else, or for a model the planner cannot size, `plan_error`."""
    check = check_form(body.config, runs_of(request).root, body.resume)
    plan, plan_error = None, None
    gpu = body.gpu_mem_gib
    if gpu is None or not 0 < gpu <= MAX_GPU_GIB:
        plan_error = f"GPU memory: give the GPU's size in GiB, above 0 and at most {MAX_GPU_GIB:g}"
    elif check.config is None:
        plan_error = "the plan appears when the run file is valid"
    elif check.model is None:
        plan_error = "the plan appears when model.base names a model it can read (see Problems)"
    else:
        try:
            plan = plan_verdict(check.config, gpu, check.model)
        except LlamatailorError as exc:
            plan_error = str(exc)
    answer = {"errors": _errors(check.problems), "notes": _errors(check.notes), "exists": check.exists}
    return {**answer, "plan": plan, "plan_error": plan_error}


@router.post("/api/runs", response_model=None)
def start_new_run(request: Request, body: FormRequest) -> dict[str, Any] | JSONResponse:
    """Write the form's run file to <runs>/<name>.yaml (output_dir: the runs folder; paths absolute:
    `run_form.write_run_file`) and start `llamatailor run` on it. 400 with the problems when the form is
    not valid; 409 when the run exists and `resume` is not set, or when it runs. Answers {name, url: its
    job page, job}."""
    runs = runs_of(request)
    check = check_form(body.config, runs.root, body.resume)
    config = check.config
    if config is None or check.problems:
        return JSONResponse({"errors": _errors(check.problems)}, status_code=400)
    jobs = jobs_of(request)
    try:
        run = _new_run_dir(runs, config.name)
        jobs.refuse_running(config.name, run)
        run_file = write_run_file(config, runs.root, replace=body.resume)
        jobs.start(config.name, run_file, run)
    except (FormConflict, JobConflict, OutsideRunsFolder) as exc:
        return _conflict(exc)
    return {"name": config.name, "url": f"/runs/{config.name}/job", "job": jobs.view(config.name, run)}


def _new_run_dir(runs: RunsFolder, name: str) -> RunDir:
    """The run directory of a run the form starts: a new folder in the runs folder, or an existing run's
    (OutsideRunsFolder for a folder that is not a run, or leads out of the runs folder)."""
    if not RUN_NAME.match(name):
        raise FormConflict(f"name {name!r}: the UI takes run names of at most 128 characters")
    folder = runs.root / name
    if folder.exists() or folder.is_symlink():
        return runs.run(name)
    return RunDir(folder)


def _job_run(request: Request, name: str) -> RunDir:
    """Run `name`'s directory: that of this UI's job of that name (its manifest may not be written yet),
    else the runs folder's run (OutsideRunsFolder, a 404, for a name that is not a run)."""
    job = jobs_of(request).get(name)
    return RunDir(job.log.parent) if job is not None else runs_of(request).run(name)


@dataclass(frozen=True)
class RunStatus:
    """What the job page shows of the run beside its process: its state in one word, each stage's state,
    and why Resume is refused (None: it is not; a malformed manifest would only fail the run again)."""

    status: str
    stages: dict[str, str]
    resume_refused: str | None


def _run_status(run: RunDir) -> RunStatus:
    if not run.manifest.is_file():
        return RunStatus("new", {}, None)
    manifest = read_manifest(run)
    summary = summarize_run(run, manifest)
    refused = None
    if summary.status == UNREADABLE:
        refused = (
            f"Resume is off: {'; '.join(manifest.problems)}. Repair {run.manifest} first (moving it away "
            "makes every stage run again, training included)."
        )
    return RunStatus(summary.status, summary.stages, refused)


@router.get("/runs/{name}/job", response_class=HTMLResponse)
def job_page(request: Request, name: str) -> HTMLResponse:
    """Start / stop: the run's process (this UI's job, or one running elsewhere), stop and resume buttons,
    and its log (<run>/ui-run.log) following the run."""
    run = _job_run(request, name)
    state = _run_status(run)
    jobs = jobs_of(request)
    return render(
        request,
        "job.html",
        name=name,
        section="job",
        status=state.status,
        stages=state.stages,
        resume_refused=state.resume_refused,
        job=jobs.view(name, run),
        grace=jobs.stop_grace,
        log=str(run.root / LOG_NAME),
    )


@router.get("/api/runs/{name}/log")
def job_log(request: Request, name: str, offset: int = 0) -> dict[str, Any]:
    """New text of <run>/ui-run.log from byte `offset`: {text, offset (to ask from next), reset (start the
    text over), more (ask again at once), job (the process's state, pid, exit code), status, stages,
    resume_refused (why Resume is off, or null)}."""
    run = _job_run(request, name)
    chunk = read_log(_log_path(request, name), max(offset, 0))
    return {**asdict(chunk), "job": jobs_of(request).view(name, run), **asdict(_run_status(run))}


def _log_path(request: Request, name: str) -> Path | None:
    """This UI's job's log, else the run's ui-run.log where it is a file inside the runs folder."""
    job = jobs_of(request).get(name)
    if job is not None:
        return job.log
    try:
        return runs_of(request).file(name, LOG_NAME)
    except OutsideRunsFolder:
        return None


@router.post("/api/runs/{name}/stop", response_model=None)
def stop_run(request: Request, name: str) -> dict[str, Any] | JSONResponse:
    """Stop this UI's job of run `name` (SIGINT to its process group, then SIGTERM and SIGKILL at the
    `Jobs.stop_grace` marks); 409 when this UI runs none."""
    run = _job_run(request, name)
    jobs = jobs_of(request)
    try:
        jobs.stop(name)
    except JobConflict as exc:
        return _conflict(exc)
    return {"job": jobs.view(name, run)}


@router.post("/api/runs/{name}/resume", response_model=None)
def resume_run(request: Request, name: str) -> dict[str, Any] | JSONResponse:
    """Start `llamatailor run` again on run `name`'s run file (<runs>/<name>.yaml, else the run's resolved
    config.yaml): up-to-date stages are skipped and training continues from its newest checkpoint. 409
    while it runs, here or elsewhere, and for a run whose manifest is malformed (`llamatailor run` would
    only stop on it)."""
    run = _job_run(request, name)
    jobs = jobs_of(request)
    job = jobs.get(name)
    run_file = job.run_file if job is not None else _run_file(runs_of(request), name)
    try:
        jobs.refuse_running(name, run)
        refused = _run_status(run).resume_refused
        if refused is not None:
            raise FormConflict(refused)
        if run_file is None:
            raise FormConflict(f"run {name!r} has neither {name}.yaml in the runs folder nor a config.yaml")
        jobs.start(name, run_file, run)
    except (FormConflict, JobConflict) as exc:
        return _conflict(exc)
    return {"job": jobs.view(name, run)}


def _run_file(runs: RunsFolder, name: str) -> Path | None:
    """The run file in the runs folder named after the run (the one the form wrote), else the run's resolved
    config.yaml; None without either."""
    written = runs.root / f"{name}.yaml"
    if written.is_file() and not written.is_symlink():
        return written
    try:
        return runs.file(name, "config.yaml")
    except OutsideRunsFolder:
        return None
