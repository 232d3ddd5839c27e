"""Every Prometheus object of odpo, on its own registry, and the HTTP server that serves them.

Actors return numbers; the loop hands each round's record to ``Metrics.record_round`` and its
phase to ``Metrics.set_phase``. The server answers ``/metrics`` (Prometheus text format),
``/healthz`` and ``/status`` (JSON: run name, round, phase, the phase's ``progress``, policy
version, last round's figures, ``paused``, ``inbox_waiting``). It binds ``metrics.host``
(127.0.0.1 unless configured otherwise). ``POST`` requests go to the handler ``serve`` is given
(the inbox and live control: ``orchestrator/service/routes.py``), which checks the token.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Round figures exported as gauges: metrics.jsonl key -> (metric name, help).
GAUGES = {
    "policy_version": ("odpo_policy_version", "Policy version served by the generators"),
    "reward_mean": ("odpo_judge_reward_mean", "Mean judge score of the round's completions"),
    "reward_chosen": ("odpo_pairs_reward_chosen", "Mean judge score of chosen answers"),
    "reward_rejected": ("odpo_pairs_reward_rejected", "Mean judge score of rejected answers"),
    "loss": ("odpo_learner_loss", "Mean DPO loss of the round"),
    "reward_accuracy": ("odpo_learner_reward_accuracy_ratio", "Share of pairs with chosen implicit reward > rejected"),
    "reward_margin": ("odpo_learner_reward_margin", "Mean implicit reward margin (chosen - rejected)"),
    "logp_chosen": ("odpo_learner_logp_chosen", "Mean policy log-prob of chosen answers"),
    "logp_rejected": ("odpo_learner_logp_rejected", "Mean policy log-prob of rejected answers"),
    "kl": ("odpo_learner_kl", "KL estimate to the reference on chosen answers"),
    "beta": ("odpo_learner_beta", "DPO beta of the last round (learner.beta, or its schedule's value)"),
    "lr": ("odpo_learner_lr", "Learning rate of the last round's last optimizer step (learner.lr times lr_schedule's factor)"),
    "len_chosen_mean": ("odpo_pairs_chosen_tokens_mean", "Mean length of chosen answers in tokens"),
    "len_rejected_mean": ("odpo_pairs_rejected_tokens_mean", "Mean length of rejected answers in tokens"),
    "longer_chosen_share": ("odpo_pairs_longer_chosen_ratio", "Share of pairs of unequal length whose chosen answer is longer"),
    "gen_tokens_per_s": ("odpo_generator_tokens_per_second", "Generated tokens per second in the round"),
    "policy_lag": ("odpo_loop_policy_lag", "Policy versions between sampling and training"),
    "eval_reward": ("odpo_eval_reward", "Held-out greedy reward at the last eval round"),
    "round_s": ("odpo_loop_round_seconds_last", "Seconds of the last round"),
}
PHASE_SECONDS = ("gen_s", "judge_s", "learn_s", "sync_s", "round_s")
COUNTS = {
    "prompts": ("odpo_loop_prompts_total", "Prompts drawn"),
    "completions": ("odpo_generator_completions_total", "Completions sampled"),
    "pairs": ("odpo_pairs_total", "Preference pairs kept"),
    "gen_tokens": ("odpo_generator_tokens_total", "Tokens generated"),
    "inbox_prompts": ("odpo_loop_inbox_prompts_total", "Prompts drawn from the inbox (odpo add-prompts, POST /prompts)"),
}


MAX_POST_BYTES = 64 << 20
"""Largest POST body read (an inbox batch); a larger one is answered 413."""


class Metrics:
    def __init__(self, run_name: str):
        self.run_name = run_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.round = Gauge("odpo_loop_round", "Last completed round", registry=r)
        self.gauges = {k: Gauge(name, doc, registry=r) for k, (name, doc) in GAUGES.items()}
        self.counts = {k: Counter(name.removesuffix("_total"), doc, registry=r) for k, (name, doc) in COUNTS.items()}
        self.dropped = Counter("odpo_pairs_dropped", "Prompts that yielded no pair, by reason", ["reason"], registry=r)
        self.by_source = Counter("odpo_pairs_by_source", "Preference pairs kept, by source (best_worst, correction)",
                                 ["source"], registry=r)
        self.failures = Counter("odpo_failures", "Failures by component and kind", ["component", "kind"], registry=r)
        self.restarts = Gauge("odpo_actor_restarts", "Actor restarts so far, by kind", ["kind"], registry=r)
        self.rss = Gauge("odpo_process_rss_bytes", "Resident memory of the driver and each local actor", ["process"], registry=r)
        self.skipped_steps = Counter("odpo_learner_skipped_steps", "Optimizer steps skipped for NaN/inf", registry=r)
        self.rollbacks = Counter("odpo_loop_rollbacks", "Rollbacks of the evaluation gate (loop.gate)", registry=r)
        self._rollbacks_seen = 0
        self.phase_seconds = Histogram(
            "odpo_loop_phase_seconds", "Seconds per phase of a round", ["phase"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
        )
        self._lock = threading.Lock()
        self._status = {"run": run_name, "round": 0, "phase": "starting", "policy_version": 0,
                        "last_round": None, "started_at": time.time()}
        self._server: ThreadingHTTPServer | None = None

    # --- recording ---------------------------------------------------------------------------
    def set_phase(self, phase: str, round_: int | None = None, **extra) -> None:
        with self._lock:
            self._status["phase"] = phase
            self._status.pop("progress", None)
            if round_ is not None:
                self._status["round"] = round_
            self._status.update(extra)

    def set_progress(self, phase: str, round_: int, done: int, total: int, unit: str) -> bool:
        """Progress inside ``phase`` of ``round_`` (``orchestrator/observe/progress.py``); ignored, and
        False returned, when the loop has moved on to another phase meanwhile."""
        with self._lock:
            if self._status.get("phase") != phase or self._status.get("round") != round_:
                return False
            self._status["progress"] = {"done": done, "total": total, "unit": unit}
            return True

    def record_round(self, record: dict) -> None:
        for key, gauge in self.gauges.items():
            value = record.get(key)
            if isinstance(value, (int, float)):
                gauge.set(value)
        for key, counter in self.counts.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and value > 0:
                counter.inc(value)
        for reason, n in (record.get("pairs_dropped") or {}).items():
            if n:
                self.dropped.labels(reason=reason).inc(n)
        for source, n in (record.get("pairs_by_source") or {}).items():
            if n:
                self.by_source.labels(source=source).inc(n)
        for component in ("judge_failures", "generator_failures", "learner_failures", "corrector_failures"):
            for kind, n in (record.get(component) or {}).items():
                if n:
                    self.failures.labels(component=component.split("_")[0], kind=kind).inc(n)
        for kind, n in (record.get("restarts") or {}).items():
            self.restarts.labels(kind=kind).set(n)
        for process, mb in (record.get("rss_mb") or {}).items():
            self.rss.labels(process=process).set(mb * 2**20)
        if record.get("skipped_steps"):
            self.skipped_steps.inc(record["skipped_steps"])
        if record.get("rollbacks", 0) > self._rollbacks_seen:  # the line's count is the run's total
            self.rollbacks.inc(record["rollbacks"] - self._rollbacks_seen)
            self._rollbacks_seen = record["rollbacks"]
        for key in PHASE_SECONDS:
            value = record.get(key)
            if isinstance(value, (int, float)):
                self.phase_seconds.labels(phase=key.removesuffix("_s")).observe(value)
        self.round.set(record.get("round", 0))
        with self._lock:
            self._status["last_round"] = record
            self._status["policy_version"] = record.get("policy_version", 0)

    def update_status(self, **fields) -> None:
        """Set fields of ``/status`` that outlive a phase (``paused``, ``inbox_waiting``)."""
        with self._lock:
            self._status.update(fields)

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # --- serving -----------------------------------------------------------------------------
    def serve(self, host: str, port: int, post=None) -> int:
        """Start the HTTP server in a daemon thread; returns the bound port. ``post(path, headers,
        body) -> (status, JSON answer)`` answers POST requests (none: 404)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = metrics.exposition(), CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    body, ctype = b"ok\n", "text/plain"
                elif path == "/status":
                    body, ctype = json.dumps(metrics.status(), default=str).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if post is None:
                    code, answer = 404, {"error": "this server takes no POST requests"}
                elif length > MAX_POST_BYTES:
                    code, answer = 413, {"error": f"body over {MAX_POST_BYTES} bytes"}
                    self.close_connection = True
                else:
                    code, answer = post(self.path.split("?", 1)[0], self.headers, self.rfile.read(length))
                body = json.dumps(answer, default=str).encode() + b"\n"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep scrapes out of the job log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="odpo-metrics", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
