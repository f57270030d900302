"""The CPU quota and memory limit Linux control groups set on this process (cgroup v1 and v2).

`os.cpu_count()` and psutil's available memory describe the host. In a container or a batch job (Docker's
`--cpus`/`--memory`, Kubernetes limits, systemd slices) a process may use far less: llama.cpp given 64
threads on a quota of 4 CPUs spins on throttled threads and runs many times slower, and a plan that counts
the host's RAM fits a model the kernel then kills. Read as the kernel documents them
(Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/): v2 `cpu.max` ("max 100000" or "QUOTA PERIOD"),
`memory.max`, `memory.current`, `memory.stat`; v1 `cpu.cfs_quota_us` (-1: none), `cpu.cfs_period_us`,
`memory.limit_in_bytes`, `memory.usage_in_bytes`, `memory.stat`. A parent's limit binds its children, so
every group from this process's up to its hierarchy's mount is read and the tightest limit wins.
Ground floor: imports nothing from llamatailor.
"""

from dataclasses import dataclass
from pathlib import Path

UNLIMITED_MEMORY = 1 << 60  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit number
CONTROLLERS = ("cpu", "memory")


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: its mount point, the group its mount shows as its root (mountinfo's
    fourth field) and this process's group in it (/proc/self/cgroup's third)."""

    mount: Path
    mount_root: str
    group: str

    def folders(self) -> list[Path]:
        """This process's group folder and each parent up to the mount, innermost first; [] when the group
        lies outside what the mount shows."""
        base = self.mount_root.rstrip("/")
        if not (self.group + "/").startswith(base + "/"):
            return []
        inner = self.group[len(base) :].strip("/")
        parts = inner.split("/") if inner else []
        return [self.mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


@dataclass(frozen=True)
class CgroupLimits:
    """`cpus`: the tightest CPU quota, in CPUs (quota / period; None: none). `memory_left`: bytes this
    process's group may still take under the tightest memory limit, inactive page cache counted as free
    (None: no limit)."""

    cpus: float | None
    memory_left: int | None


def cgroup_limits(root: Path = Path("/")) -> CgroupLimits:
    """This process's cgroup CPU quota and memory headroom; no limits where there are no cgroups (not
    Linux) or they cannot be read. `root` prefixes every path read: tests give a folder of files written in
    the kernel's formats."""
    hierarchies = mounted_hierarchies(root)
    cpus = [cpu_quota(f) for h in hierarchies["cpu"] for f in h.folders()]
    memory = [memory_left(f) for h in hierarchies["memory"] for f in h.folders()]
    return CgroupLimits(
        min((c for c in cpus if c is not None), default=None),
        min((m for m in memory if m is not None), default=None),
    )


def mounted_hierarchies(root: Path) -> dict[str, list[Hierarchy]]:
    """Each of CONTROLLERS -> the mounted hierarchies that hold it (v1: the `cgroup` mounts whose options
    name it; v2: the `cgroup2` mount), with this process's group in each."""
    found: dict[str, list[Hierarchy]] = {controller: [] for controller in CONTROLLERS}
    try:
        groups = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    v1_group: dict[str, str] = {}
    v2_group = None
    for line in groups:
        number, controllers, group = line.split(":", 2)
        if number == "0" and not controllers:
            v2_group = group
        v1_group.update((controller, group) for controller in controllers.split(","))
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        mount_root, mount_point = fields.split()[3:5]
        kind, _source, options = [*tail.split(), "", "", ""][:3]
        mount = root / mount_point.lstrip("/")
        for controller in CONTROLLERS:
            if kind == "cgroup" and controller in options.split(",") and controller in v1_group:
                found[controller].append(Hierarchy(mount, mount_root, v1_group[controller]))
            elif kind == "cgroup2" and v2_group is not None:
                found[controller].append(Hierarchy(mount, mount_root, v2_group))
    return found


def read_words(path: Path) -> list[str]:
    """The file's whitespace-separated words; [] when it is absent or unreadable."""
    try:
        return path.read_text().split()
    except OSError:
        return []


def cpu_quota(folder: Path) -> float | None:
    """CPUs the group's quota allows (v2 cpu.max, else v1 cfs quota / period); None when it sets none."""
    words = read_words(folder / "cpu.max")
    if not words:
        words = read_words(folder / "cpu.cfs_quota_us")[:1] + read_words(folder / "cpu.cfs_period_us")[:1]
    if len(words) < 2 or not words[0].isdigit() or not words[1].isdigit() or int(words[1]) == 0:
        return None  # "max" (v2), -1 (v1), or no such files
    return int(words[0]) / int(words[1])


def memory_left(folder: Path) -> int | None:
    """Bytes the group may still take: its limit less its usage, where inactive page cache (reclaimed before
    the kernel kills anything) is not counted as used; None without a limit."""
    limit = read_words(folder / "memory.max") or read_words(folder / "memory.limit_in_bytes")
    if not limit or not limit[0].isdigit() or int(limit[0]) >= UNLIMITED_MEMORY:
        return None
    usage = read_words(folder / "memory.current") or read_words(folder / "memory.usage_in_bytes")
    stat = read_words(folder / "memory.stat")
    counters = dict(zip(stat[::2], stat[1::2], strict=False))
    cache = counters.get("total_inactive_file") or counters.get("inactive_file") or "0"  # v1 or v2
    used = int(usage[0]) - int(cache) if usage and usage[0].isdigit() and cache.isdigit() else 0
    return max(0, int(limit[0]) - max(0, used))
