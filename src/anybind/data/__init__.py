"""Datasets: list any source once into a `DatasetIndex` (cached as Parquet), open its images.

Spec strings name a dataset:

- built-in names: ``openclipart``, ``fashion-mnist``, ``skimage-photos`` (``fashion-mnist:/dir``
  points a built-in at another copy of its files)
- ``table:PATH`` (CSV/TSV/JSONL/JSON/Parquet), ``folder:PATH`` (class subfolders),
  ``wds:PATTERN`` (WebDataset tar shards: a dir, a .tar, a glob or ``{00000..00009}``)
- ``imagenet:PATH`` (a labelled evaluation folder ``PATH/<wnid>/*.JPEG``; option
  ``class_names=`` a JSON or ``LOC_synset_mapping.txt``), ``karpathy:PATH`` (COCO / Flickr30k
  captions in a Karpathy-split JSON; option ``images=`` the image folder)
- a bare existing path, detected by its kind

Listers are imported lazily from the registry (``"module:function"``): importing
``anybind.data`` imports none of them (nor scikit-image).

>>> idx = load_dataset("table:pairs.csv", caption=["caption_1", "caption_2"])  # doctest: +SKIP
>>> idx = load_dataset("openclipart")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .index import DatasetIndex
from .listing_cache import cache_path, load_cached, source_stamp

IMAGE_CAPTION = {"image": "image", "caption": "text"}


@dataclass(frozen=True)
class BuiltinDataset:
    """What `list_datasets` shows about a built-in, and how to list it."""

    lister: str  # "module:function" inside anybind.data
    description: str
    licence: str
    install: str
    sources: tuple[str, ...] = ()  # files or folders it reads (their stamp keys the cache)
    module_needed: str | None = None  # a package it needs instead of files
    fields: tuple[tuple[str, str], ...] = tuple(IMAGE_CAPTION.items())

    def installed(self) -> bool:
        if self.module_needed and importlib.util.find_spec(self.module_needed) is None:
            return False
        return all(Path(s).exists() for s in self.sources)


BUILTINS: dict[str, BuiltinDataset] = {
    "openclipart": BuiltinDataset(
        "openclipart:list_openclipart",
        "8,121 clip-art PNGs with captions built from SVG titles, file names and keywords; 22 categories",
        "public domain",
        "apt-get install openclipart-png openclipart-svg",
        ("/usr/share/openclipart",),
    ),
    "fashion-mnist": BuiltinDataset(
        "fashion_mnist:list_fashion_mnist",
        "70,000 28x28 grey clothing images, 10 classes (official train/test kept in the item id)",
        "MIT",
        "apt-get install dataset-fashion-mnist",
        ("/usr/share/datasets/fashion-mnist",),
    ),
    "skimage-photos": BuiltinDataset(
        "skimage_photos:list_skimage_photos",
        "19 sample photos shipped with scikit-image, captioned by hand",
        "BSD-3-Clause",
        "pip install scikit-image",
        module_needed="skimage",
    ),
}
PREFIXES: dict[str, str] = {
    "table": "tables:list_table",
    "folder": "folders:list_folder",
    "wds": "webdataset:list_webdataset",
    "imagenet": "imagenet_folder:list_imagenet_folder",
    "karpathy": "karpathy:list_karpathy",
}
#: options that name a file the listing reads: its stamp keys the listing cache too
FILE_OPTIONS = ("class_names",)


@dataclass
class _Target:
    name: str
    lister: str
    args: tuple
    options: dict
    stamp_paths: list


def _import(lister: str):
    module_name, _, func = lister.partition(":")
    # a dotted name is the user's own module ("mypkg.data:list_mine"); a bare one is anybind's
    module = importlib.import_module(module_name if "." in module_name else f"{__name__}.{module_name}")
    return module, getattr(module, func)


def _detect(path: Path) -> str | None:
    """Which prefix a bare path needs: table, wds or folder (None when it is none of them)."""
    from .tables import TABLE_SUFFIXES

    if path.is_file():
        if path.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        return "wds" if path.suffix.lower() == ".tar" else None
    if path.is_dir():
        if any(p.suffix == ".tar" for p in path.iterdir()):
            return "wds"
        from .folders import looks_like_folder_dataset

        return "folder" if looks_like_folder_dataset(path) else None
    return None


def _stamp_paths(prefix: str, location: str) -> list:
    if prefix == "wds":
        from .webdataset import resolve_shards

        return [str(p) for p in resolve_shards(location)]
    return [os.path.abspath(os.path.expanduser(location))]


def _unknown(spec: str) -> DataError:
    names = ", ".join(BUILTINS)
    return DataError(
        f"unknown dataset '{spec}': use a built-in ({names}), table:PATH, folder:PATH, "
        "wds:PATTERN, imagenet:PATH, karpathy:PATH, or an existing path"
    )


def _resolve(spec: str, options: dict) -> _Target:
    if spec in BUILTINS:
        entry = BUILTINS[spec]
        stamp = [options["root"]] if options.get("root") else list(entry.sources)
        return _Target(spec, entry.lister, (), dict(options), stamp)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in BUILTINS and rest:  # fashion-mnist:/some/dir
        return _Target(prefix, BUILTINS[prefix].lister, (), {**options, "root": rest}, [rest])
    if sep and prefix in PREFIXES and rest:
        name = Path(rest.split("{")[0].rstrip("/*")).stem or prefix
        stamp = _stamp_paths(prefix, rest) + [
            os.path.abspath(os.path.expanduser(str(options[k])))
            for k in FILE_OPTIONS
            if options.get(k)
        ]
        return _Target(f"{prefix}-{name}", PREFIXES[prefix], (rest,), dict(options), stamp)
    path = Path(spec).expanduser()
    kind = _detect(path) if path.exists() else None
    if kind is None and ("{" in spec or "*" in spec) and spec.endswith(".tar"):
        kind = "wds"
    if kind is None:
        if path.exists():
            raise DataError(
                f"{spec} is neither a table ({', '.join(('.csv', '.tsv', '.jsonl', '.parquet'))}), "
                "tar shards, nor a folder of class subfolders with images"
            )
        raise _unknown(spec)
    return _resolve(f"{kind}:{spec}", options)


def _call(lister, args: tuple, options: dict, spec: str) -> DatasetIndex:
    params = inspect.signature(lister).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [] if open_ended else [k for k in options if k not in params]
    if unknown:
        accepted = [
            p
            for p in params
            if params[p].kind is inspect.Parameter.KEYWORD_ONLY
            or (params[p].default is not inspect.Parameter.empty)
        ]
        raise DataError(
            f"dataset '{spec}' takes no option {', '.join(unknown)}: it takes {', '.join(accepted) or 'none'}"
        )
    return lister(*args, **options)


def load_dataset(
    spec: str, *, cache: str | os.PathLike | None = None, refresh: bool = False, **options: Any
) -> DatasetIndex:
    """List a dataset (or load its cached listing) and return its index.

    The listing is cached under ``<cache root>/datasets/<name>-<hash>.parquet``; the hash covers
    the spec, the options, the lister's version and the size+mtime of the source files, so a
    second call is a Parquet read and an edited source is listed again. ``refresh=True`` forces it.
    """
    spec = os.fspath(spec)
    target = _resolve(spec, options)
    module, lister = _import(target.lister)
    key = {
        "spec": spec,
        "lister": target.lister,
        "version": getattr(module, "LISTING_VERSION", 1),
        "args": list(target.args),
        "options": target.options,
        "stamp": source_stamp(target.stamp_paths),
    }
    if target.lister == BUILTINS["skimage-photos"].lister:
        key["stamp"] = _package_version("scikit-image")
    path = cache_path(target.name, key, cache)
    if not refresh:
        cached = load_cached(path)
        if cached is not None:
            return cached
    index = _call(lister, target.args, target.options, spec)
    index.meta.setdefault("spec", spec)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-listing next time
        index.save(path)
    return index


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def list_datasets() -> list[dict]:
    """The built-in datasets: name, description, fields, licence, whether installed, how to install."""
    return [
        {
            "name": name,
            "description": e.description,
            "fields": dict(e.fields),
            "licence": e.licence,
            "installed": e.installed(),
            "install": e.install,
        }
        for name, e in BUILTINS.items()
    ]


__all__ = ["BUILTINS", "PREFIXES", "DatasetIndex", "list_datasets", "load_dataset"]
