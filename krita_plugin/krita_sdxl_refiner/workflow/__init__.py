"""The plugin's workflows, in pure Python: the refine workflow (``controller``) and Set up (``setup_runner``).

They reach the outside only through the ports in ``core`` that the composition root hands them. May import:
``core``, the standard library, ``krita_sdxl.protocol`` and ``krita_sdxl.backend.setup.plan``. Never PyQt5,
krita, zmq, ``adapters`` or ``ui`` (checked by ``lint-imports``; typed with pyright).
"""
