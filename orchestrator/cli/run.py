"""``odpo run``: set up the run directory, Ray, the actors and metrics, then drive the loop.

Connects to a running Ray cluster when there is one (``RAY_ADDRESS``, or the environment of a
``ray job submit`` job) and otherwise starts a local one; before starting any actor it checks
that the cluster can hold them all and that the learner fits its GPUs (``orchestrator.cli.preflight``).
SIGTERM/SIGINT (and ``ray job stop``) ask the loop to stop: a round that has not started learning
is abandoned, one that has is finished, a checkpoint is written and the process exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

from actors import rng_state
from actors.generator.pool import GeneratorPool, make_generate_fn
from actors.judging.pool import JudgePool
from actors.learner.group import LearnerGroup
from orchestrator.cli.memory import describe
from orchestrator.cli.preflight import MemoryShortfall, await_fit, bf16_warnings, check_memory, learner_gpu_memory
from orchestrator.cli.resume_check import check_run_dir
from orchestrator.config import RunConfig, dump_config
from orchestrator.loop.carried import load_carried, save_carried
from orchestrator.loop.data import DataError, PromptSampler, load_prompts
from orchestrator.loop.loop import Loop, drive
from orchestrator.loop.state import DrawnRound, LoopState, Parts
from orchestrator.observe.metrics import Metrics
from orchestrator.observe.progress import ProgressWatcher
from orchestrator.observe.trackers import open_trackers
from orchestrator.rundir import RunDir, checkpoint_problem
from orchestrator.security import config_warnings
from orchestrator.service.guards import check_room
from orchestrator.service.hooks import Service
from orchestrator.service.routes import post_handler

log = logging.getLogger("odpo")

ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("vllm", "ray", "datasets", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cpus_needed(c: RunConfig) -> float:
    return (c.generator.num_actors * c.generator.num_cpus + c.judge.num_actors * c.judge.num_cpus
            + c.learner.num_workers * c.learner.num_cpus_per_worker)


def connect_ray(c: RunConfig) -> None:
    import ray

    for key, value in ACTOR_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    # A local cluster: advertise enough logical CPUs for every actor (the demo's share a 2-core box).
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(c)))
    # address="local": a new cluster even when another one runs on this machine (plain ray.init()
    # would join that one, and refuse num_cpus).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env=local_runtime_env())
    log.info("started a local Ray cluster with %d CPUs", num_cpus)


def local_runtime_env() -> dict:
    """Every actor of a local cluster imports from the current folder first, as the driver does
    (``odpo`` puts it on ``sys.path``): a judge module next to the config loads in its actor too."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def log_memory(c: RunConfig, device: float | None, source: str, *, estimate: bool = True) -> None:
    """Log the memory estimate per actor (with ``estimate``) and the learner's verdict against
    ``device`` bytes per GPU (``orchestrator.cli.preflight.check_memory``); raise ``MemoryShortfall``
    (exit 2) when it cannot fit."""
    lines, warnings, problems = check_memory(c, device, source)
    if problems:
        raise MemoryShortfall(problems)
    for line in (describe(c, device) if estimate else []) + lines:
        log.info(line)
    for line in warnings:
        log.warning(line)


