"""The run configuration: one pydantic model per component, composed into ``RunConfig``.

Every field is documented by the docstring right under it; that docstring is its only help text
(``odpo config-doc`` renders them). Unknown keys are errors. ``load_config`` is the one loader:
defaults, then the YAML file, then ``--set a.b=value`` overrides, typed by the model.

This module imports no torch, Ray or vLLM, so ``odpo --help`` and ``odpo validate`` stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _custom_resources(v: dict[str, float]) -> dict[str, float]:
    for key, value in v.items():
        if key in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{key!r} is not a custom resource (CPUs and GPUs have their own fields)")
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value:g}")
    return v


CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]
"""Ray custom resources of one actor, as ``.options(resources=...)`` takes them."""

from judges.loader import JudgeSpecError, check_judge_spec
from orchestrator.loop.beta import BetaSpec
from orchestrator.loop.fault_settings import FaultsConfig, FaultSpec  # noqa: F401 (FaultSpec: part of this module's API)
from orchestrator.observe.trackers import missing_tracker_packages
from orchestrator.security import redact_secrets
from orchestrator.service.settings import GateConfig, InboxConfig, gate_problem


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunSection(Section):
    name: str = "demo"
    """Run name: the run directory is ``<output_dir>/<name>``."""
    output_dir: str = "runs"
    """Folder that holds run directories (on a cluster: a filesystem the driver can write)."""
    seed: int = 0
    """Seed for prompt order, sampling and the learner; a resumed run continues its RNG streams."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a plain folder name (no '/')")
        return v


class ModelConfig(Section):
    path: str = "assets/demo/model"
    """Policy model: a local folder in Hugging Face format, or a hub id where the cluster can reach a hub."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The learner's master weights, gradients and AdamW state (its compute precision is ``learner.precision``); the generators serve ``generator.dtype``, which defaults to this. ``float16`` is refused: AdamW's update underflows in fp16 (use ``learner.precision: fp16`` with fp32 master weights)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; defaults to ``path``."""
    chat_template: bool = False
    """Apply the tokenizer's chat template to prompts (on for instruct models, off for the demo)."""
    max_model_len: int = Field(1024, gt=0)
    """Longest prompt + completion in tokens; longer prompts are skipped and counted."""

    @field_validator("path")
    @classmethod
    def _path_exists_if_local(cls, v: str) -> str:
        looks_local = v.startswith((".", "/", "~")) or v.count("/") != 1
        if looks_local and not Path(v).expanduser().exists():
            raise ValueError(f"no such model folder: {v}")
        return v


