// The Grafana dashboard, rendered to packaging/grafana/ctprofd-dashboard.json by
// scripts/mixin.py. Every query selects ctprofd's job (_config.ctprofdSelector) and the
// dashboard's cluster, job and instance variables (`sel`); docs/alerting.md describes the
// panels. The panels are Grafana's own JSON model, so that an edit made in Grafana can be
// carried over by hand.
{
  local c = $._config,
  local jobSel = '%s, %s=~"$cluster"' % [c.ctprofdSelector, c.clusterLabel],
  local s = {
    jobSel: jobSel + ', job=~"$job"',
    sel: self.jobSel + ', instance=~"$instance"',
  },
  local datasource = { type: 'prometheus', uid: '${datasource}' },
  local variable(name, label, query, allValue, hide=0) = {
    allValue: allValue,
    current: {},
    datasource: datasource,
    definition: query,
    hide: hide,
    includeAll: true,
    label: label,
    multi: true,
    name: name,
    options: [],
    query: { qryType: 1, query: query, refId: 'PrometheusVariableQueryEditor-VariableQuery' },
    refresh: 2,
    regex: '',
    skipUrlSync: false,
    sort: 1,
    type: 'query',
  },

  grafanaDashboards+:: {
    'ctprofd-dashboard.json': {
      __inputs: [
        {
          name: 'DS_PROMETHEUS',
          label: 'Prometheus',
          description: 'The Prometheus that scrapes ctprofd',
          type: 'datasource',
          pluginId: 'prometheus',
          pluginName: 'Prometheus',
        },
      ],
      __elements: {},
      __requires: [
        {
          type: 'grafana',
          id: 'grafana',
          name: 'Grafana',
          version: '11.6.0',
        },
        {
          type: 'datasource',
          id: 'prometheus',
          name: 'Prometheus',
          version: '1.0.0',
        },
        {
          type: 'panel',
          id: 'stat',
          name: 'Stat',
          version: '',
        },
        {
          type: 'panel',
          id: 'table',
          name: 'Table',
          version: '',
        },
        {
          type: 'panel',
          id: 'timeseries',
          name: 'Time series',
          version: '',
        },
      ],
      annotations: {
        list: [
          {
            builtIn: 1,
            datasource: {
              type: 'grafana',
              uid: '-- Grafana --',
            },
            enable: true,
            hide: true,
            iconColor: 'rgba(0, 211, 255, 1)',
            name: 'Annotations & Alerts',
            type: 'dashboard',
          },
          {
            datasource: {
              type: 'prometheus',
              uid: '${datasource}',
            },
            enable: true,
            hide: false,
            iconColor: 'red',
            expr: 'ALERTS{alertname=~"Ctprofd.+", alertstate="firing", %(sel)s}' % s,
            name: 'ctprofd alerts',
            step: '1m',
            tagKeys: 'alertname,instance',
            textFormat: '{{comm}} {{unit}} {{tag}} {{reason}}',
            titleFormat: '{{alertname}}',
            useValueForTime: false,
          },
        ],
      },
      description: "Per-process jemalloc allocation counters exported by ctprofd: allocation and free rates, live bytes per process and unit, the probe summary, and ctprofd's own health.",
      editable: true,
      fiscalYearStartMonth: 0,
      graphTooltip: 1,
      id: null,
      links: [],
      panels: [
        {
          collapsed: false,
          gridPos: {
            h: 1,
            w: 24,
            x: 0,
            y: 0,
          },
          id: 1,
          panels: [],
          title: 'Overview',
          type: 'row',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "jemalloc processes whose counters were read in the last snapshot (selected instances, units and processes), and how many of them have totals from per-thread sums only (no arena statistics: threads that exited unseen and frees made after a thread's last read are missing from those).",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 0,
            y: 1,
          },
          id: 2,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_processes{%(sel)s, unit=~"$unit", comm=~"$comm"})' % s,
              legendFormat: 'processes',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_processes{%(sel)s, unit=~"$unit", comm=~"$comm"}) - sum(ctprofd_arena_processes{%(sel)s, unit=~"$unit", comm=~"$comm"})' % s,
              legendFormat: 'per-thread sums only',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Processes measured',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Threads of those processes read in the last snapshot.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 4,
            y: 1,
          },
          id: 3,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_threads{%(sel)s, unit=~"$unit", comm=~"$comm"})' % s,
              legendFormat: 'threads',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Threads measured',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Allocated minus freed bytes of the selected processes alive now.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'bytes',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 8,
            y: 1,
          },
          id: 4,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_live_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"})' % s,
              legendFormat: 'live',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Live bytes',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Age of the last completed snapshot when it was scraped (worst instance). Red above 45 s: three intervals at the default 15 s interval (CtprofdStale).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                  {
                    color: 'orange',
                    value: 30,
                  },
                  {
                    color: 'red',
                    value: 45,
                  },
                ],
              },
              unit: 's',
              decimals: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 12,
            y: 1,
          },
          id: 5,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'max(timestamp(ctprofd_last_snapshot_timestamp_seconds{%(sel)s}) - ctprofd_last_snapshot_timestamp_seconds{%(sel)s})' % s,
              legendFormat: 'age',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Last snapshot age',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Series left out of the output because of max_series. Above 0, raise max_series or drop the pid label to aggregate processes.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                  {
                    color: 'red',
                    value: 1,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 16,
            y: 1,
          },
          id: 6,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_series_dropped{%(sel)s})' % s,
              legendFormat: 'dropped',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Series dropped',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'ctprofd version per instance (ctprofd_build_info).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 20,
            y: 1,
          },
          id: 7,
          options: {
            colorMode: 'value',
            graphMode: 'none',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'name',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'ctprofd_build_info{%(sel)s}' % s,
              legendFormat: '{{version}}',
              range: false,
              instant: true,
              refId: 'A',
            },
          ],
          title: 'Version',
          type: 'stat',
        },
        {
          collapsed: false,
          gridPos: {
            h: 1,
            w: 24,
            x: 0,
            y: 5,
          },
          id: 8,
          panels: [],
          title: 'Probe',
          type: 'row',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: '/proc entries seen in the last snapshot, minus ctprofd itself (ctprofd_probe_tgids_walked).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 0,
            y: 6,
          },
          id: 9,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_tgids_walked{%(sel)s})' % s,
              legendFormat: 'walked',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Processes walked',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Processes whose jemalloc counters were located in the last snapshot (ctprofd_probe_jemalloc_detected).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 4,
            y: 6,
          },
          id: 10,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_jemalloc_detected{%(sel)s})' % s,
              legendFormat: 'detected',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'jemalloc detected',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Per-thread reads that returned a counter pair in the last snapshot (ctprofd_probe_probed_ok).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 8,
            y: 6,
          },
          id: 11,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_probed_ok{%(sel)s})' % s,
              legendFormat: 'probed OK',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Threads probed OK',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Actionable attach or probe failures in the last snapshot (ctprofd_probe_failed). See the dominant failure and the failures by tag.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                  {
                    color: 'red',
                    value: 1,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 12,
            y: 6,
          },
          id: 12,
          options: {
            colorMode: 'value',
            graphMode: 'area',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_failed{%(sel)s})' % s,
              legendFormat: 'failed',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Failed',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Whether ptrace-seize and ptrace-interrupt make up at least half of the failures (ctprofd_probe_privilege_dominant). If so: setcap cap_sys_ptrace+eip $(command -v ctprofd), or run as root, or sysctl kernel.yama.ptrace_scope=0.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [
                {
                  type: 'value',
                  options: {
                    "0": {
                      index: 0,
                      text: 'OK',
                      color: 'green',
                    },
                    "1": {
                      index: 1,
                      text: 'missing',
                      color: 'red',
                    },
                  },
                },
              ],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                  {
                    color: 'red',
                    value: 1,
                  },
                ],
              },
              unit: 'short',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 16,
            y: 6,
          },
          id: 13,
          options: {
            colorMode: 'value',
            graphMode: 'none',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'auto',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'max(ctprofd_probe_privilege_dominant{%(sel)s})' % s,
              legendFormat: 'privilege dominant',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'ptrace privilege',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'The most frequent actionable failure tag of the last snapshot, per instance (ctprofd_probe_dominant_failure_info). None when nothing failed.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'red',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              noValue: 'none',
            },
            overrides: [],
          },
          gridPos: {
            h: 4,
            w: 4,
            x: 20,
            y: 6,
          },
          id: 14,
          options: {
            colorMode: 'value',
            graphMode: 'none',
            justifyMode: 'auto',
            orientation: 'auto',
            reduceOptions: {
              calcs: ['lastNotNull'],
              fields: '',
              values: false,
            },
            showPercentChange: false,
            textMode: 'name',
            wideLayout: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'ctprofd_probe_dominant_failure_info{%(sel)s}' % s,
              legendFormat: '{{tag}}',
              range: false,
              instant: true,
              refId: 'A',
            },
          ],
          title: 'Dominant failure',
          type: 'stat',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'The probe summary of each snapshot over time.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [
              {
                matcher: {
                  id: 'byName',
                  options: 'failed',
                },
                properties: [
                  {
                    id: 'color',
                    value: {
                      fixedColor: 'red',
                      mode: 'fixed',
                    },
                  },
                ],
              },
            ],
          },
          gridPos: {
            h: 8,
            w: 12,
            x: 0,
            y: 10,
          },
          id: 15,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_tgids_walked{%(sel)s})' % s,
              legendFormat: 'processes walked',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_jemalloc_detected{%(sel)s})' % s,
              legendFormat: 'jemalloc detected',
              range: true,
              instant: false,
              refId: 'B',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_probed_ok{%(sel)s})' % s,
              legendFormat: 'threads probed OK',
              range: true,
              instant: false,
              refId: 'C',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_probe_failed{%(sel)s})' % s,
              legendFormat: 'failed',
              range: true,
              instant: false,
              refId: 'D',
            },
          ],
          title: 'Probe outcome',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Failures of the last snapshot per tag, actionable or not (ctprofd_probe_failures). jemalloc-not-found and readlink-failure are not actionable; see docs/alerting.md for the others.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'bars',
                fillOpacity: 80,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'normal',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 8,
            w: 12,
            x: 12,
            y: 10,
          },
          id: 16,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (tag) (ctprofd_probe_failures{%(sel)s})' % s,
              legendFormat: '{{tag}}',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Failures by tag',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'ctprofd_probe_dominant_failure_info: one row per instance with failures in its last snapshot.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              custom: {
                align: 'auto',
                cellOptions: {
                  type: 'auto',
                },
                inspect: false,
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
            },
            overrides: [],
          },
          gridPos: {
            h: 5,
            w: 12,
            x: 0,
            y: 18,
          },
          id: 17,
          options: {
            cellHeight: 'sm',
            footer: {
              countRows: false,
              fields: '',
              reducer: ['sum'],
              show: false,
            },
            showHeader: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'ctprofd_probe_dominant_failure_info{%(sel)s}' % s,
              legendFormat: '',
              range: false,
              instant: true,
              refId: 'A',
              format: 'table',
            },
          ],
          title: 'Dominant failure per instance',
          type: 'table',
          transformations: [
            {
              id: 'organize',
              options: {
                excludeByName: {
                  Time: true,
                  Value: true,
                  __name__: true,
                  job: true,
                },
                indexByName: {},
                renameByName: {
                  instance: 'Instance',
                  tag: 'Dominant failure',
                },
              },
            },
          ],
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'ctprofd_probe_failures of the last snapshot, per instance and tag.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'thresholds',
              },
              custom: {
                align: 'auto',
                cellOptions: {
                  type: 'auto',
                },
                inspect: false,
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
            },
            overrides: [],
          },
          gridPos: {
            h: 5,
            w: 12,
            x: 12,
            y: 18,
          },
          id: 18,
          options: {
            cellHeight: 'sm',
            footer: {
              countRows: false,
              fields: '',
              reducer: ['sum'],
              show: false,
            },
            showHeader: true,
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'ctprofd_probe_failures{%(sel)s}' % s,
              legendFormat: '',
              range: false,
              instant: true,
              refId: 'A',
              format: 'table',
            },
          ],
          title: 'Probe failures per instance and tag',
          type: 'table',
          transformations: [
            {
              id: 'organize',
              options: {
                excludeByName: {
                  Time: true,
                  __name__: true,
                  job: true,
                },
                indexByName: {},
                renameByName: {
                  instance: 'Instance',
                  tag: 'Tag',
                  Value: 'Failures',
                },
              },
            },
          ],
        },
        {
          collapsed: false,
          gridPos: {
            h: 1,
            w: 24,
            x: 0,
            y: 23,
          },
          id: 19,
          panels: [],
          title: 'Allocation',
          type: 'row',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Bytes allocated per second by each process (ctprofd_allocated_bytes_total).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'Bps',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 0,
            y: 24,
          },
          id: 20,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(20, sum by (instance, pid, comm) (rate(ctprofd_allocated_bytes_total{%(sel)s, unit=~"$unit", comm=~"$comm"}[$__rate_interval])))' % s,
              legendFormat: '{{comm}} {{pid}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Allocation rate per process (top 20)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Bytes freed per second by each process (ctprofd_deallocated_bytes_total).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'Bps',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 12,
            y: 24,
          },
          id: 21,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(20, sum by (instance, pid, comm) (rate(ctprofd_deallocated_bytes_total{%(sel)s, unit=~"$unit", comm=~"$comm"}[$__rate_interval])))' % s,
              legendFormat: '{{comm}} {{pid}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Free rate per process (top 20)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Bytes allocated (up) and freed (down) per second per systemd unit.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'Bps',
            },
            overrides: [
              {
                matcher: {
                  id: 'byFrameRefID',
                  options: 'B',
                },
                properties: [
                  {
                    id: 'custom.transform',
                    value: 'negative-Y',
                  },
                ],
              },
            ],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 0,
            y: 33,
          },
          id: 22,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'label_replace(sum by (instance, unit) (rate(ctprofd_allocated_bytes_total{%(sel)s, unit=~"$unit", comm=~"$comm"}[$__rate_interval])), "unit", "(no unit)", "unit", "")' % s,
              legendFormat: '{{unit}} allocated ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'label_replace(sum by (instance, unit) (rate(ctprofd_deallocated_bytes_total{%(sel)s, unit=~"$unit", comm=~"$comm"}[$__rate_interval])), "unit", "(no unit)", "unit", "")' % s,
              legendFormat: '{{unit}} freed ({{instance}})',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Allocation and free rate per unit',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Allocated minus freed bytes per second per unit: a lasting positive value means growing live memory.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'Bps',
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 12,
            y: 33,
          },
          id: 23,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'label_replace(sum by (instance, unit) (rate(ctprofd_allocated_bytes_total{%(sel)s, unit=~"$unit", comm=~"$comm"}[$__rate_interval])) - sum by (instance, unit) (rate(ctprofd_deallocated_bytes_total{%(sel)s, unit=~"$unit", comm=~"$comm"}[$__rate_interval])), "unit", "(no unit)", "unit", "")' % s,
              legendFormat: '{{unit}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Net allocation rate per unit',
          type: 'timeseries',
        },
        {
          collapsed: false,
          gridPos: {
            h: 1,
            w: 24,
            x: 0,
            y: 42,
          },
          id: 24,
          panels: [],
          title: 'Live bytes',
          type: 'row',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Allocated minus freed bytes of each process alive now (ctprofd_live_bytes).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'bytes',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 0,
            y: 43,
          },
          id: 25,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(20, sum by (instance, pid, comm) (ctprofd_live_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Live bytes per process (top 20)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Live bytes per systemd unit, summed over its processes alive now. It drops when a process exits and does not drift across restarts: the leak signal (CtprofdMemoryLeakSuspected).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'bytes',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 12,
            y: 43,
          },
          id: 26,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'label_replace(sum by (instance, unit) (ctprofd_live_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}), "unit", "(no unit)", "unit", "")' % s,
              legendFormat: '{{unit}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Live bytes per unit',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'jemalloc processes read in the last snapshot per unit (ctprofd_processes).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 7,
            w: 12,
            x: 0,
            y: 52,
          },
          id: 27,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'label_replace(sum by (instance, unit) (ctprofd_processes{%(sel)s, unit=~"$unit", comm=~"$comm"}), "unit", "(no unit)", "unit", "")' % s,
              legendFormat: '{{unit}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Processes per unit',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Threads read in the last snapshot per unit (ctprofd_threads).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 7,
            w: 12,
            x: 12,
            y: 52,
          },
          id: 28,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'label_replace(sum by (instance, unit) (ctprofd_threads{%(sel)s, unit=~"$unit", comm=~"$comm"}), "unit", "(no unit)", "unit", "")' % s,
              legendFormat: '{{unit}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Threads per unit',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "How fast each process's live bytes grew over the last hour (deriv of ctprofd_live_bytes over 1h, per second): the steadiest growers first. A leak shows as a line that stays above zero; see the CtprofdMemoryLeakSuspected alert.",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'Bps',
            },
            overrides: [],
          },
          gridPos: {
            h: 8,
            w: 12,
            x: 0,
            y: 59,
          },
          id: 35,
          options: {
            legend: {
              calcs: ['lastNotNull', 'mean'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(10, sum by (instance, pid, comm) (deriv(ctprofd_live_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}[1h])))' % s,
              legendFormat: '{{comm}} {{pid}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Live bytes growth per process (top 10, over the last hour)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "Processes whose totals come from jemalloc's arena statistics (every byte, also of threads that exited between snapshots) and those whose totals are per-thread sums, totals_source \"threads\" (not exact: bytes of threads that started and ended between two snapshots are missing, and so are frees a thread made after its last read, so their live bytes rise with thread churn and read high; never negative): ctprofd_arena_processes of ctprofd_processes. CtprofdMemoryLeakSuspected leaves a group with any per-thread-sum process out.",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 30,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'normal',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 8,
            w: 12,
            x: 12,
            y: 59,
          },
          id: 36,
          options: {
            legend: {
              calcs: ['lastNotNull'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_arena_processes{%(sel)s, unit=~"$unit", comm=~"$comm"})' % s,
              legendFormat: 'arena statistics',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum(ctprofd_processes{%(sel)s, unit=~"$unit", comm=~"$comm"}) - sum(ctprofd_arena_processes{%(sel)s, unit=~"$unit", comm=~"$comm"})' % s,
              legendFormat: 'per-thread sums',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Where the process totals come from',
          type: 'timeseries',
        },
        {
          collapsed: false,
          gridPos: {
            h: 1,
            w: 24,
            x: 0,
            y: 67,
          },
          id: 37,
          panels: [],
          title: 'Allocator health',
          type: 'row',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "jemalloc's own figures for the five processes (series) holding the most resident memory, each line above the one before: allocated (stats.allocated: what the program holds, thread caches included) <= active (stats.active: pages of extents in use; the gap is fragmentation inside slabs) <= resident (stats.resident: pages backed by memory; the gap is mostly dirty pages waiting for decay) <= mapped (stats.mapped). Absent for a process whose arena statistics ctprofd could not read. docs/allocator.md says what each figure means.",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'bytes',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 0,
            y: 68,
          },
          id: 38,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance, pid, comm) (ctprofd_allocator_allocated_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) and on (instance, pid, comm) topk(5, sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} allocated',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance, pid, comm) (ctprofd_allocator_active_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) and on (instance, pid, comm) topk(5, sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} active',
              range: true,
              instant: false,
              refId: 'B',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) and on (instance, pid, comm) topk(5, sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} resident',
              range: true,
              instant: false,
              refId: 'C',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance, pid, comm) (ctprofd_allocator_mapped_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) and on (instance, pid, comm) topk(5, sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} mapped',
              range: true,
              instant: false,
              refId: 'D',
            },
          ],
          title: 'Allocator: allocated → active → resident → mapped (top 5 by resident)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "resident - allocated: what jemalloc holds in memory beyond what the program allocated (fragmentation and dirty pages), for the ten processes (series) wasting the most. CtprofdAllocatorFragmentation fires on a group holding more than 1.5 times its allocated bytes and more than 512 MiB beyond them for an hour; its runbook says what to tune.",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'bytes',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 12,
            y: 68,
          },
          id: 39,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(10, sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) - sum by (instance, pid, comm) (ctprofd_allocator_allocated_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
          ],
          title: 'Top processes by wasted bytes (resident − allocated)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "Per process (series): active / allocated (fragmentation inside slabs; redis calls it allocator_frag_ratio) and resident / allocated (everything the allocator holds in memory per byte allocated). 1 is no waste. A high ratio of a small heap matters little: read it with the wasted bytes beside it.",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'none',
              min: 1,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 0,
            y: 77,
          },
          id: 40,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(10, sum by (instance, pid, comm) (ctprofd_allocator_resident_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) / sum by (instance, pid, comm) (ctprofd_allocator_allocated_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"} > 0))' % s,
              legendFormat: '{{comm}} {{pid}} resident / allocated',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(10, sum by (instance, pid, comm) (ctprofd_allocator_active_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}) / sum by (instance, pid, comm) (ctprofd_allocator_allocated_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"} > 0))' % s,
              legendFormat: '{{comm}} {{pid}} active / allocated',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Fragmentation ratios per process (top 10)',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: "Freed pages jemalloc has not purged yet: dirty (still resident; purged after dirty_decay_ms, without background threads only when the program calls into jemalloc) and muzzy (given back lazily with MADV_FREE; purged for good after muzzy_decay_ms).",
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'bytes',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 9,
            w: 12,
            x: 12,
            y: 77,
          },
          id: 41,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(10, sum by (instance, pid, comm) (ctprofd_allocator_dirty_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} dirty',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'topk(10, sum by (instance, pid, comm) (ctprofd_allocator_muzzy_bytes{%(sel)s, unit=~"$unit", comm=~"$comm"}))' % s,
              legendFormat: '{{comm}} {{pid}} muzzy',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Dirty and muzzy pages per process (top 10)',
          type: 'timeseries',
        },
        {
          collapsed: false,
          gridPos: {
            h: 1,
            w: 24,
            x: 0,
            y: 86,
          },
          id: 29,
          panels: [],
          title: 'ctprofd',
          type: 'row',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Quantiles of the snapshot duration, with the configured interval for reference (CtprofdSnapshotSlow fires when p90 exceeds 80% of it).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 's',
              min: 0,
            },
            overrides: [
              {
                matcher: {
                  id: 'byFrameRefID',
                  options: 'D',
                },
                properties: [
                  {
                    id: 'custom.lineStyle',
                    value: {
                      dash: [10, 10],
                      fill: 'dash',
                    },
                  },
                  {
                    id: 'color',
                    value: {
                      fixedColor: 'red',
                      mode: 'fixed',
                    },
                  },
                ],
              },
            ],
          },
          gridPos: {
            h: 8,
            w: 12,
            x: 0,
            y: 87,
          },
          id: 30,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'histogram_quantile(0.5, sum by (instance, le) (rate(ctprofd_snapshot_duration_seconds_bucket{%(sel)s}[$__rate_interval])))' % s,
              legendFormat: 'p50 ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'histogram_quantile(0.9, sum by (instance, le) (rate(ctprofd_snapshot_duration_seconds_bucket{%(sel)s}[$__rate_interval])))' % s,
              legendFormat: 'p90 ({{instance}})',
              range: true,
              instant: false,
              refId: 'B',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'histogram_quantile(0.99, sum by (instance, le) (rate(ctprofd_snapshot_duration_seconds_bucket{%(sel)s}[$__rate_interval])))' % s,
              legendFormat: 'p99 ({{instance}})',
              range: true,
              instant: false,
              refId: 'C',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'ctprofd_snapshot_interval_seconds{%(sel)s}' % s,
              legendFormat: 'interval ({{instance}})',
              range: true,
              instant: false,
              refId: 'D',
            },
          ],
          title: 'Snapshot duration',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'How long target threads were stopped under ptrace to read their thread pointer (each thread is stopped once in its life).',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 's',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 8,
            w: 12,
            x: 12,
            y: 87,
          },
          id: 31,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'histogram_quantile(0.5, sum by (instance, le) (rate(ctprofd_thread_stop_seconds_bucket{%(sel)s}[$__rate_interval])))' % s,
              legendFormat: 'p50 ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'histogram_quantile(0.9, sum by (instance, le) (rate(ctprofd_thread_stop_seconds_bucket{%(sel)s}[$__rate_interval])))' % s,
              legendFormat: 'p90 ({{instance}})',
              range: true,
              instant: false,
              refId: 'B',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'histogram_quantile(0.99, sum by (instance, le) (rate(ctprofd_thread_stop_seconds_bucket{%(sel)s}[$__rate_interval])))' % s,
              legendFormat: 'p99 ({{instance}})',
              range: true,
              instant: false,
              refId: 'C',
            },
          ],
          title: 'Thread stop time',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Snapshots completed and scheduled snapshots skipped because the previous one was still running, per rate interval.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [
              {
                matcher: {
                  id: 'byFrameRefID',
                  options: 'B',
                },
                properties: [
                  {
                    id: 'color',
                    value: {
                      fixedColor: 'red',
                      mode: 'fixed',
                    },
                  },
                  {
                    id: 'custom.drawStyle',
                    value: 'bars',
                  },
                  {
                    id: 'custom.fillOpacity',
                    value: 80,
                  },
                ],
              },
            ],
          },
          gridPos: {
            h: 8,
            w: 8,
            x: 0,
            y: 95,
          },
          id: 32,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance) (increase(ctprofd_snapshots_total{%(sel)s}[$__rate_interval]))' % s,
              legendFormat: 'snapshots ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance) (increase(ctprofd_snapshot_overruns_total{%(sel)s}[$__rate_interval]))' % s,
              legendFormat: 'overruns ({{instance}})',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Snapshots and overruns',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Layout lookups answered by the offset cache (hits) and those that had to read DWARF (misses), per second.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'ops',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 8,
            w: 8,
            x: 8,
            y: 95,
          },
          id: 33,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance) (rate(ctprofd_offset_cache_hits_total{%(sel)s}[$__rate_interval]))' % s,
              legendFormat: 'hits ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance) (rate(ctprofd_offset_cache_misses_total{%(sel)s}[$__rate_interval]))' % s,
              legendFormat: 'misses ({{instance}})',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Offset cache lookups',
          type: 'timeseries',
        },
        {
          datasource: {
            type: 'prometheus',
            uid: '${datasource}',
          },
          description: 'Layouts held in the offset cache, and series over the max_series cap.',
          fieldConfig: {
            defaults: {
              color: {
                mode: 'palette-classic',
              },
              custom: {
                axisBorderShow: false,
                axisCenteredZero: false,
                axisColorMode: 'text',
                axisLabel: '',
                axisPlacement: 'auto',
                barAlignment: 0,
                drawStyle: 'line',
                fillOpacity: 10,
                gradientMode: 'none',
                hideFrom: {
                  legend: false,
                  tooltip: false,
                  viz: false,
                },
                insertNulls: false,
                lineInterpolation: 'linear',
                lineWidth: 1,
                pointSize: 4,
                scaleDistribution: {
                  type: 'linear',
                },
                showPoints: 'never',
                spanNulls: false,
                stacking: {
                  group: 'A',
                  mode: 'none',
                },
                thresholdsStyle: {
                  mode: 'off',
                },
              },
              mappings: [],
              thresholds: {
                mode: 'absolute',
                steps: [
                  {
                    color: 'green',
                    value: null,
                  },
                ],
              },
              unit: 'short',
              min: 0,
            },
            overrides: [],
          },
          gridPos: {
            h: 8,
            w: 8,
            x: 16,
            y: 95,
          },
          id: 34,
          options: {
            legend: {
              calcs: ['lastNotNull', 'max'],
              displayMode: 'table',
              placement: 'bottom',
              showLegend: true,
            },
            tooltip: {
              mode: 'multi',
              sort: 'desc',
            },
          },
          targets: [
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance) (ctprofd_offset_cache_entries{%(sel)s})' % s,
              legendFormat: 'cache entries ({{instance}})',
              range: true,
              instant: false,
              refId: 'A',
            },
            {
              datasource: {
                type: 'prometheus',
                uid: '${datasource}',
              },
              editorMode: 'code',
              expr: 'sum by (instance) (ctprofd_series_dropped{%(sel)s})' % s,
              legendFormat: 'series dropped ({{instance}})',
              range: true,
              instant: false,
              refId: 'B',
            },
          ],
          title: 'Offset cache entries and dropped series',
          type: 'timeseries',
        },
      ],
      refresh: '1m',
      schemaVersion: 41,  // Grafana 11.6, the version of the grafana-foundation-sdk models the tests check it with
      tags: c.dashboardTags,
      time: {
        from: 'now-6h',
        to: 'now',
      },
      timepicker: {},
      timezone: '',
      title: 'ctprofd',
      uid: c.dashboardUid,
      version: 1,
      weekStart: '',
      templating: {
        list: [
          {
            current: {
              selected: false,
              text: '${DS_PROMETHEUS}',
              value: '${DS_PROMETHEUS}',
            },
            hide: 0,
            includeAll: false,
            label: 'Data source',
            multi: false,
            name: 'datasource',
            options: [],
            query: 'prometheus',
            refresh: 1,
            regex: '',
            skipUrlSync: false,
            type: 'datasource',
          },
          // cluster: hidden unless _config.showMultiCluster; "All" also matches series without it.
          variable('cluster', 'Cluster', 'label_values(ctprofd_build_info{%s}, %s)' % [c.ctprofdSelector, c.clusterLabel], '.*', if c.showMultiCluster then 0 else 2),
          variable('job', 'Job', 'label_values(ctprofd_build_info{%s}, job)' % jobSel, '.+'),
          variable('instance', 'Instance', 'label_values(ctprofd_build_info{%(jobSel)s}, instance)' % s, '.+'),
          variable('unit', 'Unit', 'label_values(ctprofd_live_bytes{%(sel)s}, unit)' % s, '.*'),
          variable('comm', 'Process', 'label_values(ctprofd_live_bytes{%(sel)s, unit=~"$unit"}, comm)' % s, '.*'),
        ],
      },
    },
  },
}
