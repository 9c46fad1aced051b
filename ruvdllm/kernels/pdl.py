"""Programmatic dependent launch (Hopper and later): a kernel starts while the one
before it on the stream is still running.

A cached denoising step of the 8B shape is about 420 kernels, most of them a few
microseconds long; inside a CUDA graph each is still scheduled only once the previous
one has finished and flushed its writes. With the launch attribute
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` (NVIDIA, CUDA programming
guide, "Programmatic Dependent Launch") the next grid is scheduled as soon as every
program of the running one has called ``griddepcontrol.launch_dependents``; it sets
itself up (a W4A8 product loads its first weight scales) and blocks in
``griddepcontrol.wait`` until the predecessor has finished and its writes are
visible. Stream capture keeps the dependency in a CUDA graph as a programmatic edge.
Measured on the H200 it saves 0.2-3 % of the 64-step W4A8 run (mean 1.5 %) and nothing
measurable at 8 steps; asking L2 for the product's weights before the wait made it slower
(docs/decisions.md, session 7).

Every kernel launched this way calls :func:`wait_inputs` before it reads anything
an earlier kernel wrote or writes anything at all, so the order of results is the
stream's; it lets its own dependents launch only after that wait, so at most one
grid waits ahead of the running one. The element-wise kernels and the W4A8 product's
use it; the others (weight-only int4 and int8, float8 quantization) launch plainly.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

from functools import cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# False launches every kernel plainly (the probe times both; docs/decisions.md, session 7).
ENABLED = True


@cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_args(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel that calls :func:`wait_inputs` with ``PDL``:
    programmatic dependent launch where the GPU has it (compute capability 9.0+)."""
    on = ENABLED and device.type == "cuda" and _hopper(device.index or 0)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_inputs(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """Block until the previous kernel on the stream has finished (its writes visible),
    then let the next one launch. A no-op without ``PDL``."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
