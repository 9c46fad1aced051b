"""Sweep of the fused int4 kernel's configurations on the LLaDA-8B shapes (CUDA).

For every product of the 8B shape and every ``M`` of a step, each configuration
of :func:`ruvdllm.kernels.weight_only._int4_fused` (tiles, warps, pipeline
stages, split-K) is checked against a float32 product of the dequantized
weight, then timed with :func:`bench.gpu.graph_us`, the timer of the bench's
kernel rows (CUDA-graph replays over weight copies larger than L2), next to
bf16 cuBLAS and, from 128 rows, the chunked dequantize + cuBLAS path. Prints
the best configuration per (shape, M) last; every timing goes to
``$OUT/sweep.jsonl``.

``python3 -m bench.int4_sweep [seconds]`` (default 330: the sweep stops adding
configurations after that many seconds and still prints its table).

``python3 -m bench.int4_sweep --parts``: what bounds the fused kernel. Its loop with
the decoding removed (the bytes converted as they are) and with a bf16 weight read
in the same tiles instead, at the shipped configurations (docs/decisions.md).

(No ``from __future__ import annotations`` here: Triton reads the kernel's
``tl.constexpr`` annotations as objects.)
"""

import json
import os
import sys
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from bench.gpu import DEVICE_COPY_TBS, SHAPES, graph_us, rel_err, weight_copies
from ruvdllm.kernels.weight_only import (
    _ASM,
    Int4Config,
    _bucket,
    _int4_config,
    _int4_decode,
    _int4_dequant_matmul,
    _int4_fused,
    _int4_load,
)
from ruvdllm.quant import dequantize_int4

GROUP = 32
# (block_n, block_k, warps, stages) of the small-M configurations
SMALL = [(32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3),
         (64, 256, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3)]
# (block_m, block_n, block_k, warps, stages) of the fused kernel from 128 rows
LARGE = [(128, 64, 128, 4, 3), (128, 64, 128, 4, 4), (128, 64, 256, 4, 3), (64, 64, 128, 4, 3),
         (128, 32, 128, 4, 3), (256, 64, 128, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3)]


def configs(M: int, N: int) -> list[Int4Config]:
    """Candidate configurations for ``M`` rows of an ``N``-column weight."""
    if M > 64:
        return [Int4Config(bm, bn, bk, w, s, 1) for bm, bn, bk, w, s in LARGE]
    bm = max(16, _bucket(M))
    splits = (1,) if N >= 20_000 else (1, 2, 4)
    return [Int4Config(bm, bn, bk, warps, stages, split)
            for bn, bk, warps, stages in SMALL for split in splits]


