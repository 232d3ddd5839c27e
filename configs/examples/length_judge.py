"""An example custom judge: prefer answers of a target length, optionally rewarding the gold answer.

Used by ``configs/examples/custom-judge.yaml`` as ``configs.examples.length_judge:LengthJudge``.
A judge needs nothing of odpo: a class with ``score(items) -> list[list[float | None]]``, one
score per completion. Each item carries the prompt, its completions (``text``,
``finish_reason``) and the rest of its dataset row, here the gold ``answer`` column.
"""


class LengthJudge:
    def __init__(self, target_chars: int = 2, answer_field: str | None = None, correct_bonus: float = 0.0):
        """``target_chars``: the preferred answer length; ``correct_bonus``: added when the stripped
        answer equals ``row[answer_field]``."""
        if target_chars < 0:
            raise ValueError(f"target_chars must be >= 0, got {target_chars}")
        self.target_chars, self.answer_field, self.correct_bonus = target_chars, answer_field, correct_bonus

    def score(self, items):
        out = []
        for item in items:
            gold = item.row.get(self.answer_field) if self.answer_field else None
            row = []
            for c in item.completions:
                text = c.text.strip()
                value = -abs(len(text) - self.target_chars)
                if gold is not None and text == str(gold).strip():
                    value += self.correct_bonus
                row.append(float(value))
            out.append(row)
        return out
