"""The token that ``POST /prompts`` and ``POST /control/...`` need.

Taken from the environment variable ``metrics.token_env`` when it is set, else generated at each
start (32 random bytes, hex) into ``<run dir>/control.token``, created with mode 0600 so that no
other user can read it even for a moment. The token is never logged, never written into
``config.yaml``, ``status.json`` or a tracker; callers send it as ``Authorization: Bearer TOKEN``
(or ``X-Odpo-Token: TOKEN``), compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from actors.durable import fsync_dir, fsync_file

TOKEN_FILE = "control.token"


def write_token(path: Path, token: str) -> None:
    """Replace ``path`` with ``token``: the new file is 0600 from its creation, fsync'd, renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def start_token(run_dir: Path, env_name: str) -> tuple[str, str]:
    """The run's token and where it came from (``env ODPO_CONTROL_TOKEN`` or the file's path).
    A token from the environment leaves no file: an older generated one is removed."""
    path = Path(run_dir) / TOKEN_FILE
    from_env = os.environ.get(env_name, "").strip() if env_name else ""
    if from_env:
        path.unlink(missing_ok=True)
        return from_env, f"environment variable {env_name}"
    token = secrets.token_hex(32)
    write_token(path, token)
    return token, str(path)


def read_token(run_dir: Path, env_name: str) -> str | None:
    """What a client on this machine sends: the environment variable, else the run's token file."""
    if env_name and os.environ.get(env_name, "").strip():
        return os.environ[env_name].strip()
    try:
        return (Path(run_dir) / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def presented_token(headers) -> str | None:
    """The token a request carries (``Authorization: Bearer T`` or ``X-Odpo-Token: T``)."""
    auth = (headers.get("Authorization") or "").strip()
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return (headers.get("X-Odpo-Token") or "").strip() or None


def authorized(expected: str | None, headers) -> bool:
    """Whether the request carries the run's token (always False when the run has none)."""
    given = presented_token(headers)
    return bool(expected) and given is not None and hmac.compare_digest(given.encode(), expected.encode())
