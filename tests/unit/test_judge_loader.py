"""The judge loader: each bad spec is one line naming the field, found when the config loads,
before anything heavy (Ray, vLLM, torch) is imported or any actor starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from judges.loader import JudgeSpecError, build_judge, check_judge_spec, searched_folders
from orchestrator.config import ConfigError, check_plugins, load_config
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"

BAD_SPECS = [
    # (overrides, the one error line)
    (["judge.cls=no_such_pkg.judges:MyJudge"],
     "judge.cls: cannot import module 'no_such_pkg.judges': ModuleNotFoundError: No module named 'no_such_pkg'"
     " (folders searched: {searched})"),
    (["judge.cls=judges.verifiable:VerifyJudge"],
     "judge.cls: module 'judges.verifiable' has no attribute 'VerifyJudge'"),
    (["judge.cls=judges.loader:JudgeSpecError"],
     "judge.cls: judges.loader:JudgeSpecError has neither a score() nor a compare() method"),
    (["judge.kwargs={answer_feld: answer}"],
     "judge.kwargs.answer_feld: not an argument of judges.verifiable:VerifiableJudge "
     "(it takes: answer_field, mode, pattern, strict, partial_credit, ignore_case, align)"),
]


@pytest.mark.parametrize("overrides, line", BAD_SPECS, ids=["module", "class", "no_score", "kwarg"])
def test_bad_spec_is_one_line_from_load_config_and_check_plugins(overrides, line):
    config = load_config(DEMO, overrides)
    with pytest.raises(ConfigError) as e:
        check_plugins(config)
    assert e.value.problems == [line.replace("{searched}", ", ".join(searched_folders()))]


@pytest.mark.parametrize("overrides, line", BAD_SPECS, ids=["module", "class", "no_score", "kwarg"])
def test_odpo_validate_exits_2_with_the_line(overrides, line):
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(DEMO), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    # The subprocess's own path: `python -m` from the repo root searches the repo root first.
    searched = proc.stderr.partition("(folders searched: ")[2].rstrip().removesuffix(")")
    assert "{searched}" not in line or searched.split(", ")[0] == str(REPO)
    assert proc.stderr.strip().splitlines() == ["error: " + line.replace("{searched}", searched)]
    assert proc.stdout == ""


def test_checking_every_builtin_imports_nothing_heavy():
    """The config check stays cheap: no Ray, vLLM or torch, for any built-in judge."""
    code = """
import sys
from judges.loader import check_judge_spec
check_judge_spec("judges.verifiable:VerifiableJudge", {"mode": "number"})
check_judge_spec("judges.llm:LLMJudge", {"model": "assets/demo/model", "k": 3, "temperature": 0.7, "engine": {"max_model_len": 1024}})
check_judge_spec("judges.llm:LLMJudge", {"self_rewarding": True})
check_judge_spec("judges.openai:OpenAIJudge", {"base_url": "http://127.0.0.1:8000/v1", "model": "m"})
check_judge_spec("judges.reward_model:RewardModelJudge", {"model": "some/rm", "batch_size": 4})
check_judge_spec("judges.ensemble:EnsembleJudge", {"judges": [
    {"cls": "judges.verifiable:VerifiableJudge", "weight": 1.0},
    {"cls": "judges.reward_model:RewardModelJudge", "kwargs": {"model": "rm"}, "weight": 0.1}]})
