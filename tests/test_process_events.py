"""The kernel's process events (procfs.events): real processes exec, change owner, rename
themselves, fork and exit; the listener names exactly the ones that changed, says when it
cannot tell, and is refused where the kernel would not send to it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ctprofd.procfs.events import ProcessEvents
from support.procs import wait_until

PYTHON = sys.executable


def run(*argv: str) -> int:
    """Run a program to its end; its pid."""
    process = subprocess.Popen(argv)
    assert process.wait(timeout=60) == 0
    return process.pid


def child_python(code: str) -> int:
    """A Python process (started by fork and exec) that runs `code` and exits; its pid."""
    return run(PYTHON, "-c", code)


def test_an_exec_a_new_uid_and_a_rename_are_named() -> None:
    events = ProcessEvents()
    try:
        assert events.error is None
        assert events.changed() is not None
        execed = run("/bin/true")
        setuid = child_python("import os; os.setresuid(65534, 65534, 65534)")
        renamed = child_python("import ctypes; ctypes.CDLL(None).prctl(15, b'renamed', 0, 0, 0)")
        changes = events.changed()
    finally:
        events.close()
    assert changes is not None
    assert {execed, setuid, renamed} <= changes.processes
    assert {execed, setuid, renamed} <= changes.threads


THREADS = """
import ctypes, os, sys, threading
print("ready", flush=True)
sys.stdin.readline()
go = threading.Event()
def run():
    if {rename}:
        ctypes.CDLL(None).prctl(15, b"worker", 0, 0, 0)
    go.wait()
thread = threading.Thread(target=run)
thread.start()
print(thread.native_id, flush=True)
sys.stdin.readline()
go.set()
thread.join()
sys.stdin.readline()
"""


@pytest.mark.parametrize("rename", [False, True], ids=["plain", "renamed"])
def test_a_thread_started_renamed_or_ended_names_its_process_among_threads_only(
        rename: bool) -> None:
    """A thread's start, its renaming itself, and its end change the process's threads, not
    the process (its image, owner and name)."""
    process = subprocess.Popen([PYTHON, "-c", THREADS.format(rename=rename)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None and process.stdout is not None
    changes = []
    try:
        assert process.stdout.readline() == "ready\n"  # exec'ed, before the listener
        events = ProcessEvents()
        try:
            assert events.changed() is not None
            process.stdin.write("start\n")
            process.stdin.flush()
            tid = int(process.stdout.readline())
            changes.append(events.changed())
            process.stdin.write("end\n")
            process.stdin.flush()
            wait_until(lambda: not os.path.exists(f"/proc/{process.pid}/task/{tid}"),
                       "the thread's end")
            changes.append(events.changed())
        finally:
            events.close()
    finally:
        process.communicate("quit\n", timeout=60)
    for change in changes:  # the start (and the renaming), then the end
        assert change is not None
        assert process.pid in change.threads
        assert process.pid not in change.processes


def test_a_fork_and_an_exit_name_no_process() -> None:
    """The forked child never execs, and its parent's own exec came before the listener."""
    parent = subprocess.Popen(
        [PYTHON, "-c", "import os, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
                       "pid = os.fork()\n"
                       "if pid == 0: os._exit(0)\nos.waitpid(pid, 0)\nprint(pid, flush=True)\n"
                       "sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None and parent.stdout.readline() == "ready\n"  # exec'ed
    events = ProcessEvents()
    try:
        assert events.changed() is not None  # whatever came before: read
        assert parent.stdin is not None
        parent.stdin.write("fork\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        changes = events.changed()
    finally:
        events.close()
        parent.communicate("end\n", timeout=60)
    assert changes is not None
    assert not {parent.pid, child} & (changes.processes | changes.threads)


def execs(count: int) -> None:
    """`count` execs of /bin/true, one after the other."""
    run("/bin/sh", "-c", f"i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done")


def test_events_lost_to_a_full_buffer_are_said_once() -> None:
    """A buffer too small for what happened: the call that finds the overflow cannot tell
    (None); the next one, with nothing lost since, can."""
    events = ProcessEvents(buffer_bytes=64 * 1024)  # a few hundred messages
    try:
        assert events.error is None
        execs(2000)
        assert events.changed() is None
        pid = run("/bin/true")
        changed = events.changed()
    finally:
        events.close()
    assert changed is not None and pid in changed.processes


def test_a_call_cut_short_by_its_budget_cannot_tell_nor_can_the_next() -> None:
    """More messages than one call reads: that call and the next (which misses what the
    first read and dropped) say None; the rest stay queued, and the calls can tell again
    once they are read."""
    events = ProcessEvents(events_max=50)
    try:
        execs(200)
        assert events.changed() is None
        assert events.changed() is None
        for _ in range(20):
            if events.changed() is not None:
                break
        pid = run("/bin/true")
        changed = events.changed()
    finally:
        events.close()
    assert changed is not None and pid in changed.processes


def test_without_cap_net_admin_the_kernel_refuses_and_that_is_said() -> None:
    script = ("from ctprofd.procfs.events import ProcessEvents\n"
              "e = ProcessEvents()\nprint(e.error)\nprint(e.changed())")
    result = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
                             PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["proc connector refused: Operation not permitted",
                                          "None"]


def test_in_another_pid_namespace_there_is_no_acknowledgement_and_no_events() -> None:
    """The kernel ignores a listener outside its initial pid namespace (the pids it would
    send are not that namespace's); another listener's acknowledgement is not taken for
    ours (this machine's other tests and daemons listen too)."""
    script = ("from ctprofd.procfs.events import ProcessEvents\n"
              "e = ProcessEvents()\nprint(e.error)\nprint(e.changed())")
    outer = ProcessEvents()  # a listener in the initial namespace, acknowledged meanwhile
    try:
        result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c",
                                 script], capture_output=True, text=True, timeout=60)
    finally:
        outer.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no acknowledgement from the proc connector (not the kernel's initial pid or user "
        "namespace)", "None"]
