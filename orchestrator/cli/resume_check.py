"""What ``odpo run`` does with a run directory that already holds a run, before Ray starts.

Without ``--resume`` such a directory (checkpoints, or metrics lines) is refused: a run is only
continued on purpose. With ``--resume`` the run's saved ``config.yaml`` is compared with the new
config. Changes to operational keys (run length, timeouts, restarts, evaluation, checkpointing,
metrics, trackers, logging, faults, resources: ``OPERATIONAL``) are accepted and logged; a change to anything that
alters training (model, data, generator sampling, judge, pairs, learner, sync backend) is an
error listing each changed key with its old and new value, unless ``--allow-config-change``.
Every accepted change is appended to the run's ``config_changes.jsonl``. Secrets are ``***`` in
both configs (``dump_config`` redacts them), so a changed secret is not seen as a change.

A LoRA run's checkpoint names the base model its adapter was trained on (path and hashes): a resume
whose ``model.path`` holds another model is refused whatever the flags (``check_lora_base``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from typing import Any

import yaml

from orchestrator.config import ConfigError, RunConfig, dump_config
from orchestrator.rundir import RunDir

log = logging.getLogger("odpo")

CHANGES_FILE = "config_changes.jsonl"

OPERATIONAL = (
    "run.output_dir",
    "loop.rounds", "loop.eval_every", "loop.checkpoint_every", "loop.keep_checkpoints",
    "loop.max_actor_restarts", "loop.max_round_retries", "loop.max_rounds_without_pairs",
    "data.eval_source", "data.eval_split", "data.eval_size",
    "*.timeout_s", "*.start_timeout_s", "*.setup_timeout_s",
    "generator.num_cpus", "judge.num_cpus", "learner.num_cpus_per_worker", "*.resources.*",
    "sync.disk_path", "sync.shm_dir", "sync.nccl_bucket_mb", "sync.nccl_port",
    "metrics.*", "faults.*", "report.*", "log.*",
)
"""Keys (``fnmatch`` patterns on dotted paths) that may change on resume: none of them changes
what the learner is trained on or how."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"loop": {"rounds": 4}}`` -> ``{"loop.rounds": 4}``; lists are leaves, empty dicts vanish
    (``kwargs: {}`` and ``kwargs: {mode: x}`` differ in ``kwargs.mode`` only)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def is_operational(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in OPERATIONAL)


_MISSING = "<unset>"


def config_changes(old: dict, new: dict) -> list[dict]:
    """Each dotted key whose value differs between two config trees: key, old, new, and whether
    it alters training."""
    a, b = flatten(old), flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, _MISSING), b.get(key, _MISSING)
        if before != after:
            changes.append({"key": key, "old": before, "new": after, "alters_training": not is_operational(key)})
    return changes


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


def check_run_dir(rd: RunDir, config: RunConfig, resume: bool, allow_change: bool) -> list[dict]:
    """Refuse (``ConfigError``: exit 2) a run directory that holds a run without ``resume``, or a
    resume whose config changes training without ``allow_change``; otherwise record and return
    the accepted changes. Call before writing the new ``config.yaml``."""
    checkpoints = rd.checkpoints()
    if not resume:
        if checkpoints or rd.read_metrics():
            held = f"checkpoints up to {checkpoints[-1].name}" if checkpoints else "metrics of an earlier start"
            raise ConfigError([f"run directory {rd.root} already holds a run ({held}): pass --resume to continue "
                               "it, or choose another run.name"])
        return []
    if not checkpoints or not rd.config_path.exists():
        return []  # nothing to continue from: the run starts at round 0 under the new config
    try:
        saved = yaml.safe_load(rd.config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{rd.config_path}: cannot read the run's saved config ({e})"]) from None
    check_lora_base(checkpoints[-1], config)
    changes = config_changes(saved, yaml.safe_load(dump_config(config)))
    training = [ch for ch in changes if ch["alters_training"]]
    if training and not allow_change:
        lines = [f"resume: {ch['key']} changed from {_show(ch['old'])} to {_show(ch['new'])}, which alters training"
                 for ch in training]
        lines.append(f"resume: {rd.root} was trained with its config.yaml; pass --allow-config-change to resume "
                     f"anyway (recorded in {CHANGES_FILE}), or start a new run.name")
        raise ConfigError(lines)
    for ch in changes:
        log.warning("resume: %s changed from %s to %s%s", ch["key"], _show(ch["old"]), _show(ch["new"]),
                    " (allowed by --allow-config-change)" if ch["alters_training"] else "")
    if changes:
        record = {"time": time.time(), "resumed_after": checkpoints[-1].name,
                  "allow_config_change": allow_change, "changes": changes}
        with open(rd.root / CHANGES_FILE, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return changes


def check_lora_base(checkpoint, config: RunConfig) -> None:
    """Refuse (``ConfigError``) to resume a LoRA adapter on another base model than its own."""
    try:
        saved = json.loads((checkpoint / "trainer.json").read_text()).get("lora")
    except (OSError, json.JSONDecodeError):
        return  # an unreadable checkpoint is passed over when the run restores
    if not saved or not config.learner.lora:
        return
    from actors.learner.lora import base_fingerprint, base_mismatch

    why = base_mismatch(saved["base"], base_fingerprint(config.model.path))
    if why:
        raise ConfigError([f"resume: {checkpoint.name}: {why}; resume with the base it was trained on"])
