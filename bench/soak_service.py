"""The service half of ``bench/soak.py --service``: run the demo loop as a subprocess with its HTTP
server and change it while it runs, at fixed rounds:

- rounds 10, 30, ..., 190: an inbox batch of 40 rows of the training set (``inbox_rows``), by
  ``odpo add-prompts RUN FILE`` and ``POST /prompts`` in turn;
- round 60: ``POST /control/set {"generator.temperature": 0.9}``; round 120: ``odpo ctl RUN set
  learner.beta=0.12``; round 160: ``POST /control/set {"learner.lr": 5e-5}``;
- round 100: ``POST /control/pause``, 15 s held (no round may start), ``odpo ctl RUN resume``.

Returns the metrics lines, the wall time and what it checked: every inbox prompt sampled exactly
once (the rounds' ``inbox_prompts`` sum to the rows added, the inbox cursor ends past the last
batch, no inbox prompt in two pairs files' rounds), each set in ``config_changes.jsonl`` and in the
figures of the rounds after it, and the pause held.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import Request, urlopen

from harness import REPO, read_metrics

BATCH_ROUNDS = list(range(10, 200, 20))
BATCH_ROWS = 40
SETS = {60: ("http", {"generator.temperature": 0.9}), 120: ("cli", {"learner.beta": 0.12}),
        160: ("http", {"learner.lr": 5e-5})}
PAUSE_ROUND, PAUSE_HOLD_S = 100, 15.0


def inbox_rows(n: int) -> list[dict]:
    """``n`` rows of the demo's training set, picked by a fixed shuffle: prompts the model can
    answer (so they make pairs) that the eval set does not hold; the pairs file tells an inbox
    draw (``source_batch: inbox/...``) from a draw of the same prompt from the dataset."""
    rows = [json.loads(x) for x in (REPO / "assets" / "demo" / "data" / "train.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    return rows[:n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: bytes, token: str) -> dict:
    request = Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                      headers={"Authorization": f"Bearer {token}"})
    with urlopen(request, timeout=60) as resp:
        return json.load(resp)


def _status(port: int) -> dict:
    try:
        with urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
            return json.load(resp)
    except OSError:
        return {}


def _odpo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, check=True, capture_output=True,
                   timeout=120)


def run_service(name: str, overrides: list[str], out_dir: Path, rounds: int) -> tuple[list[dict], float, dict]:
    run_dir, port = out_dir / name, _free_port()
    args = [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--set", f"run.output_dir={out_dir}",
            "--set", f"run.name={name}", "--set", f"metrics.port={port}"]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ODPO_CONTROL_TOKEN")}
    prompts = inbox_rows(len(BATCH_ROUNDS) * BATCH_ROWS)
    done: dict[str, float] = {}
    held = None
    t0 = time.time()
    with open(out_dir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            last = read_metrics(run_dir / "metrics.jsonl")[-1]["round"] if (run_dir / "metrics.jsonl").exists() else -1
            if last < 1:
                continue
            token = (run_dir / "control.token").read_text().strip()
            for k, r in enumerate(BATCH_ROUNDS):
                if last >= r and f"batch{k}" not in done:
                    rows = prompts[k * BATCH_ROWS:(k + 1) * BATCH_ROWS]
                    body = "".join(json.dumps(x) + "\n" for x in rows)
                    if k % 2 == 0:
                        path = out_dir / f"batch{k}.jsonl"
                        path.write_text(body)
                        _odpo("add-prompts", str(run_dir), str(path))
                    else:
                        _post(port, "/prompts", body.encode(), token)
                    done[f"batch{k}"] = last
            for r, (how, change) in SETS.items():
                if last >= r and f"set{r}" not in done:
                    if how == "http":
                        _post(port, "/control/set", json.dumps(change).encode(), token)
                    else:
                        _odpo("ctl", str(run_dir), "set", *(f"{k}={v}" for k, v in change.items()))
                    done[f"set{r}"] = last
            if last >= PAUSE_ROUND and "pause" not in done:
                _post(port, "/control/pause", b"", token)
                while _status(port).get("phase") != "paused" and proc.poll() is None:
                    time.sleep(0.2)
                n = len(read_metrics(run_dir / "metrics.jsonl"))
                time.sleep(PAUSE_HOLD_S)
                held = {"held_s": PAUSE_HOLD_S, "paused_after_round": n - 1,
                        "rounds_while_paused": len(read_metrics(run_dir / "metrics.jsonl")) - n,
                        "status_paused": _status(port).get("paused")}
                _odpo("ctl", str(run_dir), "resume")
                done["pause"] = last
        rc = proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the run's own Ray processes, if any outlived it
        except ProcessLookupError:
            pass
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{name}: odpo run exited {rc} (log: {out_dir / f'{name}.log'})")
    lines = read_metrics(run_dir / "metrics.jsonl")
    return lines, wall, service_figures(run_dir, lines, prompts, done, held)


def service_figures(run_dir: Path, lines: list[dict], prompts: list[dict], done: dict, held: dict | None) -> dict:
    import pyarrow.parquet as pq

    trained = [m for m in lines if m.get("round", 0) >= 1 and "pairs" in m]
    added = {r["prompt"] for r in prompts}
    pair_rounds: dict[str, set] = {}
    for path in sorted((run_dir / "pairs").glob("round_*.parquet")):
        for row in pq.read_table(path, columns=["prompt", "round", "source_batch"]).to_pylist():
            if row["source_batch"] != "dataset":
                pair_rounds.setdefault(row["prompt"], set()).add(row["round"])
    sampled = sum(m.get("inbox_prompts", 0) for m in trained)
    changes = [json.loads(x) for x in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    sets = [{"round": c["round"], **{x["key"]: x["new"] for x in c["changes"]}} for c in changes if c.get("request")]
    after = {key: sorted({m.get(key.split(".")[1]) for m in trained if m["round"] >= s["round"]} - {None})
             for s in sets for key in s if key in ("learner.beta", "learner.lr")}
    return {
        "inbox_added": len(prompts), "inbox_sampled": sampled,
        "inbox_cursor_end": trained[-1]["data_cursor"]["inbox"],
        "inbox_prompts_in_pairs": len(pair_rounds),
        "inbox_prompts_in_two_rounds": sum(len(v) > 1 for v in pair_rounds.values()),
        "inbox_pairs_from_elsewhere": len(set(pair_rounds) - added),
        "inbox_sampled_once_each": sampled == len(prompts) and not any(len(v) > 1 for v in pair_rounds.values())
        and trained[-1]["data_cursor"]["inbox"] == [len(BATCH_ROUNDS) + 1, 0] and not set(pair_rounds) - added,
        "sets": sets, "figures_after_sets": {"beta": after.get("learner.beta"), "lr": after.get("learner.lr")},
        "pause": held, "actions_at_round": done,
    }
