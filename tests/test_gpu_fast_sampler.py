"""The GPU fast path: FastSampler against the reference Sampler, and the Triton kernels.

The sampler's logic is device-independent and runs on CPU here (graph-free);
the CUDA-only parts (graph capture, Triton weight-only kernels) are skipped
without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ruvdllm.dgr import DGRConfig, DGRHook
from ruvdllm.fast_sampler import FastSampler
from ruvdllm.model import DiffusionLM, StaticKV, settle
from ruvdllm.quant import (
    FP8_ROWS,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    W4A8Linear,
    fp8_matmul,
    quantize_activations_int8,
    quantize_fp8_activations,
    quantize_fp8_rows,
    quantize_model,
)
from ruvdllm.runtime import load
from ruvdllm.sampler import Sampler, SamplerConfig, SamplerError
from tests.llada_reference import write_llada
from tests.test_sampler import MASK, tiny_model

PROMPTS = [[1, 50, 60, 70, 80], [1, 9, 8], [1, 100, 101, 102, 103, 104, 105, 106], [1, 42]]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model() -> DiffusionLM:
    return tiny_model()


OPTIONS = [{}, {"cache": "prefix"}, {"cache": "dual"}, {"cache": "delayed"}, {"threshold": 0.3},
           {"threshold": 0.3, "cache": "dual"}, {"threshold": 0.3, "cache": "delayed"},
           {"early_stop": True}, {"threshold": 0.3, "cache": "prefix", "early_stop": True},
           {"suffix": 0}, {"cache": "delayed", "suffix": 0}, {"cache": "delayed", "suffix": 8},
           {"cache": "delayed", "suffix": 5, "threshold": 0.3}, {"cache": "dual", "suffix": 3},
           {"cache": "prefix", "suffix": 8, "early_stop": True}]


@pytest.mark.parametrize("options", OPTIONS)
def test_fast_path_emits_the_reference_tokens_on_cpu(model, options):
    fast = FastSampler(model)
    for steps, gen, block in ((16, 32, 8), (12, 24, 24)):
        cfg = SamplerConfig(steps=steps, gen_length=gen, block_length=block, **options)
        for prompts in (PROMPTS[:1], PROMPTS):  # alone, and a left-padded batch
            assert fast.generate(prompts, cfg) == Sampler(model).generate(prompts, cfg)


def test_delayed_cache_encodes_less_and_differs_from_dual(model):
    """One block per step: delayed steps encode 2 blocks, not the whole sequence."""
    cfg = SamplerConfig(steps=4, gen_length=32, block_length=8, cache="delayed")
    assert [FastSampler._phase("delayed", b, 0) for b in range(3)] == ["full", "refresh",
                                                                        "refresh"]
    assert FastSampler._phase("delayed", 1, 1) == "dual"
    assert FastSampler._phase("dual", 1, 0) == "full"
    answer = FastSampler(model).generate(PROMPTS, cfg)
    assert answer == Sampler(model).generate(PROMPTS, cfg)
    assert all(len(a) > 0 for a in answer)


@pytest.mark.parametrize("suffix,rows", [(None, [36, 16, 16, 16]), (0, [12, 16, 16, 16]),
                                         (8, [20, 24, 24, 16])])
def test_suffix_window_cuts_what_the_delayed_cache_encodes(model, monkeypatch, suffix, rows):
    """DPad's window: the first step encodes the prompt, the block and ``suffix`` masks;
    a block's first step adds the masks that entered the window (4-token prompt)."""
    seen: list[tuple[int, int | None]] = []
    forward_into = model.forward_into

    def record(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((ids.shape[1], args[-1] if len(args) > 5 else None))
        return forward_into(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward_into", record)
    cfg = SamplerConfig(steps=4, gen_length=32, block_length=8, cache="delayed", suffix=suffix)
    FastSampler(model).generate([PROMPTS[0][:4]], cfg)
    assert [n for n, _ in seen] == rows
    ends = [36 if suffix is None else min(36, 4 + 8 * (b + 1) + suffix) for b in range(4)]
    assert [length for _, length in seen] == ends  # keys attended: the window's end


def test_threshold_skips_steps(model):
    fast = FastSampler(model)
    fixed = SamplerConfig(steps=32, gen_length=32, block_length=8)
    fast.generate(PROMPTS[:1], fixed)
    assert fast.forwards == 32
    fast.generate(PROMPTS[:1], SamplerConfig(steps=32, gen_length=32, block_length=8,
                                             threshold=0.01))  # below a random model's 0.02+
    assert fast.forwards < 32


def test_forward_into_whole_sequence_equals_forward(model):
    ids = torch.tensor([PROMPTS[2] + [MASK] * 8])
    L = ids.shape[1]
    buffers = StaticKV.empty(model.config, 1, L, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ref = model(ids).logits
        got = model.forward_into(ids, torch.arange(L)[None], torch.arange(L), buffers, None,
                                 torch.arange(L))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,message", [
    ({"temperature": 0.5}, "greedy"), ({"repetition_penalty": 1.2}, "repetition"),
    ({"remasking": "random"}, "low confidence")])
def test_reference_only_options_refused(model, options, message):
    with pytest.raises(SamplerError, match=message):
        FastSampler(model).generate(PROMPTS[:1], SamplerConfig(steps=8, gen_length=8,
                                                               block_length=8, **options))


def test_graphs_refused_off_cuda(model):
    with pytest.raises(SamplerError, match="CUDA"):
        FastSampler(model, graphs=True)


RUNTIME_OPTIONS = {"steps": 8, "gen_length": 16, "block_length": 8, "cache": "delayed",
                   "threshold": 0.3}
RUNTIME_PROMPTS = ["Once upon a time", "The"]


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llada") / "ck"
    write_llada(path)
    return path


def test_runtime_generates_with_the_fast_path_when_asked(llada_dir):
    fast, ref = (load(llada_dir, device="cpu", fast=f) for f in (True, False))
    cfg = fast.sampler_config(**RUNTIME_OPTIONS)
    sampler = fast.sampler_for(cfg)
    assert isinstance(sampler, FastSampler) and ref.sampler_for(cfg) is ref.sampler
    texts = fast.generate(RUNTIME_PROMPTS, **RUNTIME_OPTIONS)
    assert sampler.forwards > 0, "the fast sampler ran"
    assert any(texts) and texts == ref.generate(RUNTIME_PROMPTS, **RUNTIME_OPTIONS)


def test_runtime_takes_the_reference_off_cuda_by_default(llada_dir):
    rt = load(llada_dir, device="cpu")
    assert rt.sampler_for(rt.sampler_config(**RUNTIME_OPTIONS)) is rt.sampler


@pytest.mark.parametrize("options,hook,message", [
    ({"temperature": 0.5}, False, "greedy"), ({"repetition_penalty": 1.2}, False, "repetition"),
    ({}, True, "hooks")])
def test_runtime_asked_for_the_fast_path_refuses_what_it_lacks(llada_dir, options, hook,
                                                               message):
    rt = load(llada_dir, device="cpu", fast=True)
    if hook:
        rt.sampler.hooks.append(DGRHook(DGRConfig()))
    with pytest.raises(SamplerError, match=message):
        rt.generate(RUNTIME_PROMPTS[0], **RUNTIME_OPTIONS, **options)


def test_runtime_refuses_the_fast_path_for_a_causal_model():
    with pytest.raises(SamplerError, match="causal"):
        load("default-ar", device="cpu", fast=True)


def test_settle_sums_split_k_terms():
    """A split-K product's terms (S, *shape) become one term of ``like``'s shape and dtype."""
    like = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    parts = torch.randn(4, 2, 3, 8)
    out = settle(parts, like)
    assert out.dtype == torch.bfloat16 and out.shape == like.shape
    assert torch.equal(out, parts.sum(0).to(torch.bfloat16))
    term = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    assert settle(term, like) is term


@cuda
@pytest.mark.parametrize("options", OPTIONS)
def test_cuda_graphs_emit_the_reference_tokens(options):
    model = tiny_model("cuda")
    fast = FastSampler(model)
    cfg = SamplerConfig(steps=16, gen_length=32, block_length=8, **options)
    for _ in range(2):  # the second call replays the captured graphs
        assert fast.generate(PROMPTS, cfg) == Sampler(model).generate(PROMPTS, cfg)


@cuda
def test_runtime_on_cuda_takes_the_fast_path_when_the_options_allow(llada_dir):
    rt, ref = load(llada_dir, device="cuda"), load(llada_dir, device="cuda", fast=False)
    assert isinstance(rt.sampler_for(rt.sampler_config(**RUNTIME_OPTIONS)), FastSampler)
    penalised = rt.sampler_config(**RUNTIME_OPTIONS, repetition_penalty=1.2)
    assert rt.sampler_for(penalised) is rt.sampler
    options = {**RUNTIME_OPTIONS, "cache": "none"}
    assert rt.generate(RUNTIME_PROMPTS, **options) == ref.generate(RUNTIME_PROMPTS, **options)


@cuda
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("M,N,K", [(32, 256, 128), (7, 96, 64), (300, 512, 384)])
def test_weight_only_kernels_match_dequantized_product(scheme, M, N, K):
    torch.manual_seed(M + N)  # fresh random inputs per shape
    lin = torch.nn.Linear(K, N, bias=False, device="cuda")
    q = Int4Linear.from_linear(lin, 32) if scheme == "int4" else Int8Linear.from_linear(lin)
    x = torch.randn(2, M, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dequantize(torch.float64).t()  # (2, M, N)
    y = q(x)
    assert y.shape == (2, M, N) and y.dtype == torch.bfloat16
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2


@cuda
@pytest.mark.parametrize("M,N,K", [(32, 256, 512), (7, 96, 64), (64, 512, 8192),
                                   (300, 512, 384), (48, 20480, 256), (130, 8320, 4096)])
def test_every_int4_path_matches_dequantized_product(M, N, K):
    import torch.nn.functional as F

    from ruvdllm.kernels.weight_only import (
        _int4_dequant_matmul,
        _int4_fused,
        int4_dequantize,
    )

    torch.manual_seed(M * N)
    q = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=False, device="cuda"), 32)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dequantize(torch.float64).t()
    exact = q.dequantize(torch.bfloat16)
    assert torch.equal(int4_dequantize(q.weight, q.scales, torch.bfloat16), exact)
    # the last shape's 16-bit weight (68 MB) is dequantized in two column chunks
    for name, y in (("fused", _int4_fused(x, q.weight, q.scales)),
                    ("dequant", F.linear(x, int4_dequantize(q.weight, q.scales, x.dtype))),
                    ("chunked", _int4_dequant_matmul(x, q.weight, q.scales))):
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, name


