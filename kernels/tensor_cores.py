"""The tensor-core expert kernels: 4-bit experts, bfloat16/float16 activations (see :mod:`.cuda_source`).

A warp item is 16 weight rows; its expert's tokens are the N of ``mma.sync m16n8k16``; packed rows
stream through a ``cp.async`` ring in shared memory into ``ldmatrix``; a nibble OR-ed into the
mantissa of OFFSET (128 in bfloat16, 1024 in float16) is the exact value OFFSET + q, and each
group is folded in as ``scale * sum (OFFSET + q) x + (bias - OFFSET * scale) * sum x`` in float32.
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

// The same 8 nibbles as pairs (n0 n4) (n1 n5) (n2 n6) (n3 n7): three shifts and four LOP3s, for inputs
// stored in that order too (PERM: every 8 inputs as x0 x4 x1 x5 x2 x6 x3 x7; see perm8).
__device__ __forceinline__ void nibbles4(unsigned w, unsigned (&p)[4], unsigned mask, unsigned magic) {
  p[0] = and_or(w, mask, magic);
  p[1] = and_or(w >> 4, mask, magic);
  p[2] = and_or(w >> 8, mask, magic);
  p[3] = and_or(w >> 12, mask, magic);
}
// Where input i of a run of 8 sits in PERM order.
__device__ __forceinline__ int perm8(int i) { return ((i & 3) << 1) | (i >> 2); }

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
                                            const S* sc1, const S* bi0, const S* bi1, int sl, unsigned long long once) {
  constexpr int CH = KS / 32, NG = KS / GROUP, SB = NG * (int)sizeof(S), UNIT = SB < 16 ? SB : 16, UPR = SB / UNIT;
  static_assert(CH == 8 || CH == 16, "slices of 256 or 512 inputs");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < CH / 2; ++i) {  // 32 / CH rows per pass, CH chunks each
    const int r = i * (32 / CH) + lane / CH, j = lane % CH;
    const uint32_t* w = i < CH / 4 ? w0 : w1;  // r < 8 exactly when i < CH / 4
    cp16_once(&st.q[r][j ^ (r & 7)], reinterpret_cast<const uint4*>(w + (r & 7) * WORDS) + sl * CH + j, once);
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
// an MMA with all-OFFSET weights. Straight-line code: NT and GROUP are constants. COLS 1: only the
// even column 2c of each lane is folded in (a slot of one token). PERM: nibbles4 on inputs stored in
// perm8 order (the down kernels' act), else pairs4 on inputs in their order.
template <int KS, int GROUP, int NT, int COLS, bool TABLE, bool PERM, typename X, typename S>
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
      if (PERM) {
        nibbles4(wq[2 * h], pa, mask, magic);
        nibbles4(wq[2 * h + 1], pb, mask, magic);
      } else {
        pairs4<M::MAGIC>(wq[2 * h], pa, mask, magic);
        pairs4<M::MAGIC>(wq[2 * h + 1], pb, mask, magic);
      }
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
        // c * sum x, with sum x from the table, or as the all-OFFSET MMA's OFFSET * sum x (c scaled by 1 / OFFSET)
        constexpr float CX = TABLE ? 1.f : 1.f / M::OFFSET;
        const float c0 = (to_f(st.bi[g][gl]) - M::OFFSET * s0) * CX, c1 = (to_f(st.bi[g + 8][gl]) - M::OFFSET * s1) * CX;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float x0 = TABLE ? sx[nt][0][gg] : e[nt][0][0] + e[nt][1][0];  // sum x of the group, token 2c
          acc[nt][0] = fmaf(c0, x0, fmaf(s0, d[nt][0][0] + d[nt][1][0], acc[nt][0]));
          acc[nt][2] = fmaf(c1, x0, fmaf(s1, d[nt][0][2] + d[nt][1][2], acc[nt][2]));
          if (COLS == 2) {  // token 2c + 1
            const float x1 = TABLE ? sx[nt][1][gg] : e[nt][0][1] + e[nt][1][1];
            acc[nt][1] = fmaf(c0, x1, fmaf(s0, d[nt][0][1] + d[nt][1][1], acc[nt][1]));
            acc[nt][3] = fmaf(c1, x1, fmaf(s1, d[nt][0][3] + d[nt][1][3], acc[nt][3]));
          }
        }
      }
    }
  }
}

// One slice of a warp item for its cnt tokens (one n-tile up to 8, two up to 16; one column for one
// token), added into acc.
template <int KS, int GROUP, bool TABLE, bool PERM, typename X, typename S>
__device__ __forceinline__ void item_slice(const MStage<KS, S>& st, int sl, int cnt, const X* const (&xr)[2],
                                           const float* const (&sx)[2][2], float (&acc)[2][4]) {
  if (cnt > 8)
    slice_mma<KS, GROUP, 2, 2, TABLE, PERM, X, S>(st, sl, xr, sx, acc);
  else if (cnt > 1)
    slice_mma<KS, GROUP, 1, 2, TABLE, PERM, X, S>(st, sl, xr, sx, acc);
  else
    slice_mma<KS, GROUP, 1, 1, TABLE, PERM, X, S>(st, sl, xr, sx, acc);
}

// The sum-x table of T rows of GROUPS * GROUP inputs (row-major): out[t * GROUPS + g] = the sum of row
// t's inputs in group g. 8 inputs per thread, then a sum over the GROUP / 8 lanes of a group: the same
// order whatever T is. All threads of the block take part (the caller adds the barrier).
template <int GROUP, int GROUPS, typename X>
__device__ __forceinline__ void sum_x_table(const X* x, int T, float* out) {
  constexpr int PARTS = GROUP / 8;
  static_assert(PARTS <= 32 && THREADS % PARTS == 0, "a group's parts within one warp");
  for (int i0 = 0; i0 < T * GROUPS * PARTS; i0 += THREADS) {
    const int i = i0 + threadIdx.x;
    float v = 0.f;
    if (i < T * GROUPS * PARTS) {
      float f[8];
      load8(x + (size_t)(i / PARTS) * GROUP + (i % PARTS) * 8, f);
#pragma unroll
      for (int q = 0; q < 8; ++q) v += f[q];
    }
#pragma unroll
    for (int o = 1; o < PARTS; o <<= 1) v += __shfl_xor_sync(FULL, v, o);
    if (i < T * GROUPS * PARTS && i % PARTS == 0) out[i / PARTS] = v;
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
  constexpr int GROUPS = DIN / GROUP;
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  const int K = inds_shape[inds_ndim - 1];
  const int P = T * K;
  constexpr int tiles = NOUT / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  // warp w of block b takes items w * blocks + b, then every total-warps-th: the items spread over
  // all blocks (so over all SMs) before any block's warps take a second round
  const int stride = gridDim.x * moedec::WARPS, first = warp * gridDim.x + blockIdx.x;
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;
  const unsigned long long once = moedec::evict_first_policy();  // weights are read once
  // the first item's expert, if known already (and the ring's first slices all its own)
  const int early = STAGES - 1 <= SLICES ? moedec::early_expert(inds, K, first / tiles, P == K && meta[0]) : -1;
  int items = early != -1 ? first + 1 : 0;  // until the slot table is built: the first item, if its expert is known

  auto queue = [&](int k, St& st) {  // this warp's k-th slice: slice k % SLICES of its (k / SLICES)-th item
    const int it = first + (k / SLICES) * stride;
    if (it < items) {
      const int slot = it / tiles, n0 = (it % tiles) * 8;
      const bool known = early != -1 && it == first, shared = known ? early == moedec::SHARED_SLOT : slot == s.n;
      const size_t row = shared ? (size_t)n0 : (size_t)(known ? early : s.expert[slot]) * NOUT + n0;  // rows 0..7 gate, 8..15 up
      moedec::queue_slice<KS, GROUP, WORDS, GROUPS, S>(
          st, (shared ? hg : wg) + row * WORDS, (shared ? hu : wu) + row * WORDS, (shared ? hsg : sg) + row * GROUPS,
          (shared ? hsu : su) + row * GROUPS, (shared ? hbg : bg) + row * GROUPS, (shared ? hbu : bu) + row * GROUPS, k % SLICES, once);
    }
    moedec::cp_commit();
  };

  if (early != -1)  // the first slices stream while every block builds its slot table
#pragma unroll
    for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
  moedec::build_slots(inds, P, K, wg_shape[0], s);
  items = (s.n + meta[0]) * tiles;
  if (early == -1)
#pragma unroll
    for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
  moedec::sum_x_table<GROUP, GROUPS>(x, T, s_sx);
  __syncthreads();

  for (int it = first, k = 0; it < items; it += stride) {
    const int slot = it / tiles, n0 = (it % tiles) * 8;
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
    const float* sx[2][2];  // sum-x table rows of this lane's columns 2c, 2c + 1
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) sx[nt][h] = s_sx + max(token(nt * 8 + 2 * c + h), 0) * GROUPS;
    float acc[2][4] = {};
    for (int sl = 0; sl < SLICES; ++sl, ++k) {
      queue(k + STAGES - 1, ring[(k + STAGES - 1) % STAGES]);
      moedec::cp_wait<STAGES - 1>();
      __syncwarp();  // the stage holds every lane's copies: ldmatrix reads across lanes
      moedec::item_slice<KS, GROUP, true, false, X, S>(ring[k % STAGES], sl, cnt, xr, sx, acc);
      __syncwarp();  // every lane is done with this stage before it is queued again
    }
    // rows g: gate n0 + g, g + 8: up n0 + g; columns 2c, 2c + 1
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = nt * 8 + 2 * c + h;
        if (j < cnt) {
          const int pair = shared ? P + j : list[j];
          const float gv = acc[nt][h], uv = acc[nt][2 + h];
          // act in perm8 order: the down kernel unpacks its weights with fewer instructions for it
          act[(size_t)pair * NOUT + n0 + moedec::perm8(g)] = (X)(__fdividef(gv, 1.f + __expf(-gv)) * uv);
        }
      }
    }
  }
  moedec::cp_wait<0>();
"""