def random_int4(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed bytes and bfloat16 scales in the stored layout (no zeros)."""
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(N, K // GROUP, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    return packed, scales


def host_us(fn: Any, n: int = 200) -> float:
    """Mean host time (µs) of issuing ``fn`` (no synchronisation)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def timer_check(log: Any) -> None:
    """``do_bench`` (as the bench used it) against :func:`graph_us`, 3 times each."""
    for N, K in ((4096, 4096), (4096, 12288)):
        packed, scales = random_int4(N, K)
        copies = weight_copies((packed, scales))
        for M in (32, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            fn = partial(_int4_fused, x, packed, scales)
            db = [float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
                  * 1e3 for _ in range(3)]
            gr = [graph_us([partial(_int4_fused, x, p, s) for p, s in copies]) for _ in range(3)]
            rec = dict(kind="timer", N=N, K=K, M=M, do_bench_us=db, graph_us=gr,
                       host_us=host_us(fn))
            log.write(json.dumps(rec) + "\n")
            print("timer", rec, flush=True)


@triton.jit
def _parts_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                  stride_xm, stride_wn, stride_sn, stride_ym,
                  ASM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  PART: tl.constexpr):
    """``_int4_kernel``'s loop (one row tile) with a part replaced: PART 0 as shipped,
    1 the packed bytes converted without decoding, 2 a bf16 weight ``(N, K)``."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    per_split = K // BLOCK_K // SPLIT_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(tl.program_id(1) * per_split, (tl.program_id(1) + 1) * per_split):
        if PART == 2:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + (it * BLOCK_K + rk)[None, :],
                        mask=n_ok[:, None], other=0.0)
        else:
            p, s = _int4_load(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn, GROUP, BLOCK_K)
            if PART == 1:  # (BN, BK/2) bytes -> (BN, BK) values, no decoding
                w = tl.reshape(tl.join(p, p), (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
            else:
                w = _int4_decode(p, s, x_ptr.dtype.element_ty, ASM, GROUP, BLOCK_N, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + rk)[:, None],
                     mask=(rm < M)[None, :], other=0.0)  # (BK, BM)
        acc = tl.dot(w, xt, acc)
    tl.atomic_add(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc,
                  mask=n_ok[:, None] & (rm < M)[None, :], sem="relaxed")


def _parts_call(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, cfg: Int4Config,
                part: int) -> torch.Tensor:
    M, K = x.shape
    y = torch.zeros(M, w.shape[0], dtype=torch.float32, device=x.device)
    _parts_kernel[(triton.cdiv(w.shape[0], cfg.block_n), cfg.split_k)](
        x, w, s, y, M, w.shape[0], K, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
        ASM=_ASM[x.dtype], GROUP=GROUP, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, PART=part, num_warps=cfg.warps,
        num_stages=cfg.stages)
    return y


def parts() -> None:
    """Time the shipped configurations with the decoding removed / with bf16 weights."""
    print("N x K | M | shipped | bytes not decoded | bf16 weight (µs, % of 2.94 TB/s)")
    for N, K in ((24576, 4096), (4096, 12288), (126464, 4096)):
        packed, scales = random_int4(N, K)
        int4s = weight_copies((packed, scales))
        bf16s = weight_copies((torch.randn(N, K, device="cuda", dtype=torch.bfloat16), scales))
        for M in (32, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            cfg = _int4_config(M, N, K)
            cells = []
            for part, copies in ((0, int4s), (1, int4s), (2, bf16s)):
                us = graph_us([partial(_parts_call, x, w, s, cfg, part) for w, s in copies])
                w0 = copies[0][0]
                nbytes = w0.numel() * w0.element_size() + (scales.numel() * 2 if part < 2 else 0)
                cells.append(f"{us:.1f} ({nbytes / us / 1e6 / DEVICE_COPY_TBS:.0%})")
            print(f"{N}x{K} | {M} | " + " | ".join(cells), flush=True)
        del packed, scales, int4s, bf16s
        torch.cuda.empty_cache()


def main() -> None:
    if sys.argv[1:] == ["--parts"]:
        parts()
        return
    out = os.environ.get("OUT", ".")
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 330
    t0 = time.time()
    torch.manual_seed(0)
    best: dict[tuple[int, int, int], dict[str, Any]] = {}
    base: dict[tuple[int, int, int], dict[str, float]] = {}
    with open(os.path.join(out, "sweep.jsonl"), "w") as log:
        timer_check(log)
        for N, K in SHAPES:
            packed, scales = random_int4(N, K)
            ref_w = dequantize_int4(packed, scales, torch.float32)
            copies = weight_copies((packed, scales))
            bf16 = weight_copies((ref_w.to(torch.bfloat16),))
            nbytes = packed.numel() + scales.numel() * 2
            for M in ((32, 64, 256, 384) if N > 100_000 else (32, 64, 128, 256, 384, 512)):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ ref_w.t()
                b = base[N, K, M] = {"bf16": graph_us([partial(F.linear, x, w) for (w,) in bf16]),
                                     "default": graph_us([partial(_int4_fused, x, p, s)
                                                          for p, s in copies])}
                if M >= 128:
                    b["dequant"] = graph_us([partial(_int4_dequant_matmul, x, p, s)
                                             for p, s in copies])
                for cfg in configs(M, N):
                    if time.time() - t0 > budget:
                        break
                    rec: dict[str, Any] = dict(N=N, K=K, M=M, cfg=list(cfg))
                    try:
                        y = _int4_fused(x, packed, scales, cfg)
                        rec["err"] = rel_err(y, ref)
                        if not rec["err"] < 1e-2:
                            raise RuntimeError(f"relative error {rec['err']}")
                        rec["us"] = graph_us([partial(_int4_fused, x, p, s, cfg)
                                              for p, s in copies])
                    except Exception as e:  # a failing configuration is a result too
                        rec["fail"] = str(e)[:200]
                    rec["pct"] = nbytes / rec["us"] / 1e6 / DEVICE_COPY_TBS * 100 \
                        if "us" in rec else 0.0
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if "us" in rec and ((N, K, M) not in best or rec["us"] < best[N, K, M]["us"]):
                        best[N, K, M] = rec
                print(f"{N}x{K} M={M} done {time.time() - t0:.0f}s", flush=True)
            del packed, scales, ref_w, copies, bf16
            torch.cuda.empty_cache()
    print("N x K | M | bf16 | default | dequant | best fused (cfg) | % of 2.94 TB/s")
    for (N, K, M), b in base.items():
        r = best.get((N, K, M))
        deq = f"{b['dequant']:.1f}" if "dequant" in b else "-"
        top = f"{r['us']:.1f} {r['cfg']} {r['pct']:.0f}%" if r else "-"
        print(f"{N}x{K} | {M} | {b['bf16']:.1f} | {b['default']:.1f} "
              f"({list(_int4_config(M, N, K))}) | {deq} | {top}")


if __name__ == "__main__":
    main()
