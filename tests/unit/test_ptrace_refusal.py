"""Why PTRACE_SEIZE said EPERM, from a thread's /proc status: a zombie or a vanished
thread is an exit race; a live one names its tracer (0 when it has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctprofd.probe.ptrace import (CMDLINE_READ_MAX, SeizeRefused, ThreadGone, is_ctprofd,
                                  refusal)
from ctprofd.report import tags


def status(root: Path, tid: int, state: str, tracer: int, flags: int = 0x400040,
           pending: int = 0) -> None:
    (root / str(tid)).mkdir()
    (root / str(tid) / "status").write_text(
        f"Name:\tworker\nState:\t{state}\nTgid:\t1\nPid:\t{tid}\nTracerPid:\t{tracer}\n"
        f"SigPnd:\t{pending:016x}\n")
    fields = [state[0], "1", "1", "1", "0", "-1", str(flags)] + ["0"] * 12 + ["12345"]
    (root / str(tid) / "stat").write_text(f"{tid} (worker) {' '.join(fields)} 0 0\n")


@pytest.mark.parametrize("state", ["Z (zombie)", "X (dead)"])
def test_an_exited_thread_is_an_exit_race(tmp_path, state):
    status(tmp_path, 7, state, 0)
    assert isinstance(refusal(7, str(tmp_path)), ThreadGone)


@pytest.mark.parametrize("flags, pending", [(0x400044, 0), (0x400040, 1 << 8)])
def test_an_exiting_thread_is_an_exit_race(tmp_path, flags, pending):
    """The kernel refuses to seize a thread already in do_exit (PF_EXITING) with EPERM; one
    with SIGKILL pending (its group killed, or exit called) is about to be there."""
    status(tmp_path, 7, "R (running)", 0, flags, pending)
    assert isinstance(refusal(7, str(tmp_path)), ThreadGone)


def test_a_vanished_thread_is_an_exit_race(tmp_path):
    assert isinstance(refusal(7, str(tmp_path)), ThreadGone)


def test_a_traced_thread_names_its_tracer(tmp_path):
    status(tmp_path, 7, "S (sleeping)", 4242)
    found = refusal(7, str(tmp_path))
    assert isinstance(found, SeizeRefused)
    assert (found.tag, found.tracer) == (tags.PTRACE_TRACED, 4242)
    assert "held by another tracer, pid 4242 (?)" in str(found)  # its comm is gone


def test_the_tracer_is_named_by_its_comm(tmp_path):
    status(tmp_path, 7, "t (tracing stop)", 4242)
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "comm").write_text("strace\n")
    found = refusal(7, str(tmp_path))
    assert (found.tag, found.tracer_comm) == (tags.PTRACE_TRACED, "strace")
    assert "held by another tracer, pid 4242 (strace)" in str(found)


def test_an_untraced_live_thread_is_a_privilege_refusal(tmp_path):
    status(tmp_path, 7, "R (running)", 0)
    found = refusal(7, str(tmp_path))
    assert isinstance(found, SeizeRefused) and found.tracer == 0
    assert found.tag == tags.PTRACE_SEIZE


def cmdline(root: Path, tid: int, *words: str) -> None:
    (root / str(tid)).mkdir()
    (root / str(tid) / "cmdline").write_bytes(b"\0".join(w.encode() for w in words) + b"\0")


@pytest.mark.parametrize("words", [("/usr/bin/python3", "-m", "ctprofd", "run"),
                                   ("/usr/local/bin/ctprofd", "snapshot"),
                                   ("python3", "/opt/ctprofd/bin/ctprofd", "run")])
def test_a_tracer_running_ctprofd_is_known(tmp_path, words):
    cmdline(tmp_path, 9, *words)
    assert is_ctprofd(9, str(tmp_path))


@pytest.mark.parametrize("words", [("strace", "-f", "-p", "12"), ("gdb", "-p", "12"),
                                   ("python3", "-m", "pytest", "tests", "ctprofd"),
                                   ("/usr/bin/ctprofd-helper",)])
def test_other_tracers_are_not_ctprofd(tmp_path, words):
    cmdline(tmp_path, 9, *words)
    assert not is_ctprofd(9, str(tmp_path))


def test_a_vanished_tracer_is_not_ctprofd(tmp_path):
    assert not is_ctprofd(9, str(tmp_path))


def test_the_refusals_say_which_thread(tmp_path):
    """Each outcome names the tid: a zombie, one whose status is hidden
    from us (nothing more is said), and one whose status names no tracer."""
    status(tmp_path, 7, "Z (zombie)", 0)
    assert str(refusal(7, str(tmp_path))) == "tid 7: exited (or exiting) at PTRACE_SEIZE"
    status(tmp_path, 9, "S (sleeping)", 0)
    (tmp_path / "9" / "status").unlink()
    (tmp_path / "9" / "status").mkdir()  # unreadable (EISDIR), as hidepid would make it
    hidden = refusal(9, str(tmp_path))
    assert isinstance(hidden, SeizeRefused)
    assert (hidden.tag, hidden.tracer, hidden.tracer_comm) == (tags.PTRACE_SEIZE, 0, "")
    assert hidden.message == "tid 9: PTRACE_SEIZE: EPERM (not permitted)"
    status(tmp_path, 10, "S (sleeping)", 0)
    text = (tmp_path / "10" / "status").read_text()
    (tmp_path / "10" / "status").write_text(text.replace("TracerPid:\t0\n", ""))
    untraced = refusal(10, str(tmp_path))
    assert (untraced.tag, untraced.tracer, untraced.tracer_comm) == (tags.PTRACE_SEIZE, 0, "")


def test_a_tracer_comm_not_in_utf8_is_still_named(tmp_path):
    status(tmp_path, 7, "S (sleeping)", 4242)
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "comm").write_bytes(b"gdb\xff\n")
    found = refusal(7, str(tmp_path))
    assert found.tracer_comm == "gdb\ufffd"


@pytest.mark.parametrize("words", [("python3", "-X", "dev", "ctprofd"),
                                   ("x" * CMDLINE_READ_MAX, "ctprofd")])
def test_only_the_first_words_of_a_bounded_cmdline_are_looked_at(tmp_path, words):
    """ctprofd is named in the first three words, within the first CMDLINE_READ_MAX
    bytes: a later word does not make a tracer a ctprofd."""
    cmdline(tmp_path, 9, *words)
    assert not is_ctprofd(9, str(tmp_path))
