"""The background resolver's queue: owners served in turn, an identity queued once, bounds."""

from __future__ import annotations

import logging
import threading

import pytest

from ctprofd.resolve.resolver import BackgroundResolver


def test_owners_take_turns_and_one_owner_cannot_starve_another():
    resolver = BackgroundResolver(max_per_owner=10, max_jobs=100)
    running, gate = threading.Event(), threading.Event()
    order: list[str] = []
    assert resolver.submit("first", 1000, lambda: (running.set(), gate.wait()))
    assert running.wait(30)  # holds the thread until released
    for i in range(5):
        assert resolver.submit(f"user-{i}", 1000, lambda i=i: order.append(f"user-{i}"))
    assert resolver.submit("root-0", 0, lambda: order.append("root-0"))
    assert resolver.submit("root-1", 0, lambda: order.append("root-1"))
    gate.set()
    assert resolver.wait_idle(30)
    assert order == ["user-0", "root-0", "user-1", "root-1", "user-2", "user-3", "user-4"]
    resolver.close()


def test_an_identity_is_queued_once_and_the_queues_are_bounded():
    resolver = BackgroundResolver(max_per_owner=2, max_jobs=3)
    running, gate = threading.Event(), threading.Event()
    assert resolver.submit("a", 1, lambda: (running.set(), gate.wait()))
    assert running.wait(30)
    assert not resolver.submit("a", 1, gate.wait)  # running already
    assert resolver.queued("a")
    assert resolver.submit("b", 1, lambda: None)
    assert resolver.submit("c", 1, lambda: None)  # owner 1's queue holds b, c: full
    assert not resolver.submit("d", 1, lambda: None)
    assert not resolver.submit("e", 2, lambda: None)  # a, b, c: the total is reached
    gate.set()
    assert resolver.wait_idle(30)
    assert not resolver.queued("a")
    assert resolver.submit("e", 2, lambda: None)
    assert resolver.wait_idle(30)
    resolver.close()
    assert not resolver.submit("f", 2, lambda: None)


def test_a_job_that_raises_does_not_end_the_thread():
    resolver = BackgroundResolver()
    done = threading.Event()
    assert resolver.submit("bad", 1, lambda: 1 / 0)
    assert resolver.submit("good", 1, done.set)
    assert done.wait(30)
    resolver.close()


def blocked(resolver: BackgroundResolver, key: str = "blocker",
            owner: int = 1) -> tuple[threading.Event, threading.Event]:
    """Submit a job that holds the resolver's thread until the second event is set; return
    once it runs (its first event)."""
    running, gate = threading.Event(), threading.Event()
    assert resolver.submit(key, owner, lambda: (running.set(), gate.wait(30)))
    assert running.wait(30)
    return running, gate


def test_the_default_bounds_are_eight_per_owner_and_sixty_four_in_all():
    resolver = BackgroundResolver()
    _, gate = blocked(resolver, owner=0)
    assert all(resolver.submit(f"one-{i}", 1, lambda: None) for i in range(8))
    assert not resolver.submit("one-8", 1, lambda: None)  # owner 1's queue is full
    for owner in range(2, 8):  # 1 running + 7 owners x 8 = 57 keys
        assert all(resolver.submit(f"{owner}-{i}", owner, lambda: None) for i in range(8))
    assert all(resolver.submit(f"8-{i}", 8, lambda: None) for i in range(7))  # 64 keys
    assert not resolver.submit("8-7", 8, lambda: None)  # room in its queue, none in all
    gate.set()
    assert resolver.wait_idle(30)
    resolver.close()


def test_one_owners_bound_holds_while_the_total_has_room():
    resolver = BackgroundResolver(max_per_owner=1, max_jobs=10)
    _, gate = blocked(resolver)
    assert resolver.submit("b", 2, lambda: None)
    assert not resolver.submit("c", 2, lambda: None)  # owner 2 has one queued: its bound
    assert resolver.submit("c", 3, lambda: None)  # another owner: the total has room
    gate.set()
    assert resolver.wait_idle(30)
    resolver.close()


def test_busy_while_a_job_runs_and_only_then():
    resolver = BackgroundResolver()
    assert not resolver.busy  # nothing submitted yet
    _, gate = blocked(resolver)
    assert resolver.busy
    gate.set()
    assert resolver.wait_idle(30)
    assert not resolver.busy
    resolver.close()


def test_wait_idle_gives_up_after_its_timeout_while_a_job_runs():
    resolver = BackgroundResolver()
    _, gate = blocked(resolver)
    assert not resolver.wait_idle(0.01)
    gate.set()
    assert resolver.wait_idle(30)
    resolver.close()


def test_close_drops_the_queued_jobs_and_keeps_the_running_one_until_it_ends():
    resolver = BackgroundResolver()
    _, gate = blocked(resolver, "running")
    ran: list[str] = []
    assert resolver.submit("queued", 2, lambda: ran.append("queued"))
    resolver.close()
    assert resolver.queued("running") and not resolver.queued("queued")
    assert not resolver.submit("later", 3, lambda: ran.append("later"))
    gate.set()
    assert resolver.wait_idle(30)  # the running job ended; nothing else ran
    assert not resolver.busy and not resolver.queued("running") and ran == []


def test_close_with_nothing_running_leaves_it_idle():
    resolver = BackgroundResolver()
    resolver.close()
    assert resolver.wait_idle(30) and not resolver.queued("x") and not resolver.busy


def test_the_thread_is_a_daemon_thread_named_resolver():
    resolver = BackgroundResolver()
    seen: list[tuple[str, bool]] = []
    assert resolver.submit("a", 1, lambda: seen.append(
        (threading.current_thread().name, threading.current_thread().daemon)))
    assert resolver.wait_idle(30)
    assert seen == [("resolver", True)]  # it never holds the daemon's exit
    resolver.close()


def test_a_job_that_raises_is_logged_with_its_key_and_error(caplog: pytest.LogCaptureFixture):
    resolver = BackgroundResolver()
    with caplog.at_level(logging.WARNING, logger="ctprofd.resolve.resolver"):
        assert resolver.submit("bad", 1, lambda: 1 // 0)
        assert resolver.wait_idle(30)
    assert [r.getMessage() for r in caplog.records] == [
        "resolving bad: unexpected ZeroDivisionError: integer division or modulo by zero"]
    resolver.close()
