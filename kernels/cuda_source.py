"""CUDA source of the fused MoE block, compiled through ``mx.fast.cuda_kernel``.

Three kernels per MoE layer of a decode forward (``T`` tokens, ``K`` experts each, ``P = T*K``
(token, expert) pairs, ``U`` distinct experts among them, the *slots*):

* ``ROUTER`` (in :mod:`.router_source`): mlx-lm's ``noaux_tc`` gate.
* ``GATE_UP`` / ``GATE_UP_MMA`` (a few resident blocks): every block rebuilds the slot table from
  the routing indices in shared memory (no host-side sort); each warp streams its (slot, rows)
  items through a ring of shared-memory stages and computes, for every token routed to the slot,
  ``act[p, n] = silu(x_t . Wg[e, n]) * (x_t . Wu[e, n])``, reading each packed row once. The shared
  expert, when fused, is one more slot that every token uses (rows ``P + t`` of ``act``).
* ``DOWN`` / ``DOWN_MMA`` (blocks over rows of D): each block owns ``ROWS`` output rows for *all*
  slots; its warps share the (slot, rows) items, keep one value per (pair, row) in shared memory,
  and the block then combines them per token in pair order: ``y[t, d] = sum_k score[t, k] *
  (act[t*K+k] . Wd[e, d]) (+ shared)``, in the activation dtype (or, per pair, SwitchGLU's
  ``[P, D]``). A token's sums never depend on which other tokens share the forward, so a verify
  forward gives each token the value a single-token forward gives.

``*_MMA``: 4-bit experts with bfloat16/float16 activations, on the tensor cores (``TENSOR_CORES``).
The others (8-bit experts, float32 activations) on the CUDA cores (``CUDA_CORES``). Affine
quantisation as MLX stores it: ``w = scale * q + bias`` per group of ``GROUP`` inputs, ``q`` packed
little-end first, ``32 / BITS`` values per ``uint32``; both paths sum ``x * q`` and ``x`` per group
and apply ``scale`` and ``bias`` once per group, in float32.
"""

# Device code shared by the kernels, in parts: each kernel gets only the parts it uses (MLX builds
# and hashes a kernel's whole source on every launch, so a shorter header is a cheaper launch).
INCLUDES = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
"""

BASE = r"""
constexpr int WARPS = 8;
constexpr int THREADS = 32 * WARPS;
constexpr int MAXP = THREADS;   // most (token, expert) pairs in one forward
constexpr int MAXE = 1024;      // most experts in one layer
constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
// An RMSNorm output as MLX's rms_norm rounds it: weight w times X(v * r) (r = 1 / rms), in X.
template <typename X> __device__ __forceinline__ X rms_out(float w, float v, float r) { return (X)(w * to_f((X)(v * r))); }

