"""Planning from parquet footers and the one-line errors for bad input files."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import tiny
from kdgen.corpus import dataset
from kdgen.corpus.dataset import DatasetError


@pytest.fixture()
def corpus(tmp_path):
    tiny.make_corpus(str(tmp_path / "c"), num_files=3, rows_per_file=45, row_group_size=10)
    return str(tmp_path / "c")


def test_plan_cuts_files_into_chunks_deterministically(corpus):
    p = dataset.plan(corpus, chunk_size=20, seed=7, columns={"text": "string"})
    assert len(p.files) == 3 and p.num_rows == 135
    assert sorted((c.stem, c.start, c.end) for c in p.chunks if c.stem == "shard-00000") == [
        ("shard-00000", 0, 20), ("shard-00000", 20, 40), ("shard-00000", 40, 45)]
    again = dataset.plan(corpus, chunk_size=20, seed=7)
    assert again.chunks == p.chunks
    other = dataset.plan(corpus, chunk_size=20, seed=8)
    assert other.chunks != p.chunks and sorted(other.chunks, key=str) == sorted(p.chunks, key=str)


def test_hosts_start_at_different_offsets(corpus):
    p = dataset.plan(corpus, chunk_size=10, seed=0)
    orders = [dataset.host_order(p.chunks, h, 3) for h in range(3)]
    assert len({o[0] for o in orders}) == 3
    assert all(sorted(o, key=str) == sorted(p.chunks, key=str) for o in orders)


def test_read_chunk_reads_exact_rows(corpus):
    p = dataset.plan(corpus, chunk_size=17, seed=0)
    full = pq.read_table(f"{corpus}/shard-00001.parquet").column("id").to_pylist()
    for ch in p.chunks:
        if ch.stem == "shard-00001":
            assert dataset.read_chunk(ch, ["id"]).column("id").to_pylist() == full[ch.start:ch.end]


def test_limit_and_chunk_names(corpus):
    p = dataset.plan(corpus, chunk_size=20, seed=0, limit=50)
    assert p.num_rows == 50
    assert dataset.parse_chunk_name("a__b_rows_0000020_0000040.jsonl") == ("a__b", 20, 40)
    assert dataset.parse_chunk_name("_job.json") is None


def test_missing_column_names_file_and_columns(corpus):
    with pytest.raises(DatasetError, match=r"shard-00000.parquet: column 'content' not found; columns are \['id', 'text'\]"):
        dataset.plan(corpus, 10, columns={"content": "string"})


def test_wrong_type_column(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), str(tmp_path / "ints.parquet"))
    with pytest.raises(DatasetError, match=r"ints.parquet: column 'text' has type int64, expected string"):
        dataset.plan(str(tmp_path), 10, columns={"text": "string"})


def test_corrupt_parquet_names_file(corpus, tmp_path):
    with open(f"{corpus}/shard-00001.parquet", "r+b") as f:
        f.seek(-12, 2)
        f.write(b"garbagegarba")
    with pytest.raises(DatasetError, match=r"shard-00001.parquet: not a readable parquet file"):
        dataset.plan(corpus, 10)


def test_empty_file_is_planned_as_nothing(tmp_path, caplog):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "empty.parquet"))
    pq.write_table(pa.table({"text": ["x"]}), str(tmp_path / "one.parquet"))
    p = dataset.plan(str(tmp_path), 10, columns={"text": "string"})
    assert [(c.stem, c.start, c.end) for c in p.chunks] == [("one", 0, 1)]
    assert "empty.parquet has 0 rows" in caplog.text


def test_no_files_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        dataset.plan(str(tmp_path / "nope"), 10)


def test_nested_files_get_unique_stems():
    files = ["gs://b/d/train/0.parquet", "gs://b/d/val/0.parquet"]
    assert dataset.file_stems(files, dataset.dataset_base("gs://b/d", files)) == ["train__0", "val__0"]
    assert dataset.file_stems(files, dataset.dataset_base("gs://b/d/", files)) == ["train__0", "val__0"]
    assert dataset.legacy_file_stems(files) == ["train__0", "val__0"]
    assert dataset.file_stems(["/x/y/part.parquet"], dataset.dataset_base("/x/y/part.parquet", ["/x/y/part.parquet"])) == ["part"]


def test_stems_are_relative_to_dataset_path_itself():
    """Stems come from DATASET_PATH, not from the files found: a file added in a new subfolder
    renames nothing (the common-folder rule of older versions renamed every file)."""
    part = ["/c/part/a.parquet", "/c/part/b.parquet"]
    both = part + ["/c/extra/z.parquet"]
    assert dataset.file_stems(part, dataset.dataset_base("/c", part)) == ["part__a", "part__b"]
    assert dataset.file_stems(both, dataset.dataset_base("/c", both))[:2] == ["part__a", "part__b"]
    assert dataset.legacy_file_stems(part) == ["a", "b"] and dataset.legacy_file_stems(both)[:2] == ["part__a", "part__b"]
    # a glob: the folder before the first wildcard; a list: the common folder of the items' bases
    g = ["gs://b/c/x/1.parquet", "gs://b/c/y/2.parquet"]
    assert dataset.file_stems(g, dataset.dataset_base("gs://b/c/*/*.parquet", g)) == ["x__1", "y__2"]
    assert dataset.file_stems(g, dataset.dataset_base("gs://b/c/x/1.parquet,gs://b/c/y", g)) == ["x__1", "y__2"]


def test_plan_command_prints_the_plan(corpus, tmp_path):
    import subprocess

    from tests.conftest import PYTHON

    r = subprocess.run([PYTHON, "-m", "kdgen.cli", "plan", "--dataset_path", corpus, "--chunk_size", "20"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "plan: 3 files, 135 rows, 9 chunks" in r.stdout
    assert "host 0/1 starts at: shard-" in r.stdout
    bad = subprocess.run([PYTHON, "-m", "kdgen.cli", "plan", "--dataset_path", corpus, "--text_column", "body"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("kdgen: error: ") and "'body' not found" in bad.stderr


def _pickled_footer_digest(meta) -> str:
    """The footer digest as kdgen computed it before (pyarrow pickles FileMetaData as its thrift
    bytes): the value pinned in existing jobs' _job.json."""
    return hashlib.sha256(memoryview(meta.__reduce__()[1][0])).hexdigest()


