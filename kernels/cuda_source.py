"""CUDA source of the fused MoE block, compiled through ``mx.fast.cuda_kernel``.

Three kernels per MoE layer of a decode forward (``T`` tokens, ``K`` experts each, ``P = T*K``
(token, expert) pairs, ``U`` distinct experts among them, the *slots*):

* ``ROUTER`` (one block per token): router logits ``x . Wr[e]``, sigmoid, correction bias,
  group limit, top-K, normalisation and scaling — mlx-lm's ``noaux_tc`` gate (GLM-4.x, DeepSeek-V3).
* ``GATE_UP`` (blocks over ``(rows of N) x (slots [+ shared])``): every block rebuilds the slot
  table from the routing indices in shared memory (no host-side sort), then each warp computes one
  row ``n`` of its slot's expert for every token routed to it:
  ``act[p, n] = silu(x_t . Wg[e, n]) * (x_t . Wu[e, n])``, reading the packed row once.
  The shared expert, when fused, is one more slot that every token uses (rows ``P + t`` of ``act``).
* ``DOWN`` (blocks over rows of D): each block owns ``ROWS`` output rows for *all* slots; its warps
  share the (slot, row) items, keep one value per (pair, row) in shared memory, and the block then
  combines them per token in pair order: ``y[t, d] = sum_k score[t, k] * (act[t*K+k] . Wd[e, d])
  (+ shared)``, written in the activation dtype. A token's sums never depend on which other tokens
  share the forward, so a verify forward gives each token the value a single-token forward gives.

Affine quantisation as MLX stores it: ``w = scale * q + bias`` per group of ``GROUP`` inputs,
``q`` packed little-end first, ``32 / BITS`` values per ``uint32``. A ``uint4`` chunk of a row holds
``VALS = 128 / BITS`` inputs, inside one group (``GROUP >= 32``), so per chunk and token we
accumulate ``sum(x * q)`` and ``sum(x)`` and apply ``scale``/``bias`` once. Each lane holds its
``CPL`` chunks of the row in registers while it walks the slot's tokens ``TB`` at a time.
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
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
"""

