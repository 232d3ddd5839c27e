"""One data-parallel rank of the DPO learner: policy, frozen reference, optimizer, the round loop.

``Learner`` has no Ray in it. Inside a ``LearnerWorker`` actor it runs with torch.distributed
initialized (DDP or FSDP2 across the workers); in a plain process (tests, benches) it runs alone.
Per round: tokenize the pairs, compute the reference log-probs of every pair once (no grad,
shared across ranks), then take optimizer steps with gradient accumulation; a step whose loss or
gradient is not finite on any rank is skipped on all of them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from actors.learner.batching import TokenizedPair, collate, rank_schedule, tokenize_pairs
from actors.loss import completion_lengths, completion_nll, dpo_loss, token_logps

log = logging.getLogger(__name__)

# Sums kept per round, all-reduced at its end; every report mean is one of these over "pairs".
_FIELDS = ("pairs", "loss", "dpo_loss", "nll", "accuracy", "margin", "reward_chosen", "reward_rejected",
           "logp_chosen", "logp_rejected", "kl")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Learner:
    """A DPO learner rank built from the ``model`` and ``learner`` config sections."""

    def __init__(self, model_cfg: Any, cfg: Any, *, seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_cfg, self.cfg, self.seed = model_cfg, cfg, seed
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        on_gpu = cfg.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        torch.manual_seed(seed + self.rank)

        self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        policy = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=getattr(torch, model_cfg.dtype))
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.model = policy.to(self.device)
        """The HF model being trained (for FSDP: sharded in place, still the HF class)."""
        self.ref_device = torch.device("cpu") if cfg.ref_on_cpu else self.device
        self.reference = reference.to(self.ref_device)
        self.fsdp = cfg.strategy == "fsdp" and _distributed()
        self.train_model = self._wrap()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.steps = 0
        """Optimizer steps taken (skipped steps excluded)."""
        self.skipped_steps = 0
        self._nan_pending = 0
        self.beta: float | None = None
        """The β the last ``train``/``evaluate`` call was given (a scheduled ``learner.beta``)."""
        self.on_step = None
        """``fn(round, steps_done, steps_total)`` before each step and after the last (progress reports)."""

    # -- setup ---------------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            # Shard each transformer block, then the root (embeddings, head, tied weights).
            targets = tuple(getattr(self.model, "_no_split_modules", None) or ())
            for model in (self.model, None if self.cfg.ref_on_cpu else self.reference):
                if model is None:
                    continue
                for module in model.modules():
                    if type(module).__name__ in targets:
                        fully_shard(module)
                fully_shard(model)
            return self.model
        if _distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (rotary tables) are identical on every rank: no need to broadcast them per forward.
            return DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        return self.model

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _grad_sync(self, sync: bool):
        """Gradient all-reduce only on the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if sync or self.train_model is self.model:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if _distributed():
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    # -- forward math -------------------------------------------------------------------------

    def _logps(self, model: torch.nn.Module, pairs: list[TokenizedPair], device: torch.device):
        """Summed completion log-probs and lengths, each ``[B, 2]`` (chosen, rejected)."""
        batch = {k: v.to(device) for k, v in collate(pairs, self.pad_id).items()}
        with self._autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        sums = token_logps(logits, batch["input_ids"], batch["completion_mask"]).sum(-1)
        lens = completion_lengths(batch["completion_mask"]).to(sums.dtype)
        b = len(pairs)
        return torch.stack([sums[:b], sums[b:]], 1), torch.stack([lens[:b], lens[b:]], 1)

    def _pair_terms(self, logps: torch.Tensor, lens: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pair total loss (with grad) and detached figures for the report."""
        cfg = self.cfg
        pol, rf = (logps / lens.clamp(min=1), ref / lens.clamp(min=1)) if cfg.length_normalize else (logps, ref)
        losses, r_w, r_l = dpo_loss(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], beta=self._beta(),
                                    loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        nll = completion_nll(logps[:, 0], lens[:, 0])
        total = cfg.dpo_weight * losses + cfg.rpo_alpha * nll
        sums = logps.detach()
        return {
            "total": total, "loss": total.detach(), "dpo_loss": losses.detach(), "nll": nll.detach(),
            "accuracy": (r_w > r_l).to(sums.dtype), "margin": r_w - r_l,
            "reward_chosen": r_w, "reward_rejected": r_l,
            "logp_chosen": sums[:, 0], "logp_rejected": sums[:, 1],
            # Per-sequence log-ratio on the chosen answer: a one-sample estimate of KL(π‖π_ref)
            # when the chosen answers were sampled from π (on-policy pairs).
            "kl": sums[:, 0] - ref[:, 0],
        }

    @staticmethod
    def _sums(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        n = torch.tensor([terms["loss"].numel()], dtype=torch.float64)
        return torch.cat([n, torch.stack([terms[f].double().sum() for f in _FIELDS[1:]]).cpu()])

    @torch.no_grad()
    def _all_logps(self, model: torch.nn.Module, pairs: list[TokenizedPair], device: torch.device):
        """``[N, 2]`` log-prob sums and lengths of every pair on every rank: each rank scores
        ``pairs[rank::world]`` in micro-batches, then the ranks all-gather."""
        mbs, world = self.cfg.micro_batch_size, self.world_size
        mine = pairs[self.rank :: world]
        n_chunks = -(-len(pairs[0::world]) // mbs)  # rank 0's share is the largest: same count everywhere
        out = torch.zeros(len(pairs[0::world]), 4, dtype=torch.float32)
        model.eval()
        for k in range(n_chunks):
            chunk = mine[k * mbs : (k + 1) * mbs]
            sums, lens = self._logps(model, chunk or pairs[:1], device)  # a filler keeps FSDP in step
            if chunk:
                out[k * mbs : k * mbs + len(chunk)] = torch.cat([sums, lens], 1).float().cpu()
        if _distributed():
            nccl = dist.get_backend() == "nccl"
            coll = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            parts = [torch.zeros_like(out, device=coll) for _ in range(world)]
            dist.all_gather(parts, out.to(coll))
            parts = [p.cpu() for p in parts]
        else:
            parts = [out]
        full = torch.zeros(len(pairs), 4, dtype=torch.float32)
        for r, part in enumerate(parts):
            idx = list(range(r, len(pairs), world))
            full[idx] = part[: len(idx)]
        return full[:, :2], full[:, 2:]

    # -- rounds --------------------------------------------------------------------------------

    def inject_nan(self, steps: int = 1) -> None:
        """Make the next ``steps`` optimizer steps produce a NaN loss on this rank (fault tests)."""
        self._nan_pending += steps

    def _tokenize(self, pairs: list) -> tuple[list[TokenizedPair], dict]:
        kept, stats = tokenize_pairs(self.tokenizer, pairs, chat_template=self.model_cfg.chat_template,
                                     max_len=self.model_cfg.max_model_len)
        if stats["retokenized"] and self.rank == 0:
            log.warning("%d pairs carry no prompt token ids (a pairs file from before odpo carried ids end "
                        "to end): their prompts were re-tokenized from text", stats["retokenized"])
        return kept, stats

    def completion_logps(self, pairs: list) -> torch.Tensor:
        """``[N, 2]`` summed log-probs of each pair's chosen and rejected completion under the
        current policy (NaN for a pair dropped as too long or empty); every rank calls."""
        kept, _ = self._tokenize(pairs)
        out = torch.full((len(pairs), 2), float("nan"))
        if kept:
            out[[p.index for p in kept]] = self._all_logps(self.model, kept, self.device)[0]
        return out

    def _step(self, micro_batches, ref: torch.Tensor, totals: torch.Tensor) -> tuple[bool, float, int]:
        """One optimizer step over this rank's micro-batches; returns (applied, grad norm, tokens)."""
        self.train_model.train()
        step_sums = torch.zeros(len(_FIELDS), dtype=torch.float64)
        local_bad, tokens = False, 0
        inject = self._nan_pending > 0
        self._nan_pending -= int(inject)
        for k, mb in enumerate(micro_batches):
            with self._grad_sync(k == len(micro_batches) - 1):
                logps, lens = self._logps(self.train_model, mb.pairs, self.device)
                index = torch.tensor([p.index for p in mb.pairs])
                terms = self._pair_terms(logps, lens, ref[index].to(logps))
                loss = terms["total"].sum() * mb.weight
                if inject and k == 0:
                    loss = loss * float("nan")
                loss.backward()
            local_bad |= not bool(torch.isfinite(loss.detach()))
            if not mb.filler:
                step_sums += self._sums(terms)
                tokens += sum(p.tokens for p in mb.pairs)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        bad = torch.tensor([float(local_bad), float(not torch.isfinite(grad_norm))], device=self.device)
        bad = self._all_reduce(bad, dist.ReduceOp.MAX if _distributed() else None)
        if bool(bad.any()):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return False, float("nan"), tokens
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        totals += step_sums
        return True, float(grad_norm), tokens

    def train(self, pairs: list, round: int, beta: float | None = None) -> dict[str, Any]:
        """Train on one round's pairs (every rank gets the whole list); returns the round report.
        ``beta``: the round's β (a scheduled ``learner.beta``); kept for later calls."""
        start = time.perf_counter()
        self.beta = float(beta) if beta is not None else self.beta
        kept, stats = self._tokenize(pairs)
        ref_start = time.perf_counter()
        ref = self._all_logps(self.reference, kept, self.ref_device)[0] if kept else torch.zeros(0, 2)
        ref_by_index = torch.full((len(pairs), 2), float("nan"))
        ref_by_index[[p.index for p in kept]] = ref
        ref_s = time.perf_counter() - ref_start
        schedule = rank_schedule(kept, batch_size=self.cfg.batch_size, micro_batch_size=self.cfg.micro_batch_size,
                                 rank=self.rank, world_size=self.world_size, epochs=self.cfg.epochs_per_round,
                                 seed=self.seed, round=round) if kept else []
        totals = torch.zeros(len(_FIELDS), dtype=torch.float64)
        applied, skipped, norms, tokens = 0, 0, [], 0
        for k, micro_batches in enumerate(schedule):
            if self.on_step is not None:
                self.on_step(round, k, len(schedule))
            ok, norm, n_tokens = self._step(micro_batches, ref_by_index, totals)
            applied, skipped, tokens = applied + ok, skipped + (not ok), tokens + n_tokens
            if ok:
                norms.append(norm)
        if self.on_step is not None:
            self.on_step(round, len(schedule), len(schedule))
        refreshed = self.cfg.ref_refresh_every > 0 and round % self.cfg.ref_refresh_every == 0
        if refreshed:
            self.refresh_reference()
        counts = self._all_reduce(torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)).cpu()
        report = self._report(self._all_reduce(totals.to(self.device)).cpu(), stats, len(pairs))
        learn_s = time.perf_counter() - start
        report.update(
            steps=float(applied), skipped_steps=float(skipped), weights_changed=applied > 0,
            grad_norm=sum(norms) / len(norms) if norms else float("nan"),
            tokens=float(counts[0]), learn_s=learn_s, ref_s=ref_s, tokens_per_s=float(counts[0]) / learn_s,
            lr=self.optimizer.param_groups[0]["lr"], optimizer_steps=float(self.steps), ref_refreshed=refreshed,
            beta=self._beta(),
        )
        return report

    def _beta(self) -> float:
        """β of the DPO term: the one the round was given, else ``learner.beta`` when it is a number."""
        beta = self.beta if self.beta is not None else self.cfg.beta
        if not isinstance(beta, (int, float)):
            raise ValueError("learner.beta is a schedule: train() and evaluate() need the round's beta")
        return float(beta)

    def evaluate(self, pairs: list, beta: float | None = None) -> dict[str, Any]:
        """The report's pair figures for ``pairs`` under the current policy, without a step."""
        self.beta = float(beta) if beta is not None else self.beta
        kept, stats = self._tokenize(pairs)
        if not kept:
            return self._report(torch.zeros(len(_FIELDS), dtype=torch.float64), stats, len(pairs))
        ref, _ = self._all_logps(self.reference, kept, self.ref_device)
        logps, lens = self._all_logps(self.model, kept, self.device)
        with torch.no_grad():
            terms = self._pair_terms(logps, lens, ref)
        return self._report(self._sums(terms), stats, len(pairs))

    @staticmethod
    def _report(totals: torch.Tensor, stats: dict, n_in: int) -> dict[str, Any]:
        n = float(totals[0])
        report = {f: (float(totals[i]) / n if n else float("nan")) for i, f in enumerate(_FIELDS) if i}
        report["reward_accuracy"] = report.pop("accuracy")
        report["reward_margin"] = report.pop("margin")
        report.update(pairs=float(n_in), pairs_trained=n, pairs_too_long=float(stats["too_long"]),
                      pairs_truncated=float(stats["truncated"]), pairs_empty=float(stats["empty"]),
                      pairs_retokenized=float(stats["retokenized"]))
        return report

    # -- weights -------------------------------------------------------------------------------

    def reshard(self) -> None:
        """FSDP: put every module back in its sharded state. A root module keeps its parameters
        unsharded after a forward, and state-dict reads and writes need the sharded ones."""
        if not self.fsdp:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in [*self.reference.modules(), *self.model.modules()]:
            if isinstance(module, FSDPModule):
                module.reshard()

    @torch.no_grad()
    def refresh_reference(self) -> None:
        """Copy the policy into the reference (a collective under FSDP with ``ref_on_cpu``)."""
        self.reshard()
        if self.fsdp and not self.cfg.ref_on_cpu:
            # Both are sharded the same way: copy local shards.
            for ref_p, p in zip(self.reference.parameters(), self.model.parameters()):
                ref_p.copy_(p)
            return
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        else:
            state = self.model.state_dict()
        self.reference.load_state_dict(state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full state dict (HF names) as CPU tensors on rank 0.

        DDP on CPU: the parameters themselves, detached (no copy). On GPU: one CPU copy. FSDP: a
        collective that every rank must call; rank 0 gets the gathered dict, the others ``{}``.
        """
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            self.reshard()
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def save(self, path: str) -> None:
        """Checkpoint to ``path`` (see ``actors.learner.checkpoint``); every rank calls, rank 0 writes."""
        from actors.learner.checkpoint import save_checkpoint

        save_checkpoint(self, path)

    def load(self, path: str) -> None:
        """Restore policy, reference, optimizer and scheduler from ``path`` (every rank calls)."""
        from actors.learner.checkpoint import load_checkpoint

        load_checkpoint(self, path)
