#!/usr/bin/env bash
# Prepares, on a machine with a package index, the packages a bare GPU machine (Python 3.12, jax, flax, optax, orbax,
# torch; no index) lacks for the PyTorch side of scripts/bench_gpu.py: diffusers and the dependencies it imports.
#
#   scripts/prepare_device_carry.sh [DEST]      # default third_party/bench_wheels; scripts/device_bench.sh finds it
#
# Pure-Python wheels stay zipped (Python imports them from the zip on PYTHONPATH); the two binary ones (safetensors,
# Pillow) are unpacked, and Pillow is cut down to what `PIL.Image` loads (diffusers imports it; nothing draws), so
# the folder stays under 20 MiB. The set is the one `import diffusers` plus a U-Net and DDIMScheduler needed on an
# environment holding only those packages; versions are those checked.
set -euo pipefail
DEST="${1:-third_party/bench_wheels}"
PIP="${PIP:-pip}"
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$PIP" download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
  diffusers==0.39.0 huggingface_hub==1.33.0 packaging==26.4 tqdm==4.70.1 requests==2.34.2 urllib3==2.8.0 \
  idna==3.20 certifi httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 safetensors==0.8.0 pillow==13.0.0

for wheel in "$tmp"/*.whl; do
  case "$(basename "$wheel")" in
    safetensors-* | pillow-*) python3 -m zipfile -e "$wheel" "$DEST" ;;
    *) cp "$wheel" "$DEST/" ;;
  esac
done
# PIL.Image needs _imaging and the libraries it links (tiff, jpeg, openjp2, xcb and theirs); fonts, colour
# management, AVIF and WebP modules are not loaded.
rm -f "$DEST"/PIL/_avif.*.so "$DEST"/PIL/_imagingcms.*.so "$DEST"/PIL/_imagingft.*.so "$DEST"/PIL/_webp.*.so \
  "$DEST"/PIL/_imagingtk.*.so
for lib in "$DEST"/pillow.libs/*; do
  case "$(basename "$lib")" in
    libtiff-* | libjpeg-* | libopenjp2-* | libxcb-* | libXau-* | libzstd-* | liblzma-*) ;;
    *) rm -f "$lib" ;;
  esac
done
du -sh "$DEST"
