"""Measured and dropped (session 10): the W4A8 product with TMA loads, and with Triton's
warp specialization (a producer warpgroup issues the loads, consumer warpgroups decode
and multiply). Kept so the figures in docs/decisions.md can be reproduced.

``python3 -m bench.tma_probe tma [rows,...]``: µs per product (:func:`bench.gpu.graph_us`)
of ruvdllm's W4A8 kernel at its chosen tile against the TMA kernel below over tiles
(1, 2 or 4 int4 groups per iteration), on every product of the 8B shape; each output
is checked against the chosen kernel's.
``python3 -m bench.tma_probe ws [rows,...]``: the same, one group per iteration, warp
specialization off and on (on: 64 weight rows a program; 128 do not compile).
``python3 -m bench.tma_probe compile [tma|ws]``: compile every tile for sm_90 only (no GPU).
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
import triton
import triton.language as tl

from ruvdllm.kernels.w4a8 import decode_int4

# (rows of x per program, weight rows per program, warps, stages, K split, groups per
# iteration, warp specialization)
Tile = tuple[int, int, int, int, int, int, bool]


@triton.jit
def _tma_group(acc, x_desc, w_desc, s_ptr, rn, pid_m, pid_n, g,  # type: ignore[no-untyped-def]
               stride_sg, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc`` plus group ``g``'s product, its tiles loaded by the tensor memory accelerator
    (otherwise :func:`ruvdllm.kernels.w4a8._w4a8_group`)."""
    p = w_desc.load([pid_n * BLOCK_N, g * (GROUP // 2)])  # (BN, G/2) packed bytes
    w = decode_int4(p, BLOCK_N, GROUP)  # (BN, G)
    x = x_desc.load([pid_m * BLOCK_M, g * GROUP])  # (BM, G) int8
    s = tl.load(s_ptr + g * stride_sg + rn).to(tl.float32)
    return acc + tl.dot(w, tl.trans(x), out_dtype=tl.int32).to(tl.float32) * s[:, None]


@triton.jit
def _tma_kernel(x_desc, w_desc, s_ptr, xs_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                stride_sg, stride_ym, stride_ys, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, UNROLL: tl.constexpr,
                STAGES: tl.constexpr, WS: tl.constexpr):
    """``yᵀ`` tile ``(BLOCK_N, BLOCK_M)`` over one K slice; slice ``k`` stored at
    ``y_ptr + k * stride_ys`` (float32 terms when K is split)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    first = pid_k * (K // GROUP // SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in tl.range(first, first + K // GROUP // SPLIT_K, UNROLL, num_stages=STAGES,
                      warp_specialize=WS):
        for u in tl.static_range(UNROLL):
            acc = _tma_group(acc, x_desc, w_desc, s_ptr, rn, pid_m, pid_n, g + u, stride_sg,
                             GROUP, BLOCK_M, BLOCK_N)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0) * (1.0 / 16)  # the 16 of 16 q
    out = y_ptr + pid_k * stride_ys + rm[None, :] * stride_ym + rn[:, None]
    tl.store(out, (acc * xs[None, :]).to(y_ptr.dtype.element_ty),
             mask=(rn < N)[:, None] & (rm < M)[None, :])


def tma_w4a8(q: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             tile: Tile) -> torch.Tensor:
    """``(S, M, N)``: the product's terms over the S slices of K (S = 1: bfloat16)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, warps, stages, split, unroll, ws = tile
    M, K = q.shape
    N = packed.shape[0]
    group = K // scales.shape[0]
    y = torch.empty(split, M, N, device=q.device,
                    dtype=torch.float32 if split > 1 else torch.bfloat16)
    xd = TensorDescriptor.from_tensor(q, [bm, group])
    wd = TensorDescriptor.from_tensor(packed, [bn, group // 2])
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _tma_kernel[grid](xd, wd, scales, xs, y, M, N, K, scales.stride(0), y.stride(1),
                      y.stride(0), GROUP=group, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split,
                      UNROLL=unroll, STAGES=stages, WS=ws, num_warps=warps)
    return y


def tiles(mode: str, M: int, N: int, K: int) -> list[Tile]:
    """The tiles timed: K split only where N alone gives few programs (as
    :func:`ruvdllm.kernels.w4a8.w4a8_config`); x tiles of the rows up to 64, else 64 or 128."""
    bms = [max(16, 1 << (M - 1).bit_length())] if M <= 64 else [64, 128]
    if mode == "ws":
        splits = [1] if N > 8192 or M > 64 else [2, 4] if K <= 4096 else [4, 8]
        st = 4 if M <= 64 else 3
        return [(bm, bn, w, st, sk, 1, ws) for bm in bms for bn, w, ws in
                ((64, 4, False), (64, 4, True), (128, 8, False)) for sk in splits]
    if M <= 64:
        sk = 1 if N > 8192 else 4 if K <= 4096 else 8
        return [(bms[0], 64, 4, st, sk, u, False) for st, u in ((3, 2), (4, 2), (3, 4), (4, 1))]
    return [(bm, 64, 4, st, 1, u, False) for bm in bms for st, u in ((3, 2), (4, 2), (3, 1))]


def compile_all(mode: str) -> None:
    """Compile each tile for sm_90 here (no GPU): which compile, threads, shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.gpu import SHAPES

    seen: set[Tile] = set()
    for N, K in SHAPES:
        for M in (32, 64, 384):
            for t in tiles(mode, M, N, K):
                if t in seen:
                    continue
                seen.add(t)
                bm, bn, w, st, sk, u, ws = t
                sig = {"x_desc": f"tensordesc<i8[{bm},128]>",
                       "w_desc": f"tensordesc<u8[{bn},64]>", "s_ptr": "*bf16", "xs_ptr": "*fp32",
                       "y_ptr": "*fp32" if sk > 1 else "*bf16", "M": "i32", "N": "i32",
                       "K": "i32", "stride_sg": "i32", "stride_ym": "i32", "stride_ys": "i32"}
                consts = {"GROUP": 128, "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk,
                          "UNROLL": u, "STAGES": st, "WS": ws}
                sig.update({c: "constexpr" for c in consts})
                try:
                    k = triton.compile(ASTSource(_tma_kernel, sig, consts),
                                       target=GPUTarget("cuda", 90, 32), options={"num_warps": w})
                except RuntimeError as e:
                    print(t, "does not compile:", str(e).splitlines()[-1][:200], flush=True)
                    continue
                threads = k.asm["ptx"].split(".reqntid ")[1].split()[0]
                print(t, "threads", threads, "shared", k.metadata.shared, flush=True)


def time_tiles(mode: str, rows: tuple[int, ...]) -> None:
    """Print µs per product of the chosen W4A8 kernel and of each TMA tile."""
    from bench.gpu import SHAPES, graph_us, rel_err, weight_copies
    from ruvdllm.kernels.w4a8 import w4a8_config, w4a8_matmul
    from ruvdllm.quant import W4A8Linear, quantize_activations_int8

    gen = torch.Generator(device="cuda").manual_seed(0)
    for N, K in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        q = W4A8Linear.from_linear(lin, 128)
        copies = weight_copies((q.weight, q.scales))
        for M in rows:
            if N > 100_000 and M > 64:  # the LM head only sees a step's block rows
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            xq, xs = quantize_activations_int8(x)
            ref = w4a8_matmul(xq, xs, q.weight, q.scales, torch.float32)
            times: dict[str, float | str] = {f"chosen {tuple(w4a8_config(M, N, K))}": round(
                graph_us([partial(w4a8_matmul, xq, xs, p, s, x.dtype) for p, s in copies]), 1)}
            for t in tiles(mode, M, N, K):
                y = tma_w4a8(xq, xs, q.weight, q.scales, t).float().sum(0)
                err = rel_err(y, ref)
                times[str(t)] = f"wrong ({err:.3g})" if err > 1e-2 else round(graph_us(
                    [partial(tma_w4a8, xq, xs, p, s, t) for p, s in copies]), 1)
            tma = {k: v for k, v in times.items() if k[0] == "(" and isinstance(v, float)}
            best = min(tma, key=lambda k: tma[k])
            print(f"N={N} K={K} M={M} best {best} {tma[best]}", json.dumps(times), flush=True)
        del lin, q, copies
        torch.cuda.empty_cache()


if __name__ == "__main__":
    cmd, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "compile" and rest in ([], ["tma"], ["ws"]):
        compile_all(rest[0] if rest else "tma")
    elif cmd in ("tma", "ws") and len(rest) <= 1:
        time_tiles(cmd, tuple(int(m) for m in rest[0].split(",")) if rest else (32, 64, 384))
    else:
        sys.exit("usage: python3 -m bench.tma_probe tma|ws [rows,...] | compile [tma|ws]")
