"""Secrets and the local machine (issue 19, items 17-23): credentials a server echoes, reply size
caps, the launchers' command lines and logs, and the private model / compile caches."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from tests.conftest import PYTHON, REPO

SCRIPTS = os.path.join(REPO, "scripts", "data_generation")


# ---- a server on 127.0.0.1 that echoes the request's credentials in a 400 ------------------------

ECHO_FORMS = 5


class EchoServer:
    """An OpenAI-compatible stand-in: GET /v1/models lists `model`; POST /v1/completions answers
    200 with a small completion, or for every prompt whose token ids sum to an odd number 400 with a
    body that echoes the request's Authorization header in one of ECHO_FORMS ways (header lines,
    a Python dict repr, the bare token or the decoded user:password, a JSON field, the token cut
    near the 500th character). `models_bytes` / `reply_bytes` pad the replies to that size
    (`chunked`: without Content-Length)."""

    def __init__(self, model: str, models_bytes: int = 0, reply_bytes: int = 0, chunked: bool = False):
        self.model, self.models_bytes, self.reply_bytes, self.chunked = model, models_bytes, reply_bytes, chunked
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, status: int, data: bytes, chunked: bool = False):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if not chunked:
                        self.wfile.write(data)
                        server.bytes_sent += len(data)
                        return
                    for i in range(0, len(data), 1 << 16):
                        piece = data[i:i + (1 << 16)]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        server.bytes_sent += len(piece)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self):
                cards = {"object": "list", "data": [{"id": server.model, "max_model_len": 512}]}
                if server.models_bytes:
                    cards["padding"] = "x" * server.models_bytes
                self.send(200, json.dumps(cards).encode(), server.chunked)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["prompt"]
                if sum(prompt) % 2 == 0 or server.reply_bytes:
                    reply = {"choices": [{"index": 0, "text": " ok", "token_ids": [5, 6], "finish_reason": "length"}],
                             "usage": {"prompt_tokens": len(prompt), "completion_tokens": 2}}
                    if server.reply_bytes:
                        reply["padding"] = "y" * server.reply_bytes
                    return self.send(200, json.dumps(reply).encode(), server.chunked)
                auth = self.headers.get("Authorization", "")
                token = auth.split(" ", 1)[-1]
                plain = base64.b64decode(token).decode() if auth.startswith("Basic ") else token
                form = sum(prompt) // 2 % ECHO_FORMS
                echoes = ["you sent:\n" + "\n".join(f"{k}: {v}" for k, v in self.headers.items()),
                          f"headers={dict(self.headers)!r}",
                          f"credential {token} (that is {plain}) is not allowed here",
                          json.dumps({"request": {"api_key": plain, "password": plain, "auth": auth}}),
                          "p" * 470 + " token " + token]  # the token straddles character 500
                msg = f"bad request ({form}): {echoes[form]}"
                self.send(400, json.dumps({"error": {"message": msg, "type": "BadRequestError"}}).encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.http.server_address[1]}/v1"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def secret_forms(secret: str) -> list[bytes]:
    """The ways a secret can be written: as is, base64 (standard, url-safe, unpadded), percent-encoded."""
    raw = secret.encode()
    b64 = [base64.b64encode(raw), base64.urlsafe_b64encode(raw)]
    return [raw, quote(secret, safe="").encode(), *b64, *(b.rstrip(b"=") for b in b64)]


def files_holding(root: str, needles: list[bytes]) -> list[str]:
    hits = []
    for d, _, names in os.walk(root):
        for n in names:
            data = open(os.path.join(d, n), "rb").read()
            hits += [f"{os.path.join(d, n)}: {x!r}" for x in needles if x in data]
    return hits


def kdgen_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("ENDPOINT_API_KEY", "OPENAI_API_KEY")}
    return subprocess.run([PYTHON, "-m", "kdgen.cli", *args], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", ["basic", "bearer"])
def test_credentials_a_server_echoes_in_a_400_are_stored_and_printed_redacted(tiny_model, tmp_path, how):
    """A real job through the CLI against a server that echoes Authorization in its 400s: the rows
    it refused are error records with the server's message, and no byte of the output directory
    (chunk objects, _errors/, host reports) nor of the CLI's stdout/stderr holds the password, the
    key, user:password, or their base64/percent-encoded forms."""
    from kdgen import tiny
    from kdgen.views import audit
    from tests.test_job import read_errors

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    tiny.make_corpus(data, num_files=2, rows_per_file=20, seed=11)
    server = EchoServer(tiny_model)
    env = dict(MODEL_PATH=tiny_model, DATASET_PATH=data, OUTPUT_PATH=out, TEMPERATURE="0", MAX_PREFILL_LENGTH="24",
               MAX_TARGET_LENGTH="40", CHUNK_SIZE="10", CONCURRENCY="4", MAX_RETRIES="0")
    if how == "basic":
        user, password = "kd-user", "pw-" + os.urandom(6).hex() + "@x:y"  # a raw @ and : in the password
        env["ENDPOINT"] = server.url(f"{user}:{quote(password, safe='')}")
        secrets = [password, f"{user}:{password}"]
    else:
        key = "sk-echo-" + os.urandom(9).hex()
        env.update(ENDPOINT=server.url(), ENDPOINT_API_KEY=key)
        secrets = [key]
    try:
        r = kdgen_cli("run", **env)
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    errors = read_errors(out)
    assert len(errors) >= ECHO_FORMS and all("HTTP 400" in e["error"] for e in errors)
    assert {e["error"].split("bad request (")[1][0] for e in errors} == {str(i) for i in range(ECHO_FORMS)}
    assert audit.audit(out)["rows_failed"] == len(errors)
    needles = [f for s in secrets for f in secret_forms(s)]
    assert files_holding(out, needles) == []
    for text in (r.stdout, r.stderr):
        assert not [n for n in needles if n.decode() in text]
    # The cut at character 500 kept no piece of the token (redacted before the cut).
    cut = [e["error"] for e in errors if "bad request (4)" in e["error"]]
    assert cut and all(e.endswith("p token ***") for e in cut), cut


def test_redact_masks_every_credential_form():
    from kdgen import redact

    redact.register_basic_auth("u1", "pass-word-9f3e")
    redact.register("sk-form-test-77aa")
    token = base64.b64encode(b"u1:pass-word-9f3e").decode()
    key64 = base64.b64encode(b"sk-form-test-77aa").decode()
    texts = {
        f"Authorization: Basic {token}": "Authorization: ***",
        f"raw {token} end": "raw *** end",
        f"key in base64 {key64}": "key in base64 ***",
        "Bearer sk-form-test-77aa": "Bearer ***",
        "https://u1:pass-word-9f3e@h/v1": "https://***@h/v1",
        "https://u1:p@ss@word@h/v1 next": "https://***@h/v1 next",  # a raw @ in the password
        "GET /v1?api_key=abc123&x=1": "GET /v1?api_key=***&x=1",
        '{"api_key": "abc123", "password": "hunter22"}': '{"api_key": "***", "password": "***"}',
        "{'X-Api-Key': 'abc123'}": "{'X-Api-Key': '***'}",
        "Proxy-Authorization: Basic abcdefgh": "Proxy-Authorization: ***",
        f"pass-word-9f3e and {quote('pass-word-9f3e')}": "*** and ***",
    }
    for text, want in texts.items():
        assert redact.redact(text) == want, text


def test_a_password_in_any_url_knob_is_registered():
    from kdgen import config as config_mod
    from kdgen import redact

    c = config_mod.from_sources(dict(model_path="m", dataset_path="gs://a/x,gs://u:ds-pw-1a2b@b/y",
                                     output_path="gs://o:out-pw-3c4d@b/out"), env={})
    assert c.dataset_path and redact.redact("ds-pw-1a2b / out-pw-3c4d") == "*** / ***"


# ---- reply size caps (item 22) ---------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
def test_a_models_reply_over_its_cap_stops_with_a_clear_error(tiny_model, chunked):
    from kdgen import config as config_mod
    from kdgen.engines.endpoint import EndpointEngine
    from kdgen.engines.http import MODELS_REPLY_CAP
    from kdgen.engines.base import EngineError

    server = EchoServer(tiny_model, models_bytes=64 << 20, chunked=chunked)
    try:
        c = config_mod.from_sources(dict(model_path=tiny_model, dataset_path="-", output_path="-",
                                         endpoint=server.url(), max_retries=0), env={})
        with pytest.raises(EngineError, match=r"reply to GET /models is too large"):
            EndpointEngine(c)
    finally:
        server.close()
    assert server.bytes_sent < 64 << 20  # the client stopped reading (the server saw it hang up)
    assert MODELS_REPLY_CAP < 64 << 20


def test_a_completion_reply_over_its_cap_is_a_server_error_not_a_row_error(tiny_model):
    from kdgen import config as config_mod
    from kdgen.engines.endpoint import EndpointEngine
    from kdgen.engines.http import reply_cap
    from kdgen.engines.base import EngineError

    server = EchoServer(tiny_model)
    try:
        c = config_mod.from_sources(dict(model_path=tiny_model, dataset_path="-", output_path="-",
                                         endpoint=server.url(), max_retries=0), env={})
        eng = EndpointEngine(c)
        try:
            cap = reply_cap({**eng._base_body, "max_tokens": 8}, 3)
            server.reply_bytes, server.chunked = 3 * cap, True
            eng.add_many([("r0", [1, 2, 3], 8)])
            with pytest.raises(EngineError, match=r"reply to POST /completions is too large"):
                while eng.num_unfinished():
                    eng.step()
        finally:
            eng.close()
    finally:
        server.close()
    # The cap grows with what a request can produce: samples, tokens, logprobs.
    assert reply_cap({"max_tokens": 4096, "n": 4, "logprobs": 20}) > 20 * reply_cap({"max_tokens": 4096})
    assert reply_cap({"max_tokens": 4096}) > 4096 * 256


# ---- the launchers: no secret on a command line or in print; safe logs (items 17, 18, 23) ----------

LAUNCHER = os.path.join(SCRIPTS, "launch_multihost.sh")
RUN_ALL = os.path.join(SCRIPTS, "run_all.sh")
URL_PASSWORD = "url-pw-" + os.urandom(6).hex()


def test_launcher_sends_url_passwords_by_stdin_and_prints_them_as_stars(tmp_path):
    """ENDPOINT / DATASET_PATH / OUTPUT_PATH with user:password@: DRY_RUN prints no password, the ssh
    command lines of a real launch (a stand-in ssh on PATH records its argv and stdin) hold none,
    and the stdin carries the values."""
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    (bin_dir / "ssh").write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > {rec}/argv.$$\ncat > {rec}/stdin.$$\n")
    (bin_dir / "ssh").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path / "logs"), "KDGEN_PYTHON": PYTHON,
           "MODEL_PATH": "gs://b/m", "TEMPERATURE": "0.5",
           "ENDPOINT": f"http://kd:{URL_PASSWORD}@teacher:8000/v1",
           "DATASET_PATH": f"gs://b/d1,https://u:{URL_PASSWORD}-2@h/d2", "OUTPUT_PATH": f"gs://o:{URL_PASSWORD}-3@b/out"}
    dry = subprocess.run(["bash", LAUNCHER, "hosts", "h0,h1"], env={**env, "DRY_RUN": "1"}, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert URL_PASSWORD not in dry.stdout + dry.stderr
    stdin_lines = [line for line in dry.stdout.splitlines() if line.strip().startswith("stdin")]
    assert len(stdin_lines) == 2 and all(f"{k}=***" in line for line in stdin_lines
                                         for k in ("ENDPOINT", "DATASET_PATH", "OUTPUT_PATH"))
    assert "TEMPERATURE=0.5" in dry.stdout and "MODEL_PATH=gs://b/m" in dry.stdout
    r = subprocess.run(["bash", LAUNCHER, "hosts", "h0,h1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert URL_PASSWORD not in r.stdout + r.stderr
    argvs = [open(os.path.join(rec, n), "rb").read() for n in os.listdir(rec) if n.startswith("argv.")]
    stdins = [open(os.path.join(rec, n), "rb").read() for n in os.listdir(rec) if n.startswith("stdin.")]
    assert len(argvs) == 2 and all(b"HOST_INDEX=" in a and URL_PASSWORD.encode() not in a for a in argvs)
    assert all(s.count(URL_PASSWORD.encode()) == 3 for s in stdins)


def test_run_sequence_kd_prints_url_passwords_as_stars(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\nexit 0\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "KDGEN_PYTHON": str(fake), "MODEL_PATH": "gs://b/m",
           "DATASET_PATH": f"https://u:{URL_PASSWORD}@h/d", "OUTPUT_PATH": f"gs://o:{URL_PASSWORD}@b/out"}
    r = subprocess.run(["bash", os.path.join(SCRIPTS, "run_sequence_kd.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert URL_PASSWORD not in r.stdout + r.stderr and "https://***@h/d" in r.stdout


def restricted_path(tmp_path) -> str:
    """A PATH with the tools the launcher needs and no python3."""
    d = tmp_path / "nopython"
    d.mkdir()
    for tool in ("bash", "sed", "tr", "awk", "date", "mkdir", "dirname", "cat", "tail", "grep", "env"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        os.symlink(found, d / tool)
    return str(d)


def test_launcher_fails_loudly_when_it_cannot_list_the_knobs(tmp_path):
    """Without a python that imports kdgen, MODEL_PATH, DATASET_PATH, TEMPERATURE, ... cannot be
    forwarded: exit 2 with one line, or (a python was found after all) every knob is forwarded."""
    base = {"PATH": restricted_path(tmp_path), "DRY_RUN": "1", "LOG_DIR": str(tmp_path / "logs"),
            "MODEL_PATH": "gs://b/m", "DATASET_PATH": "gs://b/d", "TEMPERATURE": "0.25"}
    r = subprocess.run(["bash", LAUNCHER, "hosts", "h0"], env={**base, "KDGEN_PYTHON": str(tmp_path / "no-python")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "KDGEN_PYTHON" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    r = subprocess.run(["bash", LAUNCHER, "hosts", "h0"], env=base, capture_output=True, text=True, timeout=60)
    forwarded = all(kv in r.stdout for kv in ("MODEL_PATH=gs://b/m", "DATASET_PATH=gs://b/d", "TEMPERATURE=0.25"))
    assert (r.returncode == 0 and forwarded) or (r.returncode == 2 and "cannot list kdgen's knobs" in r.stderr), r


KEY = "sk-serve-" + os.urandom(8).hex()
# Every spelling vLLM 0.32's `vllm serve` parser reads as --api-key (or --hf-token): checked below
# against the parser itself.
KEY_SPELLINGS = [f"--api-key {KEY}", f"--api_key {KEY}", f"--api-k {KEY}", f"--api-ke {KEY}", f"--api-key={KEY}",
                 f"--api_key={KEY}", f"--api-key.x {KEY}", f"--api {KEY}", f"--hf-token {KEY}", f"--hf_t={KEY}"]


def fake_python(tmp_path) -> tuple[str, str]:
    """A stand-in for KDGEN_PYTHON: `-m vllm.entrypoints.openai.api_server ...` records its argv and
    exits (the server "dies" at once); everything else runs the real python."""
    rec = tmp_path / "serve.argv"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = vllm.entrypoints.openai.api_server ]; then
  printf '%s\\0' "$@" > {rec}; echo "fake vllm serve: exiting"; exit 1
fi
exec {PYTHON} "$@"
""")
    fake.chmod(0o755)
    return str(fake), str(rec)


