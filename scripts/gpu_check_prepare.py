"""Gather what the GPU machine lacks into `.gpu/` for `bench/gpu_check.sh` (issue 16), and prove it is enough.

    make gpu-check-prepare                                   # = .venv/bin/python scripts/gpu_check_prepare.py
    .venv/bin/python scripts/gpu_check_prepare.py --check-imports   # the wheel list is complete (CPU, here)
    .venv/bin/python scripts/gpu_check_prepare.py --check-cache     # .gpu/cache alone builds the tiny Llama 3
    python3 scripts/gpu_check_prepare.py --check-installed          # there: carried wheels' needs are met

The GPU machine (/work/.library/device/KINDS.md) has Python 3.12, CUDA PyTorch and many packages, no network,
and takes at most 64 MiB of files per call. Into `.gpu/` (git-ignored) go:

- `wheels/`: manylinux x86-64 wheels for CPython 3.12 at requirements.lock's pins, for the packages that what
  the check runs imports and the machine lacks or holds at another version (`CARRIED`), bitsandbytes slimmed
  to the native libraries the machine loads (`BNB_KEPT_LIBRARIES`) with its RECORD rewritten;
- `cache/`: a LLAMATAILOR_CACHE root with the files `tests/tiny_models.py` reads for the Llama 3 tokenizer,
  copied out of the local cache (no llama-cpp-python sdist needed there);
- `data/throughput/`: the throughput bench's conversations, from `bench/train_throughput.py --prepare-data`;
- `manifest.json`: every file with its bytes, and the total with the project's own files.

It prints each part's size and exits non-zero when the whole exceeds the 60 MiB goal. A second run downloads
nothing that is there already.
"""

import argparse
import base64
import csv
import hashlib
import importlib.machinery
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"
WHEELS = GPU_DIR / "wheels"
CACHE = GPU_DIR / "cache"
DATA = GPU_DIR / "data" / "throughput"
MANIFEST = GPU_DIR / "manifest.json"
LOCK = ROOT / "requirements.lock"
TESTS = ROOT / "tests"  # tiny_models.py: test support (tiny random Llamas), outside the package
MIB = 1024 * 1024
# The carry limit is 64 MiB for the working tree and the carried paths together; 4 MiB are left for what a
# later commit adds to the project.
GOAL_MIB = 60

# What `python3 -m pip list` names on the GPU machine: /work/.library/device/KINDS.md, "Python packages
# already there" (image 'cuda', read 2026-11-17).
GPU_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# The versions of those that a session read there (same file, its 'pip list' row and its facts); the others
# are there at versions nobody has read.
GPU_VERSIONS = {
    "python": "3.12.3",
    "torch": "2.11.0",
    "triton": "3.6.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "numpy": "2.5.2",
    "sentencepiece": "0.2.2",
    "tiktoken": "0.14.0",
    "onnx": "1.23.1",
}

