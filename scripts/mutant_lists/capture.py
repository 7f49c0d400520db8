"""Hand mutants of ctprofd/probe/capture.py (scripts/hand_mutants.py; scores in docs/testing.md)."""

F = "ctprofd/probe/capture.py"
MUTANTS = [
    ("exec: earlier image's arena counts dropped", F,
     '            tracked.earlier_images = saved.retained',
     '            tracked.earlier_images = (0, 0)'),
    ("exec: earlier image's counts dropped", F,
     '        retained = saved.retained\n',
     '        retained = saved.retained if previous is None else (0, 0)\n'),
    ('exec: earlier arena counts with the wrong sign', F,
     'in_use=totals.in_use + earlier[0] - earlier[1])',
     'in_use=totals.in_use - earlier[0] + earlier[1])'),
    ('exec: last reported not carried over', F,
     '        saved = (Saved(_larger(previous.reported, previous.all_totals()), {})',
     '        saved = (Saved(previous.all_totals(), {})'),
    ('re-attach: floor of the earlier image dropped', F,
     '        tracked.reported = previous.reported if previous is not None else saved.reported',
     '        tracked.reported = (0, 0) if previous is not None else saved.reported'),
    ('restart: restored floor dropped', F,
     '        tracked.reported = previous.reported if previous is not None else saved.reported',
     '        tracked.reported = previous.reported if previous is not None else (0, 0)'),
    ('restart: restored threads ignored', F,
     '                state.threads[tid] = ThreadState(start, 0, allocated, deallocated)',
     '                pass'),
    ('restart: threads of a process not attached ignored', F,
     '            retained = (retained[0] + sum(a for a, _ in saved.threads.values()),\n                        retained[1] + sum(d for _, d in saved.threads.values()))',
     '            pass'),
]
