"""The LLM-judge rubric: the default prompt, its rendering, and parsing a score from the reply.

The default is an additive 5-point rubric in the manner of Self-Rewarding Language Models
(Yuan et al., 2024, "LLM-as-a-Judge" prompt): each criterion met adds a point, and the judge
ends its reply with ``Score: <points>``. Shared by ``judges.llm`` and ``judges.openai``; pure text.
"""

from __future__ import annotations

import re

DEFAULT_TEMPLATE = """\
Below are a user's request and a candidate response. Grade the response on an additive scale \
of 0 to 5 points, adding a point for each of these that holds:
1. The response is on topic: it offers at least some information that bears on the request, \
even if partial or mixed with irrelevant material.
2. It covers a substantial part of the request, though it may leave the main point unsettled.
3. It settles the core of the request usefully, even if it reads like a web page or a forum \
post rather than a dedicated assistant.
4. It is written as an assistant answering this request directly and completely, clearly \
organized and helpful, with at most minor room to be clearer, shorter or more focused.
5. It is excellent: fitted exactly to the request, with nothing superfluous, showing expert \
knowledge, accurate and engaging.

Request:
{prompt}

Response:
{response}

Explain your grading in a few sentences (under 100 words), then give the total on the last line \
exactly as "Score: <points>".
"""

_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")
_SCORE = re.compile(r"score\s*(?:\*\*)?\s*[:=]?\s*(?:\*\*)?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*\.?\s*")


def check_template(template: str) -> None:
    """A usable template names ``{response}`` (and usually ``{prompt}``)."""
    if not isinstance(template, str) or "{response}" not in template:
        raise ValueError("template must contain the placeholder {response} (and usually {prompt})")


def render(template: str, prompt: str, response: str) -> str:
    """``template`` with ``{prompt}`` and ``{response}`` filled in one pass (so braces in the texts,
    or a literal ``{response}`` inside the prompt, are left alone; other braces are kept as written)."""
    values = {"prompt": prompt, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_score(text: str | None, max_score: float = 5) -> float | None:
    """The last ``Score: N`` in ``text`` (``**Score:** 4``, ``score = 3``, ``Score: 4/5`` too), or the
    whole text when it is a bare number; None when absent or outside ``[0, max_score]``."""
    if not text:
        return None
    found = _SCORE.findall(text)
    if found:
        value = float(found[-1])
    else:
        bare = _BARE.fullmatch(text)
        if not bare:
            return None
        value = float(bare.group(1))
    return value if 0 <= value <= max_score else None


def mean_score(texts: list[str] | None, max_score: float = 5) -> float | None:
    """Mean of the parseable scores among a completion's ``k`` judge replies; None if none parse."""
    parsed = [s for s in (parse_score(t, max_score) for t in texts or []) if s is not None]
    return sum(parsed) / len(parsed) if parsed else None


def guided_regex(max_score: int) -> str:
    """A regex for constrained decoding: just ``Score: N`` (the reply carries no justification)."""
    if not 1 <= max_score <= 9:
        raise ValueError("guided output supports max_score from 1 to 9")
    return f"Score: [0-{max_score}]"