def test_fused_projections_keep_outputs_and_names():
    model = tiny_model()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        before, names = model(ids).logits, list(model.state_dict())
        model.fuse_projections()
        assert torch.equal(model(ids).logits, before) and list(model.state_dict()) == names
        block = model.transformer.blocks[0]
        assert block.q_proj.weight.data_ptr() == block._fused["qkv"].linear.weight.data_ptr()
        quantize_model(model, "int4")  # new modules: the stale fused products are not used
        quantized = model(ids).logits
        model.fuse_projections()
        assert isinstance(block._fused["gate_up"].linear, Int4Linear)
        assert torch.equal(model(ids).logits, quantized)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=False))
    return same / sum(len(p) for p in a)


@cuda
def test_w4a8_fast_path_close_to_int4():
    """The same int4 weights with int8 activations (kernels, fused projections, graphs).

    Against float, 4-bit weights alone flip a fifth of this random model's tokens
    (CPU, bfloat16: int4 78-88 %, w4a8 82-85 % by group size); the int8 inputs on
    top of the same weights change fewer (CPU: 90 % agreement at group 32).
    """
    cfg = SamplerConfig(steps=16, gen_length=32, block_length=8, cache="dual")
    int4, w4a8 = (quantize_model(tiny_model("cuda").to(torch.bfloat16), s, 32)
                  for s in ("int4", "w4a8"))
    assert _agreement(FastSampler(int4).generate(PROMPTS, cfg),
                      FastSampler(w4a8).generate(PROMPTS, cfg)) >= 0.8


