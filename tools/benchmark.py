#!/usr/bin/env python
"""Side-by-side benchmark of mvit-det against timm, mmpretrain and detectron2 (``--help`` for the tasks).

The benchmark library lives in the ``benchmarks`` package at the repository root.
"""
from benchmarks.cli import main

if __name__ == "__main__":
    main()
