"""Print the headline figures of the result files (benchmarks/results/*.json, or the files
given), one line each, as docs/performance.md quotes them.

Run: .venv/bin/python -m benchmarks.summary [FILE.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import RESULTS


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def steady_state(r: dict) -> list[str]:
    s, out = r["snapshot"], []
    out.append(f"snapshot of {s['tgids_walked']} processes ({s['jemalloc_detected']} jemalloc, "
               f"{s['probed_ok']} threads): wall p50 {_ms(s['wall_seconds']['p50'])}, CPU p50 "
               f"{_ms(s['cpu_seconds']['p50'])}; ptrace stops {s['ptrace_stops_during']}, ELF "
               f"opens {s['elf_opens_during']} over {s['wall_seconds']['n']} snapshots")
    if "bare_stat_walk" in r:
        b = r["bare_stat_walk"]
        out.append(f"against the bare /proc/PID/stat walk (CPU p50 "
                   f"{_ms(b['walk_cpu_seconds']['p50'])}): snapshot/walk ratio p50 wall "
                   f"{b['snapshot_ratio_p50']['wall']}, CPU {b['snapshot_ratio_p50']['cpu']}; "
                   f"per-thread totals only: wall {b['snapshot_per_thread_only_ratio_p50']['wall']}"
                   f", CPU {b['snapshot_per_thread_only_ratio_p50']['cpu']}")
        if "snapshot_without_events_ratio_p50" in b:  # results before the process events lack it
            out.append(f"without the kernel's process events (the packaged unit), same rounds: "
                       f"snapshot/walk CPU {b['snapshot_without_events_ratio_p50']['cpu']}, "
                       f"wall {b['snapshot_without_events_ratio_p50']['wall']}; with them, "
                       f"snapshot CPU p99/p50 "
                       f"{b['snapshot_cpu_seconds']['p99'] / b['snapshot_cpu_seconds']['p50']:.2f}")
        if "allocator_ratio_p50" in b:  # results older than the allocator figures lack it
            out.append(f"with / without the allocator figures, same rounds: CPU p50 "
                       f"{b['allocator_ratio_p50']['cpu']}, wall "
                       f"{b['allocator_ratio_p50']['wall']}; without them, snapshot/walk CPU "
                       f"{b['snapshot_without_allocator_ratio_p50']['cpu']}")
    if "moving" in r:
        m = r["moving"]
        out.append(f"a moving process ({m['totals_source']} totals, {m['thread_caches']} "
                   f"thread caches): snapshot of it CPU p50 "
                   f"{_ms(m['snapshot_of_it_cpu_seconds']['p50'])}, arena read CPU p50 "
                   f"{_ms(m['arena_read_cpu_seconds']['p50'])} in "
                   f"{m['arena_read_process_vm_readv_calls']} process_vm_readv calls")
    for name, e in r["exporter"].items():
        if "skipped" in e:
            out.append(f"process-exporter {name}: {e['skipped']}")
            continue
        ratio = r["ratio_to_exporter_scrape_p50"][name]
        out.append(f"process-exporter {name}: scrape wall p50 {_ms(e['wall_seconds']['p50'])}, "
                   f"CPU p50 {_ms(e['cpu_seconds']['p50'])}; ratio ours/theirs wall "
                   f"{ratio['wall']}, CPU {ratio['cpu']} (with render {ratio['wall_with_render']}, "
                   f"{ratio['cpu_with_render']})")
    sc = r["syscalls"]
    if "skipped" not in sc:
        out.append(f"syscalls: {sc['syscalls_in_snapshot']} in one snapshot; ELF opens of "
                   f"processes seen before {len(sc['elf_opens_of_processes_seen_before'])}; "
                   f"ptrace {sc['ptrace_calls']} (on threads seen before "
                   f"{sc['ptrace_calls_on_threads_seen_before']}); process_vm_readv per "
                   f"fixture {sorted(set(sc['process_vm_readv_per_pid_on_our_fixtures'].values()))}"
                   f" with {sc['remote_iovecs_per_call_on_our_fixtures']} iovecs")
    for sweep, per in (("process_sweep", "per_process_us"), ("thread_sweep", "per_thread_us")):
        if sweep not in r:  # the sweeps moved to benchmarks/scale.py
            continue
        f = r[sweep]["fits"]
        out.append(f"{sweep}: CPU {f['cpu_seconds'][per]} us per item + "
                   f"{f['cpu_seconds']['intercept_ms']} ms (R² {f['cpu_seconds']['r2']}); wall "
                   f"{f['wall_seconds'][per]} us per item (R² {f['wall_seconds']['r2']})")
    return out


def _line(fit: dict, per: str) -> str:
    """'S us per process + I ms (R² R)' of a scale.py line (`per`: per_process_us ...)."""
    if per not in fit:
        return "one point, no line"
    intercept = fit["intercept_ms"]
    return (f"{fit[per]} us per {per.split('_')[1]} {'+' if intercept >= 0 else '-'} "
            f"{abs(intercept)} ms (R² {fit['r2']})")


def scale(r: dict) -> list[str]:
    p = r["process_sweep"]
    f, largest, out = p["fits"], p["points"][-1], []
    out.append(f"processes {p['points'][0]['tgids_walked']} .. {largest['tgids_walked']}: "
               f"steady-state snapshot CPU {_line(f['snapshot_cpu_seconds'], 'per_process_us')}, "
               f"wall {_line(f['snapshot_wall_seconds'], 'per_process_us')}; bare stat walk "
               f"CPU {_line(f['walk_cpu_seconds'], 'per_process_us')}; first snapshot wall "
               f"{_line(f['first_snapshot_wall_seconds'], 'per_process_us')}")
    v, d = p["at_largest"], p["daemon"]
    out.append(f"at {v['tgids_walked']} processes: snapshot wall p50 "
               f"{_ms(v['snapshot_wall_p50_seconds'])}, p99 {_ms(v['snapshot_wall_p99_seconds'])}"
               f" back to back; ctprofd run --interval {d['interval_seconds']:g}: p50 "
               f"{_ms(v['daemon_snapshot_p50_seconds'])}, max "
               f"{_ms(v['daemon_snapshot_max_seconds'])} of {d['snapshot_seconds']['n']}; worst "
               f"{v['share_of_interval_worst'] * 100:.2f} % of {r['interval_seconds']:g} s "
               f"(budget {v['budget_seconds']:g} s): {v['steady_state_within_budget']}; ratio "
               f"to the walk CPU p50 {largest['ratio_to_walk_cpu']['p50']}; first snapshot "
               f"{v['first_snapshot_wall_seconds']:.2f} s (warm cache), "
               f"{v['daemon_first_snapshot_seconds']:.2f} s (daemon, empty cache): "
               f"{v['first_snapshot_within_budget']}")
    t = r["thread_sweep"]
    f, largest = t["fits"], t["points"][-1]
    out.append(f"threads {t['points'][0]['threads']} .. {largest['threads']}: steady-state CPU "
               f"{_line(f['steady_cpu_seconds'], 'per_thread_us')}, first snapshot wall "
               f"{_line(f['first_wall_seconds'], 'per_thread_us')} "
               f"({largest['first_ptrace_stops']} ptrace stops at {largest['threads']}); at "
               f"{largest['threads']}: first {_ms(largest['first_wall_seconds']['p50'])}, steady "
               f"{_ms(largest['steady_wall_seconds']['p50'])} wall p50")
    return out


def cold_start(r: dict) -> list[str]:
    b = r["binary"]
    out = [f"binary: {b['debug_info_bytes'] / 1e6:.0f} MB .debug_info, {b['units']} units, "
           f"first jemalloc unit #{b['first_jemalloc_unit']}"]
    for name in ("pahole", "daemon", "resolve_object", "tsd_offsets", "daemon_stripped",
                 "code_stripped", "code_scan"):
        if name not in r:  # results from before the code route
            continue
        m = r[name]
        peak = m.get("peak_rss_mib") or m.get("worker_child_peak_rss_mib")
        out.append(f"{name}: wall p50 {m['wall_seconds']['p50']:.2f} s"
                   + (f", CPU p50 {m['cpu_seconds']['p50']:.2f} s" if "cpu_seconds" in m else "")
                   + (f", peak RSS {peak['p50']:.0f} MiB" if peak else "")
                   + (f", ratio to pahole {r['ratios_to_pahole_p50_wall'][name]}"
                      if name != "pahole" else ""))
    return out


def target_impact(r: dict) -> list[str]:
    out = []
    if "thread_stops" in r:
        for condition in ("idle", "loaded"):
            c = r["thread_stops"][condition]
            d = c["stop_microseconds"]
            out.append(f"stops {condition}: p50 {d['p50']} us, p99 {d['p99']} us, max "
                       f"{d['max']} us, {c['over_2ms']} of {d['n']} over 2 ms: "
                       f"{c['target_p99_le_2ms']}")
    if "phases" in r:
        t = r["phases"]
        s = t["ops_per_second"]["slowdown_per_pair"]
        cpu = t["alloc_loop_cpu_share"]
        out.append(f"slowdown (phases, {t['pairs']} pairs of {t['seconds_per_phase']:g} s): p50 "
                   f"{s['p50'] * 100:+.2f} %, p10..p90 {s['p10'] * 100:+.2f}..{s['p90'] * 100:+.2f}"
                   f" %, mean CI95 {[round(x * 100, 2) for x in t['ops_per_second']['slowdown_mean_ci95'] or []]}"
                   f" %; alloc_loop CPU share A {cpu['A']['p50'] * 100:.2f} % B "
                   f"{cpu['B']['p50'] * 100:.2f} %; ctprofd "
                   f"{t['ctprofd_cpu_share_of_one_cpu_during_b']['p50'] * 100:.2f} % of one CPU")
    if "throughput" in r:
        t = r["throughput"]
        for key in ("ops_per_second", "ops_per_cpu_second"):
            s = t[key]["slowdown_per_pair"]
            out.append(f"slowdown (runs, {key}, {t['pairs']} pairs): p50 {s['p50'] * 100:+.2f} %, "
                       f"p10..p90 {s['p10'] * 100:+.2f}..{s['p90'] * 100:+.2f} %, mean CI95 "
                       f"{[round(x * 100, 2) for x in t[key]['slowdown_mean_ci95'] or []]} %")
        out.append(f"ctprofd CPU during B: p50 "
                   f"{t['ctprofd_cpu_share_of_one_cpu_during_b']['p50'] * 100:.2f} % of one CPU; "
                   f"implied slowdown on a saturated machine "
                   f"{t['slowdown_bound_from_ctprofd_cpu'] * 100:.2f} %")
    return out


def footprint(r: dict) -> list[str]:
    out = []
    if "footprint" in r:
        f = r["footprint"]
        out.append(f"daemon at {f['interval_seconds']:g} s on {f['host']['tgids_walked']:.0f} "
                   f"processes: CPU {f['cpu_percent_of_one_cpu']} % of one CPU over "
                   f"{f['window_seconds']:.0f} s ({f['cpu_seconds_per_snapshot']} s per snapshot), "
                   f"RSS {f['rss_mib']['window_start']} -> {f['rss_mib']['window_end']} MiB "
                   f"(max {f['rss_mib']['max']}), parse worker {f['parse_worker']['rss_mib']} MiB; "
                   f"start {f['startup']['wall_seconds_to_first_snapshot']} s")
    if "render" in r:
        g = r["render"]
        out.append(f"render of {g['series']} series ({g['body_bytes']} bytes): scrape p50 "
                   f"{_ms(g['scrape_wall_seconds']['p50'])}, max "
                   f"{_ms(g['scrape_wall_seconds']['max'])} = {g['share_of_interval_max'] * 100:.2f}"
                   f" % of {g['interval_seconds']:g} s: {g['target_lt_5pct_of_interval']}")
    return out


def scrapers(r: dict) -> list[str]:
    return [f"{r['scrapers']} scrapers, {r['duration_seconds']:.0f} s: {r['responses']} responses "
            f"({r['responses_per_second']}/s), errors {r['errors'] or 0}, problems "
            f"{r['problems'] or 0}, inconsistent snapshots "
            f"{len(r['snapshots_with_inconsistent_bodies'])}; {r['snapshots_during_run']:.0f} "
            f"snapshots for {r['snapshots_expected']} expected, interval "
            f"{r['interval_between_snapshots_seconds']['min']}..{r['interval_between_snapshots_seconds']['max']}"
            f" s, overruns {r['overruns_during_run']:.0f}; RSS {r['rss_mib']['start']} -> "
            f"{r['rss_mib']['end']} MiB (max {r['rss_mib']['max']}); latency p50 "
            f"{_ms(r['latency_seconds']['p50'])}, p99 {_ms(r['latency_seconds']['p99'])}; "
            f"{r['verdict']}"]


def hostile_schedule(r: dict) -> list[str]:
    out = []
    for phase in ("baseline", "attack"):
        p = r[phase]
        out.append(f"{phase}: {p['snapshots']:.0f} snapshots in {p['seconds']:g} s (schedule "
                   f"kept {p['schedule_kept']}), overruns {p['overruns']:.0f}, root exact in "
                   f"{p['scrapes_root_exact']} of {p['scrapes']} scrapes, pending max "
                   f"{p['pending_max']:.0f}, RSS max {p['rss_mib_max']} MiB"
                   + (f", {p['hostile_binaries']} hostile binaries" if phase == "attack" else ""))
    out.append(f"schedule kept, attack / baseline: {r['schedule_ratio_attack_to_baseline']}")
    return out


def scrape_cost(r: dict) -> list[str]:
    out = []
    for phase in ("baseline", "cached", "unread", "bad-auth"):
        p = r[phase]
        lat = p["latency_ms"]
        out.append(f"{phase}: {p['scrapes']} scrapes of {r['series']} series, p50 "
                   f"{lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, answered within 1 s "
                   f"{p['within_1s_share']:.2%} ({p['failed']} failed)")
    out.append(f"p50 cached / per-scrape render: {r['p50_ratio']}")
    return out


def combined_attack(r: dict) -> list[str]:
    out = []
    for phase in ("baseline", "arena", "vfork", "mappings", "unread", "accept", "all",
                  "all+accept"):
        if phase not in r:  # run with --phases
            continue
        p = r[phase]
        ratio = r["ratios_to_baseline"].get(phase, {}).get("schedule_kept")
        mean = p.get("snapshot_seconds_mean")  # result files before it have none
        out.append(f"{phase}: schedule kept {p['schedule_kept']}"
                   + (f" ({ratio} of baseline)" if ratio is not None else "")
                   + (f", snapshots {mean} s on average" if mean is not None else "")
                   + f", scrapes within 1 s {p['scrapes_on_time']:.1%}, both fixtures exact "
                   f"in {p['scrapes_exact']:.1%} of {p['scrapes']} scrapes, RSS max "
                   f"{p['rss_mib_max']} MiB")
    c = r["cgroup"]
    out.append(f"cgroup of {c['limit_mib']} MiB: peak {c['peak_mib']} MiB, "
               f"{c['oom_kills']} OOM kills")
    return out


def process_events(r: dict) -> list[str]:
    out = [f"a process-events listener; connector sockets on the host before the run: "
           f"{r['connector_sockets_before']}"]
    for name in ("fork_exit", "spawn"):
        x = r[name]
        out.append(f"{name}: {x['without_seconds']['p50'] * 1e6:.1f} us without, "
                   f"{x['with_seconds']['p50'] * 1e6:.1f} us with; ratio with/without p50 "
                   f"{x['ratio_with_to_without']['p50']} (p10 {x['ratio_with_to_without']['p10']}, "
                   f"p90 {x['ratio_with_to_without']['p90']})")
    return out


def first_snapshot(r: dict) -> list[str]:
    out = [f"{r['processes']} processes ({r['idle']} idle); baseline {r['baseline']}"]
    for mode in ("warm", "empty"):
        x = r[mode]
        out.append(f"{mode} cache: wall p50 {x['this']['wall']['p50']:.2f} s (baseline "
                   f"{x['baseline']['wall']['p50']:.2f} s), CPU p50 {x['this']['cpu']['p50']:.2f} s "
                   f"(baseline {x['baseline']['cpu']['p50']:.2f} s); ratio wall p50 "
                   f"{x['ratio_wall']['p50']}, CPU p50 {x['ratio_cpu']['p50']}")
    return out


SUMMARIES = {"steady_state": steady_state, "first_snapshot": first_snapshot, "process_events": process_events, "scale": scale, "cold_start": cold_start,
             "target_impact": target_impact, "footprint": footprint, "scrapers": scrapers,
             "hostile_schedule": hostile_schedule, "scrape_cost": scrape_cost,
             "combined_attack": combined_attack}


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(
        p for p in RESULTS.glob("*.json") if not p.name.endswith("-quick.json"))
    for path in paths:
        document = json.loads(path.read_text())
        name = document["benchmark"]
        print(f"== {name} ({path.name}, {document['started']}, load average at start "
              f"{document['machine']['load_average_at_start'][0]:.2f})")
        for line in SUMMARIES[name](document["results"]):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
