"""Datasets: list any source once into a `DatasetIndex` (cached as Parquet), open its images.

Spec strings name a dataset:

- built-in names: ``openclipart``, ``fashion-mnist``, ``skimage-photos`` (``fashion-mnist:/dir``
  points a built-in at another copy of its files); spoken: ``openclipart-speech``,
  ``wordnet-speech`` (audio + caption; ``openclipart-speech:N`` keeps N spread items)
- ``table:PATH`` (CSV/TSV/JSONL/JSON/Parquet), ``folder:PATH`` (class subfolders),
  ``wds:PATTERN`` (WebDataset tar shards: a dir, a .tar, a glob or ``{00000..00009}``); each
  takes image and/or audio files (`audio.load_audio` opens audio references)
- ``hf:FOLDER`` (a Hugging Face ``save_to_disk`` folder), ``parquet:PATH`` (Parquet files holding
  encoded images: img2dataset, the Hub); images stay in their cells until extraction reads them
- ``imagenet:PATH`` (a labelled evaluation folder ``PATH/<wnid>/*.JPEG``; option
  ``class_names=`` a JSON or ``LOC_synset_mapping.txt``), ``karpathy:PATH`` (COCO / Flickr30k
  captions in a Karpathy-split JSON; option ``images=`` the image folder)
- a bare existing path, detected by its kind

Names come from two registries: ``DATASETS`` (built-ins by name) and ``DATA_PREFIXES`` (listers
by prefix); add yours with `register_dataset` / `register_dataset_prefix`. Listers are lazy
``"module:function"`` references: importing ``anybind.data`` imports none of them (nor
scikit-image).

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

from ..checks import did_you_mean
from ..errors import DataError
from ..registry import Entry, Registry
from .index import DatasetIndex
from .listing_cache import cache_path, load_cached, source_stamp

IMAGE_CAPTION = {"image": "image", "caption": "text"}

#: built-in datasets by name -> lister; meta: licence, install, sources, needs, package, fields
DATASETS = Registry("dataset")
#: listers by spec prefix ("table:PATH") -> lister taking the location; meta: form, licence, stamp
DATA_PREFIXES = Registry("dataset prefix", plural="dataset prefixes")
#: options that name a file the listing reads: its stamp keys the listing cache too
FILE_OPTIONS = ("class_names",)


def register_dataset(name: str, lister: Any, *, help: str, licence: str, install: str = "",
                     sources: tuple[str, ...] = (), needs: tuple[str, ...] = (), package: str | None = None,
                     fields: dict[str, str] | None = None, replace: bool = False) -> None:
    """Add a dataset listed by name. `lister` (a function, or a lazy "module:function") returns a
    `DatasetIndex` and takes ``root=`` when its files can live elsewhere (``NAME:/dir``).
    `sources` are the files or folders it reads (their size+mtime key the listing cache);
    `needs` python modules it imports instead; `package` a distribution whose version keys the
    cache when the data ships inside it."""
    DATASETS.register(name, lister, help=help, replace=replace, licence=licence, install=install,
                      sources=tuple(sources), needs=tuple(needs), package=package,
                      fields=dict(fields or IMAGE_CAPTION))


def register_dataset_prefix(prefix: str, lister: Any, *, help: str = "", form: str | None = None,
                            licence: str = "", stamp: Any = None, replace: bool = False) -> None:
    """Add a spec prefix: ``PREFIX:LOCATION`` calls ``lister(LOCATION, **options)`` (a function,
    or a lazy "module:function") returning a `DatasetIndex`.

    >>> register_dataset_prefix("mine", "mypkg.data:list_mine")  # doctest: +SKIP
    >>> load_dataset("mine:/path/to/it")  # doctest: +SKIP

    `stamp` (optional, a function or "module:function") maps the location to the files whose
    size+mtime key the listing cache; by default the location itself (a file, or every file
    under a folder)."""
    if not prefix or ":" in prefix:
        raise DataError(f"a dataset prefix is a word before ':', not {prefix!r}")
    DATA_PREFIXES.register(prefix, lister, help=help, replace=replace, form=form or f"{prefix}:PATH",
                           licence=licence, stamp=stamp)


_HERE = __name__  # "anybind.data": built-in listers are registered by their full module path
register_dataset(
    "openclipart", f"{_HERE}.openclipart:list_openclipart",
    help="8,121 clip-art PNGs with captions built from SVG titles, file names and keywords; 22 categories",
    licence="public domain", install="apt-get install openclipart-png openclipart-svg",
    sources=("/usr/share/openclipart",),
)
register_dataset(
    "fashion-mnist", f"{_HERE}.fashion_mnist:list_fashion_mnist",
    help="70,000 28x28 grey clothing images, 10 classes (official train/test kept in the item id)",
    licence="MIT", install="apt-get install dataset-fashion-mnist",
    sources=("/usr/share/datasets/fashion-mnist",),
)
register_dataset(
    "skimage-photos", f"{_HERE}.skimage_photos:list_skimage_photos",
    help="19 sample photos shipped with scikit-image, captioned by hand",
    licence="BSD-3-Clause", install="pip install scikit-image", needs=("skimage",), package="scikit-image",
)
register_dataset(
    "openclipart-speech", f"{_HERE}.spoken:list_openclipart_speech",
    help="openclipart's first captions spoken by espeak-ng (same ids, groups, splits, folds as openclipart; "
         "3 voices for train items); openclipart-speech:N keeps N spread items",
    licence="public domain (speech by espeak-ng)",
    install="apt-get install espeak-ng openclipart-png openclipart-svg",
    sources=("/usr/share/openclipart",), fields={"audio": "audio", "caption": "text"},
)
register_dataset(
    "wordnet-speech", f"{_HERE}.spoken:list_wordnet_speech",
    help="3,000 spread WordNet noun glosses spoken by espeak-ng (item = synset, label = its lexicographer "
         "file); wordnet-speech:N lists N",
    licence="WordNet 3.0 licence (speech by espeak-ng)", install="apt-get install espeak-ng wordnet-base",
    sources=("/usr/share/wordnet/data.noun",), fields={"audio": "audio", "caption": "text"},
)
register_dataset_prefix("table", f"{_HERE}.tables:list_table",
                        help="a table of items: CSV, TSV, JSONL, JSON or Parquet (columns name the fields)")
register_dataset_prefix("folder", f"{_HERE}.folders:list_folder",
                        help="a folder of class sub-folders of images (label = the sub-folder)")
register_dataset_prefix("wds", f"{_HERE}.webdataset:list_webdataset", form="wds:PATTERN",
                        stamp=f"{_HERE}.webdataset:resolve_shards",
                        help="WebDataset tar shards: a folder, a .tar, a glob or {00000..00009}")
register_dataset_prefix("hf", f"{_HERE}.hf_datasets:list_hf", form="hf:FOLDER",
                        help="a Hugging Face datasets folder (save_to_disk; a DatasetDict keeps its splits) or a "
                             "folder of its Hub Parquet files; images read from their cells only when extracted")
register_dataset_prefix("parquet", f"{_HERE}.parquet_images:list_parquet", stamp=f"{_HERE}.parquet_images:resolve_parquet_files",
                        help="Parquet files holding the encoded images (img2dataset output_format=parquet, the HF Hub): "
                             "a file, a folder or a glob; listed without reading an image")
register_dataset_prefix("imagenet", f"{_HERE}.imagenet_folder:list_imagenet_folder",
                        help="a labelled evaluation folder PATH/<wnid>/*.JPEG (option class_names=)",
                        licence="that of the images (ImageNet: non-commercial research)")
register_dataset_prefix("karpathy", f"{_HERE}.karpathy:list_karpathy", form="karpathy:FILE",
                        help="COCO / Flickr30k captions in a Karpathy-split JSON (option images= the folder)",
                        licence="that of the images and captions (COCO: CC BY 4.0 annotations)")


@dataclass
class _Target:
    name: str
    entry: Entry
    args: tuple
    options: dict
    stamp_paths: list


def _lister(entry: Entry):
    """The lister's module and function, looked up on every call (so a patched module is seen)."""
    target = entry.target
    if isinstance(target, str):
        module_name, _, func = target.partition(":")
    else:
        module_name, func = target.__module__, target.__name__
    module = importlib.import_module(module_name)
    found = getattr(module, func, None if isinstance(target, str) else target)
    if found is None:
        raise DataError(f"the {entry.name} lister '{target}' does not exist: {module_name} has no {func}")
    return module, found


