"""CUDA source of the router kernels: mlx-lm's ``noaux_tc`` MoE gate (GLM-4.x, DeepSeek-V3) in two
kernels, logits (one warp per (token, expert)) and the selection (one warp per token: sigmoid,
correction bias, group limit, top-K, normalisation and scaling). Their Python side is :mod:`.router`.
"""

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
