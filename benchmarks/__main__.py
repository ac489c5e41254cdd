"""``python -m benchmarks``: the same as ``python tools/benchmark.py``."""
from .cli import main

main()