# The wheels to carry, at requirements.lock's pins. `--check-imports` proves the list complete: everything the
# check runs imports under a blocker that refuses any distribution neither there nor carried.
CARRIED = (
    # Imported by the check (tests/test_gpu.py, `python -m llamatailor train|merge` through llamatailor.pipeline,
    # bench/train_throughput.py, bench/plan_memory.py) and absent there.
    "trl",  # llamatailor.train.sft and .dpo import it at module level; the throughput bench's (b)
    "bitsandbytes",  # QLoRA and the 8-bit and paged optimizers
    "datasets",
    "dill",
    "multiprocess",  # datasets
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",  # llamatailor.config
    "gguf",  # llamatailor.models.base_check, .export
    "datasketch",  # llamatailor.data.dedup
    "phonenumbers",  # llamatailor.data.pii
    "rouge-score",
    "nltk",  # llamatailor.evaluate.metrics
    "defusedxml",  # nltk requires it (its XML corpora; the check never reaches them)
    "tensorboardX",  # llamatailor.train.session
    # There at another version (transformers 5.17.0) or one nobody read (peft): ours are the tested pins.
    "transformers",
    "peft",
    # There at versions nobody read, which carried packages bound: datasets needs fsspec<=2026.9.0 (newer
    # releases come monthly), pydantic typing-extensions>=4.16.0.
    "fsspec",
    "typing-extensions",
)
# Not in requirements.lock: TRL's `use_liger_kernel` for the throughput bench's (b+liger) row, GPU only
# (Triton kernels; nothing here can import it). 0.8.5 is the newest release (2026-10), above TRL 1.16.0's
# minimum 0.8.2, and asks only torch>=2.1.2 and triton>=2.3.1 (there: 2.11.0 and 3.6.0).
EXTRA_PINS = {"liger-kernel": "0.8.5"}
# The GPU machine's torch is 2.11.0+cu130, so bitsandbytes loads libbitsandbytes_cuda130.so; the CPU library
# serves the dry run and CPU fallbacks. The other CUDA, ROCm and XPU builds (about 39 MB of the 43 MB wheel)
# would never load there.
BNB_KEPT_LIBRARIES = ("cpu", "cuda130")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp"] + [
    f"--platform={tag}"
    for tag in (
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_24_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    )
]
# The environment markers of the GPU machine's Python, for the carried wheels' Requires-Dist.
GPU_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "extra": "",
}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(lock: Path = LOCK) -> dict[str, str]:
    """requirements.lock as {canonical name: version}; every line there is `name==version`."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def wanted_pins() -> dict[str, str]:
    """{canonical name: version} of every wheel to carry: `CARRIED` at the lock's pins, and `EXTRA_PINS`."""
    lock = locked_pins()
    missing = [name for name in CARRIED if canonical(name) not in lock]
    if missing:
        raise SystemExit(f"not pinned in requirements.lock: {', '.join(missing)}")
    return {canonical(name): lock[canonical(name)] for name in CARRIED} | EXTRA_PINS


def wheel_identity(path: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


# --- Wheels -------------------------------------------------------------------------------------------------


def gather_wheels(pins: dict[str, str], folder: Path = WHEELS) -> list[Path]:
    """Download each pin's wheel into `folder` unless it is there; drop other versions and other names."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.suffix != ".whl":  # a slimming cut short
            path.unlink()
    present = {wheel_identity(path): path for path in folder.glob("*.whl")}
    for identity, path in present.items():
        if pins.get(identity[0]) != identity[1]:
            path.unlink()
    for name, version in pins.items():
        if (name, version) not in present:
            fetch_wheel(name, version, folder)
    wheels = sorted(path for path in folder.glob("*.whl") if wheel_identity(path) in pins.items())
    absent = sorted(set(pins.items()) - {wheel_identity(path) for path in wheels})
    if absent:
        raise SystemExit(f"no wheel came for {absent}")
    return wheels


def fetch_wheel(name: str, version: str, folder: Path) -> None:
    """`pip download` the manylinux CPython 3.12 wheel; a pure-Python package published only as an sdist
    (rouge-score) is built into a wheel here, which must then be tagged py3-none-any."""
    pip = [sys.executable, "-m", "pip"]
    common = ["--no-deps", "--disable-pip-version-check", "-q", "-d", str(folder), f"{name}=={version}"]
    result = subprocess.run(
        [*pip, "download", "--only-binary=:all:", *PLATFORM, *common], capture_output=True, text=True
    )
    if result.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        built = subprocess.run(
            [*pip, "wheel", "--no-deps", "--no-binary=:all:", "-q", "-w", tmp, f"{name}=={version}"],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*-py3-none-any.whl"))
        if built.returncode != 0 or len(wheels) != 1:
            raise SystemExit(
                f"{name}=={version}: no wheel for the GPU machine\n{result.stderr}{built.stderr}"
            )
        shutil.move(wheels[0], folder / wheels[0].name)


def record_hash(data: bytes) -> str:
    """A RECORD hash entry: sha256, urlsafe base64 without padding (the wheel spec, PEP 376/427)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode('ascii')}"


