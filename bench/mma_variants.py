"""Experiment (session 9): the mma.sync kernel with parts left out, against Triton, M=32.

python3 -m bench.mma_variants  (writes $OUT/variants.txt)
"""
import json
import os
from functools import partial

import torch

from bench.gpu import SHAPES, graph_us, weight_copies
from ruvdllm.kernels import w4a8_mma as wm
from ruvdllm.kernels.w4a8 import w4a8_config, w4a8_matmul
from ruvdllm.kernels.w4a8_mma import MmaConfig
from ruvdllm.quant import W4A8Linear, quantize_activations_int8

gen = torch.Generator(device="cuda").manual_seed(0)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "variants.txt"), "w") as out:
    for N, K in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        q = W4A8Linear.from_linear(lin, 128)
        copies = weight_copies((q.weight, q.scales))
        x = torch.randn(32, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        xq, xs = quantize_activations_int8(x)
        t = {"triton": round(graph_us([partial(w4a8_matmul, xq, xs, p, s, x.dtype,
                                               w4a8_config(32, N, K)) for p, s in copies]), 1)}
        split = 4 if N == 4096 else 1
        for cfg in (MmaConfig(2, 2, 4, 4, split), MmaConfig(4, 1, 4, 3, split),
                    MmaConfig(4, 2, 4, 4, split)):
            for probe in (0, 1, 2, 3, 4, 7):
                wm.PROBE = probe
                t[f"{tuple(cfg)} p{probe}"] = round(graph_us(
                    [partial(w4a8_matmul, xq, xs, p, s, x.dtype, cfg) for p, s in copies]), 1)
        wm.PROBE = 0
        print(f"N={N} K={K} M=32", json.dumps(t), file=out, flush=True)
        del lin, q, copies
        torch.cuda.empty_cache()
