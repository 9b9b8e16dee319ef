"""CUDA source of the dense 4-bit linear kernel (``DENSE_MMA``) on the expert kernels' tensor-core
slices (:mod:`.tensor_cores`); its Python side is :mod:`.dense`.
"""

# A dense quantized linear layer y = x W^T (4-bit W [NOUT, DIN], X bfloat16 / float16, T <= 16 tokens)
# on the same slices: the attention projections, a dense MLP and the LM head of a decode step, which
# MLX's quantized matmul reads at about a fifth of the copy bandwidth (docs/benchmarks.md). Template:
# X, S, DIN, NOUT, GROUP, KS, STAGES, SPLIT, XT. A block owns WARPS / SPLIT tiles of 16 rows; the SPLIT warps
# of a tile each take SLICES / SPLIT consecutive slices, and the block adds their partial dots in warp
# order (whatever T is, so a token alone and among 16 gets the same bits). Inputs x [T, DIN], w, sc, bi
# as MLX's QuantizedLinear stores them; output y [T, NOUT] in X (float32 sums rounded once).
_SETUP = r"""
  constexpr int SLICES = DIN / KS, WORDS = DIN / 8, GROUPS = DIN / GROUP, TILES = moedec::WARPS / SPLIT;
  constexpr int SP = SLICES / SPLIT;  // slices per warp
  static_assert(SLICES % SPLIT == 0 && NOUT % 16 == 0, "whole slices per warp, whole row tiles");
  __shared__ float s_sx[16 * GROUPS];  // [token][group]: sum of the token's inputs over the group
  __shared__ float s_part[moedec::WARPS][16 * 16];  // [warp][token * 16 + row]: partial dots
  extern __shared__ __align__(16) unsigned char ring_bytes[];
  using St = moedec::MStage<KS, S>;
  int T = 1;
  for (int i = 0; i + 1 < x_ndim; ++i) T *= x_shape[i];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int tile = warp / SPLIT, part = warp % SPLIT, r0 = (blockIdx.x * TILES + tile) * 16;
  const bool live = r0 < NOUT;  // the last block may have fewer tiles
  St* ring = reinterpret_cast<St*>(ring_bytes) + warp * STAGES;
  const unsigned long long once = moedec::evict_first_policy();  // weights are read once

  auto queue = [&](int k, St& st) {  // this warp's k-th slice: slice part * SP + k of its tile
    if (live && k < SP) {
      const uint32_t* w0 = w + (size_t)r0 * WORDS;
      const S* s0 = sc + (size_t)r0 * GROUPS;
      const S* b0 = bi + (size_t)r0 * GROUPS;
      moedec::queue_slice<KS, GROUP, WORDS, GROUPS, S>(st, w0, w0 + 8 * WORDS, s0, s0 + 8 * GROUPS, b0,
                                                       b0 + 8 * GROUPS, part * SP + k, once);
    }
    moedec::cp_commit();
  };

"""

# The ring's first slices queued (after what a kernel asks for first).
_PROLOGUE = r"""
#pragma unroll
  for (int k = 0; k + 1 < STAGES; ++k) queue(k, ring[k]);
"""

# Up to XT tokens' inputs copied into shared memory before any weight slice is queued: the copies then
# do not wait behind the ring's in the SM's queue, and the slices read x from shared memory (an H200,
# docs/benchmarks.md: the o projection 7.3 -> 6.7 us at T=1). More tokens read x where it is.
_X_SMEM = r"""
  X* xsm = reinterpret_cast<X*>(ring_bytes + sizeof(St) * STAGES * moedec::WARPS);  // [T, DIN], after the ring
"""
_X_FIRST = _X_SMEM + r"""
  const bool xin = T <= XT;
  if (xin) {
    for (int i = threadIdx.x; i < T * (DIN / 8); i += moedec::THREADS) moedec::cp16(xsm + i * 8, x + i * 8);
    moedec::cp_commit();
  }
"""
# The wait for those copies (xin: the inputs are in shared memory), and xs.
_X_WAIT = r"""
  if (xin) {
    moedec::cp_wait<STAGES - 1>();  // the inputs' copies: the oldest group
    __syncthreads();
  }
  const X* xs = xin ? xsm : x;
"""

