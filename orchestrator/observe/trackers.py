"""Experiment trackers: every round's figures in TensorBoard, W&B, MLflow and trackio.

``report.to`` names the trackers; each package is imported only when named (``odpo validate``
checks that it imports). ``open_trackers(config, rundir)`` starts each one after the run
directory is restored, and ``Trackers.log_round(record)`` is handed every metrics line: each
number in it is logged with ``step = round`` (nested dicts flattened: ``pairs_dropped/tie``;
``None`` and NaN left out), round 0's ``eval_reward`` included, so the eval curve is the
``eval_reward`` series. Every ``report.pairs_every`` rounds a sample of the round's pairs goes
along as a table. A new tracker run gets the resolved config (secrets redacted) as its
hyperparameters.

A resumed run continues the same tracker runs: their ids are kept in ``<run dir>/trackers.json``
with the last round each one holds. The rounds a resume redoes (those after its checkpoint)
replace the first values in TensorBoard (``purge_step``); MLflow and trackio cannot drop a logged
point, so a redone round they already hold keeps its first values and is not logged again. W&B
may lose the last rounds in a crash (it writes in the background): online, the server's step
counter says what it holds; offline, the resumed segment logs every round again. Rounds of
``metrics.jsonl`` that a tracker does not hold are logged when it opens. No round appears twice
in a tracker (W&B offline: in a segment; ``wandb sync`` keeps a step's first value).

A tracker that fails (bad credentials, a server down, a call past ``report.timeout_s``) costs a
warning and one count in ``tracker_errors``, never the run. Secrets come from each tool's own
environment variables (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``/``_PASSWORD``, ``HF_TOKEN``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from orchestrator.rundir import atomic_write_text
from orchestrator.security import redact_secrets

log = logging.getLogger("odpo.trackers")

# tracker -> (module that must import, pip extra)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
LEDGER = "trackers.json"
NOT_FIGURES = {"round", "data_cursor", "prompts_sha"}
PAIR_COLUMNS = ("round", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "policy_version", "source")


def missing_tracker_packages(names) -> list[str]:
    """One problem line per tracker in ``names`` whose package does not import."""
    problems = []
    for name in dict.fromkeys(names):
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install failing in its own way
            problems.append(f"report.to: {name!r} needs the {module} package, which does not import "
                            f"({type(e).__name__}: {e}); install it with: pip install 'odpo[{extra}]'")
    return problems


def flatten_figures(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics line as ``{key: float}``; nested dicts become ``outer/inner``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in NOT_FIGURES:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_figures(value, name + "/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"learner.beta": 0.1, ...}``; lists and empty dicts as JSON text."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, (list, dict)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


@dataclass
class PairsTable:
    """A sample of one round's pairs: column names and rows of plain values."""

    columns: list[str]
    rows: list[list]

    def markdown(self) -> str:
        def cell(v):
            text = v if isinstance(v, str) else json.dumps(v)
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def pairs_table(records: list[dict], limit: int) -> PairsTable | None:
    """The first ``limit`` pairs of a round (prompts that are chat messages become JSON text)."""
    if not records:
        return None
    columns = [c for c in PAIR_COLUMNS if c in records[0]]
    rows = [[r.get(c) if isinstance(r.get(c), (str, int, float)) or r.get(c) is None else json.dumps(r.get(c))
             for c in columns] for r in records[:limit]]
    return PairsTable(columns, rows)


