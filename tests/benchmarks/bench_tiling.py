"""Tiled refine of large images: time, peak GPU memory, progress, against running the image whole.

    python tests/benchmarks/bench_tiling.py --out DIR            # CUDA: SDXL refiner architecture, random weights
    python tests/benchmarks/bench_tiling.py --tiny --out DIR     # CPU smoke test on the tiny demo model

The refiner is built in the real SDXL 1.0 architecture with random weights (configs of bench_gpu.py),
saved and loaded through ``Engine.load`` (plain path, ``--speed off``, memory mode none). Every figure
is written to DIR/results.json as soon as it is measured, so a run cut off still returns what it had.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import CLIP_G, REFINER_UNET, SCHEDULER, VAE, make_image

from krita_sdxl.backend.engine.tiling import TilingConfig, plan_tiles


def build_refiner(root: Path, device: str) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from krita_sdxl.backend.models.demo import write_tokenizer

    write_tokenizer(root / "tok", pad_token="!")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**REFINER_UNET).to(torch.float16).eval()
        vae = AutoencoderKL(**VAE).to(torch.float16).eval()
        te = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).to(torch.float16).eval()
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te, tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tok"), unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "refiner")
    return root / "refiner"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--whole-4k", action="store_true", help="also run the 3840x2160 image whole (needs memory)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}

    def record(key: str, value: Any) -> None:
        results[key] = value
        print(f"{key}: {value}", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    from krita_sdxl.backend.engine.request import RefineRequest
    from krita_sdxl.backend.engine.sdxl_engine import Engine
    from krita_sdxl.protocol import plan_img2img

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    record("device", torch.cuda.get_device_name() if cuda else "cpu")
    t = time.perf_counter()
    if args.tiny:
        engine = Engine.load(demo=True, device="cpu", speed="off", watermark=False)
        tile, sizes = 64, [(128, 128), (240, 135)]
    else:
        path = build_refiner(Path(tempfile.mkdtemp()), device)
        torch.cuda.empty_cache()
        engine = Engine.load(model=str(path), device="cuda", dtype="fp16", speed="off", memory="none", watermark=False)
        tile, sizes = 1024, [(2048, 2048), (3840, 2160)]
    record("load_s", round(time.perf_counter() - t, 1))

    def refine(width: int, height: int, config: TilingConfig, steps: int = 50) -> dict[str, Any]:
        engine.tiling = config
        req = RefineRequest(
            image=make_image(width, height), prompt="an oil painting of a harbour", negative_prompt="blurry",
            strength=0.3, plan=plan_img2img(steps, 0.3), seed=1, guidance_scale=5.0, aesthetic_score=6.0,
            negative_aesthetic_score=2.5,
        )  # fmt: skip
        events: list[tuple[int, int]] = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        engine.refine(req, lambda s, total, p: events.append((s, total)), lambda: False)
        if cuda:
            torch.cuda.synchronize()
        steps_seen = [s for s, _ in events]
        return {
            "s": round(time.perf_counter() - t, 2),
            "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "progress_total": events[-1][1] if events else None,
            "progress_events": len(events),
            "monotonic": steps_seen == sorted(set(steps_seen)),
        }

    small = TilingConfig(threshold=tile * tile, tile=tile, overlap=tile // 8)
    whole = TilingConfig(threshold=0)
    refine(tile, tile, whole, steps=10)  # warm-up
    record("whole_1_tile", refine(tile, tile, whole))
    w, h = sizes[0]
    record(f"tiled_{w}x{h}_tiles", len(plan_tiles(w, h, small.tile, small.overlap)))
    record(f"tiled_{w}x{h}", refine(w, h, small))
    record(f"whole_{w}x{h}", refine(w, h, whole))
    w, h = sizes[1]
    record(f"tiled_{w}x{h}_tiles", len(plan_tiles(w, h, small.tile, small.overlap)))
    record(f"tiled_{w}x{h}", refine(w, h, small))
    if args.whole_4k or args.tiny:
        try:
            record(f"whole_{w}x{h}", refine(w, h, whole))
        except Exception as exc:  # out of memory is a result here
            record(f"whole_{w}x{h}", f"{type(exc).__name__}: {str(exc)[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
