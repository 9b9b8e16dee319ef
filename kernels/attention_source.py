"""CUDA source of the decode-attention kernels (one query position over the compiled step's
fixed-capacity cache); their Python side is :mod:`.ops`.
"""

# Decode attention over a fixed-capacity cache whose valid length is an array (the compiled step's
# cache, moedec.compiled): MLX's fused attention takes no mask on CUDA, and a masked one falls back to
# several kernels. Template: X dtype, D head size (32, 64, 128 or 256: a lane's EPL elements are one
# aligned load), H query heads, HKV key/value heads, NW warps per block. Inputs q [B, H, 1, D], k, v
# [B, HKV, C, D], offset [SMALL] int32 (element 0: the new token's position; positions 0..offset
# attend), scale [SMALL] (element 0). Output o [B, H, 1, D]. One block of NW warps per
# (batch, head); warp w takes positions in runs of U (runs w, w + NW, ..): it loads the run's U keys and
# values at once (independent loads in flight together), sums the U scores across lanes, and folds the
# run into its online softmax; then warp 0 merges the warps. Lane i holds elements i*EPL.. of a row.
# ATTENTION_WRITE (the same body with WRITE): the new token's key and value come as kn, vn [B, HKV, 1, D]
# (the cache holds positions 0..offset-1), and warp 0 of the first query head's block of each key/value
# head writes them at position offset of k and v themselves, in place (the inputs are the compiled
# step's own buffers; no block reads that row from memory, so no block waits for the write): one
# kernel instead of two cache-wide selects per layer, and no copy of the cache per step.
# ATTENTION_QKV (WRITE, and the inputs from one row): the query, key and value heads come as the joined
# projection's output qkv [B, 1, H + 2 HKV, D] (query heads, then key heads, then value heads), before
# RoPE; the kernel rotates the query and the new key (moedec::rope_qk; template R rotated dims, TRAD,
# input rope [SMALL]: log2 of the base, position scale), so the RoPE kernel and the copies that split the
# heads go. Output o [B, 1, H * D].
ATTENTION = r"""
  constexpr int EPL = D / 32, U = 8;
  struct alignas(sizeof(X) * EPL) Row { X v[EPL]; };  // a lane's EPL elements of one key or value row
  __shared__ float s_m[NW], s_l[NW], s_o[NW][D];
  const int bh = blockIdx.x, b = bh / H, h = bh % H, kvh = h / (H / HKV);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int C = k_shape[2], off = offset[0], L = min(off + 1, C);
  const size_t at = ((size_t)b * HKV + kvh) * C * D + lane * EPL;  // this lane's part of position 0
  const X* kp = k + at;
  const X* vp = v + at;
  const bool writer = WRITE && h % (H / HKV) == 0 && off < C;  // one block per key/value head writes the new row
  Row qr, kn_r, vn_r;  // this lane's part of the query and (WRITE) of the new token's key and value
  // INPUTS
  float qv[EPL], acc[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    qv[i] = moedec::to_f(qr.v[i]) * scale[0];
    acc[i] = 0.f;
  }
  if (writer && warp == 0) {  // the new position, into the step's own cache
    *reinterpret_cast<Row*>(const_cast<X*>(kp) + (size_t)off * D) = kn_r;
    *reinterpret_cast<Row*>(const_cast<X*>(vp) + (size_t)off * D) = vn_r;
  }
  float m = -INFINITY, l = 0.f;
  for (int j0 = warp * U; j0 < L; j0 += NW * U) {  // a run: positions j0 .. j0 + U - 1 (those < L count)
    Row kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = min(j0 + u, L - 1);  // past the end: a valid row, weighted 0
      const bool fresh = WRITE && j == off;  // the new token's row is not in the cache yet
      kr[u] = fresh ? kn_r : *reinterpret_cast<const Row*>(kp + (size_t)j * D);
      vr[u] = fresh ? vn_r : *reinterpret_cast<const Row*>(vp + (size_t)j * D);
    }
    float sc[U], mc = -INFINITY;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      sc[u] = 0.f;
#pragma unroll
      for (int i = 0; i < EPL; ++i) sc[u] = fmaf(qv[i], moedec::to_f(kr[u].v[i]), sc[u]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u) sc[u] += __shfl_xor_sync(moedec::FULL, sc[u], o);
#pragma unroll
    for (int u = 0; u < U; ++u) mc = j0 + u < L ? fmaxf(mc, sc[u]) : mc;
    const float mn = fmaxf(m, mc), corr = expf(m - mn);  // the run has a position < L: mn is finite
    l *= corr;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] *= corr;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float p = j0 + u < L ? expf(sc[u] - mn) : 0.f;
      l += p;
#pragma unroll
      for (int i = 0; i < EPL; ++i) acc[i] = fmaf(p, moedec::to_f(vr[u].v[i]), acc[i]);
    }
    m = mn;
  }
  if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
#pragma unroll
  for (int i = 0; i < EPL; ++i) s_o[warp][lane * EPL + i] = acc[i];
  __syncthreads();
  if (warp == 0) {
    float mx_ = -INFINITY, den = 0.f, out[EPL];
    for (int w = 0; w < NW; ++w) mx_ = fmaxf(mx_, s_m[w]);
#pragma unroll
    for (int i = 0; i < EPL; ++i) out[i] = 0.f;
    for (int w = 0; w < NW; ++w) {
      const float f = s_m[w] == -INFINITY ? 0.f : expf(s_m[w] - mx_);
      den += s_l[w] * f;
#pragma unroll
      for (int i = 0; i < EPL; ++i) out[i] += s_o[w][lane * EPL + i] * f;
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) o[(size_t)bh * D + lane * EPL + i] = (X)(out[i] / den);
  }
"""
_ROW = "*reinterpret_cast<const Row*>"
_SEPARATE = f"  qr = {_ROW}(q + (size_t)bh * D + lane * EPL);\n"  # q [B, H, 1, D]
ATTENTION_READ = "  constexpr bool WRITE = false;\n" + ATTENTION.replace("  // INPUTS\n", _SEPARATE)
ATTENTION_WRITE = "  constexpr bool WRITE = true;\n" + ATTENTION.replace("  // INPUTS\n", _SEPARATE + f"""\
  const size_t at_new = ((size_t)b * HKV + kvh) * D + lane * EPL;  // kn, vn [B, HKV, 1, D]
  kn_r = {_ROW}(kn + at_new);
  vn_r = {_ROW}(vn + at_new);
""")
ATTENTION_QKV = "  constexpr bool WRITE = true;\n" + ATTENTION.replace("  // INPUTS\n", f"""\
  const X* row = qkv + (size_t)b * (H + 2 * HKV) * D;  // [H + 2 HKV, D]: this batch row's heads
  vn_r = {_ROW}(row + (size_t)(H + HKV + kvh) * D + lane * EPL);
  moedec::rope_qk<R, TRAD>(row + (size_t)h * D, row + (size_t)(H + kvh) * D, lane * EPL, off, rope, qr.v, kn_r.v);
""")

