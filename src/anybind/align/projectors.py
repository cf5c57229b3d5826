"""Projectors: the small trainable heads that map frozen encoder features into the shared space.

A registry keyed by short names, so recipes name a projector and a saved one is a folder that
names its registered kind next to its weights (`anybind.saving`: ``config.json`` +
``weights.safetensors``), never an import path or a pickle::

    proj = build_projector("star", in_dim=384, out_dim=512)
    z = proj(features)            # [B, 512], not normalised: the losses normalise
    proj.save("runs/s1/image")
    same = Projector.load("runs/s1/image")

Registered kinds: ``linear``, ``mlp``, ``star`` (SAIL), ``lowrank`` (STRUCTURE's residual
low-rank head) and ``layermix`` (several cached layers of one encoder, softmax-weighted).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks, saving
from ..errors import AnybindError
from ..registry import Registry
from .linalg import covariance, eig_desc

KIND = "projector"  # the saved-part kind

P = TypeVar("P", bound="Projector")

#: name -> projector class; filled by `register_projector`.
PROJECTORS = Registry("projector")


class ProjectorError(AnybindError, ValueError):
    """A projector built with a bad option, fed the wrong features, or a damaged saved one."""


def register_projector(name: str, *, help: str = "") -> Callable[[type[P]], type[P]]:
    """Class decorator: make a `Projector` subclass buildable and loadable by `name`."""
    return PROJECTORS.subclass_decorator(name, Projector, help=help, error=ProjectorError)


def projector_options(name: str) -> dict[str, Any]:
    """The options a registered projector accepts, with their defaults (not in_dim, out_dim)."""
    return dict(list(PROJECTORS.options(name).items())[2:])  # every projector takes (in_dim, out_dim, ...)


def build_projector(name: str, in_dim: int | list[int], out_dim: int, **options: Any) -> Projector:
    """Build a registered projector by name; an option it does not take is refused.

    >>> build_projector("mlp", 384, 256, depth=3).config["depth"]
    3
    """
    return PROJECTORS.build(name, in_dim, out_dim, **options)


class Projector(nn.Module):
    """Base class: maps features of one encoder to ``[B, out_dim]`` (not normalised).

    Subclasses take their options as keyword-only ``__init__`` arguments (that is how
    `build_projector` knows which ones exist) and pass the resolved values to
    ``super().__init__`` so that `config` rebuilds exactly the same architecture.
    """

    name: ClassVar[str] = ""
    #: True for projectors that read several layers (``in_dim`` is then a list of dims).
    takes_layers: ClassVar[bool] = False

    def __init__(self, in_dim: int | list[int], out_dim: int, options: Mapping[str, Any] | None = None):
        super().__init__()
        if not self.name or self.name not in PROJECTORS or PROJECTORS.get(self.name) is not type(self):
            raise ProjectorError(f"{type(self).__qualname__} is not registered: decorate it with "
                                 "@register_projector('some-name')")
        self.in_dim = _check_in_dim(self.name, in_dim, self.takes_layers)
        self.out_dim = _positive_int(f"projector '{self.name}': out_dim", out_dim)
        self._options = dict(options or {})

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this projector: ``{"name", "in_dim", "out_dim", **options}``."""
        in_dim = list(self.in_dim) if isinstance(self.in_dim, list) else self.in_dim
        return {"name": self.name, "in_dim": in_dim, "out_dim": self.out_dim, **self._options}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "name")

    @property
    def fits_inputs(self) -> bool:
        """True when the projector derives something from its training inputs before training
        (then the trainer calls `fit_inputs` once with the training split's features)."""
        return False

    def fit_inputs(self, x: Tensor | list[Tensor]) -> None:
        """Fit what the projector derives from its training inputs; nothing by default."""

    def _prepare(self, x: Tensor) -> Tensor:
        """Check the feature dimension and cast to the weights' dtype (stores hold fp16)."""
        if not isinstance(x, Tensor):
            raise ProjectorError(f"projector '{self.name}' takes a tensor [B, {self.in_dim}], not {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise ProjectorError(f"projector '{self.name}' expects features of dimension {self.in_dim}, got shape "
                                 f"{tuple(x.shape)}: the store or layer differs from the one it was built for")
        dtype = next(self.parameters()).dtype
        return x if x.dtype == dtype else x.to(dtype)

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the saved part: ``config.json`` (name, in/out dims, options) and ``weights.safetensors``."""
        in_dim = list(self.in_dim) if isinstance(self.in_dim, list) else self.in_dim
        return saving.save_part(directory, KIND, self.name, options=self._options, tensors=self.state_dict(),
                                in_dim=in_dim, out_dim=self.out_dim)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Projector:
        """Rebuild a saved projector from its folder (kind from ``config.json``, strict weights load)."""
        directory = Path(directory)
        config, state = saving.read_part(directory, KIND)
        try:
            name, in_dim, out_dim = config["name"], config["in_dim"], config["out_dim"]
            options = dict(config["options"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProjectorError(f"{directory / saving.CONFIG_FILE} is damaged (no {e}): save the projector again") from e
        projector = build_projector(name, in_dim, out_dim, **options)
        if cls is not Projector and not isinstance(projector, cls):
            raise ProjectorError(f"{directory} holds a '{name}' projector, not a {cls.__qualname__}: "
                                 "load it with Projector.load")
        _load_weights(projector, state, directory)
        return projector


# ---- the registered projectors ---------------------------------------------------------------------
@register_projector("linear")
class LinearProjector(Projector):
    """One linear map: the simplest projector (STRUCTURE's and many baselines' choice)."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True):
        bias = checks.flag("projector 'linear': bias", bias, error=ProjectorError)
        super().__init__(in_dim, out_dim, {"bias": bias})
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self._prepare(x))


