"""Trackers, progress inside a round and `odpo export`, on real backends and real runs.

Two runs serve every test here: a 3-round run that logs to TensorBoard, W&B (offline), MLflow (a
real `mlflow server` on loopback with a SQLite store) and trackio (local) at once while /status
is polled, and a run that is SIGKILLed after round 3 reached every tracker and then resumed.
Each tracker is read back with its own reader and compared with the run's metrics lines. The
resumed run (the shrunken demo's training config, as conftest's `sync_run`, plus trackers) also
shows that a resume after SIGKILL redoes no round twice and draws `sync_run`'s prompts.
"""

import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.conftest import REPO
from tests.integration.runs import end_group, finish, free_port, metrics, start_run, wait_for
from tests.integration.tracker_readers import read_mlflow, read_tensorboard, read_trackio, read_wandb_offline

# The first test also pays for the runs (its fixtures): three `odpo run` starts and an mlflow server.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

PROJECT = "odpo-test"
TRACKERS = ["report.to=[tensorboard, wandb, mlflow, trackio]", f"report.project={PROJECT}"]
BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio")


def expected(line: dict, prefix: str = "") -> dict[str, float]:
    """The figures a metrics line should put in a tracker: its numbers, nested keys joined by '/'."""
    out = {}
    for key, value in line.items():
        if not prefix and key in ("round", "data_cursor", "prompts_sha"):
            continue
        if isinstance(value, dict):
            out.update(expected(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            if math.isfinite(value):
                out[f"{prefix}{key}"] = float(value)
    return out


def check_history(history: dict, lines_by_round: dict[int, dict], rel: float = 0.0) -> None:
    """Every figure of every round logged exactly once, with the line's value."""
    want = defaultdict(dict)
    for r, line in lines_by_round.items():
        for key, value in expected(line).items():
            want[key][r] = value
    assert set(want) <= set(history), sorted(set(want) - set(history))
    for key, steps in want.items():
        assert set(history[key]) == set(steps), (key, sorted(history[key]), sorted(steps))
        for r, value in steps.items():
            logged = history[key][r]
            assert len(logged) == 1, (key, r, logged)  # no round twice
            assert logged[0] == pytest.approx(value, rel=rel, abs=1e-12), (key, r)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture(scope="module")
def env(work):
    """The trackers' environment: W&B offline, trackio in a folder of this test (also for the
    readers in this process, which import trackio after this)."""
    # RAY_TMPDIR: the runs' own Ray clusters never find (and join) another one on this machine.
    ray_tmp = tempfile.mkdtemp(prefix="odpo-ray-", dir="/tmp")
    values = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(work / "trackio"),
              "RAY_TMPDIR": ray_tmp}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        yield values
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _healthy(uri: str) -> bool:
    try:
        return urlopen(f"{uri}/health", timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_uri(work):
    """A real MLflow tracking server on loopback (SQLite store), ended by its process group."""
    port, log = free_port(), work / "mlflow.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
         "--artifacts-destination", str(work / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=work, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(uri), proc, 240, "the mlflow server", log)
        yield uri
    finally:
        end_group(proc, signal.SIGTERM)


def _watch_status(port: int, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            status = json.load(urlopen(f"http://127.0.0.1:{port}/status", timeout=10))
            if "progress" in status:
                seen.append((status["round"], status["phase"], status["progress"]))
        except OSError:
            pass
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tracked(work, env, mlflow_uri):
    """3 rounds of 256 prompts x 4 samples, learner steps of 16 pairs, all four trackers, pairs
    tables every 2 rounds, /status polled throughout."""
    port = free_port()
    proc = start_run(work, "tracked", "loop.rounds=3", *TRACKERS, f"report.mlflow_tracking_uri={mlflow_uri}",
                     "report.pairs_every=2", f"metrics.port={port}", "log.progress_every_s=0.2",
                     "loop.prompts_per_round=256", "learner.batch_size=16", "learner.micro_batch_size=16", env=env)
    seen: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_status, args=(port, seen, stop), daemon=True)
    watcher.start()
    try:
        finish(proc, work / "tracked.log", timeout=900)
    finally:
        stop.set()
        watcher.join()
    run_dir = work / "tracked"
    return {"dir": run_dir, "lines": {m["round"]: m for m in metrics(run_dir)}, "status": seen,
            "ledger": json.loads((run_dir / "trackers.json").read_text()), "uri": mlflow_uri}


def _logged_round(run_dir: Path) -> int:
    try:
        ledger = json.loads((run_dir / "trackers.json").read_text())
    except (OSError, json.JSONDecodeError):
        return -1
    return min((ledger.get(b, {}).get("last_round", -1) for b in BACKENDS), default=-1)


@pytest.fixture(scope="module")
def resumed(work, env, mlflow_uri):
    """A 4-round run SIGKILLed once round 3 reached every tracker (its checkpoint is round 2),
    then resumed: rounds 3 and 4 are redone. Round 4's weight sync is made to hang (the fault
    switch) so that the kill lands between the two rounds however fast they run."""
    name, run_dir, log = "resumed", work / "resumed", work / "resumed.log"
    args = ("loop.rounds=4", *TRACKERS, f"report.mlflow_tracking_uri={mlflow_uri}", "report.pairs_every=0")
    hang = ("faults.events=[{kind: sync, action: hang, round: 4, seconds: 600}]", "sync.timeout_s=900")
    proc = start_run(work, name, *args, *hang, env=env)
    try:
        wait_for(lambda: _logged_round(run_dir) >= 3, proc, 600, "round 3 in every tracker", log)
    finally:
        end_group(proc)  # SIGKILL: the driver, its Ray cluster and wandb's service
    killed = {m["round"]: m for m in metrics(run_dir)}
    assert max(killed) == 3 and not (run_dir / "checkpoints" / "round_000004").exists(), "killed too late"
    finish(start_run(work, name, *args, resume=True, env=env), log, timeout=600)
    return {"dir": run_dir, "killed": killed, "lines": {m["round"]: m for m in metrics(run_dir)},
            "ledger": json.loads((run_dir / "trackers.json").read_text()), "uri": mlflow_uri}


def _redone_kept_first(res: dict) -> dict[int, dict]:
    """What a tracker that cannot drop points should hold after the resume: the final lines,
    except round 3, which it had logged before the kill and keeps as first logged."""
    assert set(res["lines"]) == {0, 1, 2, 3, 4}
    return {**res["lines"], 3: res["killed"][3]}


def test_tensorboard_holds_every_round_once_and_resume_replaces_redone_rounds(tracked, resumed):
    scalars, texts = read_tensorboard(tracked["dir"] / "tensorboard")
    check_history(scalars, tracked["lines"], rel=1e-6)  # event files store float32
    assert "prompts_per_round: 256" in texts["config/text_summary"][0][0]
    first = _pairs(tracked["dir"], 2)[0]
    table = texts["pairs_sample/text_summary"]
    assert list(table) == [2] and f"| 2 | {first['prompt']} | {first['chosen']} | {first['rejected']} |" in table[2][0]
    scalars, _ = read_tensorboard(resumed["dir"] / "tensorboard")
    check_history(scalars, resumed["lines"], rel=1e-6)  # purge_step: round 3 is the redone one


def test_wandb_offline_run_holds_every_round_once_across_a_resume(tracked, resumed):
    run_id = tracked["ledger"]["wandb"]["id"]
    ((history, config, rid),) = read_wandb_offline(tracked["dir"] / "wandb", run_id)
    assert rid == run_id and config["learner"]["beta"] == 0.1
    tables = history.pop("pairs_sample/_type")
    nrows = history.pop("pairs_sample/nrows")
    for key in [k for k in history if k.startswith("pairs_sample/")]:
        history.pop(key)
    check_history(history, tracked["lines"])
    assert tables == {2: ["table-file"]} and nrows == {2: [min(16, tracked["lines"][2]["pairs"])]}
    # The killed segment holds what W&B had written to disk before the SIGKILL (it writes in the
    # background: possibly nothing), each round at most once and with the killed run's values; the
    # resumed segment, of the same run, holds every round once with the final values.
    run_id = resumed["ledger"]["wandb"]["id"]
    (killed, _, rid0), (final, _, rid1) = read_wandb_offline(resumed["dir"] / "wandb", run_id)
    held = {r for steps in killed.values() for r in steps}
    assert rid1 == run_id and rid0 in (run_id, None if not held else run_id)  # None: nothing reached disk
    if held:
        check_history(killed, {r: resumed["killed"][r] for r in held})
    check_history(final, resumed["lines"])


def test_mlflow_server_run_holds_every_round_once_across_a_resume(tracked, resumed):
    history, params, artifacts = read_mlflow(tracked["uri"], tracked["ledger"]["mlflow"]["run_id"])
    check_history(history, tracked["lines"])
    assert params["learner.beta"] == "0.1" and params["loop.prompts_per_round"] == "256"
    assert "config.yaml" in artifacts and "pairs_sample/round_000002.json" in artifacts
    history, _, _ = read_mlflow(resumed["uri"], resumed["ledger"]["mlflow"]["run_id"])
    check_history(history, _redone_kept_first(resumed))


def test_trackio_run_holds_every_round_once_across_a_resume(tracked, resumed):
    history, config = read_trackio(PROJECT, "tracked")
    table = history.pop("pairs_sample")
    check_history(history, tracked["lines"])
    assert config["learner.beta"] == 0.1
    assert list(table) == [2] and len(table[2][0]["_value"]) == min(16, tracked["lines"][2]["pairs"])
    history, _ = read_trackio(PROJECT, "resumed")
    check_history(history, _redone_kept_first(resumed))


def test_resume_after_sigkill_redoes_nothing_twice_and_draws_the_same_prompts(resumed, sync_run):
    lines = metrics(resumed["dir"])
    assert [m["round"] for m in lines] == [0, 1, 2, 3, 4]
    baseline = {m["round"]: m for m in metrics(sync_run["dir"])}
    for m in lines[1:]:
        assert m["prompts_sha"] == baseline[m["round"]]["prompts_sha"], m["round"]
        assert m["data_cursor"] == baseline[m["round"]]["data_cursor"]


def test_no_tracker_errors_were_counted(tracked, resumed):
    for run in (tracked, resumed):
        assert all(line["tracker_errors"] == {} for line in run["lines"].values())


def test_status_reports_progress_moving_inside_phases(tracked):
    by_phase = defaultdict(list)
    for round_, phase, progress in tracked["status"]:
        by_phase[(round_, phase)].append(progress)
    assert by_phase, "no /status answer carried progress"
    for (round_, phase), seen in by_phase.items():
        dones = [p["done"] for p in seen]
        assert dones == sorted(dones), (round_, phase, dones)  # never backwards
        assert all(p["done"] <= p["total"] for p in seen)
        if phase == "sample":
            assert {p["total"] for p in seen} == {256} and seen[0]["unit"] == "prompts"
    moved = [k for k, seen in by_phase.items()
             if len({p["done"] for p in seen}) >= 2 and min(p["done"] for p in seen) < seen[0]["total"]]
    assert moved, dict(by_phase)


def _pairs(run_dir: Path, round_: int) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "pairs" / f"round_{round_:06d}.parquet").to_pylist()


def test_export_model_and_pairs_load_and_cards_carry_the_run(tracked, work, eval_rows):
    import datasets
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from judges.base import Completion, JudgeItem
    from judges.verifiable import VerifiableJudge

    out = work / "export"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "export", str(tracked["dir"]), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = tracked["lines"]
    last_eval = lines[3]["eval_reward"]
    total_pairs = sum(m.get("pairs", 0) for m in lines.values())

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    from safetensors.torch import load_file

    saved = load_file(tracked["dir"] / "checkpoints" / "round_000003" / "policy" / "model.safetensors")
    assert all((model.state_dict()[k] == v).all() for k, v in saved.items())

    llm = LLM(model=str(out / "model"), dtype="float32", max_model_len=64, seed=0,
              distributed_executor_backend="uni", kv_cache_memory_bytes=64 << 20)
    rows = eval_rows[:32]  # the run's data.eval_size
    outs = llm.generate([r["prompt"] for r in rows], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    del llm
    items = [JudgeItem(r["prompt"], [Completion(o.outputs[0].text)], r) for r, o in zip(rows, outs)]
    scores = VerifiableJudge(answer_field="answer", mode="number").score(items)
    accuracy = sum((s[0] or 0.0) for s in scores) / len(rows)
    assert accuracy == pytest.approx(last_eval, abs=0.01)

    ds = datasets.load_dataset("parquet", data_dir=str(out / "pairs" / "data"), split="train")
    assert len(ds) == total_pairs > 0
    assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "policy_version", "round"} <= set(ds.column_names)

    card = (out / "model" / "README.md").read_text()
    assert "base_model: assets/demo/model" in card and "judges.verifiable:VerifiableJudge" in card
    assert f"| 3 | {last_eval:.3f} |" in card and f"| 0 | {lines[0]['eval_reward']:.3f} |" in card
    assert f"| pairs | {total_pairs} |" in card and f"| loss (last round) | {lines[3]['loss']:.4f} |" in card
    card = (out / "pairs" / "README.md").read_text()
    assert f"{total_pairs} chosen/rejected pairs" in card
    assert all(f"| {r} | {m['pairs']} |" in card for r, m in lines.items() if r and m["pairs"])