@cuda
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_fast_path_close_to_float(scheme):
    model = tiny_model("cuda").to(torch.bfloat16)
    cfg = SamplerConfig(steps=16, gen_length=32, block_length=8, cache="dual")
    float_answer = FastSampler(model).generate(PROMPTS, cfg)
    quantize_model(model, scheme)
    assert _agreement(float_answer, FastSampler(model).generate(PROMPTS, cfg)) >= 0.8


@cuda
def test_fp8_products_take_rows_from_the_norm_and_swiglu_kernels(monkeypatch):
    """From FP8_ROWS bfloat16 rows (4 x 136) the fused q/k/v, gate/up and down products
    take inputs quantized per row by the kernels that write them (the output product and
    the LM head by their own row kernel); the logits stay as close to the float model's
    as with one scale per tensor."""
    from ruvdllm import quant

    ids = torch.randint(0, 512, (4, 136), device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(0))
    with torch.no_grad():
        ref = tiny_model("cuda").to(torch.bfloat16)(ids).logits.float()
        model = quantize_model(tiny_model("cuda").to(torch.bfloat16), "fp8")
        model.fuse_projections()
        rows: list[int] = []
        forward_rows = Fp8Linear.forward_rows

        def spy(self, q, scale, lead, dtype):  # type: ignore[no-untyped-def]
            rows.append(q.shape[0])
            return forward_rows(self, q, scale, lead, dtype)

        monkeypatch.setattr(Fp8Linear, "forward_rows", spy)
        per_row = model(ids).logits.float()  # q/k/v, o, gate/up, down: 4 a layer; the head
        calls = 4 * model.config.n_layers + 1
        assert len(rows) == calls and min(rows) == ids.numel()
        monkeypatch.setattr(quant, "FP8_ROWS", 1 << 62)
        per_tensor = model(ids).logits.float()
    assert len(rows) == calls  # no rows below the threshold

    def error(y: torch.Tensor) -> float:
        return ((y - ref).norm() / ref.norm()).item()

    assert 0 < error(per_row) < 0.1 and error(per_row) <= 1.5 * error(per_tensor)


