"""The plug-in API users write against keeps working: a judge written against ``judges.base`` runs
unchanged, and every built-in ``judges.<module>:<Class>`` the docs and configs name still loads."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from judges.calling import score_guarded
from judges.loader import build_judge, import_object
from tests.conftest import REPO

# A judge module as a user wrote it before the data types moved to common/types.py.
USER_JUDGE = '''
from judges.base import Completion, Judge, JudgeItem, Prompt, prompt_text


class LongerIsBetter(Judge):
    """Scores an answer by its length; a prompt asking for nothing scores None."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        out = []
        for item in items:
            assert isinstance(item.completions[0], Completion)
            text: Prompt = item.prompt
            out.append([None if not prompt_text(text) else self.scale * len(c.text) for c in item.completions])
        return out
'''

DOC_PATH = re.compile(r"(?<![\w.])(judges\.[a-z_]+:[A-Za-z_]+)")


def test_a_judge_written_against_judges_base_still_runs(tmp_path, monkeypatch):
    (tmp_path / "user_judges.py").write_text(textwrap.dedent(USER_JUDGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_judges", None)
    from judges.base import Completion, JudgeItem

    judge = build_judge("user_judges:LongerIsBetter", {"scale": 2.0})
    items = [JudgeItem("say hi", [Completion("hi"), Completion("hello")]), JudgeItem("", [Completion("x")])]
    scores, failures, errors = score_guarded(judge, items)
    assert scores == [[4.0, 10.0], [None]] and failures == {"none": 1} and errors == []


def _named_paths() -> list[str]:
    texts = [p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "configs").rglob("*.yaml")]]
    return sorted({m for text in texts for m in DOC_PATH.findall(text)})


def test_the_docs_and_configs_name_built_in_judges():
    assert "judges.verifiable:VerifiableJudge" in _named_paths() and len(_named_paths()) >= 6


@pytest.mark.parametrize("path", _named_paths())
def test_every_judge_path_the_docs_name_loads(path):
    cls = import_object(path)
    assert isinstance(cls, type) and cls.__module__ == path.split(":")[0]
    assert callable(getattr(cls, "score", None)) or callable(getattr(cls, "compare", None)) \
        or callable(getattr(cls, "correct", None))
