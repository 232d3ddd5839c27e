"""``odpo plot RUN_DIR``: PNG charts of a run's metrics.jsonl, written to RUN_DIR/plots/."""

from __future__ import annotations

from pathlib import Path

from orchestrator.rundir import RunDir


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = RunDir(run_dir)
    records = rd.read_metrics()
    if not records:
        raise FileNotFoundError(f"{rd.metrics_path}: no metrics to plot")
    rd.plots_dir.mkdir(parents=True, exist_ok=True)
    # name: (title, left-axis series, right-axis series); length.png only when the run reports lengths.
    charts = {
        "reward.png": ("Reward per round", [("reward_mean", "sample reward (mean)"), ("eval_reward", "eval reward (greedy, held out)"),
                                            ("reward_chosen", "chosen"), ("reward_rejected", "rejected")], []),
        "loss.png": ("Loss and reward accuracy", [("loss", "loss"), ("reward_accuracy", "reward accuracy")], []),
        "kl.png": ("KL to the reference (chosen answers) and β", [("kl", "KL estimate")], [("beta", "β (right axis)")]),
        "length.png": ("Answer length (tokens) and share of pairs whose chosen is longer",
                       [("len_chosen_mean", "chosen (mean tokens)"), ("len_rejected_mean", "rejected (mean tokens)")],
                       [("longer_chosen_share", "longer-chosen share (right axis)")]),
    }
    written = []
    for name, (title, keys, right_keys) in charts.items():
        if name == "length.png" and not _series(records, "len_chosen_mean")[0]:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        axes = [(ax, keys, "-")]
        if right_keys and any(_series(records, k)[0] for k, _ in right_keys):
            axes.append((ax.twinx(), right_keys, "--"))
        handles = []
        for axis, series, style in axes:
            for key, label in series:
                xs, ys = _series(records, key)
                if xs:
                    color = f"C{len(handles)}"
                    handles += axis.plot(xs, ys, style, color=color, marker="o" if key == "eval_reward" else None,
                                         markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1), fontsize=8)
        fig.tight_layout()
        fig.savefig(rd.plots_dir / name, dpi=100)
        plt.close(fig)
        written.append(rd.plots_dir / name)

    fig, ax = plt.subplots(figsize=(8, 4))
    rounds = [r for r in records if r.get("round", 0) > 0 and isinstance(r.get("round_s"), (int, float))]
    xs = [r["round"] for r in rounds]
    bottom = [0.0] * len(rounds)
    for key in ("gen_s", "judge_s", "learn_s", "sync_s", "eval_s"):
        ys = [r.get(key) or 0.0 for r in rounds]
        ax.bar(xs, ys, bottom=bottom, label=key.removesuffix("_s"))
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.plot(xs, [r["round_s"] for r in rounds], color="black", linewidth=1, label="round (wall)")
    ax.set_title("Time per round (s)")
    ax.set_xlabel("round")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(rd.plots_dir / "time.png", dpi=100)
    plt.close(fig)
    written.append(rd.plots_dir / "time.png")
    return written