@cuda
@pytest.mark.parametrize("options", [{}, {"cache": "delayed", "threshold": 0.3}])
def test_fp8_fast_path_emits_the_reference_tokens(options):
    """float32 activations: both samplers run the same float8 products (cuBLAS)."""
    model = quantize_model(tiny_model("cuda"), "fp8")
    cfg = SamplerConfig(steps=16, gen_length=32, block_length=8, **options)
    assert FastSampler(model).generate(PROMPTS, cfg) == Sampler(model).generate(PROMPTS, cfg)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_activation_kernel_matches_torch(dtype):
    torch.manual_seed(0)
    for shape in ((7, 96), (33, 4096), (3, 100)):
        x = (torch.randn(*shape, device="cuda") * 5).to(dtype)
        x[0, 0] = 0.0
        q, scale = quantize_fp8_activations(x)  # the Triton kernel
        scale_ref = x.abs().max().float().cpu() / 448.0
        q_ref = (x.float().cpu() / scale_ref).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert scale.item() == scale_ref.item()
        assert torch.equal(q.cpu().float(), q_ref.float())


@cuda
@pytest.mark.parametrize("M,N,K", [(32, 256, 128), (511, 512, 256), (512, 512, 256),
                                   (1100, 512, 256), (600, 24, 64)])
def test_fp8_products_match_their_quantized_operands(M, N, K):
    """Per-tensor (cuBLAS), row-scaled (CUTLASS: bfloat16 from 512 rows) and unaligned
    (float32) paths, each against its own quantized input."""
    torch.manual_seed(M + N)
    q = Fp8Linear.from_linear(torch.nn.Linear(K, N, bias=False, device="cuda"))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        x[3] *= 100  # one row far larger: per-tensor and per-row scales differ
        rows = dtype == torch.bfloat16 and M >= FP8_ROWS and N % 16 == 0
        assert q.takes_rows(x) == rows
        qx, sx = quantize_fp8_rows(x) if rows else quantize_fp8_activations(x)
        ref = (qx.double() * sx.double().reshape(-1, 1)) @ q.dequantize(torch.float64).t()
        y = q(x)
        assert y.dtype == dtype and y.shape == (M, N)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
        if rows:  # the producer's rows, and the weight's scale row kept between calls
            assert torch.equal(q.forward_rows(qx, sx, (M,), dtype), y)
            assert q.scale_row() is q.scale_row() and q.scale_row().shape == (1, N)
        else:
            assert torch.equal(fp8_matmul(x, q.weight, q.scales), y)


@cuda
def test_rope_qkv_into_matches_rope_and_slot_copies():
    from ruvdllm.kernels.elementwise import rope, rope_qkv_into
    from ruvdllm.model import rope_cos_sin

    torch.manual_seed(0)
    B, T, L, H, Hkv, hd = 2, 5, 12, 4, 2, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.randint(0, 100, (B, T), device="cuda"), hd, 10000.0)
    keys = torch.randn(B, Hkv, L, hd, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    index = torch.tensor([9, 0, 4, 11, 2], device="cuda")
    keys_ref, values_ref = keys.clone(), values.clone()
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    q_ref = rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)
    keys_ref.index_copy_(2, index, rope(k.view(B, T, Hkv, hd).transpose(1, 2), cos, sin))
    values_ref.index_copy_(2, index, v.view(B, T, Hkv, hd).transpose(1, 2))
    got = rope_qkv_into(qkv, cos, sin, keys, values, index, H)
    assert torch.equal(got, q_ref)
    assert torch.equal(keys, keys_ref) and torch.equal(values, values_ref)


