// W4A16 GEMM for the verify regime (M = 1..16 rows), Marlin-style: int4 codes re-laid out offline
// (kernels/w4a16_cuda.py::prepack_w4a16) so that one 16-byte load per lane holds exactly the
// nibbles of its mma.sync.m16n8k16 B fragments for 8 n8-subtiles (one n64 x k16 tile per warp-load);
// lop3 turns two nibbles into a bf16x2 / half2 (0x4300|code = 128+code, 0x6400|code = 1024+code),
// one x2 sub removes (magic + zero) exactly, one x2 mul applies the group scale; fp32 accumulators.
//
// Work decomposition: CTA = 8 warps = WN (n64 columns) x WK (slices of the CTA's K range).
// grid = (gx, S): S K-splits (whole groups), gx persistent CTAs per split looping over n-blocks of
// WN x 64 columns. Each CTA loads the activations of its K range into shared memory once
// (rows >= M, padded group columns and k >= in_features zero-filled) and streams its weights from
// HBM with ld.global.nc 16-byte loads, PF steps ahead in registers (the ring crosses tile
// boundaries). Per tile: warps reduce over WK through shared memory; with S = 1 the CTA writes the
// output, with S > 1 it writes an fp32 partial to a workspace and the last CTA of the n-block to
// arrive (atomic counter) sums the S partials in split order (deterministic), writes the output and
// resets the counter to 0 (graph-replay safe: no state changes between calls).
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "w4a16_marlin.h"

namespace {

constexpr int NTHREADS = W4A16_NWARPS * 32;
constexpr int NWARPS = W4A16_NWARPS;


__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

template <uint32_t EX>
__device__ __forceinline__ uint32_t nib2(uint32_t q) {  // (q & 0x000f000f) | EX
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(q), "n"(0x000f000f), "n"(EX));
  return d;
}

