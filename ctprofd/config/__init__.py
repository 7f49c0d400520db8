"""What the operator writes: the daemon's YAML configuration, with command-line overrides and
the process selection (`settings`), the exporter-toolkit web configuration (`web`), and the
embedded default (default.yaml, a link to config/ctprofd.yaml). Every error is one line
naming the file and key.

It builds what the stages it configures define (the server's WebConfig, the label names).

May import: export, procfs, files."""