CUDA_CORES = r"""
// One ring stage of a warp: NR packed weight rows, this lane's chunks c = lane + 32 i (i < CPL),
// each with the aligned (scale, scale) and (bias, bias) pairs that hold its group's.
template <int NR, int CPL, typename S>
struct Stage {
  uint4 q[NR][CPL][32];
  S sb[NR][CPL][32][4];
  unsigned char half[NR][CPL][32];  // which of each pair is the chunk's: bit 0 scale, bit 1 bias
};

// Queue this lane's share of NR rows (packed w, scales, biases) into stage st. Scales and biases
// travel as the 4- or 8-byte aligned pair that holds the chunk's group (a row may start mid-pair).
template <int BITS, int DIN, int NR, int CPL, typename S>
__device__ __forceinline__ void queue_rows(Stage<NR, CPL, S>& st, const uint32_t* const (&w)[NR],
                                           const S* const (&sc)[NR], const S* const (&bi)[NR], int gsh) {
  constexpr int VALS = 128 / BITS, CHUNKS = DIN / VALS;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
#pragma unroll
    for (int i = 0; i < CPL; ++i) {
      const int c = lane + 32 * i;
      if (c < CHUNKS) {
        const int g = (c * VALS) >> gsh;
        const unsigned hs = (unsigned)(reinterpret_cast<size_t>(sc[r] + g) / sizeof(S)) & 1u;
        const unsigned hb = (unsigned)(reinterpret_cast<size_t>(bi[r] + g) / sizeof(S)) & 1u;
        cp16(&st.q[r][i][lane], reinterpret_cast<const uint4*>(w[r]) + c);
        cp_small<2 * sizeof(S)>(&st.sb[r][i][lane][0], sc[r] + g - hs);
        cp_small<2 * sizeof(S)>(&st.sb[r][i][lane][2], bi[r] + g - hb);
        st.half[r][i][lane] = (unsigned char)(hs | hb << 1);
      }
    }
  }
}

// Dequantisation without integer-to-float conversions: a packed value q placed in the mantissa of
// 1.0f gives the exact float 1 + q * 2^-E. Four-bit values sit at mantissa bits 12..15 (odd nibbles,
// "a", E = 11) or 16..19 (even nibbles, "b", E = 7) after one shift shared by two of them; eight-bit
// values at bits 15..22 (E = 8). For one word and one token:
//   a += sum x_j (1 + q_j 2^-FA), b += sum x_j (1 + q_j 2^-FB), sa/sb += the x_j,
// so that sum x_j q_j = 2^FA (a - sa) + 2^FB (b - sb).
template <int BITS> struct Packed;
template <> struct Packed<4> {
  static constexpr int VPW = 8;
  static constexpr float FA = 2048.f, FB = 128.f;
  __device__ static __forceinline__ float va(unsigned s) { return __uint_as_float((s & 0x0000F000u) | 0x3F800000u); }
  __device__ static __forceinline__ float vb(unsigned s) { return __uint_as_float((s & 0x000F0000u) | 0x3F800000u); }
  // the 8 values of word w as (a: nibbles 1, 3, 5, 7; b: nibbles 0, 2, 4, 6), in x order
  __device__ static __forceinline__ void expand(unsigned w, float (&v)[8]) {
    const unsigned l = w << 8, h = w >> 8, r = __funnelshift_l(w, w, 16);
    v[0] = vb(r); v[1] = va(l); v[2] = vb(l); v[3] = va(w); v[4] = vb(w); v[5] = va(h); v[6] = vb(h); v[7] = va(r);
  }
};
template <> struct Packed<8> {
  static constexpr int VPW = 4;
  static constexpr float FA = 256.f, FB = 256.f;
  __device__ static __forceinline__ float v8(unsigned s) { return __uint_as_float((s & 0x007F8000u) | 0x3F800000u); }
  __device__ static __forceinline__ void expand(unsigned w, float (&v)[4]) {
    v[0] = v8(w << 15); v[1] = v8(w << 7); v[2] = v8(w >> 1); v[3] = v8(w >> 9);
  }
};

// n consecutive values as floats: 8 (16-byte aligned; 32-byte for float) or 4 (8 / 16-byte aligned)
template <typename X>
__device__ __forceinline__ void load_vals(const X* p, float (&o)[8]) { load8(p, o); }
__device__ __forceinline__ void load_vals(const __nv_bfloat16* p, float (&o)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  o[0] = __uint_as_float(u.x << 16); o[1] = __uint_as_float(u.x & 0xFFFF0000u);
  o[2] = __uint_as_float(u.y << 16); o[3] = __uint_as_float(u.y & 0xFFFF0000u);
}
__device__ __forceinline__ void load_vals(const __half* p, float (&o)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const __half* h = reinterpret_cast<const __half*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = __half2float(h[i]);
}
__device__ __forceinline__ void load_vals(const float* p, float (&o)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
}

// out[j][r] += (row r of stage st, chunk i) . (token j's inputs xs[j] of that chunk), for the
// NR rows of one item and up to TB tokens (xs[j] == nullptr: no token). Expands each weight word
// once for all the tokens; every token's sum runs in the same order whatever the other tokens are.
template <int BITS, int NR, int CPL, int TB, typename S, typename X>
__device__ __forceinline__ void chunk_dots(const Stage<NR, CPL, S>& st, int i, const X* const (&xs)[TB],
                                           float (&out)[TB][NR]) {
  using PK = Packed<BITS>;
  constexpr int VPW = PK::VPW;
  const int lane = threadIdx.x & 31;
  float a[TB][NR], b[TB][NR], sa[TB], sb[TB];
#pragma unroll
  for (int j = 0; j < TB; ++j) {
    sa[j] = sb[j] = 0.f;
#pragma unroll
    for (int r = 0; r < NR; ++r) a[j][r] = b[j][r] = 0.f;
  }
  uint4 q[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) q[r] = st.q[r][i][lane];
#pragma unroll
  for (int wd = 0; wd < 4; ++wd) {
    float xv[TB][VPW];
#pragma unroll
    for (int j = 0; j < TB; ++j) {
      if (xs[j]) {
        load_vals(xs[j] + wd * VPW, xv[j]);
#pragma unroll
        for (int v = 0; v < VPW; v += 2) { sb[j] += xv[j][v]; sa[j] += xv[j][v + 1]; }
      }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const unsigned word = wd == 0 ? q[r].x : wd == 1 ? q[r].y : wd == 2 ? q[r].z : q[r].w;
      float v[VPW];
      PK::expand(word, v);
#pragma unroll
      for (int j = 0; j < TB; ++j) {
        if (xs[j]) {
#pragma unroll
          for (int k = 0; k < VPW; k += 2) {
            b[j][r] = fmaf(xv[j][k], v[k], b[j][r]);
            a[j][r] = fmaf(xv[j][k + 1], v[k + 1], a[j][r]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const unsigned h = st.half[r][i][lane];
    const float sc = to_f(st.sb[r][i][lane][h & 1]), bi = to_f(st.sb[r][i][lane][2 + (h >> 1)]);
#pragma unroll
    for (int j = 0; j < TB; ++j) {
      const float dq = (PK::FA * a[j][r] + PK::FB * b[j][r]) - (PK::FA * sa[j] + PK::FB * sb[j]);
      out[j][r] += sc * dq + bi * (sa[j] + sb[j]);
    }
  }
}
"""

