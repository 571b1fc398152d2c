"""The speed path: ``torch.compile`` of the UNet and the VAE, CUDA graphs, size buckets, a compile cache.

On by default on CUDA (``--speed auto``), off elsewhere; ``--speed on`` forces it (on the CPU it compiles
without CUDA graphs, which the tests use), ``--speed off`` gives the plain eager path.

What it does to a loaded pipeline, in place (``SpeedPath.apply``):

- The UNet is compiled whole (``fullgraph=True``) in ``reduce-overhead`` mode, so every denoising step is
  one CUDA-graph replay instead of about a thousand kernel launches from Python; the VAE encoder and
  decoder are compiled in the default mode (each runs once per job and is bound by convolutions, so a graph
  would buy little and cost a private memory pool). ``max-autotune`` is not used: it multiplies the cold
  compile time for a few per cent.
- Shapes are static: work images are padded to a size bucket (:mod:`.buckets`), so the number of distinct
  shapes, and with it the compilations and CUDA graphs, stays small; each bucket compiles once per machine
  (the compile cache keeps it across restarts). Dynamic spatial dimensions (``dynamic: true`` in
  ``KRITA_SDXL_SPEED_OPTIONS``: one compilation for every bucket, duck sizing off so a square image does
  not tie height to width) are an option, not the default: on an H100 (torch 2.11, 2026-11-26) the first
  refine with them had not finished compiling the VAE encoder and the UNet after 3.5 minutes, against
  105 s for a static compilation of the UNet (FACTS section 3); their run time was not measured.
- The compile caches (inductor's FX graph cache, the AOT autograd cache and Triton's kernels) live in a
  folder the service names (``--compile-cache``), so a restarted service skips inductor and Triton
  compilation and only re-traces the model.
- Prompt embeddings are kept in a small LRU cache (a user refines many selections with one prompt).
- If a compiled call fails for any reason but lack of memory, the speed path switches itself off for good,
  logs why, and the call runs again eagerly: a job never fails because of the speed path.

The VAE already runs in bf16 on CUDA (the engine's choice, not this module's). Not applied to offloaded
pipelines (their hooks move weights between calls, which compiled graphs cannot follow).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .buckets import DEFAULT_POLICY, BucketPolicy

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

log = logging.getLogger(__name__)

SPEED_CHOICES = ("auto", "on", "off")
OPTIONS_ENV = "KRITA_SDXL_SPEED_OPTIONS"  # JSON object overriding SpeedOptions fields (benchmarks, experts)
COMPILED = ("unet", "vae_encoder", "vae_decoder")


def resolve_speed(setting: str, device: str) -> bool:
    """Whether the speed path is on: ``auto`` means on CUDA only."""
    if setting not in SPEED_CHOICES:
        raise ValueError(f"speed must be one of {', '.join(SPEED_CHOICES)}; got {setting!r}")
    if setting == "auto":
        return device.split(":", 1)[0] == "cuda"
    return setting == "on"


def default_compile_cache(cache_dir: Path) -> Path:
    return cache_dir / "torch-compile"


def configure_compile_cache(folder: Path) -> dict[str, str]:
    """Point inductor's FX graph cache, the AOT autograd cache and Triton's cache at ``folder`` and switch
    them on. Process-wide; call before the first compilation. Returns the environment it set."""
    folder = folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    os.environ.update(env)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return env


@dataclass(frozen=True)
class SpeedOptions:
    unet_mode: str | None = "reduce-overhead"  # torch.compile mode for the UNet; None: not compiled
    vae_mode: str | None = "default"  # for the VAE encoder and decoder; None: not compiled
    compile_encoder: bool = True
    dynamic: bool = False  # True: spatial dims dynamic, one compilation for all buckets (slow, see above)
    channels_last: bool = False  # eager NHWC was 10% (UNet) and 55% (VAE decoder) slower on an H100
    fuse_qkv: bool = False  # no gain in eager on an H100 (1.27 vs 1.26 s)
    conv_1x1_as_mm: bool = True
    prompt_cache: int = 16  # prompt embeddings kept (0: off)
    buckets: bool = True  # pad work images to size buckets (False: to a multiple of 64 px)
    backend: str = "inductor"  # torch.compile backend ("aot_eager": tracing only, for tests)

    @classmethod
    def from_env(cls, device: str) -> SpeedOptions:
        opts = cls() if device.split(":", 1)[0] == "cuda" else cls(unet_mode="default")
        raw = os.environ.get(OPTIONS_ENV, "").strip()
        if raw:
            try:
                overrides = json.loads(raw)
                opts = replace(opts, **overrides)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{OPTIONS_ENV} must be a JSON object of SpeedOptions fields: {exc}") from None
        return opts


def pad_to_size(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mirror-pad the bottom and right edges of an HxW(xC) array to ``height`` x ``width``."""
    h, w = values.shape[:2]
    if (h, w) == (height, width):
        return values
    if h > height or w > width:
        raise ValueError(f"cannot pad {w}x{h} down to {width}x{height}")
    pad = [(0, height - h), (0, width - w)] + [(0, 0)] * (values.ndim - 2)
    return np.pad(values, pad, mode="symmetric")


