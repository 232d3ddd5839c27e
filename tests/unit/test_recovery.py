"""Recovery owns the sampling in flight when a round fails: async mode's next-round sampling is
taken over by the redo (same prompts, seed and weights), any other call still running is waited
out before the redo samples — never left running unowned, where it kept the generators busy,
was invisible to ``drain`` and stretched the next call past its deadline."""

from __future__ import annotations

from types import SimpleNamespace

from actors.generator.pool import GeneratorHung
from orchestrator.loop.loop import Loop
from orchestrator.loop.recovery import recover
from orchestrator.loop.state import DrawnRound, LoopState


class Generators:
    def __init__(self):
        self.log: list[tuple] = []

    def abandon(self, call):
        self.log.append(("abandon", call))
        return 1

    def restart_actor(self, i, resync=True):
        self.log.append(("restart", i))


def failed_loop(mode: str, in_hand: DrawnRound | None, pending: DrawnRound | None) -> SimpleNamespace:
    gens = Generators()
    learner = SimpleNamespace(alive=lambda: True)
    return SimpleNamespace(
        c=SimpleNamespace(loop=SimpleNamespace(mode=mode), run=SimpleNamespace(seed=0)), prompts=list(range(100)),
        state=LoopState(round=2, policy_version=2, sampler={"epoch": 0, "cursor": 32, "size": 100, "seed": 0}), round_retries=0, in_hand=in_hand, pending=pending,
        adopted=None, parts=SimpleNamespace(generators=gens, learner=learner), learn_started=False,
        learner_version=2, committed_version=2, pushing=False, rd=SimpleNamespace(read_metrics=lambda: []))


def drawn(round_: int, call=None, groups=None) -> DrawnRound:
    return DrawnRound(round_, [round_], {"epoch": 0, "cursor": 16 * round_, "size": 100, "seed": 0},
                      call=call, groups=groups)


def test_async_redo_takes_over_the_next_round_s_sampling_instead_of_orphaning_it():
    this, following = drawn(3, groups=[]), drawn(4, call="round 4 in flight")
    loop = failed_loop("async", this, following)
    recover(loop, 3, RuntimeError("the learner raised"))
    assert loop.pending is this and loop.adopted is following
    assert loop.parts.generators.log == []  # nothing abandoned, nothing sampled twice
    # The redo's sample phase takes it instead of drawing and submitting round 4 again.
    assert Loop.adopt(loop, 4) is following and loop.adopted is None
    assert loop.sampler.state()["cursor"] == 64  # the cursor after round 4's prompts, as if submitted
    assert Loop.adopt(loop, 5) is None


def test_a_call_the_redo_does_not_keep_is_waited_out_before_the_redo():
    call = "round 3 in flight"
    loop = failed_loop("sync", None, drawn(3, call=call))
    recover(loop, 3, RuntimeError("a judge actor died"))
    assert loop.pending is None and loop.adopted is None
    assert loop.parts.generators.log == [("abandon", call)]


def test_a_hung_generator_is_restarted_then_the_rest_of_its_call_waited_out():
    call = "round 3 in flight"
    loop = failed_loop("async", None, drawn(3, call=call))
    recover(loop, 3, GeneratorHung(1, "generator 1 did not answer sample within 60s"))
    assert loop.parts.generators.log == [("restart", 1), ("abandon", call)]