TENSOR_CORES = r"""
// Tensor-core path (4-bit weights, bfloat16 / float16 activations): mma.sync m16n8k16 with 16 weight
// rows as A and up to 8 tokens as B. A nibble q becomes the exact 16-bit float OFFSET + q by OR-ing it
// into the mantissa of OFFSET (MAGIC), so a group's MMA sum is sum (OFFSET + q) x, and
//   w . x = scale * (sum (OFFSET + q) x) + (bias - OFFSET * scale) * sum x    per group.
template <typename X> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static constexpr unsigned MAGIC = 0x43004300u;  // 128.0 in both halves
  static constexpr float OFFSET = 128.f;
  __device__ static __forceinline__ void run(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  static constexpr unsigned MAGIC = 0x64006400u;  // 1024.0 in both halves
  static constexpr float OFFSET = 1024.f;
  __device__ static __forceinline__ void run(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// The 8 nibbles of w (inputs k..k+7) as pairs (n0 n1) (n2 n3) (n4 n5) (n6 n7) of OFFSET + q.
__device__ __forceinline__ unsigned and_or(unsigned a, unsigned b, unsigned c) {  // (a & b) | c, one LOP3
  unsigned d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <unsigned MAGIC>
__device__ __forceinline__ void pairs4(unsigned w, unsigned (&p)[4], unsigned mask, unsigned magic) {
  const unsigned h = w >> 4;  // mask, magic: 0x000F000F and MAGIC, kept in registers
  p[0] = and_or(__byte_perm(w, h, 0x0400), mask, magic);
  p[1] = and_or(__byte_perm(w, h, 0x0501), mask, magic);
  p[2] = and_or(__byte_perm(w, h, 0x0602), mask, magic);
  p[3] = and_or(__byte_perm(w, h, 0x0703), mask, magic);
}

__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// One ring stage of the tensor-core kernels: KS inputs of 16 packed 4-bit rows, their 16-byte chunk j
// at [r][j ^ (r & 7)] (ldmatrix reads 8 rows of one chunk without bank conflicts), and the rows'
// scales and biases of the slice's groups.
template <int KS, typename S>
struct MStage {
  uint4 q[16][KS / 32];
  S sc[16][KS / 32];
  S bi[16][KS / 32];
};

// Queue slice sl (inputs sl*KS ..) of 16 rows into st: rows 0..7 from half 0, 8..15 from half 1, each
// half 8 consecutive rows starting at w[h] (WORDS uint32 per row) and sc[h] / bi[h] (GROUPS per row;
// a row's scales of one slice are SB bytes, copied in units of up to 16 bytes).
template <int KS, int GROUP, int WORDS, int GROUPS, typename S>
__device__ __forceinline__ void queue_slice(MStage<KS, S>& st, const uint32_t* w0, const uint32_t* w1, const S* sc0,
                                            const S* sc1, const S* bi0, const S* bi1, int sl) {
  constexpr int CH = KS / 32, NG = KS / GROUP, SB = NG * (int)sizeof(S), UNIT = SB < 16 ? SB : 16, UPR = SB / UNIT;
  static_assert(CH == 8 || CH == 16, "slices of 256 or 512 inputs");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < CH / 2; ++i) {  // 32 / CH rows per pass, CH chunks each
    const int r = i * (32 / CH) + lane / CH, j = lane % CH;
    const uint32_t* w = i < CH / 4 ? w0 : w1;  // r < 8 exactly when i < CH / 4
    cp16(&st.q[r][j ^ (r & 7)], reinterpret_cast<const uint4*>(w + (r & 7) * WORDS) + sl * CH + j);
  }
  for (int idx = lane; idx < 16 * UPR; idx += 32) {
    const int r = idx / UPR, u = idx % UPR;
    const size_t off = (size_t)(r & 7) * GROUPS + sl * NG;
    const S* sc = (r < 8 ? sc0 : sc1) + off;
    const S* bi = (r < 8 ? bi0 : bi1) + off;
    cp_small_or_16<UNIT>(reinterpret_cast<char*>(st.sc[r]) + UNIT * u, reinterpret_cast<const char*>(sc) + UNIT * u);
    cp_small_or_16<UNIT>(reinterpret_cast<char*>(st.bi[r]) + UNIT * u, reinterpret_cast<const char*>(bi) + UNIT * u);
  }
}

// acc[nt] += (16 rows of stage st) . (inputs of n-tile nt's 8 tokens), slice sl: lane (g, c) of the
// MMA fragments holds rows g and g + 8 for tokens 2c, 2c+1 of each n-tile. xr[nt]: this lane's token
// (column g) row of inputs; a column without a token may read any row (its results are never used).
// Per group the MMA sums (two chains: even and odd k16 steps) are folded in with the scales and
// sum x, which comes from sx[nt][h][group] (TABLE: rows of a sum-x table for columns 2c + h) or from
// an MMA with all-OFFSET weights. Straight-line code: NT and GROUP are constants.
template <int KS, int GROUP, int NT, bool TABLE, typename X, typename S>
__device__ __forceinline__ void slice_mma(const MStage<KS, S>& st, int sl, const X* const (&xr)[2],
                                          const float* const (&sx)[2][2], float (&acc)[2][4]) {
  using M = Mma<X>;
  constexpr int CH = KS / 32, BPG = GROUP / 32;  // 32-input chunks per slice, per group
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  unsigned mask = 0x000F000Fu, magic = M::MAGIC;
  asm volatile("" : "+r"(mask), "+r"(magic));  // keep both in registers for the LOP3s
  float d[NT][2][4], e[NT][2][4];
#pragma unroll
  for (int jb = 0; jb < CH; jb += 2) {
    unsigned wq[4];  // rows g / g + 8 of chunks jb, jb + 1: this lane's word c of each
    ldsm4(wq, &st.q[(lane & 7) + 8 * ((lane >> 3) & 1)][(jb + (lane >> 4)) ^ (lane & 7)]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ch = jb + h, k = ch * 32;
      if (ch % BPG == 0) {  // a group opens
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) d[nt][0][i] = d[nt][1][i] = e[nt][0][i] = e[nt][1][i] = 0.f;
      }
      unsigned pa[4], pb[4];
      pairs4<M::MAGIC>(wq[2 * h], pa, mask, magic);
      pairs4<M::MAGIC>(wq[2 * h + 1], pb, mask, magic);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xr[nt] + sl * KS + k + 8 * c);
        M::run(d[nt][0], pa[0], pb[0], pa[1], pb[1], xv.x, xv.y);
        M::run(d[nt][1], pa[2], pb[2], pa[3], pb[3], xv.z, xv.w);
        if (!TABLE) {
          M::run(e[nt][0], M::MAGIC, M::MAGIC, M::MAGIC, M::MAGIC, xv.x, xv.y);
          M::run(e[nt][1], M::MAGIC, M::MAGIC, M::MAGIC, M::MAGIC, xv.z, xv.w);
        }
      }
      if ((ch + 1) % BPG == 0) {  // the group closes: fold it in
        const int gl = ch / BPG, gg = sl * (KS / GROUP) + gl;
        const float s0 = to_f(st.sc[g][gl]), s1 = to_f(st.sc[g + 8][gl]);
        const float c0 = to_f(st.bi[g][gl]) - M::OFFSET * s0, c1 = to_f(st.bi[g + 8][gl]) - M::OFFSET * s1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float x0, x1;  // sum x of the group for tokens 2c, 2c + 1
          if (TABLE) {
            x0 = sx[nt][0][gg];
            x1 = sx[nt][1][gg];
          } else {
            x0 = (e[nt][0][0] + e[nt][1][0]) * (1.f / M::OFFSET);
            x1 = (e[nt][0][1] + e[nt][1][1]) * (1.f / M::OFFSET);
          }
          acc[nt][0] += s0 * (d[nt][0][0] + d[nt][1][0]) + c0 * x0;
          acc[nt][1] += s0 * (d[nt][0][1] + d[nt][1][1]) + c0 * x1;
          acc[nt][2] += s1 * (d[nt][0][2] + d[nt][1][2]) + c1 * x0;
          acc[nt][3] += s1 * (d[nt][0][3] + d[nt][1][3]) + c1 * x1;
        }
      }
    }
  }
}
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

// Needs blockDim.x == THREADS and P <= MAXP, E <= MAXE. Ends with a barrier.
template <typename I>
__device__ void build_slots(const I* inds, int P, int K, int E, Slots& s) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
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
"""