class Trackers:
    """The trackers a run reports to; every call guarded (timeout, errors counted)."""

    def __init__(self, config, rundir):

        self.c, self.rd, self.cfg = config, rundir, config.report
        self.errors: Counter = Counter()
        """Failed tracker calls so far, by tracker (the metrics lines' ``tracker_errors``)."""
        self.ledger = self._read_ledger()
        self.backends: dict = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._running: dict = {}
        lines = rundir.read_metrics()
        self.next_round = lines[-1]["round"] + 1 if lines else 0  # the first round this process logs
        self.config_dict = redact_secrets(config.model_dump(mode="json"))
        for name in dict.fromkeys(self.cfg.to):
            saved = self.ledger.get(name)
            backend = self._guarded(name, "start", lambda n=name, s=saved: BACKENDS[n](self, s))
            if backend is None:
                log.warning("tracker %s is off for this run", name)
                continue
            self.backends[name] = backend
            if saved is None:
                self._guarded(name, "config", backend.log_config, self.config_dict)
            held = self._guarded(name, "resume", backend.held_through, saved, self.next_round)
            self.ledger[name] = {**backend.state, "last_round": -1 if held is None else held}
            log.info("tracker %s: %s", name, backend.describe())
        self._write_ledger()
        # Rounds already in metrics.jsonl that a tracker does not hold (a tracker new to this run,
        # or W&B data a crash lost before it reached disk or the server) are logged now.
        for line in lines:
            if any(line["round"] > entry["last_round"] for n, entry in self.ledger.items() if n in self.backends):
                self.log_round(line, backfill=True)

    # --- logging ---------------------------------------------------------------------------------
    def log_round(self, record: dict, backfill: bool = False) -> None:
        """Log one metrics line (and every ``report.pairs_every`` rounds a sample of its pairs)."""
        r = int(record["round"])
        figures = flatten_figures(record)
        table = None
        if self.cfg.pairs_every and r > 0 and r % self.cfg.pairs_every == 0:
            table = pairs_table(self.rd.read_pairs(r), self.cfg.pairs_sample)
        for name, backend in self.backends.items():
            if r <= self.ledger[name]["last_round"]:
                if not backfill:
                    log.warning("tracker %s already holds round %d (logged before the resume): it keeps the "
                                "values first logged", name, r)
                continue
            if self._guarded(name, f"round {r}", backend.log, r, figures, table, ok=True):
                self.ledger[name]["last_round"] = r
        self._write_ledger()

    def close(self) -> None:
        for name, backend in list(self.backends.items()):
            self._guarded(name, "close", backend.close)
        for executor in self._executors.values():
            executor.shutdown(wait=False)
        self.backends = {}

    # --- guarding --------------------------------------------------------------------------------
    def _guarded(self, name: str, what: str, fn, *args, ok=None):
        """``fn(*args)`` on this tracker's own thread, at most ``report.timeout_s``; a failure is
        a warning and an error count. Returns fn's result (or ``ok``), None on failure."""

        previous = self._running.get(name)
        if previous is not None and not previous.done():
            return self._fail(name, what, "its previous call is still running")
        executor = self._executors.setdefault(name, ThreadPoolExecutor(1, thread_name_prefix=f"odpo-{name}"))
        future = self._running[name] = executor.submit(fn, *args)
        try:
            result = future.result(timeout=self.cfg.timeout_s)
        except FutureTimeout:
            return self._fail(name, what, f"no answer within report.timeout_s={self.cfg.timeout_s}s")
        except Exception as e:  # any tracker failure: the run goes on without this call
            return self._fail(name, what, redact_secrets(f"{type(e).__name__}: {e}")[:300])
        return result if ok is None else ok

    def _fail(self, name: str, what: str, why: str) -> None:
        self.errors[name] += 1
        log.warning("tracker %s: %s failed (%s); the run goes on", name, what, why)
        return None

    # --- the ledger ------------------------------------------------------------------------------
    def _read_ledger(self) -> dict:
        path = self.rd.root / LEDGER
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s unreadable (%s): tracker runs start afresh", path, e)
            return {}

    def _write_ledger(self) -> None:

        atomic_write_text(self.rd.root / LEDGER, json.dumps(self.ledger, indent=1) + "\n")


def open_trackers(config, rundir) -> Trackers | None:
    """The run's trackers (None when ``report.to`` is empty); call after the resume trimmed the run dir."""
    return Trackers(config, rundir) if config.report.to else None


# --- the backends: each has state (what resumes it), held_through, log_config, log, close, describe ---

