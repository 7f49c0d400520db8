"""Process selection by uid and by systemd unit on real processes: one run as another uid
by setpriv, one in a real cgroup named like a unit, one plain, all read through /proc."""

from __future__ import annotations

import pytest

from ctprofd.config import settings as config
from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.procfs.processes import ProcessInfo, read_stat
from support.cgroups import in_unit, unique_unit

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--")


@pytest.fixture
def targets(fixture_bins, spawn_fixture):
    """{'unit': pid in a unit's cgroup, 'nobody': pid of uid 65534, 'plain': pid}, and the
    unit's name."""
    unit = unique_unit()
    in_cgroup = spawn_fixture(fixture_bins["static"], 1)
    nobody = spawn_fixture(fixture_bins["static"], 1, prefix=AS_NOBODY)
    plain = spawn_fixture(fixture_bins["static"], 1)
    with in_unit(in_cgroup.pid, unit):
        yield {"unit": in_cgroup.pid, "nobody": nobody.pid, "plain": plain.pid}, unit
        in_cgroup.kill()


def chosen(yaml_text: str, pids: dict[str, int], tmp_path) -> set[str]:
    path = tmp_path / "ctprofd.yaml"
    path.write_text(yaml_text)
    select = config.load(str(path)).selection.selects
    return {name for name, pid in pids.items()
            if select(ProcessInfo("/proc", pid, read_stat(f"/proc/{pid}/stat")))}


def test_uid_and_unit_are_read_from_the_real_process(targets):
    pids, unit = targets
    info = {name: ProcessInfo("/proc", pid, read_stat(f"/proc/{pid}/stat"))
            for name, pid in pids.items()}
    assert (info["nobody"].uid, info["unit"].uid, info["plain"].uid) == (NOBODY, 0, 0)
    assert info["unit"].unit == unit
    assert unit not in (info["nobody"].unit, info["plain"].unit)


@pytest.mark.parametrize("rules, expected", [
    ("include: {uid: [65534]}", {"nobody"}),
    ("include: {unit: ['ctprofd-test-*.scope']}", {"unit"}),
    ("include: {uid: [65534], unit: ['ctprofd-test-*.scope']}", {"nobody", "unit"}),
    ("exclude: {uid: [65534]}", {"unit", "plain"}),
    ("exclude: {unit: ['ctprofd-test-*']}", {"nobody", "plain"}),
    ("include: {comm: ['^alloc_threads$']}\n  exclude: {uid: [0]}", {"nobody"}),
    ("include: {uid: [0]}\n  exclude: {unit: ['*.scope']}", {"plain"}),
])
def test_uid_and_unit_rules_on_real_processes(targets, tmp_path, rules, expected):
    pids, _ = targets
    assert chosen(f"selection:\n  {rules}\n", pids, tmp_path) == expected


def test_a_capture_walks_only_the_selected_real_processes(targets, tmp_path):
    """Asked for our three processes only (a whole-host walk would seize other sessions'
    uid-65534 processes while their own tests probe them)."""
    pids, unit = targets
    path = tmp_path / "ctprofd.yaml"
    path.write_text(f"selection:\n  include: {{unit: ['{unit}'], uid: [65534]}}\n")
    select = config.load(str(path)).selection.selects
    engine = Capturer(CaptureSettings(select=select))
    try:
        snapshot = engine.capture(pids=list(pids.values()))
    finally:
        engine.close()
    assert snapshot.summary.tgids_walked == 2
    read = {p.pid: p for p in snapshot.processes}
    assert set(read) == {pids["unit"], pids["nobody"]}
    assert (read[pids["unit"]].unit, read[pids["unit"]].uid) == (unit, 0)
    assert read[pids["nobody"]].uid == NOBODY
