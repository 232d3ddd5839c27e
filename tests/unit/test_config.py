"""The config loader: defaults, YAML, --set overrides, and errors that name the field."""

import subprocess
import sys

import pytest

from orchestrator.config import ConfigError, RunConfig, load_config
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


def problems(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return e.value.problems


def test_demo_config_loads_with_typed_overrides():
    config = load_config(DEMO, ["learner.beta=0.25", "loop.rounds=3", "generator.stop=[x, y]"])
    assert config.learner.beta == 0.25
    assert config.loop.rounds == 3
    assert config.generator.stop == ["x", "y"]
    assert config.judge.cls == "judges.verifiable:VerifiableJudge"


def test_every_field_has_a_docstring():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, RunConfig.__mro__[1]):
                walk(sub, f"{prefix}{name}.")

    walk(RunConfig)


def test_bad_value_names_the_field():
    assert problems(DEMO, ["learner.beta=-1"]) == ["learner.beta: must be > 0.0"]


def test_unknown_key_names_the_key():
    assert problems(DEMO, ["learner.betta=1"]) == ["learner.betta: unknown key"]


def test_several_problems_are_all_reported():
    found = problems(DEMO, ["generator.n=1", "loop.mode=fast"])
    assert found[0] == "generator.n: must be >= 2"
    assert found[1].startswith("loop.mode: must be one of")


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: demo\nlearner:\n  beta: [0.1\n")
    (msg,) = problems(bad)
    assert str(bad) in msg and "line 5" in msg


def test_missing_file(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such config file"]


def test_missing_local_model_folder():
    assert problems(DEMO, ["model.path=./no/such/model"]) == [
        "model.path: no such model folder: ./no/such/model"
    ]


def test_hub_id_is_accepted_without_a_local_folder():
    assert load_config(DEMO, ["model.path=Qwen/Qwen2.5-0.5B-Instruct"]).model.path.startswith("Qwen/")


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_validate_prints_resolved_yaml():
    out = cli("validate", "configs/demo.yaml", "--set", "loop.rounds=7")
    assert out.returncode == 0, out.stderr
    resolved = load_config(None, [])
    assert "rounds: 7" in out.stdout
    assert resolved.loop.rounds != 7  # the default differs, so the override did it


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "learner.beta=-1"], "learner.beta: must be > 0"),
        (["--set", "learner.betta=1"], "learner.betta: unknown key"),
        (["--set", "judge.cls=judges.verifiable:Nope"], "judge.cls: module 'judges.verifiable' has no attribute 'Nope'"),
    ],
)
def test_cli_validate_exits_2_naming_the_problem(args, expected):
    out = cli("validate", "configs/demo.yaml", *args)
    assert out.returncode == 2
    assert expected in out.stderr


def test_cli_validate_yaml_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: {rounds: 3\n")
    out = cli("validate", str(bad))
    assert out.returncode == 2 and "YAML error at line" in out.stderr
    out = cli("validate", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "no such config file" in out.stderr


def test_validate_imports_no_heavy_framework():
    code = (
        "import sys; from orchestrator.cli.main import main; main(['validate', 'configs/demo.yaml']);"
        "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
