"""The probe-summary contract: actionable filter, plurality, tie-break, privilege gate."""

import re
from collections import Counter
from pathlib import Path

import pytest

from ctprofd.report import tags
from ctprofd.report.summary import REMEDIATION_HINT, PidFailure, ProbeSummary, Tally, dominant_tag

README = Path(__file__).resolve().parents[2] / "README.md"


def summarize(**counts: int) -> ProbeSummary:
    tally = Tally(tgids_walked=10, jemalloc_detected=2, probed_ok=5)
    for name, n in counts.items():
        tally.fail(name.replace("_", "-"), n)
    return tally.summary()


def test_zero_tgids_gives_all_zero_and_no_dominant():
    summary = Tally().summary()
    assert summary == ProbeSummary(0, 0, 0, 0, None, False)
    assert summary.remediation_hint() is None


def test_zero_failures_is_not_privilege_dominant():
    summary = summarize()
    assert (summary.failed, summary.dominant_failure, summary.privilege_dominant) == (0, None, False)


def test_non_actionable_tags_never_count():
    summary = summarize(jemalloc_not_found=50, readlink_failure=7)
    assert summary.failed == 0
    assert summary.dominant_failure is None
    assert not summary.privilege_dominant


def test_exactly_half_ptrace_is_privilege_dominant():
    summary = summarize(ptrace_seize=1, ptrace_interrupt=1, waitpid=2)
    assert summary.failed == 4
    assert summary.privilege_dominant
    assert summary.remediation_hint() == REMEDIATION_HINT


def test_just_under_half_ptrace_is_not_privilege_dominant():
    summary = summarize(ptrace_seize=2, waitpid=3)
    assert not summary.privilege_dominant
    assert summary.remediation_hint() is None


def test_privilege_dominant_while_another_tag_wins_the_plurality():
    summary = summarize(ptrace_seize=2, ptrace_interrupt=2, dwarf_parse_failure=3)
    assert summary.privilege_dominant
    assert summary.dominant_failure == tags.DWARF_PARSE_FAILURE


def test_ptrace_tag_dominant_without_privilege_dominating():
    summary = summarize(ptrace_seize=3, waitpid=2, get_regset=2, tls_arithmetic=2)
    assert summary.dominant_failure == tags.PTRACE_SEIZE
    assert not summary.privilege_dominant


def contract_table() -> list[tuple[str, bool]]:
    """(tag, actionable) rows of the README's tag table, in the order listed: the order
    the contract breaks ties by, read from the contract itself, not from the code."""
    section = README.read_text().split("## The probe summary", 1)[1].split("\n## ", 1)[0]
    return [(tag, actionable == "yes") for tag, actionable in
            re.findall(r"^\| `([a-z-]+)` \|.*\| (yes|no) \|$", section, re.MULTILINE)]


def test_contract_table_lists_every_tag_with_its_actionability():
    table = contract_table()
    assert [tag for tag, _ in table] == list(tags.ALL_TAGS)
    assert {tag for tag, actionable in table if actionable} == tags.ACTIONABLE


def test_ties_break_by_the_contract_tables_order_regardless_of_arrival():
    order = [tag for tag, actionable in contract_table() if actionable]
    for i, first in enumerate(order):
        for second in order[i + 1:]:
            assert dominant_tag(Counter({first: 2, second: 2})) == first, (first, second)
            assert dominant_tag(Counter({second: 2, first: 2})) == first, (first, second)
            assert dominant_tag(Counter({second: 3, first: 2})) == second
    assert dominant_tag(Counter(dict.fromkeys(reversed(order), 1))) == order[0]


def test_a_not_actionable_tag_never_wins_a_tie_or_a_plurality():
    assert dominant_tag(Counter({tags.JEMALLOC_NOT_FOUND: 9, tags.TLS_ARITHMETIC: 1})) == \
        tags.TLS_ARITHMETIC
    assert dominant_tag(Counter({tags.READLINK_FAILURE: 4})) is None


def test_log_line_without_failures():
    assert summarize().log_line() == (
        "probe: 10 tgids walked, 2 jemalloc detected, 5 probed OK, 0 failed")


def test_log_line_names_dominant_and_hint_when_privilege_dominates():
    line = summarize(ptrace_seize=3, waitpid=1).log_line()
    assert line.endswith(f"4 failed (dominant: ptrace-seize; hint: {REMEDIATION_HINT})")


def test_log_line_without_hint_when_privilege_does_not_dominate():
    line = summarize(waitpid=3, ptrace_seize=1).log_line()
    assert line.endswith("4 failed (dominant: waitpid)")


def test_hint_names_what_works_for_a_python_daemon():
    # the words anything matching ktstr's hint looks for
    assert "cap_sys_ptrace" in REMEDIATION_HINT
    assert "kernel.yama.ptrace_scope" in REMEDIATION_HINT
    # what grants it to a #! script (file capabilities do not): unit, container, root
    assert "AmbientCapabilities=CAP_SYS_PTRACE" in REMEDIATION_HINT
    assert "--cap-add SYS_PTRACE" in REMEDIATION_HINT
    assert "root" in REMEDIATION_HINT
    assert "setcap" not in REMEDIATION_HINT
    assert "ptrace_scope (3 forbids" in REMEDIATION_HINT
    assert "\n" not in REMEDIATION_HINT


