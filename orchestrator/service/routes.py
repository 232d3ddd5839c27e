"""The HTTP routes that change a run, served next to ``/metrics`` and ``/status``
(``orchestrator/observe/metrics.py``) on ``metrics.host`` (loopback unless configured otherwise):

- ``POST /prompts``: a body of JSON Lines rows (or a JSON array) in the training set's format;
  answered once the batch is on disk (``inbox.py``);
- ``POST /control/pause``, ``/control/resume``, ``/control/stop`` (body ``{"after_round": true}``
  for ``stop --after-round``), ``/control/set`` (body ``{"learner.beta": 0.2, ...}``): published
  as requests, then acted on (``control.py``).

Every one needs the run's token (``access.py``): without it the answer is 401 and nothing
changes. Answers are JSON: 200 with what was done, 400 with ``error`` naming the line or field.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from orchestrator.config import ConfigError
from orchestrator.service.access import authorized
from orchestrator.service.control import assignments_from_json, check_set, publish_request
from orchestrator.service.inbox import InboxError, add_batch, parse_jsonl, read_schema



def _json_body(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"request body: not valid JSON ({e})"]) from None


def post_handler(service) -> Callable[[str, Any, bytes], tuple[int, dict]]:
    """``handle(path, headers, body) -> (status, answer)`` for the metrics server."""
    root = service.rd.root

    def handle(path: str, headers, body: bytes) -> tuple[int, dict]:
        if path != "/prompts" and not path.startswith("/control/"):
            return 404, {"error": f"no route POST {path}"}
        if not authorized(service.token, headers):
            return 401, {"error": "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                  f"(the run's {service.c.metrics.token_env} or control.token)"}
        try:
            if path == "/prompts":
                return 200, add_batch(root, parse_jsonl(body, "POST /prompts"), "POST /prompts", read_schema(root))
            action = path.removeprefix("/control/")
            if action == "set":
                config = service.c.model_dump(mode="json")
                changes = check_set(config, assignments_from_json(_json_body(body)))
                number = publish_request(root, {"action": "set", "changes": changes, "via": "POST /control/set"})
                service.controls.poll()
                return 200, {"request": number, "changes": changes, "applies": "at the start of the next round"}
            if action in ("pause", "resume", "stop"):
                after = bool(_json_body(body).get("after_round")) if action == "stop" else False
                number = publish_request(root, {"action": action, "after_round": after, "via": f"POST {path}"})
                service.controls.poll()
                return 200, {"request": number, "paused": service.controls.paused,
                             "stopping": service.stop.is_set() or service.controls.stop_after_round}
            return 404, {"error": f"no control action {action!r} (pause, resume, stop, set)"}
        except InboxError as e:
            return 400, {"error": str(e)}
        except ConfigError as e:
            return 400, {"error": "; ".join(e.problems), "problems": e.problems}

    return handle
