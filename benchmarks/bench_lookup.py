#!/usr/bin/env python
"""The lookup microbenchmark from a checkout: the same as ``pme bench`` (the code is ``pme/bench.py``,
shipped in the wheel). ``python benchmarks/bench_lookup.py --help`` lists the options."""

import os
import sys

try:
    import pme.bench
except ImportError:  # a source tree that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pme.bench

if __name__ == "__main__":
    pme.bench.main()
