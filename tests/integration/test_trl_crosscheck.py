"""Our learner's DPO loss equals TRL's ``DPOTrainer.compute_loss`` on the same pairs and model.

Both sides start from the demo model with the same seeded perturbation as the policy and the
unperturbed model as the reference (with policy == reference every loss would be log 2 and the
check would prove nothing). TRL tokenizes ``prompt`` (with BOS) and ``prompt + answer + EOS``;
our learner tokenizes the prompt and the answer separately and appends EOS to ``stop`` answers:
with the demo's character tokenizer both give the same ids, which the first test checks.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.learner.rank import Learner
from common.types import PreferencePair
from orchestrator.config import LearnerConfig, ModelConfig
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration

# Answers of varied lengths so that padding and masking matter; "" is EOS alone.
ROWS = [("17+26=", "43", "4"), ("90+90=", "180", "1800"), ("10+11=", "21", "12"),
        ("55+45=", "100", ""), ("33+12=", "45", "45 "), ("71+19=", "90", "9O!?")]


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    policy = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    _perturb(policy)
    reference = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": [r[0] for r in ROWS], "chosen": [r[1] for r in ROWS],
                              "rejected": [r[2] for r in ROWS]})
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, beta=0.1,
                     per_device_train_batch_size=len(ROWS), max_length=None, disable_tqdm=True,
                     bf16=False)  # TRL defaults to bf16 autocast (even on CPU); compare in float32
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tok)


@pytest.fixture(scope="module")
def ours():
    learner = Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64),
                      LearnerConfig(batch_size=len(ROWS), micro_batch_size=len(ROWS)))
    _perturb(learner.model)
    return learner


PAIRS = [PreferencePair(p, c, r, 1.0, 0.0) for p, c, r in ROWS]


def test_both_score_the_same_tokens(trl_trainer, ours):
    kept, _ = ours._tokenize(PAIRS)
    assert len(kept) == len(ROWS)
    for row, mine in zip(trl_trainer.train_dataset, kept):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            mine.prompt_ids, mine.chosen_ids, mine.rejected_ids)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2), ("ipo", 0.0)])
def test_loss_equals_trl(trl_trainer, ours, loss_type, label_smoothing):
    trl_trainer.loss_types = [loss_type]
    trl_trainer.label_smoothing = label_smoothing
    batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(len(ROWS))])
    with torch.no_grad():
        trl_loss = float(trl_trainer.compute_loss(trl_trainer.model, batch))
    metrics = next(m for m in trl_trainer._metrics.values() if m["rewards/chosen"])

    # TRL length-normalizes log-probs for IPO: compare with our length-normalized option.
    ours.cfg = LearnerConfig(batch_size=len(ROWS), micro_batch_size=len(ROWS), beta=0.1, loss_type=loss_type,
                             label_smoothing=label_smoothing, length_normalize=loss_type == "ipo")
    report = ours.evaluate(PAIRS)
    assert report["pairs_trained"] == len(ROWS)
    assert report["dpo_loss"] == pytest.approx(trl_loss, abs=1e-5)
    assert report["logp_chosen"] == pytest.approx(metrics["logps/chosen"][-1], abs=1e-4)
    assert report["logp_rejected"] == pytest.approx(metrics["logps/rejected"][-1], abs=1e-4)
    if loss_type != "ipo":  # TRL logs summed-log-prob rewards; ours follow the loss (per-token for IPO)
        assert report["reward_chosen"] == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
        assert report["reward_rejected"] == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
        assert report["reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"][-1], abs=1e-6)
    # The perturbation makes the check meaningful: the loss is not the policy == reference value.
    assert abs(report["reward_chosen"] - report["reward_rejected"]) > 0.05
