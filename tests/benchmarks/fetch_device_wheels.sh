#!/usr/bin/env bash
# Fetch the wheels bench_speed_levels.py needs on a lent GPU machine (no network there) into .whl/ and
# build this project's wheel beside them. Run from the repository root, on a machine with PyPI. The device
# image has torch 2.11 (cu130), triton, transformers 5.17, accelerate, safetensors, onnx, onnxscript,
# msgpack; it lacks diffusers, pyzmq and torchao. See tests/benchmarks/DEVICE_RUN.md.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || grep -qxF '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# One version of each; the tested ones (the project's test environment, 2026-12).
WHEELS=(
  diffusers==0.42.1        # the pipelines (pure Python)
  pyzmq==27.3.0            # imported by the project's backend
  transformers==5.24.0     # the version the project is tested with (the image's 5.17 also loads SDXL)
  torchao==0.18.0          # the fp8 level (float8 dynamic quantisation); needs torch >= 2.11 for its C++ parts
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
python3 -m pip wheel -q --no-deps -w .whl .
# Not carried, and why (the fallback records the reason in the results):
#  - tensorrt-cu13 / tensorrt-cu13-libs 11.4: PyPI holds only a stub sdist that downloads the libraries from
#    NVIDIA's own index at install time; the real wheel (over 1 GB) is far above the 64 MiB a call can carry.
#  - nvidia-modelopt: its FP8 deployment needs TensorRT (above); the fp8 level uses torchao instead.
ls -la .whl
du -sh .whl
