"""Stage 5, the long-running daemon: snapshots on a fixed-rate schedule beside the HTTP
endpoint, signals, reload, systemd notification (`daemon`), health for orchestrators
(`health`) and where the log goes (`logs`).

May import: probe, export, config, resolve, procfs, files, report."""
