"""Benchmarks for carafe_kernels: ``python -m benchmarks.carafe`` (the CLI, see its --help), the
pytest-benchmark suite in ``benchmarks/test_bench_carafe.py``, shape presets in ``benchmarks/shapes.py``
and committed results under ``benchmarks/results/``."""
