"""Session fixtures: one tiny model, one real vLLM CPU engine, one fake-gcs-server."""

from __future__ import annotations

import os
import secrets
import sys

import pytest

pytest.register_assert_rewrite("tests.parallel")  # imported here before pytest loads it as a plugin
from tests import parallel, threads  # noqa: E402
from tests.parallel import uses_server  # noqa: E402

pytest_plugins = ("tests.parallel",)  # pytest -n N

# Before anything imports vLLM or gcsfs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The engine budget: vLLM engine starts (engine cores, counted by tests/engine_starts.py) a whole
# test session may make. Starts are most of the suite's time on the 2-core machines: a change that
# needs more must say why here.
# 34 -> 37 (issue 19): an engine that dies on every request (2 starts: the restart proves it is
# not the rows) and an engine start that fails in its EngineCore (1) need their own engines.
# 37 -> 28 (issue 22): the protocol's faults run on the fake engine (FAKE_ENGINE), which starts no
# vLLM: the poison row (3 starts), every-row-death (2), the stall (1), preemption (1), kill -9 and
# resume (1), test_resume_e2e (2); a hung real EngineCore killed by the watchdog keeps its own (1).
# 28 -> 24: a whole session made 23 on 2026-12-03 (three hosts' chaos 6, data parallel 4, the
# session server 1, and 12 tests of one start each); the chaos test makes 7 when no signal lands
# before a restarted host's EngineCore exists.
# 24 -> 23: the converter's `--vllm` check runs its engine core in its own process (no EngineCore
# process: a start of a few seconds, not counted); whole sessions under -n 2 made 21.
ENGINE_START_BUDGET = 23

# Markers given from the fixtures a test uses (select with -m, e.g. -m "not engine and not serve").
# Tests that start an engine of their own in a subprocess (a `kdgen run` job, `vllm serve`) carry
# the marker themselves (@pytest.mark.engine / serve).
MARKER_FIXTURES = {"engine": "engine", "sampling_engine": "engine", "vllm_server": "serve", "gcs_server": "gcs"}
MARKER_MODULES = {"test_convert": "convert", "test_convert_qwen": "convert"}
# By name: the chaos test needs no fixture of its own to tell it apart.
MARKER_TESTS = {"test_three_hosts_on_gs_survive_random_kills_and_preemptions": "chaos"}
PYTHON = sys.executable

# Engine settings that work on the 2-core CPU machines (see shared/FACTS.md).
CPU_ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True)

# The session server (vllm_server) wants an API key, as a team's shared teacher server does. Two
# keys, as during a key rotation; random, so that a search for their values in outputs and logs
# cannot be fooled by a fixed string that happens to be somewhere else.
TEST_API_KEY = "kdgen-test-key-" + secrets.token_hex(12)
TEST_API_KEY_ROTATED = "kdgen-test-key2-" + secrets.token_hex(12)


TINY_MODEL = pytest.StashKey[str]()
SESSION_SERVER = pytest.StashKey["VllmServer"]()
SERVER_WANTED = pytest.StashKey[bool]()  # under -n N: a collected test uses the session server


