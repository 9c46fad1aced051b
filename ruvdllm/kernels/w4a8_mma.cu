// W4A8 product for few rows (a cached denoising step: 16-64 tokens), with warp-level
// integer tensor-core instructions (mma.sync m16n8k32 s8). Compiled at run time by
// NVRTC (ruvdllm/kernels/w4a8_mma.py, which explains the choice); no headers.
//
//   y[m, n] = xs[m] / 16 * sum_g s[g, n] * sum_{k in g} (16 q[n, k]) x[m, k]
//
// Weights are the tensor core's A operand (16 output channels x 32 k), the int8 rows
// its B operand (32 k x 8 tokens). A program owns BN = 32 * WN weight rows, BM = 8 * NT
// tokens and K / gridDim.y of K, and streams it through shared memory in stages of 256
// k (128 bytes of each weight row) with cp.async, STAGES deep. Warp (wn, wk) multiplies
// its 32 weight rows by all BM tokens over k32 steps [wk * 8 / WK, (wk + 1) * 8 / WK) of
// each stage; a group's int32 products are scaled into float32 once per group.
//
// Layout (ruvdllm.quant.W4A8Linear): byte j of a row's 16-byte chunk c holds the
// nibbles of columns 32 c + j (low) and 32 c + 16 + j (high), so the 4 bytes a thread
// reads are its A fragment for both halves of the k32 step: (b << 4) & 0xF0 and
// b & 0xF0 per byte are int8 16 q. Scales are (K / GROUP, N) bfloat16.
//
// OUT: 0 bfloat16, 1 float16 (stored), 2 float32 stored at slice blockIdx.y (the
// terms of a split K), 3 float32 added atomically (into zeros).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zeros when !ok (rows past the matrix).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void ldmatrix4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf16_float(u16 v) {
    return __uint_as_float(static_cast<u32>(v) << 16);
}

// A 16-byte chunk's place in a shared row: XOR with the row's low 3 bits, so the 8 rows
// that one ldmatrix reads at the same chunk fall in 8 different bank groups.
__device__ __forceinline__ int swizzle(int chunk, int row) {
    return (chunk & ~7) | ((chunk ^ row) & 7);
}