def record_name(archive: zipfile.ZipFile) -> str:
    """The path of the wheel's RECORD; ValueError unless there is exactly one."""
    names = [name for name in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", name)]
    if len(names) != 1:
        raise ValueError(f"{archive.filename}: {len(names)} RECORD files")
    return names[0]


def slim_wheel(path: Path, keep: Callable[[str], bool]) -> list[str]:
    """Rewrite the wheel at `path` without the members `keep` refuses, and its RECORD with the hash and size of
    every member left. Returns the names dropped ([] leaves the file untouched). Members keep their date,
    permissions and compression."""
    with zipfile.ZipFile(path) as source:
        record = record_name(source)
        dropped = [name for name in source.namelist() if name != record and not keep(name)]
        if not dropped:
            return []
        tmp = path.with_suffix(".whl.tmp")
        lines = []
        with zipfile.ZipFile(tmp, "w") as target:
            for info in source.infolist():
                if info.filename == record or info.filename in dropped:
                    continue
                data = source.read(info)
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.external_attr, copy.compress_type = info.external_attr, info.compress_type
                target.writestr(copy, data)
                if not info.is_dir():
                    lines.append([info.filename, record_hash(data), str(len(data))])
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows([*lines, [record, "", ""]])
            copy = zipfile.ZipInfo(record, source.getinfo(record).date_time)
            copy.external_attr, copy.compress_type = (
                source.getinfo(record).external_attr,
                zipfile.ZIP_DEFLATED,
            )
            target.writestr(copy, text.getvalue())
    tmp.replace(path)
    return dropped


def record_problems(path: Path) -> list[str]:
    """What disagrees between a wheel's members and its RECORD: a member without a line, a wrong hash or size,
    a line without a member. [] when RECORD is right."""
    problems = []
    with zipfile.ZipFile(path) as archive:
        record = record_name(archive)
        rows = {
            row[0]: row[1:] for row in csv.reader(io.StringIO(archive.read(record).decode("utf-8"))) if row
        }
        for info in archive.infolist():
            if info.is_dir() or info.filename == record:
                continue
            data = archive.read(info)
            if rows.pop(info.filename, None) != [record_hash(data), str(len(data))]:
                problems.append(f"{info.filename}: no RECORD line or a wrong hash or size")
        problems += [f"{name}: in RECORD, not in the wheel" for name in rows if name != record]
    return problems


def bnb_member_kept(name: str) -> bool:
    """Whether a bitsandbytes wheel member stays: everything but the native libraries not in
    `BNB_KEPT_LIBRARIES`."""
    library = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", name)
    return library is None or library.group(1) in BNB_KEPT_LIBRARIES


def slim_bitsandbytes(wheels: list[Path]) -> None:
    """Slim the bitsandbytes wheel among `wheels` (once: a slimmed wheel has nothing left to drop)."""
    for path in wheels:
        if wheel_identity(path)[0] == "bitsandbytes":
            slim_wheel(path, bnb_member_kept)
            problems = record_problems(path)
            if problems:
                raise SystemExit(f"{path.name}: RECORD is wrong after slimming: {problems[:3]}")
            with zipfile.ZipFile(path) as archive:
                kept = {name for name in archive.namelist() if name.endswith(".so")}
            if kept != {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in BNB_KEPT_LIBRARIES}:
                raise SystemExit(f"{path.name}: expected the libraries {BNB_KEPT_LIBRARIES}, found {kept}")


# --- Cache and data -----------------------------------------------------------------------------------------


def copy_cache(target: Path = CACHE) -> list[Path]:
    """Copy the Llama 3 vocabulary and chat template from the local llamatailor cache into `target`, at the
    same place under it; `llama_cpp_model_file` extracts them from the llama-cpp-python sdist when the local
    cache lacks them. Anything else under `target` goes: a run with LLAMATAILOR_CACHE=.gpu/cache (the dry
    run) leaves a 17 MB tokenizer folder there, keyed by this machine's path, which the GPU machine rebuilds."""
    sys.path[:0] = [str(ROOT / "src"), str(TESTS)]
    from llamatailor.cache import cache_dir
    from tiny_models import LLAMA3_TEMPLATE_FILE, VOCAB_FILES, llama_cpp_model_file

    copied = []
    # What `real_tokenizer("llama3")` reads: the vocabulary and the chat template.
    for relative in (VOCAB_FILES["llama3"], LLAMA3_TEMPLATE_FILE):
        source = llama_cpp_model_file(relative)
        destination = target / source.relative_to(cache_dir())
        if not destination.is_file() or destination.stat().st_size != source.stat().st_size:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
        copied.append(destination)
    for path in sorted(target.rglob("*"), reverse=True):  # files before their folders
        if path.is_file() and path not in copied:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return copied


def prepare_data(folder: Path = DATA) -> str:
    """Run `bench/train_throughput.py --prepare-data folder` unless the folder was made by the same bench
    source; returns that source's sha256."""
    bench = ROOT / "bench" / "train_throughput.py"
    source = hashlib.sha256(bench.read_bytes()).hexdigest()
    stamp = folder / ".source-sha256"
    if stamp.is_file() and stamp.read_text(encoding="ascii") == source:
        return source
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(bench), "--prepare-data", str(folder)], cwd=ROOT, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"bench/train_throughput.py --prepare-data {folder} failed ({result.returncode})")
    stamp.write_text(source, encoding="ascii")
    return source


