"""The method registry: methods by name, from this package and from the ``tether.methods`` entry points.

``@register`` adds a ``Method`` subclass under its ``name``. Another package adds methods by
declaring an entry point in the ``tether.methods`` group that points at a module (importing it
registers its classes) or at a ``Method`` subclass. ``build_stack`` turns the ``methods`` list
of a run config into instances and refuses impossible stacks before any work starts.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, TypeVar

from pydantic import ValidationError

from tether.methods.base import Method

M = TypeVar("M", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}
_LOADED = {"builtin": False, "entry_points": False}
BUILTIN_MODULES = (
    "naive", "inoculation", "replay", "kl", "constraint", "ewc", "gradient_projection", "representation",
    "routing", "steering", "caft", "safelora",
)


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    if not _LOADED["builtin"]:
        _LOADED["builtin"] = True
        for mod in BUILTIN_MODULES:
            import_module(f"tether.methods.{mod}")
    if not _LOADED["entry_points"]:
        _LOADED["entry_points"] = True
        from importlib.metadata import entry_points

        for ep in entry_points(group="tether.methods"):
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Method):
                register(obj)


BUILTIN_ORDER = (
    "naive", "inoculation", "replay", "kl", "constraint", "ewc", "l2sp", "gradient_projection", "representation",
    "gradient_routing", "steering", "caft", "safelora",
)


def available() -> dict[str, type[Method]]:
    """Every registered method, by name: the built-in ones in a fixed order, then plug-ins by name."""
    _load()
    rank = {n: i for i, n in enumerate(BUILTIN_ORDER)}
    names = sorted(_REGISTRY, key=lambda n: (rank.get(n, len(rank)), n))
    return {n: _REGISTRY[n] for n in names}


def get(name: str) -> type[Method]:
    methods = available()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(methods)}")
    return methods[name]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    got = err.get("input")
    return f"bad value for '{key}': {err['msg'][0].lower() + err['msg'][1:]} (got {got!r})"


def make(name: str, params: dict[str, Any], where: str = "") -> Method:
    """Instantiate method ``name`` with ``params``; a problem raises one-sentence ``ValueError``."""
    try:
        cls = get(name)
    except KeyError as exc:
        raise ValueError(f"{where}{exc.args[0]}") from None
    try:
        cfg = cls.Config.model_validate(params)
    except ValidationError as exc:
        allowed = ", ".join(cls.Config.model_fields) or "no keys"
        raise ValueError(f"{where}method '{name}': {_first_error(exc)}; allowed: {allowed}") from None
    return cls(cfg)


def check_stack(methods: list[Method], mode: str, have: set[str]) -> None:
    """Refuse a stack that cannot run: a mode a method does not support, or a missing need.

    ``have`` names what the run provides: ``alignment`` (an alignment dataset), ``reference``
    (always available: a frozen copy, or the adapter disabled), ``labels`` (a ``contaminated``
    column), ``direction`` (a trait direction).
    """
    hints = {
        "alignment": "set data.alignment to 'organism' or a JSONL / dataset path",
        "labels": "give capability rows a boolean 'contaminated' field",
        "direction": "give the method a trait direction",
        "reference": "the trainer could not build a reference model",
    }
    words = {
        "alignment": "an alignment dataset", "labels": "per-row contamination labels",
        "direction": "a trait direction", "reference": "a reference model",
    }
    seen: set[str] = set()
    for i, m in enumerate(methods):
        if m.name in seen:
            raise ValueError(f"methods[{i}]: '{m.name}' appears twice; give each method once")
        seen.add(m.name)
        if mode not in m.supports:
            raise ValueError(
                f"methods[{i}]: '{m.name}' does not support {mode} training (supports: {', '.join(sorted(m.supports))})"
            )
        for need in sorted(m.requires()):
            if need not in have:
                raise ValueError(f"methods[{i}]: '{m.name}' needs {words[need]} but the run has none; {hints[need]}")
