"""Live control and access without Ray (orchestrator/service/control.py, access.py, routes.py,
hooks.py): ``set`` accepts only the live fields, validated like the config; requests act on the
driver; every POST without the run's token is 401 and changes nothing; a set is applied at a
round boundary, recorded with its round, and kept by a resume (from the checkpoint's state, or
from config_changes.jsonl for one applied after the last checkpoint)."""

import json
import os
import stat
import subprocess
import sys
import threading
from types import SimpleNamespace
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.loop.data import PromptSampler
from orchestrator.observe.metrics import Metrics
from orchestrator.rundir import RunDir
from orchestrator.service.access import TOKEN_FILE, authorized, start_token
from orchestrator.service.control import Controls, check_set, publish_request
from orchestrator.service.hooks import Service
from orchestrator.service.inbox import inbox_dir
from orchestrator.service.routes import post_handler
from tests.conftest import REPO

TRAIN = [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(10)]


def demo_tree():
    return load_config("configs/demo.yaml").model_dump(mode="json")


def test_set_takes_live_fields_typed_and_refuses_others_naming_them():
    assert check_set(demo_tree(), ["learner.beta=0.3", "generator.n=4", "loop.prompts_per_round=32"]) == \
        {"learner.beta": 0.3, "generator.n": 4, "loop.prompts_per_round": 32}
    with pytest.raises(ConfigError) as e:
        check_set(demo_tree(), ["model.path=/elsewhere", "learner.beta=0.2", "learner.loss_type=ipo"])
    assert [p.split(":")[0] for p in e.value.problems] == ["model.path", "learner.loss_type"]
    assert "cannot be changed while the run goes on" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        check_set(demo_tree(), ["learner.beta=-1", "generator.n=1"])
    assert e.value.problems == ["generator.n: must be >= 2", "learner.beta: must be > 0.0"] or \
        sorted(e.value.problems) == ["generator.n: must be >= 2", "learner.beta: must be > 0.0"]


def test_requests_act_on_the_driver_and_an_earlier_life_s_are_ignored(tmp_path):
    publish_request(tmp_path, {"action": "stop"})  # left by an earlier life
    stop = threading.Event()
    controls = Controls(tmp_path, stop)
    controls.poll()
    assert not stop.is_set()
    publish_request(tmp_path, {"action": "pause"})
    controls.poll()
    assert controls.paused
    publish_request(tmp_path, {"action": "resume"})
    publish_request(tmp_path, {"action": "stop", "after_round": True})
    controls.poll()
    assert not controls.paused and controls.stop_after_round and not stop.is_set()
    publish_request(tmp_path, {"action": "stop"})
    controls.poll()
    assert stop.is_set()


def test_the_token_file_is_private_and_an_environment_token_leaves_none(tmp_path, monkeypatch):
    monkeypatch.delenv("ODPO_TEST_TOKEN", raising=False)
    token, source = start_token(tmp_path, "ODPO_TEST_TOKEN")
    assert len(token) == 64 and source == str(tmp_path / TOKEN_FILE)
    assert stat.S_IMODE(os.stat(tmp_path / TOKEN_FILE).st_mode) == 0o600
    assert start_token(tmp_path, "ODPO_TEST_TOKEN")[0] != token  # a new one at each start
    monkeypatch.setenv("ODPO_TEST_TOKEN", "from-env")
    assert start_token(tmp_path, "ODPO_TEST_TOKEN") == ("from-env", "environment variable ODPO_TEST_TOKEN")
    assert not (tmp_path / TOKEN_FILE).exists()
    assert authorized("from-env", {"Authorization": "Bearer from-env"})
    assert authorized("from-env", {"X-Odpo-Token": "from-env"})
    assert not authorized("from-env", {"Authorization": "Bearer from-en"}) and not authorized(None, {})


class FakeLearner:
    def __init__(self):
        self.lrs = []

    def set_lr(self, lr):
        self.lrs.append(lr)


def make_service(tmp_path, config=None):
    config = config or load_config("configs/demo.yaml")
    rd = RunDir(tmp_path)
    rd.create()
    metrics = Metrics("t")
    service = Service(config, rd, metrics, threading.Event(), TRAIN)
    loop = SimpleNamespace(parts=SimpleNamespace(learner=FakeLearner()), state=SimpleNamespace(service={}),
                           sampler=PromptSampler(len(TRAIN), 0))
    return service, loop, metrics


def post(port, path, body=b"", token=None):
    request = Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except HTTPError as e:
        return e.code, json.load(e)


def test_without_the_token_every_post_is_401_and_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("ODPO_CONTROL_TOKEN", raising=False)
    service, loop, metrics = make_service(tmp_path)
    token = service.open_token()
    port = metrics.serve("127.0.0.1", 0, post=post_handler(service))
    try:
        rows = b'{"prompt": "3+9=", "answer": 12}\n'
        for wrong in (None, "nope", token[:-1]):
            assert post(port, "/prompts", rows, wrong)[0] == 401
            assert post(port, "/control/pause", b"", wrong)[0] == 401
            assert post(port, "/control/stop", b"", wrong)[0] == 401
            assert post(port, "/control/set", b'{"learner.beta": 0.5}', wrong)[0] == 401
        assert not list(inbox_dir(tmp_path).glob("batch_*")) and not (tmp_path / "control").exists()
        assert not service.controls.paused and not service.stop.is_set()
        status = json.load(urlopen(f"http://127.0.0.1:{port}/status", timeout=10))
        assert token not in json.dumps(status)

        code, answer = post(port, "/prompts", rows, token)
        assert code == 200 and answer["rows"] == 1 and answer["batch"] == "inbox/batch_000001"
        code, answer = post(port, "/prompts", b'{"prompt": "3+9="}\n', token)
        assert code == 400 and answer["error"].startswith("POST /prompts: line 1: no column 'answer'")
        assert post(port, "/control/pause", b"", token)[1]["paused"] is True
        assert json.load(urlopen(f"http://127.0.0.1:{port}/status", timeout=10))["paused"] is True
        code, answer = post(port, "/control/set", b'{"model.path": "x", "learner.beta": 0.5}', token)
        assert code == 400 and answer["problems"][0].startswith("model.path: cannot be changed while the run goes on")
        assert post(port, "/control/set", b'{"learner.beta": 0.5}', token) == \
            (200, {"request": 2, "changes": {"learner.beta": 0.5}, "applies": "at the start of the next round"})
        assert service.c.learner.beta == 0.1  # not before the round boundary
    finally:
        metrics.close()
        service.close()