class DataConfig(Section):
    source: str = "assets/demo/data/train.jsonl"
    """Training prompts: a json/jsonl/parquet file or folder, or a ``datasets`` hub name."""
    split: str = "train"
    """Split of ``source`` to read."""
    subset: str | None = None
    """Configuration name of a hub dataset that has several (e.g. ``main`` for ``openai/gsm8k``); applies to ``source`` and ``eval_source``."""
    eval_split: str | None = None
    """Split of ``eval_source`` to read (none = ``split``), e.g. ``test`` when both name the same hub dataset."""
    prompt_field: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages when ``model.chat_template`` is on."""
    eval_source: str | None = "assets/demo/data/eval.jsonl"
    """Held-out prompts for evaluation (same format as ``source``); none = no evaluation."""
    eval_size: int = Field(0, ge=0)
    """Number of eval prompts to use (0 = all of ``eval_source``)."""
    inbox: InboxConfig = InboxConfig()
    """Prompts added while the run goes on (``odpo add-prompts``, ``POST /prompts``): how rounds draw them."""


class GeneratorConfig(Section):
    num_actors: int = Field(1, ge=1)
    """Number of vLLM generator actors; a round's prompts are split evenly between them."""
    n: int = Field(8, ge=2)
    """Completions sampled per prompt (at least 2, to make a pair)."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature for training samples (evaluation is always greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_new_tokens: int = Field(8, gt=0)
    """Longest completion in tokens; a completion cut here has finish reason ``length``."""
    stop: list[str] = []
    """Extra stop strings (EOS always stops)."""
    engine: dict[str, Any] = {}
    """Extra keyword arguments for ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``enforce_eager``)."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per generator actor (0 on CPU); with tensor parallelism, set to ``tensor_parallel_size``."""
    num_cpus: float = Field(1, ge=0)
    """CPUs reserved per generator actor."""
    resources: CustomResources = {}
    """Custom Ray resources per generator actor, e.g. ``{a100_node: 1}`` to run only on nodes started with ``--resources='{"a100_node": 8}'``; checked against the cluster, like GPUs and CPUs, before any actor starts."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor-parallel size per generator (GPU clusters; on CPU each TP worker gets its share of the actor's cores)."""
    dtype: Literal["float32", "bfloat16", "float16", "bfloat16_if_native"] | None = None
    """Weights (and KV cache) dtype the generators serve; none = ``model.dtype``. Weights are cast to it on the learner before they move, so ``bfloat16`` halves every sync's bytes while the learner keeps ``model.dtype`` master weights. ``bfloat16_if_native``: bfloat16 where the generator's device computes it natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX), else float32 (float16 on GPUs)."""
    timeout_s: float = Field(600, gt=0)
    """Longest a ``sample`` call may take before the actor is restarted and its share re-sampled."""
    start_timeout_s: float = Field(900, gt=0)
    """Longest a generator's engine may take to start (at launch and after a restart)."""


class JudgeConfig(Section):
    cls: str = "judges.verifiable:VerifiableJudge"
    """The judge class as ``package.module:ClassName`` (built-in judges are named the same way)."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for the judge's constructor; checked against its signature at load time."""
    num_actors: int = Field(1, ge=1)
    """Judge actors, each hosting one judge instance; batches are fed to them concurrently."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per judge actor (a reward model or LLM judge may need one)."""
    num_cpus: float = Field(0.5, ge=0)
    """CPUs reserved per judge actor."""
    resources: CustomResources = {}
    """Custom Ray resources per judge actor (as ``generator.resources``)."""
    timeout_s: float = Field(300, gt=0)
    """Longest one scoring call (one actor's share of a round) may take; past it, that share scores None and the actor is restarted."""
    setup_timeout_s: float = Field(900, gt=0)
    """Longest a judge actor's start (building the judge and its ``setup()``, e.g. loading a model) may take."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion cut off by ``max_new_tokens`` (none = no penalty)."""

    @field_validator("cls")
    @classmethod
    def _dotted_path(cls, v: str) -> str:
        module, sep, name = v.partition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"must look like 'package.module:ClassName', got {v!r}")
        return v


class PairsConfig(Section):
    strategy: Literal["best_worst", "best_random", "all_pairs_above_margin"] = "best_worst"
    """How a prompt's scored completions become chosen/rejected pairs."""
    min_margin: float = Field(0.0, ge=0)
    """Smallest chosen-minus-rejected score that makes a pair; ties never do."""
    tie_break: Literal["logprob", "random", "shorter"] = "logprob"
    """Among equally scored candidates: the most likely one under the policy (a hard negative), random, or the shorter."""
    max_pairs_per_prompt: int = Field(4, ge=1)
    """Most pairs one prompt yields: the cap of ``all_pairs_above_margin``, and of all sources together when ``sources`` has several."""
    sources: list[Literal["best_worst", "correction"]] = ["best_worst"]
    """Where pairs come from: ``best_worst`` (two sampled answers, picked by ``strategy``), ``correction`` (a sampled answer as rejected, the ``corrector``'s improved text of it as chosen: off-policy by design), or both (a prompt may then yield a pair of each kind, in this order)."""
    length_balance: bool = False
    """Among equally scored candidates, prefer the pair that keeps ``longer_chosen_share`` (chosen longer, among pairs of unequal length) near 0.5 over the run: a guard against learning that longer is better."""
    max_length_ratio: float | None = Field(None, ge=1)
    """Make no pair whose longer side has more than this many times the tokens of the shorter (counted in ``pairs_dropped.length_ratio``); none = no cap."""

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one source (best_worst, correction)")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a source twice: {v}")
        return v


