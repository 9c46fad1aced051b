"""Sweep of int4 small-M kernel layouts and tile configurations on the 8B shapes (CUDA).

Two layouts of the same packed int4 weight (``ruvdllm.quant``: uint8 ``(N, K/2)``,
read as int32 ``(N, K/8)`` whose nibble ``s`` is column ``8j + s``):

* ``swap``: the stored layout; the weight tile is the left operand of ``tl.dot``
  (``yᵀ = W xᵀ``), so the small M is the product's narrow dimension;
* ``kmaj``: the int32 words transposed to ``(K/8, N)`` at load (consecutive output
  columns adjacent), scales ``(K/g, N)``; ``y = x Wᵀ`` as usual.

Prints a table of the best configuration per (shape, M) and writes every timing
to ``$OUT/sweep.jsonl``.
"""

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from ruvdllm.kernels.weight_only import int4_matmul
from ruvdllm.quant import dequantize_int4, quantize_int4


@triton.jit
def _dequant(u, s, MAGIC: tl.constexpr, BIAS: tl.constexpr,  # type: ignore[no-untyped-def]
             DTYPE: tl.constexpr):
    f = (u | MAGIC).to(tl.int16).to(DTYPE, bitcast=True)
    q = (f - (BIAS + 8)).to(DTYPE)
    return q * s