template <int WN, int WK, int NT, int STAGES, int GROUP, int OUT, int PROBE = 0>
__global__ void __launch_bounds__(32 * WN * WK)
w4a8_mma(const signed char* __restrict__ x, const float* __restrict__ xs,
         const u8* __restrict__ w, const u16* __restrict__ s, void* __restrict__ y,
         int M, int N, int K, int stride_sg) {
    constexpr int THREADS = 32 * WN * WK;
    constexpr int BN = 32 * WN, BM = 8 * NT;
    constexpr int W_BYTES = BN * 128, X_BYTES = BM * 256, S_BYTES = (256 / GROUP) * BN * 2;
    constexpr int STAGE = W_BYTES + X_BYTES + S_BYTES;
    constexpr int STEPS = 8 / WK;  // k32 steps per warp and stage
    constexpr int RUN = GROUP / 32 < STEPS ? GROUP / 32 : STEPS;  // steps per scaling
    extern __shared__ __align__(128) u8 smem[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wn = warp % WN, wk = warp / WN;
    const int n0 = blockIdx.x * BN, m0 = blockIdx.z * BM;
    const int iters = K / 256 / gridDim.y;  // stages of this program's K slice
    const int first = blockIdx.y * iters;

    auto load = [&](int buf, int it) {
        u8* sw = smem + buf * STAGE;
        u8* sx = sw + W_BYTES;
        u8* ss = sx + X_BYTES;
        const int k0 = (first + it) * 256;
        for (int c = threadIdx.x; c < BN * 8; c += THREADS) {  // weights: 8 chunks a row
            const int r = c >> 3, j = c & 7;
            const bool ok = n0 + r < N;
            if (PROBE & 1)  // probe: each stage one contiguous block of the weight
                copy16(sw + r * 128 + swizzle(j, r) * 16,
                       w + ((static_cast<long long>(blockIdx.x) * (K / 256) + k0 / 256) * BN + r) * 128 + j * 16, ok);
            else
            copy16(sw + r * 128 + swizzle(j, r) * 16,
                   w + static_cast<long long>(ok ? n0 + r : 0) * (K / 2) + k0 / 2 + j * 16, ok);
        }
        if (!(PROBE & 4))  // probe: no int8 rows
        for (int c = threadIdx.x; c < BM * 16; c += THREADS) {  // tokens: 16 chunks a row
            const int r = c >> 4, j = c & 15;
            const bool ok = m0 + r < M;
            copy16(sx + r * 256 + swizzle(j, r) * 16,
                   x + static_cast<long long>(ok ? m0 + r : 0) * K + k0 + j * 16, ok);
        }
        for (int c = threadIdx.x; c < (256 / GROUP) * BN / 8; c += THREADS) {  // scales
            const int g = c / (BN / 8), j = c % (BN / 8);
            const bool ok = n0 + j * 8 < N;
            copy16(ss + (g * BN + j * 8) * 2,
                   s + static_cast<long long>(k0 / GROUP + g) * stride_sg + (ok ? n0 + j * 8 : 0),
                   ok);
        }
    };

    int acc[2][NT][4];
    float sum[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0, sum[mt][nt][i] = 0.f;

#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < iters) load(st, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    // ldmatrix rows of this lane: weight row (matrix lane / 8: m-tile, upper 8 rows) and
    // token row (matrix lane / 8: upper 8 tokens of a pair of n-tiles, second k16 half)
    const int row_a = 32 * wn + 16 * (lane >> 4) + 8 * ((lane >> 3) & 1) + (lane & 7);
    const int row_b = 8 * (lane >> 4) + (lane & 7), half_b = (lane >> 3) & 1;
    const int g = lane >> 2;  // accumulator rows g and g + 8 of each m-tile

    for (int it = 0; it < iters; ++it) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));
        __syncthreads();
        if (it + STAGES - 1 < iters) load((it + STAGES - 1) % STAGES, it + STAGES - 1);
        asm volatile("cp.async.commit_group;\n" ::);

        const u8* sw = smem + (it % STAGES) * STAGE;
        const u8* sx = sw + W_BYTES;
        const u16* ss = reinterpret_cast<const u16*>(sx + X_BYTES);
        if (PROBE & 2) continue;  // probe: no products
#pragma unroll
        for (int jj = 0; jj < STEPS; ++jj) {
            const int j = wk * STEPS + jj;  // k32 step in the stage = weight chunk
            u32 r[4], a[2][4];
            ldmatrix4(r, sw + row_a * 128 + swizzle(j, row_a) * 16);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                a[mt][0] = (r[2 * mt] << 4) & 0xF0F0F0F0u;      // row g,     k 4t..4t+3
                a[mt][1] = (r[2 * mt + 1] << 4) & 0xF0F0F0F0u;  // row g + 8
                a[mt][2] = r[2 * mt] & 0xF0F0F0F0u;             // row g,     k 16+4t..
                a[mt][3] = r[2 * mt + 1] & 0xF0F0F0F0u;         // row g + 8
            }
#pragma unroll
            for (int p = 0; p < NT / 2; ++p) {
                u32 b[4];  // n-tiles 2p and 2p + 1, each (k 4t.., k 16+4t..) of token g
                const int row = 16 * p + row_b;
                ldmatrix4(b, sx + row * 256 + swizzle(2 * j + half_b, row) * 16);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_s8(acc[mt][2 * p], a[mt], b[0], b[1]);
                    mma_s8(acc[mt][2 * p + 1], a[mt], b[2], b[3]);
                }
            }
            if ((jj + 1) % RUN == 0) {  // a group (or a warp's part of one) is complete
                const u16* sg = ss + (j * 32 / GROUP) * BN + 32 * wn + g;
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    const float lo = bf16_float(sg[16 * mt]), hi = bf16_float(sg[16 * mt + 8]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        sum[mt][nt][0] += static_cast<float>(acc[mt][nt][0]) * lo;
                        sum[mt][nt][1] += static_cast<float>(acc[mt][nt][1]) * lo;
                        sum[mt][nt][2] += static_cast<float>(acc[mt][nt][2]) * hi;
                        sum[mt][nt][3] += static_cast<float>(acc[mt][nt][3]) * hi;
#pragma unroll
                        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0;
                    }
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    if (WK > 1) {  // the K warps' sums, added through shared memory by warps wk = 0
        __syncthreads();
        float* red = reinterpret_cast<float*>(smem);  // (WK - 1, WN, 2, NT, 4, 32)
        if (wk > 0) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        red[((((wk - 1) * WN + wn) * 2 + mt) * NT + nt) * 128 + i * 32 + lane] =
                            sum[mt][nt][i];
        }
        __syncthreads();
        if (wk > 0) return;
        for (int o = 0; o < WK - 1; ++o)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        sum[mt][nt][i] += red[(((o * WN + wn) * 2 + mt) * NT + nt) * 128 + i * 32 + lane];
    }

    const int t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int m = m0 + 8 * nt + 2 * t + c;
            if (m >= M) continue;
            const float scale = xs[m] * (1.f / 16);  // the 16 of 16 q
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = n0 + 32 * wn + 16 * mt + 8 * h + g;
                    if (n >= N) continue;
                    const float v = sum[mt][nt][2 * h + c] * scale;
                    const long long at = static_cast<long long>(m) * N + n;
                    if (OUT == 0) {
                        u16 b;
                        asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(b) : "f"(v));
                        static_cast<u16*>(y)[at] = b;
                    } else if (OUT == 1) {
                        u16 b;
                        asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(b) : "f"(v));
                        static_cast<u16*>(y)[at] = b;
                    } else if (OUT == 2) {
                        static_cast<float*>(y)[static_cast<long long>(blockIdx.y) * M * N + at] = v;
                    } else {
                        atomicAdd(static_cast<float*>(y) + at, v);
                    }
                }
            }
        }
    }
}
