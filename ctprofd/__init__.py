"""ctprofd: exact per-process jemalloc allocation counters for Prometheus."""

__version__ = "0.1.0"
