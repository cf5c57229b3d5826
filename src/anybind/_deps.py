"""Optional imports that fail only when used, with the install command in the message."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def require(module: str, what: str, package: str | None = None, extra: str | None = None) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the pip package and extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name and not module.startswith(e.name.split(".")[0]) and e.name != module:
            raise  # the package is there but one of *its* imports is broken: show that
        raise MissingDependencyError(what, package or module, extra) from e