# --- Size ---------------------------------------------------------------------------------------------------


def project_files(root: Path = ROOT) -> list[Path]:
    """What a device call copies of the project: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [
        root / name for name in sorted(set(listed.decode().split("\0"))) if name and (root / name).is_file()
    ]


def size_table(parts: dict[str, list[int]], goal_mib: float = GOAL_MIB) -> tuple[list[list[str]], bool]:
    """Rows (part, files, MiB) for each part's file sizes in bytes, then the total, and whether the total
    is within `goal_mib` MiB (1 MiB = 2**20 bytes)."""
    rows = [[name, str(len(sizes)), f"{sum(sizes) / MIB:.2f}"] for name, sizes in parts.items()]
    total = sum(sum(sizes) for sizes in parts.values())
    passed = total <= goal_mib * MIB
    verdict = f"{'PASS' if passed else 'FAIL'} (goal {goal_mib} MiB)"
    rows.append(["total", str(sum(len(sizes) for sizes in parts.values())), f"{total / MIB:.2f}", verdict])
    return rows, passed


def write_manifest(data_source: str) -> tuple[list[list[str]], bool]:
    """Write `.gpu/manifest.json` (every file's bytes, the project's, the total) and return the size table."""
    folders = {"wheels": WHEELS, "cache": CACHE, "data": DATA}
    files = {
        name: {
            str(p.relative_to(GPU_DIR)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
        }
        for name, folder in folders.items()
    }
    project = [path.stat().st_size for path in project_files()]
    parts = {f".gpu/{name}": list(entries.values()) for name, entries in files.items()}
    rows, passed = size_table({**parts, "project (git files)": project})
    manifest = {
        "goal_mib": GOAL_MIB,
        "files": files,
        "project_bytes": sum(project),
        "total_bytes": sum(project) + sum(sum(sizes) for sizes in parts.values()),
        "data_source_sha256": data_source,
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return rows, passed


def print_table(rows: list[list[str]]) -> None:
    """Print `size_table`'s rows under a header, columns aligned."""
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(3)]
    print(f"{'part':<{widths[0]}}  {'files':>{widths[1]}}  {'MiB':>{widths[2]}}")
    for row in rows:
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {' '.join(row[3:])}".rstrip()
        )


# --- Requirements -------------------------------------------------------------------------------------------


def requirement_report(wheels: list[Path], version_of: Callable[[str], str | None]) -> dict[str, list[str]]:
    """Each carried wheel's Requires-Dist (no extras; markers of the GPU machine's Python) against
    `version_of(canonical name)`: a version, "" when the package is there at an unknown version, None when it
    is absent. Returns {"violated": [...], "absent": [...], "unverified": [...]}, one line per requirement."""
    from packaging.requirements import Requirement

    report: dict[str, list[str]] = {"violated": [], "absent": [], "unverified": []}
    for path in wheels:
        for line in wheel_requirements(path):
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(GPU_MARKERS):
                continue
            version = version_of(canonical(requirement.name))
            where = f"{wheel_identity(path)[0]} needs {requirement}"
            if version is None:
                report["absent"].append(where)
            elif version == "":
                if requirement.specifier:
                    report["unverified"].append(where)
            elif not requirement.specifier.contains(version, prereleases=True):
                report["violated"].append(f"{where}, finds {version}")
    return report