def header(*parts: str) -> str:
    """The includes and the ``moedec`` namespace with ``parts`` of the device code."""
    return INCLUDES + "namespace moedec {\n" + "\n".join(parts) + "\n}  // namespace moedec\n"


# The router: mlx-lm's noaux_tc gate (GLM-4.x, DeepSeek-V3) in two kernels.
# ROUTER_LOGITS. Template: X activations, W router weight, R router logit dtype (mlx-lm rounds x @ W.T
# to it), DIN hidden size, NE experts. Inputs x [T, D], w [E, D]. Output logits [T, E] float32.
# One warp per (token, expert) logit, so the router's weights stream through many SMs at once.
ROUTER_LOGITS = r"""
  const int item = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  if (item >= T * NE) return;
  const int t = item / NE, e = item % NE;
  const X* xr = x + (size_t)t * DIN;
  const W* wr = w + (size_t)e * DIN;
  float acc = 0.f;
#pragma unroll 4
  for (int c = lane; c < DIN / 8; c += 32) {
    float xv[8], wv[8];
    moedec::load8(xr + c * 8, xv);
    moedec::load8(wr + c * 8, wv);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc = fmaf(xv[j], wv[j], acc);
  }
  acc = moedec::warp_sum(acc);
  if (lane == 0) logits[item] = moedec::to_f((R)acc);
"""

