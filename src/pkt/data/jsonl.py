"""Read and validate the PKT chat-messages JSONL format.

One JSON object per line: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant",
"content": ...}], ...extra keys}``. Exactly one user turn followed by one assistant turn, as in the
PKT splits. Every problem is reported as ``file:line: what is wrong`` (a :class:`DataError`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pkt.errors import DataError


@dataclass(frozen=True)
class ChatExample:
    user: str
    assistant: str
    meta: dict = field(default_factory=dict)  # id, dataset, category, task_id ... as found in the file

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.user}, {"role": "assistant", "content": self.assistant}]


def parse_row(obj, where: str) -> ChatExample:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise DataError(f"{where}: missing key 'messages'")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or len(msgs) != 2:
        raise DataError(f"{where}: 'messages' must be a list of 2 turns (user, assistant)")
    for i, (m, role) in enumerate(zip(msgs, ("user", "assistant"))):
        if not isinstance(m, dict) or m.get("role") != role:
            got = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"{where}: turn {i} must have role {role!r}, got {got!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: turn {i} has no string 'content'")
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return ChatExample(msgs[0]["content"], msgs[1]["content"], meta)


def read_jsonl_rows(path: str | Path, parse) -> list:
    """``parse(obj, "file:line")`` of every non-blank line of a JSONL file; errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(parse(obj, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: empty file (no examples)")
    return rows


def read_chat_jsonl(path: str | Path) -> list[ChatExample]:
    """A two-turn chat JSONL file (user, assistant); errors name ``file:line``."""
    return read_jsonl_rows(path, parse_row)


def write_chat_jsonl(rows: list[ChatExample], path: str | Path) -> None:
    """Atomic write (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"messages": r.messages(), **r.meta}, ensure_ascii=False) + "\n")
    tmp.replace(path)
