"""Atomic file writes: a reader never sees a half-written result, even after a kill."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tether.errors import TetherError


class OutputWriteError(TetherError, OSError):
    """A result file that cannot be written (disk full, folder not writable); nothing half-written is left.

    Also an ``OSError`` (with the original ``errno``), so callers that catch those still do.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    An ``OSError`` (disk full, no permission, a file where a folder should be) becomes one
    ``OutputWriteError`` sentence naming ``path``; the temporary file is removed first.
    """
    p = Path(path)
    tmp: str | None = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, p)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, TetherError):
            reason = exc.strerror or type(exc).__name__
            raise OutputWriteError(
                exc.errno, f"could not write {p} ({reason}); free some space or give a writable output folder"
            ) from None
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def splice_block(
    path: str | os.PathLike[str], begin: str, end: str, block: str, heading: str, preamble: str = ""
) -> None:
    """Replace the text from ``begin`` to ``end`` in a Markdown file with ``block`` (which holds both
    markers), or append ``heading`` and the block when the markers are not there yet; a missing
    file starts as ``preamble``."""
    p = Path(path)
    text = p.read_text() if p.is_file() else preamble
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    atomic_write_text(p, text)
