"""Synthetic workloads: data streams that drive ekko's tools, benchmarks and tests."""
