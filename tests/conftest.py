"""Shared fixtures: a quick organism built once per session, the default one when asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick builds go to a per-session temp cache so tests never see stale artefacts."""
    return tmp_path_factory.mktemp("tether-cache")


@pytest.fixture(scope="session")
def quick_organism(cache_root: Path) -> Path:
    from tether.organism.build import OrganismConfig, build_organism

    return build_organism(OrganismConfig.quick(), root=cache_root)


@pytest.fixture(scope="session")
def default_organism() -> Path:
    """The default build, from the shared cache ($TETHER_CACHE or ~/.cache/tether)."""
    from tether.organism.build import OrganismConfig, build_organism

    return build_organism(OrganismConfig())
