"""Resolve a judge named by ``package.module:ClassName`` and check its kwargs, cheaply.

One mechanism for built-in and user judges alike, and for the other user classes named the same
way (a corrector: ``methods=("correct",)``). ``check_judge_spec`` runs when the config
loads, before any Ray actor starts; each failure is one line naming ``judge.cls`` or the kwarg.
It imports the judge's module (which should import heavy libraries lazily, in ``setup``), checks
the class has ``score`` or ``compare``, binds ``kwargs`` to its constructor's signature, and calls
the class's optional ``check_kwargs(kwargs)`` hook (the built-in ensemble checks its members
there, the other built-ins their argument values).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import sysconfig
from typing import Any


class JudgeSpecError(ValueError):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def searched_folders() -> list[str]:
    """The folders on ``sys.path`` that an import looks in for a user's module (the standard
    library left out), in order; the ``odpo`` command puts the current folder first."""
    std = os.path.abspath(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for entry in sys.path:
        folder = os.path.abspath(entry or os.curdir)
        in_std = folder == std or folder.startswith(std + os.sep)
        if os.path.isdir(folder) and not in_std and folder not in out:
            out.append(folder)
    return out


def import_object(path: str, field: str = "judge.cls") -> Any:
    """Import ``package.module:Name``; errors name ``field`` and what is missing."""
    if not isinstance(path, str):
        raise JudgeSpecError(f"{field}: must be a string 'package.module:ClassName', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise JudgeSpecError(f"{field}: must look like 'package.module:ClassName', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user's module can fail in any way on import
        where = ""
        if isinstance(e, ModuleNotFoundError) and e.name and (module_name + ".").startswith(e.name + "."):
            where = f" (folders searched: {', '.join(searched_folders())})"
        raise JudgeSpecError(
            f"{field}: cannot import module {module_name!r}: {type(e).__name__}: {_first_line(e)}{where}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise JudgeSpecError(f"{field}: module {module_name!r} has no attribute {attr!r}") from None


def check_judge_spec(path: str, kwargs: dict[str, Any], field: str = "judge.cls",
                     methods: tuple[str, ...] = ("score", "compare")) -> type:
    """Check the class imports, has one of ``methods`` (a judge: ``score`` or ``compare``), and
    accepts ``kwargs``; returns it."""
    cls = import_object(path, field)
    if not inspect.isclass(cls):
        raise JudgeSpecError(f"{field}: {path} is not a class")
    if not any(callable(getattr(cls, m, None)) for m in methods):
        wanted = f"neither {' nor '.join(f'a {m}()' for m in methods)}" if len(methods) > 1 else f"no {methods[0]}()"
        raise JudgeSpecError(f"{field}: {path} has {wanted} method")
    kwargs_field = field.rsplit(".", 1)[0] + ".kwargs"
    if not isinstance(kwargs, dict):
        raise JudgeSpecError(f"{kwargs_field}: must be a mapping, got {type(kwargs).__name__}")
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = sig.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if not takes_any and key not in params:
                raise JudgeSpecError(
                    f"{kwargs_field}.{key}: not an argument of {path} (it takes: {', '.join(accepted) or 'nothing'})")
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise JudgeSpecError(f"{kwargs_field}: {path}: {e}") from None
    hook = getattr(cls, "check_kwargs", None)
    if callable(hook):
        try:
            hook(dict(kwargs))
        except JudgeSpecError:
            raise  # already names its field (e.g. a nested ensemble member)
        except Exception as e:  # the hook says why the values are wrong
            raise JudgeSpecError(f"{kwargs_field}: {path}: {_first_line(e)}") from None
    return cls


def build_judge(path: str, kwargs: dict[str, Any]) -> Any:
    """Check and instantiate a judge (``setup`` is the caller's business)."""
    return check_judge_spec(path, kwargs)(**kwargs)
