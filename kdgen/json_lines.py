"""One JSON line as kdgen writes them (chunk objects, partial-progress segments): json.dumps with
ensure_ascii=False, and numpy arrays (the lean path's top-k, kdgen.engines.base.Sample) written as
the lists they hold, so that both forms give the same bytes. No kdgen imports."""

from __future__ import annotations

import json


def json_value(o):
    """json's hook for what it cannot write: a numpy array (or scalar) as its tolist(), i.e. Python
    ints and floats. Runs in the encoding thread (commit or save), not the engine's."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def json_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=json_value) + "\n"
