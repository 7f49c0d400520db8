"""Stage 3, reading the counters out of the targets: the thread pointer once per thread
(`ptrace`), the counters with process_vm_readv (`memory`), per-thread state and counters that
never go backwards (`threads`), process totals from jemalloc's arena statistics
(`arena_stats`) and across ctprofd restarts (`retained`), and one pass over the host that
ties the stages together into a Snapshot (`capture`).

May import: resolve, procfs, files, report."""
