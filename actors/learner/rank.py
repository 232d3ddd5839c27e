"""One data-parallel rank of the DPO learner: policy, frozen reference, optimizer, the round.

``Learner`` has no Ray in it. Inside a ``LearnerWorker`` actor it runs with torch.distributed
initialized (DDP or FSDP2 across the workers); in a plain process (tests, benches) it runs alone.
Start-up never holds a full copy on any rank but rank 0, and there one tensor at a time: both
models are built on the meta device, sharded (``sharding``), materialized, and filled from the
checkpoint that rank 0 streams (``weights.stream``); the reference is a local copy of the policy
(with LoRA, ``learner.lora``: no second model, the policy's module in its reference view, ``lora``).
Per round: tokenize the pairs, compute the reference log-probs of every pair once (no grad,
shared across ranks), then take optimizer steps with gradient accumulation; a step whose loss or
gradient is not finite on any rank is skipped on all of them. Log-probs are computed at
completion positions only (``modeling.completion_logp_sums``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from actors.learner import sharding
from actors.learner.allocator import release_freed_blocks
from actors.learner.batching import (
    TokenizedPair,
    batch_tokens,
    collate,
    pack,
    rank_schedule,
    share_micro_batches,
    tokenize_pairs,
)
from actors.learner.lora import Adapters
from actors.learner.loss import REPORT_FIELDS, mean_report, pair_terms, term_sums
from actors.learner.modeling import build_empty, completion_logp_sums, materialize, ref_dtype, weights_source
from actors.learner.optimizer import RoundSchedule, refresh_due
from actors.learner.precision import LossScaler, autocast, check_finite, compute_dtype
from actors.learner.weights import checkpoint
from actors.learner.weights.stream import copy_local, iter_full, load_streamed, tied_aliases

log = logging.getLogger(__name__)

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Learner:
    """A DPO learner rank built from the ``model`` and ``learner`` config sections."""

    def __init__(self, model_cfg: Any, cfg: Any, *, seed: int = 0):
        from transformers import AutoTokenizer

        self.model_cfg, self.cfg, self.seed = model_cfg, cfg, seed
        release_freed_blocks()  # freed activations and gradients leave the rank's RSS (allocator)
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        on_gpu = cfg.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        torch.manual_seed(seed + self.rank)

        self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.fsdp = cfg.strategy == "fsdp" and _distributed()
        self.compute_dtype = compute_dtype(cfg.precision, self.device)
        """The forward's and backward's dtype (``actors.learner.precision``)."""
        self.ref_dtype = ref_dtype(cfg, on_gpu, self.compute_dtype)
        self.model = build_empty(model_cfg.path, getattr(torch, model_cfg.dtype))
        """The HF model being trained (for FSDP: sharded in place, still the HF class)."""
        self.adapters = Adapters(self.model, cfg.lora, reference_copy=cfg.ref_refresh_every > 0,
                                 seed=seed) if cfg.lora else None
        """LoRA (``learner.lora``): the policy is the frozen base plus these adapters, and the
        reference the same module in its reference view; None for full fine-tuning."""
        self.reference = None if self.adapters else \
            build_empty(model_cfg.path, self.ref_dtype).requires_grad_(False).eval()
        if cfg.activation_checkpointing:
            sharding.enable_activation_checkpointing(self.model)
        # The reference's shards live on CPU with ``ref_on_cpu``; under FSDP they are gathered to
        # the GPU for its forward (CPU offload), under DDP it runs on CPU.
        ref_store = torch.device("cpu") if cfg.ref_on_cpu else self.device
        self.ref_device = self.device if self.fsdp else ref_store
        if self.fsdp:
            mixed = self.compute_dtype if self.compute_dtype != torch.float32 else None
            sharding.fsdp_shard(self.model, param_dtype=mixed)
            if self.reference is not None:
                sharding.fsdp_shard(self.reference, param_dtype=mixed, cpu_offload=cfg.ref_on_cpu and on_gpu)
        materialize(self.model, self.device)
        source = weights_source(model_cfg.path, set(self.model.state_dict())) if self.rank == 0 else None
        load_streamed(self.model, source, where=f"model.path {model_cfg.path}")
        del source
        if self.adapters is not None:
            self.adapters.init()
        else:
            copy_local(materialize(self.reference, ref_store), self.model)
        if self.fsdp or not _distributed():
            self.train_model = self.model
        else:
            self.train_model = sharding.ddp_wrap(self.model, self.device)
        self.schedule = RoundSchedule(self.adapters.trainable() if self.adapters else self.model.parameters(), cfg)
        self.optimizer, self.scheduler = self.schedule.optimizer, self.schedule.scheduler
        self.last_step_lr = cfg.lr
        """The learning rate of the last optimizer step taken (the round report's ``lr``)."""
        self.steps = 0
        """Optimizer steps taken (skipped steps excluded)."""
        self.skipped_steps = 0
        """Steps skipped for a non-finite loss or gradient (fp16 overflows excepted)."""
        self.scaler = LossScaler(enabled=self.compute_dtype == torch.float16)
        """Dynamic loss scaling, on for fp16 compute."""
        self.overflow_steps = 0
        """fp16 steps skipped because the scaled gradients overflowed (the scale was halved)."""
        self._nan_pending = 0
        self._nan_weights_pending = 0
        self._token_counts = torch.zeros(2, dtype=torch.float64)
        """(computed, padding) tokens of this round's forwards, for ``pad_share``."""
        self.beta: float | None = None
        """The β the last ``train``/``evaluate`` call was given (a scheduled ``learner.beta``)."""
        self.refreshed_through: int | None = None
        """The last round of the ``ref_refresh_every`` schedule whose refresh was done (checkpointed)."""
        self.on_step = None
        """``fn(round, steps_done, steps_total)`` before each step and after the last (progress reports)."""

    # -- setup ---------------------------------------------------------------------------------

    def _autocast(self):
        # FSDP computes in the compute dtype through its MixedPrecisionPolicy; DDP and one process through autocast.
        return autocast(self.device, self.compute_dtype, sharded=self.fsdp)

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if _distributed():
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    # -- forward math -------------------------------------------------------------------------

    def _logps(self, model: torch.nn.Module, pairs: list[TokenizedPair], device: torch.device, *, count: bool = True):
        """Summed completion log-probs and lengths, each ``[B, 2]`` (chosen, rejected); ``count``
        adds the batch's computed and padding tokens to the round's ``pad_share``."""
        packed = self.cfg.max_tokens_per_micro_batch > 0
        batch = (pack if packed else collate)(pairs, self.pad_id)
        if count:
            computed, padding = batch_tokens(batch)
            self._token_counts += torch.tensor([computed, padding], dtype=torch.float64)
        batch = {k: v.to(device) for k, v in batch.items()}
        hf_model = self.reference if model is self.reference else self.model
        with self._autocast():
            sums, lens = completion_logp_sums(model, hf_model, batch, chunk=self.cfg.logprob_chunk)
        b = len(pairs)
        return torch.stack([sums[:b], sums[b:]], 1), torch.stack([lens[:b], lens[b:]], 1)

    @torch.no_grad()
    def _all_logps(self, model: torch.nn.Module, pairs: list[TokenizedPair], device: torch.device):
        """``[N, 2]`` log-prob sums and lengths of every pair on every rank: each rank scores
        ``pairs[rank::world]`` in micro-batches, then the ranks all-gather."""
        world = self.world_size
        # Each rank scores its share (by pairs, or by tokens with a budget) in micro-batches; every
        # rank runs as many forwards as the rank with the most (a filler keeps FSDP in step).
        mine, n_chunks = share_micro_batches(pairs, rank=self.rank, world_size=world,
                                             micro_batch_size=self.cfg.micro_batch_size,
                                             max_tokens=self.cfg.max_tokens_per_micro_batch)
        # Results travel as rows of (pair position, sums, lengths); unused rows keep position -1.
        out = torch.full((len(pairs), 5), -1.0, dtype=torch.float32)
        at = 0
        model.eval()
        for k in range(n_chunks):
            chunk = mine[k] if k < len(mine) else []
            sums, lens = self._logps(model, chunk or pairs[:1], device, count=bool(chunk))
            if chunk:
                rows = torch.cat([torch.tensor([[float(p.index)] for p in chunk]), sums.float().cpu(),
                                  lens.float().cpu()], 1)
                out[at : at + len(chunk)] = rows
                at += len(chunk)
        if _distributed():
            nccl = dist.get_backend() == "nccl"
            coll = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            parts = [torch.zeros_like(out, device=coll) for _ in range(world)]
            dist.all_gather(parts, out.to(coll))
            parts = [p.cpu() for p in parts]
        else:
            parts = [out]
        position = {p.index: i for i, p in enumerate(pairs)}
        full = torch.zeros(len(pairs), 4, dtype=torch.float32)
        for part in parts:
            for row in part[part[:, 0] >= 0]:
                full[position[int(row[0])]] = row[1:]
        if self.fsdp:
            sharding.reshard(model)  # a root unit keeps its parameters gathered after a forward
        return full[:, :2], full[:, 2:]

    # -- rounds --------------------------------------------------------------------------------

    def inject_nan(self, steps: int = 1) -> None:
        """Make the next ``steps`` optimizer steps produce a NaN loss on this rank (fault tests)."""
        self._nan_pending += steps

    def inject_nan_weights(self) -> None:
        """Make the next optimizer step's update leave a NaN in this rank's weights (fault tests)."""
        self._nan_weights_pending += 1

    def _tokenize(self, pairs: list) -> tuple[list[TokenizedPair], dict]:
        kept, stats = tokenize_pairs(self.tokenizer, pairs, chat_template=self.model_cfg.chat_template,
                                     max_len=self.model_cfg.max_model_len)
        if stats["retokenized"] and self.rank == 0:
            log.warning("%d pairs carry no prompt token ids (a pairs file from before odpo carried ids end "
                        "to end): their prompts were re-tokenized from text", stats["retokenized"])
        return kept, stats

    def _reference_logps(self, kept: list[TokenizedPair]) -> torch.Tensor:
        """``[N, 2]`` log-prob sums under the reference: its own model, or with LoRA the policy's
        module in its reference view (no second model)."""
        if self.adapters is None:
            return self._all_logps(self.reference, kept, self.ref_device)[0]
        with self.adapters.view("reference"):
            return self._all_logps(self.model, kept, self.device)[0]

    def completion_logps(self, pairs: list) -> torch.Tensor:
        """``[N, 2]`` summed log-probs of each pair's chosen and rejected completion under the
        current policy (NaN for a pair dropped as too long or empty); every rank calls."""
        kept, _ = self._tokenize(pairs)
        out = torch.full((len(pairs), 2), float("nan"))
        if kept:
            out[[p.index for p in kept]] = self._all_logps(self.model, kept, self.device)[0]
        return out

    def _step(self, micro_batches, ref: torch.Tensor, totals: torch.Tensor, round_: int) -> tuple[bool, float, int]:
        """One optimizer step over this rank's micro-batches; returns (applied, grad norm, tokens)."""
        self.train_model.train()
        step_sums = torch.zeros(len(REPORT_FIELDS), dtype=torch.float64)
        local_bad, tokens = False, 0
        inject = self._nan_pending > 0
        self._nan_pending -= int(inject)
        for k, mb in enumerate(micro_batches):
            with sharding.grad_sync(self.train_model, k == len(micro_batches) - 1):
                logps, lens = self._logps(self.train_model, mb.pairs, self.device, count=not mb.filler)
                index = torch.tensor([p.index for p in mb.pairs])
                terms = pair_terms(logps, lens, ref[index].to(logps), self.cfg, self._beta())
                loss = terms["total"].sum() * mb.weight
                if inject and k == 0:
                    loss = loss * float("nan")
                self.scaler.scale_loss(loss).backward()
            local_bad |= not bool(torch.isfinite(loss.detach()))
            if not mb.filler:
                step_sums += term_sums(terms)
                tokens += sum(p.tokens for p in mb.pairs)
        self.scaler.unscale_(self.model.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        bad = torch.tensor([float(local_bad), float(not torch.isfinite(grad_norm))], device=self.device)
        bad = self._all_reduce(bad, dist.ReduceOp.MAX if _distributed() else None)
        if bool(bad.any()):
            self.optimizer.zero_grad(set_to_none=True)
            overflow = self.scaler.enabled and not bool(bad[0])  # finite loss, overflowed fp16 gradients
            self.scaler.update(overflow=overflow)
            if overflow:
                self.overflow_steps += 1
            else:
                self.skipped_steps += 1
            return False, float("nan"), tokens
        self.last_step_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scaler.update(overflow=False)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._check_weights_finite(round_)
        totals += step_sums
        return True, float(grad_norm), tokens

    def _check_weights_finite(self, round_: int) -> None:
        if self._nan_weights_pending:  # fault injection: a NaN in this rank's first trained weight
            self._nan_weights_pending -= 1
            with torch.no_grad():
                p = self.schedule.params[0]
                (p.to_local() if hasattr(p, "to_local") else p).view(-1)[:1].fill_(float("nan"))
        check_finite(self.schedule.params, round_, self.steps, self.device)

    def train(self, pairs: list, round: int, beta: float | None = None) -> dict[str, Any]:
        """Train on one round's pairs (every rank gets the whole list); returns the round report.
        ``beta``: the round's β (a scheduled ``learner.beta``); kept for later calls."""
        start = time.perf_counter()
        self.beta = float(beta) if beta is not None else self.beta
        self.schedule.set_round(round)
        self._token_counts.zero_()
        kept, stats = self._tokenize(pairs)
        ref_start = time.perf_counter()
        ref = self._reference_logps(kept) if kept else torch.zeros(0, 2)
        ref_by_index = torch.full((len(pairs), 2), float("nan"))
        ref_by_index[[p.index for p in kept]] = ref
        ref_s = time.perf_counter() - ref_start
        schedule = rank_schedule(kept, batch_size=self.cfg.batch_size, micro_batch_size=self.cfg.micro_batch_size,
                                 rank=self.rank, world_size=self.world_size, epochs=self.cfg.epochs_per_round,
                                 seed=self.seed, round=round,
                                 max_tokens=self.cfg.max_tokens_per_micro_batch) if kept else []
        totals = torch.zeros(len(REPORT_FIELDS), dtype=torch.float64)
        applied, skipped, norms, tokens = 0, 0, [], 0
        overflows_before = self.overflow_steps
        for k, micro_batches in enumerate(schedule):
            if self.on_step is not None:
                self.on_step(round, k, len(schedule))
            ok, norm, n_tokens = self._step(micro_batches, ref_by_index, totals, round)
            applied, skipped, tokens = applied + ok, skipped + (not ok), tokens + n_tokens
            if ok:
                norms.append(norm)
        if self.on_step is not None:
            self.on_step(round, len(schedule), len(schedule))
        overflowed = self.overflow_steps - overflows_before
        refreshed = self._refresh_due(round)
        if refreshed:
            self.refresh_reference()
        counts = torch.cat([torch.tensor([float(tokens)], dtype=torch.float64), self._token_counts])
        counts = self._all_reduce(counts.to(self.device)).cpu()
        report = mean_report(self._all_reduce(totals.to(self.device)).cpu(), stats, len(pairs))
        learn_s = time.perf_counter() - start
        report.update(
            steps=float(applied), skipped_steps=float(skipped - overflowed), overflow_steps=float(overflowed),
            loss_scale=self.scaler.scale if self.scaler.enabled else None, weights_changed=applied > 0,
            grad_norm=sum(norms) / len(norms) if norms else float("nan"),
            tokens=float(counts[0]), learn_s=learn_s, ref_s=ref_s, tokens_per_s=float(counts[0]) / learn_s,
            lr=self.last_step_lr if applied else self.optimizer.param_groups[0]["lr"],
            optimizer_steps=float(self.steps), ref_refreshed=refreshed,
            # Padding tokens / all tokens the round's forwards computed (reference and training).
            pad_share=float(counts[2] / counts[1]) if counts[1] else 0.0,
            beta=self._beta(),
        )
        return report

    def _refresh_due(self, round_: int) -> bool:
        due, self.refreshed_through = refresh_due(self.cfg.ref_refresh_every, self.refreshed_through, round_)
        return due

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
            return mean_report(torch.zeros(len(REPORT_FIELDS), dtype=torch.float64), stats, len(pairs))
        ref = self._reference_logps(kept)
        logps, lens = self._all_logps(self.model, kept, self.device)
        with torch.no_grad():
            terms = pair_terms(logps, lens, ref, self.cfg, self._beta())
        return mean_report(term_sums(terms), stats, len(pairs))

    # -- weights -------------------------------------------------------------------------------

    def reshard(self) -> None:
        """FSDP: put every unit back in its sharded state (state-dict reads and writes need it)."""
        if self.fsdp:
            sharding.reshard(*[m for m in (self.reference, self.model) if m is not None])

    @torch.no_grad()
    def refresh_reference(self) -> None:
        """Copy the policy into the reference: each rank its own shards (or whole models under
        DDP), cast to ``ref_dtype``; no communication. With LoRA: the adapter into its frozen copy."""
        self.reshard()
        if self.adapters is not None:
            self.adapters.refresh()
        else:
            copy_local(self.reference, self.model)

    def iter_full_state(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The policy tensor by tensor, in Hugging Face naming (a tied LM head left out, as in
        checkpoints): ``(name, whole CPU tensor in dtype)`` on rank 0, ``(name, None)`` on the
        others. Every rank must iterate to the end together (under FSDP each item is a gather
        to rank 0); rank 0 holds one tensor at a time. Under DDP on CPU in the held dtype the
        tensors are the parameters themselves (no copy): consume them before the next step.
        """
        self.reshard()
        yield from self.adapters.iter_merged(dtype) if self.adapters else iter_full(self.model, dtype)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full state dict (HF names, tied aliases included) as CPU tensors on
        rank 0, ``{}`` on the others; a collective under FSDP. Holds the whole model on rank 0:
        prefer ``iter_full_state`` where the consumer can take tensors one at a time."""
        state = {name: t for name, t in self.iter_full_state() if t is not None}
        if state:
            for alias, name in tied_aliases(self.model).items():
                state[alias] = state[name]
        return state

    def save(self, path: str) -> None:
        """Checkpoint to ``path`` (see ``actors.learner.weights.checkpoint``); every rank calls."""
        checkpoint.save(self, path)

    def load(self, path: str) -> None:
        """Restore policy, reference, optimizer and scheduler from ``path`` (every rank calls)."""
        checkpoint.load(self, path)
