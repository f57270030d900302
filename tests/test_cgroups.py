"""The CPUs, threads and memory a process may use: cgroup v1 and v2 limits (files in the kernel's formats, and
a real cgroup where this machine lets the tests make one), the affinity mask, OMP_NUM_THREADS."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from llamatailor.cgroups import CgroupLimits, cgroup_limits
from llamatailor.errors import ConfigError
from llamatailor.hardware import cpu_threads, usable_cpus

GIB = 1 << 30


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_tightest_level_wins(tmp_path):
    """A job's group under a slice: the job's own CPU quota (1.5 CPUs) is tighter than the slice's none,
    the slice's memory limit (8 GiB, 3 GiB used of which 1 GiB inactive page cache) tighter than the job's
    none; the cgroup root's own files (no cpu.max there) change nothing."""
    write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/user.slice/job.scope\n",
            "proc/self/mountinfo": "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
            "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n",
            "sys/fs/cgroup/user.slice/job.scope/cpu.max": "150000 100000\n",
            "sys/fs/cgroup/user.slice/job.scope/memory.max": "max\n",
            "sys/fs/cgroup/user.slice/job.scope/memory.current": f"{GIB}\n",
            "sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
            "sys/fs/cgroup/user.slice/memory.max": f"{8 * GIB}\n",
            "sys/fs/cgroup/user.slice/memory.current": f"{3 * GIB}\n",
            "sys/fs/cgroup/user.slice/memory.stat": f"anon {2 * GIB}\nfile {GIB}\ninactive_file {GIB}\n",
            "sys/fs/cgroup/memory.stat": "anon 0\n",
        },
    )
    assert cgroup_limits(tmp_path) == CgroupLimits(cpus=1.5, memory_left=6 * GIB)


def test_cgroup_v1_mount_rooted_at_the_containers_group(tmp_path):
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names /docker/ID and the mount shows
    that group as its root, so the limits are the mount folder's own files."""
    write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
            "proc/self/mountinfo": "40 31 0:35 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
            "41 31 0:36 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "250000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GIB}\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GIB + GIB // 2}\n",
            "sys/fs/cgroup/memory/memory.stat": f"cache 1\ninactive_file 7\ntotal_inactive_file {GIB // 2}\n",
        },
    )
    assert cgroup_limits(tmp_path) == CgroupLimits(cpus=2.5, memory_left=GIB)


def test_no_limits_written_as_the_kernel_writes_them(tmp_path):
    write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "4:memory:/\n1:cpu:/\n",
            "proc/self/mountinfo": "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
            "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
            "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GIB}\n",
        },
    )
    assert cgroup_limits(tmp_path) == CgroupLimits(cpus=None, memory_left=None)
    assert cgroup_limits(tmp_path / "nowhere") == CgroupLimits(cpus=None, memory_left=None)


@pytest.mark.parametrize(("value", "threads"), [("3", 3), (" 4,2 ", 4), ("1", 1)])
def test_omp_num_threads_sets_llama_cpps_threads(monkeypatch, value, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu_threads() == threads


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_omp_num_threads_is_named(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ConfigError, match=rf"OMP_NUM_THREADS={value!r}: expected a positive whole number"):
        cpu_threads()


def in_subprocess(code: str, env: dict[str, str], preexec=None) -> str:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-c", f"from llamatailor.hardware import *\n{code}"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=preexec,
        check=True,
    )
    return result.stdout.strip()


def test_affinity_mask_bounds_the_cpus_and_threads():
    """A process pinned to one CPU (as taskset or Slurm pin it) uses one, whatever os.cpu_count() says."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    shown = in_subprocess("print(usable_cpus(), cpu_threads())", env, lambda: os.sched_setaffinity(0, {0}))
    assert shown == "1 1"
    assert usable_cpus() == len(os.sched_getaffinity(0))


def make_cgroups(memory: int) -> list[Path]:
    """New child cgroups of the root, holding half a CPU of quota and a `memory` byte limit: one per
    controller on v1, one for both on v2; [] where this machine does not let the tests make them (not root,
    a read-only /sys/fs/cgroup, controllers not delegated)."""
    root, name = Path("/sys/fs/cgroup"), f"llamatailor-test-{uuid.uuid4().hex[:8]}"
    if (root / "cpu" / "cgroup.procs").is_file() and (root / "memory" / "cgroup.procs").is_file():
        plan = [
            (root / "cpu", {"cpu.cfs_quota_us": "50000"}),
            (root / "memory", {"memory.limit_in_bytes": f"{memory}"}),
        ]
    elif (root / "cgroup.controllers").is_file():
        plan = [(root, {"cpu.max": "50000 100000", "memory.max": f"{memory}"})]
    else:
        return []
    made: list[Path] = []
    try:
        for parent, files in plan:
            made.append(parent / name)
            (parent / name).mkdir()
            for file, text in files.items():
                (parent / name / file).write_text(text)
    except OSError:
        for group in made:
            if group.is_dir():
                group.rmdir()
        return []
    return made


def test_a_real_cgroup_quota_and_memory_limit_bound_the_process():
    """The kernel's own files: a child started in a cgroup with half a CPU of quota and a 2 GiB memory
    limit sees 1 usable CPU (rounded down, at least 1), 1 llama.cpp thread and at most 2 GiB."""
    groups = make_cgroups(2 * GIB)
    if not groups:
        pytest.skip("this machine does not let the tests make a cgroup (needs root and a writable cgroup fs)")
    try:
        enter = " ".join(f"echo $$ > {group}/cgroup.procs || exit 77;" for group in groups)
        code = "print(usable_cpus(), cpu_threads(), available_memory())"
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        result = subprocess.run(
            [
                "sh",
                "-c",
                f'{enter} exec "$0" -c "from llamatailor.hardware import *; {code}"',
                sys.executable,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode == 77:
            pytest.skip(f"this machine does not let a process into a new cgroup: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        shown = result.stdout.split()
        assert shown[:2] == ["1", "1"]
        assert 0 < int(shown[2]) <= 2 * GIB
    finally:
        for group in groups:
            group.rmdir()