# Elements e0 .. e0 + N - 1 of a head's row x rotated for position pos as MLX's fast.rope rotates them:
# the first R elements in pairs (j, j + R/2) (TRAD: (2j, 2j + 1)) by the angle scale * pos *
# base^(-j / (R/2)), in float32 and rounded to X; elements from R on as they are. rope: [log2(base), scale].
ROPE = r"""
template <int R, bool TRAD, int N, typename X>
__device__ __forceinline__ void rope_part(const X* x, int e0, int pos, const float* rope, X (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = e0 + i;
    if (e >= R) {
      out[i] = x[e];
      continue;
    }
    const int j = TRAD ? e / 2 : e % (R / 2);
    const bool second = TRAD ? (e & 1) : e >= R / 2;   // the pair's second element
    const int pe = TRAD ? e ^ 1 : second ? e - R / 2 : e + R / 2;  // its partner
    const float d = (float)j / (float)(R / 2);
    const float theta = (rope[1] * (float)pos) * exp2f(-d * rope[0]);
    const float cs = cosf(theta), sn = sinf(theta), xe = to_f(x[e]), xp = to_f(x[pe]);
    out[i] = (X)(second ? xp * sn + xe * cs : xe * cs - xp * sn);
  }
}

// rope_part of a query row q and a key row k at once, the same N elements of each (one position: the
// same angles). Where a lane's N elements are one aligned run whose partners are one run too, it loads
// each run with one load, all before any arithmetic (one memory round trip, not one per element), and
// takes each angle's cosine and sine once for both rows: the same values and roundings as rope_part.
template <int R, bool TRAD, int N, typename X>
__device__ __forceinline__ void rope_qk(const X* q, const X* k, int e0, int pos, const float* rope, X (&qo)[N],
                                        X (&ko)[N]) {
  constexpr bool RUNS = N % 2 == 0 && R % N == 0 && (TRAD || (R / 2) % N == 0);
  if (!RUNS) {
    rope_part<R, TRAD>(q, e0, pos, rope, qo);
    rope_part<R, TRAD>(k, e0, pos, rope, ko);
    return;
  }
  struct alignas(sizeof(X) * N) Run { X v[N]; };
  const bool second = !TRAD && e0 >= R / 2;  // (not TRAD) the run is in the second half of the rotated dims
  const int pe0 = TRAD ? e0 : second ? e0 - R / 2 : e0 + R / 2;  // the partners' run (a valid run of the row)
  const Run qr = *reinterpret_cast<const Run*>(q + e0), kr = *reinterpret_cast<const Run*>(k + e0);
  const Run qp = *reinterpret_cast<const Run*>(q + pe0), kp = *reinterpret_cast<const Run*>(k + pe0);
  const float base = rope[0], step = rope[1] * (float)pos;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (e0 >= R) {  // the run is past the rotated dims (R % N == 0: all of it)
      qo[i] = qr.v[i];
      ko[i] = kr.v[i];
      continue;
    }
    const int e = e0 + i, j = TRAD ? e / 2 : e % (R / 2);
    const bool sec = TRAD ? (e & 1) : second;
    const int pi = TRAD ? i ^ 1 : i;  // the partner's place in its run
    const float d = (float)j / (float)(R / 2);
    const float theta = step * exp2f(-d * base);
    const float cs = cosf(theta), sn = sinf(theta);
    const float qe = to_f(qr.v[i]), qx = to_f((TRAD ? qr : qp).v[pi]);
    const float ke = to_f(kr.v[i]), kx = to_f((TRAD ? kr : kp).v[pi]);
    qo[i] = (X)(sec ? qx * sn + qe * cs : qe * cs - qx * sn);
    ko[i] = (X)(sec ? kx * sn + ke * cs : ke * cs - kx * sn);
  }
}
"""
