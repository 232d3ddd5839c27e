"""The rehearsed learner failure: ``raise_after_steps`` lets exactly K optimizer steps through,
then raises before the next one changes anything (or at the end of a round with <= K steps)."""

import pytest
import torch

from actors.learner.fault_hooks import InjectedLearnerFault, raise_after_steps
from orchestrator.config import ConfigError, load_config


def sgd():
    p = torch.nn.Parameter(torch.zeros(1))
    return p, torch.optim.SGD([p], lr=1.0)


def steps(optimizer, param, n):
    for _ in range(n):
        param.grad = torch.ones_like(param)
        optimizer.step()


def test_k_steps_are_applied_then_the_next_one_raises_unapplied():
    p, opt = sgd()
    with pytest.raises(InjectedLearnerFault, match="after 1 optimizer steps"):
        with raise_after_steps(opt, 1):
            steps(opt, p, 3)
    assert float(p.detach()) == -1.0  # one step, not two
    steps(opt, p, 1)  # the hooks are gone
    assert float(p.detach()) == -2.0


def test_a_round_with_fewer_steps_raises_at_its_end_and_none_means_no_fault():
    p, opt = sgd()
    with pytest.raises(InjectedLearnerFault, match="after 2 optimizer steps"):
        with raise_after_steps(opt, 5):
            steps(opt, p, 2)
    assert float(p.detach()) == -2.0
    with raise_after_steps(opt, None):
        steps(opt, p, 1)
    assert float(p.detach()) == -3.0


def test_learner_raise_fault_config():
    c = load_config("configs/demo.yaml", ["faults.events=[{kind: learner, action: raise, after_steps: 1, round: 2}]"])
    ev = c.faults.events[0]
    assert (ev.kind, ev.action, ev.after_steps, ev.round) == ("learner", "raise", 1, 2)
    with pytest.raises(ConfigError, match="does not apply to kind 'sync'"):
        load_config("configs/demo.yaml", ["faults.events=[{kind: sync, action: nan}]"])
