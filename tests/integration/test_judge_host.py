"""Judge actors on a local Ray cluster: failing completions are lost alone and counted, wrong
shapes are reported by class name, dead and hung actors are replaced and the round completes."""

import pytest

from actors.judging.pool import JudgePool, JudgePoolError
from judges.base import Completion, JudgeItem
from orchestrator.config import JudgeConfig

pytestmark = pytest.mark.integration

T = "tests.integration.judges_for_tests"


def make_items(n_items=6, per_item=4, finish=lambda k: "stop"):
    """Items whose completions are c0, c1, ... in order."""
    return [JudgeItem(f"p{i}", [Completion(f"c{i * per_item + j}", finish(i * per_item + j)) for j in range(per_item)],
                      {"i": i}) for i in range(n_items)]


def flat(scores):
    return [s for row in scores for s in row]


def pool_of(name, ray_local, **cfg):
    cfg = {"num_actors": 2, "num_cpus": 0.5, "timeout_s": 60, **cfg}
    return JudgePool(JudgeConfig(cls=name if ":" in name else f"{T}:{name}", **cfg), seed=0, max_restarts=2)


def test_a_judge_raising_on_every_third_completion_loses_exactly_those(ray_local):
    pool = pool_of("RaisesEveryThird", ray_local)
    try:
        res = pool.score(make_items())
    finally:
        pool.shutdown()
    assert flat(res.scores) == [None if k % 3 == 2 else float(k) for k in range(24)]
    assert res.failures == {"raised": 8}
    assert "RaisesEveryThird.score raised ValueError: cannot score c2" in res.errors
    assert res.restarts == 0 and res.judge_s > 0


def test_wrong_shape_is_reported_by_class_name(ray_local):
    pool = pool_of("WrongShape", ray_local)
    try:
        res = pool.score(make_items(n_items=3, per_item=4))
    finally:
        pool.shutdown()
    assert flat(res.scores) == [None] * 12
    assert res.failures == {"wrong_shape": 12}
    assert "WrongShape.score: item 0: 3 scores for 4 completions (wrong_shape)" in res.errors


def test_async_judge_bad_values_become_none_and_are_counted(ray_local):
    pool = pool_of("AsyncBadValues", ray_local, num_actors=1)
    try:
        res = pool.score(make_items(n_items=2, per_item=4))
    finally:
        pool.shutdown()
    assert flat(res.scores) == [None, None, None, 3.0] * 2
    assert res.failures == {"nan": 2, "inf": 2, "not_a_number": 2}


def test_missing_eos_penalty_and_a_builtin_judge_on_actors(ray_local):
    items = [JudgeItem("17+26=", [Completion("43"), Completion("43", "length"), Completion("44", "length"),
                                  Completion("44")], {"answer": "43"}),
             JudgeItem("1+1=", [Completion("2")], {})]
    pool = pool_of("judges.verifiable:VerifiableJudge", ray_local, missing_eos_penalty=0.5)
    try:
        res = pool.score(items)
        assert pool.score([]).scores == []
    finally:
        pool.shutdown()
    assert res.scores == [[1.0, 0.5, -0.5, 0.0], [None]]
    assert res.failures == {"none": 1}


def test_chunks_are_spread_over_the_actors(ray_local):
    pool = pool_of("PidJudge", ray_local, num_actors=2)
    try:
        res = pool.score(make_items(n_items=4, per_item=2))
    finally:
        pool.shutdown()
    pids = [row[0] for row in res.scores]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


def test_a_dead_actor_is_restarted_and_the_batch_completes(ray_local, tmp_path):
    pool = pool_of("DiesOnce", ray_local, num_actors=1, kwargs={"marker": str(tmp_path / "died")})
    try:
        res = pool.score(make_items(n_items=3, per_item=2))
        again = pool.score(make_items(n_items=1, per_item=2))
    finally:
        pool.shutdown()
    assert (tmp_path / "died").exists()
    assert flat(res.scores) == [float(k) for k in range(6)]
    assert res.failures == {} and res.restarts == 1 and pool.restarts == 1
    assert any("actor 0 died" in e for e in res.errors)
    assert flat(again.scores) == [0.0, 1.0] and again.restarts == 0


def test_a_hung_call_times_out_and_the_actor_is_replaced(ray_local, tmp_path):
    pool = pool_of("HangsOnce", ray_local, num_actors=1, timeout_s=10, kwargs={"marker": str(tmp_path / "hung")})
    try:
        res = pool.score(make_items(n_items=2, per_item=2))
        again = pool.score(make_items(n_items=2, per_item=2))
    finally:
        pool.shutdown()
    assert flat(res.scores) == [None] * 4
    assert res.failures == {"timeout": 4} and res.restarts == 1
    assert flat(again.scores) == [0.0, 1.0, 2.0, 3.0] and again.failures == {}


def test_exhausted_restarts_raise_naming_the_judge(ray_local, tmp_path):
    cfg = JudgeConfig(cls=f"{T}:DiesOnce", kwargs={"marker": str(tmp_path / "m")}, num_actors=1, num_cpus=0.5)
    pool = JudgePool(cfg, max_restarts=0)
    try:
        with pytest.raises(JudgePoolError, match=r"DiesOnce.*actor 0 died; restarts exhausted \(0\)"):
            pool.score(make_items(n_items=1, per_item=2))
    finally:
        pool.shutdown()


def test_a_setup_failure_is_a_clear_error(ray_local):
    cfg = JudgeConfig(cls=f"{T}:SetupFails", num_actors=1, num_cpus=0.5)
    with pytest.raises(JudgePoolError, match=r"SetupFails.*failed to start: .*no reward model at /nowhere"):
        JudgePool(cfg)


class OneTooMany:
    """One score more than there are completions (the actors import it from this module)."""

    def score(self, items):
        return [[1.0] * (len(it.completions) + 1) for it in items]


def test_too_many_scores_lose_the_items_and_the_actor_goes_on(ray_local):
    pool = pool_of(f"{__name__}:OneTooMany", ray_local, num_actors=1)
    try:
        res = pool.score(make_items(n_items=2, per_item=3))
        again = pool.score(make_items(n_items=1, per_item=2))
    finally:
        pool.shutdown()
    assert flat(res.scores) == [None] * 6
    assert res.failures == {"wrong_shape": 6} and res.restarts == 0
    assert res.errors == ["OneTooMany.score: item 0: 4 scores for 3 completions (wrong_shape)"]
    assert again.failures == {"wrong_shape": 2} and pool.restarts == 0


def test_scores_and_corrections_come_back_in_one_call_per_chunk(ray_local):
    """With a corrector hosted next to the judge, ``score(items, correct=True)`` returns both: a
    judge that fails on some completions loses their scores, the corrector's own failures are
    counted apart, and pair making then needs no actor."""
    pool = JudgePool(JudgeConfig(cls=f"{T}:RaisesEveryThird", num_actors=2, num_cpus=0.5, timeout_s=60), seed=0,
                     max_restarts=2, corrector=("judges.correction:ReplaceCorrector", {"replace": {"c1": "C1"}}))
    try:
        res = pool.score(make_items(), correct=True)
        plain = pool.score(make_items())
    finally:
        pool.shutdown()
    assert flat(res.scores) == [None if k % 3 == 2 else float(k) for k in range(24)] == flat(plain.scores)
    assert res.failures == {"raised": 8} and res.corrector_failures == {}
    fixed = flat(res.corrections)
    assert fixed[1] == "C1" and fixed[10] == "C10" and fixed[0] is None  # only texts with "c1" change
    assert plain.corrections is None
