"""The models: where they come from (``sources``: a folder, the Hugging Face cache, a single file, the demo model),
how they load (``pipelines``, ``refiner``: device and dtype), what is resident (``model_set``), where weights live
(``memory``, ``footprint``) and running out of memory (``oom``). The SDXL 1.0 configs ship in ``configs/``.

May use :mod:`~krita_sdxl.backend.setup` (the hub's file lists) and :mod:`~krita_sdxl.backend.common`; never the
engine, the service or the CLI."""
