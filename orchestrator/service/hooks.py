"""``Service``: what the loop calls at its hooks to run as a long-lived service.

The loop (``orchestrator/loop/loop.py``) calls:

- ``draw`` when it draws a round's prompts (the inbox first, then the dataset: ``inbox.py``) and
  ``sampling_overrides`` for the generator fields changed live;
- ``before_round`` at each round boundary: hold while paused, stop after the round when asked,
  apply the ``set`` requests due (``control.py``), then a rollback the gate made due (``gate.py``);
- ``state_after`` while it builds a round's next ``LoopState``: the round's ``inbox_prompts``,
  the gate's decision, ``rollbacks``, the run of rounds without pairs. Its result is committed
  with the round (``LoopState.service``, in the checkpoint's loop state), never before;
- ``check_idle`` after each round (``guards.py``), and ``first_eval`` after round 0's eval.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

from orchestrator.cli.resume_check import CHANGES_FILE
from orchestrator.config import ConfigError, build_config
from orchestrator.loop.data import PromptSampler
from orchestrator.rundir import RunDir, checkpoint_problem
from orchestrator.service.access import start_token
from orchestrator.service.control import Controls
from orchestrator.service.gate import describe_rollback, gate_step, rolled_back
from orchestrator.service.guards import LoopHalt, NoPairs, no_pairs_message
from orchestrator.service.inbox import Inbox, draw_rows, inbox_prompts, row_schema, write_schema

log = logging.getLogger("odpo.service")

Loop = Any  # orchestrator.loop.loop.Loop (it imports this module)


class Service:
    def __init__(self, config, rd: RunDir, metrics, stop: threading.Event, train_rows: list[dict]):
        self.c, self.rd, self.metrics, self.stop = config, rd, metrics, stop
        write_schema(rd.root, row_schema(train_rows, config.data.prompt_field, config.data.inbox.max_rows))
        self.inbox = Inbox(rd.root)
        self.controls = Controls(rd.root, stop, on_change=self._show_controls).start()
        self._show_controls(self.controls)
        self.token: str | None = None
        self.live: dict[str, Any] = {}
        """Fields changed live (``set``, the gate's lr), as they are now: kept by a resume."""
        self.config_seq = 0
        """The number of the last ``set`` request applied."""
        self.scanned = 0
        self.waiting_sets: list[tuple[int, dict]] = []
        self.applied_at = {row["request"]: row["round"] for row in self.journal() if row.get("request")}
        """Rounds at which requests were applied in an earlier life (a resume applies them there again)."""
        self.rolled_back_to: int | None = None

    # --- start, resume, close ------------------------------------------------------------------
    def open_token(self) -> str:
        """The token ``POST`` calls need (``access.py``); the log says where it is, never what."""
        self.token, source = start_token(self.rd.root, self.c.metrics.token_env)
        log.info("control and inbox token: %s", source)
        return self.token

    def resume(self, loop: Loop, saved: dict, changed_on_resume: set[str]) -> None:
        """Put back the live changes a checkpoint recorded (a key the resumed config itself
        changes keeps the resumed config's value)."""
        self.config_seq = self.scanned = int(saved.get("config_seq", 0))
        for key, value in (saved.get("live") or {}).items():
            if key in changed_on_resume:
                log.warning("resume: %s was set live to %s; the resumed config's value wins", key, json.dumps(value))
                continue
            self._assign(key, value)
            self.live[key] = value
            log.info("resume: %s = %s (set live before the checkpoint)", key, json.dumps(value))
        if "learner.lr" in self.live:
            loop.parts.learner.set_lr(self.c.learner.lr)

    def close(self) -> None:
        self.controls.close()

    # --- drawing prompts -----------------------------------------------------------------------
    def draw(self, loop: Loop, k: int) -> tuple[list[int], list[dict]]:
        return draw_rows(loop.sampler, loop.prompts.rows, self.inbox, self.c.data.inbox.share, k)

    def sampling_overrides(self) -> dict | None:
        """The generator fields changed live (the actors hold the config they started with)."""
        fields = {k.split(".", 1)[1] for k in self.live if k.startswith("generator.")}
        return {f: getattr(self.c.generator, f) for f in sorted(fields)} or None

    # --- the round boundary --------------------------------------------------------------------
    def before_round(self, loop: Loop, r: int, save_checkpoint: Callable) -> bool:
        """Run before round ``r`` starts; False when the run must stop instead."""
        self.rolled_back_to = None
        self.controls.poll()
        if self.controls.paused and not self.stop.is_set():
            self._hold(r)
        if self.controls.stop_after_round and not self.stop.is_set():
            log.info("control: stopping before round %d (stop --after-round)", r)
            self.stop.set()
        if self.stop.is_set():
            return False
        self.apply_due_sets(loop, r)
        if self.c.loop.rounds and r > self.c.loop.rounds:  # loop.rounds lowered live
            return False
        self.roll_back_if_due(loop, r, save_checkpoint)
        self.metrics.update_status(inbox_waiting=self.inbox.waiting(loop.sampler.inbox))
        return True

    def _hold(self, r: int) -> None:
        log.info("paused before round %d: actors stay up; `odpo ctl RUN resume` (or POST /control/resume) "
                 "continues", r)
        self.metrics.set_phase("paused", r - 1)
        self.rd.write_status(self.metrics.status())
        while self.controls.paused and not self.stop.is_set():
            self.stop.wait(0.5)
            self.controls.poll()
        log.info("%s before round %d", "stopped while paused" if self.stop.is_set() else "resumed", r)

    def _show_controls(self, controls: Controls) -> None:
        self.metrics.update_status(paused=controls.paused, stop_after_round=controls.stop_after_round)

    def apply_due_sets(self, loop: Loop, r: int) -> None:
        """Apply, in order, the ``set`` requests published so far (one applied in an earlier life
        waits for the round it was applied at then)."""
        found, self.scanned = self.controls.sets_after(self.scanned)
        self.waiting_sets += found
        while self.waiting_sets and self.applied_at.get(self.waiting_sets[0][0], r) <= r:
            number, request = self.waiting_sets.pop(0)
            via = request.get("via", "odpo ctl")
            self.apply_changes(loop, r, request.get("changes") or {}, via=via, request=number)
            self.config_seq = number

    def apply_changes(self, loop: Loop, r: int, changes: dict, via: str, request: int | None = None) -> bool:
        """Change config fields at the start of round ``r`` (validated as a whole config first)
        and record it in ``config_changes.jsonl``; False (logged, recorded) when refused."""
        data = self.c.model_dump(mode="json")
        for key, value in changes.items():
            section, field = key.split(".", 1)
            data[section][field] = value
        try:
            build_config(data)
        except ConfigError as e:
            log.error("control: %s refused at round %d: %s", via, r, "; ".join(e.problems))
            self._record({"round": r, "via": via, "request": request, "refused": e.problems, "changes": []})
            return False
        rows = []
        for key, value in changes.items():
            old = self._value(key)
            self._assign(key, value)
            self.live[key] = new = self._value(key)
            rows.append({"key": key, "old": old, "new": new, "alters_training": True})
        if "learner.lr" in changes:
            loop.parts.learner.set_lr(self.c.learner.lr)
        self._record({"round": r, "via": via, "request": request, "changes": rows})
        log.info("round %d: %s (%s)", r, ", ".join(f"{x['key']} {x['old']} -> {x['new']}" for x in rows), via)
        return True

    def _assign(self, key: str, value: Any) -> None:
        section, field = key.split(".", 1)
        setattr(getattr(self.c, section), field, value)

    def _value(self, key: str) -> Any:
        section, field = key.split(".", 1)
        return getattr(self.c, section).model_dump(mode="json")[field]

    def journal(self) -> list[dict]:
        path = self.rd.root / CHANGES_FILE
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line
        return rows

    def _record(self, row: dict) -> None:
        """Append to ``config_changes.jsonl`` (fsync'd), once per (request or gate, round)."""
        key = (row.get("request"), row["via"], row["round"])
        if any((old.get("request"), old.get("via"), old.get("round")) == key for old in self.journal()):
            return  # a redo of a round that had applied it before a crash
        path = self.rd.root / CHANGES_FILE
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), **row}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if row.get("request"):
            self.applied_at[row["request"]] = row["round"]

    # --- the gate -------------------------------------------------------------------------------
    def first_eval(self, loop: Loop, value: float | None, save_checkpoint: Callable) -> None:
        """Round 0's eval is the gate's first best: its checkpoint is what a rollback may return to."""
        gate = self.c.loop.gate
        if not gate.enabled or value is None or gate.metric != "eval_reward":
            return
        loop.state.service = {**loop.state.service, "gate": gate_step(gate, None, 0, value)}
        save_checkpoint(loop.state)
        loop.last_checkpointed = 0

    def roll_back_if_due(self, loop: Loop, r: int, save_checkpoint: Callable) -> None:
        gate_cfg, state = self.c.loop.gate, dict(loop.state.service.get("gate") or {})
        best = state.get("rollback_due")
        if best is None:
            return
        path = self.rd.checkpoint_path(best)
        problem = checkpoint_problem(path) if path.exists() else "missing"
        if problem:
            raise LoopHalt(f"loop.gate: cannot roll back to round {best}: checkpoint {path}: {problem}")
        saved = self.rd.read_checkpoint_state(path)
        if loop.pending is not None:  # async: round r was being sampled by the policy rolled back from
            loop.collect(loop.pending)
            loop.pending = None
            loop.sampler = PromptSampler.from_state(loop.state.sampler, len(loop.prompts), self.c.run.seed)
        loop.parts.learner.load(str(path))
        old_lr = self.c.learner.lr
        self.apply_changes(loop, r, {"learner.lr": old_lr * gate_cfg.lr_backoff}, via="gate rollback")
        log.warning(describe_rollback(gate_cfg, state, loop.state.round, state.get("last"), old_lr, self.c.learner.lr))
        # The restored weights get a new version: a version names one set of weights.
        loop.learner_version = max(loop.learner_version, loop.state.policy_version) + 1
        loop.push_weights(force=True)
        loop.committed_version = loop.learner_version
        loop.state.beta = saved.get("beta")
        loop.state.service = {**loop.state.service, "live": dict(self.live), "config_seq": self.config_seq,
                              "gate": rolled_back(state)}
        save_checkpoint(loop.state)  # replaces the last round's: recovery and resume start from here
        loop.last_checkpointed = loop.state.round
        self.rolled_back_to = best

    # --- the round's state and figures ------------------------------------------------------------
    def state_after(self, loop: Loop, r: int, rows: list[dict], rec: dict) -> dict:
        """The service's part of round ``r``'s next state; adds the round's figures to ``rec``."""
        previous = loop.state.service or {}
        gate, gate_cfg = previous.get("gate"), self.c.loop.gate
        rec["inbox_prompts"] = inbox_prompts(rows)
        if gate_cfg.enabled:
            gate = gate_step(gate_cfg, gate, r, rec.get(gate_cfg.metric))
            rec["gate"] = {k: gate[k] for k in ("best_round", "best", "below", "rollback_due")}
        rec["rollbacks"] = (gate or {}).get("rollbacks", 0)
        if self.rolled_back_to is not None:
            rec["rolled_back_to"] = self.rolled_back_to
        idle = 0 if rec.get("pairs") else previous.get("idle", 0) + 1
        return {"live": dict(self.live), "config_seq": self.config_seq, "gate": gate, "idle": idle}

    def checkpoint_due(self, state, r: int) -> bool:
        """A new best round of the gate is checkpointed whatever ``loop.checkpoint_every`` says."""
        return self.c.loop.gate.enabled and ((state.service or {}).get("gate") or {}).get("best_round") == r

    @staticmethod
    def protected(state) -> set[int]:
        """Checkpoints never pruned: the gate's best round."""
        best = ((state.service or {}).get("gate") or {}).get("best_round")
        return set() if best is None else {best}

    def check_idle(self, loop: Loop) -> None:
        limit, streak = self.c.loop.max_rounds_without_pairs, (loop.state.service or {}).get("idle", 0)
        if limit and streak >= limit:
            raise NoPairs(no_pairs_message(self.rd.read_metrics()[-streak:], limit))
