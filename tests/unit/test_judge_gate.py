"""A self-rewarding judge (hosted in the driver) that times out cannot reach the generators after
its deadline: a call already inside the pool is waited for, every later call is refused, and a
fresh judge instance with its own gate serves the next round. Real threads, no Ray."""

import threading
import time

from actors.judging.host import GenerateGate
from actors.judging.pool import JudgePool
from judges.base import Completion, JudgeItem
from orchestrator.config import JudgeConfig


class SlowSelfJudge:
    """TEST-ONLY judge: scores by asking the policy (``generate``) ``calls`` times in a row."""

    def __init__(self, calls: int = 2):
        self.calls = calls

    @staticmethod
    def runs_in_driver(kwargs: dict) -> bool:
        return True

    def bind_generate(self, fn):
        self.generate = fn

    def score(self, items):
        for _ in range(self.calls):
            self.generate([item.prompt for item in items], 1, 1.0, 4)
        return [[1.0] * len(item.completions) for item in items]


class RecordingPool:
    """Stands for the generator pool: records every call's span; each takes ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds, self.spans = seconds, []

    def __call__(self, prompts, n, temperature, max_tokens):
        start = time.monotonic()
        time.sleep(self.seconds)
        self.spans.append((start, time.monotonic(), threading.get_ident()))
        return [["x"] for _ in prompts]


def test_a_timed_out_judge_never_touches_the_pool_after_score_returns():
    pool = RecordingPool(seconds=0.6)
    cfg = JudgeConfig(cls="tests.unit.test_judge_gate:SlowSelfJudge", kwargs={}, timeout_s=0.3)
    judges = JudgePool(cfg, generate_fn=pool, max_restarts=2)
    items = [JudgeItem("1+1=", [Completion("2"), Completion("3")], {})]
    result = judges.score(items)
    returned = time.monotonic()
    assert result.scores == [[None, None]] and result.failures == {"timeout": 2}
    assert judges.restarts == 1
    time.sleep(1.0)  # the abandoned thread goes on; its second generate call must be refused
    assert len(pool.spans) == 1 and pool.spans[0][1] <= returned  # the in-flight call ended before score returned

    # The replacement judge works (its own gate); the old gate stays closed.
    judges.cfg = cfg.model_copy(update={"timeout_s": 5.0})
    assert judges.score(items).scores == [[1.0, 1.0]] and len(pool.spans) == 3


def test_gate_refuses_after_its_deadline_and_serializes_calls():
    pool = RecordingPool(seconds=0.2)
    gate = GenerateGate(pool)
    threads = [threading.Thread(target=gate, args=(["a"], 1, 1.0, 2)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted(pool.spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two calls inside the pool at once
    gate.deadline = time.monotonic() - 1
    try:
        gate(["a"], 1, 1.0, 2)
        raise AssertionError("a call past the deadline went through")
    except TimeoutError as e:
        assert "past its deadline" in str(e)
    assert len(pool.spans) == 3
