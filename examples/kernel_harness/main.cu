// Times the fused expert kernels (gate/up, down) with CUDA events on synthetic GLM-shaped layers, no MLX:
// 77 experts of 4096 -> 1536, 4-bit g64, bf16, top-8 (+ the shared expert), 8 layers cycled so no call
// finds the last one's experts in L2; then the dense kernel on the model's dense shapes (8 weight copies
// cycled), one line per T: the working tree's with each split (*: the one it picks), each --rev's as that
// revision picks it. Built by build.py; usage: harness [REPS]
// [SHARED 0/1] [ONLY: a variant name's part; "dense": the dense kernel alone]. Each variant's output is
// compared with the first variant's (max |dy| / max |y|).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include <set>
#include <algorithm>
#include <string>
#include "args.h"
#include "variants.inc"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); exit(1); } } while (0)

__device__ unsigned hash(unsigned long long i, unsigned seed) {
  unsigned long long z = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (unsigned)(z ^ (z >> 31));
}
__global__ void fill_u32(uint32_t* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) p[i] = hash(i, seed);
}
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, unsigned seed, float lo, float hi) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(lo + (hi - lo) * (hash(i, seed) >> 8) * (1.f / 16777216.f));
}
__global__ void copy4(const uint4* s, uint4* d, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) d[i] = s[i];
}

static void* dalloc(size_t bytes) { void* p; CK(cudaMalloc(&p, bytes)); return p; }
static uint32_t* ru32(size_t n, unsigned seed) { auto p = (uint32_t*)dalloc(n * 4); fill_u32<<<1024, 256>>>(p, n, seed); return p; }
static __nv_bfloat16* rbf(size_t n, unsigned seed, float lo, float hi) { auto p = (__nv_bfloat16*)dalloc(n * 2); fill_bf16<<<1024, 256>>>(p, n, seed, lo, hi); return p; }

