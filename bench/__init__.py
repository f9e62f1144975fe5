"""taskomatic's benchmark suite: workloads, baselines, measurements, reports (``python -m bench.run``)."""