class CorrectorConfig(Section):
    cls: str | None = None
    """The corrector class as ``package.module:ClassName`` (built-ins: ``judges.correction:GoldAnswerCorrector``, ``judges.correction:ReplaceCorrector``); needed when ``pairs.sources`` includes ``correction``. It runs in the judge actors."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for the corrector's constructor; checked against its signature at load time."""

    @field_validator("cls")
    @classmethod
    def _dotted_path(cls, v: str | None) -> str | None:
        return v if v is None else JudgeConfig._dotted_path(v)


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=512)
    """Rank of each adapter (A is r × in, B is out × r); the generators' ``max_lora_rank`` is the smallest vLLM size that holds it."""
    alpha: float = Field(32.0, gt=0)
    """Scale: an adapter adds (alpha / r) · B A x to its layer's output (PEFT's ``lora_alpha``)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (PEFT's ``lora_dropout``; never when scoring or sampling)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Linear layers that get an adapter, by their last name (``[q_proj, v_proj]``), or ``all-linear``: every linear layer but the LM head. A name that is not one of the model's linear layers is an error listing them."""


class LearnerConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Learner worker actors joined by torch.distributed (one per GPU; CPU processes here)."""
    num_gpus_per_worker: float = Field(0, ge=0)
    """GPUs per learner worker (0 = CPU with gloo; >0 = NCCL)."""
    num_cpus_per_worker: float = Field(1, ge=0)
    """CPUs reserved per learner worker."""
    resources: CustomResources = {}
    """Custom Ray resources per learner worker (as ``generator.resources``)."""
    strategy: Literal["ddp", "fsdp"] = "fsdp"
    """Data parallelism over the workers: ``fsdp`` (FSDP2, ``fully_shard``: weights, gradients and AdamW state divided by the number of workers; one worker runs unsharded) or ``ddp`` (every worker holds all of them)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision of the learner's forward and backward; master weights, gradients and AdamW state stay in ``model.dtype`` (fp32). ``bf16``: bf16 autocast (FSDP with several workers: bf16 parameters, fp32 gradient reduction); ``fp16``: the same in float16 with dynamic loss scaling (GPUs without bf16); ``fp32``: none. ``auto`` = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    beta: BetaSpec = 0.1
    """DPO temperature β: rewards are β·(log π − log π_ref). A number, or a schedule (see docs/learner.md, "β schedule"): ``{schedule: linear, start, end, rounds}``, ``{schedule: steps, values: {round: β}}``, ``{schedule: kl_target, start, target_kl, rate, min_beta, max_beta}``."""
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    """DPO loss variant."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO / robust DPO label-noise rate ε (``sigmoid`` and ``robust`` losses only)."""
    rpo_alpha: float = Field(0.0, ge=0)
    """Weight of the NLL term on the chosen answer (iterative RPO: per-token mean NLL of the chosen completion); 0 = off."""
    dpo_weight: float = Field(1.0, ge=0)
    """Weight of the DPO term (0 = NLL on chosen only, for ablations)."""
    length_normalize: bool = False
    """Use mean instead of summed completion log-probs in the DPO term (IPO convention; TRL's ``ipo`` does this)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates (β1, β2), each in [0, 1)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (then constant)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Per-round decay of ``lr``: ``constant`` (none), ``linear`` or ``cosine`` from ``lr`` at round 1 to ``lr`` × ``min_lr_ratio`` at round ``lr_decay_rounds`` (then held there). Keyed to the round, so a resumed run continues it exactly."""
    lr_decay_rounds: int = Field(0, ge=0)
    """The round at which a decaying ``lr_schedule`` reaches its end (0 = ``loop.rounds``)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Where a decaying ``lr_schedule`` ends, as a fraction of ``lr``."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    batch_size: int = Field(64, ge=1)
    """Pairs per optimizer step (global, across workers)."""
    micro_batch_size: int = Field(64, ge=1)
    """Pairs per forward/backward on one worker; gradients accumulate up to ``batch_size`` (unused when ``max_tokens_per_micro_batch`` is set)."""
    max_tokens_per_micro_batch: int = Field(0, ge=0)
    """Token budget of one forward/backward on one worker (prompt + chosen and prompt + rejected tokens of its pairs): a step's pairs are grouped by their real lengths and packed into rows without padding between sequences, so memory follows tokens, not pairs (0 = off: ``micro_batch_size`` pairs per forward, right-padded). A pair longer than the budget gets a forward of its own."""
    epochs_per_round: int = Field(1, ge=1)
    """Passes over a round's pairs."""
    ref_refresh_every: int = Field(0, ge=0)
    """Copy the policy into the reference after the steps of each round whose number is a multiple of k (0 = never: a fixed reference, as in RLHFlow's recipes; 1 = the reference is always the last round's policy)."""
    ref_on_cpu: bool = False
    """Hold the reference model's shards in host RAM to save GPU memory; they are gathered to the GPU for each forward (needs ``strategy: fsdp`` with 2 or more workers on GPUs; on CPU learners it changes nothing)."""
    ref_dtype: Literal["auto", "float32", "bfloat16", "float16", "bfloat16_if_native"] = "auto"
    """Dtype the reference is held and run in; ``auto`` = the compute dtype on GPU (bf16, or fp16 on GPUs without bf16), float32 on CPU; ``bfloat16_if_native``: bf16 (half the memory) where the learner's device computes it natively (CPUs with AVX512-BF16 or AMX), else as ``auto``."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them: activation memory of one layer instead of all, about a third more compute."""
    logprob_chunk: int = Field(256, ge=1)
    """Completion tokens whose vocabulary logits are computed at once (log-probs are taken at completion positions only, this many at a time)."""
    timeout_s: float = Field(900, gt=0)
    """Longest a ``train`` call (or start-up, save, load) may take; also the torch.distributed collective timeout."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one learner GPU in GB, for the memory check before start (none = what the cluster's GPUs report)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (none = full fine-tuning): the base stays frozen, held once in ``model.dtype``; the reference is the base (the adapter switched off) or, with ``ref_refresh_every``, a frozen copy of the adapter; AdamW holds the adapter's state only; generators receive each version as an adapter (docs/learner.md, "LoRA")."""

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each must be in [0, 1), got {list(v)}")
        return v

    @field_validator("beta")
    @classmethod
    def _positive_beta(cls, v):
        if isinstance(v, float) and not (v > 0 and math.isfinite(v)):
            raise ValueError("must be > 0.0" if not v > 0 else "must be finite")
        return v

    @model_validator(mode="after")
    def _smoothing_fits_loss(self) -> "LearnerConfig":
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing: applies to the sigmoid and robust losses, not {self.loss_type!r}")
        return self


