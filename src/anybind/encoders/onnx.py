"""ONNX image encoders run by onnxruntime: ``onnx:/path/model.onnx[#out1,out2,...]``.

The model takes one image tensor (NCHW float). Its layers are named tensors of the graph:

    onnx:/m/vit.onnx                       the graph's declared outputs
    onnx:/m/vit.onnx#a,b,c                 a -> layer.0, b -> layer.1, c -> final
    onnx:/m/vit.onnx#layer.4=/blk4/out,final=/norm/out     explicit canonical names

With a plain list **the last name is ``final``** and the others are ``layer.0 .. layer.{n-2}``
in the order given. A name may be any tensor inside the graph, not only a declared output: the
graph is cut there (in memory) by making it an extra output. Each set of requested tensors gets
its own session, pruned to the nodes those tensors need, so asking for ``final`` alone never
runs the other branches. Sessions are cached.

Shapes: ``[B, T, D]`` tokens are pooled (``cls`` = the first token, ``mean`` over tokens after
``num_prefix_tokens``, ``cls+mean``); ``[B, C, H, W]`` maps take the global average; ``[B, D]``
is used as is. ``final`` is pooled with ``final_pooling`` (default ``cls``) whatever the
pooling option, and is not normalised.

Options: ``size`` (when the graph's input size is dynamic; default 224), ``resize`` (default
size / 0.875), ``mean`` / ``std`` (default ImageNet), ``interpolation``, ``num_prefix_tokens``
(default 1), ``final_pooling``, ``threads`` (onnxruntime intra-op threads), ``device``.
onnxruntime uses the CUDA provider when the encoder is moved to a CUDA device and the
onnxruntime-gpu build is installed; otherwise the CPU. ONNX graphs never run under torch
autocast (``supports_autocast = False``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .._deps import require
from .._hashing import hash_file, hash_files
from ..checks import choice
from ..errors import AnybindError, SpecError
from .base import Encoder
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from .spec import EncoderSpec
from .timm import pool_form, token_poolings

log = logging.getLogger(__name__)

_FORMS = {2: "vector", 3: "tokens", 4: "nchw"}
_MAX_SESSIONS = 4


def parse_outputs(fragment: str | None, declared: Sequence[str]) -> dict[str, str]:
    """'#a,b,c' -> {layer.0: a, layer.1: b, final: c}; 'layer.3=x,final=y' -> as written."""
    items = [s.strip() for s in (fragment or "").split(",") if s.strip()] or list(declared)
    if not items:
        raise SpecError("the ONNX graph declares no outputs: name the tensors after '#'")
    if any("=" in s for s in items):
        mapping = {}
        for s in items:
            key, eq, value = s.partition("=")
            key = key.strip()
            if not eq or not (key == "final" or (key.startswith("layer.") and key[6:].isdigit())):
                raise SpecError(f"'{s}': write 'layer.N=TENSOR' or 'final=TENSOR'")
            mapping[key] = value.strip()
        if "final" not in mapping:
            raise SpecError("an explicit ONNX output list needs a 'final=TENSOR' entry")
        order = sorted((k for k in mapping if k != "final"), key=lambda k: int(k[6:]))
        return {**{k: mapping[k] for k in order}, "final": mapping["final"]}
    return {**{f"layer.{i}": name for i, name in enumerate(items[:-1])}, "final": items[-1]}


def _subgraph_inputs(node) -> set[str]:
    """Names a node's sub-graphs (If / Loop / Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_inputs(n)
    return names


