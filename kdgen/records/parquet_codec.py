"""Record dicts <-> parquet with typed columns (chunk objects and compacted export shards).

Column types come from the record schema (schema.py): token ids int32, logprobs float16 (about
3 significant digits: |error| <= 2**-11 * |logprob|; -inf stays -inf), small free-form dicts JSON
text. Conversations keep their logprob lists in typed columns too (moved out of metadata and back
in on decoding). Unknown keys go to an `_extra` JSON column, so nothing a record holds is lost.

Decoding gives the same dicts the JSONL form holds: keys whose value was absent are left out.
List columns also take numpy arrays (the lean vLLM path's top-k): built from flat values and
offsets, the same bytes as from the lists they hold, with no Python object per element.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdgen.records import schema

I32_LIST = pa.list_(pa.int32())
F16_LIST = pa.list_(pa.float16())
ARROW = {  # schema.py's type names -> pyarrow types
    "string": pa.string(), "int64": pa.int64(), "int32": pa.int32(), "double": pa.float64(),
    schema.INT32_LIST: I32_LIST, schema.F16_LIST: F16_LIST,
    schema.TOPK_IDS: pa.list_(I32_LIST), schema.TOPK_LPS: pa.list_(F16_LIST),
    schema.TURNS: pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])),
    schema.MESSAGES: pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
}
TYPES: dict[str, pa.DataType] = {name: ARROW[t] for name, t in schema.column_types().items()}
JSON_KEYS = schema.json_fields()
EXTRA = "_extra"
# Conversations hold these inside metadata (logprobs; with PROMPT_LOGPROBS also the token ids):
# parquet gives them typed columns and puts them back on decoding.
META_LOGPROBS = schema.typed_metadata_fields()
META_KEY = b"kdgen"
HASH_KEY = b"kdgen_sha256"  # sha256 of the bytes before the footer (every data page), see encode_parquet
# Column types of the export targets whose columns are not record fields (kdgen.export).
EXPORT_TYPES = {to: {name: ARROW[t] for name, t in cols} for to, cols in schema.EXPORT_COLUMNS.items()}


def _flatten(r: dict, keep: set | None = None, types: dict = TYPES) -> dict:
    """A record as one row of columns (`keep`: the columns there are; other keys go to _extra)."""
    row = {}
    extra = {}
    meta = r.get("metadata")
    if "conversations" in r and isinstance(meta, dict) and any(k in meta for k in META_LOGPROBS):
        meta = dict(meta)
        for k in META_LOGPROBS:
            if k in meta:
                row[k] = meta.pop(k)
        row["metadata"] = json.dumps(meta, ensure_ascii=False)
    for k, v in r.items():
        if k in row:
            continue
        if keep is not None and k not in keep:
            extra[k] = v
        elif k in types:
            row[k] = v
        elif k in JSON_KEYS:
            row[k] = json.dumps(v, ensure_ascii=False)
        else:
            extra[k] = v
    if "conversations" in r and isinstance(meta, dict) and "error" in meta:
        row["error"] = meta["error"]  # an `error` column for queries; the line stays a record
    if extra:
        row[EXTRA] = json.dumps(extra, ensure_ascii=False)
    return row


def to_table(records: list[dict], columns: list[str] | None = None, metadata: dict | None = None,
             types: dict | None = None) -> pa.Table:
    """Records -> a table; `columns` fixes the column set (export shards of one schema; keys
    outside it go to the _extra column, which must then be among them); `types` adds column types
    (EXPORT_TYPES)."""
    types = {**TYPES, **(types or {})}
    if columns is None:
        rows = [_flatten(r, types=types) for r in records]
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    else:
        keep = set(columns)
        rows = [_flatten(r, keep, types) for r in records]
        lost = next((k for row in rows for k in row if k not in keep), None)
        if lost is not None:
            raise ValueError(f"records hold {lost!r}, which has no column here")
    arrays, fields = [], []
    for k in columns:
        typ = types.get(k, pa.string())
        try:
            arrays.append(column([row.get(k) for row in rows], typ))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise ValueError(f"column {k!r} cannot be stored as {typ}: {str(e)[:200]}") from None
        fields.append(pa.field(k, typ))
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(metadata or {}).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def column(values: list, typ: pa.DataType) -> pa.Array:
    """One column's values (one per row) as an Arrow array of type typ. Lists of numpy arrays (1-D
    for list<T>, 2-D [positions, k] for list<list<T>>) and nulls are built from flat values and
    offsets; the leaves are cast as pa.array casts Python numbers (float32 -> float16 rounds to
    nearest even either way: tests/test_writer.py)."""
    if not pa.types.is_list(typ) or not any(isinstance(v, np.ndarray) for v in values):
        return pa.array(values, type=typ)
    if not all(v is None or isinstance(v, np.ndarray) for v in values):
        # arrays beside lists (rows reused from OUT/_partial beside fresh ones): rare, per row
        return pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values], type=typ)
    arrays = [v for v in values if v is not None]
    nested = pa.types.is_list(typ.value_type)
    if any(a.ndim != 1 + nested for a in arrays):
        raise ValueError(f"arrays of {[a.ndim for a in arrays][:3]} dimensions for a {typ} column")
    leaf_type = typ.value_type.value_type if nested else typ.value_type
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    if pa.types.is_float16(leaf_type):  # numpy's cast: Arrow's first cast costs ~0.5 s of set-up
        with np.errstate(over="ignore"):  # beyond float16's range: -inf, as from Python floats
            flat = flat.astype(np.float16)
    leaves = pa.array(flat, type=leaf_type)  # other dtypes: Arrow's safe cast (overflow raises)
    if nested:  # each position a list of its row's width
        widths = np.repeat([a.shape[1] for a in arrays], [a.shape[0] for a in arrays])
        leaves = pa.ListArray.from_arrays(offsets(widths), leaves, type=typ.value_type)
    mask = pa.array([v is None for v in values]) if len(arrays) < len(values) else None
    lengths = [0 if v is None else len(v) for v in values]
    return pa.ListArray.from_arrays(offsets(lengths), leaves, type=typ, mask=mask)


def offsets(lengths) -> pa.Array:
    out = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=out[1:])
    return pa.array(out)


def byte_stream_split_columns(schema: pa.Schema) -> list[str]:
    """Leaf paths of the int32 list columns (token ids, top-k ids): stored BYTE_STREAM_SPLIT, each
    byte of a value in its own stream, so that zstd finds the mostly-zero high bytes of ids.
    float16 logprobs stay PLAIN: DuckDB (2.0) refuses float16 BYTE_STREAM_SPLIT ("only supported
    for FLOAT, DOUBLE, INT32 or INT64 data"); pyarrow, polars, DuckDB and `datasets` read int32
    BYTE_STREAM_SPLIT and plain float16 (tests/test_readers.py)."""
    paths = []
    for f in schema:
        path, typ = f.name, f.type
        while pa.types.is_list(typ):
            path, typ = path + ".list.element", typ.value_type
        if path != f.name and pa.types.is_int32(typ):
            paths.append(path)
    return paths


def writer_options(schema: pa.Schema) -> dict:
    return {"compression": "zstd", "use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)],
            "use_byte_stream_split": byte_stream_split_columns(schema) or False}


def write_table(table: pa.Table, sink, row_group_size: int | None = None) -> None:
    pq.write_table(table, sink, row_group_size=row_group_size, **writer_options(table.schema))


def encode_parquet(records: list[dict], metadata: dict | None = None, columns: list[str] | None = None,
                   content_hash: bool = False) -> bytes:
    """Parquet bytes of the records. content_hash (chunk objects): the footer's key-value metadata
    also holds HASH_KEY, the sha256 of every byte before the footer (the data pages are written
    before the footer, so the hash rides in the same object and every parquet reader ignores it)."""
    table = to_table(records, columns, metadata)
    if not content_hash:
        buf = io.BytesIO()
        write_table(table, buf)
        return buf.getvalue()
    buf = io.BytesIO()
    pw = pq.ParquetWriter(buf, table.schema, **writer_options(table.schema))
    try:
        pw.write_table(table)
        pw.add_key_value_metadata({HASH_KEY: hashlib.sha256(buf.getvalue()).hexdigest().encode()})
    finally:
        pw.close()
    return buf.getvalue()


def content_hash(data: bytes) -> tuple[str, str] | None:
    """(stated, actual) sha256 of a parquet chunk object's pages; None when it states none
    (written before hashes). Raises for bytes that are not parquet."""
    stated = (pq.read_metadata(pa.BufferReader(data)).metadata or {}).get(HASH_KEY)
    if stated is None:
        return None
    footer_len = int.from_bytes(data[-8:-4], "little")
    return stated.decode(), hashlib.sha256(data[: len(data) - 8 - footer_len]).hexdigest()


def from_rows(rows: list[dict]) -> list[dict]:
    """Table rows (to_pylist) -> the record dicts they were made from."""
    out = []
    for row in rows:
        r = {}
        for k, v in row.items():
            if v is None:
                continue
            if k in JSON_KEYS:
                r[k] = json.loads(v)
            elif k == EXTRA:
                r.update(json.loads(v))
            else:
                r[k] = v
        if "conversations" in r:
            r.pop("error", None)  # it is metadata.error
            meta = r.get("metadata")
            for k in META_LOGPROBS:
                if k in r and isinstance(meta, dict):
                    meta[k] = r.pop(k)
        elif "generated" in r:
            r.setdefault("finish_reason", None)  # sequence_kd records always hold it, None or not
        out.append(r)
    return out


def decode_parquet(data: bytes) -> list[dict]:
    # use_threads=False: pyarrow's CPU pool, once it has read through a Python file object, can
    # abort the interpreter at exit ("terminate called without an active exception", apache/arrow
    # #34314, #50482); we saw `kdgen audit` exit 134 that way. One small object needs no threads.
    return from_rows(pq.read_table(pa.BufferReader(data), use_threads=False).to_pylist())


def file_metadata(data: bytes) -> dict:
    meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))
