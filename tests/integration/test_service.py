"""The loop as a service, end to end, in one run directory over three lives of `odpo run`:

1. paused over HTTP before round 1: the pause holds (no round for 20 s); POSTs without the token
   are 401 and change nothing; prompts are added by `odpo add-prompts` and `POST /prompts`,
   `set learner.beta` over HTTP, a refused field named by `odpo ctl`; resumed by `odpo ctl`,
   paused again during round 1 (held before round 2), then SIGKILLed (no checkpoint yet);
2. `--resume`: the inbox rows and the set come back (the set from config_changes.jsonl); from
   round 3 every judge call raises: after `loop.max_rounds_without_pairs` = 2 rounds the run
   stops, exit 1, with a checkpoint;
3. `--resume` again (the set now from the checkpoint) with the checkpoint folder reporting no
   free space from round 5: the checkpoint of round 6 is refused before writing, exit 1.
"""

import json
import subprocess
import sys
import time
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

from tests.conftest import DEMO_DATA, REPO
from tests.integration.runs import end_group, free_port, metrics, start_run, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "service"
BASE = ["loop.rounds=4", "loop.checkpoint_every=2"]
INBOX = [json.loads(x) for x in (DEMO_DATA / "eval.jsonl").read_text().splitlines()[100:130]]


def status(port):
    try:
        return json.load(urlopen(f"http://127.0.0.1:{port}/status", timeout=5))
    except OSError:
        return None


def post(port, path, body=b"", token=None):
    request = Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except HTTPError as e:
        return e.code, json.load(e)


def odpo(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def wait_exit(proc, log, timeout=400):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"run did not end in {timeout}s\n{log.read_text()[-3000:]}")
    finally:
        end_group(proc)


@pytest.fixture(scope="module")
def service_run(out_dir):
    run_dir, log, seen = out_dir / NAME, out_dir / f"{NAME}.log", {}
    port = free_port()
    # Round 1's weight load sleeps 6 s (a sync fault) so that the test can pause during round 1:
    # a shrunken round takes well under a second.
    proc = start_run(out_dir, NAME, *BASE, f"metrics.port={port}",
                     "faults.events=[{kind: sync, action: hang, round: 1, seconds: 6}]")
    try:
        wait_for(lambda: status(port), proc, 300, "the HTTP server", log)
        token = (run_dir / "control.token").read_text().strip()
        seen["token"] = token
        seen["pause"] = post(port, "/control/pause", token=token)
        wait_for(lambda: (status(port) or {}).get("phase") == "paused", proc, 300, "the pause to hold", log)
        seen["held"] = [status(port), len(metrics(run_dir))]
        time.sleep(20)
        seen["held_20s"] = [status(port), len(metrics(run_dir))]
        seen["unauthorized"] = [post(port, "/prompts", jsonl(INBOX[:3]).encode())[0],
                                post(port, "/control/resume", token="wrong")[0],
                                post(port, "/control/set", b'{"learner.beta": 0.5}', token=token[:-1])[0],
                                post(port, "/control/stop")[0]]
        seen["after_unauthorized"] = [status(port), sorted(p.name for p in (run_dir / "inbox").iterdir()),
                                      sorted(p.name for p in (run_dir / "control").iterdir())]
        (out_dir / "batch1.jsonl").write_text(jsonl(INBOX[:20]))
        seen["add_cli"] = odpo("add-prompts", str(run_dir), str(out_dir / "batch1.jsonl"))
        seen["add_http"] = post(port, "/prompts", jsonl(INBOX[20:]).encode(), token)
        seen["set"] = post(port, "/control/set", b'{"learner.beta": 0.3}', token)
        seen["refused"] = odpo("ctl", str(run_dir), "set", "model.path=/elsewhere", "learner.beta=0.2")
        seen["resume"] = odpo("ctl", str(run_dir), "resume")
        wait_for(lambda: (status(port) or {}).get("round") == 1, proc, 120, "round 1 to start", log)
        post(port, "/control/pause", token=token)
        wait_for(lambda: (status(port) or {}).get("phase") == "paused", proc, 300, "the second pause", log)
        seen["life1"] = metrics(run_dir)
    finally:
        end_group(proc)  # SIGKILL, the driver and its Ray cluster

    proc = start_run(out_dir, NAME, *BASE, f"metrics.port={free_port()}", "loop.max_rounds_without_pairs=2",
                     "faults.events=[{kind: judge, action: raise, round: 3, count: 100000}, "
                     "{kind: judge, action: raise, round: 4, count: 100000}]", resume=True)
    seen["rc2"] = wait_exit(proc, log)
    seen["life2"] = metrics(run_dir)
    seen["checkpoint4"] = (run_dir / "checkpoints" / "round_000004" / "loop_state.json").read_text()

    proc = start_run(out_dir, NAME, "loop.rounds=6", "loop.checkpoint_every=2", f"metrics.port={free_port()}",
                     "faults.events=[{kind: disk, action: full, round: 5}]", resume=True)
    seen["rc3"] = wait_exit(proc, log)
    seen["life3"] = metrics(run_dir)
    seen["log"] = log.read_text()
    return run_dir, seen


