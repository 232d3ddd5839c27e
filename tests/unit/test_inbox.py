"""The prompt inbox (orchestrator/service/inbox.py, mailbox.py): a batch is checked against the
training set's rows and refused whole naming its line; batches are published whole and numbered
without gaps, even by writers racing; every row is drawn exactly once, across a resumed cursor."""

import json
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.loop.data import PromptSampler
from orchestrator.service import mailbox
from orchestrator.service.inbox import (Inbox, InboxError, add_batch, draw_rows, inbox_dir, inbox_prompts,
                                        parse_file, parse_jsonl, row_schema, write_schema)
from tests.conftest import REPO

TRAIN = [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(10)]


@pytest.fixture
def run_dir(tmp_path):
    write_schema(tmp_path, row_schema(TRAIN, "prompt", max_rows=100))
    return tmp_path


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def batches(run_dir):
    return sorted(p.name for p in inbox_dir(run_dir).glob("batch_*"))


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "7+8="}, "line 3: no column 'answer'"),
    ({"prompt": "7+8=", "answer": 15, "note": "x"}, "line 3: column 'note' is not one of the training set's"),
    ({"prompt": "7+8=", "answer": "15"}, "line 3: column 'answer' holds str; the training set's holds int"),
    ({"prompt": "   ", "answer": 1}, "line 3: empty prompt in column 'prompt'"),
    ({"prompt": "a\x00b", "answer": 1}, "line 3: control chars prompt in column 'prompt'"),
    ({"prompt": ["x"], "answer": 1}, "line 3: column 'prompt' holds list; the training set's holds str"),
    ({"prompt": "1+1=", "answer": 2}, "line 3: the same prompt as line 1"),
    ({"prompt": "7+8=", "answer": 15, "source_batch": "x"}, "line 3: column 'source_batch' is reserved"),
    ("[1, 2]", "line 3: expected an object with the training set's columns, got list"),
    ('{"prompt": "7+8=", "answer": 1', "line 3: not valid JSON"),
])
def test_a_bad_row_refuses_the_whole_batch_naming_its_line(run_dir, bad, message):
    body = jsonl({"prompt": "1+1=", "answer": 2}, {"prompt": "2+5=", "answer": 7}, bad)
    with pytest.raises(InboxError) as e:
        add_batch(run_dir, parse_jsonl(body, "new.jsonl"), "new.jsonl")
    assert str(e.value).startswith(f"new.jsonl: {message}"), str(e.value)
    assert batches(run_dir) == []  # nothing partly added


def test_bytes_that_are_not_utf8_an_empty_batch_and_one_too_big_are_refused(run_dir):
    with pytest.raises(InboxError, match=r"^x.jsonl: line 2: not valid UTF-8"):
        parse_jsonl(b'{"prompt": "1+1=", "answer": 2}\n{"prompt": "\xff"}\n', "x.jsonl")
    with pytest.raises(InboxError, match="x.jsonl: no rows"):
        add_batch(run_dir, parse_jsonl(b"\n\n", "x.jsonl"), "x.jsonl")
    rows = [{"prompt": f"{i}+0=", "answer": i} for i in range(101)]
    with pytest.raises(InboxError, match="101 rows, more than data.inbox.max_rows=100"):
        add_batch(run_dir, [(f"line {i}", r) for i, r in enumerate(rows, 1)], "x.jsonl")
    assert batches(run_dir) == []


def test_parquet_rows_are_checked_and_named_by_row(run_dir, tmp_path):
    path = tmp_path / "new.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "3+4=", "answer": 7}, {"prompt": "", "answer": 0}]), path)
    with pytest.raises(InboxError, match=r"new.parquet: row 1: empty prompt"):
        add_batch(run_dir, parse_file(path), str(path))
    pq.write_table(pa.Table.from_pylist([{"prompt": "3+4=", "answer": 7}]), path)
    assert add_batch(run_dir, parse_file(path), str(path))["rows"] == 1


def test_writers_racing_get_numbers_without_gaps_and_whole_files(tmp_path):
    def write(k):
        for j in range(10):
            mailbox.publish(tmp_path, "batch", ".jsonl", lambda p, k=k, j=j: p.write_text(f"{k}-{j}\n" * 50))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"batch_{n:06d}.jsonl" for n in range(1, 41)]  # no temporary file left behind
    contents = {(tmp_path / n).read_text() for n in names}
    assert len(contents) == 40 and all(len(set(c.splitlines())) == 1 for c in contents)


