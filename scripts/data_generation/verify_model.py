#!/usr/bin/env python
"""Check a HF model dir (a converted MaxText checkpoint) before it serves as a teacher: the seed's
entry point for `kdgen-convert verify`, with the same flags and exit status (0 passed, 1 a check
failed, 3 inconclusive). See converters/verify.py and converters/README.md.

    verify_model.py --model-path DIR [--probe-text FILE] [--reference CKPT] [--vllm] ...
"""

import os
import sys

try:
    from converters.verify import main
except ModuleNotFoundError as e:
    if e.name != "converters":
        raise
    # Run from a checkout without `pip install -e .`: the package is at the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from converters.verify import main

if __name__ == "__main__":
    sys.exit(main())
