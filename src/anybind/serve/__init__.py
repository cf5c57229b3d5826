"""Serving a bundle: a vector index over a dataset, an HTTP API with a web page, loader shims.

Submodules import their optional dependencies (faiss, fastapi) lazily, on first use:

- `anybind.serve.index`: `build_index`, `VectorIndex`, `search_index` (needs faiss-cpu)
- `anybind.serve.app`: `create_app`, `serve` (needs fastapi, uvicorn, python-multipart)
- `anybind.serve.compat`: `create_model_and_transforms`, `create_model_from_pretrained`, `get_tokenizer`
  (open_clip's loaders and signatures, for open_clip / CLIP_benchmark code)
"""
