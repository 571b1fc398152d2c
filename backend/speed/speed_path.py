"""The speed path: ``torch.compile`` of the UNet and the VAE, a compile cache, few compilations; and the
levels above it (TensorRT, FP8, the draft step cache).

``--speed`` takes a level (backend/speed/levels.py: ``off``, ``compile``, ``trt``, ``fp8``, ``draft``) or
``auto`` (``compile`` for CUDA, off elsewhere) or ``on`` (``compile`` anywhere: on the CPU it compiles C++
kernels, which the tests use); ``off``, the default, gives the plain eager path. backend/speed/setup.py
chooses the level that can run (one log line when it steps down) and applies it: ``trt`` hangs TensorRT
engines on the refiner UNet (backend/speed/trt/unet.py), ``fp8`` quantises its linear layers first
(backend/speed/fp8.py), ``draft`` adds the step cache (backend/speed/step_cache.py); all of them compile the VAE as
below. Measured on an H100
(tests/benchmarks/results/2026-11-26-h100-speed-path.md): a 1024 px refine in 0.86 s against 0.94 to 1.19 s
plain, PSNR 48 dB against it, no compilation for new sizes; 2.5 minutes of compiling at the first start and
26 s at later ones (the compile cache), which is why it is not the default.

What it does to a loaded pipeline, in place (``SpeedPath.apply``), in one of two scopes:

- ``regional`` (the default): every repeated block of the UNet and of the VAE encoder and decoder (the
  transformer blocks and the ResNet blocks, :data:`REGIONS`) is compiled on its own; the glue between
  them stays eager. Blocks of one configuration share one compiled graph, so a compilation is a few
  dozen small graphs instead of one huge one, and their sizes are symbolic (``dynamic: true``; weights keep
  static shapes). So every selection size runs on the same few graphs: no size buckets, work images are only
  padded to a multiple of 64 px, and a new selection size compiles nothing.
- ``whole``: the UNet is compiled whole (``fullgraph=True``) in ``reduce-overhead`` mode (CUDA graphs),
  the VAE encoder and decoder in the default mode, with static shapes: work images are padded to a size
  bucket (:mod:`.buckets`) and each bucket is one compilation (121 s for the refiner UNet alone on an
  H100, whose call then takes 48.7 ms against 57.0 ms for regional static blocks) and one CUDA graph.
  Its dynamic-shape variant (``dynamic: true``) had not finished compiling after 3.5 minutes on an H100
  (2026-11-26), so ``whole`` is for benchmarks and single-size services:

      KRITA_SDXL_SPEED_OPTIONS='{"scope": "whole", "unet_mode": "reduce-overhead", "dynamic": false, "buckets": true}'

- The compile caches (inductor's FX graph cache, the AOT autograd cache and Triton's kernels) live in a
  folder the service names (``--compile-cache``), so a restarted service skips inductor and Triton
  compilation and only re-traces the model.
- If a compiled call fails for any reason but lack of memory, the speed path switches itself off for good,
  logs why, and the call runs again eagerly: a job never fails because of the speed path.

The VAE already runs in bf16 on CUDA and prompt embeddings are cached for every path (the engine's
choices, not this module's). Not applied to offloaded pipelines (their hooks move weights between calls,
which compiled graphs cannot follow).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import prompt_cache
from .buckets import DEFAULT_POLICY, BucketPolicy
from .levels import CHOICES, Plan
from .levels import enabled as level_enabled

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

log = logging.getLogger(__name__)

SPEED_CHOICES = CHOICES  # auto, on, off, compile, trt, fp8, draft
OPTIONS_ENV = "KRITA_SDXL_SPEED_OPTIONS"  # JSON object overriding SpeedOptions fields (benchmarks, experts)
COMPILED = ("unet", "vae_encoder", "vae_decoder")
SCOPES = ("regional", "whole")
RECOMPILE_LIMIT = 256  # dynamo cache entries per code object (torch's default: 8)
_thread_state = threading.local()  # which SpeedPath configured torch's compiler in this thread
# The repeated blocks compiled in the regional scope: the UNet's transformer blocks (its attention and
# feed-forward, most of its time at 1024 px) and the ResNet blocks of the UNet and the VAE (convolutions
# with their group norms and activations, which compilation fuses).
REGIONS = ("BasicTransformerBlock", "ResnetBlock2D")


def resolve_speed(setting: str, device: str) -> bool:
    """Whether any speed path is asked for: ``auto`` means on CUDA only, ``off`` never."""
    if setting not in SPEED_CHOICES:
        raise ValueError(f"speed must be one of {', '.join(SPEED_CHOICES)}; got {setting!r}")
    return level_enabled(setting, device)


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
    _enable_compile_caches()
    return env


def _enable_compile_caches() -> None:
    """Switch inductor's FX graph cache and the AOT autograd cache on (in the calling thread: since
    torch 2.13 compiler settings are per thread)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


