"""The thin TensorRT adapter for the ``trt`` speed level: the engine key of a loaded refiner, the ONNX
export of its UNet, the TensorRT build, and the runner that calls an engine with torch tensors.

``tensorrt`` and ``onnx`` are imported only here and only when an engine is built or loaded. The build
runs in a subprocess (``python -m krita_sdxl.backend.speed.trt.build``): it loads the
UNet from the model's files, exports it to ONNX with static shapes (one size bucket, one batch) and
builds a strongly typed engine in the UNet's own precision (fp16 on CUDA), so a crash or an
out-of-memory in the builder never takes the service down, and the exporter's Python work does not
compete with running jobs for the GIL. The service's background thread (backend/speed/trt/background.py)
waits for it, caches the engine (backend/speed/trt/cache.py) and switches the UNet over.

What runs here was not run on a GPU in this repository yet (see tests/benchmarks/DEVICE_RUN.md);
the ONNX export is checked on the CPU against onnxruntime where those are installed (tests/test_trt.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .background import BackgroundEngines, Runner, TrtUnet
from .cache import EngineCache, EngineKey

log = logging.getLogger(__name__)

INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
OUTPUT = "noise"
OPT_LEVEL = 3  # TensorRT's builder optimisation level (0-5; 3 is its default)
BUILD_TIMEOUT_S = 3600.0
HASH_MEMO = "weights-hashes.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# --- the key -------------------------------------------------------------------------------------


def weight_files(source: Any) -> list[Path]:
    """The files that hold the UNet's weights: the checkpoint itself, or the folder's ``unet/`` files."""
    path = Path(source.path)
    if path.is_file():
        return [path]
    folder = path / "unet"
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []


def weights_hash(files: list[Path], memo_folder: Path) -> str:
    """SHA-256 over the weight files' contents (names and bytes). Hashing 5 GB takes seconds, so the
    result is remembered in ``memo_folder`` by each file's path, size and modification time."""
    if not files:
        raise ValueError("no UNet weight files found")
    stamp = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    memo_path = memo_folder / HASH_MEMO
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(stamp), str):
        return memo[stamp]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
    value = digest.hexdigest()
    memo = {stamp: value, **{k: v for k, v in list(memo.items())[:15] if k != stamp}}
    memo_folder.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)
    return value


def runtime_identity(device: str) -> dict[str, str]:
    """TensorRT's version and the GPU's name and compute capability."""
    import tensorrt as trt  # pyright: ignore[reportMissingImports]  (the optional trt extra)

    index = torch.device(device).index
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}


def key_factory(pipe: Any, source: Any, weights: str, dtype: torch.dtype, runtime: dict[str, Any]) -> Callable:
    """``key_for(width, height, batch)`` for this refiner."""
    cfg = pipe.unet.config
    pooled = int(getattr(pipe.text_encoder_2.config, "projection_dim", 1280)) if pipe.text_encoder_2 else 1280
    time_ids = (int(cfg.projection_class_embeddings_input_dim) - pooled) // int(cfg.addition_time_embed_dim)
    model = f"{source.kind}:{Path(source.path).resolve()}:{type(pipe.unet).__name__}"

    def key_for(width: int, height: int, batch: int) -> EngineKey:
        return EngineKey(
            model=model, weights=weights, width=width, height=height, batch=batch, precision=dtype_name(dtype),
            text_dim=int(cfg.cross_attention_dim), extra=f"pooled={pooled};time_ids={time_ids};opt={OPT_LEVEL}",
            **runtime,
        )  # fmt: skip

    return key_for


# --- export (also runs on the CPU) -----------------------------------------------------------------