class SyncConfig(Section):
    backend: Literal["object_store", "nccl", "disk"] = "object_store"
    """How new weights reach the generators: Ray object store (CPU default), NCCL (GPU), or a shared disk."""
    timeout_s: float = Field(120, gt=0)
    """Longest a weight sync may take before the generator is restarted and re-synced."""
    disk_path: str | None = None
    """Shared folder for the ``disk`` backend (default: ``<run dir>/sync``)."""
    shm_dir: str | None = "/dev/shm"
    """Same-node fast path of ``object_store``: when the learner's rank 0 and every generator share a node, weights pass through a reused buffer file in this (RAM-backed) folder instead of the object store; none = off."""
    nccl_bucket_mb: int = Field(512, ge=1)
    """``nccl`` backend: tensors are packed into broadcast buckets of this many MiB (two in flight)."""
    nccl_port: int = Field(0, ge=0, le=65535)
    """``nccl`` backend: rendezvous port on the learner's rank-0 node (0 = pick a free one)."""
    push_retries: int = Field(2, ge=0)
    """A weight push that fails is retried this many times from the learner's current weights (its training is kept) before the round counts as failed."""
    push_backoff_s: float = Field(1.0, ge=0)
    """Seconds before the first push retry, doubled before each next one."""


class LoopConfig(Section):
    rounds: int = Field(40, ge=0)
    """Rounds to run (0 = until stopped)."""
    prompts_per_round: int = Field(256, ge=1)
    """Prompts drawn per round (epochs over the shuffled dataset)."""
    mode: Literal["sync", "async"] = "sync"
    """``sync``: strictly on-policy; ``async``: sample round t+1 while the learner trains on round t."""
    max_policy_lag: int = Field(1, ge=0)
    """In async mode, drop pairs whose policy version lags more than this (at least 1 there; sync mode never drops pairs as stale)."""
    eval_every: int = Field(5, ge=0)
    """Evaluate every k rounds and at round 0 (0 = never)."""
    checkpoint_every: int = Field(10, ge=0)
    """Checkpoint every k rounds and at the end (0 = only at the end and on stop)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted."""
    max_actor_restarts: int = Field(3, ge=0)
    """Restarts allowed per actor before the run stops with an error."""
    max_round_retries: int = Field(2, ge=0)
    """Retries of a failed round before the run stops with an error."""
    regenerate_every: int = Field(1, ge=1)
    """Sample the policy every k rounds (1 = every round: online DPO). With k > 1, the first round of
    each k draws and samples the prompts of all k rounds with the policy it holds, and the k rounds
    train on those samples in order: k = ``rounds`` is offline DPO (the initial policy sampled once),
    k = ``rounds``/4 iterative DPO with 4 iterations. Samples go to ``<run>/samples/``; sync mode only."""
    max_rounds_without_pairs: int = Field(5, ge=0)
    """Stop the run (a checkpoint, then an error naming the cause: judge failures by kind, ties, stale pairs; exit 1) after this many rounds in a row without a pair (0 = never)."""
    gate: GateConfig = GateConfig()
    """The evaluation gate: roll back to the best round's checkpoint when ``metric`` drops (docs/service.md)."""

    @model_validator(mode="after")
    def _regenerate_needs_sync(self) -> "LoopConfig":
        if self.regenerate_every > 1 and self.mode != "sync":
            raise ValueError("regenerate_every > 1 needs mode: sync (async mode samples every round)")
        return self


