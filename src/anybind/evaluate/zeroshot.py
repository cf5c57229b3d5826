"""Zero-shot classification: prompt templates -> class embeddings -> cosine scores -> metrics.

Classifier (as CLIP's zero-shot ImageNet notebook): each class name is put into every prompt
template (``"a photo of a {c}."``), every prompt is embedded and L2-normalised, the prompts of a
class are averaged, and the average is L2-normalised again. An image's score for a class is the
cosine between its embedding and the class embedding.

Metrics (as CLIP_benchmark's ``zeroshot_classification``):

- ``top{k}``: top-k accuracy, the fraction of items whose true class is among the k highest
  scores; k larger than the number of classes C is capped at C (so top-5 on 3 classes is 1.0).
- ``mean_per_class_recall``: for each class present in the labels, the fraction of its items
  whose top-1 prediction is right; then the mean over those classes. This is balanced accuracy
  (sklearn's ``balanced_accuracy_score``): on imbalanced labels it differs from top-1, and a
  model that always answers the majority class gets 1 / (number of classes present).

Ties, one rule, pessimistic (the same as `retrieval`): the true class tied with a wrong class
ranks below it. The 0-based rank of the true class is the number of OTHER classes scoring >= it,
and the item counts at k when that number is < k. (CLIP_benchmark takes the argmax, which breaks
ties by class order; here a model that gives every class the same score scores 0, never a lucky
1/C.)

Template files are JSON lists of strings, each with exactly one ``{c}`` where the class name
goes; built-in sets live in ``anybind/evaluate/templates`` (`available_templates`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import integer
from ..errors import AnybindError

ArrayLike = Any  # numpy array, torch tensor or nested list

PLACEHOLDER = "{c}"
_TEMPLATE_DIR = "templates"


def available_templates() -> list[str]:
    """Names of the built-in template sets (``default``, ``clipart``, ``openai_imagenet``)."""
    folder = resources.files(__package__).joinpath(_TEMPLATE_DIR)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_templates(name_or_path: str = "default") -> list[str]:
    """The prompt templates of a built-in set (by name) or of a JSON file (a list of strings).

    Every template must contain ``{c}`` exactly once; the class name replaces it.
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise AnybindError(
            f"templates must be a built-in name ({', '.join(available_templates())}) or the path "
            f"of a JSON file, not {name_or_path!r}"
        )
    name = str(name_or_path)
    builtin = available_templates()
    if name in builtin:
        text = (
            resources.files(__package__).joinpath(_TEMPLATE_DIR, f"{name}.json").read_text("utf-8")
        )
        source = f"built-in template set '{name}'"
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise AnybindError(
                f"unknown template set '{name}': use one of {', '.join(builtin)}, or the path of a "
                f'JSON file holding a list of templates like ["a photo of a {{c}}."]'
            )
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AnybindError(f"cannot read template file {path}: {e}") from e
        source = f"template file {path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnybindError(
            f'{source} is not valid JSON ({e}): write a list of strings like ["a photo of a {{c}}."]'
        ) from e
    return check_templates(data, source)


def check_templates(templates: Any, source: str = "templates") -> list[str]:
    """Validate a list of templates (non-empty strings, each with exactly one ``{c}``)."""
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Sequence):
        raise AnybindError(
            f'{source} must be a list of strings like ["a photo of a {{c}}."], '
            f"not {type(templates).__name__}"
        )
    if len(templates) == 0:
        raise AnybindError(f'{source} is empty: give at least one template, e.g. "{{c}}"')
    out = []
    for i, t in enumerate(templates):
        if not isinstance(t, str):
            raise AnybindError(f"{source}: template {i} is {t!r}, not a string")
        n = t.count(PLACEHOLDER)
        if n != 1:
            raise AnybindError(
                f"{source}: template {i} {t!r} has {n} '{{c}}' placeholders; each template needs "
                f'exactly one, where the class name goes (e.g. "a photo of a {{c}}.")'
            )
        out.append(t)
    return out


def fill_template(template: str, class_name: str) -> str:
    """The prompt for one class: ``{c}`` replaced by the name (other braces are left alone)."""
    return template.replace(PLACEHOLDER, class_name)


