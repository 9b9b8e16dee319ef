"""CUDA source of the expert-grouped MoE op, compiled through ``mx.fast.cuda_kernel``.

Two kernels per MoE layer, both launched over ``(rows, slots)`` where a *slot* is one distinct
expert among the ``P = T * K`` (token, expert) pairs of the forward (at most ``min(P, E)`` slots;
blocks of slots that do not exist exit at once). Each block first finds its slot: the pairs are
sorted by expert on the host (``sorted_e[P]``, ``order[P]`` = original pair index), and the block
ranks the run starts of ``sorted_e`` with a ballot/popcount prefix (so ``P <= THREADS``). Then each
warp computes one output row of the slot's expert for every token routed to it, reading the packed
weight row once (``uint4`` loads, coalesced across the warp) however many tokens share it:

* ``gate_up``: ``act[p, n] = silu(x_t . Wg[e, n]) * (x_t . Wu[e, n])`` for the slot's pairs ``p``
  (rows of ``act`` in sorted-pair order, float32).
* ``down``: ``y[order[p], d] = act[p] . Wd[e, d]`` — written back in the original pair order, so
  the result is ``[T, K, D]`` exactly like mlx-lm's ``SwitchGLU``.

Affine quantisation as MLX stores it: ``w = scale * q + bias`` per group of ``GROUP`` inputs,
``q`` packed little-end first, ``32 / BITS`` values per ``uint32``. A ``uint4`` chunk holds
``128 / BITS`` inputs, always inside one group (GROUP >= 32), so per chunk and token we accumulate
``sum(x * q)`` and ``sum(x)`` and apply ``scale``/``bias`` once.
"""

HEADER = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moedec {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// Unpack 8 16-bit floats held in a uint4.
template <typename T>
__device__ __forceinline__ void load8(const uint4& u, float* out) {
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(h[i]);
}

// Slot discovery shared by both kernels: rank the run starts of sorted_e (length P <= blockDim.x).
__device__ __forceinline__ void find_slot(const int* sorted_e, int P, int slot, int* s_start, int* s_end,
                                          int* warp_counts) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) { *s_start = -1; *s_end = P; }
  const int e = tid < P ? sorted_e[tid] : -1;
  const bool start = tid < P && (tid == 0 || sorted_e[tid - 1] != e);
  const unsigned m = __ballot_sync(0xffffffffu, start);
  if (lane == 0) warp_counts[warp] = __popc(m);
  __syncthreads();
  int rank = __popc(m & ((1u << lane) - 1u));
  for (int w = 0; w < warp; ++w) rank += warp_counts[w];
  if (start && rank == slot) *s_start = tid;
  if (start && rank == slot + 1) *s_end = tid;
  __syncthreads();
}

// Exact float of a small unsigned integer without an I2F instruction (1/8 the FP32 rate on
// Hopper): place it in the mantissa of 2^23 and subtract 2^23.
__device__ __forceinline__ float qf(unsigned q) { return __uint_as_float(0x4B000000u | q) - 8388608.f; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace moedec
"""

# Shared by both kernels: compile-time sizes, then each block finds its slot (or exits) and each
# warp its output row (or exits).
PRELUDE = r"""
  __shared__ int s_start, s_end;
  __shared__ int warp_counts[32];
  constexpr int VALS = 128 / BITS;                 // inputs per uint4 chunk
  constexpr int CHUNKS = DIN / VALS;               // chunks per weight row
  constexpr int WORDS = DIN * BITS / 32;           // uint32 per weight row
  constexpr int VPW = 32 / BITS;                   // values per uint32
  constexpr unsigned MASK = (1u << BITS) - 1u;
  const int slot = blockIdx.y;
  moedec::find_slot(sorted_e, P, slot, &s_start, &s_end, warp_counts);
  if (s_start < 0) return;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= NOUT) return;
  const int expert = sorted_e[s_start];
  const int count = s_end - s_start;

"""

# Template constants: T (activation/scale dtype), BITS, GROUP, DIN (input width), NOUT (rows),
# K (experts per token), P (pairs), MAXC (max tokens per expert, >= T), WARPS (warps per block).
GATE_UP = PRELUDE + r"""
  int tok[MAXC];
