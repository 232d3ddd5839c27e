"""TEST-ONLY stand-ins shared by the weight-sync integration tests: a learner worker that holds the
demo model in transformers, with the weight-sync contract of ``actors.learner``'s ``LearnerWorker``
(its named methods ``publish_weights``, ``prepare_weight_stream``, ``node_info``,
``remove_sync_files``; ``actors/weight_sync/base.py``), being its own ``LearnerRank`` (``rank``,
``model``, ``iter_full_state``), plus helpers to change its weights and to score completions
under them."""

from types import SimpleNamespace

import ray
import torch

from actors import weight_sync
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
        self.rank = 0
        self.undo_corrupt = None
        self.fail_after = None

    def apply(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)

    def iter_full_state(self, dtype=None):
        for k, (name, tensor) in enumerate(self.model.state_dict().items()):
            if k == self.fail_after:
                raise RuntimeError(f"gather failed at {name!r}")
            yield name, tensor.detach().to("cpu", dtype or tensor.dtype)

    def set_fail_after(self, tensors):
        """Make the export raise after ``tensors`` tensors (a learner failing mid-publication); None: never."""
        self.fail_after = tensors

    # The weight-sync methods of ``LearnerWorker``, on this stand-in as its own learner.

    def publish_weights(self, request):
        return weight_sync.publish_rank(self, request)

    def prepare_weight_stream(self, spec, path):
        return weight_sync.prepare_stream(self, spec, path)

    def node_info(self, shm_dir):
        return weight_sync.node_info(shm_dir)

    def remove_sync_files(self, paths):
        weight_sync.remove_files(paths)

    def set_corrupt(self, how):
        """Make the policy mismatch the engine's model (``name``: a misspelt parameter; ``shape``:
        a wrong shape); None puts it back."""
        if self.undo_corrupt is not None:
            self.undo_corrupt()
            self.undo_corrupt = None
        if how == "name":
            mlp = self.model.model.layers[0].mlp
            mlp._modules = {("gate_projj" if k == "gate_proj" else k): m for k, m in mlp._modules.items()}
            self.undo_corrupt = lambda: setattr(mlp, "_modules", {("gate_proj" if k == "gate_projj" else k): m
                                                                  for k, m in mlp._modules.items()})
        elif how == "shape":
            norm, weight = self.model.model.norm, self.model.model.norm.weight
            norm.weight = torch.nn.Parameter(torch.ones(64))
            self.undo_corrupt = lambda: setattr(norm, "weight", weight)

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
    """TEST-ONLY stand-in for ``LearnerGroup``: ``workers``, ``rank0`` and ``cfg.strategy``."""

    def __init__(self):
        self.workers = [StandInLearnerWorker.remote(str(DEMO_MODEL))]
        self.rank0 = self.workers[0]
        self.cfg = SimpleNamespace(strategy="ddp")
