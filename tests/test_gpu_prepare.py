"""scripts/gpu_check_prepare.py without the network: wheel slimming, RECORD, requirements and size arithmetic."""

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check_prepare", ROOT / "scripts" / "gpu_check_prepare.py")
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

MIB = 1024 * 1024
LIBRARIES = ("cpu", "cuda118", "cuda130", "rocm64")


def sha256_entry(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, name: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A wheel as setuptools writes one: members, METADATA, WHEEL, and a RECORD listing them all."""
    info = f"{name}-0.0.1.dist-info"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", "Version: 0.0.1"])
    metadata += "".join(f"\nRequires-Dist: {line}" for line in requires) + "\n\nA description.\n"
    files = {
        **files,
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{sha256_entry(data)},{len(data)}\n" for path, data in files.items())
    path = folder / f"{name}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")
    return path


def bnb_like_wheel(folder: Path) -> Path:
    libraries = {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 4000 for lib in LIBRARIES}
    return build_wheel(folder, "bitsandbytes", {"bitsandbytes/__init__.py": b"VALUE = 7\n", **libraries})


def test_slimmed_wheel_keeps_the_cuda_13_and_cpu_libraries_and_a_true_record(tmp_path):
    wheel = bnb_like_wheel(tmp_path)
    dropped = prep.slim_wheel(wheel, prep.bnb_member_kept)
    assert sorted(dropped) == [
        "bitsandbytes/libbitsandbytes_cuda118.so",
        "bitsandbytes/libbitsandbytes_rocm64.so",
    ]
    with zipfile.ZipFile(wheel) as archive:
        record_name = "bitsandbytes-0.0.1.dist-info/RECORD"
        rows = list(csv.reader(io.StringIO(archive.read(record_name).decode())))
        members = {name: archive.read(name) for name in archive.namelist() if name != record_name}
    # RECORD checked here from the bytes, not through the script's own reader.
    assert {row[0]: row[1:] for row in rows} == {
        **{name: [sha256_entry(data), str(len(data))] for name, data in members.items()},
        record_name: ["", ""],
    }
    assert sorted(n for n in members if n.endswith(".so")) == [
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
    ]
    assert prep.record_problems(wheel) == []
    before = wheel.read_bytes()
    assert prep.slim_wheel(wheel, prep.bnb_member_kept) == []  # a second run changes nothing
    assert wheel.read_bytes() == before

    target = tmp_path / "site"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--target",
        str(target),
    ]
    subprocess.run([*command, str(wheel)], check=True, capture_output=True)
    assert (target / "bitsandbytes" / "__init__.py").read_bytes() == b"VALUE = 7\n"
    assert (target / "bitsandbytes" / "libbitsandbytes_cuda130.so").read_bytes() == b"cuda130" * 4000
    assert not (target / "bitsandbytes" / "libbitsandbytes_cuda118.so").exists()


def test_record_problems_names_a_wrong_hash_and_a_missing_member(tmp_path):
    wheel = build_wheel(tmp_path, "demo", {"demo/__init__.py": b"A = 1\n", "demo/b.py": b"B = 2\n"})
    with zipfile.ZipFile(wheel) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    record = "demo-0.0.1.dist-info/RECORD"
    entries[record] = entries[record].replace(
        sha256_entry(b"A = 1\n").encode(), sha256_entry(b"A = 2\n").encode()
    )
    entries[record] += b"demo/gone.py,sha256=x,3\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    assert prep.record_problems(wheel) == [
        "demo/__init__.py: no RECORD line or a wrong hash or size",
        "demo/gone.py: in RECORD, not in the wheel",
    ]


def test_bnb_member_rule():
    kept = [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130")]
    dropped = [
        f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cuda128", "cuda132", "rocm72", "xpu2026")
    ]
    others = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/nn/modules.py",
        "bitsandbytes-0.50.2.dist-info/METADATA",
    ]
    assert [prep.bnb_member_kept(name) for name in kept + dropped + others] == [True] * 2 + [False] * 4 + [
        True
    ] * 3


def test_size_table_sums_in_mib_and_judges_the_goal():
    rows, passed = prep.size_table({"wheels": [MIB, MIB // 2], "project": [3 * MIB]}, goal_mib=60)
    assert rows == [
        ["wheels", "2", "1.50"],
        ["project", "1", "3.00"],
        ["total", "3", "4.50", "PASS (goal 60 MiB)"],
    ]
    assert passed
    assert prep.size_table({"all": [40 * MIB, 20 * MIB]}, goal_mib=60)[1]  # exactly at the goal
    rows, passed = prep.size_table({"all": [60 * MIB, 1]}, goal_mib=60)
    assert not passed
    assert rows[-1] == ["total", "2", "60.00", "FAIL (goal 60 MiB)"]


def test_project_files_are_what_a_device_call_copies(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name, text in {".gitignore": "/.gpu/\n", "tracked.py": "x\n", "gone.py": "y\n"}.items():
        (tmp_path / name).write_text(text)
    git("add", ".gitignore", "tracked.py", "gone.py")
    (tmp_path / "gone.py").unlink()
    (tmp_path / "new.py").write_text("z\n")
    (tmp_path / ".gpu").mkdir()
    (tmp_path / ".gpu" / "big.whl").write_bytes(b"0" * 100)
    assert prep.project_files(tmp_path) == [
        tmp_path / ".gitignore",
        tmp_path / "new.py",
        tmp_path / "tracked.py",
    ]


def test_requirements_against_the_gpu_machine(tmp_path):
    wheels = [
        build_wheel(
            tmp_path,
            "needy",
            {},
            (
                "numpy>=3",  # there: 2.5.2
                "torch>=2.4,<3",  # there: 2.11.0
                "pyarrow>=24.0.0",  # there, at a version nobody read
                "fsspec>=2026.9.0",  # carried below, at 0.0.1
                "nowhere>=1",  # not there, not carried
                "tomli>=1; python_version < '3.11'",  # not for Python 3.12
                "pytest; extra == 'test'",
            ),
        ),
        build_wheel(tmp_path, "fsspec", {}),
    ]
    report = prep.requirement_report(wheels, prep.gpu_version_model(wheels))
    assert report == {
        "violated": ["needy needs numpy>=3, finds 2.5.2", "needy needs fsspec>=2026.9.0, finds 0.0.1"],
        "absent": ["needy needs nowhere>=1"],
        "unverified": ["needy needs pyarrow>=24.0.0"],
    }


def test_carried_packages_are_the_locks_pins_one_version_each():
    wanted, lock = prep.wanted_pins(), prep.locked_pins()
    assert len(wanted) == len(prep.CARRIED) + len(prep.EXTRA_PINS)
    assert {name: wanted[prep.canonical(name)] for name in prep.CARRIED} == {
        name: lock[prep.canonical(name)] for name in prep.CARRIED
    }


def test_blocker_hides_what_the_gpu_machine_lacks(tmp_path):
    """pyyaml allowed, rich not: `import rich` fails and its metadata is gone, while an optional probe (find_spec)
    answers None as it would there; the log names each decision."""
    prep.write_sitecustomize(tmp_path / "site")
    settings = {"allowed": ["pyyaml"], "other_version": [], "log": str(tmp_path / "log.tsv")}
    probe = """import importlib.metadata, importlib.util
import yaml
print(importlib.util.find_spec("rich"), importlib.metadata.version("pyyaml"))
try:
    importlib.metadata.version("rich")
except importlib.metadata.PackageNotFoundError:
    print("no metadata")
import rich
"""
    env = {**os.environ, prep.BLOCK_ENV: json.dumps(settings), "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert result.stdout.split("\n")[:2] == [f"None {importlib.metadata.version('pyyaml')}", "no metadata"]
    assert result.returncode == 1
    assert result.stderr.strip().endswith("ModuleNotFoundError: No module named 'rich'")
    log = [line.split("\t") for line in (tmp_path / "log.tsv").read_text().splitlines()]
    assert log[0][0] == "started"
    assert [entry[:3] for entry in log[1:]] == [
        ["found", "yaml", "pyyaml"],
        ["refused", "rich", "rich"],
        ["refused", "rich", "rich"],
    ]