# The rest of the kernel, on the activations xs [T, DIN] (x itself, or its RMSNorm in shared memory).
_TAIL = r"""
  moedec::sum_x_table<GROUP, GROUPS>(xs, T, s_sx);
  __syncthreads();

  if (live) {
    const X* xr[2];  // a column without a token reads the last token's row (and is not used)
    const float* sx[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      xr[nt] = xs + (size_t)min(nt * 8 + g, T - 1) * DIN;
#pragma unroll
      for (int h = 0; h < 2; ++h) sx[nt][h] = s_sx + min(nt * 8 + 2 * c + h, T - 1) * GROUPS;
    }
    float acc[2][4] = {};
    for (int k = 0; k < SP; ++k) {
      queue(k + STAGES - 1, ring[(k + STAGES - 1) % STAGES]);
      moedec::cp_wait<STAGES - 1>();
      __syncwarp();  // the stage holds every lane's copies: ldmatrix reads across lanes
      moedec::item_slice<KS, GROUP, true, false, X, S>(ring[k % STAGES], part * SP + k, T, xr, sx, acc);
      __syncwarp();
    }
    // rows g, g + 8 of the tile; columns (tokens) 2c, 2c + 1
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = nt * 8 + 2 * c + h;
        if (j < T) {
          s_part[warp][j * 16 + g] = acc[nt][h];
          s_part[warp][j * 16 + g + 8] = acc[nt][2 + h];
        }
      }
  }
  moedec::cp_wait<0>();
  __syncthreads();
  for (int i = threadIdx.x; i < TILES * T * 16; i += moedec::THREADS) {
    const int tl = i / (T * 16), j = i / 16 % T, r = i % 16, row = (blockIdx.x * TILES + tl) * 16 + r;
    if (row < NOUT) {
      float v = 0.f;
#pragma unroll
      for (int p = 0; p < SPLIT; ++p) v += s_part[tl * SPLIT + p][j * 16 + r];
      y[(size_t)j * NOUT + row] = (X)v;
    }
  }
"""

# x's RMSNorm first (mlx-lm's input_layernorm before the q/k/v projection), in the same kernel: one
# launch fewer per layer. Inputs also nw [DIN] (the norm's weight, X) and eps [1] float32; T <= NT tokens.
# Each block normalises the tokens into shared memory after its ring while the ring's first slices
# stream, rounded as MLX's rms_norm: xn = X(nw * X(x * rsqrt(mean(x^2) + eps))).
_NORM = r"""
  constexpr int CH = (DIN / 8 + moedec::THREADS - 1) / moedec::THREADS;  // chunks of 8 per thread
  __shared__ float s_ss[moedec::WARPS];
  X* xn = reinterpret_cast<X*>(ring_bytes + sizeof(St) * STAGES * moedec::WARPS);  // [T, DIN]
  for (int t = 0; t < T; ++t) {
    float xv[CH][8], ss = 0.f;
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) {
      const int i = (ch * moedec::THREADS + threadIdx.x) * 8;
      if (i < DIN) {
        moedec::load8(x + (size_t)t * DIN + i, xv[ch]);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += xv[ch][j] * xv[ch][j];
      }
    }
    const float r = moedec::block_rsqrt_mean(ss, s_ss, DIN, eps[0]);
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) {
      const int i = (ch * moedec::THREADS + threadIdx.x) * 8;
      if (i < DIN) {
        float gw[8];
        moedec::load8(nw + i, gw);
        alignas(16) X o[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = moedec::rms_out<X>(gw[j], xv[ch][j], r);
        *reinterpret_cast<uint4*>(xn + (size_t)t * DIN + i) = *reinterpret_cast<const uint4*>(o);
      }
    }
    __syncthreads();  // s_ss is read before the next token's sums
  }
  const X* xs = xn;
"""

# Rows of DX inputs where DX is not a whole number of slices (GLM-4.5's dense MLP: 10944): the weights
# are a copy padded with zero words, scales and biases to DIN inputs (dense.padded_plan), and each block
# copies the T <= NT tokens' inputs into shared memory first, as _X_FIRST does, with zeros past DX (a
# zero weight times a zero input adds exactly nothing), and waits for them with _X_WAIT. Inputs as
# DENSE_MMA; x [T, DX] (DX % 8 == 0).
_PAD = _X_SMEM + r"""
  constexpr bool xin = true;
  for (int i = threadIdx.x; i < T * (DIN / 8); i += moedec::THREADS) {
    const int t = i / (DIN / 8), k = i % (DIN / 8) * 8;
    if (k < DX) moedec::cp16(xsm + (size_t)t * DIN + k, x + (size_t)t * DX + k);
    else *reinterpret_cast<uint4*>(xsm + (size_t)t * DIN + k) = make_uint4(0u, 0u, 0u, 0u);
  }
  moedec::cp_commit();
"""

DENSE_MMA = _SETUP + _X_FIRST + _PROLOGUE + _X_WAIT + _TAIL
DENSE_PAD_MMA = _SETUP + _PAD + _PROLOGUE + _X_WAIT + _TAIL
DENSE_NORM_MMA = _SETUP + _PROLOGUE + _NORM + _TAIL
