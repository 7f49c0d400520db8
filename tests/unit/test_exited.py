"""ProcessInfo.exited over a proc root laid out by hand: a process that vanished, was
replaced under its pid or is a zombie with no live thread has exited; a zombie leader whose
threads run on has not. Each stat file is read once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ctprofd.procfs import processes
from ctprofd.procfs.processes import read_process


def entry(directory: Path, pid: int, state: str, start: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fields = [state, "1", "1", "1", "0", "-1", "4194560"] + ["0"] * 12 + [str(start)]
    (directory / "stat").write_text(f"{pid} (worker) {' '.join(fields)} 0 0\n")
    (directory / "status").write_text(f"Name:\tworker\nState:\t{state}\nSigPnd:\t{0:016x}\n")


def process(root: Path, leader: str, threads: dict[int, str]) -> processes.ProcessInfo:
    """Process 42 (start time 100) with its leader in state `leader` and these threads."""
    entry(root / "42", 42, "S", 100)
    found = read_process(str(root), 42)
    assert found is not None
    entry(root / "42", 42, leader, 100)
    for tid, state in {42: leader, **threads}.items():
        entry(root / "42" / "task" / str(tid), tid, state, 100 + tid - 42)
    return found


@pytest.fixture
def reads(monkeypatch) -> Counter[str]:
    seen: Counter[str] = Counter()
    real = processes.read_file

    def counting(path: str) -> bytes:
        seen[path] += 1
        return real(path)
    monkeypatch.setattr(processes, "read_file", counting)
    return seen


@pytest.mark.parametrize("leader, threads, exited", [
    ("S", {43: "S"}, False),
    ("Z", {43: "S", 44: "Z"}, False),  # the leader called pthread_exit: the group runs on
    ("Z", {43: "Z"}, True),
    ("Z", {}, True)])
def test_a_process_has_exited_once_no_thread_of_it_runs(tmp_path, reads, leader, threads,
                                                        exited):
    found = process(tmp_path, leader, threads)
    reads.clear()
    assert found.exited() is exited
    assert max(n for path, n in reads.items() if path.endswith("/stat")) == 1, reads


def test_a_process_vanished_or_replaced_under_its_pid_has_exited(tmp_path, reads):
    found = process(tmp_path, "S", {})
    entry(tmp_path / "42", 42, "S", 999)
    assert found.exited()
    assert reads[f"{tmp_path}/42/stat"] == 2  # read_process's, then exited's
    (tmp_path / "42" / "stat").unlink()
    assert found.exited()
