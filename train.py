#!/usr/bin/env python
"""Train or evaluate a DHM / DSL / DKS / baseline network. `python train.py --help` lists every flag."""

import sys

from dhm_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