# ROUTER_SELECT. Template: B correction-bias dtype, NE experts, K top-k, NG groups, TG groups kept,
# NORM normalise the top-k weights. Inputs logits [T, E] float32, bias [E], rsf [1] (scaling factor).
# Outputs inds [T, K] int32, scores [T, K] float32. One warp per token: sigmoid, correction bias,
# group limit, top-K, normalisation and scaling.
ROUTER_SELECT = r"""
  __shared__ float s_sig[moedec::MAXE];   // sigmoid(logit): the weight of a chosen expert
  __shared__ float s_sel[moedec::MAXE];   // selection score: sigmoid + correction bias
  __shared__ float s_grp[64];
  const int t = blockIdx.x, lane = threadIdx.x;
  for (int e = lane; e < NE; e += 32) {
    const float sg = 1.f / (1.f + expf(-logits[t * NE + e]));
    s_sig[e] = sg;
    s_sel[e] = sg + moedec::to_f(bias[e]);
  }
  __syncwarp();
  if (NG > 1) {  // keep the TG groups with the largest top-2 sums; zero the others' scores
    constexpr int GS = NE / NG;
    for (int g = lane; g < NG; g += 32) {
      float a = -INFINITY, b = -INFINITY;
      for (int i = 0; i < GS; ++i) {
        const float v = s_sel[g * GS + i];
        if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
      }
      s_grp[g] = a + b;
    }
    __syncwarp();
    for (int g = lane; g < NG; g += 32) {
      int better = 0;
      for (int h = 0; h < NG; ++h) better += s_grp[h] > s_grp[g] || (s_grp[h] == s_grp[g] && h < g);
      if (better >= TG) for (int i = 0; i < GS; ++i) s_sel[g * GS + i] = 0.f;
    }
    __syncwarp();
  }
  float mine = 0.f, total = 0.f;
  int my_e = 0;
  for (int j = 0; j < K; ++j) {  // K rounds of warp argmax (ties: the lower expert)
    float best = -INFINITY;
    int bi = NE;
    for (int e = lane; e < NE; e += 32) {
      const float v = s_sel[e];
      if (v > best) { best = v; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(moedec::FULL, best, o);
      const int oi = __shfl_xor_sync(moedec::FULL, bi, o);
      if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
    }
    const float wgt = s_sig[bi];
    total += wgt;
    if (lane == j) { my_e = bi; mine = wgt; }
    __syncwarp();
    if (lane == 0) s_sel[bi] = -INFINITY;
    __syncwarp();
  }
  if (lane < K) {
    if (NORM && K > 1) mine = mine / total;
    inds[t * K + lane] = my_e;
    scores[t * K + lane] = mine * rsf[0];
  }
"""
# Template: X activations, S scales/biases dtype, BITS, DIN (= D), NOUT (= N, expert width), RT rows n
# per item, TB tokens per pass, STAGES ring depth. Inputs x [.., D], inds [.., K], meta [1] (1: fuse
# the shared expert), routed gate/up (w, scales, biases) [E, N, ..], shared gate/up [N, ..]. Output
# act [P (+T), N] in X. Dynamic shared memory: WARPS * STAGES stages of 2*RT rows.
# A few resident blocks (1-D grid); each builds the slot table once, then each warp streams the
# (slot, RT rows) items it owns (item it, it + all warps, ...; the shared expert is slot U) through its
# ring: the gate and up rows of item k + STAGES - 1 are queued while item k is computed for every
# token routed to its slot, act[p, n] = silu(x_t . Wg[e, n]) * (x_t . Wu[e, n]).
GATE_UP = r"""
  __shared__ moedec::Slots s;
  extern __shared__ __align__(16) unsigned char ring_bytes[];
  constexpr int VALS = 128 / BITS, CHUNKS = DIN / VALS, CPL = (CHUNKS + 31) / 32, NR = 2 * RT;
  constexpr int WORDS = DIN * BITS / 32;
  using St = moedec::Stage<NR, CPL, S>;
  const int GROUPS = sg_shape[2], GROUP = DIN / GROUPS, GSH = 31 - __clz(GROUP);  // group size from the scales' shape
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  const int K = inds_shape[inds_ndim - 1];
  const int P = T * K;
  moedec::build_slots(inds, P, K, wg_shape[0], s);
  const int tiles = NOUT / RT, total = (s.n + meta[0]) * tiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int stride = gridDim.x * moedec::WARPS, first = blockIdx.x * moedec::WARPS + warp;
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;

  auto queue = [&](int it, St& st) {
    if (it < total) {
      const int slot = it / tiles, n0 = (it % tiles) * RT;
      const bool shared = slot == s.n;
      const size_t base = shared ? (size_t)n0 : (size_t)s.expert[slot] * NOUT + n0;
      const uint32_t* w[NR];
      const S* sc[NR];
      const S* bi[NR];
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        w[r] = (shared ? hg : wg) + (base + r) * WORDS;
        sc[r] = (shared ? hsg : sg) + (base + r) * GROUPS;
        bi[r] = (shared ? hbg : bg) + (base + r) * GROUPS;
        w[RT + r] = (shared ? hu : wu) + (base + r) * WORDS;
        sc[RT + r] = (shared ? hsu : su) + (base + r) * GROUPS;
        bi[RT + r] = (shared ? hbu : bu) + (base + r) * GROUPS;
      }
      moedec::queue_rows<BITS, DIN, NR, CPL, S>(st, w, sc, bi, GSH);
    }
    moedec::cp_commit();
  };

#pragma unroll
  for (int k = 0; k + 1 < STAGES; ++k) queue(first + k * stride, ring[k]);
  for (int it = first, k = 0; it < total; it += stride, ++k) {
    queue(it + (STAGES - 1) * stride, ring[(k + STAGES - 1) % STAGES]);
    moedec::cp_wait<STAGES - 1>();
    const St& st = ring[k % STAGES];
    const int slot = it / tiles, n0 = (it % tiles) * RT;
    const bool shared = slot == s.n;
    const int cnt = shared ? T : s.cnt[slot];
    const int* list = s.list + (shared ? 0 : s.start[slot]);
    for (int b = 0; b < cnt; b += TB) {
      int pair[TB];
      float out[TB][NR];
#pragma unroll
      for (int j = 0; j < TB; ++j) {
        pair[j] = b + j < cnt ? (shared ? P + b + j : list[b + j]) : -1;
#pragma unroll
        for (int r = 0; r < NR; ++r) out[j][r] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int c = lane + 32 * i;
        if (c < CHUNKS) {
          const X* xs[TB];
#pragma unroll
          for (int j = 0; j < TB; ++j) {
            const int tok = pair[j] < 0 ? -1 : shared ? pair[j] - P : s.tok[pair[j]];
            xs[j] = tok < 0 ? nullptr : x + (size_t)tok * DIN + c * VALS;
          }
          moedec::chunk_dots<BITS, NR, CPL, TB, S, X>(st, i, xs, out);
        }
      }
#pragma unroll
      for (int j = 0; j < TB; ++j) {
        if (pair[j] >= 0) {
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            const float g = moedec::warp_sum(out[j][r]);
            const float u = moedec::warp_sum(out[j][RT + r]);
            if (lane == 0) act[(size_t)pair[j] * NOUT + n0 + r] = (X)(g / (1.f + __expf(-g)) * u);
          }
        }
      }
    }
    __syncwarp();  // every lane is done with this stage before it is queued again
  }
  moedec::cp_wait<0>();
"""

