"""A tf.train.Example encoder in a few lines of numpy (no TensorFlow).

The wire format of tensorflow/core/example/{example,feature}.proto (proto3):
    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # map entry: {string key = 1; Feature value = 2;}
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    FloatList { repeated float value = 1 [packed = true]; }    # little-endian float32s
    Int64List { repeated int64 value = 1 [packed = true]; }    # varints (two's complement, 10 bytes if < 0)
"""

from __future__ import annotations

import numpy as np


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varints(values) -> bytes:
    """Packed varints of int64 values, vectorized."""
    a = np.asarray(values, dtype=np.int64).astype(np.uint64)
    if a.size == 0:
        return b""
    n = np.ones(a.shape, dtype=np.int64)
    for i in range(1, 10):
        n += a >= np.uint64(1 << (7 * i))
    offsets = np.cumsum(n) - n
    out = np.empty(int(n.sum()), dtype=np.uint8)
    for i in range(int(n.max())):
        m = n > i
        byte = ((a[m] >> np.uint64(7 * i)) & np.uint64(0x7F)).astype(np.uint8)
        out[offsets[m] + i] = byte | ((n[m] > i + 1).astype(np.uint8) << 7)
    return out.tobytes()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def feature(values) -> bytes:
    """A Feature: float_list for floating arrays, int64_list for integer arrays, bytes_list for bytes."""
    if isinstance(values, (bytes, str)):
        values = [values]
    if isinstance(values, list) and values and isinstance(values[0], (bytes, str)):
        items = b"".join(_field(1, v.encode() if isinstance(v, str) else v) for v in values)
        return _field(1, items)
    a = np.asarray(values)
    if np.issubdtype(a.dtype, np.floating):
        return _field(2, _field(1, np.ascontiguousarray(a.ravel(), dtype="<f4").tobytes()))
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool or a.size == 0:
        return _field(3, _field(1, varints(a.ravel())))
    raise TypeError(f"unsupported feature dtype {a.dtype}")


def example(features: dict) -> bytes:
    """A serialized tf.train.Example of {name: values}."""
    entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, feature(v))) for name, v in features.items())
    return _field(1, entries)
