"""`--layers` with `auto`: what every entry point (extract, train, eval, run) resolves a layers
setting with.

The syntax itself is parsed in one place, `anybind.encoders.layers.parse_layers` (which
`Encoder.resolve_layers` uses too); this module adds `auto`, read from an assessment file directly,
so `features` never imports `assess`, and `assess` writes its result where `auto` reads it.

>>> resolve_layers("8,final", ["layer.0", ..., "layer.12", "final"])
['layer.8', 'final']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..config import cache_root
from ..encoders.layers import LayerText, parse_layers
from ..errors import AnybindError

#: where `anybind assess` leaves its latest result, under the cache root
ASSESSMENTS_DIR, LATEST = "assessments", "latest.json"
ASSESSMENT_FILE = "assessment.json"


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

    spec: anything `anybind.encoders.layers.parse_layers` reads (None or "" = ``final``,
    "final", "last", "all", "7,8,final", "-1", a list of names or ints), or "auto": the layers an
    assessment recommends for `encoder` (its spec string), or for the side `modality` of the
    assessment's best pair. `assessment` is an assessment.json, a folder holding one, an
    already-read dict, or None for the cache's latest. With `layers` None the names are only
    canonicalised (no "all", "last" or negative indexes).
    """
    if isinstance(spec, str) and spec.strip() == "auto":
        spec = auto_layers(encoder, assessment, modality=modality, cache=cache)
    return parse_layers(spec, layers, encoder=encoder)


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


def _sides(pair: Mapping) -> list[str]:
    return [k for k, v in pair.items() if isinstance(v, Mapping)]