def test_a_set_applies_at_the_boundary_is_recorded_with_its_round_and_kept_by_a_resume(tmp_path):
    service, loop, _ = make_service(tmp_path)
    publish_request(tmp_path, {"action": "set", "changes": {"learner.beta": 0.3, "learner.lr": 5e-5}})
    publish_request(tmp_path, {"action": "pause"})
    publish_request(tmp_path, {"action": "set", "changes": {"generator.temperature": 0.7}})
    service.apply_due_sets(loop, 4)
    assert (service.c.learner.beta, service.c.learner.lr, service.c.generator.temperature) == (0.3, 5e-5, 0.7)
    assert loop.parts.learner.lrs == [5e-5]
    assert service.sampling_overrides() == {"temperature": 0.7}
    journal = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert [(j["round"], j["request"], [c["key"] for c in j["changes"]]) for j in journal] == \
        [(4, 1, ["learner.beta", "learner.lr"]), (4, 3, ["generator.temperature"])]
    assert journal[0]["changes"][0] == {"key": "learner.beta", "old": 0.1, "new": 0.3, "alters_training": True}
    rec = {"pairs": 5}
    saved = service.state_after(loop, 4, [], rec)
    assert saved["live"] == {"learner.beta": 0.3, "learner.lr": 5e-5, "generator.temperature": 0.7}
    assert saved["config_seq"] == 3 and rec["inbox_prompts"] == 0 and rec["rollbacks"] == 0
    service.close()

    # A resume from a checkpoint that holds this state: the values come back before any round.
    again, loop2, _ = make_service(tmp_path)
    again.resume(loop2, saved, changed_on_resume={"generator.temperature"})
    assert (again.c.learner.beta, again.c.learner.lr, again.c.generator.temperature) == (0.3, 5e-5, 1.0)
    assert loop2.parts.learner.lrs == [5e-5]
    again.apply_due_sets(loop2, 5)
    assert len((tmp_path / "config_changes.jsonl").read_text().splitlines()) == 2  # nothing applied twice
    again.close()

    # A resume from an older checkpoint (before round 4): the sets wait for round 4 again.
    older, loop3, _ = make_service(tmp_path)
    older.resume(loop3, {}, set())
    older.apply_due_sets(loop3, 3)
    assert older.c.learner.beta == 0.1
    older.apply_due_sets(loop3, 4)
    assert (older.c.learner.beta, older.c.generator.temperature) == (0.3, 0.7)
    assert len((tmp_path / "config_changes.jsonl").read_text().splitlines()) == 2
    older.close()


def test_a_set_the_whole_config_refuses_is_recorded_as_refused_and_changes_nothing(tmp_path):
    # Its section alone accepts loop.eval_every=0 (what `odpo ctl` checks); with the gate on
    # eval_reward the whole config does not, and the driver checks the whole config.
    config = load_config("configs/demo.yaml", ["loop.gate.enabled=true"])
    assert check_set(config.model_dump(mode="json"), ["loop.eval_every=0"]) == {"loop.eval_every": 0}
    service, loop, _ = make_service(tmp_path, config)
    assert not service.apply_changes(loop, 2, {"loop.eval_every": 0}, via="test", request=7)
    [row] = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert row["round"] == 2 and row["refused"][0].startswith("loop.gate: watches eval_reward")
    assert service.c.loop.eval_every == 5 and service.live == {}
    service.close()


def test_odpo_ctl_and_add_prompts_reach_a_live_run_by_url_with_the_token(tmp_path, monkeypatch):
    monkeypatch.delenv("ODPO_CONTROL_TOKEN", raising=False)
    service, loop, metrics = make_service(tmp_path / "run")
    token = service.open_token()
    port = metrics.serve("127.0.0.1", 0, post=post_handler(service))
    url, rows = f"http://127.0.0.1:{port}", tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "3+9=", "answer": 12}\n')
    env = {k: v for k, v in os.environ.items() if k != "ODPO_CONTROL_TOKEN"}

    def odpo(*args, token=None):
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={**env, **({"ODPO_CONTROL_TOKEN": token} if token else {})})
    try:
        out = odpo("ctl", url, "pause")
        assert out.returncode == 2 and "401" in out.stderr and not service.controls.paused
        out = odpo("ctl", url, "pause", token=token)
        assert out.returncode == 0 and json.loads(out.stdout)["paused"] is True and service.controls.paused
        out = odpo("ctl", url, "set", "learner.beta=0.25", "loop.rounds=100", token=token)
        assert json.loads(out.stdout)["changes"] == {"learner.beta": 0.25, "loop.rounds": 100}
        out = odpo("add-prompts", url, str(rows), token=token)
        assert out.returncode == 0 and json.loads(out.stdout)["batch"] == "inbox/batch_000001"
    finally:
        metrics.close()
        service.close()
