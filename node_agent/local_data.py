"""The node's local training text: a folder of documents plus the completions users accepted.

The folder (config ``node.data_dir``) holds text files (``.txt``, ``.md``, ``.rst``; one
document each) in any layout. An accepted completion — prompt and answer the user marked
good through the HTTP API — is written as its own file under ``accepted/`` so it becomes
training text for the next round and survives restarts. Reading is capped at
``max_chars`` in a fixed order (sorted paths), so one round's cost is bounded and the same
folder always yields the same texts.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class LocalData:
    """Read documents from ``root``; record accepted completions under ``root/accepted``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def texts(self, max_chars: int) -> list[str]:
        """Non-empty documents in path order, the last one cut so the total is ≤ max_chars."""
        out: list[str] = []
        total = 0
        if not self.root.is_dir():
            return out
        for path in sorted(p for p in self.root.rglob("*") if p.suffix in TEXT_SUFFIXES):
            try:
                text = path.read_text("utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                log.warning("skipping local document %s: %s", path, err)
                continue
            if not text:
                continue
            text = text[: max_chars - total]
            out.append(text)
            total += len(text)
            if total >= max_chars:
                break
        return out

    def accept(self, completion_id: str, prompt: str, answer: str) -> Path:
        """Store an accepted completion as a document; returns its path.

        Written whole or not at all (a temporary file renamed into place), so a full disk
        never leaves half a document for the next round to train on.
        """
        if not _SAFE_ID.match(completion_id):
            raise ValueError(f"completion id {completion_id!r} is not a valid id")
        path = self.root / "accepted" / f"{completion_id}.txt"
        tmp = path.with_suffix(".partial")
        with self._lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(f"{prompt}{answer}\n", "utf-8")
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
        return path
