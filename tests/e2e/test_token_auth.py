"""End to end: a Ray head started with token authentication (`RAY_AUTH_MODE=token`, Ray 2.58)
refuses `ray job submit` without the token or with a wrong one, and runs `deploy/submit.sh` (a
1-round run) when the token is in the environment; the token appears in no output, job log,
entrypoint or runtime env."""

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import start_head, wait_for_job
from tests.integration.runs import TINY

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(24)


@pytest.fixture(scope="module")
def token_head():
    with start_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}) as head:
        yield head


def client_env(head, **extra) -> dict:
    """The environment of a client on this machine: no token unless given."""
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    return {**env, **extra}


def submit(head, env, *entry) -> subprocess.CompletedProcess:
    args = [str(VENV_BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--no-wait", "--", *entry]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_submit_without_the_token_or_with_a_wrong_one_is_refused(token_head):
    refused = submit(token_head, client_env(token_head), "python", "-c", "print('ran')")
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Unauthorized" in refused.stdout + refused.stderr
    wrong = submit(token_head, client_env(token_head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
                   "python", "-c", "print('ran')")
    assert wrong.returncode != 0
    assert "403" in wrong.stdout + wrong.stderr or "invalid" in (wrong.stdout + wrong.stderr).lower()
    # Nothing was accepted: the head lists no submitted job (drivers that joined over the GCS,
    # such as the fixture's node check, are listed with submission_id=None).
    listed = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", token_head["dashboard"]],
                            env=client_env(token_head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN),
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "submission_id='" not in listed.stdout


def test_submit_sh_with_the_token_in_the_environment_runs_without_showing_it(token_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    env = client_env(token_head, RAY_AUTH_TOKEN=TOKEN, RAY_ADDRESS=token_head["dashboard"],
                     RAY_SUBMIT_ARGS="--no-wait --submission-id odpo-token-e2e")  # submit.sh sets RAY_AUTH_MODE
    args = [str(REPO / "deploy" / "submit.sh"), "configs/demo.yaml"]
    for o in [*TINY, "loop.rounds=1", "loop.eval_every=0", "judge.num_cpus=0",  # the head has 2 CPUs
              f"run.output_dir={tmp_path}", "run.name=token"]:
        args += ["--set", o]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert TOKEN not in out.stdout + out.stderr

    client = JobSubmissionClient(token_head["dashboard"], headers={"Authorization": f"Bearer {TOKEN}"})
    status, logs, _ = wait_for_job(client, "odpo-token-e2e", timeout=400)
    assert status == "SUCCEEDED", logs[-4000:]
    info = client.get_job_info("odpo-token-e2e")
    assert TOKEN not in logs and TOKEN not in info.entrypoint and TOKEN not in json.dumps(info.runtime_env or {})
    lines = [json.loads(x) for x in (tmp_path / "token" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1] and lines[0]["prompts"] == 16
    assert TOKEN not in (tmp_path / "token" / "config.yaml").read_text()