def install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum, _frame):
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            raise SystemExit(1)
        log.info("%s received: finishing or abandoning the round, then checkpointing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def build_parts(c: RunConfig, rd: RunDir) -> Parts:

    def make_learner():
        return LearnerGroup(c.model, c.learner, seed=c.run.seed)

    learner = make_learner()
    generators = GeneratorPool(c.model, c.generator, prompt_field=c.data.prompt_field, seed=c.run.seed,
                               max_restarts=c.loop.max_actor_restarts, mode=c.loop.mode,
                               weight_transfer="nccl" if c.sync.backend == "nccl" else None,
                               lora_rank=c.learner.lora.r if c.learner.lora else None)
    corrector = (c.corrector.cls, c.corrector.kwargs) if "correction" in c.pairs.sources else None
    judges = JudgePool(c.judge, seed=c.run.seed, max_restarts=c.loop.max_actor_restarts, corrector=corrector,
                       generate_fn=make_generate_fn(generators, c.data.prompt_field, c.run.seed))
    return Parts(generators=generators, judges=judges, learner=learner, make_learner=make_learner,
                 sync_cfg=c.sync, run_dir=str(rd.root))


def run(c: RunConfig, resume: bool = False, wait_for_resources_s: float = 0.0,
        allow_config_change: bool = False) -> int:
    setup_logging()

    for warning in [*config_warnings(c), *bf16_warnings(c)]:
        log.warning(warning)
    # Before anything is written or started, a learner too big for learner.gpu_memory_gb stops here
    # (one error line, like the other problems found before Ray); the estimate is logged below.
    device, source = learner_gpu_memory(c)
    problems = check_memory(c, device, source)[2]
    if problems:
        raise MemoryShortfall(problems)
    rd = RunDir(Path(c.run.output_dir) / c.run.name)
    rd.create()
    changes = check_run_dir(rd, c, resume, allow_config_change)  # before Ray: a refused resume is exit 2
    prompts = load_prompts(c.data.source, c.data.split, c.data.prompt_field, subset=c.data.subset)
    eval_prompts = None
    if c.data.eval_source and c.loop.eval_every:
        eval_prompts = load_prompts(c.data.eval_source, c.data.eval_split or c.data.split, c.data.prompt_field,
                                    limit=c.data.eval_size, subset=c.data.subset)
    log.info("%d training prompts from %s%s", len(prompts), c.data.source,
             f", {len(eval_prompts)} eval prompts from {c.data.eval_source}" if eval_prompts else "")
    rd.write_config(dump_config(c))
    log_memory(c, device, source)

    stop = threading.Event()
    metrics = Metrics(c.run.name)
    service = Service(c, rd, metrics, stop, prompts.rows)  # the inbox and live control work from here on
    if c.metrics.port:
        service.open_token()
        port = metrics.serve(c.metrics.host, c.metrics.port, post=post_handler(service))
        log.info("metrics on http://%s:%d/metrics (status: /status; POST /prompts, /control/...)", c.metrics.host, port)

    connect_ray(c)
    try:  # before any actor: a cluster that cannot hold them all is an error now, not a silent wait
        await_fit(c, wait_for_resources_s)
        if device is None and c.learner.num_gpus_per_worker > 0:  # the same check on what the GPUs report
            device, source = learner_gpu_memory(c, ask_cluster=True)
            if device is not None:
                log_memory(c, device, source, estimate=False)
    except BaseException:
        metrics.close()
        service.close()
        raise
    install_stop_handlers(stop)  # after ray.init, which installs its own SIGTERM handler
    t = time.perf_counter()
    metrics.set_phase("starting actors")
    parts = build_parts(c, rd)
    log.info("actors ready in %.1fs", time.perf_counter() - t)
    watcher = trackers = None
    try:
        # Before any sampling: actors look the progress board up once, at their first report.
        watcher = ProgressWatcher(metrics, parts.judges, c.run.seed, c.log.progress_every_s).start()
        state, pending = LoopState(), None
        if resume:
            state, pending = restore(rd, parts, prompts.rows, c.data.prompt_field)
        loop = Loop(c, rd, parts, prompts, eval_prompts, metrics, stop, state, service)
        if resume:
            service.resume(loop, state.service, {ch["key"] for ch in changes})
        if pending is not None:
            loop.pending = pending
            loop.sampler = PromptSampler.from_state(pending.sampler_after, len(prompts), c.run.seed)
        loop.trackers = trackers = open_trackers(c, rd)

        def save_checkpoint(st: LoopState) -> None:

            check_room(rd, st.round, loop.faults.free_bytes(st.round))  # before a byte is written
            t0 = time.perf_counter()
            staging = rd.staging_checkpoint_path(st.round)
            parts.learner.save(str(staging))
            # Async mode: the next round is being sampled with older weights; keep its samples.
            saved_pending = None
            if loop.pending is not None:
                loop.collect(loop.pending)
                saved_pending = save_carried(loop.pending, staging)
            payload = {"round": st.round, "policy_version": loop.learner_version, "sampler": st.sampler,
                       "pairs_total": st.pairs_total, "rounds_without_pairs": st.rounds_without_pairs,
                       "beta": st.beta, "length_counts": st.length_counts,
                       "seed": c.run.seed, "mode": c.loop.mode, "saved_at": time.time(),
                       "pending": saved_pending, "rng": rng_state.capture(), "service": st.service}
            path = rd.commit_checkpoint(staging, st.round, payload)
            rd.prune_checkpoints(c.loop.keep_checkpoints, protect=Service.protected(st))
            log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - t0)

        drive(loop, save_checkpoint)
    finally:
        for closing in (watcher, trackers):
            if closing is not None:
                closing.close()
        for part in (parts.generators, parts.judges, parts.learner):
            try:
                part.shutdown()
            except Exception as e:  # shutting down must not hide the loop's own error
                log.warning("shutdown of %s failed: %s", type(part).__name__, e)
        metrics.close()
        service.close()
    log.info("run %s done at round %d", c.run.name, loop.state.round)
    return 0


def restore(rd: RunDir, parts: Parts, rows: list[dict], prompt_field: str) -> tuple[LoopState, DrawnRound | None]:
    """Load the newest good checkpoint into the learner and generators, put back the driver's
    RNG states, trim later outputs; also returns the async round it had in flight, if any."""

    path, passed_over = rd.latest_good_checkpoint(checkpoint_problem)
    for reason in passed_over:
        log.warning("skipping checkpoint %s", reason)
    if path is None:
        log.warning("no usable checkpoint in %s: starting from round 0", rd.checkpoints_dir)
        rd.truncate_metrics(-1)
        rd.remove_pairs_after(0)
        return LoopState(), None
    saved = rd.read_checkpoint_state(path)
    pending = load_carried(path, saved.get("pending"), rows, prompt_field)
    parts.learner.load(str(path))
    version = int(saved["policy_version"])
    parts.sync(version)
    if saved.get("rng"):
        rng_state.restore(saved["rng"])
    rd.truncate_metrics(saved["round"])
    rd.remove_pairs_after(saved["round"])
    log.info("resumed from %s: round %d, policy version %d%s", path, saved["round"], version,
             f", round {pending.round}'s samples taken from the checkpoint" if pending else "")
    state = LoopState(round=saved["round"], policy_version=version, sampler=saved["sampler"],
                      pairs_total=saved.get("pairs_total", 0), rounds_without_pairs=saved.get("rounds_without_pairs", 0),
                      beta=saved.get("beta"), length_counts=saved.get("length_counts", {}),
                      service=saved.get("service") or {})
    return state, pending


_checkpoint_problem = checkpoint_problem  # (older name)


__all__ = ["run", "DataError"]