@register_projector("mlp")
class MLPProjector(Projector):
    """LayerNorm (optional), then `depth` Linear layers with GELU and dropout between them.

    ``hidden_dim`` defaults to ``2 * max(in_dim, out_dim)``: wide enough not to be a bottleneck
    on either side, small enough to stay cheap next to the frozen encoders (freeze-align's MLP).

    ``pca: k`` first projects the features onto their k leading principal directions on the
    training split (fixed buffers, fitted once by `fit_inputs` before training; as "Escaping
    Plato's Cave" does before aligning), ``pca_whiten`` also scales each direction to unit variance.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        depth: int = 2,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        layernorm: bool = True,
        pca: int | None = None,
        pca_whiten: bool = False,
    ):
        depth = _positive_int("projector 'mlp': depth", depth)
        if pca is not None:
            pca = _positive_int("projector 'mlp': pca", pca)
            if pca > _positive_int("projector 'mlp': in_dim", in_dim):
                raise ProjectorError(f"projector 'mlp': pca {pca} exceeds the input dimension {in_dim}")
        pca_whiten = checks.flag("projector 'mlp': pca_whiten", pca_whiten, error=ProjectorError)
        if hidden_dim is None:
            hidden_dim = 2 * max(
                _positive_int("projector 'mlp': in_dim", in_dim),
                _positive_int("projector 'mlp': out_dim", out_dim),
            )
        hidden_dim = _positive_int("projector 'mlp': hidden_dim", hidden_dim)
        dropout = _dropout("projector 'mlp': dropout", dropout)
        layernorm = checks.flag("projector 'mlp': layernorm", layernorm, error=ProjectorError)
        super().__init__(
            in_dim,
            out_dim,
            {"depth": depth, "hidden_dim": hidden_dim, "dropout": dropout, "layernorm": layernorm,
             "pca": pca, "pca_whiten": pca_whiten},
        )
        self.pca = None if pca is None else PrincipalSubspace(in_dim, pca, whiten=pca_whiten)
        first = in_dim if pca is None else pca
        dims = [first] + [hidden_dim] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = [nn.LayerNorm(first)] if layernorm else []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers += [nn.GELU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self._prepare(x)
        return self.net(x if self.pca is None else self.pca(x))

    @property
    def fits_inputs(self) -> bool:
        return self.pca is not None

    def fit_inputs(self, x: Tensor) -> None:
        """Fit the principal subspace (with `pca`) on the training split's features."""
        if self.pca is not None:
            self.pca.fit(self._prepare(x))


