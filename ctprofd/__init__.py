"""ctprofd: exact per-process jemalloc allocation counters for Prometheus.

The packages, in the order the data flows:

    procfs    1  reading /proc: processes, threads, identity, maps, ctprofd's capabilities
    resolve   2  from a process's binary to where jemalloc keeps its counters
    probe     3  reading the counters (ptrace once per thread, then memory reads only) and
                 one pass over the host, which makes a Snapshot
    export    4  series across snapshots and the Prometheus endpoint
    service   5  the daemon: schedule, signals, reload, systemd, logs
    cli          the command line (its flags are overrides of the configuration)

and beside them:

    report       what a snapshot reports: failure tags, the probe summary, samples
    config       what the operator writes: the YAML and web configurations
    files        how ctprofd opens and writes files

Imports point one way, from cli down to procfs. Each package's docstring says what it owns
and what it may import; tests/unit/test_layering.py holds every module to it.
"""

__version__ = "0.1.0"