def test_every_inbox_row_is_drawn_once_first_and_marked_across_a_saved_cursor(run_dir):
    add_batch(run_dir, [(f"line {i}", {"prompt": f"{i}*2=", "answer": 2 * i}) for i in range(1, 8)], "a")
    inbox, sampler = Inbox(run_dir), PromptSampler(len(TRAIN), seed=0)
    indices, rows = draw_rows(sampler, TRAIN, inbox, share=1.0, k=4)
    assert indices == [-1] * 4 and inbox_prompts(rows) == 4
    assert {r["source_batch"] for r in rows} == {"inbox/batch_000001"}
    saved = sampler.state()  # a checkpoint; a second batch arrives while the run is down
    add_batch(run_dir, [(f"line {i}", {"prompt": f"{i}*3=", "answer": 3 * i}) for i in range(1, 4)], "b")
    resumed = PromptSampler.from_state(json.loads(json.dumps(saved)), len(TRAIN), seed=0)
    drawn = rows
    for _ in range(3):
        indices, rows = draw_rows(resumed, TRAIN, Inbox(run_dir), share=1.0, k=4)
        drawn += rows
    inbox_rows = [r["prompt"] for r in drawn if r.get("source_batch", "dataset") != "dataset"]
    assert sorted(inbox_rows) == sorted([f"{i}*2=" for i in range(1, 8)] + [f"{i}*3=" for i in range(1, 4)])
    assert len(inbox_rows) == len(set(inbox_rows)) == 10
    assert resumed.state()["inbox"] == [3, 0] and len(drawn) == 16  # the dataset's rows fill each round


def test_a_share_below_one_leaves_room_for_the_dataset(run_dir):
    add_batch(run_dir, [(f"line {i}", {"prompt": f"{i}*5=", "answer": 5 * i}) for i in range(1, 11)], "a")
    sampler, inbox = PromptSampler(len(TRAIN), seed=0), Inbox(run_dir)
    counts = [inbox_prompts(draw_rows(sampler, TRAIN, inbox, share=0.25, k=8)[1]) for _ in range(6)]
    assert counts == [2, 2, 2, 2, 2, 0]
    assert inbox.waiting(sampler.inbox) == 0


def test_cli_add_prompts_refuses_a_bad_file_naming_its_line_and_adds_a_good_one(run_dir, tmp_path):
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_bytes(jsonl({"prompt": "3+3=", "answer": 6}, {"prompt": "4+4="}))
    good.write_bytes(jsonl({"prompt": "3+3=", "answer": 6}, {"prompt": "4+4=", "answer": 8}))
    run = [sys.executable, "-m", "orchestrator", "add-prompts", str(run_dir)]
    out = subprocess.run([*run, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"error: {bad}: line 2: no column 'answer' (the training set's rows have ['answer', 'prompt'])\n"
    assert batches(run_dir) == []
    out = subprocess.run([*run, str(good)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == 2 and batches(run_dir) == ["batch_000001.jsonl"]


def test_an_async_checkpoint_keeps_the_row_of_an_inbox_prompt_among_its_saved_samples(tmp_path):
    from common.types import Completion, SampleGroup
    from orchestrator.loop.carried import load_carried, save_carried
    from orchestrator.loop.state import DrawnRound

    inbox_row = {"prompt": "7+26=", "answer": 33, "source_batch": "inbox/batch_000002"}
    groups = [SampleGroup("7+26=", inbox_row, [Completion("33", token_ids=[5, 2])], 3, [1, 9]),
              SampleGroup(TRAIN[4]["prompt"], TRAIN[4], [Completion("8", token_ids=[6, 2])], 3, [1, 8])]
    saved = save_carried(DrawnRound(5, [-1, 4], {"inbox": [2, 1]}, groups=groups), tmp_path)
    back = load_carried(tmp_path, saved, TRAIN, "prompt")
    assert back.indices == [-1, 4] and [g.row for g in back.groups] == [inbox_row, TRAIN[4]]
    assert back.groups == groups and back.sampler_after == {"inbox": [2, 1]}
