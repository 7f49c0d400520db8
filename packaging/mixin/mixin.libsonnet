// The ctprofd monitoring mixin: Prometheus recording rules and alerts, and the Grafana
// dashboard, from one configuration (config.libsonnet's _config). scripts/mixin.py renders
// packaging/prometheus/ctprofd-rules.yml, packaging/grafana/ctprofd-dashboard.json, the
// Grafana-managed alerts and packaging/kubernetes/ctprofd-prometheusrule.yaml from it.
(import 'config.libsonnet') +
(import 'rules.libsonnet') +
(import 'alerts.libsonnet') +
(import 'dashboards/ctprofd.libsonnet')