class MetricsConfig(Section):
    host: str = "127.0.0.1"
    """Interface for the Prometheus / status HTTP server (keep loopback unless it must be scraped remotely)."""
    port: int = Field(0, ge=0, le=65535)
    """Port for the HTTP server (0 = off)."""
    token_env: str = "ODPO_CONTROL_TOKEN"
    """Environment variable holding the token that ``POST /prompts`` and ``POST /control/...`` need; when it is unset or empty, a token is generated at start into ``<run dir>/control.token`` (mode 0600)."""


class ReportConfig(Section):
    to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = []
    """Experiment trackers that receive every round's figures (step = round), the resolved config and samples of the pairs; each needs its extra, e.g. ``pip install 'odpo[wandb]'`` (empty = none)."""
    project: str = "odpo"
    """W&B project, MLflow experiment and trackio project name (the run is named ``run.name``)."""
    pairs_every: int = Field(5, ge=0)
    """Log a sample of the round's pairs as a table (W&B table, MLflow artifact, TensorBoard text, trackio table) every k rounds (0 = never)."""
    pairs_sample: int = Field(16, ge=1)
    """Pairs in each logged sample (the round's first ones)."""
    tensorboard_dir: str | None = None
    """TensorBoard log folder (none = ``<run dir>/tensorboard``)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server, e.g. ``http://127.0.0.1:5000`` (none = the ``MLFLOW_TRACKING_URI`` environment variable, else MLflow's default); credentials come from MLflow's environment variables only."""
    wandb_entity: str | None = None
    """W&B entity (team or user; none = the API key's default); the key comes from ``WANDB_API_KEY`` or ``wandb login``, ``WANDB_MODE=offline`` logs to files only."""
    timeout_s: float = Field(30, gt=0)
    """Longest one tracker call (start, one round's log) may take; past it the call is abandoned and counted in ``tracker_errors``."""


