// What a user of the ctprofd mixin sets. Override in their own jsonnet:
//
//   (import 'ctprofd/packaging/mixin/mixin.libsonnet') + {
//     _config+:: { ctprofdSelector: 'job="node-agents"', runbookURLBase: 'https://wiki/ctprofd' },
//   }
{
  _config+:: {
    // The label matchers of ctprofd's scrape job, in every rule and dashboard query. The
    // shipped scrape configurations and the PodMonitor (its jobLabel) all make job="ctprofd".
    ctprofdSelector: 'job="ctprofd"',

    // Where the runbooks (docs/alerting.md) are published; every alert's runbook_url is this
    // plus "#<alert name in lower case>". The default is where scripts/install-service.sh
    // installs the page on a ctprofd host (the Debian package's copy of this file names
    // /usr/share/doc/ctprofd/alerting.md, where it installs the page); point it at a URL the
    // people paged can open.
    runbookURLBase: 'file:///opt/ctprofd/share/doc/ctprofd/alerting.md',

    // ctprofd's optional series labels that, like pid, name less than a unit: the
    // instance_unit rules sum them away (export/labels.py has them all).
    containerLabels: ['container_id', 'pod_uid'],

    // Labels that together name one ctprofd target: alerts that join two ctprofd metrics
    // match on them. Add your cluster label when one Prometheus sees several clusters.
    instanceLabels: ['instance', 'job'],

    // The dashboard's cluster variable reads this label; shown only when showMultiCluster.
    clusterLabel: 'cluster',
    showMultiCluster: false,

    // Thresholds and windows of the alerts (docs/alerting.md says how to tune each).
    leakBytesPerHour: '16 * 1024 * 1024',  // CtprofdMemoryLeakSuspected: growth of the hourly floor
    downFor: '5m',
    privilegeFor: '10m',
    blindFor: '10m',
    probeFailuresWindow: '15m',
    snapshotSlowRatio: 0.8,  // CtprofdSnapshotSlow: p90 duration / interval
    seriesDroppedFor: '15m',
    failuresWindow: '15m',  // CtprofdSnapshotFailures, CtprofdStateNotWritten, CtprofdRenderFailures
    // CtprofdAllocatorFragmentation: resident / allocated above the ratio AND resident -
    // allocated above the waste, both for fragmentationFor
    fragmentationRatio: 1.5,
    fragmentationWasteBytes: 512 * 1024 * 1024,
    fragmentationFor: '60m',

    severity: 'warning',

    // The dashboard.
    dashboardUid: 'ctprofd',
    dashboardTags: ['ctprofd', 'jemalloc', 'memory'],
  },
}
