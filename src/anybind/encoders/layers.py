"""The `--layers` syntax: the one parser from what a user typed to canonical layer names.

An encoder's layers are ``layer.0`` (embeddings) ... ``layer.L`` (last block) and ``final`` (its
output embedding). Users name them as a comma list ("7,8,final"), a number ("8" = ``layer.8``),
the last block ("last", "-1", "layer.-1"; "-2" the one before), "all", or a list of names and
ints. `parse_layers` reads all of these; `Encoder.resolve_layers` calls it with the encoder's
names, `anybind.features.layers.resolve_layers` adds "auto" (an assessment's recommendation),
and `anybind.run` checks a run file's syntax with it before any encoder is loaded. Pure Python:
no torch, so any layer may use it.

>>> parse_layers("8,final", ["layer.0", ..., "layer.12", "final"])
['layer.8', 'final']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..checks import did_you_mean
from ..errors import AnybindError, LayerError

#: what `layers` accepts: a comma list, a list of names / ints, or None (``final``)
LayerText = str | int | Sequence[str | int] | None
#: words a layer list may hold besides ``layer.N`` and numbers ("all" and "auto" stand alone)
KEYWORDS = ("final", "last", "all", "auto")
ALONE = ("all", "auto")
_NUMBER = re.compile(r"-?\d+")
_BLOCK = re.compile(r"layer\.\d+")
_FROM_END = re.compile(r"layer\.-\d+")  # layer.-1 = the last block
_SYNTAX = re.compile(r"layer\.-?\d+|final|last")
_HOW = "give layer numbers or names (8, layer.8, -1, last, final), all, or auto"


def parse_layers(spec: LayerText, names: Iterable[str] | None = None, *, encoder: str | None = None,
                 syntax_only: bool = False) -> list[str]:
    """Canonical layer names for `spec`, in order, duplicates dropped.

    spec: None, "" or [] (``["final"]``), "all", "auto", a comma list ("3, 8,final", "last,-2"),
    an int, or a list of names and ints. names: the layers that exist (an encoder's or a store's):
    every name is checked against them, and "all", "last" and negative indexes are resolved from
    them. Without names the names are only canonicalised ("8" -> "layer.8"; "all", "last" and
    negatives then raise LayerError). syntax_only: check the syntax alone and keep "all", "auto",
    "last" and negatives as written (``layer.-1``), for settings checked before an encoder loads.
    "auto" raises AnybindError unless syntax_only: it needs an assessment, which
    `anybind.features.layers.resolve_layers` reads. `encoder` names the encoder in messages.
    """
    tokens = layer_tokens(spec)
    known = list(names) if names is not None else None
    if len(tokens) == 1 and tokens[0] in ALONE:
        if syntax_only:
            return tokens
        if tokens[0] == "auto":
            raise AnybindError("layers 'auto' read an assessment (`anybind assess`; --assessment FILE): "
                               "give layer names instead, or resolve auto with anybind.features.resolve_layers")
        return list(_need(known, "all", encoder))
    out: list[str] = []
    for token in tokens:
        name = canonical_name(token, known, encoder, syntax_only=syntax_only)
        if name not in out:
            out.append(name)
    return out or ["final"]


def layer_tokens(spec: LayerText) -> list[str]:
    """The items of a layers setting: a comma (or space) list split, an int or a list as text."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [t for t in re.split(r"[,\s]+", spec.strip()) if t]
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [str(spec)]
    return [str(item).strip() for item in spec]


def canonical_name(item: str | int, names: list[str] | None = None, encoder: str | None = None, *,
                   syntax_only: bool = False) -> str:
    """One layer: '8' -> 'layer.8'; 'last', '-1', 'layer.-1' -> the last block of `names`;
    checked against `names` when given, else against the syntax."""
    text = str(item).strip()
    if _NUMBER.fullmatch(text):
        text = f"layer.{text}"
    if text in ALONE:
        raise LayerError(f"'{text}' stands alone: give {text} by itself, not in a list of layers")
    if names is None or syntax_only:
        if not _SYNTAX.fullmatch(text):
            raise LayerError(f"'{item}' is not a layer{did_you_mean(text, KEYWORDS)}: {_HOW}")
        if syntax_only:
            return text
    if text == "last" or _FROM_END.fullmatch(text):
        blocks = last_block(_need(names, text, encoder))
        back = 1 if text == "last" else -int(text.split(".", 1)[1])
        text = f"layer.{blocks + 1 - back}"
    if names is not None and text not in names:
        hint = "" if re.fullmatch(r"layer\.-?\d+", text) else did_you_mean(text, names)  # a typo, not a range
        raise LayerError(f"{encoder or 'the encoder'} has no layer '{item}': it has {describe_layers(names)}{hint}")
    return text


def last_block(names: Iterable[str]) -> int:
    """L, the index of the last block (``layer.L``) among canonical names."""
    return max((int(n.split(".")[1]) for n in names if _BLOCK.fullmatch(n)), default=0)


def describe_layers(names: Sequence[str]) -> str:
    """'layer.0 ... layer.12 and final': the names, a long run of blocks shortened."""
    blocks = [n for n in names if _BLOCK.fullmatch(n)]
    others = [n for n in names if n not in blocks]
    parts = ([f"layer.0 ... layer.{last_block(blocks)}"] if len(blocks) > 2 else blocks) + others
    return " and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else (parts[0] if parts else "none")


def _need(names: list[str] | None, what: str, encoder: str | None) -> list[str]:
    if names is None:
        raise LayerError(f"layers '{what}' need the layer names of {encoder or 'the encoder'}: "
                         "name the layers (layer.N or final) instead")
    return names