class TensorBoardTracker:
    """Event files in ``report.tensorboard_dir`` (default ``<run dir>/tensorboard``)."""

    def __init__(self, owner: Trackers, saved: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = (saved or {}).get("log_dir") or owner.cfg.tensorboard_dir or str(owner.rd.root / "tensorboard")
        # A resumed run writes into the same folder; purge_step drops what the old one logged
        # from the first redone round on (TensorBoard applies it when it reads the files).
        purge = owner.next_round if saved else None
        self.writer = SummaryWriter(self.dir, purge_step=purge, flush_secs=30)
        self.state = {"log_dir": self.dir}

    def describe(self) -> str:
        return f"event files in {self.dir}"

    def held_through(self, saved: dict | None, next_round: int) -> int:
        # purge_step dropped the old values of the rounds from next_round on; a new folder holds none.
        return next_round - 1 if saved else -1

    def log_config(self, config: dict) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        flat = {k: v for k, v in flatten_config(config).items() if isinstance(v, (int, float, str, bool))}
        for summary in hparams(flat, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, step: int, figures: dict, table: PairsTable | None) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)
        if table is not None:
            self.writer.add_text("pairs_sample", table.markdown(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``report.project`` (``WANDB_MODE=offline``: files under ``<run dir>/wandb``)."""

    def __init__(self, owner: Trackers, saved: dict | None):
        import wandb

        self.wandb = wandb
        run_id = (saved or {}).get("id") or uuid.uuid4().hex[:12]  # W&B ids: [a-z0-9]
        self.run = wandb.init(
            project=owner.cfg.project, entity=owner.cfg.wandb_entity, name=owner.c.run.name, id=run_id,
            resume="allow", dir=str(owner.rd.root), config=owner.config_dict,
            settings=wandb.Settings(console="off", init_timeout=owner.cfg.timeout_s),
        )
        self.state = {"id": run_id, "project": owner.cfg.project}

    def describe(self) -> str:
        return f"run {self.run.id} ({self.run.settings.mode}) in project {self.run.project}"

    def held_through(self, saved: dict | None, next_round: int) -> int:
        # W&B writes in the background (its transaction log in 32 KiB blocks), so a crash can lose
        # rounds the ledger counts: trust the server's step counter online (a resumed run starts
        # after its last step). Offline there is no server: the new segment logs every round again;
        # `wandb sync` keeps the first value of a step that an older segment had written.
        if self.run.offline:
            return -1
        return self.run.step - 1

    def log_config(self, config: dict) -> None:
        pass  # handed to wandb.init

    def log(self, step: int, figures: dict, table: PairsTable | None) -> None:
        data: dict = dict(figures)
        if table is not None:
            data["pairs_sample"] = self.wandb.Table(columns=table.columns, data=table.rows)
        self.run.log(data, step=step, commit=True)  # commit now: a round is never held back

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in experiment ``report.project`` on ``report.mlflow_tracking_uri``."""

    def __init__(self, owner: Trackers, saved: dict | None):
        # A server that is down must fail a call within report.timeout_s, not retry for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(owner.cfg.timeout_s)))
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=owner.cfg.mlflow_tracking_uri or None)
        run_id = (saved or {}).get("run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(owner.cfg.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(owner.cfg.project)
            run_id = self.client.create_run(exp_id, run_name=owner.c.run.name,
                                            tags={"odpo.run_dir": str(owner.rd.root.resolve())}).info.run_id
        self.run_id = run_id
        self.state = {"run_id": run_id}

    def describe(self) -> str:
        return f"run {self.run_id} on {self.client.tracking_uri}"

    def held_through(self, saved: dict | None, next_round: int) -> int:
        return saved.get("last_round", -1) if saved else -1  # each log_batch returned: on the server

    def log_config(self, config: dict) -> None:
        import yaml
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log(self, step: int, figures: dict, table: PairsTable | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in figures.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if table is not None:
            data = {c: [row[j] for row in table.rows] for j, c in enumerate(table.columns)}
            self.client.log_table(self.run_id, data=data, artifact_file=f"pairs_sample/round_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """A trackio run (local SQLite under ``TRACKIO_DIR``, or a Space with ``TRACKIO_SPACE_ID``)."""

    def __init__(self, owner: Trackers, saved: dict | None):
        import trackio

        self.trackio = trackio
        self.name = (saved or {}).get("name") or owner.c.run.name
        self.run = trackio.init(project=owner.cfg.project, name=self.name, config=flatten_config(owner.config_dict),
                                resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)
        self.state = {"name": self.name, "project": owner.cfg.project}

    def describe(self) -> str:
        return f"run {self.name} in project {self.state['project']}"

    def held_through(self, saved: dict | None, next_round: int) -> int:
        return saved.get("last_round", -1) if saved else -1  # each round was flushed to its store

    def log_config(self, config: dict) -> None:
        pass  # handed to trackio.init

    def log(self, step: int, figures: dict, table: PairsTable | None) -> None:
        data: dict = dict(figures)
        if table is not None:
            data["pairs_sample"] = self.trackio.Table(columns=table.columns, data=table.rows)
        self.run.log(data, step=step)
        # trackio writes from a background thread every few seconds; write this round now, so
        # a crash right after it cannot lose a round the ledger counts as logged.
        flush = getattr(self.run, "_flush_queues_inline", None)
        if flush is not None:
            with self.run._client_lock:
                flush()

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
            "trackio": TrackioTracker}
