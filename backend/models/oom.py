"""Running out of accelerator memory: recognising it, freeing memory, the retry policy, the advice.

A job that runs out of memory fails with the ``out_of_memory`` error code and a message that says
what to change; the service frees the GPU memory the job held and keeps serving. With
``--oom-retry`` the engine first steps down to the next lower memory mode (none -> balanced ->
model -> sequential) and runs the job once more; the lower mode then stays for later jobs.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


class OutOfMemoryError(RuntimeError):
    """A job ran out of accelerator memory; the message is the advice for the user."""


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Drop what the failed job left behind and hand cached blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def advice(exc: BaseException, mode: str | None, lower: str | None) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    text = f"out of GPU memory ({first}). Use a smaller selection or a smaller work size"
    if lower is not None:
        text += f", or start the service with a lower memory mode (--memory {lower}"
        text += f", now {mode})" if mode else ")"
        text += " or with --oom-retry"
    return text + "."


def job_message(exc: BaseException) -> str:
    """The ``error`` message for an out-of-memory exception that reached the worker."""
    if isinstance(exc, OutOfMemoryError):
        return str(exc)
    return advice(exc, None, "model")


def run_with_retry(
    job: Callable[[], T], retry: bool, step_down: Callable[[], str | None], explain: Callable[[BaseException], str]
) -> T:
    """Run ``job``; on running out of memory free memory and, if ``retry``, call ``step_down()`` (which
    switches to a lower memory mode, returning it, or None when there is none) and run it once more.
    A final failure raises :class:`OutOfMemoryError` with ``explain(exc)``. Memory is freed outside
    the ``except`` blocks: a live traceback would keep the failed job's tensors alive."""
    for attempt in (1, 2):
        try:
            return job()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failure = explain(exc)
            log.warning("out of memory (attempt %d): %s", attempt, exc)
        free_memory()
        if not retry or attempt == 2:
            raise OutOfMemoryError(failure)
        mode = step_down()
        log.warning("running the job again%s", f" in memory mode {mode!r}" if mode else " after freeing memory")
    raise AssertionError("unreachable")


class SimulatedOom:
    """Test aid (``--simulate-oom N``): the first N UNet calls raise ``torch.OutOfMemoryError``."""

    def __init__(self, count: int) -> None:
        self.left = count

    def attach(self, unet: torch.nn.Module) -> None:
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        if self.left > 0:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated: --simulate-oom)")
