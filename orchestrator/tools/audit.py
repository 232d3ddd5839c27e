"""``odpo audit RUN_DIR``: what separates chosen from rejected answers in a run's pairs.

DPO learns whatever tells chosen from rejected apart. If chosen answers carry a marker that
rejected ones lack (a word, a sign-off, a format, simply more tokens), the policy learns the
marker rather than the quality the judge meant to reward. The audit reads every pairs file and
reports:

- the tokens and token n-grams most over-represented in chosen vs rejected answers (and the
  other way round), ranked by the z-score of their log-odds ratio with an informative Dirichlet
  prior (Monroe, Colaresi and Quinn 2008, "Fightin' Words", eq. 16 and 22), with counts and the
  share of answers holding each;
- the answers' lengths in tokens, and the share of pairs whose chosen side is longer;
- a warning for every token found in at least 90 % of chosen and at most 10 % of rejected
  answers (a marker shortcut), once a run has at least ``MIN_PAIRS`` pairs.

Units are the model's own tokens: the pairs file's token ids, shown decoded with the run's
tokenizer (``model.tokenizer`` / ``model.path`` of its ``config.yaml``, or ``--tokenizer``);
pairs without ids are tokenized from their text. A chart goes to ``RUN_DIR/plots/audit.png``.

The prior: ``alpha_w = PRIOR_SCALE * (y_w_chosen + y_w_rejected)``, the pooled counts of both
sides as the background corpus, so a unit as common on both sides scores 0 and rare units are
shrunk towards 0 instead of topping the list on two occurrences.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MARKER_CHOSEN = 0.9
"""A token in at least this share of chosen answers ..."""
MARKER_REJECTED = 0.1
"""... and at most this share of rejected answers is a marker shortcut."""
MIN_PAIRS = 20
"""Fewer pairs than this warn of nothing (any token is a 'marker' in three pairs)."""
PRIOR_SCALE = 1.0
"""Strength of the informative prior, as a multiple of the pooled counts."""

Unit = tuple[int, ...]


@dataclass
class UnitScore:
    unit: Unit
    z: float
    delta: float
    chosen: int
    """Occurrences in chosen answers."""
    rejected: int
    share_chosen: float
    """Share of chosen answers that hold the unit."""
    share_rejected: float


@dataclass
class AuditReport:
    pairs: int
    rounds: int
    by_source: dict[str, int]
    lengths: dict[str, float | None]
    chosen_side: list[UnitScore]
    """Most over-represented in chosen answers, highest z first."""
    rejected_side: list[UnitScore]
    """Most over-represented in rejected answers, lowest z first."""
    markers: list[UnitScore] = field(default_factory=list)
    """Tokens in >= 90 % of chosen and <= 10 % of rejected answers."""
    chosen_lengths: list[int] = field(default_factory=list)
    rejected_lengths: list[int] = field(default_factory=list)


def ngrams(ids: list[int], max_n: int) -> list[Unit]:
    return [tuple(ids[i : i + n]) for n in range(1, max_n + 1) for i in range(len(ids) - n + 1)]


def log_odds_z(chosen: Counter, rejected: Counter, prior_scale: float = PRIOR_SCALE) -> dict[Unit, tuple[float, float]]:
    """``{unit: (z, delta)}``: the log-odds ratio of each unit in chosen vs rejected counts with an
    informative Dirichlet prior (Monroe et al. 2008, eq. 16) and its z-score (eq. 22)."""
    n_c, n_r = sum(chosen.values()), sum(rejected.values())
    prior = {u: prior_scale * (chosen[u] + rejected[u]) for u in set(chosen) | set(rejected)}
    a0 = sum(prior.values())
    out = {}
    for u, a in prior.items():
        y_c, y_r = chosen[u], rejected[u]
        delta = (math.log((y_c + a) / (n_c + a0 - y_c - a)) - math.log((y_r + a) / (n_r + a0 - y_r - a)))
        var = 1.0 / (y_c + a) + 1.0 / (y_r + a)
        out[u] = (delta / math.sqrt(var), delta)
    return out


def audit_pairs(records: list[dict], encode: Callable[[str], list[int]], *, max_n: int = 2, top: int = 10,
                source: str | None = None) -> AuditReport:
    """The audit of pairs-file rows (``source`` keeps one kind of pair)."""
    rows = [r for r in records if source is None or r.get("source", "best_worst") == source]
    sides: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    for r in rows:
        for side in sides:
            ids = r.get(f"{side}_token_ids")
            sides[side].append(list(ids) if ids is not None else encode(r[side]))
    counts = {side: Counter(u for ids in answers for u in ngrams(ids, max_n)) for side, answers in sides.items()}
    holders = {side: Counter(u for ids in answers for u in set(ngrams(ids, max_n))) for side, answers in sides.items()}
    n = len(rows)
    scores = []
    for u, (z, delta) in log_odds_z(counts["chosen"], counts["rejected"]).items():
        share_c = holders["chosen"][u] / n if n else 0.0
        share_r = holders["rejected"][u] / n if n else 0.0
        scores.append(UnitScore(u, z, delta, counts["chosen"][u], counts["rejected"][u], share_c, share_r))
    scores.sort(key=lambda s: (-s.z, s.unit))
    markers = [s for s in scores if len(s.unit) == 1 and n >= MIN_PAIRS
               and s.share_chosen >= MARKER_CHOSEN and s.share_rejected <= MARKER_REJECTED]
    c_len = [len(ids) for ids in sides["chosen"]]
    r_len = [len(ids) for ids in sides["rejected"]]
    longer = sum(c > r for c, r in zip(c_len, r_len))
    shorter = sum(c < r for c, r in zip(c_len, r_len))
    lengths = {
        "len_chosen_mean": sum(c_len) / n if n else None,
        "len_rejected_mean": sum(r_len) / n if n else None,
        "chosen_longer": longer / n if n else None,
        "chosen_shorter": shorter / n if n else None,
        "equal": (n - longer - shorter) / n if n else None,
        "longer_chosen_share": longer / (longer + shorter) if longer + shorter else None,
    }
    return AuditReport(
        pairs=n, rounds=len({r.get("round") for r in rows}), by_source=dict(Counter(r.get("source", "best_worst") for r in rows)),
        lengths=lengths, chosen_side=[s for s in scores if s.z > 0][:top],
        rejected_side=[s for s in reversed(scores) if s.z < 0][:top], markers=markers,
        chosen_lengths=c_len, rejected_lengths=r_len,
    )


def format_report(report: AuditReport, show: Callable[[Unit], str], run_dir: str) -> list[str]:
    """The report as lines of text (warnings are separate: see ``marker_warnings``)."""
    sources = ", ".join(f"{k} {v}" for k, v in sorted(report.by_source.items()))
    lines = [f"{run_dir}: {report.pairs} pairs from {report.rounds} rounds ({sources or 'none'})"]
    L = report.lengths
    if report.pairs:
        share = L["longer_chosen_share"]
        lines.append(
            f"length (tokens): chosen mean {L['len_chosen_mean']:.2f}, rejected mean {L['len_rejected_mean']:.2f}; "
            f"chosen longer in {L['chosen_longer']:.1%} of pairs, shorter in {L['chosen_shorter']:.1%}, "
            f"equal in {L['equal']:.1%}; longer_chosen_share {'-' if share is None else f'{share:.3f}'}")
    for title, rows in (("over-represented in chosen answers", report.chosen_side),
                        ("over-represented in rejected answers", report.rejected_side)):
        lines += ["", f"{title} (log-odds z-score, informative Dirichlet prior):",
                  f"{'rank':>4}  {'unit':<16} {'z':>7} {'chosen':>7} {'rejected':>8} {'in chosen':>10} {'in rejected':>12}"]
        for k, s in enumerate(rows, 1):
            lines.append(f"{k:>4}  {show(s.unit):<16} {s.z:>7.2f} {s.chosen:>7} {s.rejected:>8} "
                         f"{s.share_chosen:>10.1%} {s.share_rejected:>12.1%}")
        if not rows:
            lines.append("   -  (none)")
    return lines


def marker_warnings(report: AuditReport, show: Callable[[Unit], str]) -> list[str]:
    return [f"marker shortcut: token {show(s.unit)} is in {s.share_chosen:.1%} of chosen and {s.share_rejected:.1%} "
            f"of rejected answers (z {s.z:.1f}): DPO may learn the marker rather than the quality"
            for s in report.markers]


def plot_audit(report: AuditReport, show: Callable[[Unit], str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    bars = report.rejected_side[::-1] + report.chosen_side[::-1]  # strongest chosen unit on top
    ys = range(len(bars))
    left.barh(list(ys), [s.z for s in bars], color=["C0" if s.z > 0 else "C3" for s in bars])
    left.set_yticks(list(ys), [show(s.unit) for s in bars], fontsize=8)
    left.axvline(0, color="black", linewidth=0.8)
    left.set_title("log-odds z: chosen (blue) vs rejected (red)")
    hi = max(report.chosen_lengths + report.rejected_lengths + [1])
    edges = [x - 0.5 for x in range(0, hi + 2)]
    right.hist([report.chosen_lengths, report.rejected_lengths], bins=edges, label=["chosen", "rejected"])
    right.set_title("answer length (tokens)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tokenizer_for(run_dir: Path, override: str | None) -> Any:
    """The run's tokenizer, or None when it cannot be loaded (then units are shown as ids)."""
    import yaml

    path = override
    if path is None and (run_dir / "config.yaml").exists():
        model = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model", {})
        path = model.get("tokenizer") or model.get("path")
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a hub id unreachable from here, a moved folder: show ids instead
        return None


def read_pair_records(run_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((run_dir / "pairs").glob("round_*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def run_audit(run_dir: str | Path, *, tokenizer: str | None = None, max_n: int = 2, top: int = 10,
              source: str | None = None) -> tuple[AuditReport, list[str], list[str], Path]:
    """Audit a run directory: (report, lines to print, warnings, chart path)."""
    root = Path(run_dir)
    if not (root / "pairs").is_dir():
        raise FileNotFoundError(f"{root}: no pairs/ folder (not a run directory?)")
    tok = _tokenizer_for(root, tokenizer)

    def encode(text: str) -> list[int]:
        if tok is None:
            return [ord(ch) for ch in text]  # no tokenizer: characters stand in for tokens
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def show(unit: Unit) -> str:
        text = tok.decode(list(unit)) if tok is not None else " ".join(map(str, unit))
        return repr(text)

    report = audit_pairs(read_pair_records(root), encode, max_n=max_n, top=top, source=source)
    lines = format_report(report, show, str(root))
    if tok is None:
        lines.insert(1, "(the run's tokenizer could not be loaded: units are token ids; pass --tokenizer)")
    chart = plot_audit(report, show, root / "plots" / "audit.png")
    return report, lines, marker_warnings(report, show), chart