print(sorted(m for m in ("ray", "vllm", "torch", "transformers") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("cls, kwargs, line", [
    ("judges.verifiable:VerifiableJudge", {"mode": "fuzzy"},
     "judge.kwargs: judges.verifiable:VerifiableJudge: mode must be number, exact, regex or places, got 'fuzzy'"),
    ("judges.openai:OpenAIJudge", {"model": "m"},
     "judge.kwargs: judges.openai:OpenAIJudge: missing a required argument: 'base_url'"),
    ("judges.llm:LLMJudge", {"model": "m", "template": "Rate it."},
     "judge.kwargs: judges.llm:LLMJudge: template must contain the placeholder {response} (and usually {prompt})"),
    ("judges.ensemble:EnsembleJudge", {"judges": [{"cls": "judges.verifiable:VerifiableJudge"},
                                                  {"cls": "judges.nope:X"}]},
     "judge.kwargs.judges[1].cls: cannot import module 'judges.nope': ModuleNotFoundError: No module named 'judges.nope'"
     " (folders searched: {searched})"),
    ("judges.ensemble:EnsembleJudge", {"judges": [{"cls": "judges.verifiable:VerifiableJudge",
                                                   "kwargs": {"strikt": True}}]},
     "judge.kwargs.judges[0].kwargs.strikt: not an argument of judges.verifiable:VerifiableJudge "
     "(it takes: answer_field, mode, pattern, strict, partial_credit, ignore_case, align)"),
    ("judges.ensemble:EnsembleJudge", {"judges": [{"cls": "judges.verifiable:VerifiableJudge", "wieght": 2}]},
     "judge.kwargs.judges[0].wieght: unknown key (a member has cls, kwargs, weight)"),
    ("judges.ensemble:EnsembleJudge", {"judges": []},
     "judge.kwargs.judges: must be a non-empty list of {cls, kwargs, weight}"),
    ("judges", {}, "judge.cls: must look like 'package.module:ClassName', got 'judges'"),
    ("orchestrator.pairs.select:select_pairs", {}, "judge.cls: orchestrator.pairs.select:select_pairs is not a class"),
])
def test_bad_values_and_nested_members_name_their_field(cls, kwargs, line):
    with pytest.raises(JudgeSpecError) as e:
        check_judge_spec(cls, kwargs)
    assert str(e.value) == line.replace("{searched}", ", ".join(searched_folders()))


def test_a_module_that_fails_on_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_judge_mod.py").write_text("import math\nraise RuntimeError('no GPU here\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(JudgeSpecError) as e:
        check_judge_spec("broken_judge_mod:J", {})
    assert str(e.value) == "judge.cls: cannot import module 'broken_judge_mod': RuntimeError: no GPU here"


def test_builtins_and_the_example_build():
    judge = build_judge("configs.examples.length_judge:LengthJudge", {"target_chars": 3})
    assert type(judge).__name__ == "LengthJudge"
    config = load_config(REPO / "configs" / "examples" / "custom-judge.yaml")
    check_plugins(config)
    assert config.judge.cls == "configs.examples.length_judge:LengthJudge"


def test_judge_pool_rejects_a_bad_spec_before_starting_ray():
    # In a fresh process: other tests of the session may have a Ray cluster up in this one.
    code = (
        "import ray, pytest\n"
        "from actors.judging.pool import JudgePool\n"
        "from judges.loader import JudgeSpecError\n"
        "from orchestrator.config import load_config\n"
        "config = load_config('configs/demo.yaml', ['judge.kwargs={answer_feld: answer}'])\n"
        "with pytest.raises(JudgeSpecError, match='judge.kwargs.answer_feld'):\n"
        "    JudgePool(config.judge)\n"
        "assert not ray.is_initialized()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_module_that_is_nowhere_names_the_folders_searched(tmp_path, monkeypatch):
    import sysconfig

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    # The standard library and entries that are not folders are left out of the list.
    monkeypatch.setattr(sys, "path", [str(first), stdlib, str(tmp_path / "missing"), str(second), str(first)])
    with pytest.raises(JudgeSpecError) as e:
        check_judge_spec("my_judges:MyJudge", {})
    assert str(e.value) == ("judge.cls: cannot import module 'my_judges': ModuleNotFoundError: No module named"
                            f" 'my_judges' (folders searched: {first}, {second})")


CONSOLE_ODPO = Path(sys.executable).parent / "odpo"


def test_the_odpo_command_finds_a_judge_module_in_the_current_folder(tmp_path):
    """The installed console script (not `python -m`) resolves judges from where it runs: the
    README's example from the repo root, and a `my_judges.py` next to a config in a scratch folder."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(CONSOLE_ODPO), "validate", "configs/examples/custom-judge.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert load_config(REPO / "configs" / "examples" / "custom-judge.yaml").model_dump(mode="json") == yaml.safe_load(out.stdout)

    (tmp_path / "my_judges.py").write_text(MY_JUDGES)
    (tmp_path / "cfg.yaml").write_text(scratch_config("my_judges:MyJudge"))
    out = subprocess.run([str(CONSOLE_ODPO), "validate", "cfg.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["judge"] == {**load_config(DEMO).judge.model_dump(mode="json"),
                                                   "cls": "my_judges:MyJudge", "kwargs": {"target": 2}}
    # A path that does not import still names where it looked: the scratch folder first.
    out = subprocess.run([str(CONSOLE_ODPO), "validate", "cfg.yaml", "--set", "judge.cls=my_judgez:MyJudge"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: judge.cls: cannot import module 'my_judgez': ModuleNotFoundError: No module"
                                 f" named 'my_judgez' (folders searched: {tmp_path}, ")


MY_JUDGES = '''\
class MyJudge:
    """Scores an answer by how close its length is to ``target`` characters."""

    def __init__(self, target: int = 2):
        self.target = target

    def score(self, items):
        return [[-abs(len(c.text.strip()) - self.target) for c in item.completions] for item in items]
'''


def scratch_config(cls: str) -> str:
    """A config for a folder outside the repo: the demo's model and data by absolute path."""
    return yaml.safe_dump({
        "model": {"path": str(REPO / "assets" / "demo" / "model")},
        "data": {"source": str(REPO / "assets" / "demo" / "data" / "train.jsonl"),
                 "eval_source": str(REPO / "assets" / "demo" / "data" / "eval.jsonl")},
        "judge": {"cls": cls, "kwargs": {"target": 2}},
    })
