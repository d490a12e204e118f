"""`pytest -n N` (pytest-xdist) for this suite: the units a worker runs whole, their order, a core
per worker for its engines, and the engine starts of all workers added up for the budget.

The units: every test of the session's vLLM (its two in-process engines and its server) on one
worker, so that each starts once; each module whose module fixtures train models or write
checkpoints, so that those are made once; any other test alone. xdist's own `--dist loadgroup`
cannot carry them here: it renames node ids, which pytest 9.2 derives from elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from xdist.scheduler import LoadScopeScheduling

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in a worker, else None
SESSION_VLLM = "session-vllm"
SESSION_VLLM_FIXTURES = ("engine", "sampling_engine", "vllm_server")
MODULE_GROUPS = ("test_convert", "test_convert_qwen", "test_demo")
GROUPED = "loadgroup"  # the --dist value this plugin schedules (what -n alone becomes)

if WORKER:
    # vLLM's automatic binding would put the engines of every worker on the first core.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(WORKER[2:]) % (os.cpu_count() or 1)))


def module_name(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""


def uses_server(item) -> bool:
    return "vllm_server" in getattr(item, "fixturenames", ())


def group_of(item) -> str | None:
    if any(f in getattr(item, "fixturenames", ()) for f in SESSION_VLLM_FIXTURES):
        return SESSION_VLLM
    module = module_name(item)
    return module if module in MODULE_GROUPS else None


def order_of(item) -> tuple[int, bool]:
    """Longest units first, so that no long one is left to run alone at the end: the chaos test,
    the session's vLLM (the server's tests last: it starts in the background at the first), the
    module groups, then tests that start engines of their own, then the rest."""
    if item.get_closest_marker("chaos"):
        return 0, False
    group = group_of(item)
    if group:
        return (1 if group == SESSION_VLLM else 2), uses_server(item)
    return (3 if item.get_closest_marker("engine") or item.get_closest_marker("serve") else 4), False


def is_controller(config) -> bool:
    return getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling, in collection order, with the units the workers wrote down."""

    def __init__(self, config, log, groups_dir: str):
        super().__init__(config, log)
        self.groups_dir, self.groups = groups_dir, None

    def _split_scope(self, nodeid: str) -> str:  # xdist's extension point (LoadGroupScheduling's too)
        if self.groups is None:  # first called once every worker has collected (and written)
            self.groups = {}
            for name in os.listdir(self.groups_dir):
                with open(os.path.join(self.groups_dir, name)) as f:
                    self.groups.update(json.load(f))
        return self.groups.get(nodeid, nodeid)


@pytest.hookimpl(tryfirst=True)  # before xdist turns -n alone into "load"
def pytest_cmdline_main(config):
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = GROUPED
        config.option.loadscopereorder = False


def pytest_configure(config):
    if is_controller(config) and config.option.dist == GROUPED:
        config.kdgen_groups_dir = tempfile.mkdtemp(prefix="kdgen-xdist-groups-")


def pytest_unconfigure(config):
    if getattr(config, "kdgen_groups_dir", None):
        shutil.rmtree(config.kdgen_groups_dir, ignore_errors=True)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    groups_dir = getattr(config, "kdgen_groups_dir", None)
    return GroupScheduling(config, log, groups_dir) if groups_dir else None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    groups_dir = getattr(node.config, "kdgen_groups_dir", None)
    if groups_dir:
        node.workerinput["kdgen_groups_dir"] = groups_dir


def pytest_collection_modifyitems(config, items):
    if WORKER:
        items.sort(key=order_of)  # the same order in every worker: the scheduler's queue


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reports its collection to the controller
def pytest_collection_finish(session):
    groups_dir = getattr(session.config, "workerinput", {}).get("kdgen_groups_dir")
    if groups_dir:
        groups = {item.nodeid: group for item in session.items if (group := group_of(item))}
        path = os.path.join(groups_dir, f"{WORKER}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(groups, f)
        os.replace(path + ".tmp", path)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A worker is done: its engine starts count toward the session's budget (tests/conftest.py)."""
    out = getattr(node, "workeroutput", {})
    node.config.engine_starts.per_test.update(out.get("engine_starts", {}))
    node.config.engine_starts.unmarked.update(out.get("engine_starts_unmarked", ()))
