// Shared between the kernel (w4a16_marlin.cu) and the torch binding (w4a16_binding.cpp).
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define W4A16_NWARPS 8

struct W4A16Params {
  const uint4* qpk;     // [NT][KT][32 lanes] x 16 B
  const uint4* scl;     // [NT][NG][8 g] x 8 scales (x dtype)
  const uint2* zp;      // [NT][NG][8 g] x 8 zero codes (uint8)
  const void* x;        // [M][x_stride] (x dtype)
  void* out;            // [M][N]
  const void* bias;     // [N] or null
  float* ws;            // [S][16][NT*64]
  int* cnt;             // [nblocks]
  long long x_stride;
  int M, N, K, G, Gp, NG, KT, NT, SPG;
  int WN, WK, nblocks, S, gps, vec;
  int wg_stages;        // wgmma kernel: stages of 8 k16 steps per column tile (its packed tensor's dim 1)
};

// Ring depth (512-byte weight loads in flight per warp) of the build for `occ` CTAs per SM.
inline int w4a16_ring_depth(int occ) { return occ == 2 ? 8 : 16; }

// Launch one verify GEMM (M <= 16). occ: CTAs per SM the kernel is built for (2: a ring of 8 loads
// per warp, <= 128 registers; 1: 16 loads). cpa: the ring in shared memory filled by cp.async
// (smem must then include W4A16_NWARPS * depth * 512 bytes) instead of registers. swap (M <= 8):
// weights as the MMA's A operand, zero point and scale applied per group after the MMA (smem must
// then also hold 32 bytes per k16 step of the CTA's K range, sums of x, after the ring). Returns the launch's error.
cudaError_t w4a16_verify_launch(const W4A16Params& p, bool bf16, bool r16, int occ, bool cpa, bool swap, int gx,
                                int smem, cudaStream_t stream);

// Batched verification on sm_90a (w4a16_wgmma.cu): wgmma with the dequantized weights as the register
// operand, tb tokens (32, 64 or 128) and 128 nw weight rows (nw = 1 or 2) per column block, `ctas`
// CTAs per token block sharing the (column block, stage) units evenly (stream-K). p.qpk points at the
// wgmma layout [NT][wg_stages][4][2][32][4] words; WN = log2(group size / 16); ws holds the partials
// [parts][ceil(M / tb)][column blocks][nwg nw tiles][64 tb] floats in fragment order (parts = the most CTAs
// sharing one column block), cnt column blocks * ceil(M / tb) zeroed counters. Group size 16 times a power of two, K a multiple of 8, x rows 16-byte aligned.
// xmap: the activations' tensor map (w4a16_wgmma_xmap) when the build stages with the copy engine
// (w4a16_wgmma_uses_tma()), else null.
cudaError_t w4a16_wgmma_launch(const CUtensorMap* xmap, const W4A16Params& p, bool bf16, int tb, int nw, int nwg, int ctas,
                               cudaStream_t stream);
bool w4a16_wgmma_uses_tma();
// Diagnostic builds (QB_CTA_TIMES) only: the last launch's per-CTA [start ns, end ns, SM id]; else
// cudaErrorNotSupported.
cudaError_t w4a16_wgmma_cta_times(unsigned long long* host, int ctas);
cudaError_t w4a16_wgmma_xmap(CUtensorMap* map, const void* x, bool bf16, int M, int K, long long x_stride, int tb);
// Tests only: D[64][32] (fp32) = A[64][16] @ B[16][32] (bf16, row-major) through one wgmma with the
// kernel's fragment and shared-memory layouts.
cudaError_t wgmma_probe_launch(const void* A, const void* B, float* D, cudaStream_t stream);
