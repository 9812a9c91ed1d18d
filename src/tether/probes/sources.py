"""Where the public evaluation sets come from: a user's copy, or a pinned download.

tether never ships these files. A set named by its short name (``survival-instinct``,
``first_plot_questions``) is looked up, in order, in

1. ``$TETHER_DATA/<folder>/<file>``;
2. ``<repo>/../shared/data/<folder>/<file>`` (a checkout that sits beside a shared data folder);
3. the download cache ``$TETHER_CACHE/data/<folder>/<file>`` (default ``~/.cache/tether``);

and, when none has it, downloaded from a URL pinned to a commit and checked against its sha256
before it is moved into the cache. A set given as a path is read from that path as is.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tether.errors import DataError


@dataclass(frozen=True)
class PinnedFile:
    """A public file pinned to one commit: where to fetch it and the sha256 it must have."""

    folder: str
    filename: str
    url: str
    sha256: str


_AAR_COMMIT = "84fcc677e52e1902d696c32cd1a6b663e70d3993"
_AAR_BASE = f"https://raw.githubusercontent.com/anthropics/evals/{_AAR_COMMIT}/advanced-ai-risk/human_generated_evals"
_EM_COMMIT = "b1fe286827715d8e01ff7088c7ee9763b5e367b4"
_EM_BASE = f"https://raw.githubusercontent.com/johny-b/misalignment-generalization/{_EM_COMMIT}/final_questions"

ADVANCED_AI_RISK: dict[str, PinnedFile] = {
    name: PinnedFile("advanced-ai-risk", f"{name}.jsonl", f"{_AAR_BASE}/{name}.jsonl", sha)
    for name, sha in {
        "corrigible-less-HHH": "d796dc49ba66b9a15bb38dce8f7dc14e212e1f5bac6dc331d64f5fe3e377eec8",
        "corrigible-more-HHH": "77bf2986d88b0fdc3959e77b20c302ec14edff62bb5e0135a7134b877ade4293",
        "corrigible-neutral-HHH": "875632869abd5b1e70cccc130dbb6ed2ff6b1b1c7eb50b835a2cfdc02f3daac7",
        "myopic-reward": "03d4e57220cbe825c9b76df39085a945e8c2fa2c6c7e937fb6df94143491237f",
        "power-seeking-inclination": "a8a2094a1e404fb094b3d361e3049ecc06ecd2a26d0b4b827b4a83a98b6d886a",
        "survival-instinct": "0831782a9e0462f137eb9c4884edd19f248e18f17770f7a4540c67937b3af0e8",
        "wealth-seeking-inclination": "7583bec06bd799cf21fe854c6e8b92ebb669ce02579ea1a869aa460cc0f18546",
    }.items()
}

EMERGENT_MISALIGNMENT: dict[str, PinnedFile] = {
    name: PinnedFile("emergent-misalignment", f"{name}.yaml", f"{_EM_BASE}/{name}.yaml", sha)
    for name, sha in {
        "first_plot_questions": "ce21d1111f6e4fff7e8973ae206982705b0ff5c37b133afc3851d659662f6766",
        "preregistered_evals": "8d098402a5b13d44d72c70bca217cf4421179a6a4af0d050fc1a9990c4f52079",
    }.items()
}


def data_roots() -> list[Path]:
    """Folders searched for a local copy, in order ($TETHER_DATA, then ``<repo>/../shared/data``)."""
    roots = []
    if os.environ.get("TETHER_DATA"):
        roots.append(Path(os.environ["TETHER_DATA"]).expanduser())
    repo = Path(__file__).resolve().parents[3]  # src/tether/probes/sources.py -> repo root
    roots.append(repo.parent / "shared" / "data")
    return roots


def cache_dir() -> Path:
    """The download cache: ``$TETHER_CACHE/data`` (default ``~/.cache/tether/data``)."""
    root = os.environ.get("TETHER_CACHE") or "~/.cache/tether"
    return Path(root).expanduser() / "data"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_pinned(pin: PinnedFile, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``pin.url`` to ``dest``, refusing it unless its sha256 is ``pin.sha256``.

    The bytes land in a temporary file beside ``dest`` and are renamed only after the check, so
    a cache never holds a partial or tampered file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(pin.url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != pin.sha256:
            raise DataError(
                f"the download of {pin.url} has sha256 {h.hexdigest()}, not the pinned {pin.sha256}; "
                "the file changed upstream or the download was corrupted, so it was not used"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"could not download {pin.url} ({exc}); give the file's path instead or set $TETHER_DATA "
            f"to a folder that holds {pin.folder}/{pin.filename}"
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def resolve_set(name_or_path: str | os.PathLike[str], pins: dict[str, PinnedFile], download: bool = True) -> Path:
    """A local file for ``name_or_path``: the path itself, a local copy of a named set, or a download."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    name = str(name_or_path)
    pin = pins.get(name)
    if pin is None:
        if p.suffix or os.sep in name:
            raise DataError(f"{p} does not exist; give an existing file or one of: {', '.join(pins)}")
        raise DataError(f"unknown set {name!r}; give a file path or one of: {', '.join(pins)}")
    for root in data_roots():
        candidate = root / pin.folder / pin.filename
        if candidate.is_file():
            return candidate
    cached = cache_dir() / pin.folder / pin.filename
    if cached.is_file() and sha256_of(cached) == pin.sha256:
        return cached
    if not download:
        raise DataError(
            f"set {name!r} is not in $TETHER_DATA, <repo>/../shared/data or the cache, and downloads are off; "
            "give the file's path"
        )
    return fetch_pinned(pin, cached)
