"""Stage 4, what Prometheus scrapes: series state across snapshots, with counters that never
go backwards, the series cap and the label set (`aggregate`, `labels`), the metrics
(`collector`, `revision`), rendering that one bad sample cannot empty (`render`), and the
HTTP endpoint with its TLS and auth settings (`server`).

A new label dimension is one entry in `labels.LABELS`.

May import: report."""
