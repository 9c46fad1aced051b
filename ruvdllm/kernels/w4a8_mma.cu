// W4A8 product on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a). Compiled at
// run time by NVRTC (ruvdllm/kernels/w4a8_mma.py says why); no headers.
//
//   y[m, n] = xs[m] / 16 * sum_g s[g, n] * sum_{k in g} (16 q[n, k]) x[m, k]
//
// The weights are wgmma's A operand, decoded into registers (64 output channels of a
// warpgroup by 32 k per instruction); the int8 rows its B operand, read by the tensor
// core from shared memory (BM tokens by 32 k). A program owns BN = 64 * WG weight rows
// (WG warpgroups), BM tokens and K / gridDim.y of K, streamed through shared memory in
// stages of 256 k with cp.async. Each group's wgmma chain runs into an int32
// accumulator, scaled into the float32 sum once the chain is done.
//
// Layout (ruvdllm.quant.W4A8Linear): byte j of a row's 16-byte chunk c holds the
// nibbles of columns 32 c + j (low) and 32 c + 16 + j (high). A thread's A fragment
// (the m16n8k32 one, per warp) is 4 bytes of row g and of row g + 8 at chunk c:
// (b << 4) & 0xF0 and b & 0xF0 per byte are int8 16 q for both halves of the k32 step.
// Scales are (K / GROUP, N) bfloat16.
//
// OUT: 0 bfloat16, 1 float16 (stored), 2 float32 stored at slice blockIdx.y (the
// terms of a split K), 3 float32 added atomically (into zeros).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zeros when !ok (rows past the matrix).
__device__ __forceinline__ void copy16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void copy16ca(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void ldmatrix4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ float bf16_float(u16 v) {
    return __uint_as_float(static_cast<u32>(v) << 16);
}

// A 16-byte chunk's place in a 128-byte shared row: XOR with the row's low 3 bits (the
// 128-byte swizzle wgmma reads B with; ldmatrix's 8 rows then hit 8 bank groups).
__device__ __forceinline__ int swizzle(int chunk, int row) {
    return (chunk ^ row) & 7;
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes
// apart (PTX ISA, "Matrix Descriptor Format").
__device__ __forceinline__ u64 descriptor(u32 addr) {
    return static_cast<u64>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// d (+)= a (registers, 64 x 32 over the warpgroup) times the B tile at `desc` (N x 32).
template <int N> struct Wgmma;

template <> struct Wgmma<16> {
    __device__ __forceinline__ static void run(int (&d)[8], const u32 (&a)[4], u64 desc,
                                               int acc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p;\n}\n"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]),
                       "+r"(d[5]), "+r"(d[6]), "+r"(d[7])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
    }
};

template <> struct Wgmma<32> {
    __device__ __forceinline__ static void run(int (&d)[16], const u32 (&a)[4], u64 desc,
                                               int acc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},"
                     " {%16, %17, %18, %19}, %20, p;\n}\n"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]),
                       "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]),
                       "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]),
                       "+r"(d[15])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
    }
};

template <> struct Wgmma<64> {
    __device__ __forceinline__ static void run(int (&d)[32], const u32 (&a)[4], u64 desc,
                                               int acc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
                     " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29,"
                     " %30, %31}, {%32, %33, %34, %35}, %36, p;\n}\n"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]),
                       "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]),
                       "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]),
                       "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]),
                       "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),
                       "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
                       "+r"(d[30]), "+r"(d[31])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
    }
};

