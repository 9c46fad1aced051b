"""The greedy token of each row of logits and its probability, in one read of the logits.

Low-confidence remasking (LLaDA, Nie et al. 2025) needs, at each masked position, the
argmax token and its softmax probability. In torch that is an argmax, a float32 copy of
the logits, a softmax written out in full and a gather: at the 8B shape's vocabulary
(126 464) about 70 µs a step for 32 rows, four passes over 8-16 MB. The probability of
the argmax needs no softmax: it is ``1 / Σ_v e^{x_v - max}``. Here each program reduces
a chunk of a row to its maximum, the first index reaching it and ``Σ e^{x - max}``; a
second kernel merges a row's chunks (``Z = Σ_c s_c e^{m_c - m}``, the first chunk
holding the maximum gives the index, as ``torch.argmax`` returns the first).

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ruvdllm.kernels.pdl import pdl_args, wait_inputs

CHUNK = 4096  # vocabulary entries per program


@triton.jit
def _chunk_kernel(x_ptr, m_ptr, i_ptr, s_ptr, V, stride_x,  # type: ignore[no-untyped-def]
                  CHUNK: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf"))
    x = x.to(tl.float32)
    m = tl.max(x, axis=0)
    out = row * tl.num_programs(1) + c
    tl.store(m_ptr + out, m)
    tl.store(i_ptr + out, c * CHUNK + tl.argmax(x, axis=0, tie_break_left=True))
    tl.store(s_ptr + out, tl.sum(tl.exp(x - m), axis=0))


@triton.jit
def _merge_kernel(m_ptr, i_ptr, s_ptr, pred_ptr, p_ptr, C,  # type: ignore[no-untyped-def]
                  BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)
    rc = tl.arange(0, BLOCK_C)
    ok = rc < C
    m = tl.load(m_ptr + row * C + rc, mask=ok, other=float("-inf"))
    top = tl.max(m, axis=0)
    first = tl.min(tl.where(m == top, rc, BLOCK_C), axis=0)  # the first chunk at the top
    z = tl.sum(tl.where(ok, tl.load(s_ptr + row * C + rc, mask=ok, other=0.0)
                        * tl.exp(m - top), 0.0), axis=0)
    tl.store(pred_ptr + row, tl.load(i_ptr + row * C + first))
    tl.store(p_ptr + row, 1.0 / z)


def greedy_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(argmax (…,) int64, its softmax probability (…,) float32)`` of ``logits``
    ``(…, V)`` (CUDA, unit stride along ``V``; rows may be strided), the same as
    ``logits.argmax(-1)`` and ``softmax(logits.float())`` gathered there."""
    V = logits.shape[-1]
    if not logits.is_cuda or logits.stride(-1) != 1:
        raise ValueError("greedy_confidence: CUDA logits with unit stride along the vocabulary")
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, V)  # (R, V); a view when the rows are evenly strided
    R, C = rows.shape[0], triton.cdiv(V, CHUNK)
    dev = logits.device
    m = torch.empty(R, C, dtype=torch.float32, device=dev)
    s = torch.empty(R, C, dtype=torch.float32, device=dev)
    idx = torch.empty(R, C, dtype=torch.int64, device=dev)
    _chunk_kernel[(R, C)](rows, m, idx, s, V, rows.stride(0), CHUNK=CHUNK, num_warps=8,
                          **pdl_args(dev))
    pred = torch.empty(R, dtype=torch.int64, device=dev)
    prob = torch.empty(R, dtype=torch.float32, device=dev)
    _merge_kernel[(R,)](m, idx, s, pred, prob, C, BLOCK_C=triton.next_power_of_2(C),
                        num_warps=1, **pdl_args(dev))
    return pred.view(lead), prob.view(lead)
