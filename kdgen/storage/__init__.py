"""Storage: every path is a URL (a local path, file://... or gs://bucket/key), served by one
Store object per scheme; the only part of kdgen that knows object-store tricks.

urls: URL parsing; base: Stat, errors, the Store contract; retrying: bounded retries with one
deadline per operation; local / gcs: the two stores (create-if-absent, compare-and-swap,
atomic writes); inputs: corpus files read pinned to their planned version; api: the functions
below, and register / using to put another store in place. Design: docs/protocol.md.
"""

from kdgen.storage.api import (check_location, create_if_absent, create_if_absent_stat, delete, exists, expand,
                               expand_stats, filesystem, input_version, list_names, list_stats, open_input,
                               read_bytes, read_json, read_range, register, replace_if_generation,
                               replace_if_generation_stat, stat, store_for, using, write_bytes)
from kdgen.storage.base import InputChanged, LocationError, Stat, StorageError, Store
from kdgen.storage.gcs import GcsStore
from kdgen.storage.local import TMP_MARK, LocalStore, local_fs_type
from kdgen.storage.retrying import configure, is_transient, remaining_s, retry, settings
from kdgen.storage.urls import check_plain_name, is_remote, join, local_path

__all__ = [
    "check_location", "create_if_absent", "create_if_absent_stat", "delete", "exists", "expand", "expand_stats",
    "filesystem", "input_version", "list_names", "list_stats", "open_input", "read_bytes", "read_json",
    "read_range", "register", "replace_if_generation", "replace_if_generation_stat", "stat", "store_for", "using",
    "write_bytes", "InputChanged", "LocationError", "Stat", "StorageError", "Store", "GcsStore", "TMP_MARK",
    "LocalStore", "local_fs_type", "configure", "is_transient", "remaining_s", "retry", "settings",
    "check_plain_name", "is_remote", "join", "local_path",
]
