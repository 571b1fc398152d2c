"""The engine: one job's pixels through the SDXL pipelines and back. ``sdxl_engine`` wires it up; ``request`` is
the job as the engine sees it; ``stages`` plans the steps; ``denoise`` and ``latent_mask`` run them; ``work_image``,
``pixels``, ``alpha_fill``, ``hdr``, ``tiling`` and ``watermark`` carry the colour in and out; ``loading`` builds an
engine from the settings; ``identity`` is the benchmark stand-in.

May use :mod:`~krita_sdxl.backend.speed`, :mod:`~krita_sdxl.backend.models`, :mod:`~krita_sdxl.backend.common`
and the protocol; never sockets, the service or the CLI."""
