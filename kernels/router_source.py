"""CUDA source of the router kernel: mlx-lm's ``noaux_tc`` MoE gate (GLM-4.x, DeepSeek-V3) in one
kernel: the logits (one warp per (token, expert), over many blocks) and then, in the block that
finishes last, the selection (one warp per token: sigmoid, correction bias, group limit, top-K,
normalisation and scaling). Its Python side is :mod:`.router`.
"""

# ROUTER. Template: X activations, W router weight, R router logit dtype (mlx-lm rounds x @ W.T to it),
# B correction-bias dtype, DIN hidden size, NE experts, K top-k, NG groups, TG groups kept, NORM
# normalise the top-k weights, NW warps per block. Inputs x [T, D], w [E, D], bias [E], rsf [SMALL]
# (element 0: the scaling factor), done [SMALL] uint32 (element 0: a block counter, zero; the last
# block puts it back to zero, so a counter that launches share one after another works too). Outputs logits [T, E] float32 (scratch), inds
# [T, K] int32, scores [T, K] float32. Every block writes its warps' logits, then counts itself done;
# the block that counts last sees every logit (each block fenced its writes before counting) and
# selects for all T tokens, a warp per token: one kernel on the step's path instead of a logits and a
# selection kernel per layer.
ROUTER = r"""
  __shared__ float s_sig[NW][NE];   // sigmoid(logit): the weight of a chosen expert
  __shared__ float s_sel[NW][NE];   // selection score: sigmoid + correction bias
  __shared__ float s_grp[NW][NG];
  __shared__ bool s_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  const int item = blockIdx.x * NW + warp;
  if (item < T * NE) {
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
  }
  __threadfence();  // this block's logits are visible to every block before it counts itself done
  __syncthreads();
  unsigned* count = const_cast<unsigned*>(done);
  if (threadIdx.x == 0) s_last = atomicAdd(count, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (threadIdx.x == 0) *count = 0u;  // every block has counted: the counter can serve a later launch
  float* sig = s_sig[warp];
  float* sel = s_sel[warp];
  for (int t = warp; t < T; t += NW) {
    for (int e = lane; e < NE; e += 32) {
      const float sg = 1.f / (1.f + expf(-__ldcg(logits + t * NE + e)));  // from L2: other blocks wrote it
      sig[e] = sg;
      sel[e] = sg + moedec::to_f(bias[e]);
    }
    __syncwarp();
    if (NG > 1) {  // keep the TG groups with the largest top-2 sums; zero the others' scores
      constexpr int GS = NE / NG;
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
      __syncwarp();
    }
    float mine = 0.f, total = 0.f;
    int my_e = 0;
    for (int j = 0; j < K; ++j) {  // K rounds of warp argmax (ties: the lower expert)
      float best = -INFINITY;
      int bi = NE;
      for (int e = lane; e < NE; e += 32) {
        const float v = sel[e];
        if (v > best) { best = v; bi = e; }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(moedec::FULL, best, o);
        const int oi = __shfl_xor_sync(moedec::FULL, bi, o);
        if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
      }
      const float wgt = sig[bi];
      total += wgt;
      if (lane == j) { my_e = bi; mine = wgt; }
      __syncwarp();
      if (lane == 0) sel[bi] = -INFINITY;
      __syncwarp();
    }
    if (lane < K) {
      if (NORM && K > 1) mine = mine / total;
      inds[t * K + lane] = my_e;
      scores[t * K + lane] = mine * rsf[0];
    }
    __syncwarp();  // the next token's scores go where this one's were
  }
"""