def test_json_form_has_the_seven_keys():
    assert set(summarize(waitpid=1).to_dict()) == {
        "tgids_walked", "jemalloc_detected", "probed_ok", "failed", "dominant_failure",
        "privilege_dominant", "remediation_hint"}


def test_unknown_tag_is_rejected():
    with pytest.raises(ValueError):
        tags.ProbeError("made-up", "x")


def test_tally_adds_up_outcomes_one_or_many_at_a_time():
    tally = Tally()
    tally.fail(tags.WAITPID)
    tally.fail(tags.WAITPID)
    tally.fail(tags.WAITPID, 3)
    assert tally.failures == Counter({tags.WAITPID: 5})


def test_a_single_ptrace_failure_is_privilege_dominant():
    summary = summarize(ptrace_interrupt=1)
    assert (summary.failed, summary.privilege_dominant) == (1, True)


def test_probe_error_carries_its_tag_and_message():
    error = tags.ProbeError(tags.WAITPID, "tid 12: no stop in 250 ms")
    assert (error.tag, error.message, str(error), error.args) == (
        tags.WAITPID, "tid 12: no stop in 250 ms", "waitpid: tid 12: no stop in 250 ms",
        ("tid 12: no stop in 250 ms",))
    with pytest.raises(ValueError, match="unknown failure tag 'made-up'"):
        tags.ProbeError("made-up", "x")


def test_actionable_failures_are_listed_under_the_current_tgid_first_one_first():
    tally = Tally()
    tally.fail(tags.PTRACE_SEIZE)  # no current tgid: counted, not listed
    tally.current = (10, "redis")
    tally.fail(tags.JEMALLOC_NOT_FOUND)  # not actionable: counted, not listed
    tally.fail(tags.WAITPID, reason="tid 11: no stop in 250 ms")
    tally.fail(tags.PTRACE_SEIZE, 2, reason="tid 12: EPERM")
    tally.current = (20, "envoy")
    tally.fail(tags.DWARF_PARSE_FAILURE)
    tally.current = (30, "nginx")
    tally.fail(tags.GET_REGSET, 4)
    assert tally.failed_pids == {
        10: PidFailure(10, "redis", tags.WAITPID, "tid 11: no stop in 250 ms", 3),
        20: PidFailure(20, "envoy", tags.DWARF_PARSE_FAILURE, tags.DWARF_PARSE_FAILURE, 1),
        30: PidFailure(30, "nginx", tags.GET_REGSET, tags.GET_REGSET, 4)}
    assert tally.failures == Counter({tags.PTRACE_SEIZE: 3, tags.JEMALLOC_NOT_FOUND: 1,
                                      tags.WAITPID: 1, tags.DWARF_PARSE_FAILURE: 1,
                                      tags.GET_REGSET: 4})
    assert tally.failed_pids[10].to_dict() == {
        "pid": 10, "comm": "redis", "tag": tags.WAITPID,
        "reason": "tid 11: no stop in 250 ms", "count": 3}


def test_probe_error_keeps_its_errno():
    assert tags.ProbeError(tags.PTRACE_SEIZE, "tid 3", errno=1).errno == 1
    assert tags.ProbeError(tags.PTRACE_SEIZE, "tid 3").errno is None


def test_forgiving_a_tgid_takes_back_all_it_added_and_nothing_of_the_others():
    """A tgid that exited while read: its failures, the threads it left out and the tracer
    said to hold it are taken back; what earlier tgids added stays."""
    tally = Tally()
    tally.begin(10, "redis")
    tally.fail(tags.WAITPID, reason="tid 11: no stop in 250 ms")  # as threads.py does
    tally.left_out += 1
    tally.begin(20, "envoy")
    tally.fail(tags.PTRACE_TRACED, reason="tid 20: held")
    tally.traced_by[20], tally.tracer_names[99] = 99, "strace"
    tally.begin(30, "nginx")
    tally.fail(tags.PTRACE_TRACED, 2, reason="tid 30: held")
    tally.traced_by[30], tally.tracer_names[99] = 99, "strace"
    tally.left_out += 2
    tally.forgive()
    tally.begin(40, "java")
    tally.fail(tags.PTRACE_TRACED, reason="tid 40: held")
    tally.traced_by[40], tally.tracer_names[98] = 98, "gdb"
    tally.forgive()
    assert tally.failures == Counter({tags.WAITPID: 1, tags.PTRACE_TRACED: 1})
    assert set(tally.failed_pids) == {10, 20}
    assert (tally.left_out, tally.traced_by, tally.tracer_names) == (1, {20: 99}, {99: "strace"})
    assert tally.exit_races == 2
