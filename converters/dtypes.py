"""The output dtypes by name: their safetensors tags and the numpy dtypes values are cast to."""

from __future__ import annotations

import numpy as np

# name -> (safetensors dtype, numpy dtype to cast to, numpy dtype stored in the file map)
DTYPES = {"float32": ("F32", "float32", "float32"), "bfloat16": ("BF16", "bfloat16", "uint16"),
          "float16": ("F16", "float16", "float16")}


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
