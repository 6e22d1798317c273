"""Models committed with the repo (models/<name>/), found by name from any working directory.

`model.pretrained: digits` names the folder models/digits of this checkout (resolved from this
file's location, not the current directory); $NABLAGFN_MODELS_DIR points elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODELS = {"digits": {"family": "pixel", "script": "scripts/digits/train_digits_models.py"}}
"""Bundled model name → its model family and the script that (re)builds its folder."""


class BundledModelMissing(FileNotFoundError):
    """A bundled model's folder (or a part of it) is not there; the message says how to build it."""


def bundled_models_root() -> Path:
    env = os.environ.get("NABLAGFN_MODELS_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "models"


def bundled_model_dir(name: str, part: str = "") -> Path:
    """models/<name>[/<part>] of this checkout; BundledModelMissing if it does not exist."""
    if name not in BUNDLED_MODELS:
        raise KeyError(f"no bundled model {name!r}; known: {sorted(BUNDLED_MODELS)}")
    path = bundled_models_root() / name / part if part else bundled_models_root() / name
    if not path.exists():
        raise BundledModelMissing(f"bundled model {name!r}: {path} is missing; rebuild it with "
                                  f"`python {BUNDLED_MODELS[name]['script']}` (or set NABLAGFN_MODELS_DIR)")
    return path
