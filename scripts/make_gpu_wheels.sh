#!/usr/bin/env bash
# Wheels for the GPU machine, which has no registry: the packages this project needs that its image lacks
# (torch 2.11, torchvision 0.26, Python 3.12, numpy and the usual scientific stack are there; DeepSpeed, Ray and
# spikingjelly are not). They go to .whl/ at the repository root (ignored by git), for the device tool's `carry`.
#
#   bash scripts/make_gpu_wheels.sh            # DeepSpeed + its missing needs, spikingjelly + its missing needs
#   WITH_RAY=1 bash scripts/make_gpu_wheels.sh # also Ray Tune (about 70 MB: over the 64 MiB a call may carry)
#   CHECK=0 bash scripts/make_gpu_wheels.sh    # skip the offline install check
#
# DeepSpeed publishes only a source archive: it is built here into a pure-Python wheel (no ops compiled,
# DS_BUILD_OPS=0; ZeRO 1/2 with torch optimizers needs none). Versions are the ones installed here from
# requirements.txt, so the GPU run uses what CI tests. Binary wheels are fetched for CPython 3.12 on manylinux x86-64.
# The check installs every wheel offline (--no-index) into a clean Python 3.12 venv and imports DeepSpeed's
# dependencies there, then imports DeepSpeed itself from the built wheel against this machine's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64)

version() {   # the version installed here (from requirements.txt), or a pin from the file, or fail
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) ||
    v=$(grep -iE "^$1(\[[^]]*\])?==" requirements.txt | head -1 | sed 's/.*==//') || true
  if [ -z "$v" ]; then
    echo "no version of $1 installed here or pinned in requirements.txt: pip install -r requirements.txt" >&2
    exit 1
  fi
  echo "$v"
}

# What the GPU image lacks (its package list: .library/device/KINDS.md): DeepSpeed needs hjson and pydantic
# (pydantic-core, annotated-types, typing-inspection; typing-extensions carried for pydantic's minimum);
# spikingjelly needs loguru and SciencePlots. Everything else they need is on the image.
DEEPSPEED_DEPS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)
SPIKING=(spikingjelly loguru SciencePlots)
RAY=(ray jsonschema jsonschema-specifications referencing rpds-py tensorboardX)

python312() {   # a Python 3.12 for the clean-venv check (the GPU machine's version), or nothing
  local candidate
  for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then   # .gitignore has /.whl/ too
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"
fi

# 1. DeepSpeed: sdist -> pure-Python wheel, built against this machine's torch (no build isolation: its setup.py
#    imports torch, and an isolated build would fetch a second torch).
DS_VERSION=$(version deepspeed)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "deepspeed==$DS_VERSION"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$work"/deepspeed-*.tar.gz
ls "$DEST"/deepspeed-"$DS_VERSION"-py3-none-any.whl >/dev/null

# 2. The rest as published wheels for CPython 3.12 (pure ones are py3-none-any and match too).
names=("${DEEPSPEED_DEPS[@]}" "${SPIKING[@]}")
[ "${WITH_RAY:-0}" = 1 ] && names+=("${RAY[@]}")
specs=()
for name in "${names[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${specs[@]}"

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $9}'
du -ch "$DEST"/*.whl | tail -1 | sed 's/^/  total /'

# 3. Offline install check.
PY312=$(python312)
if [ "${CHECK:-1}" = 1 ] && [ -z "$PY312" ]; then
  echo "no Python 3.12 here: the clean-venv check of the cp312 wheels is skipped (set PYTHON312=...)" >&2
fi
if [ "${CHECK:-1}" = 1 ] && [ -n "$PY312" ]; then
  venv="$work/venv312"
  "$PY312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$DEST"/*.whl
  "$venv/bin/python" -c "
import importlib.metadata as m
import hjson, pydantic, pydantic_core, loguru  # DeepSpeed's and spikingjelly's needs import in a clean 3.12
print('  clean Python 3.12 venv, --no-index: installed', ', '.join(f'{n} {m.version(n)}' for n in
      ('deepspeed', 'pydantic', 'pydantic-core', 'hjson', 'spikingjelly')))"
fi
if [ "${CHECK:-1}" = 1 ]; then
  site="$work/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$DEST"/deepspeed-*.whl "$DEST"/hjson-*.whl
  DS_ACCELERATOR=cpu PYTHONPATH="$site" "$PY" -c "
import deepspeed, os
assert deepspeed.__file__.startswith(os.environ['PYTHONPATH']), deepspeed.__file__
print('  deepspeed', deepspeed.__version__, 'imports from the built wheel with this torch')" 2>&1 | grep -v WARNING
fi
