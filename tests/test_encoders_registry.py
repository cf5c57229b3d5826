"""The encoder registries: BACKENDS and PACKAGED are `Registry` objects; a backend's missing module
is refused with the install command before its code is imported; options are checked by name."""

import pytest

from anybind.encoders import create_encoder, list_encoders, parse_spec
from anybind.encoders.registry import BACKENDS, PACKAGED, register_backend, register_packaged
from anybind.errors import MissingDependencyError, SpecError
from anybind.registry import Registry, RegistryError


@pytest.fixture()
def cleanup():
    added = []
    yield added
    for registry, name in added:
        registry.unregister(name)


def test_both_tables_are_registries():
    assert isinstance(BACKENDS, Registry) and isinstance(PACKAGED, Registry)
    assert {"hf", "st", "timm", "open_clip", "onnx", "random"} <= set(BACKENDS.names())
    assert {"efficientnet-lite0", "efficientnet-lite2", "dinov2-s-focus", "minilm-l6", "mpnet-base"} <= set(PACKAGED)
    meta = PACKAGED.entry("minilm-l6").meta
    assert meta["modality"] == "text" and meta["licence"] == "Apache-2.0" and meta["install"].startswith("pip install")
    assert BACKENDS.entry("onnx").meta == {"needs": ("onnxruntime", "onnx"), "extra": "onnx"}
    # registering is lazy: the entries are still "module:function" strings
    assert isinstance(BACKENDS.entry("timm").target, str)


def test_a_backend_with_a_missing_module_says_what_to_install(cleanup):
    register_backend("ghost", "no_such_pkg_for_anybind.backend:create", needs=("no_such_pkg_for_anybind",),
                     extra="ghost")
    cleanup.append((BACKENDS, "ghost"))
    assert parse_spec("ghost:model").backend == "ghost"
    with pytest.raises(MissingDependencyError, match=r"the ghost: encoder backend needs the package "
                                                     r"'no_such_pkg_for_anybind'.*pip install 'anybind\[ghost\]'"):
        create_encoder("ghost:model")
    row = next(r for r in list_encoders() if r["spec"] == "ghost:NAME-OR-PATH")
    assert row["installed"] is False and row["install"] == "pip install 'anybind[ghost]'"


def test_a_packaged_encoder_with_a_missing_package(cleanup):
    register_packaged("ghost-enc", "no_such_pkg_for_anybind:factory", modality="text", licence="MIT",
                      needs=("no_such_pkg_for_anybind",), install="pip install ghost-enc==1.0",
                      help="a packaged encoder whose package is missing")
    cleanup.append((PACKAGED, "ghost-enc"))
    assert parse_spec("ghost-enc").backend == "packaged"
    with pytest.raises(MissingDependencyError, match=r"ghost-enc is not installed: pip install ghost-enc==1.0"):
        create_encoder("ghost-enc")
    row = next(r for r in list_encoders() if r["spec"] == "ghost-enc")
    assert row["kind"] == "packaged" and row["installed"] is False and row["description"].startswith("a packaged")


def test_a_backend_registered_as_a_function(cleanup):
    from anybind.encoders.random import create

    register_backend("rnd", create)
    cleanup.append((BACKENDS, "rnd"))
    assert create_encoder("rnd:image").modality == "image"
    with pytest.raises(RegistryError, match="already registered"):
        register_backend("rnd", "anybind.encoders.random:create")
    with pytest.raises(SpecError, match="cannot be an encoder backend prefix"):
        register_backend("packaged", create)


def test_options_are_checked_against_the_factory():
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(RegistryError, match=r"no option 'fuse_batchnrom' \(did you mean 'fuse_batchnorm'\?\)"):
        create_encoder("efficientnet-lite0", fuse_batchnrom=False)


def test_typos_get_a_did_you_mean():
    with pytest.raises(SpecError, match=r"unknown encoder backend 'tim:' in 'tim:resnet50' \(did you mean 'timm'\?\)"):
        parse_spec("tim:resnet50")
    with pytest.raises(SpecError, match=r"unknown encoder 'minilm-l7' \(did you mean 'minilm-l6'\?\)"):
        parse_spec("minilm-l7")