def wheel_requirements(path: Path) -> list[str]:
    """The Requires-Dist values in a wheel's METADATA headers."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode("utf-8").split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def gpu_version_model(wheels: list[Path]) -> Callable[[str], str | None]:
    """The GPU machine with the wheels installed over it, as far as anyone has read it."""
    carried = dict(wheel_identity(path) for path in wheels)

    def version_of(name: str) -> str | None:
        if name in carried:
            return carried[name]
        if name in GPU_VERSIONS:
            return GPU_VERSIONS[name]
        return "" if name in GPU_PACKAGES else None

    return version_of


def installed_version(name: str) -> str | None:
    """The version of `name` this Python finds, None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def print_requirements(report: dict[str, list[str]], show_unverified: bool) -> bool:
    """Print the report (the unverified lines only when asked); True when nothing is violated or absent."""
    for kind in ("violated", "absent", "unverified")[: 3 if show_unverified else 2]:
        for line in report[kind]:
            print(f"  {kind}: {line}")
    counts = ", ".join(f"{len(lines)} {kind}" for kind, lines in report.items())
    hint = "" if show_unverified else " (unverified: there at versions nobody read; --check-installed there)"
    print(f"requirements of the carried wheels: {counts}{hint}")
    return not report["violated"] and not report["absent"]


# --- The import proof ---------------------------------------------------------------------------------------

BLOCK_ENV = "LLAMATAILOR_GPU_BLOCK"
SITECUSTOMIZE = """import sys
sys.path.insert(0, {scripts!r})
import gpu_check_prepare
del sys.path[0]
gpu_check_prepare.install_blocker()
"""


class Blocker:
    """In place of `importlib.machinery.PathFinder` on `sys.meta_path`: finds nothing for a top-level module
    whose distribution is not allowed, and hides such distributions from `importlib.metadata`, as if absent
    (optional imports then take their fallback). A module imported by a distribution there at another version
    (huggingface_hub: 2.4.0 here, 1.33.0 there) is let through, with what it imports in turn: what our version
    imports says nothing of what theirs needs. Each decision goes to the log as `kind TAB module TAB
    distribution TAB importer`."""

    def __init__(self, allowed: set[str], other_version: set[str], log: str) -> None:
        self.owners = importlib.metadata.packages_distributions()
        self.allowed, self.other_version, self.log = allowed, other_version, log
        self.write("started", str(os.getpid()), "", " ".join(sys.argv)[:200])

    def write(self, *fields: str) -> None:
        with open(self.log, "a", encoding="utf-8") as log:  # noqa: PTH123 (pathlib here slows every import)
            log.write("\t".join(fields) + "\n")

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if path is None:  # a top-level name; submodules follow their package
            owners = [canonical(owner) for owner in self.owners.get(name, [])]
            if owners and name not in sys.stdlib_module_names and not self.allowed.intersection(owners):
                by = importer()
                if by in self.other_version:
                    self.other_version.add(name)
                    self.allowed.update(owners)
                    self.write("other-version", name, owners[0], by)
                else:
                    self.write("refused", name, owners[0], by)
                    return None
            elif owners and name not in sys.stdlib_module_names:
                self.write("found", name, owners[0], importer())
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if canonical(dist.metadata["Name"] or "") in self.allowed:
                yield dist

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()