def _cache_key_name(entry: Entry) -> str:
    """The lister as the listing cache key names it (built-ins keep their short pre-registry form,
    so listings cached before stay valid)."""
    target = entry.target if isinstance(entry.target, str) else \
        f"{entry.target.__module__}:{entry.target.__qualname__}"
    return target.removeprefix(f"{_HERE}.")


def _detect(path: Path) -> str | None:
    """Which prefix a bare path needs: table, wds or folder (None when it is none of them)."""
    from .tables import TABLE_SUFFIXES

    if path.is_file():
        if path.suffix.lower() in (".parquet", ".pq") and _holds_image_bytes(path):
            return "parquet"
        if path.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        return "wds" if path.suffix.lower() == ".tar" else None
    if path.is_dir():
        from .hf_datasets import is_hf_folder

        if is_hf_folder(path):
            return "hf"
        if any(p.suffix == ".tar" for p in path.iterdir()):
            return "wds"
        shard = next((p for p in sorted(path.iterdir()) if p.suffix == ".parquet"), None)
        if shard is not None and _holds_image_bytes(shard):  # img2dataset output_format=parquet
            return "parquet"
        from .folders import looks_like_folder_dataset

        return "folder" if looks_like_folder_dataset(path) else None
    return None


def _holds_image_bytes(path: Path) -> bool:
    """A Parquet file with a column of encoded images (read from its footer only)."""
    import pyarrow.parquet as pq

    from .parquet_images import holds_images

    try:
        return holds_images(pq.read_schema(path))
    except Exception:  # noqa: BLE001 - not readable as Parquet: the table lister says why
        return False


