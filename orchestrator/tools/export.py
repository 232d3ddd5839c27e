"""``odpo export RUN_DIR OUT [--round N] [--merge] [--push-to-hub REPO]``: hand a run on as a Hugging
Face model folder and a preference dataset, each with a card.

- ``OUT/model/``: the policy of checkpoint ``round_N`` (default: the newest good one), copied from
  ``checkpoints/round_N/policy/`` (a Hugging Face folder: loads with
  ``AutoModelForCausalLM.from_pretrained`` and ``vllm serve``), its tokenizer (taken from the
  run's ``model.tokenizer``/``model.path`` when the checkpoint has none) and ``README.md``: base
  model, odpo version, rounds, the eval curve as a table, loss and key config, the judge. A LoRA
  run (``learner.lora``) exports its adapter as a PEFT adapter folder (``adapter/`` of the
  checkpoint: ``PeftModel.from_pretrained`` loads it, vLLM serves it with ``enable_lora``), or with
  ``--merge`` the base with the adapter merged in (PEFT's ``merge_and_unload``) as a whole model;
  the card says which.
- ``OUT/pairs/``: every pair of rounds 1..N as parquet shards ``data/train-*.parquet`` (the hub's
  layout; locally ``datasets.load_dataset("parquet", data_dir="OUT/pairs/data")``: datasets 5.2
  caches ``load_dataset("OUT/pairs")`` by folder name, so two exports into folders of the same
  name would read back the first) and ``README.md``: columns, counts per round and per source,
  score statistics, policy versions.

Each folder is built under a temporary name and renamed into place. ``--push-to-hub REPO``
uploads the model to the model repo ``REPO`` and the pairs to the dataset repo ``REPO`` with
``huggingface_hub`` (token from ``HF_TOKEN`` or ``huggingface-cli login``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import yaml

from orchestrator.rundir import RunDir, checkpoint_problem

SHARD_ROWS = 100_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
KEY_CONFIG = [
    ("learner", "loss_type"), ("learner", "beta"), ("learner", "rpo_alpha"), ("learner", "dpo_weight"),
    ("learner", "lr"), ("learner", "batch_size"), ("learner", "epochs_per_round"), ("learner", "ref_refresh_every"),
    ("generator", "n"), ("generator", "temperature"), ("generator", "max_new_tokens"),
    ("loop", "prompts_per_round"), ("loop", "mode"), ("pairs", "strategy"), ("pairs", "tie_break"),
    ("run", "seed"),
]


class ExportError(Exception):
    """A run directory that cannot be exported as asked (the message says why)."""


def odpo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("odpo")
    except PackageNotFoundError:
        return "unknown"


def pick_checkpoint(rd: RunDir, round_: int | None) -> Path:
    if round_ is None:
        path, passed_over = rd.latest_good_checkpoint(checkpoint_problem)
        if path is None:
            raise ExportError(f"{rd.root}: no usable checkpoint ({'; '.join(passed_over) or 'none written'})")
        return path
    path = rd.checkpoint_path(round_)
    if not path.is_dir():
        have = ", ".join(str(int(p.name.split("_")[1])) for p in rd.checkpoints()) or "none"
        raise ExportError(f"--round {round_}: no checkpoint of that round in {rd.checkpoints_dir} (rounds kept: {have})")
    problem = checkpoint_problem(path)
    if problem:
        raise ExportError(f"--round {round_}: checkpoint {path} is not usable: {problem}")
    return path


def export_run(run_dir: str | Path, out: str | Path, round_: int | None = None, merge: bool = False) -> dict:
    """Write ``out/model`` and ``out/pairs``; returns a summary (round, pairs, paths, and what the
    model folder holds: ``model``, ``adapter`` or ``merged``)."""
    rd = RunDir(run_dir)
    if not rd.config_path.exists():
        raise ExportError(f"{rd.root}: not a run directory (no config.yaml)")
    ckpt = pick_checkpoint(rd, round_)
    n = int(rd.read_checkpoint_state(ckpt)["round"])
    version = rd.read_checkpoint_state(ckpt).get("policy_version")
    config = yaml.safe_load(rd.config_path.read_text())
    lines = [m for m in rd.read_metrics() if m.get("round", 0) <= n]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    table = read_pairs(rd, n)
    pairs_stats = dataset_stats(table)
    adapter = (ckpt / "adapter").is_dir()
    form = ("merged" if merge else "adapter") if adapter else "model"
    facts = {"round": n, "policy_version": version, "config": config, "metrics": lines, "pairs": pairs_stats,
             "run_name": rd.root.name, "odpo_version": odpo_version(), "form": form}

    staging = out / f".model.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    if form == "merged":
        merge_adapter(config["model"], ckpt / "adapter", staging)
    else:
        shutil.copytree(ckpt / ("adapter" if adapter else "policy"), staging)
    if not any((staging / f).exists() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        source = config["model"].get("tokenizer") or config["model"]["path"]
        AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    (staging / "README.md").write_text(model_card(facts))
    _put_in_place(staging, out / "model")

    staging = out / f".pairs.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_shards(table, staging / "data")
    (staging / "README.md").write_text(dataset_card(facts))
    _put_in_place(staging, out / "pairs")
    return {"round": n, "policy_version": version, "pairs": pairs_stats["rows"], "form": form,
            "model": str(out / "model"), "dataset": str(out / "pairs")}


def merge_adapter(model_cfg: dict, adapter: Path, folder: Path) -> None:
    """The base model with the adapter merged in, saved as a whole model in the learner's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_cfg["path"], dtype=getattr(torch, model_cfg["dtype"]))
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(folder)


