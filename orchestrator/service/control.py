"""Live control: pause, resume, stop and ``set`` a running loop, without a restart.

A request (``odpo ctl RUN ...`` or ``POST /control/...``) is checked, then published as
``control/request_NNNNNN.json`` (``mailbox``) before the caller gets an answer. In the driver a
watcher reads new requests every half second (the HTTP handler also reads them at once):

- ``pause``: the current round finishes and no other starts (actors stay up; ``/status`` says
  ``paused``) until ``resume``;
- ``stop``: as SIGTERM (a round not yet learning is abandoned, one learning is finished), then a
  checkpoint and exit 0; ``stop --after-round`` finishes the current round first;
- ``set KEY=VALUE ...``: only ``LIVE_FIELDS``, validated like the config; applied at the start of
  the next round by the loop (``orchestrator/service/hooks.py``), which writes each change with
  its round to ``config_changes.jsonl`` and keeps it in the checkpoint's loop state.

Requests published while no driver runs: ``set`` ones are applied when the run resumes; pause,
resume and stop act on the live run only (a new start ignores the older ones).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config import ConfigError, RunConfig, apply_override, describe_error
from orchestrator.service import mailbox

log = logging.getLogger("odpo.control")

LIVE_FIELDS = ("learner.beta", "learner.lr", "generator.temperature", "generator.top_p", "generator.n",
               "loop.prompts_per_round", "loop.eval_every", "loop.checkpoint_every", "loop.rounds")
"""The fields ``set`` may change while the run goes on: none of them changes a model's shape, an
actor's resources or what the run directory holds."""

REQUESTS_DIR = "control"
STEM, SUFFIX = "request", ".json"
ACTIONS = ("pause", "resume", "stop", "set")


def check_set(config: dict, assignments: list[str]) -> dict[str, Any]:
    """``{key: value}`` for ``KEY=VALUE`` assignments (values parsed as YAML, as ``--set`` does),
    each validated by its section's model against ``config`` (a config tree, e.g. the run's
    ``config.yaml``); ``ConfigError`` naming every refused field."""
    problems, tree = [], {}
    keys = []
    for assignment in assignments:
        key, sep, _ = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{assignment}: expected KEY=VALUE, e.g. learner.beta=0.2")
        elif key not in LIVE_FIELDS:
            problems.append(f"{key}: cannot be changed while the run goes on (live: {', '.join(LIVE_FIELDS)}); "
                            f"stop the run and resume it with --set {key}=... --allow-config-change")
        else:
            section = key.split(".")[0]
            tree.setdefault(section, dict(config.get(section) or {}))
            apply_override(tree, assignment)
            keys.append(key)
    if problems:
        raise ConfigError(problems)
    if not keys:
        raise ConfigError(["set: nothing to change (give KEY=VALUE, e.g. learner.beta=0.2)"])
    values = {}
    for section, fields in tree.items():
        try:
            model = RunConfig.model_fields[section].annotation.model_validate(fields)
        except ValidationError as e:
            problems += [describe_error({**err, "loc": (section, *err["loc"])}) for err in e.errors()]
            continue
        dumped = model.model_dump(mode="json")
        values.update({k: dumped[k.split(".", 1)[1]] for k in keys if k.startswith(section + ".")})
    if problems:
        raise ConfigError(problems)
    return values


def assignments_from_json(body: dict) -> list[str]:
    """``{"learner.beta": 0.2}`` as ``["learner.beta=0.2"]`` (JSON is YAML)."""
    if not isinstance(body, dict):
        raise ConfigError(["set: expected a JSON object of {\"section.field\": value}"])
    return [f"{k}={json.dumps(v)}" for k, v in body.items()]


def publish_request(run_dir: Path, request: dict) -> int:
    """Write a request durably; returns its number."""
    if request.get("action") not in ACTIONS:
        raise ValueError(f"unknown control action {request.get('action')!r} (one of {', '.join(ACTIONS)})")
    text = json.dumps({**request, "time": time.time()}) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    number, _ = mailbox.publish(Path(run_dir) / REQUESTS_DIR, STEM, SUFFIX, write)
    return number


class Controls:
    """The driver's side: pause, stop and the numbers of the requests seen so far."""

    def __init__(self, run_dir: Path, stop: threading.Event, on_change=None):
        self.folder = Path(run_dir) / REQUESTS_DIR
        self.stop = stop
        self.on_change = on_change or (lambda controls: None)
        self.paused = False
        self.stop_after_round = False
        self.seen = mailbox.last_number(self.folder, STEM, SUFFIX)  # an earlier life's requests
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self, number: int) -> dict | None:
        try:
            return json.loads(mailbox.numbered(self.folder, STEM, SUFFIX, number).read_text())
        except FileNotFoundError:
            return None

    def poll(self) -> None:
        """Act on the requests published since the last look (pause, resume, stop; ``set`` ones
        wait for the round boundary)."""
        with self._lock:
            while (request := self.read(self.seen + 1)) is not None:
                self.seen += 1
                self._act(self.seen, request)

    def _act(self, number: int, request: dict) -> None:
        action = request.get("action")
        if action == "pause":
            self.paused = True
            log.info("control: pause (request %d): no round starts after the current one until resume", number)
        elif action == "resume":
            self.paused = False
            log.info("control: resume (request %d)", number)
        elif action == "stop" and request.get("after_round"):
            self.stop_after_round = True
            log.info("control: stop after the current round (request %d)", number)
        elif action == "stop":
            log.info("control: stop (request %d): finishing or abandoning the round, then checkpointing", number)
            self.stop.set()
        elif action == "set":
            log.info("control: set %s (request %d): applies at the start of the next round",
                     ", ".join(f"{k}={v}" for k, v in request.get("changes", {}).items()), number)
        self.on_change(self)

    def sets_after(self, number: int) -> tuple[list[tuple[int, dict]], int]:
        """Every ``set`` request numbered above ``number``, in order (this life's and earlier
        ones'), and the number of the last request read."""
        out = []
        while (request := self.read(number + 1)) is not None:
            number += 1
            if request.get("action") == "set":
                out.append((number, request))
        return out, number

    def start(self, every_s: float = 0.5) -> "Controls":
        def watch():
            while not self._closed.wait(every_s):
                try:
                    self.poll()
                except Exception as e:  # a bad request file must not end the watcher
                    log.warning("control: reading %s failed: %s: %s", self.folder, type(e).__name__, e)

        self._thread = threading.Thread(target=watch, name="odpo-control", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
