"""Measured and dropped (session 11): one persistent kernel for a denoising step's W4A8
products. Kept so the figures in docs/decisions.md can be reproduced.

A cached step of the 8B shape runs 128 layer products (q/k/v, output, gate/up, down in
each of 32 layers), each its own kernel of 64-512 programs. Session 9's loads-only
skeleton showed that even a kernel that only reads the int4 bytes stays at 2.6-3.1 TB/s
on these sizes: every product pays its ramp (the first bytes' latency), its tail (the
last wave of programs) and the launch. A persistent kernel (a fixed number of programs
per SM looping over the work of every product in turn, as "megakernel" decoders do)
pays them once per step; what it pays instead is a grid-wide barrier between dependent
products. This probe measures both sides:

* ``separate``: the step's 128 products as the fast path runs them
  (:func:`ruvdllm.kernels.w4a8.w4a8_matmul` with split-K terms, dependent launches), one
  CUDA graph;
* ``chain``: one launch of :func:`_chain_kernel`: ``programs`` programs (1-3 per SM, as
  many as can be resident at once) go through the same products in the same order,
  each taking every ``programs``-th tile of (column tiles) x (K slices), K split
  ``few`` or ``many`` ways, with ``syncs`` grid-wide barriers after each product (0: no
  ordering at all, the streaming ceiling; 2: the second barrier's cost is what a
  barrier costs). Each tile is the shipped one (:func:`ruvdllm.kernels.w4a8.w4a8_tile`),
  or with ``flat`` one loop over a program's (tile, group) iterations so that the
  copies run on into the next tile.

Only the products: each reads fixed int8 rows (the real step's norms, attention and
quantizations are not in it), so ``chain`` bounds what a step-long kernel could give
the products. Every product's output of the last layer is checked against the
separate kernel's.

``python3 -m bench.persistent_probe [rows,...]``: µs per step and TB/s of the layer
weights, rows 32 and 64 by default (a cached step's block, and a block with the one
just committed). ``python3 -m bench.persistent_probe compile``: compile for sm_90
only (no GPU) and print the grid barrier's PTX.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import json
import sys
from functools import partial
from itertools import product

import torch
import triton
import triton.language as tl

from ruvdllm.kernels.w4a8 import _w4a8_pair, w4a8_tile
from ruvdllm.kernels.weight_only import store_tile

GROUP = 128
BLOCK_N = 64
UNROLL = 2
# (N, K) of a layer's products, in the order a step runs them (LLaDA-8B)
PRODUCTS = ((12288, 4096), (4096, 4096), (24576, 4096), (4096, 12288))
# K split per product: few (fewer, longer tiles) and many (more, shorter)
SPLITS = {"few": (1, 2, 1, 2), "many": (2, 4, 2, 8)}
SPIN_LIMIT = 1 << 18  # a barrier that waits longer than this counts an error
REGISTERS_PER_SM = 65536  # every GPU since Volta


@triton.jit
def _product(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, layer, M, N, K,  # type: ignore[no-untyped-def]
             split, pid, programs, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, FLATTEN: tl.constexpr):
    """Program ``pid``'s share of one layer's product: tiles ``pid, pid + programs, ...``
    of ``(column tiles) x (K slices)``, each slice's float32 term stored apart.
    Weights ``(layers, N, K/2)``, scales ``(layers, K/GROUP, N)``, ``y`` ``(S, M, N)``.

    Without ``FLATTEN`` a loop over tiles around the shipped tile's K loop (Triton
    pipelines the K loop only, so each tile starts its loads afresh); with it one loop
    over the program's (tile, group) iterations, so the pipeline's copies run on into
    the next tile (the shape of Triton's persistent matmul tutorial)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    w = w_ptr + layer.to(tl.int64) * N * (K // 2)
    s = s_ptr + layer.to(tl.int64) * (K // GROUP) * N
    if not FLATTEN:
        for t in range(pid, tiles_n * split, programs):
            w4a8_tile(x_ptr, xs_ptr, w, s, y_ptr, M, N, K, t % tiles_n, t // tiles_n, 0,
                      split, K, K // 2, N, N, M * N, GROUP, BLOCK_M, BLOCK_N, UNROLL, False,
                      False)
    else:
        per_split = K // GROUP // split
        iters = per_split // UNROLL  # iterations a tile
        total = tl.cdiv(tl.maximum(tiles_n * split - pid, 0), programs) * iters
        ru = tl.arange(0, UNROLL)
        rb = tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0) * (1.0 / 16)  # the 16 of 16 q
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        s_next = tl.load(s + ((pid // tiles_n) * per_split + ru)[:, None] * N
                         + ((pid % tiles_n) * BLOCK_N + rb)[None, :])  # (U, BN)
        for i in range(0, total):
            t = pid + (i // iters) * programs
            ki = i % iters
            rn = (t % tiles_n) * BLOCK_N + rb
            g = (t // tiles_n) * per_split + ki * UNROLL
            sc = s_next.to(tl.float32)
            j = tl.minimum(i + 1, total - 1)  # the next iteration's tile and groups
            tj = pid + (j // iters) * programs
            s_next = tl.load(s + ((tj // tiles_n) * per_split + (j % iters) * UNROLL + ru)
                             [:, None] * N + ((tj % tiles_n) * BLOCK_N + rb)[None, :])
            acc = _w4a8_pair(acc, x_ptr, w, tl.permute(sc, (1, 0)), rn, rm, rn < N, m_ok, g,
                             K, K // 2, GROUP, BLOCK_N)
            if ki == iters - 1:
                store_tile(y_ptr + (t // tiles_n) * M * N, acc * xs[None, :], rn, rm,
                           rn < N, m_ok, N, False)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)


@triton.jit
def _grid_syncs(bar_ptr, err_ptr, arrivals, syncs, programs,  # type: ignore[no-untyped-def]
                SPIN_LIMIT: tl.constexpr):
    """``syncs`` grid-wide barriers in a row; the count of arrivals after them.

    Each: the program's threads meet (``bar.sync``), one arrival is added at
    ``bar_ptr`` with release semantics at GPU scope (cumulative: it publishes what
    every thread of the program wrote before the meeting), and the count is read with
    acquire semantics until all ``programs`` have arrived. A wait past ``SPIN_LIMIT``
    reads is counted at ``err_ptr`` and given up (the probe reports it, not hangs)."""
    for _ in range(syncs):
        arrivals += programs
        tl.debug_barrier()
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        spins = 0
        while (seen < arrivals) & (spins < SPIN_LIMIT):
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if seen < arrivals:
            tl.atomic_add(err_ptr, 1, sem="relaxed")
        tl.debug_barrier()
    return arrivals


@triton.jit
def _chain_kernel(x_ptrs, xs_ptrs, w_ptrs, s_ptrs, y_ptrs,  # type: ignore[no-untyped-def]
                  bar_ptr, err_ptr, M, layers, syncs, programs, SHAPES: tl.constexpr,
                  SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, FLATTEN: tl.constexpr,
                  SPIN_LIMIT: tl.constexpr):
    """Every layer's products in order (``SHAPES[i]`` = (N, K) of product i, its rows,
    weights, scales and output the i-th pointer of each tuple), ``syncs`` grid barriers
    after each."""
    pid = tl.program_id(0)
    arrivals = 0
    for layer in range(layers):
        for i in tl.static_range(len(SHAPES)):
            _product(x_ptrs[i], xs_ptrs[i], w_ptrs[i], s_ptrs[i], y_ptrs[i], layer, M,
                     SHAPES[i][0], SHAPES[i][1], SPLITS[i], pid, programs, GROUP, BLOCK_M,
                     BLOCK_N, UNROLL, FLATTEN)
            arrivals = _grid_syncs(bar_ptr, err_ptr, arrivals, syncs, programs, SPIN_LIMIT)


class Step:
    """Random int4 weights of every layer product (``(layers, N, K/2)`` bytes, scales
    ``(layers, K/GROUP, N)``), int8 rows, and the outputs both ways of running a step."""

    def __init__(self, rows: int, layers: int = 32) -> None:
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.rows, self.layers = rows, layers
        self.weights = [
            (torch.randint(0, 256, (layers, N, K // 2), dtype=torch.uint8, device="cuda",
                           generator=gen),
             (torch.rand(layers, K // GROUP, N, device="cuda", generator=gen) * 0.02
              + 0.001).to(torch.bfloat16))
            for N, K in PRODUCTS]
        self.x = {K: (torch.randint(-127, 128, (rows, K), dtype=torch.int8, device="cuda",
                                    generator=gen),
                      torch.rand(rows, device="cuda", generator=gen) * 0.01 + 0.001)
                  for K in (4096, 12288)}
        self.bar = torch.zeros(1, dtype=torch.int32, device="cuda")
        self.err = torch.zeros(1, dtype=torch.int32, device="cuda")
        self.ys = [torch.empty(max(s[i] for s in SPLITS.values()), rows, N, device="cuda")
                   for i, (N, _) in enumerate(PRODUCTS)]

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights for t in pair)

    def separate(self) -> list[torch.Tensor]:
        """The step as the fast path runs it; the last layer's products (the terms of
        each K slice)."""
        from ruvdllm.kernels.w4a8 import w4a8_matmul

        out: list[torch.Tensor] = []
        for layer in range(self.layers):
            out = [w4a8_matmul(*self.x[K], w[layer], s[layer], torch.bfloat16, partials=True)
                   for (w, s), (_, K) in zip(self.weights, PRODUCTS, strict=True)]
        return out

    def chain(self, programs: int, splits: tuple[int, int, int, int], syncs: int,
              flatten: bool, layers: int | None = None) -> triton.compiler.CompiledKernel:
        """The step as one persistent launch (the barrier count zeroed first)."""
        self.bar.zero_()
        rows = [self.x[K] for _, K in PRODUCTS]
        return _chain_kernel[(programs,)](
            tuple(x for x, _ in rows), tuple(xs for _, xs in rows),
            tuple(w for w, _ in self.weights), tuple(s for _, s in self.weights),
            tuple(self.ys), self.bar, self.err, self.rows,
            self.layers if layers is None else layers, syncs, programs,
            SHAPES=PRODUCTS, SPLITS=splits, GROUP=GROUP,
            BLOCK_M=max(16, triton.next_power_of_2(self.rows)), BLOCK_N=BLOCK_N,
            UNROLL=UNROLL, FLATTEN=flatten, SPIN_LIMIT=SPIN_LIMIT, num_warps=4, num_stages=3)

    def chain_outputs(self, splits: tuple[int, int, int, int]) -> list[torch.Tensor]:
        return [y[:s].sum(0) for y, s in zip(self.ys, splits, strict=True)]


def resident(kernel: triton.compiler.CompiledKernel) -> int:
    """How many programs of ``kernel`` the GPU holds at once: a grid barrier needs all."""
    props = torch.cuda.get_device_properties(0)
    threads = 32 * kernel.metadata.num_warps
    per_sm = min(props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024),
                 REGISTERS_PER_SM // (kernel.n_regs * threads),
                 props.max_threads_per_multi_processor // threads)
    return per_sm * props.multi_processor_count


def run(rows: tuple[int, ...]) -> None:
    """Print µs per step of each way, its TB/s of layer weights, and the check."""
    from bench.gpu import graph_us, rel_err

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in rows:
        step = Step(m)
        gb = step.weight_bytes()
        ref = [y.float().sum(0) for y in step.separate()]
        times: dict[str, float | str] = {"separate": round(graph_us([step.separate], 10), 1)}
        for (name, splits), flat in product(SPLITS.items(), (False, True)):
            label = f"{name}{' flat' if flat else ''}"
            for programs in (sms, 2 * sms, 3 * sms):
                if programs > resident(step.chain(programs, splits, 0, flat, layers=0)):
                    times[f"{label} p{programs}"] = "not all programs resident"
                    continue
                step.chain(programs, splits, 1, flat)
                torch.cuda.synchronize()
                errs = [rel_err(y, r)
                        for y, r in zip(step.chain_outputs(splits), ref, strict=True)]
                if max(errs) > 1e-2 or int(step.err.item()):  # the bfloat16 outputs: ~2e-3
                    times[f"{label} p{programs}"] = (f"wrong (errors {max(errs):.3g}, "
                                                    f"barrier timeouts {int(step.err.item())})")
                    step.err.zero_()
                    continue
                for syncs in (0, 1, 2):
                    times[f"{label} p{programs} s{syncs}"] = round(graph_us(
                        [partial(step.chain, programs, splits, syncs, flat)], 10), 1)
        if int(step.err.item()):
            times["barrier timeouts"] = int(step.err.item())
        rates = {k: round(gb / v / 1e6, 2) for k, v in times.items() if isinstance(v, float)}
        print(f"rows {m}: weights {gb / 1e9:.2f} GB; µs per step", json.dumps(times),
              "TB/s", json.dumps(rates), flush=True)
        del step
        torch.cuda.empty_cache()


def compile_only() -> None:
    """Compile the chain for sm_90 here (no GPU); print its resources and the barrier."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n = len(PRODUCTS)
    tuples = {"x_ptrs": "*i8", "xs_ptrs": "*fp32", "w_ptrs": "*u8", "s_ptrs": "*bf16",
              "y_ptrs": "*fp32"}
    sig: dict[str, object] = {k: (v,) * n for k, v in tuples.items()}
    sig |= {"bar_ptr": "*i32", "err_ptr": "*i32", "M": "i32", "layers": "i32",
            "syncs": "i32", "programs": "i32"}
    # what a launch specializes on: 16-byte aligned pointers, rows a multiple of 16
    paths: list[tuple[int, ...]] = [(a, i) for a in range(len(tuples)) for i in range(n)]
    paths += [(a,) for a in range(len(tuples), len(tuples) + 3)]  # bar_ptr, err_ptr, M
    aligned = {p: [["tt.divisibility", 16]] for p in paths}
    for bm, splits, flat in product((32, 64), SPLITS.values(), (False, True)):
        consts = {"SHAPES": PRODUCTS, "SPLITS": splits, "GROUP": GROUP, "BLOCK_M": bm,
                  "BLOCK_N": BLOCK_N, "UNROLL": UNROLL, "FLATTEN": flat,
                  "SPIN_LIMIT": SPIN_LIMIT}
        src = ASTSource(_chain_kernel, sig | {c: "constexpr" for c in consts}, consts,
                        aligned)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": 3})
        ptx = k.asm["ptx"]
        print(f"BLOCK_M {bm} splits {splits} flatten {flat}: shared {k.metadata.shared} B, "
              f"loops {k.asm['ttgir'].count('scf.for')}, cp.async {ptx.count('cp.async.cg')}, "
              f"wgmma {ptx.count('wgmma.mma_async')}", flush=True)
    atoms = [line.strip() for line in ptx.splitlines() if "acquire" in line or "release" in line]
    print("barrier atomics:", *atoms, sep="\n  ")


if __name__ == "__main__":
    if sys.argv[1:] == ["compile"]:
        compile_only()
    elif len(sys.argv) <= 2:
        run(tuple(int(m) for m in sys.argv[1].split(",")) if len(sys.argv) == 2 else (32, 64))
    else:
        sys.exit("usage: python3 -m bench.persistent_probe [rows,...] | compile")