def _stamp_paths(entry: Entry, location: str, options: dict) -> list:
    """The files whose size+mtime key a prefixed listing: the location (or what the prefix's
    `stamp` makes of it) and any file an option names."""
    stamp = entry.meta.get("stamp")
    if stamp is None:
        paths = [os.path.abspath(os.path.expanduser(location))]
    else:
        stamp_fn = Entry(entry.name, stamp).resolve()
        paths = [str(p) for p in stamp_fn(location)]
    return paths + [os.path.abspath(os.path.expanduser(str(options[k]))) for k in FILE_OPTIONS
                    if options.get(k)]


def _unknown(spec: str) -> DataError:
    prefix, sep, _ = spec.partition(":")
    if sep:
        hint = did_you_mean(f"{prefix}:", [f"{n}:" for n in [*DATASETS.names(), *DATA_PREFIXES.names()]])
    else:
        hint = did_you_mean(spec, DATASETS.names())
    forms = ", ".join(e.meta["form"] for e in DATA_PREFIXES.describe())
    return DataError(f"unknown dataset '{spec}'{hint}: use a built-in ({', '.join(DATASETS.names())}), "
                     f"{forms}, or an existing path (`anybind datasets` lists them)")


def _resolve(spec: str, options: dict) -> _Target:
    if spec in DATASETS:
        entry = DATASETS.entry(spec)
        stamp = [options["root"]] if options.get("root") else list(entry.meta["sources"])
        return _Target(spec, entry, (), dict(options), stamp)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in DATASETS and rest:  # fashion-mnist:/some/dir
        return _Target(prefix, DATASETS.entry(prefix), (), {**options, "root": rest}, [rest])
    if sep and prefix in DATA_PREFIXES and rest:
        entry = DATA_PREFIXES.entry(prefix)
        name = Path(rest.split("{")[0].rstrip("/*")).stem or prefix
        return _Target(f"{prefix}-{name}", entry, (rest,), dict(options), _stamp_paths(entry, rest, options))
    return _resolve(f"{_detect_spec(spec)}:{spec}", options)


