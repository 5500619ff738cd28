"""glibc's allocator, set up for a process that renders similar videos again and again.

By default glibc gives freed memory back to the kernel early. Blocks above its mmap threshold
(which adapts between 128 KiB and 32 MiB) get their own mapping, unmapped as soon as they are
freed. Free space at the top of the heap is released once it exceeds twice that threshold. A
render on the CPU allocates and frees tens to hundreds of MiB of tensors in every layer, so each
render took the same memory back from the kernel page by page. Measured on tiny-wan: 8,600-38,000
minor page faults per prompt encoding (25-88 ms, depending on where the threshold had drifted),
and about 600,000 per 256x256x33 render (2.5-2.9 s a render, most of it in the VAE decode).

``keep_freed_memory`` serves every block from the heap (no mmap: ``M_MMAP_MAX`` 0, so even the
blocks above 32 MiB stay), and lets the heap keep up to ``keep_mb`` MiB free at its top
(``M_TRIM_THRESHOLD``). Measured: prompt encoding 23-25 ms with no page faults; the 256x256x33
render 2.0 s with a few hundred (docs/benchmarks.md). The worker calls it in every pool process
before the engine loads (``KEEP_FREED_MEMORY_MB``). The memory stays bounded:
``tasks.worker.memory.release_freed_memory`` still trims once the resident set has grown 64 MiB or 25%
past its steady level. On a GPU most render memory is on the device, which this does not
touch; the decoded frames copied to the host still are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

__all__ = ["keep_freed_memory", "libc", "cuda_allocator"]

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
_LIBC: Any = None


def libc() -> Any:
    """The C library (ctypes), or None where there is none to load."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    return _LIBC or None


def keep_freed_memory(keep_mb: int) -> str:
    """Keep freed memory in this process for the next render; returns what is in effect, in words.

    ``keep_mb`` <= 0 leaves glibc's defaults. An operator's own ``MALLOC_MMAP_MAX_`` or
    ``MALLOC_TRIM_THRESHOLD_`` wins: glibc read it when the process started, and it is left
    alone. Both variables are also set in the environment (unless already set), so processes the
    engine starts (FastVideo's and Ray's workers) get the same settings when they start.
    """
    if keep_mb <= 0:
        return "glibc defaults (KEEP_FREED_MEMORY_MB=0)"
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return "left alone (not glibc)"
    said = []
    for variable, parameter, value in (
        ("MALLOC_MMAP_MAX_", M_MMAP_MAX, 0),
        ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, keep_mb * 2**20),
    ):
        if variable in os.environ:
            said.append(f"{variable}={os.environ[variable]} from the environment")
            continue
        if mallopt(parameter, value) != 1:  # out of this glibc's range: its default stays
            said.append(f"{variable}: glibc refused {value}, its default stays")
            continue
        os.environ[variable] = str(value)
        said.append(f"{variable}={value}")
    return "freed memory kept for the next render: " + ", ".join(said)


CUDA_ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def cuda_allocator(engine: str, backend: str) -> str:
    """torch's CUDA allocator for this engine: expandable segments unless a CUDA tensor crosses processes.

    Expandable segments cut out-of-memory errors from fragmentation across renders of different
    sizes. But FastVideo's mp executor hands the finished video to the pool process as a CUDA
    tensor (CUDA IPC), and a tensor allocated with expandable segments makes the receiver call
    ``pidfd_getfd``, which Docker's default seccomp profile refuses without CAP_SYS_PTRACE (pytorch
    issue 165685): every render would fail after its full denoising. So: ``expandable_segments:True``
    for diffusers and FastVideo's Ray executor (no CUDA IPC), unset for FastVideo's mp executor.
    An operator's own ``PYTORCH_CUDA_ALLOC_CONF`` wins (the self-check then proves the hand-over).
    Set in the environment before torch touches CUDA here, so FastVideo's workers inherit it.
    Returns what is in effect, in words.
    """
    if os.environ.get(CUDA_ALLOC_ENV):
        return f"{CUDA_ALLOC_ENV}={os.environ[CUDA_ALLOC_ENV]} from the environment"
    if engine == "fastvideo" and backend == "mp":
        return f"{CUDA_ALLOC_ENV} unset: FastVideo's mp executor hands its video over through CUDA IPC"
    os.environ[CUDA_ALLOC_ENV] = "expandable_segments:True"
    return f"{CUDA_ALLOC_ENV}=expandable_segments:True (ENGINE={engine}: no CUDA tensor crosses a process)"
