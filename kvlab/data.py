"""Access to the files in ``data/`` (installed as the package ``kvlab._data``).

Nothing else in kvlab opens those files: every loader goes through here, so the notebooks and an
installed wheel read the same bytes. Provenance of every file: ``data/README.md``.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any


def data_path(name: str):
    """A readable path-like object for ``data/<name>`` (works for editable installs and wheels)."""
    return resources.files("kvlab._data").joinpath(name)


def load_json(name: str) -> Any:
    """Parse ``data/<name>`` as JSON."""
    with data_path(name).open("r", encoding="utf-8") as f:
        return json.load(f)