def _detect_spec(spec: str) -> str:
    """The prefix a bare path needs, or an error naming what it is not."""
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
    return kind


def _call(lister, args: tuple, options: dict, spec: str) -> DatasetIndex:
    """Call the lister, refusing an option it does not take (named, with what it takes)."""
    params = inspect.signature(lister).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [] if open_ended else [k for k in options if k not in params]
    if unknown:
        accepted = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]
        raise DataError(f"dataset '{spec}' takes no option {', '.join(unknown)}: it takes "
                        f"{', '.join(accepted) or 'none'}{did_you_mean(unknown[0], accepted)}")
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
    module, lister = _lister(target.entry)
    path = cache_path(target.name, _cache_key(spec, target, module), cache)
    if not refresh:
        cached = load_cached(path)
        if cached is not None:
            return cached
    index = _call(lister, target.args, target.options, spec)
    index.meta.setdefault("spec", spec)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-listing next time
        index.save(path)
    return index


def _cache_key(spec: str, target: _Target, module) -> dict:
    key = {
        "spec": spec,
        "lister": _cache_key_name(target.entry),
        "version": getattr(module, "LISTING_VERSION", 1),
        "args": list(target.args),
        "options": target.options,
        "stamp": source_stamp(target.stamp_paths),
    }
    package = target.entry.meta.get("package")
    if package:  # the data ships inside a package: its version is the stamp
        key["stamp"] = _package_version(package)
    return key


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _dataset_installed(entry: Entry) -> bool:
    needs = entry.meta.get("needs", ())
    if any(importlib.util.find_spec(m) is None for m in needs):
        return False
    return all(Path(s).exists() for s in entry.meta.get("sources", ()))


def list_datasets() -> list[dict]:
    """The built-in datasets: name, description, fields, licence, whether installed, how to install."""
    return [
        {
            "name": e.name,
            "description": e.help,
            "fields": dict(e.meta["fields"]),
            "licence": e.meta["licence"],
            "installed": _dataset_installed(e),
            "install": e.meta["install"],
        }
        for e in DATASETS.describe()
    ]


def describe_datasets() -> list[dict]:
    """Every way to name a dataset, for listings and help: the built-ins, then the prefixes.

    Rows: name, spec (what to type), kind ("built-in" or "prefix"), help, licence, installed,
    install."""
    rows = [{"name": r["name"], "spec": r["name"], "kind": "built-in", "help": r["description"],
             "licence": r["licence"], "installed": r["installed"], "install": r["install"]}
            for r in list_datasets()]
    for e in DATA_PREFIXES.describe():
        rows.append({"name": e.name, "spec": e.meta["form"], "kind": "prefix", "help": e.help,
                     "licence": e.meta["licence"] or "that of your data", "installed": _lister_installed(e),
                     "install": ""})
    return rows


def dataset_spec_forms() -> list[str]:
    """What ``--data`` accepts, in words: the built-in names, then the prefix forms."""
    return [*DATASETS.names(), *(e.meta["form"] for e in DATA_PREFIXES.describe())]


def _lister_installed(entry: Entry) -> bool:
    if not isinstance(entry.target, str):
        return True
    try:
        return importlib.util.find_spec(entry.target.partition(":")[0]) is not None
    except (ImportError, ValueError):
        return False


__all__ = ["DATASETS", "DATA_PREFIXES", "DatasetIndex", "describe_datasets", "dataset_spec_forms",
           "list_datasets", "load_dataset", "register_dataset", "register_dataset_prefix"]
