"""`--layers`: the one place user text becomes canonical layer names.

Every entry point (extract, train, run) passes what the user typed and the names the encoder (or
store) has; `auto` reads an assessment file directly, so `features` never imports `assess`.

>>> resolve_layers("8,final", ["layer.0", ..., "layer.12", "final"])
['layer.8', 'final']
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..checks import did_you_mean
from ..config import cache_root
from ..errors import AnybindError, LayerError

#: where `anybind assess` leaves its latest result, under the cache root
ASSESSMENTS_DIR, LATEST = "assessments", "latest.json"
ASSESSMENT_FILE = "assessment.json"

LayerText = str | Sequence[str | int] | None


def resolve_layers(
    spec: LayerText,
    layers: Iterable[str] | Mapping[str, int] | None = None,
    assessment: str | os.PathLike | Mapping | None = None,
    modality: str | None = None,
    *,
    encoder: str | None = None,
    cache: str | os.PathLike | None = None,
) -> list[str]:
    """Canonical layer names for `spec`, checked against `layers` (an encoder's or store's names).

    spec: None or "" (the default: ``final``), "final", "last" (the last block), "all", a comma
    list ("7,8,final", "-1" = the last block, "8" = "layer.8"), a list of names or ints, or
    "auto": the layers an assessment recommends for `encoder` (its spec string), or for the
    side `modality` of the assessment's best pair. `assessment` is an assessment.json, a folder
    holding one, an already-read dict, or None for the cache's latest. With `layers` None the
    names are only canonicalised (no "all", "last" or negative indexes).
    """
    names = list(layers) if layers is not None else None
    if isinstance(spec, str):
        text = spec.strip()
        if text == "auto":
            spec = auto_layers(encoder, assessment, modality=modality, cache=cache)
        elif text == "all":
            return list(_need(names, "all", encoder))
        else:
            spec = [s for s in re.split(r"[,\s]+", text) if s]
    if not spec:
        return ["final"]
    out: list[str] = []
    for item in spec:
        name = canonical_name(item, names, encoder)
        if name not in out:
            out.append(name)
    return out


def canonical_name(item: str | int, names: list[str] | None = None, encoder: str | None = None) -> str:
    """One layer: '8' -> 'layer.8', 'last' / '-1' / 'layer.-1' -> the last block; checked
    against `names` when given."""
    text = str(item).strip()
    if re.fullmatch(r"-?\d+", text):
        text = f"layer.{text}"
    if text == "last" or re.fullmatch(r"layer\.-\d+", text):
        blocks = last_block(_need(names, text, encoder))
        back = 1 if text == "last" else -int(text.split(".", 1)[1])
        text = f"layer.{blocks + 1 - back}"
    if names is not None and text not in names:
        hint = "" if re.fullmatch(r"layer\.-?\d+", text) else did_you_mean(text, names)  # a typo, not a range
        raise LayerError(f"{encoder or 'the encoder'} has no layer '{item}': it has {_describe(names)}{hint}")
    return text


def last_block(names: Iterable[str]) -> int:
    """L, the index of the last block (``layer.L``) among canonical names."""
    return max((int(n.split(".")[1]) for n in names if re.fullmatch(r"layer\.\d+", n)), default=0)


def auto_layers(encoder: str | None, assessment: str | os.PathLike | Mapping | None = None, *,
                modality: str | None = None, cache: str | os.PathLike | None = None) -> list[str]:
    """The layers an assessment recommends: for the encoder spec `encoder`, else for the
    `modality` side of its best pair."""
    data, where = read_assessment(assessment, cache)
    rec = data.get("recommendation", {})
    per_encoder = rec.get("encoders", {})
    if encoder is not None and str(encoder) in per_encoder:
        return list(per_encoder[str(encoder)]["layers"])
    pair = rec.get("pair", {})
    if encoder is None and modality in pair:
        return list(pair[modality]["layers"])
    if encoder is None:
        raise AnybindError(f"--layers auto: name the encoder (or the side: {', '.join(_sides(pair)) or 'none'}) "
                           f"whose recommendation to read from the assessment {where}")
    raise AnybindError(f"the assessment {where} did not score {encoder} (it scored "
                       f"{', '.join(per_encoder) or 'nothing'}): assess it first, or name the layers")


def read_assessment(assessment: str | os.PathLike | Mapping | None = None,
                    cache: str | os.PathLike | None = None) -> tuple[dict, str]:
    """(the assessment dict, where it came from) from a file, a folder, a dict, or the cache."""
    if isinstance(assessment, Mapping):
        return dict(assessment), "given"
    path = Path(assessment) if assessment else latest_assessment_path(cache)
    if path.is_dir():
        path = path / ASSESSMENT_FILE
    if not path.exists():
        raise AnybindError(f"--layers auto needs an assessment, and {path} does not exist: run `anybind assess` "
                           "first (or pass --assessment FILE)")
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, ValueError) as e:
        raise AnybindError(f"{path} is not a readable assessment ({e}): run `anybind assess` again") from e


def latest_assessment_path(cache: str | os.PathLike | None = None) -> Path:
    """Where `anybind assess` writes its latest result for `--layers auto`."""
    return cache_root(cache) / ASSESSMENTS_DIR / LATEST


def _need(names: list[str] | None, what: str, encoder: str | None) -> list[str]:
    if names is None:
        raise LayerError(f"layers '{what}' need the layer names of {encoder or 'the encoder'}: "
                         "name the layers (layer.N or final) instead")
    return names


def _describe(names: list[str]) -> str:
    blocks = [n for n in names if re.fullmatch(r"layer\.\d+", n)]
    others = [n for n in names if n not in blocks]
    parts = ([f"layer.0 ... layer.{last_block(blocks)}"] if len(blocks) > 2 else blocks) + others
    return " and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else (parts[0] if parts else "none")


def _sides(pair: Mapping) -> list[str]:
    return [k for k, v in pair.items() if isinstance(v, Mapping)]
