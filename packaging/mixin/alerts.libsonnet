// The alerts, each with a runbook section in docs/alerting.md (runbook_url: the configured
// base + "#<alert name in lower case>"), all of severity _config.severity: ctprofd measures
// other programs, and none of its alerts means a production service is down.
{
  local c = $._config,
  // '15m' -> '15 minutes': the windows and `for` durations are whole minutes.
  local minutes(duration) = std.strReplace(duration, 'm', ' minutes'),
  local runbook(alert) = '%s#%s' % [c.runbookURLBase, std.asciiLower(alert)],
  local alert(name, rule) = {
    alert: name,
    expr: std.rstripChars(rule.expr, '\n'),
    [if std.objectHas(rule, 'for') then 'for']: rule['for'],
    labels: { severity: c.severity },
    annotations: rule.annotations { runbook_url: runbook(name) },
  },
  local sel = c.ctprofdSelector,
  local on = std.join(', ', c.instanceLabels),
  local perProcess = std.join(', ', ['pid', 'comm', 'exe', 'user'] + c.containerLabels),
  local hint = 'grant ctprofd cap_sys_ptrace: AmbientCapabilities=CAP_SYS_PTRACE in its systemd unit, --cap-add SYS_PTRACE for its container, or run it as root; and check kernel.yama.ptrace_scope (3 forbids ptrace even for root)',

  prometheusAlerts+:: {
    groups+: [
      // The leak alert and the rules it is built on. Rules within a group run in order, so the
      // alert always sees the floors of the same evaluation.
      {
        name: 'ctprofd.leak',
        rules: [
          { record: 'instance_group:ctprofd_live_bytes:sum', expr: 'sum without (pid) (ctprofd_live_bytes{%s})' % sel },
          // The hourly floor of a group's live bytes: the lowest value in the last hour. A
          // spike only raises values, so it never moves the floor; CtprofdMemoryLeakSuspected
          // compares floors hour by hour.
          { record: 'instance_group:ctprofd_live_bytes:min1h', expr: 'min_over_time(instance_group:ctprofd_live_bytes:sum[1h])' },
          // Processes of a group whose totals are per-thread sums (totals_source "threads"):
          // their live bytes rise whenever a thread frees and exits before its next read, so
          // growth there is no evidence of a leak; CtprofdMemoryLeakSuspected leaves such a
          // group out (docs/alerting.md).
          {
            record: 'instance_group:ctprofd_processes:thread_sums',
            expr: 'sum without (pid) (ctprofd_processes{%(sel)s} - ctprofd_arena_processes{%(sel)s})' % { sel: sel },
          },
          // Fires when the floor
          //  - grew by more than leakBytesPerHour on average over the last two hours (the value), and
          //  - is above every floor of the six hours before, now and also an hour ago.
          // A spike that recovers never raises a floor. A process restart drops live bytes and
          // climbs back to the old plateau, which is no new high. A one-off step up is a new
          // high once, not twice an hour apart. A group with a process whose totals are
          // per-thread sums is left out (their growth is no evidence). docs/alerting.md has
          // the reasoning and tuning.
          alert('CtprofdMemoryLeakSuspected', {
            expr: |||
              (
                  instance_group:ctprofd_live_bytes:min1h
                - instance_group:ctprofd_live_bytes:min1h offset 2h
              ) / 2 > %s
              and
                instance_group:ctprofd_live_bytes:min1h
                  > max_over_time(instance_group:ctprofd_live_bytes:min1h[6h] offset 1h)
              and
                instance_group:ctprofd_live_bytes:min1h offset 1h
                  > max_over_time(instance_group:ctprofd_live_bytes:min1h[6h] offset 2h)
              unless
                instance_group:ctprofd_processes:thread_sums > 0
            ||| % c.leakBytesPerHour,
            'for': '30m',
            annotations: {
              summary: 'Live heap of {{ $labels.comm }}{{ with $labels.unit }} ({{ . }}){{ end }} on {{ $labels.instance }} keeps growing',
              description: 'The hourly low of the live bytes of {{ $labels.comm }}{{ with $labels.unit }} in unit {{ . }}{{ end }} on {{ $labels.instance }} keeps setting new highs: it is above anything it held in the six hours before, it was an hour ago too, and it grew by {{ $value | humanize1024 }}B per hour over the last two hours. Steady growth like this is what a memory leak looks like.',
            },
          }),
        ],
      },
      // Allocator health (docs/allocator.md): how much more jemalloc holds than the program
      // has allocated, per exported series (instance_series: a process when pid is among
      // ctprofd's labels, else a group), per group and per unit, and the alert on it.
      // Ratios only where something is allocated (no division by zero).
      {
        name: 'ctprofd.allocator',
        rules: [
          { record: 'instance_group:ctprofd_allocator_%s_bytes:sum' % m, expr: 'sum without (pid) (ctprofd_allocator_%s_bytes{%s})' % [m, sel] }
          for m in ['allocated', 'active', 'resident']
        ] + [
          { record: 'instance_unit:ctprofd_allocator_%s_bytes:sum' % m, expr: 'sum without (%s) (ctprofd_allocator_%s_bytes{%s})' % [perProcess, m, sel] }
          for m in ['allocated', 'active', 'resident']
        ] + [
          {
            record: 'instance_series:ctprofd_allocator_%s_bytes:ratio_allocated' % m,
            expr: 'ctprofd_allocator_%(m)s_bytes{%(sel)s} / (ctprofd_allocator_allocated_bytes{%(sel)s} > 0)' % { m: m, sel: sel },
          }
          for m in ['active', 'resident']
        ] + [
          {
            record: '%(level)s:ctprofd_allocator_%(m)s_bytes:ratio_allocated' % { level: level, m: m },
            expr: '%(level)s:ctprofd_allocator_%(m)s_bytes:sum / (%(level)s:ctprofd_allocator_allocated_bytes:sum > 0)' % { level: level, m: m },
          }
          for level in ['instance_group', 'instance_unit']
          for m in ['active', 'resident']
        ] + [
          // What the allocator holds in memory beyond what the program allocated.
          {
            record: 'instance_group:ctprofd_allocator_resident_bytes:minus_allocated',
            expr: 'instance_group:ctprofd_allocator_resident_bytes:sum - instance_group:ctprofd_allocator_allocated_bytes:sum',
          },
          // Both: a high ratio alone is common and harmless in a small process (a few MiB of
          // dirty pages against a small heap), a large waste alone in a big one (1 GiB
          // against 50 GiB allocated); together, for an hour, memory is being wasted.
          alert('CtprofdAllocatorFragmentation', {
            expr: |||
              instance_group:ctprofd_allocator_resident_bytes:ratio_allocated > %s
              and
              instance_group:ctprofd_allocator_resident_bytes:minus_allocated > %s
            ||| % [c.fragmentationRatio, c.fragmentationWasteBytes],
            'for': c.fragmentationFor,
            annotations: {
              summary: 'jemalloc in {{ $labels.comm }}{{ with $labels.unit }} ({{ . }}){{ end }} on {{ $labels.instance }} holds {{ $value | humanize }}x what it allocated',
              description: 'For %s, jemalloc in {{ $labels.comm }}{{ with $labels.unit }} in unit {{ . }}{{ end }} on {{ $labels.instance }} has held more than %s times the bytes the program allocated in resident memory, and more than %d MiB beyond them: fragmentation (active / allocated) and dirty pages not purged yet (resident / active). The runbook says what to tune: dirty_decay_ms, narenas, background threads.' % [minutes(c.fragmentationFor), c.fragmentationRatio, c.fragmentationWasteBytes / 1048576],
            },
          }),
        ],
      },
      {
        name: 'ctprofd.alerts',
        rules: [
          // The target is down, or no ctprofd target is being scraped at all.
          alert('CtprofdDown', {
            expr: 'up{%s} == 0 or absent(up{%s})' % [sel, sel],
            'for': c.downFor,
            annotations: {
              summary: 'ctprofd is down{{ with $labels.instance }} on {{ . }}{{ end }}',
              description: '{{ if $labels.instance }}Prometheus has failed to scrape ctprofd on {{ $labels.instance }} for at least %s{{ else }}No target matching {%s} has been scraped for at least %s{{ end }}; per-process allocation counters, live bytes and the leak alert are blind there.' % [minutes(c.downFor), sel, minutes(c.downFor)],
            },
          }),
          // The age of the last completed snapshot, measured at scrape time so that neither
          // the scrape interval nor the rule evaluation delay counts towards it (time() - ...
          // would fire whenever the scrape interval exceeds two snapshot intervals).
          // Or (value 0): scraped for 10 minutes without completing a first snapshot; the
          // timestamp is exported only once one has completed.
          alert('CtprofdStale', {
            expr: |||
              timestamp(ctprofd_last_snapshot_timestamp_seconds{%(sel)s}) - ctprofd_last_snapshot_timestamp_seconds{%(sel)s}
                > 3 * ctprofd_snapshot_interval_seconds{%(sel)s}
              or
              max_over_time(ctprofd_snapshots_total{%(sel)s}[10m]) == 0 and ctprofd_snapshots_total{%(sel)s} offset 10m
            ||| % { sel: sel },
            'for': '1m',
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} has stopped completing snapshots',
              description: '{{ if eq $value 0.0 }}ctprofd on {{ $labels.instance }} answers scrapes but has not completed a single snapshot for more than 10 minutes; it exports no per-process metrics.{{ else }}ctprofd on {{ $labels.instance }} answers scrapes, but its last completed snapshot is {{ $value | humanizeDuration }} old, more than three snapshot intervals. The exported counters are frozen at that snapshot.{{ end }}',
            },
          }),
          alert('CtprofdPtracePrivilege', {
            expr: 'ctprofd_probe_privilege_dominant{%s} == 1' % sel,
            'for': c.privilegeFor,
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} lacks the privilege to ptrace its targets',
              description: 'For %s, ptrace-seize and ptrace-interrupt have made up at least half of the probe failures of ctprofd on {{ $labels.instance }}: it lacks the privilege to trace processes, which then go unmeasured. To fix it, %s' % [minutes(c.privilegeFor), hint],
            },
          }),
          // Processes whose /proc/PID/exe ctprofd is refused (EACCES, EPERM): without
          // CAP_SYS_PTRACE, other users' processes. They are neither measured nor counted in
          // ctprofd_probe_failed, so nothing else fires for them.
          alert('CtprofdBlind', {
            expr: 'ctprofd_probe_denied_tgids{%s} > 0' % sel,
            'for': c.blindFor,
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} cannot see {{ $value }} processes',
              description: 'For %s, ctprofd on {{ $labels.instance }} has been refused the executable of {{ $value }} processes (/proc/PID/exe: EACCES or EPERM), so it cannot tell whether they use jemalloc, and they go unmeasured. To fix it, %s' % [minutes(c.blindFor), hint],
            },
          }),
          // Actionable failures in every scrape of the window (`offset` makes sure there were
          // that many minutes of scrapes), labelled with the tag that dominates now. The
          // window is in the expression rather than in `for:` so that a change of dominant
          // tag does not restart the clock; it only relabels the alert.
          alert('CtprofdProbeFailures', {
            expr: |||
              (
                  min_over_time(ctprofd_probe_failed{%(sel)s}[%(window)s]) > 0
                and
                  ctprofd_probe_failed{%(sel)s} offset %(window)s
              )
              * on (%(on)s) group_left (tag) ctprofd_probe_dominant_failure_info{%(sel)s}
            ||| % { sel: sel, window: c.probeFailuresWindow, on: on },
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} keeps failing to probe processes ({{ $labels.tag }})',
              description: 'Every scrape of ctprofd on {{ $labels.instance }} in the last %s reported at least {{ $value }} actionable probe failures; the dominant failure tag now is {{ $labels.tag }}. Processes that fail to probe are missing from the per-process metrics.' % minutes(c.probeFailuresWindow),
            },
          }),
          // reason="p90-duration": the 90th percentile snapshot duration is above
          // snapshotSlowRatio of the configured interval (the value is that ratio);
          // reason="overruns": a snapshot overran the interval in every 10-minute window
          // (the value is the overrun count in the last 10 minutes).
          alert('CtprofdSnapshotSlow', {
            expr: |||
              label_replace(
                  histogram_quantile(0.9, rate(ctprofd_snapshot_duration_seconds_bucket{%(sel)s}[10m]))
                / ctprofd_snapshot_interval_seconds{%(sel)s}
                > %(ratio)s,
                "reason", "p90-duration", "", "")
              or
              label_replace(
                increase(ctprofd_snapshot_overruns_total{%(sel)s}[10m]) > 0,
                "reason", "overruns", "", "")
            ||| % { sel: sel, ratio: c.snapshotSlowRatio },
            'for': '15m',
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} cannot keep up with its snapshot interval',
              description: '{{ if eq $labels.reason "overruns" }}Snapshots of ctprofd on {{ $labels.instance }} keep overrunning the configured interval ({{ $value | humanize }} in the last 10 minutes).{{ else }}The 90th percentile snapshot duration of ctprofd on {{ $labels.instance }} is {{ $value | humanizePercentage }} of the configured interval.{{ end }} The exported counters are refreshed less often than configured.',
            },
          }),
          // Series left out by max_series, per reason (live: outranked by longer-running
          // series; exited: their processes all exited). Their processes are not measured.
          alert('CtprofdSeriesDropped', {
            expr: 'ctprofd_series_dropped{%s} > 0' % sel,
            'for': c.seriesDroppedFor,
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} leaves {{ $value }} series out ({{ $labels.reason }})',
              description: 'For %s, ctprofd on {{ $labels.instance }} has left {{ $value }} series out of its metrics because they would exceed max_series (reason {{ $labels.reason }}); the processes of those series are not measured in Prometheus.' % minutes(c.seriesDroppedFor),
            },
          }),
          // Snapshots that failed with an unexpected error (logged with its traceback): the
          // exported data stays at the last completed snapshot.
          alert('CtprofdSnapshotFailures', {
            expr: 'increase(ctprofd_snapshot_failures_total{%s}[%s]) > 0' % [sel, c.failuresWindow],
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} has snapshots failing with an error',
              description: '{{ $value | humanize }} snapshots of ctprofd on {{ $labels.instance }} failed with an unexpected error in the last %s (the journal has the traceback); its metrics stay at the last completed snapshot until one succeeds.' % minutes(c.failuresWindow),
            },
          }),
          // State files that could not be written (a full disk even after the space set
          // aside, or any other write error): for aggregate.json, the series served stay at those
          // last written meanwhile.
          alert('CtprofdStateNotWritten', {
            expr: 'increase(ctprofd_state_write_failures_total{%s}[%s]) > 0' % [sel, c.failuresWindow],
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} cannot write {{ $labels.file }}',
              description: 'ctprofd on {{ $labels.instance }} failed {{ $value | humanize }} times in the last %s to write its state file {{ $labels.file }} (e.g. a full disk, even after using the space set aside for it). It tries again every snapshot; for aggregate.json, the series it serves stay at those last written meanwhile.' % minutes(c.failuresWindow),
            },
          }),
          // Scrapes served without the samples that could not be rendered.
          alert('CtprofdRenderFailures', {
            expr: 'increase(ctprofd_render_failures_total{%s}[%s]) > 0' % [sel, c.failuresWindow],
            annotations: {
              summary: 'ctprofd on {{ $labels.instance }} serves scrapes with samples left out',
              description: '{{ $value | humanize }} scrapes of ctprofd on {{ $labels.instance }} in the last %s failed to render some samples and were served without them (ctprofd_render_dropped_samples_total counts them; the journal says why).' % minutes(c.failuresWindow),
            },
          }),
        ],
      },
    ],
  },
}
