"""One refiner UNet call (1024x1024, CFG batch 2, fp16) on one GPU: eager against the speed path's
compilation variants, through the project's own ``SpeedPath`` (real architecture, random weights).

    python tests/benchmarks/bench_unet_ab.py --out DIR [--budget 270]   # on CUDA
    python tests/benchmarks/bench_unet_ab.py --tiny --out DIR           # tiny shapes on the CPU

Variants, in order, each skipped when the budget would not hold its cold compilation:
  eager | whole, static shapes | regional, static shapes | whole, static, CUDA graphs (reduce-overhead)
(the default, regional with symbolic sizes, is measured by bench_gpu.py). Writes DIR/unet_ab.json after
every figure and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import REFINER_UNET, Bench, tiny

VARIANTS: dict[str, dict[str, Any]] = {
    "whole_static": {"scope": "whole", "unet_mode": "default", "dynamic": False},
    "regional_static": {"scope": "regional", "dynamic": False},
    "whole_static_cudagraphs": {"scope": "whole", "unet_mode": "reduce-overhead", "dynamic": False},
}
COMPILE_NEED_S = {"whole_static": 130, "regional_static": 90, "whole_static_cudagraphs": 130}


def main() -> int:
    from diffusers import UNet2DConditionModel

    from krita_sdxl.backend.speed.speed_path import SpeedOptions, SpeedPath

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget", type=float, default=270.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    b = Bench(args.out, args.budget, device)
    b.results_name = "unet_ab.json"
    b.record("device", torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny)")
    b.record("torch", torch.__version__)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(tiny(REFINER_UNET) if args.tiny else REFINER_UNET)).to(dtype).eval()
    cfg = unet.config
    lat = 16 if args.tiny else 128
    x = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    extra = cfg.projection_class_embeddings_input_dim - 5 * cfg.addition_time_embed_dim
    kw = dict(
        encoder_hidden_states=torch.randn(2, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
        added_cond_kwargs={"text_embeds": torch.randn(2, extra, device=device, dtype=dtype),
                           "time_ids": torch.randn(2, 5, device=device, dtype=dtype)},
    )  # fmt: skip

    def call() -> torch.Tensor:
        return unet(x, t, **kw).sample

    with torch.inference_mode():
        ref = call().float()
        b.record("eager.call_s", b.timeit(call, 20))
        for name, options in VARIANTS.items():
            need = 0 if args.tiny else COMPILE_NEED_S[name]
            if b.left() < need:
                b.record(f"{name}.status", f"skipped: time ({b.left():.0f} s left)")
                continue
            torch._dynamo.reset()
            pipe = SimpleNamespace(unet=unet, vae=SimpleNamespace(decoder=None, encoder=None))
            path = SpeedPath(pipe, device, SpeedOptions(**options, vae_mode=None))  # type: ignore[arg-type]
            path.apply()
            before = path.stats()["compiled_graphs"]
            try:
                start = time.monotonic()
                out = call().float()
                b.sync()
                b.record(f"{name}.first_call_s", round(time.monotonic() - start, 1))
                b.record(f"{name}.call_s", b.timeit(call, 20))
                b.record(f"{name}.max_abs_diff_vs_eager", round(float((out - ref).abs().max()), 4))
                stats = path.stats()
                b.record(f"{name}.graphs_compiled", stats["compiled_graphs"] - before)
                b.record(f"{name}.fallback", stats["fallback"])
            except Exception as exc:  # one variant failing must not lose the others
                b.record(f"{name}.error", f"{type(exc).__name__}: {exc}"[:800])
            finally:
                for module in path._modules.values():
                    module._compiled_call_impl = None
    eager = b.results["eager.call_s"]
    lines = [f"refiner UNet call, {lat * 8}x{lat * 8}, CFG batch 2, {dtype} — {b.results['device']}", "",
             "| variant | cold compile (first call) | call | vs eager |", "|---|---|---|---|",
             f"| eager | | {eager * 1000:.1f} ms | 1.00 |"]  # fmt: skip
    for name in VARIANTS:
        if f"{name}.call_s" in b.results:
            s = b.results[f"{name}.call_s"]
            first = b.results[f"{name}.first_call_s"]
            lines.append(f"| {name} | {first} s | {s * 1000:.1f} ms | {eager / s:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "unet_ab.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
