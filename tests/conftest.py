"""Test-wide settings."""

import os

import torch

# One intra-op thread: on a busy 2-core machine two threads per process make small models 5-10x
# slower (measured), and tests run many tiny steps. Benchmarks, not tests, use every core. Tests of
# multi-threaded kernels set their own counts (test_fused.py's `threads` fixture: 1, 2 and 4).
torch.set_num_threads(int(os.environ.get("DHM_FAST_TEST_THREADS", "1")))