DOWN_MMA = r"""
  __shared__ moedec::Slots s;
  // An item is 16 rows of one slot over one KH-th of the inputs (SH slices): with top-8 and a shared
  // expert, 9 whole-row items would leave one warp of 8 a second round at T=1. The KH partial dots are
  // added in a fixed order at the end, whatever the number of tokens.
  constexpr int SLICES = DIN / KS, WORDS = DIN / 8, RG = ROWS / 16, KH = SLICES % 2 == 0 ? 2 : 1, SH = SLICES / KH;
  __shared__ float s_val[KH][(moedec::MAXP + 16) * ROWS];  // [part][(pair, or P + token for the shared expert; row)]
  extern __shared__ __align__(16) unsigned char ring_bytes[];
  using St = moedec::MStage<KS, S>;
  constexpr int GROUPS = DIN / GROUP;
  const int K = inds_shape[inds_ndim - 1];
  int P = 1;
  for (int i = 0; i < inds_ndim; ++i) P *= inds_shape[i];
  const int T = P / K;
  const bool SHARED = meta[0] != 0, PER_PAIR = meta[1] != 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int d0 = blockIdx.x * ROWS;
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;
  const unsigned long long once = moedec::evict_first_policy();  // weights are read once
  // the first item's expert, if known already (and the ring's first slices all its own)
  const int early = STAGES - 1 <= SH ? moedec::early_expert(inds, K, warp / (RG * KH), P == K && SHARED) : -1;
  int items = early != -1 ? warp + 1 : 0;  // until the slot table is built: the first item, if its expert is known

  auto queue = [&](int k, St& st) {
    const int it = warp + (k / SH) * moedec::WARPS;
    if (it < items) {
      const int u = it / (RG * KH), r0 = (it / KH % RG) * 16;
      const bool known = early != -1 && it == warp, shared = known ? early == moedec::SHARED_SLOT : u == s.n;
      const size_t row = (shared ? 0 : (size_t)(known ? early : s.expert[u]) * NOUT) + d0 + r0;  // 16 consecutive rows
      const uint32_t* w = (shared ? hd : wd) + row * WORDS;
      const S* sc = (shared ? hsd : sd) + row * GROUPS;
      const S* bi = (shared ? hbd : bd) + row * GROUPS;
      moedec::queue_slice<KS, GROUP, WORDS, GROUPS, S>(st, w, w + 8 * WORDS, sc, sc + 8 * GROUPS, bi, bi + 8 * GROUPS,
                                                       it % KH * SH + k % SH, once);
    }
    moedec::cp_commit();
  };

  if (early != -1)  // the first slices stream while every block builds its slot table
#pragma unroll
    for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
  moedec::build_slots(inds, P, K, wd_shape[0], s);
  items = (s.n + (SHARED ? 1 : 0)) * RG * KH;
  if (early == -1)
#pragma unroll
    for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
  for (int it = warp, k = 0; it < items; it += moedec::WARPS) {
    const int u = it / (RG * KH), r0 = (it / KH % RG) * 16, part = it % KH;
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
    const float* const none[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
    float acc[2][4] = {};
    for (int sl = part * SH; sl < (part + 1) * SH; ++sl, ++k) {
      queue(k + STAGES - 1, ring[(k + STAGES - 1) % STAGES]);
      moedec::cp_wait<STAGES - 1>();
      __syncwarp();  // the stage holds every lane's copies: ldmatrix reads across lanes
      moedec::item_slice<KS, GROUP, false, true, X, S>(ring[k % STAGES], sl, cnt, xr, none, acc);  // act in perm8 order
      __syncwarp();
    }
    // rows r0 + g, r0 + g + 8 of the block; columns 2c, 2c + 1
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int p = row_of(nt * 8 + 2 * c + h);
        if (p >= 0) {
          s_val[part][p * ROWS + r0 + g] = acc[nt][h];
          s_val[part][p * ROWS + r0 + g + 8] = acc[nt][2 + h];
        }
      }
    }
  }
  moedec::cp_wait<0>();
  __syncthreads();
  if (KH == 2) {  // a row's dot: part 0 + part 1 (rows of no pair hold garbage, never read)
    for (int i = threadIdx.x; i < (P + T) * ROWS; i += moedec::THREADS) s_val[0][i] += s_val[KH - 1][i];
    __syncthreads();
  }
  moedec::write_rows<X>(s_val[0], scores, meta[2] ? res : nullptr, y, P, K, SHARED, PER_PAIR, d0, ROWS, NOUT);
"""
