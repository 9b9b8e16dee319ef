"""The CUDA-core expert kernels: 8-bit experts, or float32 activations (see :mod:`.cuda_source`).

Each lane holds its chunks (one ``uint4``, ``128 / BITS`` inputs, of a row) and dequantises with
a magic-number trick: a packed value placed in the mantissa of 1.0f is an exact float, one shift
serving two 4-bit values; per chunk and token it sums ``x * q`` and ``x`` and applies the group's
scale and bias once.
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
  moedec::write_rows<X>(s_val, scores, meta[2] ? res : nullptr, y, P, K, SHARED, meta[1] != 0, d0, ROWS, NOUT);
"""