template <int WG, int BM, int STAGES, int GROUP, int OUT, int CA = 0>
__global__ void __launch_bounds__(128 * WG)
w4a8_wgmma(const signed char* __restrict__ x, const float* __restrict__ xs,
           const u8* __restrict__ w, const u16* __restrict__ s, void* __restrict__ y,
           int M, int N, int K, int stride_sg) {
    constexpr int THREADS = 128 * WG, BN = 64 * WG;
    constexpr int X_BYTES = BM * 256, W_BYTES = BN * 128, S_BYTES = (256 / GROUP) * BN * 2;
    constexpr int STAGE = (X_BYTES + W_BYTES + S_BYTES + 1023) / 1024 * 1024;
    constexpr int AHEAD = STAGES - 2;  // stages loaded ahead: one buffer of slack, so a
                                       // stage is refilled only after its wgmma finished
    constexpr int STEPS = GROUP / 32;  // k32 steps a group
    constexpr int GROUPS = 256 / GROUP;  // groups a stage (even)
    constexpr int R = BM / 2;  // accumulator registers a thread
    extern __shared__ u8 smem_raw[];
    const u32 smem = (smem_addr(smem_raw) + 1023) & ~1023u;  // the swizzle's alignment
    const u8* smem_ptr = smem_raw + (smem - smem_addr(smem_raw));

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.z * BN;
    const int iters = K / 256 / gridDim.y;  // stages of this program's K slice
    const int first = blockIdx.y * iters;

    // stage layout: x as two K-halves of (BM, 128 bytes), weights (BN, 128 bytes), scales
    auto load = [&](int buf, int it) {
        const u32 sx = smem + buf * STAGE, sw = sx + X_BYTES, ss = sw + W_BYTES;
        const int k0 = (first + it) * 256;
        for (int c = threadIdx.x; c < BM * 16; c += THREADS) {  // tokens: 16 chunks a row
            const int r = c >> 4, j = c & 15;
            const bool ok = m0 + r < M;
            if (CA) copy16ca(sx + (j >> 3) * (BM * 128) + r * 128 + swizzle(j, r) * 16,
                   x + static_cast<long long>(ok ? m0 + r : 0) * K + k0 + j * 16, ok); else
            copy16(sx + (j >> 3) * (BM * 128) + r * 128 + swizzle(j, r) * 16,
                   x + static_cast<long long>(ok ? m0 + r : 0) * K + k0 + j * 16, ok);
        }
        for (int c = threadIdx.x; c < BN * 8; c += THREADS) {  // weights: 8 chunks a row
            const int r = c >> 3, j = c & 7;
            const bool ok = n0 + r < N;
            copy16(sw + r * 128 + swizzle(j, r) * 16,
                   w + static_cast<long long>(ok ? n0 + r : 0) * (K / 2) + k0 / 2 + j * 16, ok);
        }
        for (int c = threadIdx.x; c < GROUPS * BN / 8; c += THREADS) {  // scales
            const int g = c / (BN / 8), j = c % (BN / 8);
            const bool ok = n0 + j * 8 < N;
            copy16(ss + (g * BN + j * 8) * 2,
                   s + static_cast<long long>(k0 / GROUP + g) * stride_sg + (ok ? n0 + j * 8 : 0),
                   ok);
        }
    };

    int acc[R];             // a group's int32 products
    float sum[R];           // the scaled sum
    u32 a[STEPS][4];        // a group's decoded weights
#pragma unroll
    for (int i = 0; i < R; ++i) sum[i] = 0.f;

    // ldmatrix rows of this lane: matrix lane / 8 = (upper 8 rows, next chunk)
    const int row_a = 16 * warp + 8 * ((lane >> 3) & 1) + (lane & 7);
    const int next_a = lane >> 4;
    const int g = lane >> 2;  // accumulator rows 16 * (warp % 4) + g and + 8
    const int row_s = 16 * warp + g;  // this thread's rows among the program's BN

#pragma unroll
    for (int st = 0; st < AHEAD; ++st) {
        if (st < iters) load(st, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int it = 0; it < iters; ++it) {
        const int buf = it % STAGES;
        asm volatile("cp.async.wait_group %0;\n" :: "n"(AHEAD - 1));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for wgmma's reads
        __syncthreads();
        if (it + AHEAD < iters) load((it + AHEAD) % STAGES, it + AHEAD);
        asm volatile("cp.async.commit_group;\n" ::);

        const u32 sx = smem + buf * STAGE, sw = sx + X_BYTES;
        const u16* ss = reinterpret_cast<const u16*>(smem_ptr + buf * STAGE + X_BYTES + W_BYTES)
                        + row_s;
#pragma unroll
        for (int gi = 0; gi < GROUPS; ++gi) {
#pragma unroll
            for (int p = 0; p < STEPS; p += 2) {  // two k32 steps per ldmatrix
                const int j = gi * STEPS + p + next_a;  // weight chunk of this lane's row
                u32 r[4];
                ldmatrix4(r, sw + row_a * 128 + swizzle(j, row_a) * 16);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    a[p + h][0] = (r[2 * h] << 4) & 0xF0F0F0F0u;      // row g,     k 4t..
                    a[p + h][1] = (r[2 * h + 1] << 4) & 0xF0F0F0F0u;  // row g + 8
                    a[p + h][2] = r[2 * h] & 0xF0F0F0F0u;             // row g,     k 16+4t..
                    a[p + h][3] = r[2 * h + 1] & 0xF0F0F0F0u;         // row g + 8
                }
            }
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int p = 0; p < STEPS; ++p) {
                const int j = gi * STEPS + p;  // k32 step of the stage: half j / 4 of x
                Wgmma<BM>::run(acc, a[p], descriptor(sx + (j >> 2) * (BM * 128) + (j & 3) * 32),
                               p > 0);
            }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            const float lo = bf16_float(ss[gi * BN]), hi = bf16_float(ss[gi * BN + 8]);
#pragma unroll
            for (int i = 0; i < R; ++i) sum[i] += static_cast<float>(acc[i]) * ((i & 2) ? hi : lo);
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    // sum[i]: rows 16 * warp + g (+ 8 for i & 2), token 8 * (i / 4) + 2 t + (i & 1)
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int m = m0 + 8 * (i >> 2) + 2 * t + (i & 1);
        const int n = n0 + row_s + 8 * ((i >> 1) & 1);
        if (m >= M || n >= N) continue;
        const float v = sum[i] * xs[m] * (1.f / 16);  // the 16 of 16 q
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