def cut_graph(model, outputs: Sequence[str]):
    """A copy of `model` whose outputs are `outputs` (any tensors in the graph), pruned to the
    nodes and initializers those tensors need. Graph inputs are kept as they are."""
    import onnx

    g = model.graph
    produced = (
        {o for n in g.node for o in n.output}
        | {i.name for i in g.input}
        | {t.name for t in g.initializer}
    )
    unknown = [o for o in outputs if o not in produced]
    if unknown:
        hint = ", ".join(list(o.name for o in g.output)[:5])
        raise AnybindError(
            f"the ONNX graph has no tensor named {', '.join(unknown)} (its outputs: {hint})"
        )
    needed = set(outputs)
    keep = []
    for node in reversed(g.node):  # nodes are stored in topological order
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= _subgraph_inputs(node)
    keep.reverse()
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    cg = cut.graph
    del cg.node[:]
    cg.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del cg.initializer[:]
    cg.initializer.extend(inits)
    known = {vi.name: vi for vi in [*g.value_info, *g.output]}
    del cg.output[:]
    cg.output.extend(known.get(o) or onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
    infos = [vi for vi in g.value_info if vi.name in needed]
    del cg.value_info[:]
    cg.value_info.extend(infos)
    return cut


def _external_files(path: Path, model) -> list[Path]:
    files = set()
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                files.add(path.parent / kv.value)
    return sorted(files)


def _preprocess_for(spec, graph_input, *, size, resize, mean, std, interpolation) -> ImagePreprocess:
    """The preprocessing of a graph given no explicit one: its static input size, else `size` or 224."""
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in graph_input.type.tensor_type.shape.dim]
    static = dims[-1] if len(dims) == 4 and dims[-1] and dims[-2] == dims[-1] else None
    if size and static and size != static:
        raise SpecError(f"{spec}: the graph takes {static} px images, not size={size}")
    size = int(size or static or 224)
    return ImagePreprocess(size=size, resize=int(resize or round(size / 0.875)), mean=tuple(mean),
                           std=tuple(std), interpolation=interpolation)


