"""One registry class behind every pluggable part (encoder backends, packaged encoders, datasets,
projectors, losses, baselines, corrections, assessment metrics).

    PROJECTORS = Registry("projector")

    @PROJECTORS.register("mlp", help="two-layer MLP")
    class MLP(Projector): ...

    PROJECTORS.build("mlp", 384, 512, depth=3)   # options checked against MLP's signature
    PROJECTORS.register("heavy", "mypkg.heavy:Heavy")   # lazy: imported on first use

An entry is an object (a class or a function) or a lazy ``"module:attribute"`` reference, so
registering a backend never imports it. A typo gets a did-you-mean; ``names()`` and
``describe()`` feed the CLI's choices and help text.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .checks import did_you_mean
from .errors import AnybindError


class RegistryError(AnybindError, KeyError):
    """An unknown name, an unknown option, or a name registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class Entry:
    name: str
    target: Any  # the object, or a "module:attribute" string until first use
    help: str = ""
    meta: dict = field(default_factory=dict)

    def resolve(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
            self.target = obj
        return self.target


class Registry:
    """Named parts of one kind: register, get, build with checked options, list."""

    def __init__(self, kind: str, *, plural: str | None = None):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, Entry] = {}

    # ---- registering ---------------------------------------------------------------------------
    def register(self, name: str, target: Any = None, *, help: str = "", replace: bool = False, **meta: Any):
        """Register `target` under `name`; without a target, a decorator. ``replace=True``
        lets a user's part take over a built-in name."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} name must be a non-empty string, not {name!r}")

        def add(obj: Any) -> Any:
            known = self._entries.get(name)
            if known is not None and not replace and known.target is not obj and known.target != obj:
                raise RegistryError(f"{self.kind} '{name}' is already registered ({_describe(known.target)}): "
                                    "choose another name, or pass replace=True")
            doc = help or (_first_line(obj.__doc__) if not isinstance(obj, str) else "")
            self._entries[name] = Entry(name, obj, doc, dict(meta))
            if isinstance(obj, type) and hasattr(obj, "registered_name"):
                obj.registered_name = name
            return obj

        return add if target is None else add(target)

    def subclass_decorator(self, name: str, base: type, *, help: str = "", error: type[Exception] = RegistryError,
                           describe: str | None = None, dataclass: bool = False, decorator: str | None = None):
        """A class decorator for parts that subclass `base`: registers the class under `name` and
        sets its ``name`` attribute (what saved parts record to rebuild it). With `dataclass`, only
        dataclasses (their fields are their options) are taken."""
        import dataclasses

        what = describe or (f"dataclass subclasses of {base.__name__}" if dataclass else f"{base.__name__} subclasses")
        decorator = decorator or f"register_{self.kind}"

        def add(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, base)) or (dataclass and not dataclasses.is_dataclass(cls)):
                raise error(f"{decorator}('{name}') decorates {what}, not {cls!r}")
            self.register(name, cls, help=help)  # refuses a name taken by another class
            cls.name = name
            return cls

        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # ---- looking up ----------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"unknown {self.kind} '{name}'{did_you_mean(str(name), self.names())}; "
                                f"registered {self.plural}: {known}") from None

    def get(self, name: str) -> Any:
        """The registered object (imported now if it was registered lazily)."""
        return self.entry(name).resolve()

    def options(self, name: str) -> dict[str, Any]:
        """The keyword options `build` accepts for `name`, with their defaults (empty when the
        part takes ``**kwargs``: it then checks its own)."""
        return signature_options(self.get(name))

    def build(self, name: str, /, *args: Any, **options: Any) -> Any:
        """Call the registered object with `args` and `options`; an option it does not take is
        refused with a did-you-mean and the list of what it accepts."""
        obj = self.get(name)
        check_options(f"{self.kind} '{name}'", obj, options, skip=len(args))
        return obj(*args, **options)

    # ---- listing -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


# ---- option checks against a signature -------------------------------------------------------------
def signature_options(obj: Callable) -> dict[str, Any]:
    """Keyword options of a class (its ``__init__``, or its dataclass fields) or function."""
    params = _parameters(obj)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return {}
    return {p.name: (None if p.default is p.empty else p.default) for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_options(owner: str, obj: Callable, options: dict, skip: int = 0) -> None:
    params = _parameters(obj)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    accepted = [p.name for p in named[skip:]]
    for key in options:
        if key not in accepted:
            raise RegistryError(f"{owner} has no option '{key}'{did_you_mean(key, accepted)}; "
                                f"it accepts: {', '.join(sorted(accepted)) or 'no options'}")


def _parameters(obj: Callable) -> list[inspect.Parameter]:
    target = obj.__init__ if isinstance(obj, type) else obj
    params = list(inspect.signature(target).parameters.values())
    return params[1:] if isinstance(obj, type) else params  # drop self


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip()


def _describe(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
