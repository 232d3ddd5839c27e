"""Security basics: the metrics endpoint binds loopback by default, secrets are redacted from the
saved and printed config, the OpenAI judge never keeps or shows its key, checkpoints are read
only with safetensors / ``torch.load(weights_only=True)``, and ``odpo validate`` warns about a
public metrics endpoint or a secret written into the config."""

import ast
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from judges.base import Completion, JudgeItem
from orchestrator.config import MetricsConfig, RunConfig, dump_config, load_config
from orchestrator.observe.metrics import Metrics
from orchestrator.security import config_warnings, is_loopback, is_secret_key, redact_secrets
from tests.conftest import REPO

# --- the metrics endpoint ------------------------------------------------------------------------

def test_metrics_endpoint_binds_loopback_by_default():
    assert MetricsConfig().host == "127.0.0.1" and RunConfig().metrics.host == "127.0.0.1"
    assert load_config(REPO / "configs" / "demo.yaml").metrics.host == "127.0.0.1"
    m = Metrics("unit")
    m.serve(MetricsConfig().host, 0)  # port 0: any free port, on the default interface
    try:
        assert m._server.server_address[0] == "127.0.0.1"
    finally:
        m.close()


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("metrics.example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# --- secrets in the config -------------------------------------------------------------------------

SECRET_CONFIG = {
    "judge": {"cls": "judges.verifiable:VerifiableJudge", "kwargs": {
        "api_key": "sk-live-123", "api_key_env": "OPENAI_API_KEY", "max_tokens": 64,
        "headers": {"Authorization": "Bearer abc.def", "X-Request-Source": "odpo"},
        "base_url": "https://user:hunter2@llm.example.org/v1", "token_budget": 4096,
        "endpoints": [{"url": "http://a:1/v1", "Password": "p4ss"}],
    }},
    "generator": {"engine": {"hf_token": "hf_abcdef", "kv_cache_memory_bytes": 1 << 26}},
    "model": {"tokenizer": "assets/demo/model"},
}


@pytest.mark.parametrize("key, secret", [
    ("api_key", True), ("API_KEY", True), ("apiKey", True), ("hf_token", True), ("access_token", True),
    ("X-Auth-Token", True), ("Authorization", True), ("client_secret", True), ("password", True),
    ("api_key_env", False), ("max_tokens", False), ("tokenizer", False), ("max_new_tokens", False),
    ("cache_key", False), ("author", False), ("prompt_field", False),
])
def test_is_secret_key(key, secret):
    assert is_secret_key(key) is secret


def test_dump_config_redacts_secrets_at_any_depth_and_round_trips_the_rest(tmp_path):
    config = RunConfig.model_validate(SECRET_CONFIG)
    text = dump_config(config)
    for secret in ("sk-live-123", "abc.def", "hunter2", "p4ss", "hf_abcdef"):
        assert secret not in text
    dumped = yaml.safe_load(text)
    kwargs = dumped["judge"]["kwargs"]
    assert kwargs["api_key"] == "***" and kwargs["headers"]["Authorization"] == "***"
    assert kwargs["endpoints"] == [{"url": "http://a:1/v1", "Password": "***"}]
    assert kwargs["base_url"] == "https://user:***@llm.example.org/v1"
    assert dumped["generator"]["engine"] == {"hf_token": "***", "kv_cache_memory_bytes": 1 << 26}
    # Everything that is not a secret is kept as it was and loads back to the same config.
    assert kwargs["api_key_env"] == "OPENAI_API_KEY" and kwargs["max_tokens"] == 64 and kwargs["token_budget"] == 4096
    assert kwargs["headers"]["X-Request-Source"] == "odpo"
    (tmp_path / "c.yaml").write_text(text)
    back = load_config(tmp_path / "c.yaml").model_dump(mode="json")
    assert back == redact_secrets(config.model_dump(mode="json"))
    plain = load_config(REPO / "configs" / "demo.yaml")
    (tmp_path / "demo.yaml").write_text(dump_config(plain))
    assert load_config(tmp_path / "demo.yaml") == plain  # no secrets: an exact round trip


def test_config_warnings_name_literal_secrets_and_public_binds():
    config = RunConfig.model_validate({**SECRET_CONFIG, "metrics": {"host": "0.0.0.0", "port": 9400}})
    warnings = config_warnings(config)
    assert warnings[0].startswith("metrics.host 0.0.0.0 binds a public interface; ")
    assert [w.split(" ", 1)[0] for w in warnings[1:]] == [
        "generator.engine.hf_token", "judge.kwargs.api_key", "judge.kwargs.headers.Authorization",
        "judge.kwargs.endpoints[0].Password"]
    assert all("sk-live" not in w and "hf_abc" not in w for w in warnings)
    for host, port in (("0.0.0.0", 0), ("127.0.0.1", 9400), ("::1", 9400)):
        assert config_warnings(RunConfig(metrics={"host": host, "port": port})) == []


def validate(*overrides, config="configs/demo.yaml"):
    args = [sys.executable, "-m", "orchestrator", "validate", config]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_validate_warns_about_a_public_metrics_endpoint():
    out = validate("metrics.host=0.0.0.0", "metrics.port=9400")
    assert out.returncode == 0
    assert out.stderr.splitlines() == [
        "warning: metrics.host 0.0.0.0 binds a public interface; the metrics and /status endpoint (port 9400) "
        "has no authentication (its POST routes, the inbox and live control, need the run's token): keep "
        "127.0.0.1 and scrape through a tunnel or a sidecar, or firewall the port"]
    assert yaml.safe_load(out.stdout)["metrics"] == {"host": "0.0.0.0", "port": 9400,  # stdout stays the config
                                                     "token_env": "ODPO_CONTROL_TOKEN"}
    quiet = validate("metrics.port=9400")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_validate_prints_the_config_redacted_and_warns_about_the_literal_key():
    out = validate("generator.engine.hf_token=hf_abcdef")
    assert out.returncode == 0
    assert "hf_abcdef" not in out.stdout + out.stderr
    assert yaml.safe_load(out.stdout)["generator"]["engine"]["hf_token"] == "***"
    assert out.stderr.startswith("warning: generator.engine.hf_token holds a literal secret")


# --- the OpenAI judge's key ------------------------------------------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append(self.headers.get("Authorization"))
        if len(_Recorder.seen) == 1:
            self.send_error(500)  # retried, and the failure is counted without the key
            return
        body = json.dumps({"choices": [{"message": {"content": "Score: 4"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_openai_judge_reads_the_key_from_the_environment_and_never_keeps_or_shows_it(monkeypatch, caplog):
    import pickle

    from judges.openai import OpenAIJudge

    key = "sk-test-do-not-leak-0123456789"
    monkeypatch.setenv("ODPO_TEST_KEY", key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen = []
    caplog.set_level("DEBUG")
    try:
        judge = OpenAIJudge(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m",
                            api_key_env="ODPO_TEST_KEY", retries=1, backoff_s=0.01, timeout_s=10)
        scores = judge.score([JudgeItem("1+1=", [Completion("2")], {})])
    finally:
        server.shutdown()
        server.server_close()
    assert scores == [[4.0]]  # the reply "Score: 4", parsed
    assert _Recorder.seen == [f"Bearer {key}"] * 2  # sent on every request, read from the environment
    failures = judge.pop_failures()
    assert failures == {"retried": 1}
    shown = repr(judge) + str(vars(judge)) + str(failures) + caplog.text
    assert key not in shown
    state = {k: v for k, v in vars(judge).items() if k != "_lock"}  # what a copy of the judge would carry
    assert key.encode() not in pickle.dumps(state)
    assert "ODPO_TEST_KEY" in repr(judge)  # the variable's name is what the judge holds


# --- checkpoints are loaded without pickle ---------------------------------------------------------

def _unsafe_loads(path) -> list[str]:
    """``torch.load`` calls without ``weights_only=True``, and any ``pickle``/``cloudpickle``
    load, in one Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{node.lineno}"
        if owner_name == "torch" and node.func.attr == "load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"{where}: torch.load without weights_only=True")
        if owner_name in ("pickle", "cloudpickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
            found.append(f"{where}: {owner_name}.{node.func.attr}")
        if owner_name == "np" and node.func.attr == "load" and any(
                k.arg == "allow_pickle" and getattr(k.value, "value", False) is True for k in node.keywords):
            found.append(f"{where}: np.load(allow_pickle=True)")
    return found


def test_no_pickle_based_loading_in_the_sources(tmp_path):
    files = [p for d in ("orchestrator", "actors", "judges") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    assert [f for p in files for f in _unsafe_loads(p)] == []
    # The checker itself finds what it looks for.
    probe = tmp_path / "probe.py"
    probe.write_text("import torch, pickle\ntorch.load('x')\ntorch.load('y', weights_only=False)\n"
                     "torch.load('z', map_location='cpu', weights_only=True)\npickle.loads(b'')\n")
    assert [f.split(": ", 1)[1] for f in _unsafe_loads(probe)] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads"]