@dataclass(frozen=True)
class SpeedOptions:
    scope: str = "regional"  # "regional": each repeated block compiled on its own; "whole": each module whole
    regions: tuple[str, ...] = REGIONS  # class names compiled in the regional scope
    unet_mode: str | None = "default"  # torch.compile mode for the UNet; None: not compiled
    vae_mode: str | None = "default"  # for the VAE encoder and decoder; None: not compiled
    compile_encoder: bool = True
    dynamic: bool | None = True  # True: sizes symbolic from the start; None: torch's automatic; False: static
    channels_last: bool = False  # eager NHWC was 10% (UNet) and 55% (VAE decoder) slower on an H100
    fuse_qkv: bool = False  # no gain in eager on an H100 (1.27 vs 1.26 s)
    conv_1x1_as_mm: bool = True
    buckets: bool = False  # pad work images to size buckets (False: to a multiple of 64 px)
    backend: str = "inductor"  # torch.compile backend ("aot_eager": tracing only, for tests)
    fp8_granularity: str = "tensor"  # fp8 level: "tensor" or "row" scales (backend/speed/fp8.py)
    draft_interval: int = 3  # draft level: one full UNet step in this many (backend/speed/step_cache.py)
    draft_branch: int = 0  # draft level: the shallow blocks that always run (0: the outermost)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        object.__setattr__(self, "regions", tuple(self.regions))
        if self.scope == "regional" and "reduce-overhead" in (self.unet_mode, self.vae_mode):
            raise ValueError('mode "reduce-overhead" (CUDA graphs) needs scope "whole"')

    @classmethod
    def from_env(cls, device: str) -> SpeedOptions:
        raw = os.environ.get(OPTIONS_ENV, "").strip()
        if not raw:
            return cls()
        try:
            overrides = json.loads(raw)
            opts = replace(cls(), **overrides)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{OPTIONS_ENV} must be a JSON object of SpeedOptions fields: {exc}") from None
        if opts.unet_mode == "reduce-overhead" and not device.startswith("cuda"):
            opts = replace(opts, unet_mode="default")  # CUDA graphs need CUDA
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
    plan: Plan | None = None  # the level (backend/speed/levels.py); None: compile
    trt: Any = None  # the TensorRT hook on the refiner UNet (backend/speed/trt/background.py TrtUnet)
    notes: list[str] = field(default_factory=list)  # what did not go as planned, e.g. fp8 not applied
    fp8_layers: dict[str, int] = field(default_factory=dict)  # per UNet: linear layers in float8
    _step_caches: dict[str, Any] = field(default_factory=dict)  # per UNet: the draft level's StepCache
    buckets_seen: set[tuple[int, int]] = field(default_factory=set)
    _modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # every compiled module (or block)
    _owners: dict[str, int] = field(default_factory=dict)  # compiled name -> id of the pipeline's UNet/VAE
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
        self._configure_thread()
        if opts.fuse_qkv:
            pipe.unet.fuse_qkv_projections()
        if opts.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self._compile_pipe(pipe, "")
        log.info("speed path on (%s): %s; compile cache %s", self.level, json.dumps(asdict(self.options)),
                 self.cache_folder)  # fmt: skip
        return self

    @property
    def needs_warmup(self) -> bool:
        """Something to compile (or a TensorRT engine to ask for) before the first job."""
        return self.fallback is None and (bool(self._modules) or self.trt is not None)

    @property
    def level(self) -> str:
        return self.plan.level if self.plan is not None else "compile"

    def _configure_thread(self) -> None:
        """Set torch's compiler settings for the calling thread. Since torch 2.13 they are per thread
        (a value set in one thread is not seen in another), and the service compiles in its worker
        thread, not the one that loaded the model; so every compiled call makes sure, once per thread."""
        if getattr(_thread_state, "configured", None) is self:
            return
        import torch._dynamo
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        inductor_config.conv_1x1_as_mm = self.options.conv_1x1_as_mm
        if self.options.dynamic is not False:
            fx_config.use_duck_shape = False  # height == width must not become a guard
        # Blocks of one class, one graph per configuration (channels, flags): far more than 8 entries
        # for the ResNet block's code, the default limit, after which it would fail (fullgraph).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        if self.cache_folder is not None:
            _enable_compile_caches()
        _thread_state.configured = self

    def add_pipe(self, pipe: Any, role: str) -> None:
        """Speed up another pipeline loaded later (the base, with the first ensemble job): its UNet is
        compiled like the refiner's, its VAE too unless it is the refiner's own (shared) VAE."""
        if self.fallback is not None or getattr(pipe.unet, "_hf_hook", None) is not None:
            return
        self._compile_pipe(pipe, f"{role}_")

    def forget(self, pipe: Any) -> None:
        """Drop every reference to ``pipe``'s compiled modules (the model is being unloaded)."""
        owners = {id(pipe.unet), id(pipe.vae)} - {id(self.pipe.unet), id(self.pipe.vae)}
        for name in [n for n, cache in self._step_caches.items() if id(cache.unet) in owners]:
            self._step_caches.pop(name).uninstall()
        for name in [n for n, owner in self._owners.items() if owner in owners]:
            self._modules.pop(name, None)
            self._owners.pop(name, None)

    def close(self) -> None:
        """The refiner is being unloaded (or the speed path dropped): free what outlives it, the TensorRT
        engines and their background thread."""
        if self.trt is not None:
            self.trt.uninstall()
            self.trt.engines.close()
            self.trt = None

    def _compile_pipe(self, pipe: Any, prefix: str, vae: bool = True) -> None:
        opts, plan = self.options, self.plan
        if plan is not None and plan.unet == "fp8" and opts.unet_mode is not None:
            self._quantize(pipe.unet, f"{prefix}unet")
        targets: list[tuple[str, torch.nn.Module, str | None, torch.nn.Module]] = [
            (f"{prefix}unet", pipe.unet, opts.unet_mode, pipe.unet)
        ]
        if plan is not None and plan.step_cache:
            self._add_step_cache(pipe.unet, f"{prefix}unet")
        if not vae:
            targets = targets[:1]
        else:
            targets.append((f"{prefix}vae_decoder", pipe.vae.decoder, opts.vae_mode, pipe.vae))
        if vae and opts.compile_encoder:
            targets.append((f"{prefix}vae_encoder", pipe.vae.encoder, opts.vae_mode, pipe.vae))
        for name, module, mode, owner in targets:
            if mode is None:
                continue
            if opts.scope == "whole":
                self._compile(name, module, mode, owner)
                continue
            blocks = [(n, m) for n, m in module.named_modules() if type(m).__name__ in opts.regions]
            if not blocks:
                log.warning("speed path: no %s block in %s; compiling it whole", "/".join(opts.regions), name)
                self._compile(name, module, mode, owner)
            for sub, block in blocks:
                self._compile(f"{name}.{sub}", block, mode, owner)

    def _quantize(self, unet: torch.nn.Module, name: str) -> None:
        """fp8: the UNet's transformer linears in float8 (backend/speed/fp8.py); on failure it stays in its
        own precision and the level runs as ``compile`` (one log line)."""
        from .fp8 import quantize_unet

        if name in self.fp8_layers:
            return
        count, why = quantize_unet(unet, self.options.fp8_granularity)
        self.fp8_layers[name] = count
        if why is not None and name == "unet" and self.plan is not None:  # the refiner's: the level steps down
            self.plan = replace(self.plan, level="compile", unet="torch", reasons=(*self.plan.reasons, why))
            log.warning("%s", self.plan.summary())
        elif why is not None:
            self.notes.append(f"{name}: fp8 not applied: {why}")
            log.warning("speed fp8: the %s stays in its own precision: %s", name, why)
        else:
            log.info("speed fp8: %d linear layers of the %s in float8", count, name)

    def _add_step_cache(self, unet: torch.nn.Module, name: str) -> None:
        from .step_cache import install

        if self.options.scope != "regional":
            self.notes.append(f"{name}: no step cache in the {self.options.scope} scope")
            log.warning("speed draft: the step cache needs the regional scope; %s runs without it", name)
            return
        self._step_caches[name] = install(unet, self.options.draft_interval, self.options.draft_branch)

    def _compile(self, name: str, module: torch.nn.Module, mode: str, owner: torch.nn.Module) -> None:
        if getattr(module, "_compiled_call_impl", None) is not None:
            return  # compiled already (a module shared between pipelines)
        whole = self.options.scope == "whole"
        dynamic = self.options.dynamic
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": dynamic if not whole or dynamic is False else None}
        inductor = self.options.backend == "inductor"
        if inductor and mode != "default":
            kwargs["mode"] = mode
        if not inductor:
            kwargs["backend"] = self.options.backend
        module.compile(**kwargs)
        compiled = module._compiled_call_impl
        assert compiled is not None, f"{name}: torch.compile left no compiled call"
        cudagraphs = inductor and mode == "reduce-overhead" and self.device.startswith("cuda")
        mark = whole and dynamic is True
        layout = torch.channels_last if self.options.channels_last else torch.contiguous_format

        def call(*args: Any, **kwargs: Any) -> Any:
            if whole:
                sample = args[0] if args else kwargs.get("sample")
                if isinstance(sample, torch.Tensor) and sample.dim() == 4:
                    # One memory layout for every call: the engine's image tensor is a permuted view,
                    # and a graph traced for other strides fails or recompiles.
                    sample = sample.contiguous(memory_format=layout)
                    if args:
                        args = (sample, *args[1:])
                    else:
                        kwargs["sample"] = sample
                    if mark:
                        torch._dynamo.maybe_mark_dynamic(sample, 2)
                        torch._dynamo.maybe_mark_dynamic(sample, 3)
            self._configure_thread()
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
        self._owners[name] = id(owner)

    def _switch_off(self, reason: str) -> None:
        if self.fallback is None:
            self.fallback = reason[:2000]
            log.exception("speed path: a compiled call failed; running eagerly from now on (%s)", reason[:300])
        for module in self._modules.values():
            module._compiled_call_impl = None

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
            "prompt_cache_entries": prompt_cache.entries(self.pipe),
            "level": self.level,
        }
        if self.trt is not None:
            out["trt_engines"] = self.trt.engines.status()
            out["trt_calls"] = dict(self.trt.calls)
        if self._step_caches:
            out["step_cache"] = {name: cache.describe() for name, cache in self._step_caches.items()}
        if self.device.startswith("cuda"):
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
            out["reserved_gpu_bytes"] = int(torch.cuda.memory_reserved())
        return out

    def compiled_counts(self) -> dict[str, int]:
        """Compiled modules (whole scope) or blocks (regional scope) per model part."""
        counts: dict[str, int] = {}
        for name in self._modules:
            part = name.split(".", 1)[0]
            counts[part] = counts.get(part, 0) + 1
        return counts

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.fallback is None,
            "level": self.level,
            "requested": self.plan.requested if self.plan is not None else None,
            "level_reasons": list(self.plan.reasons) if self.plan is not None else [],
            "notes": list(self.notes),
            "fp8_layers": dict(self.fp8_layers),
            "tensorrt": self.trt.engines.status() if self.trt is not None else None,
            "scope": self.options.scope,
            "compiled": self.compiled_counts(),
            "options": asdict(self.options),
            "compile_cache": str(self.cache_folder) if self.cache_folder else None,
            "fallback": self.fallback,
        }


__all__ = [
    "COMPILED",
    "REGIONS",
    "SCOPES",
    "SPEED_CHOICES",
    "SpeedOptions",
    "SpeedPath",
    "compile_counters",
    "configure_compile_cache",
    "default_compile_cache",
    "pad_to_size",
    "prepare_cudagraph_thread",
    "resolve_speed",
]