def test_pause_holds_for_20_s_and_resume_continues(service_run):
    run_dir, seen = service_run
    assert seen["pause"][0] == 200 and seen["pause"][1]["paused"] is True
    (before, n_before), (after, n_after) = seen["held"], seen["held_20s"]
    assert before["phase"] == after["phase"] == "paused" and before["paused"] is after["paused"] is True
    assert n_before == n_after == 1  # round 0's eval only: no round started while paused
    assert seen["resume"].returncode == 0, seen["resume"].stderr
    assert [m["round"] for m in seen["life1"]] == [0, 1]


def test_without_the_token_nothing_changes_and_the_token_is_never_shown(service_run):
    run_dir, seen = service_run
    assert seen["unauthorized"] == [401, 401, 401, 401]
    state, inbox, control = seen["after_unauthorized"]
    assert state["paused"] is True and inbox == ["schema.json"] and control == ["request_000001.json"]
    assert seen["token"] not in seen["log"] and seen["token"] not in (run_dir / "config.yaml").read_text()


def test_set_shows_in_the_next_round_is_recorded_and_survives_two_resumes(service_run):
    run_dir, seen = service_run
    assert seen["set"] == (200, {"request": 2, "changes": {"learner.beta": 0.3},
                                 "applies": "at the start of the next round"})
    assert seen["refused"].returncode == 2
    assert seen["refused"].stderr.startswith("error: model.path: cannot be changed while the run goes on")
    assert seen["life1"][1]["beta"] == 0.3  # the round after the set
    # Life 2 redid round 1 (no checkpoint) with the set from config_changes.jsonl; life 3 resumed
    # from round 4's checkpoint, which holds it.
    assert [m["beta"] for m in seen["life3"] if m["round"] >= 1] == [0.3] * 6
    assert json.loads(seen["checkpoint4"])["service"]["live"] == {"learner.beta": 0.3}
    rows = [json.loads(x) for x in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    sets = [r for r in rows if r.get("request")]
    assert [(r["round"], r["request"], r["changes"][0]["key"], r["changes"][0]["new"]) for r in sets] == \
        [(1, 2, "learner.beta", 0.3)]


def test_inbox_rows_added_mid_run_are_each_sampled_once_across_a_sigkill_and_resumes(service_run):
    import pyarrow.parquet as pq

    run_dir, seen = service_run
    assert seen["add_cli"].returncode == 0 and json.loads(seen["add_cli"].stdout)["rows"] == 20
    assert seen["add_http"][0] == 200 and seen["add_http"][1]["rows"] == 10
    assert seen["life1"][1]["inbox_prompts"] == 16
    final = [m for m in seen["life3"] if m["round"] >= 1]
    assert [m["round"] for m in final] == [1, 2, 3, 4, 5, 6] and sum(m["inbox_prompts"] for m in final) == 30
    assert [m["inbox_prompts"] for m in final[:2]] == [16, 14] and final[-1]["data_cursor"]["inbox"] == [3, 0]
    pairs = [r for p in sorted((run_dir / "pairs").glob("round_*.parquet")) for r in pq.read_table(p).to_pylist()]
    from_inbox = [p["prompt"] for p in pairs if p["source_batch"] != "dataset"]
    assert from_inbox and len(from_inbox) == len(set(from_inbox))
    assert set(from_inbox) <= {r["prompt"] for r in INBOX}
    assert {p["source_batch"] for p in pairs} <= {"dataset", "inbox/batch_000001", "inbox/batch_000002"}


def test_all_judges_failing_stop_the_run_with_a_checkpoint_and_exit_1(service_run):
    run_dir, seen = service_run
    assert seen["rc2"] == 1
    assert [m["pairs"] for m in seen["life2"] if m["round"] >= 3] == [0, 0]
    assert ("error: no preference pair in 2 rounds in a row (rounds 3-4; loop.max_rounds_without_pairs=2): "
            "judge failures by kind: raised") in seen["log"]
    assert json.loads(seen["checkpoint4"])["round"] == 4


def test_a_checkpoint_folder_without_room_stops_the_run_before_writing(service_run):
    run_dir, seen = service_run
    assert seen["rc3"] == 1
    assert f"error: cannot checkpoint round 6: checkpoint folder {run_dir / 'checkpoints'}: 0 bytes free" in seen["log"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_000002", "round_000004"]
    assert (run_dir / "checkpoints" / "round_000004" / "loop_state.json").read_text() == seen["checkpoint4"]