def _put_in_place(staging: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


# --- the pairs -----------------------------------------------------------------------------------

def read_pairs(rd: RunDir, last_round: int):
    """Every pairs file of rounds <= ``last_round`` as one Arrow table (columns that only some
    rounds have, e.g. ``source`` in newer files, are null in the others)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in rd.pairs_dir.glob("round_*.parquet") if int(p.stem.split("_")[1]) <= last_round)
    tables = [pq.read_table(p) for p in files]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in ("prompt", "chosen", "rejected")})
    return pa.concat_tables(tables, promote_options="permissive")


def write_shards(table, folder: Path) -> list[Path]:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-table.num_rows // SHARD_ROWS))
    paths = []
    for k in range(count):
        path = folder / f"train-{k:05d}-of-{count:05d}.parquet"
        pq.write_table(table.slice(k * SHARD_ROWS, SHARD_ROWS), path)
        paths.append(path)
    return paths


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def dataset_stats(table) -> dict:
    cols = {name: table.column(name).to_pylist() for name in
            ("round", "source", "policy_version", "chosen_score", "rejected_score") if name in table.column_names}
    chosen, rejected = cols.get("chosen_score", []), cols.get("rejected_score", [])
    return {
        "rows": table.num_rows,
        "columns": [(f.name, str(f.type)) for f in table.schema],
        "per_round": sorted(Counter(cols.get("round", [])).items()),
        "per_source": sorted(Counter(s or "best_worst" for s in cols["source"]).items()) if "source" in cols else None,
        "per_version": sorted(Counter(cols.get("policy_version", [])).items()),
        "chosen_score": _summary([float(x) for x in chosen]),
        "rejected_score": _summary([float(x) for x in rejected]),
        "margin": _summary([float(c) - float(r) for c, r in zip(chosen, rejected)]),
    }


# --- the cards -----------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _front_matter(fields: dict) -> str:
    return "---\n" + yaml.safe_dump(fields, sort_keys=False) + "---\n\n"


def model_card(f: dict) -> str:
    c, lines = f["config"], f["metrics"]
    base = c["model"]["path"]
    trained = [m for m in lines if m.get("round", 0) >= 1]
    evals = [(m["round"], m["eval_reward"]) for m in lines if m.get("eval_reward") is not None]
    losses = [m["loss"] for m in trained if m.get("loss") is not None]
    last = trained[-1] if trained else {}
    form, lora = f.get("form", "model"), c["learner"].get("lora") or {}
    out = _front_matter({"base_model": base, "library_name": "peft" if form == "adapter" else "transformers",
                         "tags": ["odpo", "dpo", "online-dpo", "preference-optimization"] + (["lora"] if lora else [])})
    out += f"# {f['run_name']}: online DPO with odpo\n\n"
    if form == "adapter":
        out += (f"**A LoRA adapter** (PEFT format: r {lora.get('r')}, alpha {lora.get('alpha')}) for the base model "
                f"`{base}`, which is not included: load the base, then this adapter.\n\n")
    elif form == "merged":
        out += (f"**A merged model**: the base `{base}` with odpo's LoRA adapter (r {lora.get('r')}, alpha "
                f"{lora.get('alpha')}) merged into its weights (`odpo export --merge`).\n\n")
    out += (f"`{base}` trained by odpo {f['odpo_version']} for **{f['round']} rounds** of online, "
            f"iterative DPO (policy version {f['policy_version']}): each round the policy sampled "
            f"{c['generator']['n']} answers to {c['loop']['prompts_per_round']} prompts, the judge scored them, "
            f"and pairs were selected (`{c['pairs']['strategy']}`) and trained on. "
            f"{f['pairs']['rows']} pairs in all (the dataset exported beside this model).\n\n")
    out += "## Evaluation\n\nHeld-out greedy reward (`eval_reward`; round 0 is the base model):\n\n"
    out += "| round | eval_reward |\n|---|---|\n" + "".join(f"| {r} | {_fmt(v)} |\n" for r, v in evals)
    if not evals:
        out += "| - | no evaluation in this run |\n"
    out += "\n## Training\n\n| figure | value |\n|---|---|\n"
    rows = [("rounds", f["round"]), ("pairs", f["pairs"]["rows"]),
            ("loss (last round)", last.get("loss")), ("loss (mean over rounds)", sum(losses) / len(losses) if losses else None),
            ("reward accuracy (last round)", last.get("reward_accuracy")),
            ("reward margin (last round)", last.get("reward_margin")), ("KL estimate (last round)", last.get("kl"))]
    out += "".join(f"| {k} | {_fmt(v, 4)} |\n" for k, v in rows)
    out += "\n## Key config\n\n| field | value |\n|---|---|\n"
    out += "".join(f"| `{s}.{k}` | {c[s].get(k)} |\n" for s, k in KEY_CONFIG if s in c and k in c[s])
    out += f"\n## Judge\n\n`{c['judge']['cls']}` with kwargs `{json.dumps(c['judge'].get('kwargs', {}))}`\n\n"
    if form == "adapter":
        return out + ("## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                      f"AutoTokenizer\n\nbase = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
                      "model = PeftModel.from_pretrained(base, \"PATH\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n"
                      f"```\n\nor `vllm serve {base} --enable-lora --max-lora-rank {lora.get('r')} --lora-modules "
                      "policy=PATH` (vLLM rounds `--max-lora-rank` up to one of its sizes).\n")
    return out + ("## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                  "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n```\n\n"
                  "or `vllm serve PATH`.\n")


def dataset_card(f: dict) -> str:
    s, c = f["pairs"], f["config"]
    out = _front_matter({"tags": ["odpo", "dpo", "preference"], "configs": [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]})
    out += f"# {f['run_name']}: preference pairs from online DPO\n\n"
    out += (f"{s['rows']} chosen/rejected pairs that odpo {f['odpo_version']} sampled from `{c['model']['path']}` "
            f"(and its later policy versions) and scored with `{c['judge']['cls']}`, rounds 1-{f['round']}. "
            "Every pair was trained on once, in its round.\n\n")
    out += "## Columns\n\n| column | type |\n|---|---|\n" + "".join(f"| `{n}` | {t} |\n" for n, t in s["columns"])
    out += "\n## Pairs per round\n\n| round | pairs |\n|---|---|\n" + "".join(f"| {r} | {k} |\n" for r, k in s["per_round"])
    out += "\n## Pairs per source\n\n"
    if s["per_source"] is None:
        out += "Not recorded in these pairs files (all are best-vs-worst pairs of sampled answers).\n"
    else:
        out += "| source | pairs |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in s["per_source"])
    out += "\n## Scores\n\n| score | mean | min | max |\n|---|---|---|---|\n"
    for name in ("chosen_score", "rejected_score", "margin"):
        st = s[name]
        out += f"| {name} | {_fmt(st.get('mean'))} | {_fmt(st.get('min'))} | {_fmt(st.get('max'))} |\n"
    out += "\n## Policy versions\n\nThe policy version that sampled each pair (version v = after v learner updates):\n\n"
    out += "| policy_version | pairs |\n|---|---|\n" + "".join(f"| {v} | {k} |\n" for v, k in s["per_version"])
    out += ("\n## Load\n\n```python\nimport datasets\n\n"
            "ds = datasets.load_dataset(\"parquet\", data_dir=\"PATH/data\", split=\"train\")  # a local copy\n"
            "ds = datasets.load_dataset(\"REPO\", split=\"train\")  # pushed to the hub\n```\n")
    return out


# --- the hub -------------------------------------------------------------------------------------

def push_to_hub(out: str | Path, repo: str, private: bool = False) -> list[str]:
    """Upload ``out/model`` to the model repo ``repo`` and ``out/pairs`` to the dataset repo ``repo``."""
    from huggingface_hub import HfApi

    api, urls = HfApi(), []
    for folder, repo_type in (("model", "model"), ("pairs", "dataset")):
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(Path(out) / folder), repo_id=repo, repo_type=repo_type,
                                   commit_message="odpo export")
        urls.append(str(getattr(commit, "commit_url", commit)))
    return urls
