"""A new user's first run: a scratch folder outside the repo holding `my_judges.py` and a config
naming `my_judges:MyJudge`, run with the installed `odpo` console script (not `python -m`). The
driver resolves the judge from the current folder and so does the judge actor of the local Ray
cluster that `odpo run` starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.runs import TINY, end_group, metrics
from tests.unit.test_judge_loader import MY_JUDGES, scratch_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONSOLE_ODPO = Path(sys.executable).parent / "odpo"

# MyJudge, plus a record of the process that scored (to tell the judge actor from the driver) and
# an offset that makes every score <= -1 (so the round's rewards can only be this judge's).
RECORDING = MY_JUDGES + '''

class RecordingJudge(MyJudge):
    def setup(self):
        import json, os, sys
        with open(os.path.join(os.path.dirname(__file__), "judge_actor.json"), "w") as f:
            json.dump({"pid": os.getpid(), "sys_path": sys.path}, f)

    def score(self, items):
        return [[s - 1 for s in row] for row in super().score(items)]
'''


def test_odpo_run_from_a_scratch_folder_loads_my_judges_in_the_judge_actor(tmp_path):
    (tmp_path / "my_judges.py").write_text(RECORDING)
    (tmp_path / "cfg.yaml").write_text(scratch_config("my_judges:RecordingJudge"))
    overrides = [*TINY, "loop.rounds=1", "loop.eval_every=0", "data.eval_source=null", "run.name=scratch",
                 f"run.output_dir={tmp_path / 'runs'}"]
    args = [str(CONSOLE_ODPO), "run", "cfg.yaml", *[a for o in overrides for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=400)
    finally:
        end_group(proc)  # the local Ray cluster the run started, if anything outlived it
    assert rc == 0, log.read_text()[-4000:]

    rounds = metrics(tmp_path / "runs" / "scratch")
    assert [m["round"] for m in rounds] == [1]
    assert rounds[0]["completions"] == 64 and rounds[0]["reward_mean"] <= -1
    actor = json.loads((tmp_path / "judge_actor.json").read_text())
    assert actor["pid"] != proc.pid  # scored in the judge actor, not in the driver
    assert str(tmp_path) in actor["sys_path"]
    saved = yaml.safe_load((tmp_path / "runs" / "scratch" / "config.yaml").read_text())
    assert saved["judge"]["cls"] == "my_judges:RecordingJudge"
