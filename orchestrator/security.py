"""Security checks on a config: secrets redacted before a config is written or printed, and
warnings for settings that expose the run (a public metrics endpoint, literal secrets).

Pure Python (re, ipaddress): imported by ``orchestrator.config.dump_config`` and the CLI.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

REDACTED = "***"
_SECRET_WORDS = {"token", "secret", "password", "passwd", "authorization", "auth", "apikey", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
_URL_PASSWORD = re.compile(r"(://[^/@:\s]+:)[^/@\s]+@")
_BEARER = re.compile(r"^\s*(bearer|basic)\s+\S+", re.IGNORECASE)


def _key_words(key: str) -> list[str]:
    """``"hf_token"`` -> [hf, token]; ``"apiKey"`` -> [api, key]; ``"X-Auth-Token"`` -> [x, auth, token]."""
    return [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", str(key))]


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret: a word ``token``, ``secret``, ``password``,
    ``authorization``, ... or ``api_key``-like pairs, in any case. ``max_tokens`` and
    ``tokenizer`` are not (whole words only); keys ending in ``_env`` name an environment
    variable that holds the secret (e.g. ``api_key_env``), which is the safe way and not redacted."""
    words = _key_words(key)
    if not words or words[-1] == "env":
        return False
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _holds_secret(value: Any) -> bool:
    return isinstance(value, (str, dict, list, tuple)) and len(value) > 0


def redact_secrets(value: Any) -> Any:
    """A copy of a nested dict/list with secret values replaced by ``***``, at any depth: values
    under a secret-looking key (``is_secret_key``), ``Bearer ...`` strings and passwords inside
    URLs (``https://user:***@host``). Empty values, numbers and booleans stay as they are (a
    ``token_budget: 4096`` hides nothing)."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and _holds_secret(v) else redact_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        if _BEARER.match(value):
            return REDACTED
        return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", value)
    return value


def _literal_secrets(value: Any, where: str = "") -> list[str]:
    """Dotted paths of secret-looking keys that hold a literal value."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{where}.{k}" if where else str(k)
            if is_secret_key(k) and _holds_secret(v):
                found.append(path)
            else:
                found += _literal_secrets(v, path)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += _literal_secrets(v, f"{where}[{i}]")
    return found


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def config_warnings(config) -> list[str]:
    """Security warnings for a ``RunConfig`` that loads but is risky, one line each (without a
    ``warning:`` prefix): a metrics endpoint on a non-loopback interface, and secrets written
    into the config instead of read from the environment. ``odpo validate`` prints them on
    stderr; ``odpo run`` logs them."""
    out = []
    if config.metrics.port and not is_loopback(config.metrics.host):
        out.append(
            f"metrics.host {config.metrics.host} binds a public interface; the metrics and /status endpoint "
            f"(port {config.metrics.port}) has no authentication (its POST routes, the inbox and live control, "
            "need the run's token): keep 127.0.0.1 and scrape through a tunnel or a sidecar, or firewall the port")
    for path in _literal_secrets(config.model_dump(mode="json")):
        out.append(f"{path} holds a literal secret: it is redacted in config.yaml, but pass it through an "
                   "environment variable instead (e.g. a judge's api_key_env)")
    return out