class OnnxEncoder(Encoder):
    """An ONNX image model: named graph tensors as canonical layers (see the module docstring)."""

    supports_autocast = False
    modality = "image"

    def __init__(
        self,
        spec: EncoderSpec,
        path: str | Path,
        outputs: dict[str, str] | str | None = None,
        *,
        image_preprocess: ImagePreprocess | None = None,
        size: int | None = None,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        num_prefix_tokens: int = 1,
        final_pooling: str = "cls",
        layer_dims: dict[str, int] | None = None,
        forms: dict[str, str] | None = None,
        threads: int | None = None,
        licence: str | None = None,
        weights: Callable[[], str] | None = None,
    ):
        self.spec, self.path, self.licence = spec, Path(path), licence
        graph_input = self._load_graph()
        if not isinstance(outputs, dict):  # None or the text after '#' in the spec
            outputs = parse_outputs(outputs, [o.name for o in self._proto.graph.output])
        self.outputs = dict(outputs)
        choice("final_pooling", final_pooling, ("cls", "mean"), error=SpecError)
        self.num_prefix_tokens, self.final_pooling = int(num_prefix_tokens), final_pooling
        self.threads = threads
        self._weights_fn = weights or self._hash_weight_files
        self._weights: str | None = None
        self._sessions: OrderedDict[frozenset, object] = OrderedDict()
        if image_preprocess is None:
            image_preprocess = _preprocess_for(spec, graph_input, size=size, resize=resize, mean=mean,
                                               std=std, interpolation=interpolation)
        self.image_preprocess = image_preprocess
        if layer_dims is None or forms is None:
            layer_dims, forms = self._probe()
        self._dims, self._forms = dict(layer_dims), dict(forms)
        self.poolings = token_poolings(
            {k: v for k, v in self._forms.items() if k != "final"}, self.num_prefix_tokens
        )

    def _load_graph(self):
        """Read the graph (and its external weights) and find its one image input."""
        onnx = require("onnx", "reading and cutting ONNX graphs", "onnx")
        if not self.path.is_file():
            raise SpecError(f"{self.spec}: no ONNX file at {self.path}")
        self._proto = onnx.load(str(self.path), load_external_data=False)
        self._external = _external_files(self.path, self._proto)
        if self._external:  # the whole model in memory: cut graphs are serialised from it
            onnx.load_external_data_for_model(self._proto, str(self.path.parent))
        g = self._proto.graph
        init_names = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name not in init_names]
        if len(inputs) != 1:
            raise AnybindError(
                f"{self.spec}: anybind runs ONNX graphs with one image input; this one has {len(inputs)}"
            )
        self.input_name = inputs[0].name
        elem = inputs[0].type.tensor_type.elem_type
        self._input_dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
        return inputs[0]

    def _hash_weight_files(self) -> str:
        return hash_files([self.path, *self._external]) if self._external else hash_file(self.path)

    # ---- sessions ---------------------------------------------------------------------------
    def _providers(self) -> list[str]:
        ort = require("onnxruntime", "the onnx backend", extra="onnx")
        available = ort.get_available_providers()
        if self.device.type == "cuda" and "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if self.device.type == "cuda":
            log.warning(
                "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu): running on CPU"
            )
        return ["CPUExecutionProvider"]

    def session(self, tensors: Sequence[str]):
        """An onnxruntime session whose outputs are exactly `tensors` (cached, pruned graph)."""
        key = frozenset(tensors)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        ort = require("onnxruntime", "the onnx backend", extra="onnx")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        cut = cut_graph(self._proto, sorted(key))
        sess = ort.InferenceSession(cut.SerializeToString(), opts, providers=self._providers())
        self._sessions[key] = sess
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sess

    def to(self, device: str | torch.device) -> OnnxEncoder:
        device = torch.device(device)
        if device != self.device:
            self.device = device
            self._sessions.clear()
        return self

    def _run(self, batch, layers: Sequence[str]) -> dict[str, np.ndarray]:
        tensors = sorted({self.outputs[n] for n in layers})
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        x = np.ascontiguousarray(x, dtype=self._input_dtype)
        sess = self.session(tensors)
        values = dict(zip(tensors, sess.run(tensors, {self.input_name: x}), strict=True))
        return {n: values[self.outputs[n]] for n in layers}

    def _probe(self) -> tuple[dict[str, int], dict[str, str]]:
        """Each output's rank and width: from the session's inferred shapes, else one blank image."""
        names = list(self.outputs)
        sess = self.session(sorted(set(self.outputs.values())))
        shapes = {o.name: o.shape for o in sess.get_outputs()}
        dims, forms = {}, {}
        blank = None
        for n in names:
            shape = shapes[self.outputs[n]]
            if (
                shape is None
                or len(shape) not in _FORMS
                or not isinstance(shape[1 if len(shape) == 4 else -1], int)
            ):
                if blank is None:
                    size = self.image_preprocess.size
                    blank = self._run(np.zeros((1, 3, size, size), np.float32), names)
                shape = blank[n].shape
            if len(shape) not in _FORMS:
                raise AnybindError(
                    f"{self.spec}: output {self.outputs[n]} has shape {shape}; anybind pools rank 2, 3 or 4"
                )
            forms[n] = _FORMS[len(shape)]
            dims[n] = int(shape[1] if len(shape) == 4 else shape[-1])
        return dims, forms

    # ---- the contract -----------------------------------------------------------------------
    @property
    def layer_dims(self) -> dict[str, int]:
        return dict(self._dims)

    def encode(
        self, batch, layers: Sequence[str], pooling: str | None = None
    ) -> dict[str, torch.Tensor]:
        pooling = self.check_pooling(pooling)
        raw = self._run(batch, layers)
        out = {}
        for name in layers:
            t = torch.from_numpy(raw[name])
            if name == "final":
                out[name] = pool_form(
                    t, self._forms[name], self.final_pooling, self.num_prefix_tokens
                )
            else:
                out[name] = pool_form(t, self._forms[name], pooling, self.num_prefix_tokens)
        return out

    def weights_hash(self) -> str:
        if self._weights is None:
            self._weights = self._weights_fn()
        return self._weights

    def fingerprint(self, pooling: str | None = None, precision: str = "fp32") -> dict:
        fp = super().fingerprint(pooling, precision)
        fp["options"] = {
            "num_prefix_tokens": self.num_prefix_tokens,
            "final_pooling": self.final_pooling,
        }
        return fp

    def __getstate__(self) -> dict:
        """Picklable for spawned workers (which only preprocess): sessions are rebuilt on demand."""
        state = dict(self.__dict__)
        state["_sessions"] = OrderedDict()
        state["_weights"], state["_weights_fn"] = self.weights_hash(), None
        return state


def create(spec: EncoderSpec, device: str | None = None, **options) -> OnnxEncoder:
    """`onnx:/path/model.onnx[#outputs]` -> OnnxEncoder (options: see the module docstring)."""
    require("onnxruntime", "the onnx backend", extra="onnx")
    require("onnx", "reading and cutting ONNX graphs", "onnx")
    if spec.modality not in (None, "image"):
        raise SpecError(f"{spec}: the onnx backend runs image models only")
    location, _, fragment = spec.name.partition("#")
    enc = OnnxEncoder(spec, Path(location).expanduser(), fragment or None, **options)
    return enc.to(device) if device else enc
