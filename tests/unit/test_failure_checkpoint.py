"""What the checkpoint written on the way out of a failed run holds (``checkpoint_before_failing``):
the last completed round, the learner's version of that round (not the failed attempt's), and,
in async mode only, the failed round's samples if they were collected (what a checkpoint of the
last round would have held); sampling still in flight (perhaps on a lost generator) is dropped,
never waited for."""

from types import SimpleNamespace

import pytest

from orchestrator.loop.recovery import rewind_to_last_round
from orchestrator.loop.state import DrawnRound, LoopState


def loop_after_failure(mode, in_hand, pending):
    return SimpleNamespace(c=SimpleNamespace(loop=SimpleNamespace(mode=mode)), state=LoopState(round=3),
                           committed_version=3, learner_version=4, in_hand=in_hand, pending=pending)


def collected(round_):
    return DrawnRound(round_, [0, 1], {"cursor": 2}, groups=[])


@pytest.mark.parametrize("mode, in_hand, pending, kept", [
    ("async", collected(4), DrawnRound(5, [2], {}, call="in flight"), 4),  # round 4 collected, 5 in flight
    ("async", None, DrawnRound(4, [2], {}, call="in flight"), None),  # failed while sampling round 4
    ("async", DrawnRound(4, [0], {}, call="h"), None, None),  # not collected
    ("sync", collected(4), None, None),  # sync resumes sample afresh, with the same weights
    ("sync", None, DrawnRound(4, [2], {}, call="on a lost node"), None),
])
def test_rewind_keeps_only_collected_async_samples_of_the_next_round(mode, in_hand, pending, kept):
    loop = loop_after_failure(mode, in_hand, pending)
    rewind_to_last_round(loop)
    assert loop.learner_version == 3 and loop.in_hand is None
    assert (loop.pending.round if loop.pending else None) == kept