// 8 consecutive values as floats (16-byte aligned; 32-byte for float).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = __bfloat162float(h[i]);
}
__device__ __forceinline__ void load8(const __half* p, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half* h = reinterpret_cast<const __half*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = __half2float(h[i]);
}
__device__ __forceinline__ void load8(const float* p, float* o) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}
"""

RMS = r"""
// 1 / sqrt(mean of squares + eps) over a block's d values, from each thread's sum of squares ss; every
// thread of the block calls it and gets the factor. s_tmp: WARPS floats, free to reuse after the next barrier.
__device__ __forceinline__ float block_rsqrt_mean(float ss, float* s_tmp, int d, float eps) {
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) s_tmp[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int w_ = 0; w_ < WARPS; ++w_) tot += s_tmp[w_];
  return rsqrtf(tot / d + eps);
}
"""

ASYNC = r"""
// Asynchronous global -> shared copies (sm_80+): a warp streams its items' weights through a ring of
// shared-memory stages, so loads stay in flight without holding registers.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
template <int N>  // 4 or 8 bytes
__device__ __forceinline__ void cp_small(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(N) : "memory");
}
template <int N>  // 4, 8 or 16 bytes
__device__ __forceinline__ void cp_small_or_16(void* dst, const void* src) {
  if (N == 16) cp16(dst, src); else cp_small<N == 16 ? 8 : N>(dst, src);
}
__device__ __forceinline__ unsigned long long evict_first_policy() {  // for bytes read once, now
  unsigned long long p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ void cp16_once(void* dst, const void* src, unsigned long long policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
"""

SLOTS = r"""
// The slot table of one forward, rebuilt by every block from the routing indices.
struct Slots {
  int e[MAXP];          // expert of pair p
  int tok[MAXP];        // token of pair p (p / K)
  int first[MAXE];      // first pair routed to expert e (MAXP: none)
  int slot_of[MAXP];    // slot of pair p (valid at first pairs)
  int cnt[MAXP + 1];    // pairs per slot
  int start[MAXP];      // where a slot's pairs start in `list`
  int list[MAXP];       // pairs grouped by slot
  int expert[MAXP];     // expert of slot u
  int warp_n[WARPS];
  int n;                // slots: distinct experts
};

// Token 0's experts (K <= 32 of them count), lane l's in e (lanes past K: a value no other lane has):
// true when they are distinct (a top-k). Warp-uniform.
template <typename I>
__device__ __forceinline__ bool distinct_first(const I* inds, int K, int& e) {
  const int lane = threadIdx.x & 31;
  e = lane < K ? (int)inds[lane] : -1 - lane;
  return !__any_sync(FULL, __popc(__match_any_sync(FULL, e)) > 1);
}

// The expert of slot u, known before build_slots when token 0's K experts are distinct: slots 0..K-1
// are those (build_slots numbers slots in pair order), and in a one-token forward with the shared
// expert fused (shared_one), slot K is the shared expert's: SHARED_SLOT. Else -1. Warp-uniform.
constexpr int SHARED_SLOT = -2;
template <typename I>
__device__ __forceinline__ int early_expert(const I* inds, int K, int u, bool shared_one) {
  int e;
  const bool distinct = distinct_first(inds, K, e);
  const int eu = __shfl_sync(FULL, e, u & 31);
  if (K > 32 || !distinct) return -1;
  return u < K ? eu : u == K && shared_one ? SHARED_SLOT : -1;
}

// Needs blockDim.x == THREADS and P <= MAXP, E <= MAXE. Ends with a barrier.
template <typename I>
__device__ void build_slots(const I* inds, int P, int K, int E, Slots& s) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int e1;
  if (P == K && K <= 32 && distinct_first(inds, K, e1)) {  // one token (decode), distinct experts: slots 0..K-1
    if (tid < K) { s.e[tid] = s.expert[tid] = e1; s.tok[tid] = 0; s.cnt[tid] = 1; s.start[tid] = s.list[tid] = tid; }
    if (tid == 0) { s.n = K; s.cnt[K] = 0; }
    __syncthreads();
    return;
  }
  for (int i = tid; i < E; i += THREADS) s.first[i] = MAXP;
  for (int i = tid; i <= MAXP; i += THREADS) s.cnt[i] = 0;
  const int e = tid < P ? (int)inds[tid] : -1;
  if (tid < P) { s.e[tid] = e; s.tok[tid] = tid / K; }
  __syncthreads();
  if (tid < P) atomicMin(&s.first[e], tid);
  __syncthreads();
  const bool first = tid < P && s.first[e] == tid;
  const unsigned m = __ballot_sync(FULL, first);
  if (lane == 0) s.warp_n[warp] = __popc(m);
  __syncthreads();
  int rank = __popc(m & ((1u << lane) - 1u));
  for (int w = 0; w < warp; ++w) rank += s.warp_n[w];
  if (first) { s.slot_of[tid] = rank; s.expert[rank] = e; }
  if (tid == 0) {
    int n = 0;
    for (int w = 0; w < WARPS; ++w) n += s.warp_n[w];
    s.n = n;
  }
  __syncthreads();
  int slot = 0, pos = 0;
  if (tid < P) { slot = s.slot_of[s.first[e]]; pos = atomicAdd(&s.cnt[slot], 1); }
  __syncthreads();
  if (warp == 0) {  // exclusive prefix of the slot counts: 8 slots per lane, then a warp scan
    int c[MAXP / 32], run = 0;
#pragma unroll
    for (int i = 0; i < MAXP / 32; ++i) { c[i] = run; run += s.cnt[lane * (MAXP / 32) + i]; }
    int inc = run;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(FULL, inc, o);
      if (lane >= o) inc += v;
    }
#pragma unroll
    for (int i = 0; i < MAXP / 32; ++i) s.start[lane * (MAXP / 32) + i] = inc - run + c[i];
  }
  __syncthreads();
  if (tid < P) s.list[s.start[slot] + pos] = tid;  // order inside a slot does not change results
  __syncthreads();
}

