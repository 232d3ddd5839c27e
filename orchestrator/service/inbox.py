"""The prompt inbox: prompt rows added while a run goes on.

``odpo add-prompts RUN FILE`` and ``POST /prompts`` check a batch against the training set's
rows (``inbox/schema.json``, written by the driver at start: the prompt column, every column and
the types it holds), then publish it as ``inbox/batch_NNNNNN.jsonl`` (``mailbox``: whole, fsync'd,
numbered without gaps) before they answer. A bad row refuses the whole batch with an error naming
its line; nothing is partly added. The loop draws inbox rows before or beside the dataset's
(``data.inbox.share``), each once, marked ``source_batch: inbox/batch_NNNNNN`` (dataset rows:
``dataset``); the cursor (next batch, next row) travels in the prompt sampler's state, so a redone
or resumed round draws exactly the rows the committed state says are next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.loop.data import PromptSampler, prompt_problem
from orchestrator.rundir import atomic_write_text
from orchestrator.service import mailbox

INBOX_DIR = "inbox"
SCHEMA_FILE = "schema.json"
STEM, SUFFIX = "batch", ".jsonl"
MARK = "source_batch"
"""The column that says where a pair's prompt came from: ``dataset`` or ``inbox/batch_NNNNNN``."""
DATASET = "dataset"


class InboxError(ValueError):
    """A batch refused whole; the message names the source and the line (or row) at fault."""


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"), (dict, "dict")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def row_schema(rows: list[dict], prompt_field: str, max_rows: int) -> dict:
    """What an inbox row must look like: the training set's columns and the types each holds."""
    columns: dict[str, set] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, set()).add(json_type(value))
    return {"prompt_field": prompt_field, "max_rows": max_rows,
            "columns": {k: sorted(v) for k, v in columns.items()}}


def inbox_dir(run_dir: Path) -> Path:
    return Path(run_dir) / INBOX_DIR