def run_all(tmp_path, tiny_model, **env) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "MODEL_PATH": tiny_model,
            "DATASET_PATH": str(tmp_path), "OUTPUT_PATH": str(tmp_path / "out"), "PORT": "18765",
            "TMPDIR": str(tmp_path), "PYTHONPATH": REPO}
    return subprocess.run(["bash", RUN_ALL], env={**base, **env}, capture_output=True, text=True, timeout=120)


# Ids without the random key: every xdist worker must collect the same ids.
@pytest.mark.parametrize("spelling", KEY_SPELLINGS, ids=[s.replace(KEY, "KEY") for s in KEY_SPELLINGS])
def test_run_all_refuses_every_spelling_of_the_key_in_vllm_serve_args(tmp_path, tiny_model, spelling):
    fake, rec = fake_python(tmp_path)
    r = run_all(tmp_path, tiny_model, KDGEN_PYTHON=fake, VLLM_SERVE_ARGS=f"--enforce-eager {spelling}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r
    assert "VLLM_SERVE_ARGS" in r.stderr and KEY not in r.stdout + r.stderr
    assert not os.path.exists(rec)  # no server started


def test_the_refused_spellings_are_what_vllms_parser_reads_as_the_key():
    """vLLM's own `vllm serve` parser (FlexibleArgumentParser: `_` read as `-`, abbreviations
    allowed, `--name.field`): each refused spelling sets api_key or hf_token, or is an error there."""
    code = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = {}
for spelling in json.loads(sys.argv[1]):
    parser = make_arg_parser(FlexibleArgumentParser())
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    try:
        ns = parser.parse_args(["--model", "m", *spelling.split()])
        out[spelling] = "key" if sys.argv[2] in json.dumps([ns.api_key, ns.hf_token], default=str) else "other"
    except ValueError as e:
        out[spelling] = "error: " + str(e)
print(json.dumps(out))
"""
    r = subprocess.run([PYTHON, "-c", code, json.dumps(KEY_SPELLINGS), KEY], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(v == "key" or v.startswith("error: ambiguous") for v in seen.values()), seen
    assert seen[f"--api-k {KEY}"] == seen[f"--api_key={KEY}"] == seen[f"--api-key.x {KEY}"] == "key"


def test_run_all_passes_other_args_unglobbed_and_writes_its_log_safely(tmp_path, tiny_model):
    """VLLM_SERVE_ARGS='*' reaches vllm serve as '*'; the default log is in a new 0700 directory (a
    symlink planted at the old fixed path is not followed); a SERVER_LOG that is a symlink is
    replaced by a new file, its target untouched."""
    fake, rec = fake_python(tmp_path)
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    planted = "/tmp/kdgen-vllm-serve-18765.log"
    if os.path.lexists(planted):
        os.remove(planted)
    os.symlink(target, planted)
    try:
        r = run_all(tmp_path, tiny_model, KDGEN_PYTHON=fake, VLLM_SERVE_ARGS="--served-model-name * --api-server-count 1")
    finally:
        os.remove(planted)
    assert r.returncode == 1 and "exited before it was healthy" in r.stderr, r
    argv = open(rec, "rb").read().split(b"\0")
    assert b"*" in argv and b"a-file" not in argv and b"--api-server-count" in argv
    assert target.read_text() == "keep me\n"
    logs = [d for d in os.listdir(tmp_path) if d.startswith("kdgen-vllm-serve-18765.")]
    assert len(logs) == 1 and os.stat(tmp_path / logs[0]).st_mode & 0o777 == 0o700
    assert "fake vllm serve: exiting" in (tmp_path / logs[0] / "server.log").read_text()
    link = tmp_path / "server.log"
    os.symlink(target, link)
    r = run_all(tmp_path, tiny_model, KDGEN_PYTHON=fake, SERVER_LOG=str(link))
    assert r.returncode == 1 and target.read_text() == "keep me\n" and not os.path.islink(link)
    assert "fake vllm serve: exiting" in link.read_text()


# ---- the private model and compile caches (items 20, 21) -------------------------------------------

def upload_dir(local: str, url: str) -> None:
    from kdgen import storage

    fs, root = storage.filesystem(url)
    for name in os.listdir(local):
        fs.pipe_file(f"{root}/{name}", open(os.path.join(local, name), "rb").read())


def test_the_default_cache_is_per_user_and_private(tmp_path, monkeypatch):
    from kdgen.engines import compile_cache

    monkeypatch.delenv("KDGEN_CACHE", raising=False)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.kdgen_cache() == str(tmp_path / "xdg" / "kdgen")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.kdgen_cache() == str(tmp_path / "home" / ".cache" / "kdgen")
    root = compile_cache.use_rank_cache()
    assert root == str(tmp_path / "home" / ".cache" / "kdgen" / "vllm" / "dp0") and os.environ["VLLM_CACHE_ROOT"] == root
    for d in (compile_cache.kdgen_cache(), root):
        assert os.stat(d).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("knob", ["KDGEN_CACHE", "VLLM_CACHE_ROOT"])
def test_a_cache_others_may_write_or_own_is_refused(tmp_path, monkeypatch, knob):
    """The model copy and the compile cache (loaded as code) refuse a directory writable by others
    or owned by another user: a settings error naming the knob."""
    from kdgen.engines import compile_cache
    from kdgen.config import ConfigError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv(knob, str(shared))
    with pytest.raises(ConfigError, match=rf"^{knob}: .*writable by other users"):
        compile_cache.use_rank_cache()
    if os.geteuid() == 0:  # root can give it to another user
        shared.chmod(0o700)
        os.chown(shared, 65534, 65534)
        with pytest.raises(ConfigError, match=rf"^{knob}: .*belongs to uid 65534"):
            compile_cache.use_rank_cache()


def test_a_gs_model_copy_is_keyed_by_its_generations_and_verified_before_use(tiny_model, gcs_server, tmp_path,
                                                                               monkeypatch):
    """A directory planted where the old cache looked (config.json and the marker) is never used;
    a model re-uploaded under the same name is fetched again; a cached copy whose file was changed
    in place is fetched again."""
    import hashlib

    from kdgen.engines.vllm_engine import localize_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("KDGEN_CACHE", str(cache))
    url = gcs_server.url("models", f"teacher-{os.urandom(4).hex()}")
    upload_dir(tiny_model, url)
    planted = cache / hashlib.sha1(url.encode()).hexdigest()[:12]  # the old layout: path hash + marker
    planted.mkdir(parents=True)
    (planted / "config.json").write_text('{"planted": true}')
    (planted / ".kdgen_complete").write_text("")
    first = localize_model(url)
    assert first != str(planted) and os.path.samefile(os.path.dirname(first), cache / "models")
    assert open(os.path.join(first, "config.json")).read() == open(os.path.join(tiny_model, "config.json")).read()
    assert localize_model(url) == first  # a verified copy is reused

    # Re-upload under the same name: other content, a new generation.
    config = json.load(open(os.path.join(tiny_model, "config.json")))
    from kdgen import storage

    fs, root = storage.filesystem(url)
    fs.pipe_file(f"{root}/config.json", json.dumps({**config, "reuploaded": 1}).encode())
    second = localize_model(url)
    assert second != first and json.load(open(os.path.join(second, "config.json")))["reuploaded"] == 1

    # A file of the copy changed in place (same size): found on the next use, fetched again.
    weights = next(n for n in os.listdir(second) if n.endswith(".safetensors"))
    with open(os.path.join(second, weights), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert localize_model(url) == second
    assert open(os.path.join(second, weights), "rb").read() == open(os.path.join(tiny_model, weights), "rb").read()


def test_a_shared_cache_is_refused_before_the_job_is_pinned(tiny_model, gcs_server, tmp_path):
    """A job whose gs:// model would be copied into a cache others may write: exit 2, one line
    naming KDGEN_CACHE, and nothing written to the output (no _job.json)."""
    from kdgen import tiny

    url = gcs_server.url("models", f"shared-{os.urandom(4).hex()}")
    upload_dir(tiny_model, url)
    shared, data, out = tmp_path / "shared", str(tmp_path / "data"), tmp_path / "out"
    shared.mkdir()
    shared.chmod(0o777)
    tiny.make_corpus(data, num_files=1, rows_per_file=5, seed=3)
    r = kdgen_cli("run", MODEL_PATH=url, DATASET_PATH=data, OUTPUT_PATH=str(out), KDGEN_CACHE=str(shared),
                  ENDPOINT="http://127.0.0.1:9/v1", MAX_RETRIES="0")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("kdgen: error: KDGEN_CACHE: ")
    assert not (out / "_job.json").exists()


def test_redact_leaves_prose_alone():
    from kdgen import redact

    for text in ("basic settings were used", "Bearer of bad news", "the password is wrong", "max_tokens=4096"):
        assert redact.redact(text) == text
    token = base64.b64encode(b"someone:else-entirely").decode()
    assert redact.redact(f"basic {token}") == "basic ***"
