"""``python -m krita_sdxl.backend.speed.trt.build SPEC.json``: build one TensorRT UNet engine, in its own process.

SPEC (written by backend/speed/trt/unet.py ``subprocess_builder``): the model source, the UNet dtype, the
device, the engine key (size bucket and batch), the output file and a work folder. Loads the UNet from
the model's files, exports it to ONNX in the work folder and writes the serialized engine to ``out``.
Exit status 0 on success; otherwise the last lines of stderr say why.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    from krita_sdxl.backend.models.pipelines import load_pipeline
    from krita_sdxl.backend.models.sources import ModelSource

    from .cache import EngineKey
    from .unet import build_engine, export_onnx

    logging.basicConfig(level=logging.INFO, format="%(asctime)s trt_build: %(message)s")
    log = logging.getLogger("krita_sdxl.trt_build")
    spec = json.loads(Path(argv[0]).read_text())
    src = spec["source"]
    source = ModelSource(src["role"], src["kind"], Path(src["path"]), src["name"],
                         Path(src["config"]) if src.get("config") else None)  # fmt: skip
    dtype = getattr(torch, spec["dtype"])
    key = EngineKey(**spec["key"])
    workdir = Path(spec["workdir"])
    t = time.monotonic()
    pipe = load_pipeline(source, dtype, torch.float32)
    unet = pipe.unet.to(spec["device"]).eval()
    del pipe
    log.info("loaded the UNet in %.1f s", time.monotonic() - t)
    t = time.monotonic()
    onnx_dir = workdir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(unet, key, onnx_dir, spec["device"])
    log.info("exported %s in %.1f s", onnx_path, time.monotonic() - t)
    del unet
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t = time.monotonic()
    payload = build_engine(onnx_path, int(spec.get("opt_level", 3)))
    log.info("built the engine (%d MB) in %.1f s", len(payload) // 10**6, time.monotonic() - t)
    out = Path(spec["out"])
    out.write_bytes(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
