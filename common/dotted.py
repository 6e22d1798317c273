"""`load_dotted`: the object a `package.module:attr[.attr]` path names — how users plug in their own
reward (reward.name) or feature extractor (eval features) without registering it."""
from __future__ import annotations

import importlib
from typing import Any


def load_dotted(path: str, error: type[Exception], what: str) -> Any:
    """Import `path`'s module and walk its attributes; any failure raises `error` with a message
    starting with `what` (e.g. "reward", "features") and naming the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise error(f"{what}: {path!r} must look like package.module:callable (or be a known name)")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{what}: cannot import module {module_name!r} of {path!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise error(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    return obj
