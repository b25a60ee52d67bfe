"""How many CPU threads this worker's backends may use.

llama.cpp's threads spin while they wait for each other, and torch's intra-op threads do much the same. A
context that starts one thread per core is fastest while it has the host to itself, but two workers on one
host that both do so oversubscribe the cores, and a preempted spinning thread stalls all its partners at
the next barrier: two concurrent 16-token chats on two workers of a 2-core host took 6.7 s each, against
0.12-0.23 s on one worker. So the workers of a host find each other (``HostRegistry``) and each takes a
disjoint share of the cores this process may use (``available_cores``): ``thread_share``.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import secrets
import tempfile
from pathlib import Path

__all__ = ["RUNTIME_DIR_ENV", "HostRegistry", "available_cores", "cgroup_quota", "default_registry_dir",
           "thread_share"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
RUNTIME_DIR_ENV = "VELESIO_RUNTIME_DIR"  # the registry's folder itself, when set
FOLDER_NAME = "velesio-workers"
_SUFFIX = ".lock"


def thread_share(cores: int, workers: int) -> int:
    """The threads one worker's backends may use: its disjoint share of the cores, at least 1.

    Disjoint because llama.cpp's spinning threads make oversubscription catastrophic rather than merely
    slower. Models inside one worker share that worker's share rather than splitting it further: a worker
    usually serves one text and one image model, which rarely both run hot at once."""
    return max(1, cores // max(1, workers))


def _cgroup_paths(self_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in the v1 hierarchy holding the cpu controller."""
    v2 = v1 = None
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return "/", "/"  # no /proc: look at the root folders only
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _walk_up(mount: Path, cgroup: str) -> list[Path]:
    """The folder of ``cgroup`` under ``mount`` and each of its ancestors up to ``mount`` itself: a quota
    anywhere on the way limits this process. Inside a container the mount's root is often the container's
    own cgroup while /proc still names the host's path; folders that do not exist are skipped."""
    parts = [p for p in cgroup.split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _ratio(quota_file: Path, period_file: Path | None = None) -> float | None:
    """quota ÷ period from cgroup v2's ``cpu.max`` ("quota period") or v1's two files; None for no quota
    ("max", -1), a missing file or one that does not parse."""
    try:
        fields = quota_file.read_text().split()
        if period_file is not None:
            fields = fields[:1] + period_file.read_text().split()[:1]
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):  # "max" is the ValueError
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The cores' worth of CPU time this process's cgroup quota grants (1.5 for "150000 100000"), the
    smallest along its cgroup's ancestry; None without a quota. Reads cgroup v2 ``cpu.max`` ("quota period"
    or "max period") and v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none)."""
    v2, v1 = _cgroup_paths(self_cgroup)
    limits: list[float | None] = []
    if v2 is not None:
        limits += [_ratio(folder / "cpu.max") for folder in _walk_up(root, v2)]
    if v1 is not None:
        for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            limits += [_ratio(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")
                       for folder in _walk_up(mount, v1)]
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def available_cores(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The cores this process may actually use: its CPU affinity (``taskset``, ``--cpuset-cpus``), capped
    by a cgroup CPU quota (``--cpus``, systemd's ``CPUQuota=``) rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota(root, self_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def default_registry_dir() -> Path:
    """``$VELESIO_RUNTIME_DIR`` itself when set, else ``velesio-workers`` under ``$XDG_RUNTIME_DIR`` or the
    temporary folder. Workers register in the same folder only if they see the same one: a worker in a
    container, or under systemd's ``PrivateTmp=``, needs it mounted or named explicitly."""
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / FOLDER_NAME


class HostRegistry:
    """The workers of one host, as a folder of lock files: each worker process holds an exclusive
    ``flock`` on a file of its own, and the kernel drops the lock when the process ends however it ends, so
    a crashed worker stops counting at once; its file is removed by the next ``peers()`` that finds it
    unlocked. ``peers()`` costs one directory listing and an open and a lock attempt per worker.

    The lock belongs to the open file, so a child forked by the worker (not exec'd) holds it as well until
    it ends too; the descriptor is closed on exec."""

    def __init__(self, folder: Path | str | None = None):
        self.folder = Path(folder) if folder is not None else default_registry_dir()
        self.path: Path | None = None  # this worker's lock file while joined
        self._fd: int | None = None

    @property
    def joined(self) -> bool:
        return self._fd is not None

    def _ensure_folder(self) -> None:
        try:
            os.mkdir(self.folder, 0o700)
        except FileExistsError:
            pass
        else:
            # Like /tmp itself: every user's workers may register (they compete for the same cores), and
            # the sticky bit lets only a file's owner remove it. Set after mkdir, which the umask narrows.
            os.chmod(self.folder, 0o1777)
        if not self.folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(self.folder))

    def join(self) -> None:
        """Register this process. Raises OSError when the folder cannot be created or written."""
        if self.joined:
            return
        self._ensure_folder()
        name = f"worker-{os.getpid()}-{secrets.token_hex(4)}"
        # Created under a name peers() ignores, locked, then renamed: nobody ever sees it unlocked.
        pending = self.folder / f".{name}"
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o644)  # readable by other users' workers, which open it to test the lock; not umask's
            os.write(fd, f"{os.getpid()}\n".encode())
            final = self.folder / f"{name}{_SUFFIX}"
            os.rename(pending, final)
        except BaseException:
            os.close(fd)
            pending.unlink(missing_ok=True)
            raise
        self._fd, self.path = fd, final

    def peers(self) -> int:
        """The workers registered on this host now, this one included (even when it could not join);
        removes the files of workers that are gone."""
        live = 0
        try:
            names = os.listdir(self.folder)
        except OSError:
            names = []
        for name in names:
            if not name.endswith(_SUFFIX) or name.startswith("."):
                continue
            path = self.folder / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:  # removed meanwhile (its worker left), or not ours to read
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1  # a live worker (this one too: its lock is on another open file) holds it
                continue
            except OSError:
                continue
            finally:
                os.close(fd)  # also drops the shared lock taken on a stale file
            try:
                path.unlink()
            except OSError:  # another user's file in a sticky folder, or already removed by another peer
                pass
        return live if self.joined else live + 1

    def leave(self) -> None:
        """Unregister: the file goes first, then the lock, so no one finds it unlocked and alive."""
        if self._fd is None:
            return
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd, self.path = None, None

    def __enter__(self) -> HostRegistry:
        self.join()
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()
