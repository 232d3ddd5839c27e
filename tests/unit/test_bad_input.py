"""The bad-input catalogue: each bad input is a clear error before the loop starts (naming the
file, line, row or field) or a counted skip. Cases covered elsewhere are named in docs/reliability.md's
"Bad input" table; these are the rest: null prompts, bytes that are not UTF-8, broken JSON
lines, judges returning the wrong shape, truncated checkpoints, and `odpo run` turning a data or
run-directory problem into one `error:` line and exit status 2 before Ray starts."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from judges.base import Completion, JudgeItem
from judges.calling import score_guarded
from orchestrator.loop.data import DataError, load_prompts
from orchestrator.rundir import RunDir
from orchestrator.cli.run import _checkpoint_problem
from tests.conftest import DEMO_MODEL, REPO


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- dataset rows -------------------------------------------------------------------------------

def test_null_and_non_text_prompts_are_counted_skips(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": None, "answer": "3"}, {"answer": "4"},
            {"prompt": "2+2=", "answer": "4"}]
    ps = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows), "train", "prompt")
    assert [r["prompt"] for r in ps.rows] == ["1+1=", "2+2="]
    assert dict(ps.skipped) == {"not_text": 2}


def test_all_null_prompts_is_an_error_naming_the_column(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": None}, {"prompt": None}])
    with pytest.raises(DataError, match=r"d.jsonl: no usable prompts in column 'prompt' \(skipped: \{'not_text': 2\}\)"):
        load_prompts(src, "train", "prompt")


@pytest.mark.parametrize("name, body, where", [
    ("bad.jsonl", b'{"prompt": "1+1="}\n{"prompt": "2\xff+2="}\n', "line 2: not valid UTF-8 (byte 0xff at column 14)"),
    ("bad.jsonl", b'{"prompt": "\xc3\xa9\xc3\xa9"}\n\n{"p": 1}\n{"prompt": "\xc3\xa9\xfe"}\n',
     "line 4: not valid UTF-8 (byte 0xfe at column 14)"),  # columns count characters, not bytes
    ("bad.csv", b'prompt,answer\n"1+1=",2\n"2+2=\xff",4\n', "line 3: not valid UTF-8 (byte 0xff at column 6)"),
])
def test_invalid_utf8_names_the_file_and_line(tmp_path, name, body, where):
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(DataError) as err:
        load_prompts(str(path), "train", "prompt")
    assert str(err.value) == f"{path}: {where}"


def test_invalid_utf8_inside_a_parquet_string_column_names_the_row(tmp_path):
    # pyarrow writes unvalidated string buffers as they are; reading row 1 is what fails.
    data = b"1+1=" + b"2\xff+2="
    offsets = pa.array([0, 4, len(data)], type=pa.int32()).buffers()[1]
    column = pa.StringArray.from_buffers(2, offsets, pa.py_buffer(data))
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": column}), path)
    with pytest.raises(DataError, match=rf"^{path}: row 1: cannot read \(UnicodeDecodeError: .*0xff"):
        load_prompts(str(path), "train", "prompt")


def test_a_broken_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", \n{"prompt": "3+3="}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 2: not valid JSON \(Expecting property name"):
        load_prompts(str(path), "train", "prompt")


def test_an_unreadable_parquet_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError) as err:
        load_prompts(str(path), "train", "prompt")
    assert str(err.value).startswith(f"{path}: cannot load (ArrowInvalid: ") and "\n" not in str(err.value)


# --- judges: wrong shapes the integration tests do not cover ------------------------------------

def items_of(*sizes):
    return [JudgeItem(f"p{i}", [Completion(f"c{j}") for j in range(n)], {}) for i, n in enumerate(sizes)]


class OneTooMany:
    def score(self, items):
        return [[1.0] * (len(it.completions) + 1) for it in items]


class ExtraList:
    def score(self, items):
        return [[1.0] * len(it.completions) for it in items] + [[0.0]]


class ReturnsText:
    def score(self, items):
        return "1.0, 0.0"


class ReturnsNone:
    def score(self, items):
        return None


@pytest.mark.parametrize("judge, errors", [
    # The batch fails, then each item alone: every message names the judge class.
    (OneTooMany(), ["OneTooMany.score: item 0: 4 scores for 3 completions (wrong_shape)",
                    "OneTooMany.score: item 0: 3 scores for 2 completions (wrong_shape)"]),
    (ExtraList(), ["ExtraList.score returned 3 lists for 2 items (wrong_shape)",
                   "ExtraList.score returned 2 lists for 1 items (wrong_shape)"]),
    (ReturnsText(), ["ReturnsText.score returned str, expected a list of lists (wrong_shape)"]),
    (ReturnsNone(), ["ReturnsNone.score returned NoneType, expected a list of lists (wrong_shape)"]),
])
def test_wrong_shapes_lose_their_completions_and_are_counted(judge, errors):
    scores, failures, messages = score_guarded(judge, items_of(3, 2))
    assert messages == errors
    assert scores == [[None] * 3, [None] * 2]
    assert failures == {"wrong_shape": 5}


# --- truncated checkpoints ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)


def write_checkpoint(rd: RunDir, round_: int, model) -> None:
    """A checkpoint laid out as the learner writes one (policy/, reference.safetensors,
    optimizer.pt), committed through the run directory."""
    from safetensors.torch import save_file

    staging = rd.staging_checkpoint_path(round_)
    model.save_pretrained(staging / "policy", safe_serialization=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(staging / "reference.safetensors"))
    torch.save({"format": 1, "steps": round_, "scheduler": {"last_epoch": round_}}, staging / "optimizer.pt")
    rd.commit_checkpoint(staging, round_, {"round": round_, "policy_version": round_, "sampler": {}})


@pytest.mark.parametrize("part, reason", [
    ("policy/model.safetensors", "model.safetensors is unreadable (SafetensorError)"),
    ("reference.safetensors", "reference.safetensors is unreadable (SafetensorError)"),
    ("optimizer.pt", "optimizer.pt is unreadable"),
])
def test_truncated_checkpoint_falls_back_to_the_previous_good_one(tmp_path, demo_model, part, reason):
    rd = RunDir(tmp_path / "run")
    rd.create()
    for r in (2, 4):
        write_checkpoint(rd, r, demo_model)
    assert rd.latest_good_checkpoint(_checkpoint_problem) == (rd.checkpoint_path(4), [])
    broken = rd.checkpoint_path(4) / part
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])

    path, passed_over = rd.latest_good_checkpoint(_checkpoint_problem)
    assert path == rd.checkpoint_path(2)
    assert passed_over == [f"round_000004: {reason}"]
    # The one picked is really usable: its policy loads and its optimizer state reads safely.
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(path / "policy", dtype=torch.float32)
    assert torch.equal(policy.state_dict()["lm_head.weight"], demo_model.state_dict()["lm_head.weight"])
    assert torch.load(path / "optimizer.pt", weights_only=True)["steps"] == 2
    assert rd.read_checkpoint_state(path)["round"] == 2


def test_no_good_checkpoint_at_all_is_reported(tmp_path, demo_model):
    rd = RunDir(tmp_path / "run")
    rd.create()
    write_checkpoint(rd, 2, demo_model)
    (rd.checkpoint_path(2) / "policy" / "model.safetensors").write_bytes(b"")
    path, passed_over = rd.latest_good_checkpoint(_checkpoint_problem)
    assert path is None and passed_over == ["round_000002: model.safetensors is unreadable (SafetensorError)"]


# --- `odpo run`: problems found before the loop are one error line, exit 2 ----------------------

def odpo_run(*overrides):
    args = [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml"]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never a shared cluster
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_run_unwritable_run_dir_is_one_error_line_before_ray():
    out = odpo_run("run.output_dir=/proc/odpo")
    assert out.returncode == 2
    # One line and nothing else: Ray, which logs when it starts, never started.
    assert out.stderr.splitlines() == [
        "error: run directory /proc/odpo/demo is not writable: No such file or directory"], out.stderr


@pytest.mark.parametrize("source, message", [
    ("./nope.jsonl", "./nope.jsonl: no such file or folder"),
    ("BAD", "BAD: line 2: not valid UTF-8 (byte 0xff at column 14)"),
])
def test_cli_run_bad_data_is_one_error_line_before_ray(tmp_path, source, message):
    if source == "BAD":
        bad = tmp_path / "train.jsonl"
        bad.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "2\xff+2="}\n')
        source = str(bad)
        message = message.replace("BAD", source)
    out = odpo_run(f"data.source={source}", f"run.output_dir={tmp_path / 'runs'}")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: {message}"], out.stderr