// (v - zz) * s with v = magic + code, zz = magic + zero (so v - zz = code - zero exactly), as two
// x2 FMAs (native HFMA2 / HFMA2.BF16_V2 since sm_80): fma(v, 1, -zz) then fma(t, s, -0).
template <bool BF16>
__device__ __forceinline__ uint32_t sub_mul(uint32_t v, uint32_t nzz, uint32_t s) {
  uint32_t t, d;
  if constexpr (BF16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(t) : "r"(v), "r"(0x3F803F80u), "r"(nzz));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(t), "r"(s), "r"(0x80008000u));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(t) : "r"(v), "r"(0x3C003C00u), "r"(nzz));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(t), "r"(s), "r"(0x80008000u));
  }
  return d;
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// PF: weight loads in flight per warp (x 512 B); MINB: CTAs per SM the registers are capped for.
// (PF, MINB) = (6, 2) fits 128 registers without spills, (12, 1) is for 1 CTA/SM (big smem).
template <bool BF16, bool R16, int PF, int MINB>
__global__ void __launch_bounds__(NTHREADS, MINB) w4a16_verify_kernel(const W4A16Params p) {
  using T = typename std::conditional<BF16, __nv_bfloat16, __half>::type;
  constexpr uint32_t EX = BF16 ? 0x43004300u : 0x64006400u;
  constexpr int R = R16 ? 16 : 8;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int wn = warp % p.WN, wk = warp / p.WN;
  const int split = blockIdx.y;
  const int g0 = split * p.gps, g1 = min(p.NG, g0 + p.gps);
  const int c0 = g0 * p.SPG, c1 = g1 * p.SPG;  // k16 steps of this CTA
  const int L = c1 - c0;
  const int nsw = (L + p.WK - 1) / p.WK;         // steps per warp per tile (last warps may have fewer)
  const int nswp = (nsw + PF - 1) / PF * PF;     // padded: the ring phase is the same for every tile
  const int ws0 = c0 + wk * nsw;
  const int wcnt = max(0, min(c1, ws0 + nsw) - ws0);
  const int AST = p.gps * p.SPG * 16 + 8;        // smem row stride (elements): odd multiple of 16 B
  T* sA = reinterpret_cast<T*>(smem);
  float* red = reinterpret_cast<float*>(smem + (size_t)R * AST * sizeof(T));
  const int NBC = p.WN * 64;
  const int ntiles = (p.nblocks - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
  const int gx = gridDim.x;
  const int NT = p.NT;

  // ---- prefetch the first PF weight loads (before waiting for the activations)
  uint4 buf[PF];
  int pf_i = 0, pf_s = 0;
  int pf_nt = (blockIdx.x) * p.WN + wn;
#pragma unroll
  for (int i = 0; i < PF; ++i) {
    buf[i] = make_uint4(0, 0, 0, 0);
    if (pf_i < ntiles && pf_nt < NT && pf_s < wcnt)
      buf[i] = ld_stream(p.qpk + ((size_t)pf_nt * p.KT + ws0 + pf_s) * 32 + lane);
    if (++pf_s == nswp) { pf_s = 0; ++pf_i; pf_nt += gx * p.WN; }
  }

  // ---- scales of the first group
  uint4 sc_nxt = make_uint4(0, 0, 0, 0);
  uint2 z_nxt = make_uint2(0, 0);
  const int nx_gi = ws0 / p.SPG;  // group that sc_nxt holds (tile iteration 0)
  {
    int nt = blockIdx.x * p.WN + wn;
    if (ntiles > 0 && nt < NT && wcnt > 0) {
      size_t o = ((size_t)nt * p.NG + nx_gi) * 8 + g;
      sc_nxt = __ldg(p.scl + o);
      z_nxt = __ldg(p.zp + o);
    }
  }

  // ---- activations of this CTA's K range -> shared memory (zero-filled)
  {
    const T* x = reinterpret_cast<const T*>(p.x);
    const int cpr = L * 2;  // 8-element chunks per row
    const int nchunk = R * cpr;
    for (int c = tid; c < nchunk; c += NTHREADS) {
      int row = c / cpr, kc = c - row * cpr;
      int kq = c0 * 16 + kc * 8;
      int gi = kq / p.Gp, r = kq - gi * p.Gp;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (row < p.M && r < p.G) {
        int k = gi * p.G + r;
        const T* src = x + (size_t)row * p.x_stride + k;
        if (p.vec && k + 8 <= p.K) {
          val = *reinterpret_cast<const uint4*>(src);
        } else {
          union { uint4 u; T h[8]; } tmp;
#pragma unroll
          for (int e = 0; e < 8; ++e) tmp.h[e] = (k + e < p.K) ? src[e] : from_f<T>(0.f);
          val = tmp.u;
        }
      }
      *reinterpret_cast<uint4*>(sA + (size_t)row * AST + kc * 8) = val;
    }
  }
  __syncthreads();

  // ldmatrix base address of this lane
  uint32_t a_base;
  {
    int mat = lane >> 3, r = lane & 7, col;
    if (R16) { r += (mat & 1) * 8; col = (mat >> 1) * 8; }
    else { col = (mat & 1) * 8; }
    a_base = (uint32_t)__cvta_generic_to_shared(sA + (size_t)r * AST + col);
  }

  float acc[8][4];
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[s][e] = 0.f;
  uint32_t s2[8], zz[8];
#pragma unroll
  for (int s = 0; s < 8; ++s) { s2[s] = 0; zz[s] = EX; }
  int gend = 0;  // first step of the next group within the current tile

  for (int ti = 0; ti < ntiles; ++ti) {
    const int nb = blockIdx.x + ti * gx;
    const int nt = nb * p.WN + wn;
    const bool nt_ok = nt < NT;
    for (int base = 0; base < nswp; base += PF) {
#pragma unroll
      for (int i = 0; i < PF; ++i) {
        const int cs = base + i;
        const uint4 w = buf[i];
        // refill this ring slot with the load PF steps ahead
        if (pf_i < ntiles && pf_nt < NT && pf_s < wcnt)
          buf[i] = ld_stream(p.qpk + ((size_t)pf_nt * p.KT + ws0 + pf_s) * 32 + lane);
        if (++pf_s == nswp) { pf_s = 0; ++pf_i; pf_nt += gx * p.WN; }
        if (nt_ok && cs < wcnt) {
          const int k = ws0 + cs;
          if (cs == 0 || k == gend) {  // entering a group: take the prefetched scales, fetch the next
            const int gi = k / p.SPG;
            gend = (gi + 1) * p.SPG;
            const uint32_t sw[4] = {sc_nxt.x, sc_nxt.y, sc_nxt.z, sc_nxt.w};
#pragma unroll
            for (int s = 0; s < 8; ++s) {
              s2[s] = __byte_perm(sw[s >> 1], 0, (s & 1) ? 0x3232 : 0x1010);
              const uint32_t zw = (s < 4) ? z_nxt.x : z_nxt.y;
              const uint32_t b = s & 3;
              zz[s] = __byte_perm(zw, 0, 0x4040 | b | (b << 8)) | EX | 0x80008000u;  // -(magic + zero)
            }
            int fi = ti, fg = gi + 1;
            if (gend >= ws0 + wcnt) { fi = ti + 1; fg = ws0 / p.SPG; }
            const int fnt = (blockIdx.x + fi * gx) * p.WN + wn;
            if (fi < ntiles && fnt < NT) {
              size_t o = ((size_t)fnt * p.NG + fg) * 8 + g;
              sc_nxt = __ldg(p.scl + o);
              z_nxt = __ldg(p.zp + o);
            }
          }
          uint32_t a[4];
          const uint32_t addr = a_base + (uint32_t)((k - c0) * 16 * sizeof(T));
          if (R16) {
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                         : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                         : "r"(addr));
          } else {
            asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                         : "=r"(a[0]), "=r"(a[2])
                         : "r"(addr));
            a[1] = 0;
            a[3] = 0;
          }
          const uint32_t wq[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t q = wq[j];
            const uint32_t v0 = nib2<EX>(q), v1 = nib2<EX>(q >> 4), v2 = nib2<EX>(q >> 8),
                           v3 = nib2<EX>(q >> 12);
            const int sa = 2 * j, sb = 2 * j + 1;
            mma16816<BF16>(acc[sa], a, sub_mul<BF16>(v0, zz[sa], s2[sa]), sub_mul<BF16>(v1, zz[sa], s2[sa]));
            mma16816<BF16>(acc[sb], a, sub_mul<BF16>(v2, zz[sb], s2[sb]), sub_mul<BF16>(v3, zz[sb], s2[sb]));
          }
        }
      }
    }

    // ---- tile epilogue (every warp of the CTA gets here the same number of times)
    __syncthreads();  // previous epilogue done reading red
    if (nt_ok) {
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const int col = wn * 64 + s * 8 + t4 * 2;
        *reinterpret_cast<float2*>(red + (size_t)(wk * R + g) * NBC + col) = make_float2(acc[s][0], acc[s][1]);
        if (R16)
          *reinterpret_cast<float2*>(red + (size_t)(wk * R + g + 8) * NBC + col) =
              make_float2(acc[s][2], acc[s][3]);
      }
    }
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[s][e] = 0.f;
    __syncthreads();
    const int n0 = nb * NBC;
    T* out = reinterpret_cast<T*>(p.out);
    const T* bias = reinterpret_cast<const T*>(p.bias);
    const int total = p.M * NBC;
    if (p.S == 1) {
      for (int idx = tid; idx < total; idx += NTHREADS) {
        const int row = idx / NBC, col = idx - row * NBC, n = n0 + col;
        if (n < p.N) {
          float v = 0.f;
          for (int q = 0; q < p.WK; ++q) v += red[(size_t)(q * R + row) * NBC + col];
          if (bias) v += to_f<T>(bias[n]);
          out[(size_t)row * p.N + n] = from_f<T>(v);
        }
      }
    } else {
      const int WSN = NT * 64;
      for (int idx = tid; idx < total; idx += NTHREADS) {
        const int row = idx / NBC, col = idx - row * NBC, n = n0 + col;
        if (n < p.N) {
          float v = 0.f;
          for (int q = 0; q < p.WK; ++q) v += red[(size_t)(q * R + row) * NBC + col];
          __stcg(p.ws + ((size_t)split * 16 + row) * WSN + n, v);
        }
      }
      __threadfence();
      __syncthreads();
      __shared__ int s_last;
      if (tid == 0) s_last = (atomicAdd(p.cnt + nb, 1) == p.S - 1);
      __syncthreads();
      if (s_last) {
        __threadfence();
        for (int idx = tid; idx < total; idx += NTHREADS) {
          const int row = idx / NBC, col = idx - row * NBC, n = n0 + col;
          if (n < p.N) {
            float v = 0.f;
            for (int q = 0; q < p.S; ++q) v += __ldcg(p.ws + ((size_t)q * 16 + row) * WSN + n);
            if (bias) v += to_f<T>(bias[n]);
            out[(size_t)row * p.N + n] = from_f<T>(v);
          }
        }
        if (tid == 0) p.cnt[nb] = 0;  // ready for the next call (all S arrivals are in)
      }
    }
  }
}

