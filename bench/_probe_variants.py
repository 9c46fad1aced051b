"""Temporary (not committed): wgmma kernel vs Triton, x loads through L1 or not."""
import json, os
from functools import partial
import torch
from bench.gpu import SHAPES, graph_us, weight_copies
from ruvdllm.quant import W4A8Linear, quantize_activations_int8
from ruvdllm.kernels import w4a8_mma as wm
from ruvdllm.kernels.w4a8 import w4a8_matmul, w4a8_config
from ruvdllm.kernels.w4a8_mma import MmaConfig
out = open(os.path.join(os.environ.get("OUT", "/tmp"), "variants.txt"), "w")
def log(*a):
    print(*a, flush=True); print(*a, file=out, flush=True)
gen = torch.Generator(device="cuda").manual_seed(0)
for N, K in SHAPES:
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    q = W4A8Linear.from_linear(lin, 128)
    copies = weight_copies((q.weight, q.scales))
    for M in (32, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        xq, xs = quantize_activations_int8(x)
        t = {"triton": round(graph_us([partial(w4a8_matmul, xq, xs, p, s, x.dtype, w4a8_config(M, N, K)) for p, s in copies]), 1)}
        bm = 32 if M <= 32 else 64
        for wg in (1, 2):
            for st in (3, 4):
                for sk in (1, 4, 8):
                    if (K // 256) % sk or (N > 5000 and sk > 2) or (N < 5000 and sk == 1):
                        continue
                    for ca in (0, 1):
                        wm.PROBE_CA = ca
                        cfg = MmaConfig(wg, bm, st, sk)
                        t[f"{tuple(cfg)} ca{ca}"] = round(graph_us([partial(w4a8_matmul, xq, xs, p, s, x.dtype, cfg) for p, s in copies]), 1)
        wm.PROBE_CA = 0
        best = min((k for k in t if k != "triton"), key=lambda k: t[k])
        log(f"N={N} K={K} M={M} triton {t['triton']} best {best} {t[best]}", json.dumps(t))
    del lin, q, copies
    torch.cuda.empty_cache()