@cuda
def test_add_rms_norm_is_the_sum_then_the_norm():
    from ruvdllm.kernels.elementwise import add_rms_norm, rms_norm, swiglu_halves_amax

    torch.manual_seed(0)
    x, r = torch.randn(2, 2, 3, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    total, y, maxima = add_rms_norm(x, r, w, 1e-5, amax=True)
    assert torch.equal(total, x + r) and torch.equal(y, rms_norm(x + r, w, 1e-5))
    assert torch.equal(maxima, y.float().abs().reshape(-1, 4096).amax(1))
    act, chunk_maxima = swiglu_halves_amax(torch.randn(5, 2 * 2500, device="cuda",
                                                       dtype=torch.bfloat16))
    assert chunk_maxima.shape == (5 * 3,) and chunk_maxima.max() == act.float().abs().max()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantize", [quantize_activations_int8, quantize_fp8_rows])
def test_row_quantization_kernel_matches_torch(dtype, quantize):
    torch.manual_seed(0)
    for shape in ((7, 96), (33, 4096), (3, 12288)):
        x = (torch.randn(*shape, device="cuda") * 5).to(dtype)
        x[0] = 0.0  # an all-zero row keeps a nonzero scale
        x[1, 3] = 1e4  # an outlier sets its row's scale alone
        x[2, :5] = torch.tensor([1e-3, -2e-3, 448.0, 1e-41, -1e-40])  # tiny, subnormal
        q, scale = quantize(x)  # the Triton kernel
        q_ref, scale_ref = quantize(x.cpu())
        assert q.dtype == q_ref.dtype and torch.equal(scale.cpu(), scale_ref)
        assert torch.equal(q.cpu().view(torch.int8), q_ref.view(torch.int8))


@cuda
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("M,N,K", [(32, 256, 512), (5, 96, 256), (64, 320, 1024),
                                   (300, 512, 384), (1100, 256, 256)])
def test_w4a8_kernel_is_the_product_of_its_quantized_operands(group, M, N, K):
    from ruvdllm.kernels.w4a8 import W4A8Config, w4a8_matmul

    if K % group:
        pytest.skip("K holds no whole group")
    torch.manual_seed(M + N + group)
    q = W4A8Linear.from_linear(torch.nn.Linear(K, N, bias=False, device="cuda"), group)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    x[0, 0] = 30.0  # a row with an outlier
    qx, sx = quantize_activations_int8(x)
    ref = (qx.double() * sx.double()[:, None]) @ q.dequantize(torch.float64).t()
    configs = [None, W4A8Config(16, 64, 4, 4, 4), W4A8Config(64, 64, 4, 3, 2, 2),
               W4A8Config(32, 64, 4, 3, 1, 2), W4A8Config(128, 128, 8, 3, 1),
               W4A8Config(32, 32, 2, 3, 2, 2), W4A8Config(16, 16, 1, 3, 1, 2),
               W4A8Config(32, 64, 4, 3, 1, 4), W4A8Config(64, 128, 8, 2, 2, 4)]
    for cfg in configs:  # the chosen configuration, then every tile shape and split
        y = w4a8_matmul(qx, sx, q.weight, q.scales, torch.bfloat16, cfg)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3, cfg  # bf16
        parts = w4a8_matmul(qx, sx, q.weight, q.scales, torch.bfloat16, cfg, partials=True)
        split = parts.shape[0]  # (S, M, N): float32 terms of a split K, else the product
        assert parts.shape[1:] == (M, N) and (split == 1 or parts.dtype == torch.float32)
        assert ((parts.double().sum(0) - ref).norm() / ref.norm()).item() < 4e-3, cfg
    y = q(x.view(1, M, K)).view(M, N)  # the linear runs the kernel
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3


@cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_row_quantization_is_the_kernel_output_quantized(fp8):
    """The norm and SwiGLU kernels' int8 or float8 rows are their 16-bit outputs, quantized."""
    from ruvdllm.kernels.elementwise import (
        add_rms_norm,
        add_rms_norm_rows,
        swiglu_halves,
        swiglu_halves_rows,
    )

    quantize = quantize_fp8_rows if fp8 else quantize_activations_int8
    torch.manual_seed(0)
    x, r = (torch.randn(2, 33, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    for residual in (None, r):
        total, y, _ = add_rms_norm(x, residual, w, 1e-5, amax=False)
        total8, q, scale = add_rms_norm_rows(x, residual, w, 1e-5, fp8=fp8)
        q_ref, scale_ref = quantize(y.reshape(-1, 4096))
        assert q.dtype == q_ref.dtype and torch.equal(total8, total)
        assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.int8),
                                                             q_ref.view(torch.int8))
    parts = torch.randn(4, 2, 33, 4096, device="cuda")  # a split-K product's terms
    total8, q, scale = add_rms_norm_rows(x, parts, w, 1e-5, fp8=fp8)
    summed = parts[0] + parts[1] + parts[2] + parts[3]  # float32, the kernel's order
    total = (x.float() + summed).to(x.dtype)
    _, q_ref, scale_ref = add_rms_norm_rows(total, None, w, 1e-5, fp8=fp8)
    assert torch.equal(total8, total) and torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
    gate_up = torch.randn(2, 33, 2 * 12288, device="cuda", dtype=torch.bfloat16)
    q, scale = swiglu_halves_rows(gate_up, fp8=fp8)
    q_ref, scale_ref = quantize(swiglu_halves(gate_up).reshape(-1, 12288))
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))


