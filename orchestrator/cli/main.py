"""The ``odpo`` command (also ``python -m orchestrator``).

Only the standard library, pydantic and yaml are imported up front; torch, Ray and vLLM are
imported inside the verbs that need them, so ``--help`` and ``validate`` answer in well under 2 s.
"""

from __future__ import annotations

import argparse
import os
import sys

from judges.loader import JudgeSpecError
from orchestrator.cli.config_doc import config_reference, update_between_markers
from orchestrator.cli.memory import describe
from orchestrator.cli.preflight import bf16_warnings, check_memory, learner_gpu_memory
from orchestrator.cli import service_verbs
from orchestrator.cli.resources import check_cluster, format_plan, judge_runs_in_driver, read_cluster, resource_plan
from orchestrator.config import ConfigError, check_plugins, dump_config, load_config
from orchestrator.loop.data import DataError
from orchestrator.observe.plot import plot_run
from orchestrator.rundir import RunDir
from orchestrator.security import config_warnings
from orchestrator.service.guards import LoopHalt
from orchestrator.tools.audit import run_audit
from orchestrator.tools.export import ExportError, export_run, push_to_hub
from orchestrator.tools.rehearsal import make_rehearsal_model


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set learner.beta=0.2 (repeatable)",
    )


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odpo", description="Online, iterative DPO on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser(
        "validate", help="check a config and print it resolved, as YAML, then the resources it asks for (as # comments)")
    _add_config_args(p)
    p.add_argument(
        "--cluster", action="store_true",
        help="also check the resources against the running Ray cluster (RAY_ADDRESS, else auto); exit 2 on a shortfall",
    )

    p = verbs.add_parser("run", help="run the self-improvement loop")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last checkpoint (without it, a run directory that "
                        "already holds a run is refused); its config may change only in operational keys")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept config changes that alter training (recorded in config_changes.jsonl)")
    p.add_argument(
        "--wait-for-resources", type=_seconds, default=0.0, metavar="SECONDS",
        help="when the Ray cluster cannot hold every actor, wait up to SECONDS for it to grow (autoscaling), "
             "logging what is missing every 30 s, before failing (default 0: fail at once, exit 2)",
    )

    service_verbs.add_parsers(verbs)

    p = verbs.add_parser("status", help="print a run's status (from its run directory or its HTTP endpoint)")
    p.add_argument("target", help="run directory, or http://host:port of the run's metrics server")

    p = verbs.add_parser("plot", help="write PNG charts of a run's metrics to RUN_DIR/plots/")
    p.add_argument("run_dir")

    p = verbs.add_parser(
        "audit", help="what separates chosen from rejected answers in a run's pairs: over-represented tokens, "
                      "lengths, marker shortcuts (chart: RUN_DIR/plots/audit.png)")
    p.add_argument("run_dir")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the run's model.tokenizer / model.path)")
    p.add_argument("--ngrams", type=int, default=2, help="longest token n-gram to rank (default: 2)")
    p.add_argument("--top", type=int, default=10, help="units listed per side (default: 10)")
    p.add_argument("--source", choices=["best_worst", "correction"], help="audit only the pairs of this source")

    p = verbs.add_parser("export", help="write a run's policy as a Hugging Face model folder (a LoRA run: a PEFT "
                                          "adapter folder, or merged with --merge) and its pairs as a dataset, each "
                                          "with a card (OUT/model, OUT/pairs)")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--round", type=int, default=None, help="checkpoint round to export (default: the newest good one)")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA run: export the base with the adapter merged in, instead of the PEFT adapter folder")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the model (model repo REPO) and pairs (dataset repo REPO); token from HF_TOKEN")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create private repos")

    p = verbs.add_parser("config-doc", help="print the configuration reference (Markdown) from the config docstrings")
    p.add_argument("--update", metavar="FILE",
                   help="instead, rewrite the text between the config-doc marker lines of FILE (e.g. docs/configuration.md)")

    p = verbs.add_parser("make-demo-model", help="rebuild a demo task's model and data (assets/demo, assets/demo-graded)")
    p.add_argument("--task", choices=("addition", "graded"), default="addition",
                   help="addition: 2-digit sums scored 0/1 (default); graded: 3-digit sums scored digit by digit")
    p.add_argument("--out", default=None, help="output folder (default: assets/demo, or assets/demo-graded for --task graded)")
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default: 240 for addition, 300 for graded)")

    p = verbs.add_parser(
        "make-rehearsal-model",
        help="write a random-weight model with Qwen2.5-0.5B's (or 1.5B's) architecture and shape (no download), "
             "for scale rehearsals")
    p.add_argument("out", metavar="DIR", help="output folder (Hugging Face format)")
    p.add_argument("--shape", choices=("0.5b", "1.5b"), default="0.5b",
                   help="Qwen2.5-0.5B's shape (default) or Qwen2.5-1.5B's (the LoRA scale rehearsal)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 24 or 28)")
    p.add_argument("--vocab-size", type=int, default=151_936, help="model vocabulary (default: 151936, as Qwen2.5-0.5B)")
    p.add_argument("--tokenizer-vocab", type=int, default=4096, help="learned BPE entries (default: 4096)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="stored weights dtype (default: bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed (default: 0)")
    return parser


def load_or_exit(args) -> "RunConfig":  # noqa: F821

    try:
        config = load_config(args.config, args.overrides)
        check_plugins(config)
    except ConfigError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)
    return config


def use_current_folder() -> None:
    """Put the current folder first on ``sys.path``, as ``python -m orchestrator`` does (a console
    script alone would not): classes a config names by import path, such as ``my_judges:MyJudge``
    in a ``my_judges.py`` next to the config, resolve from where ``odpo`` is run. ``odpo run``
    gives the actors of the local cluster it starts the same path (``run.local_runtime_env``)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_current_folder()
    if args.verb == "validate":
        return validate(args)
    if args.verb == "run":
        return run_verb(args)
    if args.verb == "status":
        return print_status(args.target)
    if args.verb == "add-prompts":
        return service_verbs.add_prompts_verb(args)
    if args.verb == "ctl":
        return service_verbs.ctl_verb(args)
    if args.verb == "plot":

        for path in plot_run(args.run_dir):
            print(path)
        return 0
    if args.verb == "audit":
        return audit_verb(args)
    if args.verb == "export":
        return export_verb(args)
    if args.verb == "config-doc":

        if args.update:
            try:
                changed = update_between_markers(args.update, config_reference())
            except (OSError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"{args.update}: {'updated' if changed else 'already up to date'}", file=sys.stderr)
            return 0
        print(config_reference())
        return 0
    if args.verb == "make-demo-model":
        from pathlib import Path

        from orchestrator.tools.demo.model import make_demo_model

        out = args.out or ("assets/demo-graded" if args.task == "graded" else "assets/demo")
        print(make_demo_model(Path(out), task=args.task, steps=args.steps))
        return 0
    if args.verb == "make-rehearsal-model":
        import json

        try:
            summary = make_rehearsal_model(args.out, layers=args.layers, vocab_size=args.vocab_size, seed=args.seed,
                                           dtype=args.dtype, tokenizer_vocab=args.tokenizer_vocab, shape=args.shape)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary))
        return 0
    raise AssertionError(args.verb)


def export_verb(args) -> int:
    """``odpo export``: a run that cannot be exported is one ``error:`` line and exit status 2."""

    try:
        summary = export_run(args.run_dir, args.out, args.round, merge=args.merge)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"round {summary['round']} (policy version {summary['policy_version']}): {summary['form']} -> {summary['model']}, "
          f"{summary['pairs']} pairs -> {summary['dataset']}")
    if args.push_to_hub:
        for url in push_to_hub(args.out, args.push_to_hub, private=args.private):
            print(url)
    return 0


def run_verb(args) -> int:
    """``odpo run``: a config, data, judge or run-directory problem found before the loop starts
    is one ``error:`` line on stderr and exit status 2, not a traceback."""
    config = load_or_exit(args)
    from orchestrator.cli.run import run

    try:
        if args.allow_config_change and not args.resume:
            raise ConfigError(["--allow-config-change: only applies with --resume"])
        return run(config, resume=args.resume, wait_for_resources_s=args.wait_for_resources,
                   allow_config_change=args.allow_config_change)
    except ConfigError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
    except (DataError, JudgeSpecError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
    except LoopHalt as e:  # no pairs for too long, a full disk: stopped with a checkpoint where it could
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


def validate(args) -> int:
    """Print the resolved config, then the resources it asks for and the memory estimate per actor
    as YAML comments (stdout stays valid YAML). A learner that cannot fit ``learner.gpu_memory_gb``
    is an ``error:`` line on stderr naming the fields to change, exit status 2. With ``--cluster``,
    compare the resources with the running cluster: each shortfall is one ``error:`` line and the
    exit status is 2. Ray is imported only under ``--cluster``."""

    config = load_or_exit(args)
    for line in [*config_warnings(config), *bf16_warnings(config)]:
        print(f"warning: {line}", file=sys.stderr)
    plan = resource_plan(config, judge_in_driver=judge_runs_in_driver(config))
    print(dump_config(config), end="")
    print("\n".join(format_plan(plan)))
    device, source = learner_gpu_memory(config)
    lines, warnings, problems = check_memory(config, device, source)
    print("\n".join(f"# {line}" for line in describe(config, device) + lines))
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 2
    if not args.cluster:
        return 0

    try:
        totals, nodes = read_cluster()
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = check_cluster(plan, totals, nodes)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    custom = "".join(f", {totals.get(k, 0):g} {k}" for k in plan["total"] if k not in ("GPU", "CPU"))
    have = f"{totals.get('GPU', 0):g} GPU, {totals.get('CPU', 0):g} CPU{custom} on {len(nodes)} node(s)"
    print(f"# cluster: {have}; {'does not fit' if problems else 'fits'}")
    return 2 if problems else 0


def audit_verb(args) -> int:
    """``odpo audit``: the report on stdout, one ``warning:`` line per marker shortcut on stderr."""

    try:
        _, lines, warnings, chart = run_audit(args.run_dir, tokenizer=args.tokenizer, max_n=args.ngrams,
                                              top=args.top, source=args.source)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"\nchart: {chart}")
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def print_status(target: str) -> int:
    """Print the /status JSON of a live run (URL) or the last state a run directory recorded."""
    import json

    if target.startswith(("http://", "https://")):
        from urllib.request import urlopen

        try:
            with urlopen(target.rstrip("/") + "/status", timeout=10) as resp:
                status = json.load(resp)
        except OSError as e:
            print(f"error: {target}: {e}", file=sys.stderr)
            return 2
    else:

        rd = RunDir(target)
        if not rd.root.is_dir():
            print(f"error: {target}: no such run directory", file=sys.stderr)
            return 2
        status = json.loads(rd.status_path.read_text()) if rd.status_path.exists() else {}
        metrics = rd.read_metrics()
        status.setdefault("last_round", metrics[-1] if metrics else None)
        status["checkpoints"] = [p.name for p in rd.checkpoints()]
    print(json.dumps(status, indent=2, default=str))
    return 0