class PrincipalSubspace(nn.Module):
    """x -> (x - mean) @ basis [/ sqrt(variance)]: the k leading principal directions of the data
    `fit` saw. Buffers, not parameters: saved with the weights, never trained."""

    def __init__(self, in_dim: int, k: int, *, whiten: bool = False):
        super().__init__()
        self.whiten = whiten
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("basis", torch.zeros(in_dim, k))
        self.register_buffer("scale", torch.ones(k))
        self.register_buffer("fitted_rows", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        k = self.basis.shape[1]
        if x.ndim != 2 or len(x) < 2:
            raise ProjectorError(f"projector 'mlp': pca needs at least 2 training rows, got shape {tuple(x.shape)}")
        x64 = x.detach().cpu().double().numpy()
        mean = x64.mean(0)
        vals, vecs = eig_desc(covariance(x64 - mean))  # signs fixed: a fit is reproducible
        values, vectors = torch.from_numpy(vals[:k].copy()), torch.from_numpy(vecs[:, :k].copy())
        self.mean.copy_(torch.from_numpy(mean).to(self.mean.dtype))
        self.basis.copy_(vectors.to(self.basis.dtype))
        # whitening floors each variance at 1e-6 of the largest: a near-empty direction is not blown up
        floor = values[0].clamp_min(1e-12) * 1e-6
        self.scale.copy_((values.clamp_min(floor).rsqrt() if self.whiten else torch.ones(k)).to(self.scale.dtype))
        self.fitted_rows.fill_(len(x))

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and int(self.fitted_rows) == 0:
            raise ProjectorError("projector 'mlp' with pca was never fitted: train it (the trainer calls "
                                 "fit_inputs on the training split) or load a trained one")
        return ((x - self.mean) @ self.basis) * self.scale


@register_projector("star")
class StarProjector(Projector):
    """SAIL's gated "star" MLP: ``g(ReLU6(W1 x) * W2 x)`` after a LayerNorm.

    The element-wise product of two projections gives the head second-order (multiplicative)
    features at the cost of an MLP; SAIL uses a hidden width of 8x the input (``hidden_mult``).
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_mult: float = 8.0):
        hidden_mult = checks.positive("projector 'star': hidden_mult", hidden_mult, error=ProjectorError)
        super().__init__(in_dim, out_dim, {"hidden_mult": hidden_mult})
        hidden = max(1, round(in_dim * hidden_mult))
        self.norm = nn.LayerNorm(in_dim)
        self.w1 = nn.Linear(in_dim, hidden)
        self.w2 = nn.Linear(in_dim, hidden)
        self.g = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self._prepare(x))
        return self.g(F.relu6(self.w1(x)) * self.w2(x))


@register_projector("lowrank")
class LowRankProjector(Projector):
    """STRUCTURE's residual low-rank head: ``P x + a * U GELU(D x)``.

    ``P`` (in -> out) starts orthogonal, so training starts from a projection that keeps the
    input geometry; the residual ``U GELU(D x)`` (in -> rank -> out) adds a cheap non-linear
    correction, scaled by a learnable gate ``a = sigmoid(s)`` in (0, 1).

    The gate starts at ``gate_init`` (0.1) and ``U`` at PyTorch's default (not zero): with a gate
    of exactly 0 or a zero ``U``, the gate and ``U`` would get no gradient and the residual could
    never switch on, which is what a zero-initialised gate does in the reference code.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        rank: int = 32,
        gate_init: float = 0.1,
        dropout: float = 0.0,
    ):
        rank = _positive_int("projector 'lowrank': rank", rank)
        gate_init = checks.number("projector 'lowrank': gate_init", gate_init, error=ProjectorError)
        if not 0.0 < gate_init < 1.0:
            raise ProjectorError(
                f"projector 'lowrank': gate_init must be strictly between 0 and 1 (the gate is a "
                f"sigmoid; 0 would stop it learning), not {gate_init}"
            )
        dropout = _dropout("projector 'lowrank': dropout", dropout)
        super().__init__(
            in_dim, out_dim, {"rank": rank, "gate_init": gate_init, "dropout": dropout}
        )
        self.skip = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.orthogonal_(self.skip.weight)
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.gate_logit = nn.Parameter(torch.tensor(math.log(gate_init / (1.0 - gate_init))))

    def gate(self) -> Tensor:
        """The residual's current weight, in (0, 1)."""
        return torch.sigmoid(self.gate_logit)

    def forward(self, x: Tensor) -> Tensor:
        x = self._prepare(x)
        residual = self.up(self.dropout(F.gelu(self.down(x))))
        return self.skip(x) + self.gate() * residual