@cuda
def test_dependent_launches_read_their_inputs_after_the_previous_kernel():
    """A graph of kernels that each read the one before (norm -> W4A8 product -> int8 rows
    -> product -> SwiGLU ...), replayed on new inputs, equals the plain launches bit for bit.

    With programmatic dependent launch (Hopper) each grid starts while the previous one
    runs; a read before its wait would see the previous replay's values.
    """
    from ruvdllm.kernels import pdl
    from ruvdllm.kernels.elementwise import add_rms_norm_rows, swiglu_halves
    from ruvdllm.kernels.rowquant import quantize_rows
    from ruvdllm.kernels.w4a8 import W4A8Config, w4a8_matmul

    torch.manual_seed(0)
    D, F = 1024, 2048
    up = W4A8Linear.from_linear(torch.nn.Linear(D, 2 * F, bias=False, device="cuda"), 32)
    down = W4A8Linear.from_linear(torch.nn.Linear(F, D, bias=False, device="cuda"), 32)
    norm_w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    cfg = W4A8Config(64, 64, 4, 3, 1, 2)  # no split: no float atomics, exact replays

    def chain(x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x, q, s = add_rms_norm_rows(x, None, norm_w, 1e-5)
            act = swiglu_halves(w4a8_matmul(q, s, up.weight, up.scales, x.dtype, cfg))
            q, s = quantize_rows(act.reshape(-1, F))
            x = w4a8_matmul(q, s, down.weight, down.scales, x.dtype, cfg).view_as(x)
        return x

    inputs = [torch.randn(64, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    enabled = pdl.ENABLED
    try:
        pdl.ENABLED = False
        expected = [chain(x) for x in inputs]
        pdl.ENABLED = True
        static = inputs[0].clone()
        chain(static)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static)
        for x, ref in zip(inputs, expected, strict=True):
            static.copy_(x)
            graph.replay()
            assert torch.equal(out, ref)
    finally:
        pdl.ENABLED = enabled


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,T,V", [(1, 32, 126464), (2, 5, 512), (3, 7, 4097)])
def test_greedy_confidence_is_argmax_and_its_softmax(dtype, B, T, V):
    """One read of the logits gives torch's argmax (the first of equal maxima) and the
    softmax probability there, rows strided as the fast path slices them."""
    from ruvdllm.kernels.confidence import greedy_confidence

    torch.manual_seed(V)
    full = torch.randn(B, T, V + 64, device="cuda").mul_(4).to(dtype)
    logits = full[..., :V]  # (B, T, V), the fast path's slice of the padded vocabulary
    logits[0, 0, 3] = logits[0, 0, V - 2] = 100.0  # a tie across chunks
    pred, prob = greedy_confidence(logits)
    ref = logits.argmax(-1)
    assert pred.shape == (B, T) and torch.equal(pred, ref) and pred[0, 0].item() == 3
    probs = torch.softmax(logits.float(), dim=-1).gather(-1, ref[..., None])[..., 0]
    assert prob.dtype == torch.float32
    torch.testing.assert_close(prob, probs, rtol=1e-5, atol=1e-7)
