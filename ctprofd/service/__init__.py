"""Stage 5, the long-running daemon: snapshots on a fixed-rate schedule beside the HTTP
endpoint, signals and reload (`daemon`), systemd notification (`notify`), health for
orchestrators (`health`) and where the log goes (`logs`).

May import: probe, export, config, resolve, procfs, files, report."""
