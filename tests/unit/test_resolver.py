"""The background resolver's queue: owners served in turn, an identity queued once, bounds."""

from __future__ import annotations

import threading

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
