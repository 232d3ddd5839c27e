"""The evaluation gate's decisions and the guards, without Ray (orchestrator/service/gate.py,
guards.py): when a rollback falls due and to which round; the best round's checkpoint survives
pruning; a checkpoint that would not fit is refused before writing, naming the folder and bytes;
rounds in a row without pairs stop the run naming the causes."""

import threading
from types import SimpleNamespace

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.loop.faults import FaultInjector
from orchestrator.observe.metrics import Metrics
from orchestrator.rundir import RunDir
from orchestrator.service.gate import gate_step, rolled_back
from orchestrator.service.guards import DiskFull, NoPairs, check_room, room_problem
from orchestrator.service.hooks import Service
from orchestrator.service.settings import GateConfig


def walk(cfg, values, start=None):
    state, due = start, []
    for r, v in values:
        state = gate_step(cfg, state, r, v)
        due.append(state["rollback_due"])
        if state["rollback_due"] is not None:
            state = rolled_back(state)
    return state, due


def test_a_drop_past_max_drop_makes_a_rollback_to_the_best_round_due():
    cfg = GateConfig(enabled=True, max_drop=0.05, patience=1)
    state, due = walk(cfg, [(0, 0.39), (2, 0.36), (4, 0.45), (6, 0.41), (8, 0.39), (10, None), (12, 0.46)])
    # 0.36 is within 0.05 of 0.39; 0.41 within 0.05 of 0.45; 0.39 is not: back to round 4.
    assert due == [None, None, None, None, 4, None, None]
    assert (state["best_round"], state["best"], state["rollbacks"], state["last"]) == (12, 0.46, 1, 0.46)


def test_patience_counts_drops_in_a_row_and_a_good_round_resets_it():
    cfg = GateConfig(enabled=True, max_drop=0.0, patience=2)
    _, due = walk(cfg, [(0, 0.5), (1, 0.4), (2, 0.5), (3, 0.4), (4, 0.3), (5, float("nan")), (6, 0.2)])
    assert due == [None, None, None, None, 0, None, None]


def test_the_gate_needs_an_eval_to_watch():
    with pytest.raises(ConfigError, match="loop.gate: watches eval_reward, which needs loop.eval_every > 0"):
        load_config("configs/demo.yaml", ["loop.gate.enabled=true", "loop.eval_every=0"])
    assert load_config("configs/demo.yaml", ["loop.gate.enabled=true", "loop.eval_every=0",
                                              "loop.gate.metric=reward_mean"]).loop.gate.enabled


def make_service(tmp_path, *overrides):
    rd = RunDir(tmp_path)
    rd.create()
    return Service(load_config("configs/demo.yaml", list(overrides)), rd, Metrics("t"), threading.Event(),
                   [{"prompt": "1+1=", "answer": 2}]), rd


def test_the_best_round_is_checkpointed_and_never_pruned(tmp_path):
    service, rd = make_service(tmp_path, "loop.gate.enabled=true")
    loop = SimpleNamespace(state=SimpleNamespace(service={"gate": gate_step(service.c.loop.gate, None, 0, 0.4)}))
    rec = {"pairs": 3, "eval_reward": 0.5}
    nxt = SimpleNamespace(service=service.state_after(loop, 3, [], rec))
    assert service.checkpoint_due(nxt, 3) and rec["gate"]["best_round"] == 3
    for r in (3, 4, 6, 8):
        (rd.checkpoint_path(r) / "policy").mkdir(parents=True)
    rd.prune_checkpoints(2, protect=Service.protected(nxt))
    assert [p.name for p in rd.checkpoints()] == ["round_000003", "round_000006", "round_000008"]
    service.close()


def test_a_checkpoint_without_room_is_refused_before_writing_naming_folder_and_bytes(tmp_path):
    rd = RunDir(tmp_path)
    rd.create()
    check_room(rd, 1, free=0)  # no checkpoint yet: nothing to measure the next one by
    last = rd.checkpoint_path(2)
    last.mkdir()
    (last / "state.bin").write_bytes(b"x" * 1000)
    assert room_problem(rd.checkpoints_dir, last, free=1100) is None
    with pytest.raises(DiskFull) as e:
        check_room(rd, 4, free=1099)
    assert str(e.value).startswith(f"cannot checkpoint round 4: checkpoint folder {rd.checkpoints_dir}: 1,099 bytes "
                                   "free, 1,100 needed (the last checkpoint, round_000002, took 1,000 bytes")
    assert "round_000002 is intact" in str(e.value)
    check_room(rd, 4)  # this file system has room for 1 kB


def test_a_disk_fault_leaves_the_disk_full_from_its_round_on():
    faults = FaultInjector(load_config(None, ["faults.events=[{kind: disk, action: full, round: 3}]"]).faults)
    assert [faults.free_bytes(r) for r in (1, 2, 3, 4)] == [None, None, 0, 0]


def test_rounds_without_pairs_stop_the_run_naming_the_causes(tmp_path):
    service, rd = make_service(tmp_path, "loop.max_rounds_without_pairs=2")
    for r, pairs in ((1, 4), (2, 0), (3, 0)):
        rd.append_metrics({"round": r, "pairs": pairs, "judge_failures": {"raised": 64} if not pairs else {},
                           "pairs_dropped": {"too_few_scored": 16} if not pairs else {"tie": 12}})
    loop = SimpleNamespace(state=SimpleNamespace(service={}))
    for pairs in (4, 0):
        loop.state.service = service.state_after(loop, 1, [], {"pairs": pairs})
        service.check_idle(loop)
    loop.state.service = service.state_after(loop, 3, [], {"pairs": 0})
    with pytest.raises(NoPairs) as e:
        service.check_idle(loop)
    assert str(e.value) == ("no preference pair in 2 rounds in a row (rounds 2-3; loop.max_rounds_without_pairs=2): "
                            "judge failures by kind: raised 128; prompts without a pair by reason: too_few_scored 32")
    service.close()
