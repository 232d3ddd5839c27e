"""``odpo add-prompts RUN FILE`` and ``odpo ctl RUN pause|resume|stop|set``.

``RUN`` is a run directory or the URL of a live run's HTTP server. Through the run directory the
verb checks and publishes the batch or request itself (``orchestrator/service/``): writing there
is the credential, and a run that is down finds it at its next start. Through a URL it is a
``POST`` with the run's token (``$ODPO_CONTROL_TOKEN``, or ``--token-file``). Either way the
answer is printed as JSON once the batch or request is on disk; a refused one is one ``error:``
line per problem, naming the line or the field, and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from orchestrator.config import ConfigError
from orchestrator.service.control import check_set, publish_request
from orchestrator.service.inbox import InboxError, add_batch, parse_file

DEFAULT_TOKEN_ENV = "ODPO_CONTROL_TOKEN"


def add_parsers(verbs) -> None:
    p = verbs.add_parser("add-prompts", help="add prompt rows (JSONL or parquet, in the training set's format) to "
                                             "a run's inbox; the loop draws each once (data.inbox)")
    p.add_argument("run", metavar="RUN", help="run directory, or http://host:port of the live run")
    p.add_argument("file", metavar="FILE", help="a .jsonl (or .json array) or .parquet file of rows")
    p.add_argument("--token-file", help=f"with a URL: file holding the token (default: ${DEFAULT_TOKEN_ENV})")

    p = verbs.add_parser("ctl", help="control a running loop: pause, resume, stop [--after-round], "
                                     "set KEY=VALUE... (applied at the next round)")
    p.add_argument("run", metavar="RUN", help="run directory, or http://host:port of the live run")
    p.add_argument("action", choices=("pause", "resume", "stop", "set"))
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="for set: e.g. learner.beta=0.2")
    p.add_argument("--after-round", action="store_true", help="for stop: finish the current round first")
    p.add_argument("--token-file", help=f"with a URL: file holding the token (default: ${DEFAULT_TOKEN_ENV})")


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _post(url: str, body: bytes, token_file: str | None, content_type: str) -> dict:
    import os
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    token = Path(token_file).read_text().strip() if token_file else os.environ.get(DEFAULT_TOKEN_ENV, "").strip()
    request = Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urlopen(request, timeout=60) as resp:
            return json.load(resp)
    except HTTPError as e:
        try:
            answer = json.load(e)
        except ValueError:
            answer = {}
        raise ConfigError(answer.get("problems") or [f"{url}: {e.code} {answer.get('error') or e.reason}"]) from None
    except OSError as e:
        raise ConfigError([f"{url}: {e}"]) from None


def _refuse(problems: list[str]) -> int:
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 2


def add_prompts_verb(args) -> int:
    try:
        items = parse_file(args.file)
        if _is_url(args.run):
            body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row in items).encode()
            answer = _post(args.run.rstrip("/") + "/prompts", body, args.token_file, "application/jsonl")
        else:
            if not Path(args.run).is_dir():
                raise InboxError(f"{args.run}: no such run directory")
            answer = add_batch(Path(args.run), items, args.file)
    except InboxError as e:
        return _refuse([str(e)])
    except ConfigError as e:
        return _refuse(e.problems)
    print(json.dumps(answer))
    return 0


def ctl_verb(args) -> int:
    try:
        if args.action != "set" and args.assignments:
            raise ConfigError([f"{args.action}: takes no KEY=VALUE"])
        if args.after_round and args.action != "stop":
            raise ConfigError(["--after-round: only applies to stop"])
        if _is_url(args.run):
            body = {"after_round": True} if args.after_round else {}
            if args.action == "set":
                body = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.assignments)}
            answer = _post(f"{args.run.rstrip('/')}/control/{args.action}", json.dumps(body).encode(),
                           args.token_file, "application/json")
        else:
            answer = _ctl_run_dir(Path(args.run), args)
    except ConfigError as e:
        return _refuse(e.problems)
    print(json.dumps(answer))
    return 0


def _ctl_run_dir(run_dir: Path, args) -> dict:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError([f"{run_dir}: not a run directory (no config.yaml)"])
    request = {"action": args.action, "after_round": args.after_round, "via": "odpo ctl"}
    if args.action == "set":
        request["changes"] = check_set(yaml.safe_load(config_path.read_text()) or {}, args.assignments)
    number = publish_request(run_dir, request)
    when = "at the start of the next round" if args.action == "set" else "within a second, by the running driver"
    return {"request": number, **({"changes": request["changes"]} if "changes" in request else {}), "applies": when}
