"""What the operator writes: the daemon's YAML configuration, with command-line overrides and
the process selection (`settings`), the exporter-toolkit web configuration (`web`), and the
embedded default (default.yaml, a link to config/ctprofd.yaml). Every error is one line
naming the file and key.

May import: procfs, files."""
