"""Prompt loading and the resumable sampler."""

import json

import pytest

from orchestrator.loop.data import DataError, PromptSampler, load_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sampler_covers_each_epoch_once_and_resumes_exactly():
    s = PromptSampler(10, seed=3)
    first = s.draw(4) + s.draw(4) + s.draw(2)
    assert sorted(first) == list(range(10))
    a = PromptSampler(10, seed=3)
    a.draw(7)
    b = PromptSampler.from_state(a.state(), 10, 3)
    assert a.draw(9) == b.draw(9)
    assert PromptSampler(10, seed=4).draw(10) != first


def test_sampler_crosses_epochs():
    s = PromptSampler(3, seed=0)
    drawn = s.draw(7)
    assert len(drawn) == 7 and s.epoch == 2 and s.cursor == 1


def test_missing_prompt_column_names_file_and_field(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl: no column 'prompt' \(data.prompt_field\)"):
        load_prompts(src, "train", "prompt")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "ok 1"}, {"prompt": "  "}, {"prompt": ""}, {"prompt": "ok 1"},
            {"prompt": "bad \x07 bell"}, {"prompt": "ok 2"}]
    ps = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows), "train", "prompt")
    assert [r["prompt"] for r in ps.rows] == ["ok 1", "ok 2"]
    assert dict(ps.skipped) == {"empty": 2, "duplicate": 1, "control_chars": 1}


def test_empty_dataset_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": " "}])
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(src, "train", "prompt")


def test_missing_file_is_an_error():
    with pytest.raises(DataError, match="no such file"):
        load_prompts("./nope.jsonl", "train", "prompt")


def test_limit_and_chat_prompts(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]
    ps = load_prompts(write_jsonl(tmp_path / "c.jsonl", rows), "train", "prompt", limit=3)
    assert len(ps) == 3 and ps.rows[0]["prompt"][0]["content"] == "q0"