@triton.jit
def swap_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                stride_xm, stride_wn, stride_sn,
                stride_ym, SPLIT_K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = tl.arange(0, BLOCK_K // 8)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, BLOCK_K // GROUP)
    n_ok = rn < N
    m_ok = rm < M
    iters = K // BLOCK_K
    per = tl.cdiv(iters, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, iters)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(lo, hi):
        p = tl.load(w_ptr + rn[:, None] * stride_wn + (it * (BLOCK_K // 8) + rw)[None, :],
                    mask=n_ok[:, None], other=0) ^ -2004318072  # 0x88888888: v -> v + 8
        u = (p[:, :, None] >> shifts[None, None, :]) & 0xF
        u = tl.reshape(u, (BLOCK_N, BLOCK_K // GROUP, GROUP))
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (it * (BLOCK_K // GROUP) + rg)[None, :],
                    mask=n_ok[:, None], other=0.0)
        w = _dequant(u, s[:, :, None], 0x4300, 128.0, tl.bfloat16)
        w = tl.reshape(w.to(tl.bfloat16), (BLOCK_N, BLOCK_K))
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + rk)[:, None],
                     mask=m_ok[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    y = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    ok = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ok)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def kmaj_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                stride_xm, stride_wk, stride_sk,
                stride_ym, SPLIT_K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = tl.arange(0, BLOCK_K // 8)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, BLOCK_K // GROUP)
    n_ok = rn < N
    m_ok = rm < M
    iters = K // BLOCK_K
    per = tl.cdiv(iters, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, iters)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(lo, hi):
        p = tl.load(w_ptr + (it * (BLOCK_K // 8) + rw)[:, None] * stride_wk + rn[None, :],
                    mask=n_ok[None, :], other=0) ^ -2004318072  # 0x88888888: v -> v + 8
        u = (p[:, None, :] >> shifts[None, :, None]) & 0xF
        u = tl.reshape(u, (BLOCK_K // GROUP, GROUP, BLOCK_N))
        s = tl.load(s_ptr + (it * (BLOCK_K // GROUP) + rg)[:, None] * stride_sk + rn[None, :],
                    mask=n_ok[None, :], other=0.0)
        w = _dequant(u, s[:, None, :], 0x4300, 128.0, tl.bfloat16)
        w = tl.reshape(w.to(tl.bfloat16), (BLOCK_K, BLOCK_N))
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (it * BLOCK_K + rk)[None, :],
                    mask=m_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ok)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)

# One packed call decodes 4 bytes (8 nibbles) of a weight row and scales them:
# inputs $4 (4 bytes), $5/$6 (bf16x2 scales of elements 0-1 / 2-3); outputs
# $0/$1 the low nibbles of bytes 0-1 / 2-3, $2/$3 the high nibbles, as bf16x2.
ASM = (
    "{\n"
    ".reg .b32 r, t0, t1, a, one, bias, nz, z;\n"
    "mov.b32 one, 0x3F803F80;\n"
    "mov.b32 bias, 0xC308C308;\n"
    "mov.b32 nz, 0x80008000;\n"
    "mov.b32 z, 0;\n"
    "xor.b32 r, $4, 0x88888888;\n"
    "prmt.b32 t0, r, z, 0x4140;\n"
    "prmt.b32 t1, r, z, 0x4342;\n"
    "and.b32 a, t0, 0x000F000F; or.b32 a, a, 0x43004300; fma.rn.bf16x2 a, a, one, bias; "
    "fma.rn.bf16x2 $0, a, $5, nz;\n"
    "and.b32 a, t1, 0x000F000F; or.b32 a, a, 0x43004300; fma.rn.bf16x2 a, a, one, bias; "
    "fma.rn.bf16x2 $1, a, $6, nz;\n"
    "shr.b32 t0, t0, 4; shr.b32 t1, t1, 4;\n"
    "and.b32 a, t0, 0x000F000F; or.b32 a, a, 0x43004300; fma.rn.bf16x2 a, a, one, bias; "
    "fma.rn.bf16x2 $2, a, $5, nz;\n"
    "and.b32 a, t1, 0x000F000F; or.b32 a, a, 0x43004300; fma.rn.bf16x2 a, a, one, bias; "
    "fma.rn.bf16x2 $3, a, $6, nz;\n"
    "}"
)


@triton.jit
def asm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
               stride_xm, stride_wn, stride_sn,
               stride_ym, SPLIT_K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
               TWO_DOTS: tl.constexpr, ASM_STR: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, BLOCK_K // GROUP)
    n_ok = rn < N
    m_ok = rm < M
    iters = K // BLOCK_K
    per = tl.cdiv(iters, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, iters)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(lo, hi):
        p = tl.load(w_ptr + rn[:, None] * stride_wn + (it * (BLOCK_K // 2) + rj)[None, :],
                    mask=n_ok[:, None], other=0)  # (BN, BK/2) uint8
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (it * (BLOCK_K // GROUP) + rg)[None, :],
                    mask=n_ok[:, None], other=0.0)  # (BN, BK/G)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)),
                       (BLOCK_N, BLOCK_K // 2))
        w_lo, w_hi = tl.inline_asm_elementwise(ASM_STR, "=r,=r,=r,=r,r,r,r", [p, s],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                               pack=4)
        if TWO_DOTS:
            xe = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + 2 * rj)[:, None],
                         mask=m_ok[None, :], other=0.0)
            xo = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + 2 * rj + 1)[:, None],
                         mask=m_ok[None, :], other=0.0)
            acc = tl.dot(w_lo, xe, acc)
            acc = tl.dot(w_hi, xo, acc)
        else:
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + rk)[:, None],
                         mask=m_ok[None, :], other=0.0)
            acc = tl.dot(w, xt, acc)
    y = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    ok = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ok)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)


def launch(variant: str, x: Tensor, w: Tensor, s: Tensor, cfg: tuple[int, int, int, int, int],
           split: int, yf: Tensor, yb: Tensor) -> Tensor:
    BM, BN, BK, nw, ns = cfg
    M, K = x.shape
    N = yb.shape[1]
    grid = (triton.cdiv(N, BN), split, triton.cdiv(M, BM))
    y = yf if split > 1 else yb
    if split > 1:
        y.zero_()
    if variant in ("asm1", "asm2"):
        asm_kernel[grid](x, w, s, y, M, N, K, x.stride(0), w.stride(0), s.stride(0),
                         y.stride(0), split, GROUP=32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                         ATOMIC=split > 1, TWO_DOTS=variant == "asm2", ASM_STR=ASM,
                         num_warps=nw, num_stages=ns)
    else:
        kern = swap_kernel if variant == "swap" else kmaj_kernel
        kern[grid](x, w, s, y, M, N, K, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
                   split, GROUP=32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, ATOMIC=split > 1,
                   num_warps=nw, num_stages=ns)
    return yf.to(torch.bfloat16) if split > 1 else yb


def us(fn: Callable[..., object]) -> float:
    """Median time of ``fn()`` in µs (``...``: closures bind loop variables as defaults)."""
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")) * 1e3


def main() -> None:
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "sweep.jsonl"), "w") as log:
        t0 = time.time()
        budget = float(sys.argv[1]) if len(sys.argv) > 1 else 420
        shapes = [(4096, 4096), (12288, 4096), (24576, 4096), (4096, 12288), (126464, 4096)]
        torch.manual_seed(0)
        data: dict[tuple[int, int], dict[str, Tensor]] = {}
        for N, K in shapes:
            wf = torch.randn(N, K, device="cuda") * 0.02
            packed, scales = quantize_int4(wf, 32)
            del wf
            deq = dequantize_int4(packed, scales, torch.bfloat16)
            data[N, K] = dict(packed=packed, scales=scales, w32=packed.view(torch.int32),
                              w32t=packed.view(torch.int32).t().contiguous(),
                              st=scales.t().contiguous(), deq=deq)
        best: dict[tuple[str, int, int, int], dict[str, Any]] = {}
        base: dict[tuple[int, int, int], tuple[float, float]] = {}
        for M in (32, 64):
            for (N, K), d in data.items():
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                d[f"x{M}"] = x
                base[N, K, M] = (us(lambda x=x, d=d: F.linear(x, d["deq"])),
                                 us(lambda x=x, d=d: int4_matmul(x, d["packed"], d["scales"])))
        print("baselines done", time.time() - t0, flush=True)
        cfgs = [(bn, bk, w, st) for bn, bk, (w, st) in itertools.product(
            (64, 32, 128), (256, 128), ((4, 3), (4, 4), (8, 3)))]
        variants = os.environ.get("VARIANTS", "asm1,asm2").split(",")
        for bn, bk, nw, ns in cfgs:
            for M in (32, 64):
                for variant in variants:
                    if time.time() - t0 > budget:
                        break
                    cfg = (M, bn, bk, nw, ns)
                    for (N, K), d in data.items():
                        x = d[f"x{M}"]
                        w, s = {"swap": (d["w32"], d["scales"]),
                                "kmaj": (d["w32t"], d["st"])}.get(
                            variant, (d["packed"], d["scales"]))
                        yf = torch.zeros(M, N, device="cuda")
                        yb = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                        for split in (1, 2, 4, 8):
                            if split > 1 and N > 30000:
                                continue
                            try:
                                y = launch(variant, x, w, s, cfg, split, yf, yb)
                                ref = x.float() @ d["deq"].float().t()
                                err = float((y.float() - ref).norm() / ref.norm())
                                if err > 1e-2:
                                    raise RuntimeError(f"err {err}")
                                t = us(lambda variant=variant, x=x, w=w, s=s, cfg=cfg,
                                       split=split, yf=yf, yb=yb:
                                       launch(variant, x, w, s, cfg, split, yf, yb))
                            except Exception as e:
                                print("fail", variant, cfg, N, K, split, str(e)[:120],
                                      flush=True)
                                break
                            gb = (N * K // 2 + N * K // 32 * 2 + M * K * 2 + M * N * 2) / t / 1e3
                            rec: dict[str, Any] = dict(variant=variant, M=M, N=N, K=K, cfg=cfg,
                                                       split=split, us=t, pct=gb / 2940 * 100)
                            log.write(json.dumps(rec) + "\n")
                            k = (variant, N, K, M)
                            if k not in best or t < best[k]["us"]:
                                best[k] = rec
            print("cfg", (bn, bk, nw, ns), "done", time.time() - t0, flush=True)
    print("shape M | bf16 | old int4 | best per variant (cfg split) %BW", variants)
    for M in (32, 64):
        for N, K in shapes:
            row = [f"{N}x{K} M={M}", f"{base[N, K, M][0]:.1f}", f"{base[N, K, M][1]:.1f}"]
            for v in variants:
                r = best.get((v, N, K, M))
                row.append(f"{r['us']:.1f} {r['cfg'][1:]} s{r['split']} {r['pct']:.0f}%"
                           if r else "-")
            print(" | ".join(row))
    # robustness: top configs per variant across shapes (sum of best-split times)
    for v in variants:
        for M in (32, 64):
            tot: dict[tuple[tuple[int, ...], int, int], float] = {}
            with open(os.path.join(out, "sweep.jsonl")) as f:
                for line in f:
                    r = json.loads(line)
                    if r["variant"] != v or r["M"] != M:
                        continue
                    key = (tuple(r["cfg"]), r["N"], r["K"])
                    tot[key] = min(tot.get(key, 1e9), r["us"])
            per_cfg: dict[tuple[int, ...], dict[tuple[int, int], float]] = {}
            for (tiles, N, K), t in tot.items():
                per_cfg.setdefault(tiles, {})[N, K] = t
            full = {c: sum(ts.values()) for c, ts in per_cfg.items() if len(ts) == len(shapes)}
            top = sorted(full, key=full.__getitem__)[:3]
            print(v, M, "top cfgs (sum us over shapes):", [(c[1:], round(full[c], 1)) for c in top])


if __name__ == "__main__":
    main()
