"""Streamed shared-memory publications without an engine: a reader takes each tensor as soon as the
writer has marked it, and stops with ``PublicationAborted`` at the first tensor the writer will
never write (it failed, or its process is gone)."""

import subprocess
import threading

import pytest
import torch
from torch import nn

from actors.weight_sync.layout import ParamSpec
from actors.weight_sync import PublicationAborted, PublishRequest, open_published, prepare_stream, publish_rank

SPEC = ParamSpec({"a.weight": (4, 3), "b.bias": (3,)}, frozenset({"lm_head.weight"}), "bfloat16")


class StreamingLearner:
    """A rank-0 learner (``weight_sync.LearnerRank``) with its streamed export; ``gate`` holds the
    stream after its first tensor until set, ``fail`` raises there instead."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.model = nn.Module()
        self.model.a = nn.Linear(3, 4, bias=False)
        self.model.lm_head = nn.Linear(2, 2, bias=False)
        self.model.b = nn.Module()
        self.model.b.bias = nn.Parameter(torch.randn(3))
        self.gate, self.fail, self.rank = gate, fail, 0

    def iter_full_state(self, dtype=None):
        for i, (name, tensor) in enumerate(self.model.state_dict().items()):
            if i == 1:
                if self.fail:
                    raise RuntimeError("gather failed")
                if self.gate is not None:
                    assert self.gate.wait(30)
            yield name, tensor.detach()


def start(learner, path, token=7):
    layout = prepare_stream(learner, SPEC, path)
    desc = {"kind": "shm", "slots": layout["slots"], "path": path, "token": token,
            "writer_pid": layout["writer_pid"], "timeout_s": 30}
    errors: list[BaseException] = []

    def write():
        try:
            publish_rank(learner, PublishRequest("shm", SPEC, path, layout["slots"], token))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    return desc, thread, errors


def test_a_reader_takes_each_tensor_while_the_rest_is_written(tmp_path):
    gate = threading.Event()
    learner = StreamingLearner(gate)
    desc, thread, errors = start(learner, str(tmp_path / "buf.bin"))
    assert [s.name for s in desc["slots"]] == ["a.weight", "b.bias"]  # the learner's order, tied head left out
    tensors = open_published(desc)
    name, first = next(tensors)  # the writer is held after its first tensor: this one is already there
    assert name == "a.weight" and thread.is_alive()
    assert torch.equal(first, learner.model.a.weight.detach().to(torch.bfloat16))
    gate.set()
    name, second = next(tensors)
    assert name == "b.bias" and torch.equal(second, learner.model.b.bias.detach().to(torch.bfloat16))
    thread.join(30)
    assert not errors and next(tensors, None) is None


def test_an_old_publication_in_the_same_buffer_is_not_taken_for_the_new_one(tmp_path):
    path = str(tmp_path / "buf.bin")
    desc, thread, _ = start(StreamingLearner(), path, token=7)
    thread.join(30)
    gate = threading.Event()
    learner = StreamingLearner(gate)
    desc, thread, errors = start(learner, path, token=8)
    tensors = open_published(desc)
    next(tensors)
    # b.bias still holds token 7's bytes: the reader waits for token 8's.
    waiting = threading.Thread(target=lambda: got.append(next(tensors)))
    got: list = []
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not got
    gate.set()
    waiting.join(30)
    thread.join(30)
    assert not errors and torch.equal(got[0][1], learner.model.b.bias.detach().to(torch.bfloat16))


def test_a_writer_that_fails_stops_the_reader_at_the_first_missing_tensor(tmp_path):
    desc, thread, errors = start(StreamingLearner(fail=True), str(tmp_path / "buf.bin"))
    thread.join(30)
    assert [str(e) for e in errors] == ["gather failed"]
    tensors = open_published(desc)
    assert next(tensors)[0] == "a.weight"
    with pytest.raises(PublicationAborted, match="stopped publishing at 'b.bias'"):
        next(tensors)


def test_a_writer_that_died_stops_the_reader(tmp_path):
    path = str(tmp_path / "buf.bin")
    layout = prepare_stream(StreamingLearner(), SPEC, path)  # laid out, then nothing written
    gone = subprocess.Popen(["true"])
    gone.wait()
    desc = {"kind": "shm", "slots": layout["slots"], "path": path, "token": 9, "writer_pid": gone.pid,
            "timeout_s": 30}
    with pytest.raises(PublicationAborted, match=rf"pid {gone.pid}\) died before publishing 'a.weight'"):
        next(open_published(desc))


def test_a_mismatched_plan_is_refused_before_the_buffer_is_made(tmp_path):
    learner = StreamingLearner()
    learner.model.b.bias = nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=r"'b.bias' has shape \[5\]"):
        prepare_stream(learner, SPEC, str(tmp_path / "buf.bin"))
    assert not (tmp_path / "buf.bin").exists()
