"""The per-snapshot probe summary: tally of outcomes, plurality, privilege gate, log line."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from . import tags

# ktstr's hint spells the capability in its setcap form (ktstr is a compiled binary); the
# kernel ignores file capabilities on a #! script, so this one names what works for a
# Python daemon. It keeps the words cap_sys_ptrace and kernel.yama.ptrace_scope.
REMEDIATION_HINT = (
    "grant ctprofd cap_sys_ptrace: AmbientCapabilities=CAP_SYS_PTRACE in its systemd unit, "
    "--cap-add SYS_PTRACE for its container, or run it as root; and check "
    "kernel.yama.ptrace_scope (3 forbids ptrace even for root)"
)

# When ctprofd holds CAP_SYS_PTRACE and is still refused, granting it more is no answer.
REFUSED_DESPITE_PRIVILEGE_HINT = (
    "ctprofd holds CAP_SYS_PTRACE, so something outside it refuses: a process of another "
    "container or user namespace than ctprofd's (run ctprofd in the host's PID namespace), a "
    "Linux security module (AppArmor, SELinux), or kernel.yama.ptrace_scope 3")


def denied_hint(privileged: bool) -> str:
    """What to do about processes whose /proc/PID/exe is refused: the remediation hint, or,
    when ctprofd has the privilege already, what else refuses it."""
    return REFUSED_DESPITE_PRIVILEGE_HINT if privileged else REMEDIATION_HINT


@dataclass(frozen=True)
class ProbeSummary:
    """Per-snapshot probe outcome, following the CtprofProbeSummary contract."""

    tgids_walked: int = 0
    jemalloc_detected: int = 0
    probed_ok: int = 0
    failed: int = 0
    dominant_failure: str | None = None
    privilege_dominant: bool = False

    def remediation_hint(self) -> str | None:
        """The fixed one-line fix-it text, present exactly when privilege dominates."""
        return REMEDIATION_HINT if self.privilege_dominant else None

    def log_line(self) -> str:
        """The operator log line for this snapshot."""
        line = (f"probe: {self.tgids_walked} tgids walked, {self.jemalloc_detected} jemalloc "
                f"detected, {self.probed_ok} probed OK, {self.failed} failed")
        if self.failed:
            hint = f"; hint: {REMEDIATION_HINT}" if self.privilege_dominant else ""
            line += f" (dominant: {self.dominant_failure}{hint})"
        return line

    def to_dict(self) -> dict:
        """The JSON form: the six fields plus `remediation_hint`."""
        return {
            "tgids_walked": self.tgids_walked,
            "jemalloc_detected": self.jemalloc_detected,
            "probed_ok": self.probed_ok,
            "failed": self.failed,
            "dominant_failure": self.dominant_failure,
            "privilege_dominant": self.privilege_dominant,
            "remediation_hint": self.remediation_hint(),
        }


def dominant_tag(failures: Counter[str]) -> str | None:
    """The most frequent actionable tag; ties go to the tag listed first in the contract
    (attach tags in pipeline order, then probe tags in pipeline order), so the result
    never depends on arrival order."""
    ranked = [(-failures[tag], tags.ALL_TAGS.index(tag)) for tag in tags.ACTIONABLE
              if failures[tag] > 0]
    if not ranked:
        return None
    return tags.ALL_TAGS[min(ranked)[1]]


@dataclass(frozen=True)
class PidFailure:
    """The first actionable failure of one tgid in a snapshot, why, and how many it had."""

    pid: int
    comm: str
    tag: str
    reason: str
    count: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tally:
    """Counts every outcome of one probe pass, and derives the summary from them."""

    tgids_walked: int = 0
    jemalloc_detected: int = 0
    probed_ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    traced_by: dict[int, int] = field(default_factory=dict)  # pid -> another tracer's pid
    tracer_names: dict[int, str] = field(default_factory=dict)  # that tracer's pid -> comm
    denied_tgids: int = 0  # /proc/PID/exe refused (EACCES, EPERM): invisible, not failed
    left_out: int = 0  # threads not read because their stop was not (or not all) waited for
    pending: int = 0  # binary still being resolved in the background: not read yet, not failed
    failed_pids: dict[int, PidFailure] = field(default_factory=dict)
    current: tuple[int, str] | None = None  # (pid, comm) the failures that follow are of
    exit_races: int = 0  # tgids that exited while read: their failures were forgiven
    _current_failures: Counter[str] = field(default_factory=Counter)
    _left_out_before: int = 0  # left_out when the current tgid began

    def begin(self, pid: int, comm: str) -> None:
        """The failures that follow are of this tgid (until the next `begin`)."""
        self.current = (pid, comm)
        self._current_failures = Counter()
        self._left_out_before = self.left_out

    def failed_now(self) -> bool:
        """Whether the current tgid had a failure (any tag but `jemalloc-not-found`)."""
        return any(tag != tags.JEMALLOC_NOT_FOUND for tag in self._current_failures)

    def forgive(self) -> None:
        """The current tgid exited while read: take back its failures, its threads left
        out and the tracer said to hold it; count an exit race."""
        self.failures.subtract(self._current_failures)
        self.failures = +self.failures  # no zero or negative counts left
        if self.current is not None:
            self.failed_pids.pop(self.current[0], None)
            tracer = self.traced_by.pop(self.current[0], None)
            if tracer is not None and tracer not in self.traced_by.values():
                del self.tracer_names[tracer]
        self._current_failures = Counter()
        self.left_out = self._left_out_before
        self.exit_races += 1

    def fail(self, tag: str, count: int = 1, reason: str = "") -> None:
        """Record `count` outcomes with `tag` (actionable or not); an actionable one is
        also listed under the current tgid."""
        self.failures[tag] += count
        self._current_failures[tag] += count
        if self.current is None or tag not in tags.ACTIONABLE:
            return
        pid, comm = self.current
        known = self.failed_pids.get(pid)
        self.failed_pids[pid] = (PidFailure(pid, comm, tag, reason or tag, count)
                                 if known is None else replace(known, count=known.count + count))

    def summary(self) -> ProbeSummary:
        """The contract view of this tally."""
        failed = sum(n for tag, n in self.failures.items() if tag in tags.ACTIONABLE)
        privilege = sum(self.failures[tag] for tag in tags.PRIVILEGE)
        return ProbeSummary(
            tgids_walked=self.tgids_walked,
            jemalloc_detected=self.jemalloc_detected,
            probed_ok=self.probed_ok,
            failed=failed,
            dominant_failure=dominant_tag(self.failures),
            privilege_dominant=failed > 0 and 2 * privilege >= failed,
        )
