"""Speed and memory benchmarks: ``python -m benchmarks.attention`` and ``python -m benchmarks.models``."""