def class_embeddings(
    class_names: Sequence[str],
    embed_text: Callable[[list[str]], Tensor],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """The zero-shot classifier: one unit vector per class, ``[C, D]`` float32.

    For each class, every template filled with the class name is embedded by ``embed_text``
    (a list of strings -> ``[n, D]``), each prompt embedding is L2-normalised, they are averaged
    and the mean is L2-normalised again. Prompts go to ``embed_text`` in batches of ``batch_size``.
    """
    names = _check_class_names(class_names)
    templates = check_templates(templates)
    batch_size = integer("batch_size", batch_size, minimum=1, error=AnybindError)
    prompts = [fill_template(t, c) for c in names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        emb = embed_text(batch)
        emb = torch.as_tensor(np.asarray(emb) if not isinstance(emb, Tensor) else emb)
        if emb.ndim != 2 or emb.shape[0] != len(batch) or emb.shape[1] == 0:
            raise AnybindError(
                f"embed_text must return one row per prompt, [{len(batch)}, D], but returned "
                f"shape {tuple(emb.shape)} for {len(batch)} prompts"
            )
        if chunks and emb.shape[1] != chunks[0].shape[1]:
            raise AnybindError(
                f"embed_text returned dimension {emb.shape[1]} after {chunks[0].shape[1]}: "
                "it must give every prompt the same dimension"
            )
        emb = emb.detach().float()
        if not bool(torch.isfinite(emb).all()):
            raise AnybindError("embed_text returned NaN or infinite values: check the text encoder")
        chunks.append(F.normalize(emb, dim=1))
    per_prompt = torch.cat([c.to(chunks[0].device) for c in chunks])
    per_class = per_prompt.reshape(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=1)


def zeroshot_classify(image_emb: ArrayLike, class_emb: ArrayLike) -> Tensor:
    """Cosine scores ``[N, C]`` between images ``[N, D]`` and class embeddings ``[C, D]``."""
    img = _matrix("image_emb", image_emb)
    cls = _matrix("class_emb", class_emb)
    if img.shape[1] != cls.shape[1]:
        raise AnybindError(
            f"image_emb has dimension {img.shape[1]} but class_emb {cls.shape[1]}: both must be "
            "in the same (aligned) space; project the images or use the matching text encoder"
        )
    cls = cls.to(img.device)
    return F.normalize(img, dim=1) @ F.normalize(cls, dim=1).T


def true_class_rank(scores: ArrayLike, labels: ArrayLike) -> Tensor:
    """Per item, the 0-based rank of its true class: other classes scoring >= it (ties pessimistic)."""
    s = _matrix("scores", scores)
    y = _labels(labels, s.shape[0], s.shape[1]).to(s.device)
    true = s.gather(1, y[:, None])
    return (s >= true).sum(dim=1) - 1


def classification_metrics(
    scores: ArrayLike, labels: ArrayLike, ks: Iterable[int] = (1, 5)
) -> dict[str, Any]:
    """Top-k accuracy, mean per-class recall (balanced accuracy) and per-class recall.

    ``scores`` is ``[N, C]`` (any scores, higher = more likely), ``labels`` the N true class
    indices in ``[0, C)``. Returns ``top{k}`` for each k (k capped at C), ``mean_per_class_recall``,
    ``per_class_recall`` (``{class index: recall}`` for the classes present in ``labels``),
    ``n`` and ``num_classes``. Ties count against the model (see the module docstring).
    """
    ks = _check_ks(ks)
    s = _matrix("scores", scores)
    n, num_classes = s.shape
    y = _labels(labels, n, num_classes).to(s.device)
    rank = true_class_rank(s, y)
    out: dict[str, Any] = {}
    for k in ks:
        out[f"top{k}"] = float((rank < min(k, num_classes)).double().mean())
    correct = (rank == 0).double()
    per_class = {}
    for c in torch.unique(y).tolist():
        per_class[int(c)] = float(correct[y == c].mean())
    out["mean_per_class_recall"] = float(np.mean(list(per_class.values())))
    out["per_class_recall"] = per_class
    out["n"] = int(n)
    out["num_classes"] = int(num_classes)
    return out


def chance_metrics(
    labels: ArrayLike, num_classes: int, ks: Iterable[int] = (1, 5)
) -> dict[str, Any]:
    """What a model that knows nothing scores, to print beside real results.

    - ``chance_top{k}``: a uniformly random ranking, ``min(k, C) / C``;
    - ``chance_mean_per_class_recall``: a uniformly random guess, ``1 / C`` (any label mix);
    - ``majority_top1``: always answering the most frequent label (ties: the lowest index),
      its share of the items;
    - ``majority_mean_per_class_recall``: the same guess scored by balanced accuracy, one class
      at recall 1 and the others at 0, i.e. ``1 / (classes present in labels)`` (``1 / C`` when
      every class occurs);
    - ``majority_class``: that label.
    """
    ks = _check_ks(ks)
    c = integer("num_classes", num_classes, minimum=1, error=AnybindError)
    y = _labels(labels, None, c)
    counts = torch.bincount(y, minlength=c)
    majority = int(torch.argmax(counts))
    out: dict[str, Any] = {f"chance_top{k}": min(k, c) / c for k in ks}
    out["chance_mean_per_class_recall"] = 1 / c
    out["majority_class"] = majority
    out["majority_top1"] = float(counts[majority]) / len(y)
    out["majority_mean_per_class_recall"] = 1 / int((counts > 0).sum())
    return out


def zeroshot_evaluate(
    image_emb: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    embed_text: Callable[[list[str]], Tensor],
    templates: str | Sequence[str] = "default",
    ks: Iterable[int] = (1, 5),
    batch_size: int = 256,
) -> dict[str, Any]:
    """Zero-shot classification end to end: build the classifier, score the images, measure.

    ``templates`` is a built-in set name, a JSON file path, or a list of templates. Returns the
    `classification_metrics` plus ``chance`` (`chance_metrics`), ``templates`` (the set's name or
    ``"custom"``) and ``num_templates``.
    """
    if isinstance(templates, (str, Path)):
        template_list, template_name = load_templates(str(templates)), str(templates)
    else:
        template_list, template_name = check_templates(templates), "custom"
    names = _check_class_names(class_names)
    img = _matrix("image_emb", image_emb)
    _labels(labels, img.shape[0], len(names))  # fail before embedding any text
    cls = class_embeddings(names, embed_text, template_list, batch_size=batch_size)
    scores = zeroshot_classify(img, cls)
    out = classification_metrics(scores, labels, ks=ks)
    out["chance"] = chance_metrics(labels, len(names), ks=ks)
    out["templates"] = template_name
    out["num_templates"] = len(template_list)
    return out


# ---------------------------------------------------------------------------- checks


def _check_class_names(class_names: Any) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise AnybindError(
            f"class_names must be a list of strings, one per class index, not "
            f"{type(class_names).__name__}"
        )
    if len(class_names) == 0:
        raise AnybindError("class_names is empty: give one name per class, in label-index order")
    for i, c in enumerate(class_names):
        if not isinstance(c, str) or not c.strip():
            raise AnybindError(f"class name {i} is {c!r}: every class needs a non-empty name")
    return list(class_names)


def _matrix(what: str, x: ArrayLike) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise AnybindError(f"{what} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise AnybindError(f"{what} must hold numbers, not {t.dtype}")
    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        raise AnybindError(f"{what} contains NaN or infinite values: check the encoder output")
    return t


def _labels(labels: ArrayLike, n: int | None, num_classes: int) -> Tensor:
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if y.ndim != 1 or y.shape[0] == 0:
        raise AnybindError(
            f"labels must be a non-empty 1-D array of class indices, got shape {tuple(y.shape)}"
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise AnybindError(f"labels must hold integer class indices, not {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise AnybindError(
            f"there are {y.shape[0]} labels for {n} images: give one label per image"
        )
    y = y.long()
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        first = int(y[bad][0])
        raise AnybindError(
            f"label {first} is out of range for {num_classes} classes: labels must be class "
            f"indices in [0, {num_classes - 1}], in the order of class_names"
        )
    return y


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = list(ks)
    if not ks:
        raise AnybindError("ks is empty: give the k of top-k accuracy, e.g. (1, 5)")
    return [integer("k", k, minimum=1, error=AnybindError) for k in ks]
