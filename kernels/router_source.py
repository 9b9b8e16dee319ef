"""CUDA source of the router kernels: mlx-lm's ``noaux_tc`` MoE gate (GLM-4.x, DeepSeek-V3) in one
kernel: the logits (one block per expert, its warps splitting the row) and then, in the block that
finishes last, the selection (its threads share the tokens' experts: sigmoid, correction bias, group
limit, top-K, normalisation and scaling). ``ROUTER_NORM`` also does the decoder layer's residual add
and RMSNorm before it (one kernel where there were two). Their Python side is :mod:`.router`.
"""

# Device code both router kernels use (in the moedec namespace): the 8-value raw loads that let a
# block ask for its router row before it does anything else, the block counter, and the selection.
# Every block writes its expert's logits and counts itself done; the block that counts last sees
# every logit (each block fenced its writes before counting), puts the counter back to zero (so a
# counter that launches share one after another works too) and selects for all T tokens with all its
# threads.
SELECT = r"""
template <typename T> struct Raw8 { uint4 u[sizeof(T) / 2]; };  // 8 values as loaded, not yet floats
template <typename T> __device__ __forceinline__ Raw8<T> fetch8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.u[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}
template <typename T> __device__ __forceinline__ void unpack8(const Raw8<T>& r, float* o) {
  const T* v = reinterpret_cast<const T*>(r.u);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = to_f(v[i]);
}

__device__ __forceinline__ bool last_block(const unsigned* done, bool* s_last) {
  __threadfence();  // this block's logits are visible to every block before it counts itself done
  __syncthreads();
  unsigned* count = const_cast<unsigned*>(done);
  if (threadIdx.x == 0) *s_last = atomicAdd(count, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!*s_last) return false;
  __threadfence();
  if (threadIdx.x == 0) *count = 0u;  // every block has counted: the counter can serve a later launch
  return true;
}

// Block e's logits: w's row e [DIN] (its chunks of 8, CH per thread, fetched into wq) against each
// token's input row, whose chunk c (the thread's k-th) of 8 values row(t, k, c, v) gives; the block's
// NW warps split the row, and their partial sums are added in warp order: a token's logit does not
// depend on T.
template <typename W, typename R, int DIN, int NE, int NW, int MT, int CH, class Row>
__device__ __forceinline__ void expert_logits(const Raw8<W> (&wq)[CH], int T, Row row, float* logits,
                                              float (*s_part)[MT]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = 0; t < T; ++t) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = threadIdx.x + k * NW * 32;
      if (c < DIN / 8) {
        float xv[8], wv[8];
        row(t, k, c, xv);
        unpack8(wq[k], wv);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc = fmaf(xv[j], wv[j], acc);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) s_part[warp][t] = acc;
  }
  __syncthreads();
  if (threadIdx.x < T) {
    float a = 0.f;
#pragma unroll
    for (int w_ = 0; w_ < NW; ++w_) a += s_part[w_][threadIdx.x];
    logits[threadIdx.x * NE + blockIdx.x] = to_f((R)a);
  }
}

// logits [T, NE] float32 (written by other blocks: read from L2), bias [NE], rsf[0] the scaling
// factor -> inds [T, K] int32, scores [T, K] float32, as mlx-lm's gate: the K best experts by
// sigmoid + bias (ties: the lower expert), in that order, weighted by their sigmoids (normalised,
// summed in that order, then scaled). The block's threads share the (token, expert) pairs: each pair's
// logit and bias are loaded at once (one memory round trip for all), and each expert's place is the
// number of experts ahead of it, counted by one thread; then a warp per token sums its K weights.
template <int NE, int K, int NG, int TG, bool NORM, int NW, typename B>
__device__ void select_top_k(const float* logits, const B* bias, const float* rsf, int32_t* inds, float* scores,
                             int T, float (*s_sig)[NE], float (*s_sel)[NE], float (*s_grp)[NG], int (*s_pick)[K]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < T * NE; i += NW * 32) {  // pair i: token i / NE, expert i % NE
    const int t = i / NE, e = i - t * NE;
    const float sg = 1.f / (1.f + expf(-__ldcg(logits + i)));  // from L2: other blocks wrote it
    s_sig[t][e] = sg;
    s_sel[t][e] = sg + to_f(bias[e]);
  }
  __syncthreads();
  if (NG > 1) {  // a warp per token: keep the TG groups with the largest top-2 sums; zero the others' scores
    constexpr int GS = NE / NG;
    for (int t = warp; t < T; t += NW) {
      float* sel = s_sel[t];
      for (int g = lane; g < NG; g += 32) {
        float a = -INFINITY, b = -INFINITY;
        for (int i = 0; i < GS; ++i) {
          const float v = sel[g * GS + i];
          if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
        }
        s_grp[warp][g] = a + b;
      }
      __syncwarp();
      for (int g = lane; g < NG; g += 32) {
        int better = 0;
        for (int h = 0; h < NG; ++h) better += s_grp[warp][h] > s_grp[warp][g] || (s_grp[warp][h] == s_grp[warp][g] && h < g);
        if (better >= TG) for (int i = 0; i < GS; ++i) sel[g * GS + i] = 0.f;
      }
      __syncwarp();  // the next token's group sums go where this one's were
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < T * NE; i += NW * 32) {
    const int t = i / NE, e = i - t * NE;
    const float* sel = s_sel[t];
    const float v = sel[e];
    int ahead = 0;
#pragma unroll 11  // in part: the broadcast reads of sel go out ahead of the compares
    for (int o = 0; o < NE; ++o) {
      const float u = sel[o];
      ahead += u > v || (u == v && o < e);
    }
    if (ahead < K) s_pick[t][ahead] = e;
  }
  __syncthreads();
  for (int t = warp; t < T; t += NW) {
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) total += s_sig[t][s_pick[t][j]];
    if (lane < K) {
      const int e = s_pick[t][lane];
      float mine = s_sig[t][e];
      if (NORM && K > 1) mine = mine / total;
      inds[t * K + lane] = e;
      scores[t * K + lane] = mine * rsf[0];
    }
  }
}
"""