class LogConfig(Section):
    progress_every_s: float = Field(30, ge=0)
    """Progress inside a round (prompts sampled, completions judged, learner steps): a tqdm bar when the driver writes to a terminal, otherwise one log line per phase every this many seconds (0 = no bar and no lines; ``/status`` still reports it)."""


class RunConfig(Section):
    run: RunSection = RunSection()
    """Run identity and seed."""
    model: ModelConfig = ModelConfig()
    """The policy model."""
    data: DataConfig = DataConfig()
    """Training and eval prompts."""
    generator: GeneratorConfig = GeneratorConfig()
    """vLLM generator actors."""
    judge: JudgeConfig = JudgeConfig()
    """The judge that scores completions."""
    pairs: PairsConfig = PairsConfig()
    """Pair selection."""
    corrector: CorrectorConfig = CorrectorConfig()
    """The corrector that writes the chosen side of correction pairs (``pairs.sources``)."""
    learner: LearnerConfig = LearnerConfig()
    """The DPO learner group."""
    sync: SyncConfig = SyncConfig()
    """Weight sync from learner to generators."""
    loop: LoopConfig = LoopConfig()
    """The round loop."""
    metrics: MetricsConfig = MetricsConfig()
    """Prometheus and status endpoint."""
    report: ReportConfig = ReportConfig()
    """Experiment trackers (TensorBoard, W&B, MLflow, trackio)."""
    log: LogConfig = LogConfig()
    """Progress lines in the job log."""
    faults: FaultsConfig = FaultsConfig()
    """Fault injection (off by default)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.learner.micro_batch_size > self.learner.batch_size:
            raise ValueError("learner.micro_batch_size: must be <= learner.batch_size")
        if self.loop.mode == "async" and self.loop.max_policy_lag < 1:
            raise ValueError("loop.max_policy_lag: must be >= 1 in async mode (each round is sampled with the "
                             "weights one step behind the learner, so a lag of 0 would drop every pair)")
        if self.generator.num_gpus == 0 and self.generator.engine.get("enable_chunked_prefill") is True:
            raise ValueError("generator.engine.enable_chunked_prefill: cannot be on for CPU generators (num_gpus 0): "
                             "vLLM's CPU backend fails ('CPU Generator does not use offset') when a seeded request's "
                             "prompt is split over engine steps; leave it unset (odpo turns it off on CPU)")
        if self.learner.lr_schedule != "constant" and self.learner.lr_decay_rounds == 0:
            if self.loop.rounds < 2:
                raise ValueError(f"learner.lr_decay_rounds: required (>= 2) for lr_schedule {self.learner.lr_schedule!r} "
                                 f"when loop.rounds is {self.loop.rounds} (0 = run until stopped)")
            self.learner.lr_decay_rounds = self.loop.rounds
        if self.learner.lr_schedule != "constant" and self.learner.lr_decay_rounds < 2:
            raise ValueError("learner.lr_decay_rounds: must be >= 2 for a decaying lr_schedule "
                             f"(got {self.learner.lr_decay_rounds})")
        if self.model.dtype == "float16":
            raise ValueError("model.dtype: float16 would hold the learner's master weights and AdamW state in fp16, "
                             "where AdamW's update underflows (eps 1e-8 rounds to 0) and the first step makes weights "
                             "inf/NaN; set model.dtype: float32 with learner.precision: fp16 (fp16 compute with dynamic "
                             "loss scaling), and generator.dtype: float16 to serve fp16")
        gpu_learner = self.learner.num_gpus_per_worker > 0
        if self.learner.ref_on_cpu and gpu_learner and (self.learner.strategy != "fsdp" or self.learner.num_workers < 2):
            raise ValueError("learner.ref_on_cpu: needs learner.strategy: fsdp with num_workers >= 2 on GPUs (its shards "
                             "are offloaded and gathered to the GPU per layer); otherwise the reference would run its "
                             f"forward on the CPU (strategy {self.learner.strategy}, {self.learner.num_workers} worker(s)), "
                             "far too slow beyond toy models: turn ref_on_cpu off, or use fsdp over 2+ GPUs")
        lora = self.learner.lora
        if lora and self.sync.backend != "object_store":
            raise ValueError(f"sync.backend: {self.sync.backend} moves full weights; with learner.lora the adapter "
                             "travels by object_store (shared memory on one node, the object store across nodes)")
        fp32_compute = self.learner.precision == "fp32" or (self.learner.precision == "auto" and not gpu_learner)
        if lora and self.learner.strategy == "fsdp" and self.learner.num_workers > 1 and \
                self.model.dtype != "float32" and fp32_compute:
            raise ValueError(f"learner.precision: FSDP over {self.learner.num_workers} workers keeps one dtype per "
                             f"layer unit, and learner.lora's adapters are float32 next to a {self.model.dtype} base: "
                             "set learner.precision: bf16 (both gathered in bf16), or model.dtype: float32")
        if "correction" in self.pairs.sources and not self.corrector.cls:
            raise ValueError("corrector.cls: required when pairs.sources includes correction")
        if problem := gate_problem(self):
            raise ValueError(problem)
        return self


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one line per problem, each naming its field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def describe_error(err: dict) -> str:
    """One line naming the field of a pydantic error (``loop.rounds: must be >= 0``)."""
    loc = ".".join(str(p) for p in err["loc"])
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"{loc}: must be {op} {bound}"
    if kind == "literal_error":
        return f"{loc}: must be one of {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "missing":
        return f"{loc}: required"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(tuple(f"{s}." for s in RunConfig.model_fields)) and not loc:
        return msg
    return f"{loc}: {msg}" if loc else msg


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` to a nested dict; the value is parsed as YAML (so ``1`` is an int)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError([f"--set {override}: expected key.path=value"])
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"--set {override}: {part} is not a section"])
        node = child
    node[parts[-1]] = _parse_value(value)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"{path}: YAML error at {where}: {e.problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML error: {e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    return data


def build_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([describe_error(err) for err in e.errors()]) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then each ``--set`` override; raises ``ConfigError``."""
    data = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    return build_config(data)


def dump_config(config: RunConfig) -> str:
    """The config as YAML, secrets redacted (see ``redact_secrets``): used for the run directory's
    ``config.yaml`` and ``odpo validate``. Every other field loads back to the same value."""

    return yaml.safe_dump(redact_secrets(config.model_dump(mode="json")), sort_keys=False)


def check_plugins(config: RunConfig) -> None:
    """Check that user code named in the config imports and fits its kwargs, before any actor starts."""

    try:
        check_judge_spec(config.judge.cls, config.judge.kwargs)
        if config.corrector.cls:
            check_judge_spec(config.corrector.cls, config.corrector.kwargs, "corrector.cls", ("correct",))
    except JudgeSpecError as e:
        raise ConfigError([str(e)]) from None

    lora = config.learner.lora
    if lora and lora.target_modules != "all-linear":  # the model's linear layers, from its config (meta device)
        from actors.learner.lora import check_targets, meta_model

        try:
            check_targets(meta_model(config.model.path), lora.target_modules)
        except ValueError as e:
            raise ConfigError([str(e)]) from None

    problems = missing_tracker_packages(config.report.to)
    if problems:
        raise ConfigError(problems)
