"""Read and validate the chat-messages JSONL format.

One JSON object per line: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant",
"content": ...}], ...extra keys}``. :func:`parse_messages` is the one validator of a ``messages`` row: an
optional first ``system`` turn, then ``user`` and ``assistant`` turns alternating, ending with an assistant
turn; with ``pair=True`` exactly one user turn and one assistant turn, as in the PKT splits
(:func:`parse_row`, :class:`ChatExample`). Conversations a user brings are read by :mod:`pkt.data.chat`
through the same validator. Every problem is reported as ``file:line: what is wrong`` (a :class:`DataError`).
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


ROLES = ("system", "user", "assistant")


def parse_messages(obj, where: str, pair: bool = False) -> tuple[tuple[tuple[str, str], ...], dict]:
    """Validate one ``messages`` row: ((role, content), ...) and the row's other keys.

    ``where`` (``file:line`` or a dataset row) starts every error message. ``pair``: exactly (user, assistant),
    the PKT splits' shape; otherwise [system], user, assistant, (user, assistant)*.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise DataError(f"{where}: missing key 'messages'")
    msgs = obj["messages"]
    if pair and (not isinstance(msgs, list) or len(msgs) != 2):
        raise DataError(f"{where}: 'messages' must be a list of 2 turns (user, assistant)")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: turn {i} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: turn {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: turn {i} has no string 'content'")
        turns.append((role, m["content"]))
    start = 1 if turns[0][0] == "system" and not pair else 0
    for i in range(start, len(turns)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if turns[i][0] != want:
            extra = " (a system turn may only come first)" if turns[i][0] == "system" and not pair else ""
            raise DataError(f"{where}: turn {i} must have role {want!r}, got {turns[i][0]!r}{extra}")
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last turn must be the assistant's (got {turns[-1][0]!r})")
    return tuple(turns), {k: v for k, v in obj.items() if k != "messages"}


def parse_row(obj, where: str) -> ChatExample:
    """A PKT-split row: exactly one user turn, then one assistant turn."""
    turns, meta = parse_messages(obj, where, pair=True)
    return ChatExample(turns[0][1], turns[1][1], meta)


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
