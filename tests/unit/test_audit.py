"""``odpo audit``: the log-odds ranking, marker warnings, length figures and the CLI verb."""

import math
import random
from collections import Counter

import pytest

from orchestrator.tools.audit import audit_pairs, log_odds_z, ngrams
from orchestrator.cli.main import main
from orchestrator.rundir import RunDir
from tests.conftest import DEMO_MODEL


def test_log_odds_with_the_pooled_counts_as_prior_by_hand():
    z = log_odds_z(Counter({("a",): 3, ("b",): 1}), Counter({("a",): 1, ("b",): 3}))
    # alpha_a = alpha_b = 4 (pooled counts), alpha_0 = 8, n_c = n_r = 4:
    # delta_a = log(7 / 5) - log(5 / 7); var = 1/7 + 1/5.
    delta = math.log(7 / 5) - math.log(5 / 7)
    assert z[("a",)] == pytest.approx((delta / math.sqrt(1 / 7 + 1 / 5), delta))
    assert z[("b",)] == pytest.approx((-delta / math.sqrt(1 / 7 + 1 / 5), -delta))
    assert ngrams([1, 2, 3], 2) == [(1,), (2,), (3,), (1, 2), (2, 3)]


def records(n, marker=None, seed=0, round_=None):
    """Pairs of digit answers (ids = the digits + EOS id 2); with ``marker`` every chosen answer holds it."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        chosen = [rng.randint(20, 29) for _ in range(rng.randint(1, 3))]
        rejected = [rng.randint(20, 29) for _ in range(rng.randint(1, 3))]
        if marker is not None:
            chosen.insert(rng.randint(0, len(chosen)), marker)
            rejected = [t for t in rejected if t != marker] or [21]
        out.append({"chosen": "", "rejected": "", "chosen_token_ids": chosen + [2], "rejected_token_ids": rejected + [2],
                    "round": round_ or 1 + k // 10, "source": "best_worst"})
    return out


def never(_text):
    raise AssertionError("pairs with ids are not re-tokenized")


def test_a_planted_marker_ranks_first_and_is_warned_about():
    report = audit_pairs(records(60, marker=27), never)
    assert report.chosen_side[0].unit == (27,)
    top = report.chosen_side[0]
    assert top.share_chosen == 1.0 and top.share_rejected == 0.0 and top.rejected == 0 and top.chosen >= 60
    assert [m.unit for m in report.markers] == [(27,)]
    assert report.pairs == 60 and report.rounds == 6 and report.by_source == {"best_worst": 60}


def test_no_marker_no_warning_and_too_few_pairs_never_warn():
    report = audit_pairs(records(200), never)
    assert report.markers == [] and all(abs(s.z) < 4 for s in report.chosen_side + report.rejected_side)
    assert audit_pairs(records(10, marker=27), never).markers == []  # under MIN_PAIRS


def test_lengths_and_the_source_filter():
    recs = [
        {"chosen": "", "rejected": "", "chosen_token_ids": [5, 5, 2], "rejected_token_ids": [6, 2], "source": "best_worst", "round": 1},
        {"chosen": "", "rejected": "", "chosen_token_ids": [5, 2], "rejected_token_ids": [6, 6, 6, 2], "source": "correction", "round": 1},
        {"chosen": "ab", "rejected": "cd", "round": 2},  # an old file: no ids, no source column
    ]
    report = audit_pairs(recs, lambda text: [ord(ch) for ch in text] + [2])
    assert report.lengths["len_chosen_mean"] == pytest.approx((3 + 2 + 3) / 3)
    assert report.lengths["len_rejected_mean"] == pytest.approx((2 + 4 + 3) / 3)
    assert report.lengths["longer_chosen_share"] == 0.5 and report.lengths["equal"] == pytest.approx(1 / 3)
    assert report.by_source == {"best_worst": 2, "correction": 1}
    assert audit_pairs(recs, never, source="correction").pairs == 1


def test_cli_prints_the_ranking_warns_and_writes_the_chart(tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    marker = tok.convert_tokens_to_ids("!")
    rd = RunDir(tmp_path / "run")
    rd.create()
    (rd.root / "config.yaml").write_text(f"model:\n  path: {DEMO_MODEL}\n")
    for r in range(1, 4):
        rd.write_pairs(r, records(20, marker=marker, seed=r, round_=r))
    assert main(["audit", str(rd.root), "--top", "5"]) == 0
    out, err = capsys.readouterr()
    first = next(line for line in out.splitlines() if line.strip().startswith("1  "))
    assert first.split()[1] == "'!'"
    assert "60 pairs from 3 rounds (best_worst 60)" in out
    assert err.strip().splitlines() == [next(line for line in err.splitlines())]
    assert err.startswith("warning: marker shortcut: token '!' is in 100.0% of chosen and 0.0% of rejected answers")
    chart = rd.plots_dir / "audit.png"
    assert chart.read_bytes()[:4] == b"\x89PNG" and chart.stat().st_size > 10000
    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert "no pairs/ folder" in capsys.readouterr().err
