"""Stage 4, what Prometheus scrapes: series state across snapshots, with counters that never
go backwards, the series cap and the label set (`aggregate`, `labels`), the metrics
(`collector`, `revision`), rendering that one bad sample cannot empty (`render`), and the
HTTP endpoint (`server`).

A new label dimension goes in `aggregate` (`Aggregator.series_key`: its value per process)
and in the configuration's LABEL_NAMES (config.settings).

May import: config, report."""
