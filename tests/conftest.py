"""Suite-wide settings: tiny models run fastest (and most predictably) on one thread."""

import os

import torch

torch.set_num_threads(int(os.environ.get("TOMESD_EXT_TEST_THREADS", "1")))
