#pragma once
#include <cuda_runtime.h>
struct Args {
  const void *x, *inds, *scores, *meta;
  const void *wg, *sg, *bg, *wu, *su, *bu, *hg, *hsg, *hbg, *hu, *hsu, *hbu;
  void* act;
  const void *wd, *sd, *bd, *hd, *hsd, *hbd, *res;
  void* y;
  const void *w, *sc, *bi;  // a dense layer (DENSE_MMA)
  int T, K, E, D, N, G, bits, P, U_hint;
};
typedef void (*Launch)(const Args&, cudaStream_t);
struct Variant { const char* name; Launch gate_up, down; };
struct DenseVariant { const char* name; const char* tag; int din, nout, split; Launch run; };  // a dense kernel