template <bool BF16, bool R16, int PF, int MINB>
cudaError_t launch_t(const W4A16Params& p, int gx, int smem, cudaStream_t stream) {
  auto kern = w4a16_verify_kernel<BF16, R16, PF, MINB>;
  static int configured = 0;  // max dynamic smem set so far for this instantiation
  if (smem > 48 * 1024 && smem > configured) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    configured = smem;
  }
  dim3 grid(gx, p.S);
  kern<<<grid, NTHREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t w4a16_verify_launch(const W4A16Params& p, bool bf, bool r16, int occ, int gx, int smem, cudaStream_t stream) {
  if (occ == 2) {
    if (bf && r16) return launch_t<true, true, 6, 2>(p, gx, smem, stream);
    if (bf) return launch_t<true, false, 6, 2>(p, gx, smem, stream);
    if (r16) return launch_t<false, true, 6, 2>(p, gx, smem, stream);
    return launch_t<false, false, 6, 2>(p, gx, smem, stream);
  }
  if (bf && r16) return launch_t<true, true, 12, 1>(p, gx, smem, stream);
  if (bf) return launch_t<true, false, 12, 1>(p, gx, smem, stream);
  if (r16) return launch_t<false, true, 12, 1>(p, gx, smem, stream);
  return launch_t<false, false, 12, 1>(p, gx, smem, stream);
}