#pragma unroll
  for (int t = 0; t < MAXC; ++t) tok[t] = t < count ? order[s_start + t] / K : 0;

  const size_t wrow = (size_t)expert * NOUT + row;
  const uint4* wg4 = reinterpret_cast<const uint4*>(wg + wrow * WORDS);
  const uint4* wu4 = reinterpret_cast<const uint4*>(wu + wrow * WORDS);
  const T* sg_row = sg + wrow * (DIN / GROUP);
  const T* bg_row = bg + wrow * (DIN / GROUP);
  const T* su_row = su + wrow * (DIN / GROUP);
  const T* bu_row = bu + wrow * (DIN / GROUP);

  float accg[MAXC], accu[MAXC];
#pragma unroll
  for (int t = 0; t < MAXC; ++t) { accg[t] = 0.f; accu[t] = 0.f; }

#pragma unroll 4
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 qg = wg4[c];
    const uint4 qu = wu4[c];
    const int col0 = c * VALS;
    const int grp = col0 / GROUP;
    const float sgv = moedec::to_f(sg_row[grp]), bgv = moedec::to_f(bg_row[grp]);
    const float suv = moedec::to_f(su_row[grp]), buv = moedec::to_f(bu_row[grp]);
    const unsigned wgs[4] = {qg.x, qg.y, qg.z, qg.w};
    const unsigned wus[4] = {qu.x, qu.y, qu.z, qu.w};
#pragma unroll
    for (int t = 0; t < MAXC; ++t) {
      if (t < count) {
        const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)tok[t] * DIN + col0);
        float dg = 0.f, du = 0.f, sx = 0.f;
#pragma unroll
        for (int v8 = 0; v8 < VALS / 8; ++v8) {
          float xv[8];
          moedec::load8<T>(xr[v8], xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int idx = v8 * 8 + j;            // input index inside the chunk
            const int w = idx / VPW, sh = (idx % VPW) * BITS;
            dg = fmaf(xv[j], moedec::qf((wgs[w] >> sh) & MASK), dg);
            du = fmaf(xv[j], moedec::qf((wus[w] >> sh) & MASK), du);
            sx += xv[j];
          }
        }
        accg[t] += sgv * dg + bgv * sx;
        accu[t] += suv * du + buv * sx;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXC; ++t) {
    if (t < count) {
      const float g = moedec::warp_sum(accg[t]);
      const float u = moedec::warp_sum(accu[t]);
      if (lane == 0) act[(size_t)(s_start + t) * NOUT + row] = g / (1.f + __expf(-g)) * u;
    }
  }
"""

DOWN = PRELUDE + r"""
  const size_t wrow = (size_t)expert * NOUT + row;
  const uint4* w4 = reinterpret_cast<const uint4*>(wd + wrow * WORDS);
  const T* s_row = sd + wrow * (DIN / GROUP);
  const T* b_row = bd + wrow * (DIN / GROUP);

  float acc[MAXC];
#pragma unroll
  for (int t = 0; t < MAXC; ++t) acc[t] = 0.f;

#pragma unroll 4
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 q = w4[c];
    const int col0 = c * VALS;
    const int grp = col0 / GROUP;
    const float sv = moedec::to_f(s_row[grp]), bv = moedec::to_f(b_row[grp]);
    const unsigned ws[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int t = 0; t < MAXC; ++t) {
      if (t < count) {
        const float4* ar = reinterpret_cast<const float4*>(act + (size_t)(s_start + t) * DIN + col0);
        float d = 0.f, sa = 0.f;
#pragma unroll
        for (int v4 = 0; v4 < VALS / 4; ++v4) {
          const float4 a = ar[v4];
          const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int idx = v4 * 4 + j;
            const int w = idx / VPW, sh = (idx % VPW) * BITS;
            d = fmaf(av[j], moedec::qf((ws[w] >> sh) & MASK), d);
            sa += av[j];
          }
        }
        acc[t] += sv * d + bv * sa;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXC; ++t) {
    if (t < count) {
      const float v = moedec::warp_sum(acc[t]);
      if (lane == 0) y[(size_t)order[s_start + t] * NOUT + row] = (T)v;
    }
  }
"""
