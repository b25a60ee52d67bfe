"""worker/cpu.py: the cores a worker may use, the workers of a host, and each worker's share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from velesio.worker.cpu import HostRegistry, available_cores, cgroup_quota, default_registry_dir, thread_share


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- the share ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, workers, share", [
    (8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 2, 1), (2, 1, 2), (2, 3, 1), (1, 4, 1), (16, 5, 3), (4, 0, 4)])
def test_thread_share(cores: int, workers: int, share: int) -> None:
    assert thread_share(cores, workers) == share


def test_shares_never_oversubscribe() -> None:
    for cores in range(1, 33):
        for workers in range(1, cores + 1):
            assert thread_share(cores, workers) * workers <= cores


# ---- the cgroup quota --------------------------------------------------------------------------
def cgroup(tmp_path: Path, self_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup tree under tmp_path and a /proc/self/cgroup naming this process's place in it."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(self_line)
    return root, proc


def test_v2_quota(tmp_path: Path) -> None:
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_quota(root, proc) == 1.5
    assert available_cores(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_v2_no_quota(tmp_path: Path) -> None:
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_quota(root, proc) is None
    assert available_cores(root, proc) == len(os.sched_getaffinity(0))


def test_v2_quota_of_an_ancestor(tmp_path: Path) -> None:
    # systemd: the service's own cgroup has no limit, the slice above it has half a core.
    root, proc = cgroup(tmp_path, "0::/system.slice/velesio-worker@0.service\n", {
        "system.slice/cpu.max": "50000 100000\n",
        "system.slice/velesio-worker@0.service/cpu.max": "max 100000\n"})
    assert cgroup_quota(root, proc) == 0.5
    assert available_cores(root, proc) == 1  # rounded up, never 0


def test_v2_smallest_quota_wins(tmp_path: Path) -> None:
    root, proc = cgroup(tmp_path, "0::/a/b\n", {"a/cpu.max": "400000 100000", "a/b/cpu.max": "100000 50000"})
    assert cgroup_quota(root, proc) == 2.0


def test_quota_in_a_container_whose_root_is_its_cgroup(tmp_path: Path) -> None:
    # Without a cgroup namespace /proc names the host's path, which does not exist under the container's mount.
    root, proc = cgroup(tmp_path, "0::/docker/0123abcd\n", {"cpu.max": "300000 100000"})
    assert cgroup_quota(root, proc) == 3.0


def test_v1_quota(tmp_path: Path) -> None:
    root, proc = cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/worker\n0::/\n", {
        "cpu,cpuacct/worker/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/worker/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(root, proc) == 2.5
    assert available_cores(root, proc) == min(3, len(os.sched_getaffinity(0)))


def test_v1_no_quota(tmp_path: Path) -> None:
    root, proc = cgroup(tmp_path, "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(root, proc) is None


def test_unreadable_or_odd_files_mean_no_quota(tmp_path: Path) -> None:
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "garbage\n"})
    assert cgroup_quota(root, proc) is None
    assert cgroup_quota(tmp_path / "nowhere", tmp_path / "no-proc-file") is None
    assert available_cores(tmp_path / "nowhere", tmp_path / "no-proc-file") == len(os.sched_getaffinity(0))


def test_available_cores_on_this_host() -> None:
    cores = available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


# ---- the registry ------------------------------------------------------------------------------
CHILD = """
import sys
from velesio.worker.cpu import HostRegistry
r = HostRegistry(sys.argv[1])
r.join()
print(r.path, flush=True)
sys.stdin.read()
"""


def test_registry_counts_live_workers_and_forgets_a_killed_one(tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    me = HostRegistry(folder)
    assert me.peers() == 1  # not joined yet, the folder not even created: only this worker
    me.join()
    assert me.peers() == 1
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        child_file = Path(child.stdout.readline().strip())
        assert child_file.parent == folder and child_file.exists()
        assert me.peers() == 2
        assert me.peers() == 2  # counting takes nothing from anyone
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        # The kernel dropped the dead worker's lock with the process; its file is removed on the way.
        assert wait_until(lambda: me.peers() == 1)
        assert not child_file.exists()
        assert me.path is not None and me.path.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    me.leave()
    assert not me.joined and me.peers() == 1
    assert [p for p in folder.iterdir() if p.name.endswith(".lock")] == []


def test_registry_leave_and_rejoin(tmp_path: Path) -> None:
    a, b = HostRegistry(tmp_path / "w"), HostRegistry(tmp_path / "w")
    with a:
        assert a.peers() == 1
        with b:
            assert a.peers() == b.peers() == 2
        assert a.peers() == 1 and b.peers() == 2  # b, gone from the folder, still counts itself
    b.join()
    assert b.peers() == 1
    b.leave()


def test_registry_folder_is_shared_with_sticky_bit(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    with HostRegistry(folder) as r:
        mode = folder.stat().st_mode & 0o7777
        assert mode == 0o1777  # every user's workers may register; only a file's owner may remove it
        assert r.path is not None and (r.path.stat().st_mode & 0o777) == 0o644


def test_registry_ignores_stale_and_foreign_files(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "worker-1-dead.lock").write_text("1\n")  # left by a worker that crashed
    (folder / "notes.txt").write_text("not a worker\n")
    with HostRegistry(folder) as r:
        assert r.peers() == 1
    assert not (folder / "worker-1-dead.lock").exists()
    assert (folder / "notes.txt").exists()


def test_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VELESIO_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_registry_dir() == tmp_path / "velesio-workers"
    monkeypatch.setenv("VELESIO_RUNTIME_DIR", str(tmp_path / "mounted"))
    assert default_registry_dir() == tmp_path / "mounted"
    assert HostRegistry().folder == tmp_path / "mounted"
