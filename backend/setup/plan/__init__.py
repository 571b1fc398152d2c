"""Setting up a local backend: the pure decisions, shared by the Krita plugin and ``krita-sdxl setup``.

Standard library only (Python 3.10+, no torch, diffusers, zmq or numpy): the plugin carries a copy
(``_vendor/common/krita_sdxl/backend/setup/plan/``) and runs it inside Krita before any backend exists.

* :mod:`.pythons`: which Python to build the environment with, or which one to install;
* :mod:`.machine`: the GPU facts (``nvidia-smi``, ROCm, Apple silicon) as read from their output;
* :mod:`.torch_builds`: the pinned PyTorch build and the index it comes from, for those facts;
* :mod:`.hub`: the models, the files of theirs to fetch, the Hugging Face cache layout, checksums;
* :mod:`.space`: whether the disks have room;
* :mod:`.steps`: the step list, each step's commands and what it will download, the state file;
* :mod:`.failures`: a failed step's why and what to do;
* :mod:`.events`: the download's JSON progress lines;
* :mod:`.procenv`: the environment the steps and the service start with.
"""

from .version import VERSION, mismatch

__all__ = ["VERSION", "mismatch"]