// The down kernels' last step, after a barrier: s_val holds one dot per (pair, or P + token for the
// shared expert; one of the block's ROWS output rows from d0). Writes y[t, d] = sum_k scores[t, k] *
// s_val[t*K + k] (+ shared), in pair order, plus res[t, d] if res (rounded first, as `h + moe(x)`);
// or, per pair (SwitchGLU), y[p, d] = s_val[p].
template <typename X>
__device__ void write_rows(const float* s_val, const float* scores, const X* res, X* y, int P, int K, bool shared,
                           bool per_pair, int d0, int rows, int nout) {
  if (per_pair) {
    for (int o = threadIdx.x; o < P * rows; o += THREADS) {
      const int p = o / rows, r = o % rows, d = d0 + r;
      if (d < nout) y[(size_t)p * nout + d] = (X)s_val[p * rows + r];
    }
    return;
  }
  const int T = P / K;
  for (int o = threadIdx.x; o < T * rows; o += THREADS) {
    const int t = o / rows, r = o % rows, d = d0 + r;
    if (d < nout) {
      float v = 0.f;
      for (int k = 0; k < K; ++k) v += scores[t * K + k] * s_val[(t * K + k) * rows + r];
      if (shared) v += s_val[(P + t) * rows + r];
      y[(size_t)t * nout + d] = res ? (X)(to_f(res[(size_t)t * nout + d]) + to_f((X)v)) : (X)v;
    }
  }
}
"""


def header(*parts: str) -> str:
    """The includes and the ``moedec`` namespace with ``parts`` of the device code."""
    return INCLUDES + "namespace moedec {\n" + "\n".join(parts) + "\n}  // namespace moedec\n"


# ADD_NORM: a residual add and the RMSNorm after it (a decoder layer's post-attention norm) in one
# kernel. Template: X, D (a multiple of 8). Inputs x, r [T, D], w [D], eps [1] float32. Outputs
# h = x + r and n = w * X(h * rsqrt(mean(h^2) + eps)) [T, D], rounded as MLX's add and rms_norm do.
# One block per token; each thread keeps its 8-value chunks of h in registers (D <= 8 * 4 * THREADS).
ADD_NORM = r"""
  constexpr int CH = (D / 8 + moedec::THREADS - 1) / moedec::THREADS;  // chunks of 8 per thread
  __shared__ float s_part[moedec::WARPS];
  const int t = blockIdx.x;
  float hv[CH][8], ss = 0.f;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int i = (c * moedec::THREADS + threadIdx.x) * 8;
    if (i < D) {
      float a[8], b[8];
      moedec::load8(x + (size_t)t * D + i, a);
      moedec::load8(r + (size_t)t * D + i, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const X o = (X)(a[j] + b[j]);
        h[(size_t)t * D + i + j] = o;
        hv[c][j] = moedec::to_f(o);
        ss += hv[c][j] * hv[c][j];
      }
    }
  }
  const float norm = moedec::block_rsqrt_mean(ss, s_part, D, eps[0]);
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int i = (c * moedec::THREADS + threadIdx.x) * 8;
    if (i < D) {
      float g[8];
      moedec::load8(w + i, g);
#pragma unroll
      for (int j = 0; j < 8; ++j) n[(size_t)t * D + i + j] = moedec::rms_out<X>(g[j], hv[c][j], norm);
    }
  }
"""

# EMBED: rows of a quantized embedding (mlx-lm's QuantizedEmbedding: mx.dequantize of the gathered
# rows) in one kernel. Template: X (the scales' dtype, the output's), D, GROUP, BITS (4 or 8). Inputs
# ids [T] (integers), w [V, D * BITS / 32], sc / bi [V, D / GROUP]; output [T, D]. One block per id;
# each value is scale * q + bias in X, as MLX's affine dequantize rounds it.
EMBED = r"""
  constexpr int PER = 32 / BITS, WORDS = D / PER, GROUPS = D / GROUP;
  const size_t t = blockIdx.x, row = (size_t)ids[t];
  for (int i = threadIdx.x; i < WORDS; i += blockDim.x) {
    const uint32_t q = w[row * WORDS + i];
    const X s = sc[row * GROUPS + i * PER / GROUP], b = bi[row * GROUPS + i * PER / GROUP];
#pragma unroll
    for (int j = 0; j < PER; ++j)
      out[t * D + i * PER + j] = moedec::mad(s, (X)(float)((q >> (BITS * j)) & ((1u << BITS) - 1u)), b);
  }
"""

# s * q + b as MLX's dequantize computes it in X (16-bit: a rounded product, then a rounded sum).
MAD = r"""
__device__ __forceinline__ __nv_bfloat16 mad(__nv_bfloat16 s, __nv_bfloat16 q, __nv_bfloat16 b) { return __hadd(__hmul(s, q), b); }
__device__ __forceinline__ __half mad(__half s, __half q, __half b) { return __hadd(__hmul(s, q), b); }
__device__ __forceinline__ float mad(float s, float q, float b) { return fmaf(s, q, b); }
"""

# A plain copy, to measure the device's copy bandwidth with full-width loads and stores.
COPY = r"""
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t n = (size_t)src_shape[0] / 4;
  for (size_t j = i; j < n; j += (size_t)gridDim.x * blockDim.x)
    reinterpret_cast<uint4*>(dst)[j] = reinterpret_cast<const uint4*>(src)[j];
"""

# Keeps the GPU busy for ns[0] nanoseconds (%globaltimer): work queued behind it starts only when it
# ends, so the time of that work alone is (spin + work) - spin, without the host's share.
SPIN = r"""
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < (unsigned long long)ns[0]);
  out[0] = (float)(t - t0);
"""