def write_schema(run_dir: Path, schema: dict) -> None:
    inbox_dir(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(inbox_dir(run_dir) / SCHEMA_FILE, json.dumps(schema, indent=1) + "\n")


def read_schema(run_dir: Path) -> dict:
    path = inbox_dir(run_dir) / SCHEMA_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InboxError(f"{path}: missing (it is written when the run starts; start the run once first)") from None


# --- reading a batch ---------------------------------------------------------------------------
def parse_jsonl(data: bytes, where: str) -> list[tuple[str, Any]]:
    """``(label, value)`` per non-blank line of JSON Lines bytes (a JSON array is read as its items)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InboxError(f"{where}: line {line}: not valid UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InboxError(f"{where}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return [(f"item {i}", v) for i, v in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise InboxError(f"{where}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def parse_file(path: str | Path) -> list[tuple[str, Any]]:
    """The rows of a JSONL (or JSON array) or parquet file, each labelled by its line or row."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
            raise InboxError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return [(f"row {i}", row) for i, row in enumerate(rows)]
    if path.suffix not in (".jsonl", ".json"):
        raise InboxError(f"{path}: unsupported file type {path.suffix!r} (jsonl, json, parquet)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InboxError(f"{path}: {e.strerror or e}") from None
    return parse_jsonl(data, str(path))


def check_rows(items: list[tuple[str, Any]], schema: dict, where: str) -> list[dict]:
    """The rows, if every one fits the training set's rows; else ``InboxError`` naming the first
    line at fault (a batch is taken whole or not at all)."""
    if not items:
        raise InboxError(f"{where}: no rows")
    if len(items) > schema["max_rows"]:
        raise InboxError(f"{where}: {len(items)} rows, more than data.inbox.max_rows={schema['max_rows']}")
    field, columns = schema["prompt_field"], schema["columns"]
    seen: dict[str, str] = {}
    for label, row in items:
        at = f"{where}: {label}"
        if not isinstance(row, dict):
            raise InboxError(f"{at}: expected an object with the training set's columns, got {json_type(row)}")
        if MARK in row:
            raise InboxError(f"{at}: column {MARK!r} is reserved (odpo marks where each prompt came from)")
        for name in columns:
            if name not in row:
                raise InboxError(f"{at}: no column {name!r} (the training set's rows have {sorted(columns)})")
        for name, value in row.items():
            if name not in columns:
                raise InboxError(f"{at}: column {name!r} is not one of the training set's ({sorted(columns)})")
            kind, allowed = json_type(value), columns[name]
            if kind not in allowed and not (kind == "int" and "float" in allowed):
                raise InboxError(f"{at}: column {name!r} holds {kind}; the training set's holds {' or '.join(allowed)}")
        problem = prompt_problem(row[field])
        if problem:
            raise InboxError(f"{at}: {problem.replace('_', ' ')} prompt in column {field!r}")
        key = repr(row[field])
        if key in seen:
            raise InboxError(f"{at}: the same prompt as {seen[key]}")
        seen[key] = label
    return [row for _, row in items]


def add_batch(run_dir: Path, items: list[tuple[str, Any]], where: str, schema: dict | None = None) -> dict:
    """Check a batch and publish it; returns ``{batch, rows, path}`` once it is on disk."""
    schema = schema or read_schema(run_dir)
    rows = check_rows(items, schema, where)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    number, path = mailbox.publish(inbox_dir(run_dir), STEM, SUFFIX, write)
    return {"batch": f"{INBOX_DIR}/{path.stem}", "rows": len(rows), "path": str(path)}


# --- drawing -----------------------------------------------------------------------------------
class Inbox:
    """The loop's reader of the published batches (each read once and kept until drawn)."""

    def __init__(self, run_dir: Path):
        self.folder = inbox_dir(run_dir)
        self._batches: dict[int, list[dict]] = {}

    def batch(self, number: int) -> list[dict] | None:
        if number not in self._batches:
            path = mailbox.numbered(self.folder, STEM, SUFFIX, number)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            self._batches[number] = [json.loads(line) for line in text.splitlines() if line.strip()]
        return self._batches[number]

    def take(self, cursor: tuple[int, int], k: int) -> tuple[list[dict], tuple[int, int]]:
        """Up to ``k`` rows from ``cursor`` on, each marked with its batch; and the cursor after them."""
        number, index = cursor
        out: list[dict] = []
        while len(out) < k:
            rows = self.batch(number)
            if rows is None:
                break
            taken = rows[index:index + k - len(out)]
            out += [{**row, MARK: f"{INBOX_DIR}/{STEM}_{number:06d}"} for row in taken]
            index += len(taken)
            if index >= len(rows):
                number, index = number + 1, 0
        for old in [n for n in self._batches if n < number]:  # drawn whole: not needed again
            del self._batches[old]
        return out, (number, index)

    def waiting(self, cursor: tuple[int, int]) -> int:
        """Rows published and not yet drawn."""
        number, index = cursor
        total = 0
        while (rows := self.batch(number)) is not None:
            total += len(rows) - index
            number, index = number + 1, 0
        return total


def draw_rows(sampler: PromptSampler, dataset: list[dict], inbox: Inbox, share: float,
              k: int) -> tuple[list[int], list[dict]]:
    """A round's ``k`` prompt rows: inbox rows first (up to ``share`` of ``k``, at least one while
    any waits), then the dataset's; their positions in the training set (-1 for inbox rows)."""
    want = k if share >= 1 else max(1, round(share * k))
    rows, sampler.inbox = inbox.take(sampler.inbox, want)
    indices = sampler.draw(k - len(rows)) if k > len(rows) else []
    return [-1] * len(rows) + list(indices), rows + [dataset[i] for i in indices]


def inbox_prompts(rows: list[dict]) -> int:
    """How many of a round's rows came from the inbox."""
    return sum(1 for row in rows if str(row.get(MARK, DATASET)).startswith(INBOX_DIR + "/"))
