"""The test infrastructure itself: the jemalloc cache, the fixture programs and
their variants have the properties the probe tests rely on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import elf
from support.build import JEMALLOC_FILES, JEMALLOC_STAMP, MODES, FixtureBins
from support.procs import (DROP_PTRACE_PREFIX, FixtureError, assert_no_thread_stopped_or_traced,
                           expected_worker_counters, is_dead, task_states)

TSD_SYMBOL = "je_tsd_tls"
MANGLE = "cant_access_tsd_items_directly_use_a_getter_or_setter_"
CAP_SYS_PTRACE = 19
HANG_GUARD = 120  # seconds: keeps a broken run from hanging, never a timing claim
ALL_VARIANTS = (["static", "dynamic", "static-oddtls", "dynamic-oddtls"]
                + [f"{link}-stripped-{m}" for link in ("static", "dynamic") for m in MODES])
STRIPPED = [v for v in ALL_VARIANTS if "stripped" in v]
WITH_DEBUGLINK = [v for v in STRIPPED if "debuglink" in v or "badcrc" in v]


def test_jemalloc_cache_is_complete(jemalloc_dir: Path) -> None:
    for f in (JEMALLOC_STAMP, *JEMALLOC_FILES):
        assert (jemalloc_dir / f).is_file(), f
    assert os.readlink(jemalloc_dir / "lib/libjemalloc.so") == "libjemalloc.so.2"
    assert "5.3.0" in (jemalloc_dir / JEMALLOC_STAMP).read_text()


def test_static_fixture_reports_every_thread(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 8)
    tids = fx.tids
    assert len(tids) == 9 and len(set(tids)) == 9
    assert tids[0] == fx.pid == fx.proc.pid
    assert set(tids) == {int(t) for t in os.listdir(f"/proc/{fx.pid}/task")}
    assert all(t["allocated"] > 0 for t in fx.threads)
    for i, worker in enumerate(fx.threads[1:]):
        assert (worker["allocated"], worker["deallocated"]) == expected_worker_counters(i)
    assert_no_thread_stopped_or_traced(fx.pid)


def test_many_threads_keep_exact_counters(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 256)
    assert len(set(fx.tids)) == 257
    assert [(t["allocated"], t["deallocated"]) for t in fx.threads[1:]] == [
        expected_worker_counters(i) for i in range(256)]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_every_variant_runs_with_exact_counters(fixture_bins: FixtureBins, spawn_fixture, name: str) -> None:
    variant = fixture_bins[name]
    fx = spawn_fixture(variant, 3)
    for i, worker in enumerate(fx.threads[1:]):
        assert (worker["allocated"], worker["deallocated"]) == expected_worker_counters(i)
    maps = Path(f"/proc/{fx.pid}/maps").read_text()
    assert str(variant.jemalloc_object) in maps
    assert fx.quit() == 0


def test_exit_thread_joins_without_touching_the_others(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 4)
    before = [dict(t) for t in fx.threads]
    tid = fx.exit_thread(2)
    assert tid == before[3]["tid"] == fx.worker_tids[2]
    assert str(tid) not in os.listdir(f"/proc/{fx.pid}/task")
    # Main's command loop, the join and the re-measure allocate nothing.
    assert fx.threads == before[:3] + before[4:]
    assert fx.exit_thread(0) == before[1]["tid"]
    with pytest.raises(FixtureError):
        fx.exit_thread(2)  # already gone: the program answers ERROR


def test_stdin_eof_ends_the_fixture(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 2)
    fx.proc.stdin.close()
    assert fx.proc.wait(timeout=10) == 0


def test_spawner_kills_what_it_started(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 1)
    fx.kill()
    assert fx.proc.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{fx.pid}").exists()  # our own child: reaped


def test_prefix_drops_cap_sys_ptrace(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 1, prefix=DROP_PTRACE_PREFIX)
    assert fx.pid == fx.proc.pid  # setpriv execs
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{fx.pid}/status").read_text().splitlines())
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert not int(status[field], 16) & (1 << CAP_SYS_PTRACE), field
    assert int(status["CapEff"], 16) != 0  # still root otherwise


def test_forking_prefix_reports_the_target_pid(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 2, prefix=["strace", "-f", "-qq", "-o", "/dev/null"])
    assert fx.pid != fx.proc.pid
    assert set(fx.tids) == {int(t) for t in os.listdir(f"/proc/{fx.pid}/task")}
    # Traced by strace: the helper must say so.
    with pytest.raises(AssertionError, match="traced"):
        assert_no_thread_stopped_or_traced(fx.pid)
    fx.kill()
    assert is_dead(fx.pid)


def test_stopped_threads_are_detected(fixture_bins: FixtureBins, spawn_fixture) -> None:
    fx = spawn_fixture(fixture_bins["static"], 2)
    assert_no_thread_stopped_or_traced(fx.pid)
    os.kill(fx.pid, signal.SIGSTOP)
    deadline = time.monotonic() + HANG_GUARD
    while not all(s == "T" for s, _ in task_states(fx.pid).values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AssertionError, match="stopped"):
        assert_no_thread_stopped_or_traced(fx.pid)
    os.kill(fx.pid, signal.SIGCONT)
    deadline = time.monotonic() + HANG_GUARD
    while any(s == "T" for s, _ in task_states(fx.pid).values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_no_thread_stopped_or_traced(fx.pid)


# --- the variants' ELF properties ---------------------------------------------------------


def test_unstripped_objects_carry_symbols_and_dwarf(fixture_bins: FixtureBins) -> None:
    for name in ("static", "dynamic"):
        obj = fixture_bins[name].jemalloc_object
        assert {".symtab", ".debug_info"} <= elf.section_names(obj)
        assert elf.symbol(obj, TSD_SYMBOL)["type"] == "STT_TLS"
        assert elf.has_pt_tls(obj)
    # The dynamic executable holds no jemalloc of its own.
    assert elf.symbol(fixture_bins["dynamic"].binary, TSD_SYMBOL) is None


def test_dwarf_has_the_tsd_counters(fixture_bins: FixtureBins) -> None:
    out = subprocess.run(["pahole", "-C", "tsd_s", fixture_bins["static"].binary],
                         capture_output=True, text=True, check=True).stdout
    for member in ("thread_allocated", "thread_deallocated"):
        assert f" {MANGLE}{member};" in out


@pytest.mark.parametrize("name", STRIPPED)
def test_stripped_objects_have_no_symtab_or_dwarf(fixture_bins: FixtureBins, name: str) -> None:
    obj = fixture_bins[name].jemalloc_object
    sections = elf.section_names(obj)
    assert ".symtab" not in sections
    assert not any(s.startswith((".debug_", ".zdebug_")) for s in sections)
    assert elf.has_pt_tls(obj)
    assert elf.build_id(obj)


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
def test_oddtls_variants_have_an_unaligned_tls_segment(fixture_bins: FixtureBins,
                                                       linkage: str) -> None:
    memsz, align = elf.pt_tls(fixture_bins[f"{linkage}-oddtls"].binary)
    assert align == 64 and memsz % align != 0
    if linkage == "static":  # jemalloc's TSD comes after the program's own .tdata
        assert elf.symbol(fixture_bins["static-oddtls"].binary, TSD_SYMBOL)["value"] > 0
    else:  # module 1 is the program's, jemalloc's block comes below it
        assert fixture_bins["dynamic-oddtls"].jemalloc_object == fixture_bins["dynamic"].jemalloc_object


def test_build_ids_are_distinct(fixture_bins: FixtureBins) -> None:
    objects = {fixture_bins[n].jemalloc_object for n in ALL_VARIANTS}  # dynamic-oddtls shares
    ids = [elf.build_id(obj) for obj in objects]
    assert all(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
def test_buildid_variant_debug_file(fixture_bins: FixtureBins, linkage: str) -> None:
    variant = fixture_bins[f"{linkage}-stripped-buildid"]
    bid = elf.build_id(variant.jemalloc_object)
    assert variant.debug_file == elf.build_id_path(fixture_bins.debug_root, bid)
    assert variant.debug_file.is_file()
    assert elf.build_id(variant.debug_file) == bid
    assert elf.debuglink(variant.jemalloc_object) is None
    assert ".debug_info" in elf.section_names(variant.debug_file)
    assert elf.symbol(variant.debug_file, TSD_SYMBOL)["type"] == "STT_TLS"


@pytest.mark.parametrize("name", WITH_DEBUGLINK)
def test_debuglink_variants(fixture_bins: FixtureBins, name: str) -> None:
    variant = fixture_bins[name]
    obj, debug = variant.jemalloc_object, variant.debug_file
    link_name, link_crc = elf.debuglink(obj)
    assert link_name == f"{obj.name}.debug" == debug.name
    expected_dir = {
        "debuglink": obj.parent,
        "badcrc": obj.parent,
        "debuglink-subdir": obj.parent / ".debug",
        "debuglink-debugroot": fixture_bins.debug_root / obj.parent.relative_to("/"),
    }[variant.mode]
    assert debug.parent == expected_dir
    # Valid debug file of this very object, found only through the link...
    assert elf.build_id(debug) == elf.build_id(obj)
    assert ".debug_info" in elf.section_names(debug)
    assert not elf.build_id_path(fixture_bins.debug_root, elf.build_id(obj)).exists()
    # ...whose CRC matches, except for badcrc.
    assert (elf.file_crc32(debug) == link_crc) == (variant.mode != "badcrc")


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
def test_nodebug_variant_has_no_debug_anywhere(fixture_bins: FixtureBins, linkage: str) -> None:
    variant = fixture_bins[f"{linkage}-stripped-nodebug"]
    obj = variant.jemalloc_object
    assert variant.debug_file is None
    assert elf.debuglink(obj) is None
    assert not elf.build_id_path(fixture_bins.debug_root, elf.build_id(obj)).exists()
    leftovers = [p for p in variant.binary.parent.rglob("*.debug")]
    assert leftovers == []


def test_dynamic_variants_load_their_private_library(fixture_bins: FixtureBins) -> None:
    for name in ALL_VARIANTS:
        variant = fixture_bins[name]
        if variant.linkage != "dynamic":
            continue
        dyn = subprocess.run(["readelf", "-d", variant.binary], capture_output=True, text=True,
                             check=True).stdout
        assert "[libjemalloc.so.2]" in dyn
        assert f"[{variant.jemalloc_object.parent}]" in dyn  # RUNPATH
        relocs = subprocess.run(["readelf", "-r", variant.jemalloc_object], capture_output=True,
                                text=True, check=True).stdout
        assert "R_X86_64_TPOFF64" in relocs  # initial-exec TLS


# --- the other programs --------------------------------------------------------------------


def test_churn_replaces_its_threads(fixture_bins: FixtureBins, spawn_process) -> None:
    churn = spawn_process([fixture_bins.churn, "4"])
    task_dir = Path(f"/proc/{churn.pid}/task")
    seen = {int(t) for t in os.listdir(task_dir)}
    deadline = time.monotonic() + HANG_GUARD
    while len(seen) < 50 and time.monotonic() < deadline:
        seen |= {int(t) for t in os.listdir(task_dir)}
        time.sleep(0.005)
    assert len(seen) >= 50


def test_alloc_loop_reports_throughput(fixture_bins: FixtureBins, spawn_process) -> None:
    loop = spawn_process([fixture_bins.alloc_loop, "2", "0.3"], ready=None)
    result = json.loads(loop.readline(timeout=10))
    assert result["total_ops"] % 1024 == 0 and result["seconds"] >= 0.3  # whole batches
    assert loop.proc.wait(timeout=HANG_GUARD) == 0
    rate = spawn_process([fixture_bins.alloc_loop, "1"], ready=None)
    # one line a second; a loaded machine may report a second without a finished batch
    for _ in range(HANG_GUARD):
        if json.loads(rate.readline(timeout=HANG_GUARD))["ops_per_sec"] > 0:
            break
    else:
        raise AssertionError(f"no batch finished in {HANG_GUARD} s")
