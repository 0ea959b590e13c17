#!/usr/bin/env bash
# Install the optional data backends, NVIDIA DALI and FFCV, into the environment of the pip given as
# the only argument (e.g. `bash pipelines/install_extras.sh .venv/bin/pip`). Idempotent: what already
# imports is left alone, except a DALI built for another CUDA major version than torch's, which is
# replaced. About 1 minute on a fresh machine (apt ~20 s, DALI ~15 s, FFCV ~15 s).
#
# FFCV 1.0.2 is built from source and links OpenCV and libjpeg-turbo found through pkg-config, so it
# needs Debian's pkg-config, libopencv-dev and libturbojpeg0-dev (its opencv-python wheel also loads
# libGL and glib). They are installed when missing and this runs as root; otherwise the one apt
# command to run is printed and the script exits non-zero.
set -euo pipefail

PIP="${1:?usage: install_extras.sh PATH/TO/pip}"
PY="$(dirname "$PIP")/python"
[ -x "$PY" ] || PY=python3

DALI_VERSION="2.4.0"
FFCV_REQS=("ffcv==1.0.2" "numba>=0.61")
APT_PKGS=(pkg-config libopencv-dev libturbojpeg0-dev libgl1 libglib2.0-0)

imports() { "$PY" -c "$1" >/dev/null 2>&1; }

# The DALI build for torch's CUDA major version, so that one CUDA stack is loaded, not two:
# nvidia-dali-cuda120 beside a CUDA 12 torch, nvidia-dali-cuda130 beside a CUDA 13 (or CPU-only) torch.
CUDA_MAJOR="$("$PY" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')"
case "$CUDA_MAJOR" in
    12) DALI_PKG=nvidia-dali-cuda120; OTHER_DALI=nvidia-dali-cuda130 ;;
    13 | "") DALI_PKG=nvidia-dali-cuda130; OTHER_DALI=nvidia-dali-cuda120 ;;
    *) echo "no DALI build for torch's CUDA $CUDA_MAJOR: install nvidia-dali-cuda${CUDA_MAJOR}0 by hand" >&2; exit 1 ;;
esac

if "$PIP" show "$OTHER_DALI" >/dev/null 2>&1; then
    echo "DALI: replacing $OTHER_DALI (torch uses CUDA ${CUDA_MAJOR:-none})"
    "$PIP" uninstall --quiet --yes "$OTHER_DALI"
fi
if "$PIP" show "$DALI_PKG" >/dev/null 2>&1 && imports "import nvidia.dali, nvidia.dali.plugin.pytorch"; then
    echo "DALI: $DALI_PKG already installed"
else
    echo "DALI: installing $DALI_PKG==$DALI_VERSION"
    "$PIP" install --quiet "$DALI_PKG==$DALI_VERSION"
fi

if imports "import ffcv, ffcv.loader, numba, cv2"; then
    echo "FFCV: already installed"
    exit 0
fi

missing=()
for pkg in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "FFCV: installing Debian packages ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
            apt-get update -qq >/dev/null
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        }
    else
        echo "FFCV needs Debian packages that are missing; run:" >&2
        echo "  sudo apt-get install -y ${APT_PKGS[*]}" >&2
        exit 1
    fi
fi

echo "FFCV: building ${FFCV_REQS[*]} from source"
"$PIP" install --quiet "${FFCV_REQS[@]}"
if ! "$PY" -c "import ffcv, ffcv.loader, numba, cv2"; then
    echo "FFCV installed but does not import (see the error above)" >&2
    exit 1
fi
