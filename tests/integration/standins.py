"""TEST-ONLY stand-ins shared by the weight-sync integration tests: a learner worker that holds the
demo model in transformers, with the contract of ``actors.learner``'s ``LearnerWorker``
(``apply``, ``full_state_dict``, ``model``) plus helpers to change its weights and to score
completions under them."""

import ray
import torch

from tests.conftest import DEMO_MODEL

MAX_NEW = 6
EOS = 2


@ray.remote(num_cpus=0)
class StandInLearnerWorker:
    """TEST-ONLY stand-in for the learner's rank-0 worker: the demo model in transformers."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.corrupt = None

    def apply(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)

    def full_state_dict(self) -> dict:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.corrupt == "name":
            state["model.layers.0.mlp.gate_projj.weight"] = state.pop("model.layers.0.mlp.gate_proj.weight")
        elif self.corrupt == "shape":
            state["model.norm.weight"] = torch.ones(64)
        return state

    def set_corrupt(self, how):
        self.corrupt = how

    @torch.no_grad()
    def sgd_steps(self, ids: list[int], steps: int, lr: float) -> None:
        """A few plain SGD steps that make ``ids`` likelier: a real weight change."""
        self.model.train()
        x = torch.tensor([ids])
        for _ in range(steps):
            with torch.enable_grad():
                loss = self.model(x, labels=x).loss
                loss.backward()
            for p in self.model.parameters():
                p -= lr * p.grad
                p.grad = None
        self.model.eval()

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]]) -> list[list[int]]:
        out = []
        for ids in prompts:
            x = torch.tensor([ids])
            gen = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                                      pad_token_id=0, eos_token_id=EOS)[0, len(ids):].tolist()
            out.append(gen[: gen.index(EOS) + 1] if EOS in gen else gen)  # the engine returns a sampled EOS too
        return out

    @torch.no_grad()
    def logprob(self, prompt: list[int], completion: list[int]) -> float:
        x = torch.tensor([prompt + completion])
        logps = self.model(x).logits[0, :-1].float().log_softmax(-1)
        targets = x[0, 1:]
        return float(logps[torch.arange(len(targets)), targets][len(prompt) - 1:].sum())


class StandInLearner:
    """TEST-ONLY stand-in for ``LearnerGroup``: ``workers`` and ``rank0``."""

    def __init__(self):
        self.workers = [StandInLearnerWorker.remote(str(DEMO_MODEL))]
        self.rank0 = self.workers[0]