def importer() -> str:
    """The top-level module whose code runs the import being decided."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib", __name__)):
            return name.partition(".")[0]
        frame = frame.f_back
    return "?"


def install_blocker() -> None:
    """Put a `Blocker` in place of PathFinder when `$LLAMATAILOR_GPU_BLOCK` holds its settings (JSON)."""
    settings = json.loads(os.environ[BLOCK_ENV])
    blocker = Blocker(set(settings["allowed"]), set(settings["other_version"]), settings["log"])
    sys.meta_path[:] = [blocker if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def write_sitecustomize(folder: Path) -> None:
    """A `sitecustomize` module in `folder` that installs the blocker in every Python started with `folder` on
    PYTHONPATH and `$LLAMATAILOR_GPU_BLOCK` set (the check's subprocesses included)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = SITECUSTOMIZE.format(scripts=str(ROOT / "scripts"))
    (folder / "sitecustomize.py").write_text(text, encoding="utf-8")


def blocker_settings(wheels: list[Path], log: Path) -> dict[str, Any]:
    """Allowed: the GPU machine's distributions, the carried ones and llamatailor. Other versions: the
    top-level modules of distributions there at a version other than ours that are not carried."""
    carried = {wheel_identity(path)[0] for path in wheels}
    lock = locked_pins()
    other = {n for n, v in GPU_VERSIONS.items() if n in lock and lock[n] != v and n not in carried}
    modules = {
        m
        for m, owners in importlib.metadata.packages_distributions().items()
        if canonical(owners[0]) in other
    }
    allowed = sorted(GPU_PACKAGES | carried | {"llamatailor"})
    return {"allowed": allowed, "other_version": sorted(modules), "log": str(log)}


# Imported at module level by what the check runs, and what CUDA alone reaches (QLoRA, 8-bit optimizers),
# which the CPU runs below do not.
PROOF_MODULES = (
    "llamatailor.cli",
    "llamatailor.pipeline",
    "llamatailor.train.model_setup",
    "llamatailor.train.answer_loss",
    "llamatailor.plan.memory",
    "llamatailor.plan.run_setup",
    "llamatailor.plan.architectures",
    "tiny_models",
    "trl",
    "trl.trainer.utils",
    "peft",
    "peft.tuners.lora.bnb",
    "datasets",
    "bitsandbytes",
    "bitsandbytes.nn",
    "bitsandbytes.optim",
    "transformers.integrations.bitsandbytes",
    "transformers.quantizers.quantizer_bnb_4bit",
    "transformers.quantizers.quantizer_bnb_8bit",
)
PROOF_BUILD = """import sys
from pathlib import Path
from tiny_models import build_tiny_model
print(len(__import__("transformers").AutoTokenizer.from_pretrained(build_tiny_model("llama3", Path(sys.argv[1])))))
"""


def proof_runs(work: Path) -> list[tuple[str, list[str]]]:
    """(label, command) for each run of the proof: the imports, the CLI's prepare/train/merge on a tiny Llama 3
    (LoRA, CPU), and, when they exist, the gpu tests (skipped on CPU, so collection and fixtures) and
    `bench/gpu_check.sh --dry-run` (both benches on the tiny model)."""
    python = sys.executable
    rows = [
        {"instruction": "Give the next number.", "input": f"n = {n}", "output": str(n + 1)} for n in range(40)
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    run = {
        "name": "proof",
        "output_dir": str(work / "runs"),
        "model": {"base": str(work / "model")},
        "data": {
            "train": [str(work / "train.jsonl")],
            "val_ratio": 0.2,
            "test_ratio": 0.2,
            "max_seq_len": 128,
        },
        "train": {"max_steps": 2, "batch_size": 4, "save_steps": 2, "lora": {"r": 4, "alpha": 8}},
        "export": {"gguf": []},
    }
    (work / "run.yaml").write_text(json.dumps(run), encoding="utf-8")  # JSON is YAML
    runs = [
        ("imports", [python, "-c", "\n".join(f"import {m}" for m in PROOF_MODULES)]),
        ("tiny Llama 3 from .gpu/cache", [python, "-c", PROOF_BUILD, str(work / "model")]),
    ]
    runs += [
        (f"llamatailor {s}", [python, "-m", "llamatailor", s, str(work / "run.yaml")])
        for s in ("prepare", "train", "merge")
    ]
    if (ROOT / "tests" / "test_gpu.py").is_file():
        runs.append(
            (
                "pytest -m gpu (CPU: skipped)",
                [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"],
            )
        )
    if (ROOT / "bench" / "gpu_check.sh").is_file():
        runs.append(
            ("gpu_check.sh --dry-run", ["bash", "bench/gpu_check.sh", "--dry-run", str(work / "dry-run")])
        )
    return runs


def check_imports() -> int:
    """Run `proof_runs` under the `Blocker` (GPU machine's packages + `.gpu/wheels`), with a copy of
    `.gpu/cache` as LLAMATAILOR_CACHE and no package index, and print what each run needed."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels or not CACHE.is_dir():
        print("run `make gpu-check-prepare` first: .gpu/wheels or .gpu/cache is missing")
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
        work = Path(tmp)
        write_sitecustomize(work / "site")
        shutil.copytree(CACHE, work / "cache")
        env = proof_env(work, blocker_settings(wheels, work / "log.tsv"))
        failed = 0
        for label, command in proof_runs(work):
            start = time.monotonic()
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            seconds = time.monotonic() - start
            print(f"{'ok' if result.returncode == 0 else 'FAILED':6}  {seconds:5.0f} s  {label}")
            if result.returncode != 0:
                failed += 1
                print(
                    "        " + (result.stdout + result.stderr).strip()[-3000:].replace("\n", "\n        ")
                )
        print_decisions(work / "log.tsv", wheels)
    return 1 if failed else 0


def proof_env(work: Path, settings: dict[str, Any]) -> dict[str, str]:
    """The proof's environment: the blocker on, the cache copy, no index, no hub, one thread."""
    env = dict(os.environ)
    env.update(
        {
            BLOCK_ENV: json.dumps(settings),
            "PYTHONPATH": os.pathsep.join(
                [str(work / "site"), str(ROOT / "src"), str(TESTS), env.get("PYTHONPATH", "")]
            ),
            "LLAMATAILOR_CACHE": str(work / "cache"),
            "PIP_NO_INDEX": "1",  # a download (the sdist) would fail instead of passing unseen
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def print_decisions(log: Path, wheels: list[Path]) -> None:
    """Summarise the blocker's log: processes, refusals (each an optional import: the runs went on), modules
    let through for a package there at another version, and carried wheels that nothing imported."""
    entries = (
        [line.split("\t") for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    )
    processes = sum(entry[0] == "started" for entry in entries)
    print(f"blocker: {processes} processes")
    titles = (("refused", "refused (a run that needed one failed above)"), ("other-version", "let through"))
    for kind, title in titles:
        seen = sorted({f"{e[1]} ({e[2]}, by {e[3]})" for e in entries if e[0] == kind})
        print(f"{title}: {', '.join(seen) or 'none'}")
    found = {canonical(e[2]) for e in entries if e[0] in ("found", "other-version")}
    unused = sorted(name for name, _ in map(wheel_identity, wheels) if name not in found)
    print(f"carried, imported by no run here: {', '.join(unused) or 'none'}")


def check_cache() -> int:
    """Build the tiny Llama 3 model from a copy of `.gpu/cache` alone (no sdist, no index, no hub)."""
    with tempfile.TemporaryDirectory(prefix="gpu-cache-") as tmp:
        shutil.copytree(CACHE, Path(tmp) / "cache")
        env = dict(
            os.environ, LLAMATAILOR_CACHE=str(Path(tmp) / "cache"), PIP_NO_INDEX="1", HF_HUB_OFFLINE="1"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(TESTS), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-c", PROOF_BUILD, str(Path(tmp) / "model")]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        sdist = (Path(tmp) / "cache" / "sdist").exists()
        print(
            f"tiny Llama 3 from a copy of .gpu/cache: {result.stdout.strip() or 'FAILED'} tokens; sdist fetched: {sdist}"
        )
        if result.returncode != 0:
            print(result.stderr[-1500:])
        return 0 if result.returncode == 0 and not sdist else 1


# --- Main ---------------------------------------------------------------------------------------------------


def prepare() -> int:
    """Gather wheels, cache and data into `.gpu/`, write the manifest and print the size table."""
    wheels = gather_wheels(wanted_pins())
    slim_bitsandbytes(wheels)
    copy_cache()
    source = prepare_data()
    report = requirement_report(wheels, gpu_version_model(wheels))
    requirements_ok = print_requirements(report, show_unverified=False)
    rows, passed = write_manifest(source)
    print_table(rows)
    return 0 if passed and requirements_ok else 1


def main(argv: list[str] | None = None) -> int:
    """Prepare `.gpu/` (no option) or run one check; the exit status is 0 when it passed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--check-imports", action="store_true", help="prove the wheel list (CPU, blocker)")
    modes.add_argument("--check-cache", action="store_true", help="prove .gpu/cache builds the tiny Llama 3")
    modes.add_argument(
        "--check-installed",
        action="store_true",
        help="check the carried wheels' requirements against this Python's packages (run there, after install)",
    )
    args = parser.parse_args(argv)
    if args.check_imports:
        return check_imports()
    if args.check_cache:
        return check_cache()
    if args.check_installed:
        return (
            0
            if print_requirements(requirement_report(sorted(WHEELS.glob("*.whl")), installed_version), True)
            else 1
        )
    return prepare()


if __name__ == "__main__":
    sys.exit(main())