# Template: X activations (and act) dtype, S scales dtype, BITS, DIN (= N), NOUT (= D), RT rows per
# item, TB, STAGES, ROWS (output rows per block). Inputs act [P (+T), N] in X, inds [.., K], scores
# [.., K] float32, meta [1], routed down (w, scales, biases) [E, D, ..], shared down [D, ..]. Output y
# [.., D] (x's shape). Dynamic shared memory: WARPS * STAGES stages of RT rows. Grid: D / ROWS blocks;
# a block's warps stream its (slot, RT rows) items as GATE_UP does; each (pair, row) dot goes to
# shared memory and the block then combines them per token in pair order.
DOWN = r"""
  __shared__ moedec::Slots s;
  __shared__ float s_val[(moedec::MAXP + 16) * ROWS];  // (pair, or P + token for the shared expert; row)
  extern __shared__ __align__(16) unsigned char ring_bytes[];
  constexpr int VALS = 128 / BITS, CHUNKS = DIN / VALS, CPL = (CHUNKS + 31) / 32;
  constexpr int WORDS = DIN * BITS / 32, RG = ROWS / RT;
  using St = moedec::Stage<RT, CPL, S>;
  const int GROUPS = sd_shape[2], GROUP = DIN / GROUPS, GSH = 31 - __clz(GROUP);
  const int K = inds_shape[inds_ndim - 1];
  int P = 1;
  for (int i = 0; i < inds_ndim; ++i) P *= inds_shape[i];
  const int T = P / K;
  moedec::build_slots(inds, P, K, wd_shape[0], s);
  const bool SHARED = meta[0] != 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int d0 = blockIdx.x * ROWS;
  const int items = (s.n + (SHARED ? 1 : 0)) * RG;
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;

  auto queue = [&](int it, St& st) {
    if (it < items) {
      const int u = it / RG, r0 = (it % RG) * RT;
      const bool shared = u == s.n;
      const uint32_t* w[RT];
      const S* sc[RT];
      const S* bi[RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int d = min(d0 + r0 + r, NOUT - 1);
        const size_t row = shared ? (size_t)d : (size_t)s.expert[u] * NOUT + d;
        w[r] = (shared ? hd : wd) + row * WORDS;
        sc[r] = (shared ? hsd : sd) + row * GROUPS;
        bi[r] = (shared ? hbd : bd) + row * GROUPS;
      }
      moedec::queue_rows<BITS, DIN, RT, CPL, S>(st, w, sc, bi, GSH);
    }
    moedec::cp_commit();
  };

#pragma unroll
  for (int k = 0; k + 1 < STAGES; ++k) queue(warp + k * moedec::WARPS, ring[k]);
  for (int it = warp, k = 0; it < items; it += moedec::WARPS, ++k) {
    queue(it + (STAGES - 1) * moedec::WARPS, ring[(k + STAGES - 1) % STAGES]);
    moedec::cp_wait<STAGES - 1>();
    const St& st = ring[k % STAGES];
    const int u = it / RG, r0 = (it % RG) * RT;
    const bool shared = u == s.n;
    const int cnt = shared ? T : s.cnt[u];
    const int* list = s.list + (shared ? 0 : s.start[u]);
    for (int b = 0; b < cnt; b += TB) {
      int pair[TB];
      float out[TB][RT];
#pragma unroll
      for (int j = 0; j < TB; ++j) {
        pair[j] = b + j < cnt ? (shared ? P + b + j : list[b + j]) : -1;
#pragma unroll
        for (int r = 0; r < RT; ++r) out[j][r] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int c = lane + 32 * i;
        if (c < CHUNKS) {
          const X* xs[TB];
#pragma unroll
          for (int j = 0; j < TB; ++j) xs[j] = pair[j] < 0 ? nullptr : act + (size_t)pair[j] * DIN + c * VALS;
          moedec::chunk_dots<BITS, RT, CPL, TB, S, X>(st, i, xs, out);
        }
      }
#pragma unroll
      for (int j = 0; j < TB; ++j) {
        if (pair[j] >= 0) {
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            const float v = moedec::warp_sum(out[j][r]);
            if (lane == 0) s_val[pair[j] * ROWS + r0 + r] = v;
          }
        }
      }
    }
    __syncwarp();
  }
  moedec::cp_wait<0>();
  __syncthreads();
  if (meta[1] != 0) {  // SwitchGLU: y[p, d] for every pair, no combine
    for (int o = threadIdx.x; o < P * ROWS; o += moedec::THREADS) {
      const int p = o / ROWS, r = o % ROWS, d = d0 + r;
      if (d < NOUT) y[(size_t)p * NOUT + d] = (X)s_val[p * ROWS + r];
    }
    return;
  }
  for (int o = threadIdx.x; o < T * ROWS; o += moedec::THREADS) {
    const int t = o / ROWS, r = o % ROWS, d = d0 + r;
    if (d < NOUT) {
      float v = 0.f;
      for (int k = 0; k < K; ++k) v += scores[t * K + k] * s_val[(t * K + k) * ROWS + r];
      if (SHARED) v += s_val[(P + t) * ROWS + r];
      y[(size_t)t * NOUT + d] = (X)v;
    }
  }
"""

