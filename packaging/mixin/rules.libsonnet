// Recording rules. Names follow level:metric:operations; the two levels are
//   instance_group  every series label except `pid`: one series per group of processes
//                   (by default comm and unit) on each ctprofd instance;
//   instance_unit   one series per systemd unit on each ctprofd instance ("" outside units).
// They aggregate with `without` so that target labels (instance, job, and any labels added
// by relabelling) and whichever optional series labels ctprofd is configured with survive.
// The per-group live bytes are recorded in ctprofd.leak (alerts.libsonnet), beside the alert
// that reads them.
{
  prometheusRules+:: {
    local c = $._config,
    // The series labels that identify a process or a group within a unit.
    local perProcess = std.join(', ', ['pid', 'comm', 'exe', 'user'] + c.containerLabels),
    groups+: [
      {
        name: 'ctprofd.rules',
        rules: [
          // Allocation and free rates (bytes per second).
          {
            record: 'instance_group:ctprofd_allocated_bytes:rate5m',
            expr: 'sum without (pid) (rate(ctprofd_allocated_bytes_total{%s}[5m]))' % c.ctprofdSelector,
          },
          {
            record: 'instance_group:ctprofd_deallocated_bytes:rate5m',
            expr: 'sum without (pid) (rate(ctprofd_deallocated_bytes_total{%s}[5m]))' % c.ctprofdSelector,
          },
          {
            record: 'instance_unit:ctprofd_allocated_bytes:rate5m',
            expr: 'sum without (%s) (rate(ctprofd_allocated_bytes_total{%s}[5m]))' % [perProcess, c.ctprofdSelector],
          },
          {
            record: 'instance_unit:ctprofd_deallocated_bytes:rate5m',
            expr: 'sum without (%s) (rate(ctprofd_deallocated_bytes_total{%s}[5m]))' % [perProcess, c.ctprofdSelector],
          },
          // Live bytes (allocated - deallocated of the processes alive now).
          {
            record: 'instance_unit:ctprofd_live_bytes:sum',
            expr: 'sum without (%s) (ctprofd_live_bytes{%s})' % [perProcess, c.ctprofdSelector],
          },
        ],
      },
    ],
  },
}
