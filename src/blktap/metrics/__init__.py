"""Metrics: per-request latency histograms, and the Prometheus text exposition of what a
tapdisk counts (``blktap exporter``, ``blktap serve --metrics``; docs/operations.md)."""

from blktap.metrics.latency import BOUNDS, LatencyHistogram, OpLatency

__all__ = ["BOUNDS", "LatencyHistogram", "OpLatency"]