# The tensor-core kernels (4-bit weights, X bfloat16 or float16). Template: X, S, DIN, NOUT, KS (inputs per
# ring stage), STAGES. Inputs and outputs as GATE_UP / DOWN. A warp item is 16 weight rows: for gate/up
# the gate and up rows of 8 outputs n (so a lane holds both halves of SwiGLU), for down 16 output rows.
# A warp streams its items' slices (KS inputs of the 16 rows) through its ring of STAGES stages.
GATE_UP_MMA = r"""
  __shared__ moedec::Slots s;
  __shared__ float s_sx[16 * (DIN / 32)];  // [token][group]: sum of the token's inputs over the group
  extern __shared__ __align__(16) unsigned char ring_bytes[];
  constexpr int SLICES = DIN / KS, WORDS = DIN / 8;
  using St = moedec::MStage<KS, S>;
  constexpr int GROUPS = DIN / GROUP, GSH = GROUP == 32 ? 5 : GROUP == 64 ? 6 : 7;
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  const int K = inds_shape[inds_ndim - 1];
  const int P = T * K;
  moedec::build_slots(inds, P, K, wg_shape[0], s);
  const int tiles = NOUT / 8, items = (s.n + meta[0]) * tiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int stride = gridDim.x * moedec::WARPS, first = blockIdx.x * moedec::WARPS + warp;
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;

  auto queue = [&](int k, St& st) {
    const int it = first + (k / SLICES) * stride;
    if (it < items) {
      const int slot = it / tiles, n0 = (it % tiles) * 8;
      const bool shared = slot == s.n;
      const size_t row = shared ? (size_t)n0 : (size_t)s.expert[slot] * NOUT + n0;  // rows 0..7 gate, 8..15 up
      moedec::queue_slice<KS, GROUP, WORDS, GROUPS, S>(
          st, (shared ? hg : wg) + row * WORDS, (shared ? hu : wu) + row * WORDS, (shared ? hsg : sg) + row * GROUPS,
          (shared ? hsu : su) + row * GROUPS, (shared ? hbg : bg) + row * GROUPS, (shared ? hbu : bu) + row * GROUPS, k % SLICES);
    }
    moedec::cp_commit();
  };

#pragma unroll
  for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
  for (int i = threadIdx.x; i < T * GROUPS; i += moedec::THREADS) {  // the sum-x table, in input order
    const X* xp = x + (size_t)(i / GROUPS) * DIN + (i % GROUPS) * GROUP;
    float v = 0.f;
    for (int j = 0; j < GROUP; j += 8) {
      float f[8];
      moedec::load8(xp + j, f);
#pragma unroll
      for (int q = 0; q < 8; ++q) v += f[q];
    }
    s_sx[i] = v;
  }
  __syncthreads();

  float acc[2][4];
  for (int k = 0, it = first; it < items; ++k) {
    queue(k + STAGES - 1, ring[(k + STAGES - 1) % STAGES]);
    moedec::cp_wait<STAGES - 1>();
    __syncwarp();  // the stage holds every lane's copies: ldmatrix reads across lanes
    const int sl = k % SLICES, slot = it / tiles, n0 = (it % tiles) * 8;
    const bool shared = slot == s.n;
    const int cnt = shared ? T : s.cnt[slot];
    const int* list = s.list + (shared ? 0 : s.start[slot]);
    auto token = [&](int j) { return j >= cnt ? -1 : shared ? j : s.tok[list[j]]; };  // slot token j's index
    const X* xr[2];  // a column without a token reads the slot's first token (and is not used)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int t = token(nt * 8 + g);
      xr[nt] = x + (size_t)(t < 0 ? token(0) : t) * DIN;
    }
    if (sl == 0) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    }
    const float* sx[2][2];  // sum-x table rows of this lane's columns 2c, 2c + 1
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) sx[nt][h] = s_sx + max(token(nt * 8 + 2 * c + h), 0) * GROUPS;
    if (cnt > 8)
      moedec::slice_mma<KS, GROUP, 2, true, X, S>(ring[k % STAGES], sl, xr, sx, acc);
    else
      moedec::slice_mma<KS, GROUP, 1, true, X, S>(ring[k % STAGES], sl, xr, sx, acc);
    if (sl == SLICES - 1) {  // rows g: gate n0 + g, g + 8: up n0 + g; columns 2c, 2c + 1
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = nt * 8 + 2 * c + h;
          if (j < cnt) {
            const int pair = shared ? P + j : list[j];
            const float gv = acc[nt][h], uv = acc[nt][2 + h];
            act[(size_t)pair * NOUT + n0 + g] = (X)(__fdividef(gv, 1.f + __expf(-gv)) * uv);
          }
        }
      }
      it += stride;
    }
    __syncwarp();  // every lane is done with this stage before it is queued again
  }
  moedec::cp_wait<0>();
"""