def _clone(out: Any) -> Any:
    """Copy a compiled call's outputs out of the CUDA-graph pool (the next replay overwrites it)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple | list):
        return type(out)(_clone(o) for o in out)
    if isinstance(out, dict):  # diffusers BaseOutput is an OrderedDict dataclass
        return type(out)(**{k: _clone(v) for k, v in out.items()})
    return out


def prepare_cudagraph_thread() -> None:
    """Set up inductor's CUDA-graph tree state for the calling thread.

    Inductor keeps its CUDA-graph tree managers in thread-local storage that is set up only in the thread
    that imported it (and threads the autograd engine starts); in any other thread, such as the service's
    worker thread, ``reduce-overhead`` fails with a bare ``AssertionError`` in ``cudagraph_trees.get_obj``
    (pytorch/pytorch#123177, fixed lazily in newer releases by #184357). This does what that fix does, once
    per thread; a no-op where the state is there already."""
    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:  # pragma: no cover - no inductor
        return
    local = getattr(trees, "local", None)
    if local is None or hasattr(local, "tree_manager_containers"):
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    init = getattr(trees, "_initialize_tls", None)
    if init is not None:
        init(local)
        return
    local.tree_manager_containers = {}  # older releases: what the module does at import
    local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def compile_counters() -> dict[str, int]:
    """Process-wide compilation counters: graphs dynamo compiled, cache hits and misses."""
    from torch._dynamo.utils import counters

    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "autograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "autograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


@dataclass
class SpeedPath:
    pipe: StableDiffusionXLImg2ImgPipeline
    device: str
    options: SpeedOptions = field(default_factory=SpeedOptions)
    cache_folder: Path | None = None
    policy: BucketPolicy = DEFAULT_POLICY
    fallback: str | None = None  # why the compiled path was switched off, if it was
    buckets_seen: set[tuple[int, int]] = field(default_factory=set)
    _modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    _prompt_caches: list[OrderedDict[Any, Any]] = field(default_factory=list)
    _jobs: int = 0

    # --- set-up ---------------------------------------------------------------------------------

    def apply(self) -> SpeedPath:
        pipe, opts = self.pipe, self.options
        if getattr(pipe.unet, "_hf_hook", None) is not None:
            self.fallback = "the pipeline is offloaded (accelerate hooks); not compiled"
            log.warning("speed path: %s", self.fallback)
            return self
        if self.cache_folder is not None:
            configure_compile_cache(self.cache_folder)
        import torch._dynamo
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        inductor_config.conv_1x1_as_mm = opts.conv_1x1_as_mm
        if opts.dynamic:
            fx_config.use_duck_shape = False  # height == width must not become a guard
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if opts.fuse_qkv:
            pipe.unet.fuse_qkv_projections()
        if opts.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if opts.unet_mode:
            self._compile("unet", pipe.unet, opts.unet_mode)
        if opts.vae_mode:
            self._compile("vae_decoder", pipe.vae.decoder, opts.vae_mode)
            if opts.compile_encoder:
                self._compile("vae_encoder", pipe.vae.encoder, opts.vae_mode)
        if opts.prompt_cache > 0:
            self._cache_prompts(pipe)
        log.info("speed path on: %s; compile cache %s", json.dumps(asdict(self.options)), self.cache_folder)
        return self

    def add_pipe(self, pipe: Any, role: str) -> None:
        """Speed up another pipeline loaded later (the base, with the first ensemble job): its UNet is
        compiled like the refiner's, its VAE too unless it is the refiner's own (shared) VAE."""
        opts = self.options
        if self.fallback is not None or getattr(pipe.unet, "_hf_hook", None) is not None:
            return
        if opts.unet_mode and pipe.unet is not self.pipe.unet:
            self._compile(f"{role}_unet", pipe.unet, opts.unet_mode)
        if opts.vae_mode and pipe.vae is not self.pipe.vae:
            self._compile(f"{role}_vae_decoder", pipe.vae.decoder, opts.vae_mode)
            if opts.compile_encoder:
                self._compile(f"{role}_vae_encoder", pipe.vae.encoder, opts.vae_mode)
        if opts.prompt_cache > 0:
            self._cache_prompts(pipe)

    def _compile(self, name: str, module: torch.nn.Module, mode: str) -> None:
        if getattr(module, "_compiled_call_impl", None) is not None:
            return  # compiled already (a module shared between pipelines)
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": None if self.options.dynamic else False}
        inductor = self.options.backend == "inductor"
        if inductor and mode != "default":
            kwargs["mode"] = mode
        if not inductor:
            kwargs["backend"] = self.options.backend
        module.compile(**kwargs)
        compiled = module._compiled_call_impl
        cudagraphs = inductor and mode == "reduce-overhead" and self.device.startswith("cuda")
        dynamic = self.options.dynamic

        layout = torch.channels_last if self.options.channels_last else torch.contiguous_format

        def call(*args: Any, **kwargs: Any) -> Any:
            sample = args[0] if args else kwargs.get("sample")
            if isinstance(sample, torch.Tensor) and sample.dim() == 4:
                # One memory layout for every call: the engine's image tensor is a permuted view, and
                # a graph traced for other strides fails or recompiles.
                sample = sample.contiguous(memory_format=layout)
                if args:
                    args = (sample, *args[1:])
                else:
                    kwargs["sample"] = sample
                if dynamic:
                    torch._dynamo.maybe_mark_dynamic(sample, 2)
                    torch._dynamo.maybe_mark_dynamic(sample, 3)
            if cudagraphs:
                prepare_cudagraph_thread()
                torch.compiler.cudagraph_mark_step_begin()
            try:
                out = compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                self._switch_off(f"{name}: {type(exc).__name__}: {exc}")
                return module._call_impl(*args, **kwargs)
            return _clone(out) if cudagraphs else out

        module._compiled_call_impl = call
        self._modules[name] = module

    def _switch_off(self, reason: str) -> None:
        if self.fallback is None:
            self.fallback = reason[:2000]
            log.exception("speed path: a compiled call failed; running eagerly from now on (%s)", reason[:300])
        for module in self._modules.values():
            module._compiled_call_impl = None

    def _cache_prompts(self, pipe: Any) -> None:
        original = pipe.encode_prompt
        signature = inspect.signature(original)
        cache: OrderedDict[Any, Any] = OrderedDict()
        self._prompt_caches.append(cache)
        size = self.options.prompt_cache

        def key_of(bound: inspect.BoundArguments) -> Any:
            items = []
            for name, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) or (name == "lora_scale" and value is not None):
                    return None
                if isinstance(value, list):
                    value = tuple(value)
                elif isinstance(value, torch.device):
                    value = str(value)
                try:
                    hash(value)
                except TypeError:
                    return None
                items.append((name, value))
            return tuple(items)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)
            bound.apply_defaults()
            key = key_of(bound)
            if key is None:
                return original(*args, **kwargs)
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            out = original(*args, **kwargs)
            cache[key] = out
            while len(cache) > size:
                cache.popitem(last=False)
            return out

        pipe.encode_prompt = encode_prompt

    # --- per job --------------------------------------------------------------------------------

    def pad(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Pad an HxWx3 work image to its bucket; returns it and the original (height, width)."""
        h, w = rgb.shape[:2]
        if self.options.buckets:
            bw, bh = self.policy.bucket(w, h)
        else:
            bw, bh = -(-w // 64) * 64, -(-h // 64) * 64
        self.buckets_seen.add((bw, bh))
        return pad_to_size(rgb, bh, bw), (h, w)

    def after_job(self) -> dict[str, Any]:
        """Log and return the running statistics (one line per job: ``speed: {json}``)."""
        self._jobs += 1
        stats = self.stats()
        log.info("speed: %s", json.dumps(stats, sort_keys=True))
        return stats

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobs": self._jobs,
            **compile_counters(),
            "buckets": sorted(self.buckets_seen),
            "fallback": self.fallback,
            "prompt_cache_entries": sum(len(c) for c in self._prompt_caches),
        }
        if self.device.startswith("cuda"):
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
            out["reserved_gpu_bytes"] = int(torch.cuda.memory_reserved())
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.fallback is None,
            "compiled": sorted(self._modules),
            "options": asdict(self.options),
            "compile_cache": str(self.cache_folder) if self.cache_folder else None,
            "fallback": self.fallback,
        }


def setup(
    pipe: StableDiffusionXLImg2ImgPipeline,
    device: str,
    setting: str = "auto",
    cache_folder: Path | None = None,
    options: SpeedOptions | None = None,
) -> SpeedPath | None:
    """The speed path applied to ``pipe``, or None when ``setting`` resolves to off for ``device``."""
    if not resolve_speed(setting, device):
        return None
    path = SpeedPath(pipe, device, options or SpeedOptions.from_env(device), cache_folder)
    return path.apply()


__all__ = [
    "COMPILED",
    "SPEED_CHOICES",
    "SpeedOptions",
    "SpeedPath",
    "compile_counters",
    "configure_compile_cache",
    "default_compile_cache",
    "pad_to_size",
    "prepare_cudagraph_thread",
    "resolve_speed",
    "setup",
]