// max |y - ref| / max |ref| of the n bf16 values at device pointer y; ref becomes y first when it does
// not hold n values (the first variant is the reference of the others).
static double rel_diff(const void* y, size_t n, std::vector<float>& ref) {
  std::vector<__nv_bfloat16> hy(n);
  CK(cudaMemcpy(hy.data(), y, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> fy(n);
  for (size_t i = 0; i < n; ++i) fy[i] = __bfloat162float(hy[i]);
  if (ref.size() != n) ref = fy;
  double md = 0, my = 0;
  for (size_t i = 0; i < n; ++i) { md = std::max(md, (double)fabs(fy[i] - ref[i])); my = std::max(my, (double)fabs(ref[i])); }
  return md / my;
}

int main(int argc, char** argv) {
  const int D = 4096, N = 1536, E = 77, K = 8, G = 64, BITS = 4, L = 8;
  int reps = argc > 1 ? atoi(argv[1]) : 64;
  int shared = argc > 2 ? atoi(argv[2]) : 0;
  std::string only = argc > 3 ? argv[3] : "";
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaStream_t st; CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  // copy bandwidth
  size_t cb = 1ull << 30;
  void* s = dalloc(cb); void* d = dalloc(cb);
  CK(cudaMemset(s, 1, cb));
  float ms;
  for (int w = 0; w < 2; ++w) CK(cudaMemcpyAsync(d, s, cb, cudaMemcpyDeviceToDevice, st));
  CK(cudaEventRecord(e0, st));
  for (int w = 0; w < 10; ++w) CK(cudaMemcpyAsync(d, s, cb, cudaMemcpyDeviceToDevice, st));
  CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1));
  double bw_memcpy = 2.0 * cb * 10 / (ms * 1e-3) / 1e9;
  CK(cudaEventRecord(e0, st));
  for (int w = 0; w < 10; ++w) copy4<<<prop.multiProcessorCount * 8, 256, 0, st>>>((const uint4*)s, (uint4*)d, cb / 16);
  CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1));
  double bw_kernel = 2.0 * cb * 10 / (ms * 1e-3) / 1e9;
  double bw = std::max(bw_memcpy, bw_kernel);
  printf("copy bandwidth (read+write): memcpy %.0f GB/s, uint4 kernel %.0f GB/s\n", bw_memcpy, bw_kernel);
  CK(cudaFree(s)); CK(cudaFree(d));

  // layers
  std::vector<Args> layers(L);
  unsigned seed = 1;
  for (auto& a : layers) {
    memset(&a, 0, sizeof(a));
    a.E = E; a.D = D; a.N = N; a.G = G; a.bits = BITS; a.K = K;
    size_t wu32 = (size_t)E * N * D * BITS / 32, sgn = (size_t)E * N * D / G;
    a.wg = ru32(wu32, seed++); a.wu = ru32(wu32, seed++);
    a.sg = rbf(sgn, seed++, 0.002f, 0.01f); a.su = rbf(sgn, seed++, 0.002f, 0.01f);
    a.bg = rbf(sgn, seed++, -0.06f, 0.f); a.bu = rbf(sgn, seed++, -0.06f, 0.f);
    a.wd = ru32(wu32, seed++); a.sd = rbf(sgn, seed++, 0.002f, 0.01f); a.bd = rbf(sgn, seed++, -0.06f, 0.f);
    size_t hw = (size_t)N * D * BITS / 32, hs = (size_t)N * D / G;
    a.hg = ru32(hw, seed++); a.hu = ru32(hw, seed++); a.hd = ru32(hw, seed++);
    a.hsg = rbf(hs, seed++, 0.002f, 0.01f); a.hsu = rbf(hs, seed++, 0.002f, 0.01f); a.hsd = rbf(hs, seed++, 0.002f, 0.01f);
    a.hbg = rbf(hs, seed++, -0.06f, 0.f); a.hbu = rbf(hs, seed++, -0.06f, 0.f); a.hbd = rbf(hs, seed++, -0.06f, 0.f);
  }
  int hmeta[3] = {shared, 0, 0}; int* meta = (int*)dalloc(12); CK(cudaMemcpy(meta, hmeta, 12, cudaMemcpyHostToDevice));
  void* act = dalloc((size_t)(256 + 16) * N * 4);
  void* y = dalloc((size_t)16 * D * 2);
  CK(cudaDeviceSynchronize());
  double gu_bytes = 2.0 * N * (D * BITS / 8.0 + 4.0 * D / G), dn_bytes = (double)D * (N * BITS / 8.0 + 4.0 * N / G);
  int nv = sizeof(VARIANTS) / sizeof(VARIANTS[0]);
  printf("bytes per expert: gate/up %.2f MB, down %.2f MB; shared expert fused: %d\n", gu_bytes / 1e6, dn_bytes / 1e6, shared);
  std::mt19937 rng(7);
  std::vector<float> ref;
  for (int T : {1, 2, 4, 8, 16}) {
    if (only == "dense") break;
    int P = T * K;
    double usum = 0;
    std::vector<Args> cs(L);
    for (int l = 0; l < L; ++l) {
      std::vector<int> inds(P); std::vector<float> sc(P);
      std::set<int> uni;
      for (int t = 0; t < T; ++t) {
        std::vector<int> perm(E); for (int i = 0; i < E; ++i) perm[i] = i;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int k = 0; k < K; ++k) { inds[t * K + k] = perm[k]; sc[t * K + k] = 0.1f + 0.05f * k; uni.insert(perm[k]); }
      }
      usum += uni.size();
      Args a = layers[l];
      a.T = T; a.P = P; a.U_hint = (int)uni.size() + shared;
      void* di = dalloc(P * 4); CK(cudaMemcpy(di, inds.data(), P * 4, cudaMemcpyHostToDevice));
      void* ds = dalloc(P * 4); CK(cudaMemcpy(ds, sc.data(), P * 4, cudaMemcpyHostToDevice));
      a.inds = di; a.scores = ds; a.x = rbf((size_t)T * D, 1000 + l, -2.f, 2.f); a.meta = meta; a.act = act; a.y = y; a.res = a.x;
      cs[l] = a;
    }
    CK(cudaDeviceSynchronize());
    double U = usum / L, slots = U + shared;
    printf("\nT=%d  U=%.1f  MB gate/up %.1f down %.1f\n", T, U, slots * gu_bytes / 1e6, slots * dn_bytes / 1e6);
    printf("  %-8s %9s %6s %9s %6s %9s %6s  %s\n", "variant", "gu us", "%bw", "down us", "%bw", "both us", "%bw", "max|dy|/max|y|");
    for (int v = 0; v < nv; ++v) {
      auto& V = VARIANTS[v];
      if (!only.empty() && only.find(V.name) == std::string::npos) continue;
      // correctness on layer 0
      V.gate_up(cs[0], st); V.down(cs[0], st);
      CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
      const double dy = rel_diff(y, (size_t)T * D, ref);
      double t3[3];
      for (int mode = 0; mode < 3; ++mode) {
        for (int w = 0; w < 2 * L; ++w) { if (mode != 1) V.gate_up(cs[w % L], st); if (mode != 0) V.down(cs[w % L], st); }
        CK(cudaEventRecord(e0, st));
        for (int i = 0; i < reps; ++i) { if (mode != 1) V.gate_up(cs[i % L], st); if (mode != 0) V.down(cs[i % L], st); }
        CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1));
        t3[mode] = ms * 1e3 / reps;
      }
      CK(cudaGetLastError());
      auto pct = [&](double bytes, double us) { return 100.0 * bytes / (us * 1e-6) / 1e9 / bw; };
      printf("  %-8s %9.1f %6.1f %9.1f %6.1f %9.1f %6.1f  %.2e\n", V.name, t3[0], pct(slots * gu_bytes, t3[0]), t3[1],
             pct(slots * dn_bytes, t3[1]), t3[2], pct(slots * (gu_bytes + dn_bytes), t3[2]), dy);
    }
  }

  const int nd = sizeof(DENSE) / sizeof(DENSE[0]);
  if (only.empty() || only == "dense") printf("\ndense kernel, 4-bit g%d bf16: us per call, %% of copy bandwidth on the weight bytes\n", G);
  for (int i0 = 0, i1; i0 < nd && (only.empty() || only == "dense"); i0 = i1) {
    const int din = DENSE[i0].din, nout = DENSE[i0].nout;
    for (i1 = i0; i1 < nd && DENSE[i1].din == din && DENSE[i1].nout == nout; ++i1) {}
    const size_t wn = (size_t)nout * din / 8, gn = (size_t)nout * din / G;
    std::vector<Args> ws(L);
    for (auto& a : ws) {
      memset(&a, 0, sizeof(a));
      a.D = din; a.w = ru32(wn, seed++); a.sc = rbf(gn, seed++, 0.002f, 0.01f); a.bi = rbf(gn, seed++, -0.06f, 0.f);
      a.x = rbf((size_t)16 * din, seed++, -2.f, 2.f); a.y = dalloc((size_t)16 * nout * 2);
    }
    CK(cudaDeviceSynchronize());
    const double bytes = wn * 4.0 + gn * 4.0;
    printf("%d -> %d (%.1f MB)\n", din, nout, bytes / 1e6);
    for (int T : {1, 4, 8, 16}) {
      std::vector<float> ref_d;
      printf("  T=%-2d", T);
      for (int v = i0; v < i1; ++v) {
        for (auto& a : ws) a.T = T;
        DENSE[v].run(ws[0], st);
        CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
        const double dy = rel_diff(ws[0].y, (size_t)T * nout, ref_d);
        for (int w = 0; w < 2 * L; ++w) DENSE[v].run(ws[w % L], st);
        CK(cudaEventRecord(e0, st));
        for (int i = 0; i < reps; ++i) DENSE[v].run(ws[i % L], st);
        CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1e3 / reps;
        printf("   %-8s %6.1f us %5.1f %% (%.0e)", DENSE[v].tag, us, 100.0 * bytes / (us * 1e-6) / 1e9 / bw, dy);
      }
      printf("\n");
    }
    for (auto& a : ws) { CK(cudaFree((void*)a.w)); CK(cudaFree((void*)a.sc)); CK(cudaFree((void*)a.bi)); CK(cudaFree((void*)a.x)); CK(cudaFree(a.y)); }
  }
  return 0;
}