@register_projector("layermix")
class LayerMixProjector(Projector):
    """Reads several cached layers of one encoder and mixes them with learnable softmax weights.

    Each layer gets its own LayerNorm (layers differ in scale by orders of magnitude) and its own
    Linear straight to ``out_dim``; the outputs are summed with ``softmax(w)`` weights (``w``
    starts at zero: uniform). So it is a linear projector over the normalised layers whose
    per-layer weights are readable with `layer_weights` (which layers did training use?).
    ``in_dim`` is the list of per-layer dims, in the order `forward` receives them.
    """

    takes_layers = True

    def __init__(self, in_dim: list[int], out_dim: int):
        super().__init__(in_dim, out_dim, {})
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in self.in_dim)
        self.heads = nn.ModuleList(nn.Linear(d, out_dim) for d in self.in_dim)
        self.mix_logits = nn.Parameter(torch.zeros(len(self.in_dim)))

    def layer_weights(self) -> Tensor:
        """Softmax weights over the layers (sums to 1), for reports."""
        return torch.softmax(self.mix_logits, dim=0)

    def forward(self, x: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        layers = self._layers(x)
        weights = self.layer_weights()
        out = None
        for i, (h, norm, head) in enumerate(zip(layers, self.norms, self.heads)):
            y = weights[i] * head(norm(h))
            out = y if out is None else out + y
        return out

    def _layers(self, x: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> list[Tensor]:
        if isinstance(x, Tensor):
            x = [x]
        elif isinstance(x, Mapping):
            x = list(x.values())
        elif not isinstance(x, Sequence):
            raise ProjectorError(
                f"projector 'layermix' takes a list (or dict, in layer order) of {len(self.in_dim)} "
                f"tensors, not {type(x).__name__}"
            )
        if len(x) != len(self.in_dim):
            raise ProjectorError(
                f"projector 'layermix' was built for {len(self.in_dim)} layers (dims {self.in_dim}) "
                f"but got {len(x)}: give the same layers, in the same order"
            )
        dtype = self.mix_logits.dtype
        out = []
        for i, (h, d) in enumerate(zip(x, self.in_dim)):
            if not isinstance(h, Tensor) or h.ndim < 1 or h.shape[-1] != d:
                shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ProjectorError(
                    f"projector 'layermix': layer {i} should have dimension {d}, got {shape}: "
                    "give the layers in the order the projector was built with"
                )
            out.append(h.to(dtype) if h.dtype != dtype else h)
        return out


# ---- helpers ---------------------------------------------------------------------------------------
def _load_weights(projector: Projector, state: dict[str, Tensor], directory: Path) -> None:
    if not state and len(projector.state_dict()):
        raise ProjectorError(f"no {saving.WEIGHTS_FILE} in {directory}: the save was interrupted; "
                             "save the projector again")
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProjectorError(f"the weights in {directory / saving.WEIGHTS_FILE} do not fit the "
                             f"'{projector.name}' projector its {saving.CONFIG_FILE} describes ({e}); "
                             "save the projector again") from e


def _check_in_dim(name: str, in_dim: Any, takes_layers: bool) -> int | list[int]:
    if takes_layers:
        if isinstance(in_dim, (str, bytes)) or not isinstance(in_dim, Sequence) or not in_dim:
            raise ProjectorError(f"projector '{name}' reads several layers: in_dim must be a non-empty list of "
                                 f"per-layer dims, not {in_dim!r}")
        return [_positive_int(f"projector '{name}': in_dim[{i}]", d) for i, d in enumerate(in_dim)]
    if isinstance(in_dim, Sequence) and not isinstance(in_dim, (str, bytes)):
        raise ProjectorError(f"projector '{name}' reads one layer: in_dim must be an int, not {in_dim!r} "
                             "(use the 'layermix' projector to read several layers)")
    return _positive_int(f"projector '{name}': in_dim", in_dim)


def _positive_int(what: str, value: Any) -> int:
    return checks.integer(what, value, minimum=1, error=ProjectorError)


def _dropout(what: str, value: Any) -> float:
    """A dropout rate in [0, 1): 1 would drop every feature."""
    value = checks.number(what, value, minimum=0.0, error=ProjectorError)
    if value >= 1.0:
        raise ProjectorError(f"{what} must be below 1 (1 drops every feature), not {value!r}")
    return value