class ExportUnet(torch.nn.Module):
    """The UNet with plain tensor inputs and one output, as the engine takes them."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):  # type: ignore[no-untyped-def]
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def example_inputs(key: EngineKey, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    extra = dict(item.split("=") for item in key.extra.split(";") if "=" in item)
    pooled, time_ids = int(extra.get("pooled", 1280)), int(extra.get("time_ids", 5))
    g = torch.Generator("cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    b = key.batch
    return (
        randn(b, 4, key.height // 8, key.width // 8),
        torch.tensor([500.0], device=device),
        randn(b, key.text_tokens, key.text_dim),
        randn(b, pooled),
        torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0][:time_ids] + [0.0] * (time_ids - 5)] * b).to(device, dtype),
    )


def export_onnx(unet: torch.nn.Module, key: EngineKey, folder: Path, device: str) -> Path:
    """Export ``unet`` for one slot to ``folder/unet.onnx`` (weights as external data): the dynamo
    exporter first, the TorchScript one if that fails."""
    dtype = next(unet.parameters()).dtype
    model = ExportUnet(unet).eval()
    inputs = example_inputs(key, device, dtype)
    path = folder / "unet.onnx"
    common: dict[str, Any] = {"input_names": list(INPUTS), "output_names": [OUTPUT]}
    errors = []
    for dynamo in (True, False):
        try:
            with torch.no_grad():
                if dynamo:
                    torch.onnx.export(model, inputs, str(path), dynamo=True, external_data=True, **common)
                else:
                    torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17, **common)
            return path
        except Exception as exc:
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}"[:800])
            log.warning("ONNX export failed, %s", errors[-1][:300])
            for stale in folder.iterdir():
                stale.unlink()
    raise RuntimeError("the UNet could not be exported to ONNX: " + " | ".join(errors))


# --- TensorRT (GPU only) ---------------------------------------------------------------------------


def build_engine(onnx_path: Path, opt_level: int = OPT_LEVEL) -> bytes:
    """A strongly typed engine (each layer in the precision the ONNX model has: the UNet's)."""
    import tensorrt as trt  # pyright: ignore[reportMissingImports]  (the optional trt extra)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT could not parse the ONNX model: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = opt_level
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("the TensorRT build failed (its log above says why)")
    return bytes(serialized)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float16: torch.float16, trt.float32: torch.float32, trt.int32: torch.int32, trt.int64: torch.int64}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TrtRunner:
    """One deserialized engine and its execution context; called with the UNet's tensors."""

    def __init__(self, payload: bytes, device: str) -> None:
        import tensorrt as trt  # pyright: ignore[reportMissingImports]  (the optional trt extra)

        self.device = torch.device(device)
        if self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and the engine
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(payload)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(self.engine.get_tensor_shape(name))
            self.specs[name] = (shape, _torch_dtype(trt, self.engine.get_tensor_dtype(name)), is_input)
        if set(self.specs) != {*INPUTS, OUTPUT}:
            raise RuntimeError(f"the engine's tensors are {sorted(self.specs)}, expected {[*INPUTS, OUTPUT]}")

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor([float(timestep)])
        given = {"sample": sample, "timestep": timestep.reshape(-1)[:1], "encoder_hidden_states": encoder_hidden_states,
                 "text_embeds": text_embeds, "time_ids": time_ids}  # fmt: skip
        keep = []
        for name, (shape, dtype, is_input) in self.specs.items():
            if not is_input:
                continue
            tensor = given[name].to(self.device, dtype).contiguous()
            if tuple(tensor.shape) != shape:
                raise ValueError(f"engine input {name}: shape {tuple(tensor.shape)}, the engine takes {shape}")
            keep.append(tensor)  # alive until the engine is enqueued on this stream
            self.context.set_tensor_address(name, tensor.data_ptr())
        shape, dtype, _ = self.specs[OUTPUT]
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT could not run the engine")
        return out if out.dtype == sample.dtype else out.to(sample.dtype)


# --- wiring: the subprocess build and the hook -----------------------------------------------------


def subprocess_builder(source: Any, dtype: torch.dtype, device: str, workdir: Path) -> Callable[[EngineKey], bytes]:
    """``build(key)``: export and build in ``python -m krita_sdxl.backend.speed.trt.build``."""

    def build(key: EngineKey) -> bytes:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=workdir) as tmp:
            out = Path(tmp) / "engine.bin"
            spec = {
                "source": {k: str(v) if isinstance(v, Path) else v for k, v in source.__dict__.items()},
                "dtype": str(dtype).replace("torch.", ""),
                "device": device,
                "key": asdict(key),
                "out": str(out),
                "workdir": tmp,
                "opt_level": OPT_LEVEL,
            }
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            cmd = [sys.executable, "-m", "krita_sdxl.backend.speed.trt.build", str(spec_path)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                raise RuntimeError(f"the engine build exited with {proc.returncode}: {tail[-800:]}")
            return out.read_bytes()

    return build


def attach(pipe: Any, source: Any, device: str, folder: Path) -> TrtUnet:
    """TensorRT for ``pipe``'s UNet: engines in ``folder``, built in the background on first use."""
    dtype = next(pipe.unet.parameters()).dtype
    cache = EngineCache(folder)
    runtime = runtime_identity(device)
    weights = weights_hash(weight_files(source), folder)
    key_for = key_factory(pipe, source, weights, dtype, runtime)
    removed = cache.prune(key_for(0, 0, 0)) if folder.is_dir() else []
    if removed:
        log.info("TensorRT: removed %d engines of another TensorRT version or GPU", len(removed))

    def load(payload: bytes) -> Runner:
        return TrtRunner(payload, device)

    engines = BackgroundEngines(cache, key_for, subprocess_builder(source, dtype, device, folder / "work"), load)
    return TrtUnet(pipe.unet, engines).install()


__all__ = [
    "ExportUnet",
    "TrtRunner",
    "attach",
    "build_engine",
    "export_onnx",
    "key_factory",
    "weights_hash",
]