# How both router bodies open and close: the shared tables and the token count, this block's router
# row (expert blockIdx.x) asked for before anything else; then the logits from the body's row(t, c, v)
# (a token's input, 8 values of chunk c), the block count and the selection.
_OPEN = r"""
  constexpr int CH = (DIN / 8 + NW * 32 - 1) / (NW * 32);  // chunks of 8 inputs per thread
  __shared__ float s_sig[MT][NE];   // sigmoid(logit): the weight of a chosen expert
  __shared__ float s_sel[MT][NE];   // selection score: sigmoid + correction bias
  __shared__ float s_grp[NW][NG];
  __shared__ float s_part[NW][MT];
  __shared__ int s_pick[MT][K];
  __shared__ bool s_last;
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  const W* wr = w + (size_t)blockIdx.x * DIN;
  moedec::Raw8<W> wq[CH];
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = threadIdx.x + k * NW * 32;
    if (c < DIN / 8) wq[k] = moedec::fetch8(wr + c * 8);
  }
"""
_CLOSE = r"""
  moedec::expert_logits<W, R, DIN, NE, NW, MT, CH>(wq, T, row, logits, s_part);
  if (!moedec::last_block(done, &s_last)) return;
  moedec::select_top_k<NE, K, NG, TG, NORM, NW, B>(logits, bias, rsf, inds, scores, T, s_sig, s_sel, s_grp, s_pick);
"""

# ROUTER. Template: X activations, W router weight, R router logit dtype (mlx-lm rounds x @ W.T to it),
# B correction-bias dtype, DIN hidden size, NE experts, K top-k, NG groups, TG groups kept, NORM
# normalise the top-k weights, NW warps per block, MT the most tokens. One block per expert. Inputs
# x [T, D], w [E, D], bias [E], rsf [SMALL] (element 0: the scaling factor), done [SMALL] uint32
# (element 0: a block counter, zero; the last block puts it back to zero). Outputs logits [T, E]
# float32 (scratch), inds [T, K] int32, scores [T, K] float32: one kernel on the step's path instead
# of a logits and a selection kernel per layer.
ROUTER = _OPEN + r"""
  auto row = [&](int t, int, int c, float* v) { moedec::load8(x + (size_t)t * DIN + c * 8, v); };
""" + _CLOSE

# ROUTER_NORM. Template: as ROUTER, with X also the dtype of r, gw and the outputs h, n. Inputs x, r
# [T, D], gw [D] (the norm's weight), eps [SMALL] float32 (element 0), then w, bias, rsf, done as
# ROUTER. Outputs h = x + r and n = rms_norm(h, gw, eps) [T, D] (rounded as ADD_NORM rounds them),
# then logits, inds, scores as ROUTER's of n (bit for bit). Every block asks for its router row and
# the norm's weights first, then computes each token's RMS factor while they arrive (the rows are small
# and stay in L2), and forms the values of n it needs itself (the router does not wait for another
# kernel's n); chunk c of h and n is written by block c % blocks, as it forms them.
ROUTER_NORM = _OPEN + r"""
  static_assert(NW == moedec::WARPS, "block_rsqrt_mean sums WARPS partials");
  __shared__ float s_rms[MT];
  __shared__ float s_ss[NW];
  const float ep = eps[0];
  moedec::Raw8<X> gq[CH];  // the norm's weights of this thread's chunks, asked for with the router row
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = threadIdx.x + k * NW * 32;
    if (c < DIN / 8) gq[k] = moedec::fetch8(gw + c * 8);
  }
  for (int t = 0; t < T; ++t) {  // each token's 1 / RMS of h, in every block
    float ss = 0.f;
    for (int i = threadIdx.x * 8; i < DIN; i += NW * 256) {
      float a[8], b[8];
      moedec::load8(x + (size_t)t * DIN + i, a);
      moedec::load8(r + (size_t)t * DIN + i, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float v = moedec::to_f((X)(a[j] + b[j]));
        ss += v * v;
      }
    }
    const float rr = moedec::block_rsqrt_mean(ss, s_ss, DIN, ep);
    if (threadIdx.x == 0) s_rms[t] = rr;
    __syncthreads();  // s_ss is read before the next token's sums
  }
  // n's values of chunk c (the thread's k-th, the chunks whose x and r it loaded above); block c % grid
  // writes that chunk of h and n
  auto row = [&](int t, int k, int c, float* v) {
    float a[8], b[8], g[8];
    moedec::load8(x + (size_t)t * DIN + c * 8, a);
    moedec::load8(r + (size_t)t * DIN + c * 8, b);
    moedec::unpack8(gq[k], g);
    const bool mine = c % gridDim.x == blockIdx.x;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const X o = (X)(a[j] + b[j]);
      const X nv = moedec::rms_out<X>(g[j], moedec::to_f(o), s_rms[t]);
      if (mine) {
        h[(size_t)t * DIN + c * 8 + j] = o;
        n[(size_t)t * DIN + c * 8 + j] = nv;
      }
      v[j] = moedec::to_f(nv);
    }
  };
""" + _CLOSE
