"""The speed levels (``--speed``): ``levels`` (which level runs, a pure choice), ``setup`` (apply it to a loaded
refiner), ``speed_path`` (``torch.compile`` with few shapes: ``buckets``), ``fp8``, ``step_cache`` (``draft``),
``prompt_cache`` and TensorRT (``trt/``).

Acts on loaded pipelines; may use :mod:`~krita_sdxl.backend.models` (TensorRT builds load a UNet of their own),
never the engine, the service or the CLI."""
