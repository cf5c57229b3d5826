"""Every error anybind raises on purpose: the message says what went wrong and what to do."""

from __future__ import annotations


class AnybindError(Exception):
    """Base class: catch this to handle any anybind failure."""


class SpecError(AnybindError, ValueError):
    """An encoder or dataset spec string that cannot be parsed or resolved."""


class MissingDependencyError(AnybindError, ImportError):
    """An optional backend is used but its package is not installed."""

    def __init__(self, what: str, package: str, extra: str | None = None):
        if package.startswith("pip install"):  # a full command already (several packages, flags)
            super().__init__(f"{what} is not installed: {package}")
            return
        hint = f"pip install 'anybind[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{what} needs the package '{package}', which is not installed: {hint}")


class DataError(AnybindError):
    """A dataset that cannot be read, or an item that cannot be decoded."""


class StoreError(AnybindError):
    """A feature store that is missing, incomplete, corrupt, or does not match the request."""


class LayerError(AnybindError, KeyError):
    """A layer name the encoder does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