@pytest.mark.parametrize("options", [
    {}, {"row_group_size": 7}, {"compression": "zstd", "write_statistics": False},
    {"use_dictionary": False, "data_page_size": 64}, {"version": "1.0"},
])
def test_footer_digest_is_the_value_pinned_by_earlier_kdgen(tmp_path, options):
    # The public write_metadata_file serializes the same footer bytes that the pickle held, so a
    # resume of a job pinned by earlier kdgen finds the same digest for an unchanged file.
    table = pa.table({"text": [f"row {i} " * (i % 5) for i in range(50)], "n": list(range(50)),
                      "lists": [[i, i + 1] for i in range(50)]},
                     metadata={"origin": "test"})
    path = str(tmp_path / "f.parquet")
    pq.write_table(table, path, **options)
    meta = pq.ParquetFile(path).metadata
    footer = dataset.read_footer(path)
    assert footer.digest == dataset.footer_digest(meta) == _pickled_footer_digest(meta)
    with open(path, "rb") as f:  # a pyarrow-written file: also the footer bytes as stored
        data = f.read()
    n = int.from_bytes(data[-8:-4], "little")
    assert footer.digest == hashlib.sha256(data[-8 - n:-8]).hexdigest()
    pq.write_table(table.slice(1), path, **options)  # another footer, another digest
    assert dataset.read_footer(path).digest != footer.digest