def session_tiny_model(config) -> str:
    """The session's tiny model, made on first use: by the `tiny_model` fixture, or earlier by
    pytest_collection_finish for the session server, which must serve the same weights."""
    if TINY_MODEL not in config.stash:  # config._tmp_path_factory: what the tmp_path_factory fixture returns
        from kdgen import tiny

        config.stash[TINY_MODEL] = tiny.make_model(str(config._tmp_path_factory.mktemp("tiny-llama")))
    return config.stash[TINY_MODEL]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Each test process's torch and numpy work on one thread, from its first test on (why:
    tests/threads.py). Autouse: before any session fixture that trains or runs a model."""
    with threads.one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model(request) -> str:
    return session_tiny_model(request.config)


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The one in-process vLLM engine of the test session (start-up is the slow part)."""
    from kdgen import config as config_mod
    from kdgen.engines.vllm_engine import VllmEngine

    c = config_mod.JobConfig(model_path=tiny_model, temperature=0.0, **CPU_ENGINE)
    eng = VllmEngine(c)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def sampling_engine(tiny_model):
    """A second in-process engine, started for sampling: processed logprobs (LOGPROBS_MODE is an
    engine setting) with a top-k cap of 25, temperature 0.7, so that on the CPU platform it runs
    without chunked prefill and takes per-request seeds (kdgen.engines.vllm_engine.seeds_need_whole_prefills).
    Shared by the tests that need either, so that they cost one engine start."""
    from kdgen import config as config_mod
    from kdgen.engines.vllm_engine import VllmEngine

    c = config_mod.JobConfig(model_path=tiny_model, temperature=0.7, logprobs=25, logprobs_mode="processed",
                             **CPU_ENGINE)
    eng = VllmEngine(c)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def hf_logprobs(tiny_model):
    """token ids -> per-position log-softmax rows [len, vocab] of LlamaForCausalLM (float32), the
    reference for engine logprobs; temperature T divides the logits first."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()

    def run(ids: list[int], temperature: float = 1.0):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits / temperature, -1)  # row t predicts token t+1

    return run


def job_config(**kw):
    """A JobConfig for tests: greedy, small budgets, no env vars read. With an endpoint and no
    endpoint_api_key, the key of the session server."""
    from kdgen import config as config_mod

    base = dict(temperature=0.0, max_prefill_length=32, max_target_length=48, chunk_size=20,
                gen_batch_size=64, log_every_s=1000.0, lease_ttl_s=30.0, **CPU_ENGINE)
    base.update(kw)
    if base.get("endpoint") and "endpoint_api_key" not in kw:
        base["endpoint_api_key"] = TEST_API_KEY
    return config_mod.from_sources(base, env={})


@pytest.fixture(scope="session")
def gcs_server():
    """A real fake-gcs-server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from tests.gcs_server import start_server

    server = start_server()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    yield server
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    server.stop()


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` of the tiny model on 127.0.0.1, in its own
    process group (so that kill() takes the engine-core child with it)."""

    def __init__(self, model: str, log_path: str, api_keys: tuple[str, ...] = ()):
        import socket

        self.model, self.log_path = model, log_path
        self.api_keys = api_keys  # any of them is accepted (vllm serve --api-key K1 K2)
        self.api_key = api_keys[0] if api_keys else ""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = None

    def start(self) -> "VllmServer":
        import subprocess

        cmd = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", "512", "--enforce-eager"]
        if self.api_keys:
            cmd += ["--api-key", *self.api_keys]
        # Bind its worker to the last core: the in-process engine of the session binds the first.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("KDGEN_TEST_SERVER_CPUS", str(max(os.cpu_count() - 1, 0)))}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> "VllmServer":
        import time
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url[:-3] + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"vllm server not healthy after {timeout_s} s; see {self.log_path}")

    def kill(self, sig=None) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig or signal.SIGKILL)
            self.proc.wait(timeout=30)


def session_server(config) -> VllmServer:
    """The session's `vllm serve`, started (not waited for) on first call."""
    if SESSION_SERVER not in config.stash:
        log = config._tmp_path_factory.mktemp("vllm-server") / "server.log"
        server = VllmServer(session_tiny_model(config), str(log), api_keys=(TEST_API_KEY, TEST_API_KEY_ROTATED))
        config.stash[SESSION_SERVER] = server.start()
        config.engine_starts.owners[server.proc.pid] = "vllm_server (session fixture, started in the background)"
    return config.stash[SESSION_SERVER]


@pytest.fixture(scope="session")
def vllm_server(request):
    """One real OpenAI-compatible vLLM server of the tiny model for the session, started with
    `--api-key TEST_API_KEY TEST_API_KEY_ROTATED` in the background as soon as the collection shows
    a test that uses it (pytest_collection_finish), so that its start (about a minute here) overlaps
    the tests before. Tests must leave it running. While it lives, ENDPOINT_API_KEY holds its key
    for in-process CLI calls; job_config() adds it too; other callers pass `vllm_server.api_key`."""
    server = session_server(request.config).wait_ready()
    old = os.environ.get("ENDPOINT_API_KEY")
    os.environ["ENDPOINT_API_KEY"] = server.api_key
    yield server
    if old is None:
        os.environ.pop("ENDPOINT_API_KEY", None)
    else:
        os.environ["ENDPOINT_API_KEY"] = old


def pytest_collection_finish(session):
    if session.config.option.collectonly or not any(uses_server(item) for item in session.items):
        return
    if parallel.WORKER:
        # Under -n N a worker cannot know at collection that it is the one that runs the server's
        # tests: the server starts at the first test of that group (pytest_runtest_setup).
        session.config.stash[SERVER_WANTED] = True
    else:
        session_server(session.config)


def stop_session_server(config) -> None:
    import signal

    server = config.stash.get(SESSION_SERVER, None)
    if server is None:
        return
    try:
        server.kill(signal.SIGTERM)
    except Exception:
        server.kill()


def pytest_configure(config):
    for name, what in [("engine", "starts or uses a real vLLM engine (the session's in-process ones, or a job's)"),
                       ("serve", "uses a real `vllm serve` (the session's, or one it starts)"),
                       ("gcs", "uses the session's fake-gcs-server"),
                       ("chaos", "several job hosts on gs:// killed and preempted at random"),
                       ("convert", "converter tests on real orbax checkpoints")]:
        config.addinivalue_line("markers", f"{name}: {what}")
    from tests.engine_starts import EngineStarts

    config.engine_starts = EngineStarts()
    if not parallel.is_controller(config):  # the controller's count is its workers' (pytest_testnodedown)
        config.engine_starts.start()


@pytest.hookimpl(tryfirst=True)  # before tests/parallel.py orders by the markers
def pytest_collection_modifyitems(config, items):
    add_markers(items)
    if not parallel.WORKER:
        # Modules with a test that uses the session server run last (each keeps its own order):
        # the server, started in the background when the collection ends, is ready by then.
        serve_modules = {item.module for item in items if uses_server(item)}
        items.sort(key=lambda item: getattr(item, "module", None) in serve_modules)


def add_markers(items) -> None:
    for item in items:
        for fixture, marker in MARKER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        module = parallel.module_name(item)
        if module in MARKER_MODULES:
            item.add_marker(MARKER_MODULES[module])
        name = getattr(item, "originalname", "")
        if name in MARKER_TESTS:
            item.add_marker(MARKER_TESTS[name])


def pytest_runtest_setup(item):
    # Under -n N the worker that runs the session's vLLM group starts the server at its first test
    # (in the background: the group's tests that use it run last).
    if item.config.stash.get(SERVER_WANTED, False) and parallel.group_of(item) == parallel.SESSION_VLLM:
        session_server(item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    starts = item.config.engine_starts
    starts.current = item.nodeid
    yield
    starts.current = "(between tests)"
    if starts.per_test[item.nodeid] and not (item.get_closest_marker("engine") or item.get_closest_marker("serve")):
        starts.unmarked.add(item.nodeid)  # `-m "not engine and not serve"` would have run it


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    starts = config.engine_starts
    starts.stop()
    tr = terminalreporter
    tr.section(f"engine starts: {starts.total} (budget {ENGINE_START_BUDGET})")
    for nodeid, n in starts.per_test.most_common():
        tr.write_line(f"{n:3d}  {nodeid}")
    if starts.total > ENGINE_START_BUDGET:
        tr.write_line(f"FAILED: {starts.total} engine starts exceed the budget of {ENGINE_START_BUDGET} "
                      "(tests/conftest.py ENGINE_START_BUDGET)", red=True, bold=True)
    for nodeid in sorted(starts.unmarked):
        tr.write_line(f"FAILED: {nodeid} started a vLLM engine but is not marked engine or serve",
                      red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    """The engine budget is a test of the whole session: over it, the session fails."""
    stop_session_server(session.config)
    starts = getattr(session.config, "engine_starts", None)
    if starts is None:
        return
    starts.stop()
    if hasattr(session.config, "workeroutput"):  # an xdist worker: the controller adds up and judges
        session.config.workeroutput["engine_starts"] = dict(starts.per_test)
        session.config.workeroutput["engine_starts_unmarked"] = sorted(starts.unmarked)
        return
    if (starts.total > ENGINE_START_BUDGET or starts.unmarked) and exitstatus == 0:
        session.config.engine_budget_failed = True
        session.exitstatus = 1