DOWN_MMA = r"""
  __shared__ moedec::Slots s;
  __shared__ float s_val[(moedec::MAXP + 16) * ROWS];  // (pair, or P + token for the shared expert; row)
  extern __shared__ __align__(16) unsigned char ring_bytes[];
  constexpr int SLICES = DIN / KS, WORDS = DIN / 8, RG = ROWS / 16;
  using St = moedec::MStage<KS, S>;
  constexpr int GROUPS = DIN / GROUP, GSH = GROUP == 32 ? 5 : GROUP == 64 ? 6 : 7;
  const int K = inds_shape[inds_ndim - 1];
  int P = 1;
  for (int i = 0; i < inds_ndim; ++i) P *= inds_shape[i];
  const int T = P / K;
  moedec::build_slots(inds, P, K, wd_shape[0], s);
  const bool SHARED = meta[0] != 0, PER_PAIR = meta[1] != 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int d0 = blockIdx.x * ROWS;
  const int items = (s.n + (SHARED ? 1 : 0)) * RG;
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;

  auto queue = [&](int k, St& st) {
    const int it = warp + (k / SLICES) * moedec::WARPS;
    if (it < items) {
      const int u = it / RG, r0 = (it % RG) * 16;
      const bool shared = u == s.n;
      const size_t row = (shared ? 0 : (size_t)s.expert[u] * NOUT) + d0 + r0;  // 16 consecutive rows
      const uint32_t* w = (shared ? hd : wd) + row * WORDS;
      const S* sc = (shared ? hsd : sd) + row * GROUPS;
      const S* bi = (shared ? hbd : bd) + row * GROUPS;
      moedec::queue_slice<KS, GROUP, WORDS, GROUPS, S>(st, w, w + 8 * WORDS, sc, sc + 8 * GROUPS, bi, bi + 8 * GROUPS,
                                                       k % SLICES);
    }
    moedec::cp_commit();
  };

#pragma unroll
  for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
  float acc[2][4];
  for (int k = 0, it = warp; it < items; ++k) {
    queue(k + STAGES - 1, ring[(k + STAGES - 1) % STAGES]);
    moedec::cp_wait<STAGES - 1>();
    __syncwarp();  // the stage holds every lane's copies: ldmatrix reads across lanes
    const int sl = k % SLICES, u = it / RG, r0 = (it % RG) * 16;
    const bool shared = u == s.n;
    const int cnt = shared ? T : s.cnt[u];
    const int* list = s.list + (shared ? 0 : s.start[u]);
    auto row_of = [&](int j) { return j >= cnt ? -1 : shared ? P + j : list[j]; };  // act row of slot token j
    const X* xr[2];  // a column without a token reads the slot's first row (and is not used)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int p = row_of(nt * 8 + g);
      xr[nt] = act + (size_t)(p < 0 ? row_of(0) : p) * DIN;
    }
    if (sl == 0) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    }
    const float* const none[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
    if (cnt > 8)
      moedec::slice_mma<KS, GROUP, 2, false, X, S>(ring[k % STAGES], sl, xr, none, acc);
    else
      moedec::slice_mma<KS, GROUP, 1, false, X, S>(ring[k % STAGES], sl, xr, none, acc);
    if (sl == SLICES - 1) {  // rows r0 + g, r0 + g + 8 of the block; columns 2c, 2c + 1
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int p = row_of(nt * 8 + 2 * c + h);
          if (p >= 0) {
            s_val[p * ROWS + r0 + g] = acc[nt][h];
            s_val[p * ROWS + r0 + g + 8] = acc[nt][2 + h];
          }
        }
      }
      it += moedec::WARPS;
    }
    __syncwarp();
  }
  moedec::cp_wait<0>();
  __syncthreads();
  if (PER_PAIR) {  // SwitchGLU: y[p, d] for every pair, no combine
    for (int o = threadIdx.x; o < P * ROWS; o += moedec::THREADS) {
      const int p = o / ROWS, r = o % ROWS, d = d0 + r;
      if (d < NOUT) y[(size_t)p * NOUT + d] = (X)s_val[p * ROWS + r];
    }
    return;
  }
  for (int o = threadIdx.x; o < T * ROWS; o += moedec::THREADS) {
    const int t = o / ROWS, r = o % ROWS, d = d0 + r;
    if (d < NOUT) {
      float v = 0.f;
      for (int k = 0; k < K; ++k) v += scores[t * K + k] * s_val[(t * K + k) * ROWS + r];
      if (SHARED) v += s_val[(P + t) * ROWS + r];
      y[(size_t)t * NOUT + d] = (X)v;
    }
  }
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
