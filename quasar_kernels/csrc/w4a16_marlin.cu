// W4A16 GEMM for the verify regime (M = 1..16 rows), Marlin-style: int4 codes re-laid out offline
// (quasar_kernels/w4a16_cuda.py::prepack_w4a16) so that one 16-byte load per lane holds exactly the
// nibbles of its mma.sync.m16n8k16 B fragments for 8 n8-subtiles (one n64 x k16 tile per warp-load);
// lop3 turns two nibbles into a bf16x2 / half2 (0x4300|code = 128+code, 0x6400|code = 1024+code),
// one x2 sub removes (magic + zero) exactly, one x2 mul applies the group scale; fp32 accumulators.
//
// Work decomposition: CTA = 8 warps = WN (n64 columns) x WK (slices of the CTA's K range).
// grid = (gx, S): S K-splits (whole groups), gx persistent CTAs per split looping over n-blocks of
// WN x 64 columns. Each CTA loads the activations of its K range into shared memory once
// (rows >= M, padded group columns and k >= in_features zero-filled) and streams its weights from
// HBM with ld.global.nc 16-byte loads, PF steps ahead in registers (the ring crosses tile
// boundaries), with a bulk L2 prefetch (one instruction per chunk of PF steps) two chunks ahead. Per tile: warps reduce over WK through shared memory; with S = 1 the CTA writes the
// output, with S > 1 it writes an fp32 partial to a workspace and the last CTA of the n-block to
// arrive (atomic counter) sums the S partials in split order (deterministic), writes the output and
// resets the counter to 0 (graph-replay safe: no state changes between calls).
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "w4a16_device.cuh"
#include "w4a16_marlin.h"

namespace {

constexpr int NTHREADS = W4A16_NWARPS * 32;

// PF: weight loads in flight per warp (x 512 B); MINB: CTAs per SM the registers are capped for.
// CPA: the ring lives in shared memory, filled by cp.async (PF slots of 512 B per warp after the
// activations and the reduction buffer): its loads are issued exactly PF steps ahead whatever ptxas
// schedules (the register ring's loads were sunk to the end of each chunk, ~3 steps before use:
// NOTES.md, run 3), and the ring costs no registers. Slot visits, refills and the tail are the same
// as the register ring's; the slot read becomes wait_group(PF - 1) + one 16-byte shared load.
//
// Main loop (per warp, per tile of `wcnt` k16 steps, padded to nswp = PF * nchunks): the ring buf[PF]
// is indexed with compile-time constants only (step base + i lives in slot i), consumed before it is
// refilled, so the registers are never moved. Chunks 0 .. nchunks-3 run with no guards: a 64-bit
// pointer advanced by a constant PF * 512 B, loads and ldmatrix at immediate offsets. The last two
// chunks (the tail) are guarded: slot refills past the tile's end load the next tile's first steps
// (step j of tile ti+1 into slot j), so the ring crosses tile boundaries with the same phase. The
// group (scale/zero) is entered when the step counter reaches the group's end (one compare per step);
// its scales were prefetched one group ahead with a precomputed offset (+8 per group, no division).
// SWAP (M <= 8 only; same packed layout): the weights are the MMA's A operand (m16 = 16 output
// columns, k16) and x^T its B operand (n8 = the up-to-8 rows of x), so no MMA rows are wasted and a
// n64 x k16 step is 4 MMAs instead of 8. The word that held the B fragments of n8-subtiles 2j, 2j+1
// holds, read in the order (q, q>>8, q>>4, q>>12), the A fragment of n16-tile j. The zero point and
// scale are not applied per weight: the MMA sees 128 + code (bf16; 1024 + code for fp16) straight
// from lop3, accumulates per group into acc[4 + j], and at the group's end
//   acc[j] += s * (acc_g - (magic + zero) * sum_k x)   (sum over the group, per row of x)
// so the per-weight work is 1 lop3 (+ shift) instead of lop3 + 2 x2-FMAs. sum_k x runs over exactly
// the k16 steps this warp multiplied in that group (a warp's K slice may start or end inside a
// group): per-step sums of x are staged once per CTA, and each step adds its two (rows 2 t4, 2 t4 + 1).
template <bool BF16, bool R16, int PF, int MINB, bool CPA, bool SWAP>
__global__ void __launch_bounds__(NTHREADS, MINB) w4a16_verify_kernel(const W4A16Params p) {
  static_assert(!(SWAP && R16), "the swapped kernel serves M <= 8");
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
  const int ws0 = c0 + wk * nsw;
  const int wcnt = max(0, min(c1, ws0 + nsw) - ws0);
  const bool active = wcnt > 0;
  const int nswp = (wcnt + PF - 1) / PF * PF;    // this warp's steps per tile, padded to whole chunks
  const int AST = p.gps * p.SPG * 16 + 8;        // smem row stride (elements): odd multiple of 16 B
  T* sA = reinterpret_cast<T*>(smem);
  float* red = reinterpret_cast<float*>(smem + (size_t)R * AST * sizeof(T));
  // CPA: this lane's 16 bytes of slot 0 of its warp's ring (slot i at + i * 512)
  const uint32_t ring = (uint32_t)__cvta_generic_to_shared(
      smem + (size_t)R * AST * sizeof(T) + (size_t)R * W4A16_NWARPS * 64 * 4 + ((size_t)warp * PF * 32 + lane) * 16);
  const int NBC = p.WN * 64;
  const int gx = gridDim.x;
  const int ntiles = (p.nblocks - (int)blockIdx.x + gx - 1) / gx;
  const int NT = p.NT;
  const int SPG = p.SPG;
  const int gi0 = active ? ws0 / SPG : 0;        // first group of this warp's K slice (once per kernel)
  const int gs0 = gi0 * SPG - ws0;               // its start, tile-local step (<= 0)

  // column tile of tile iteration ti, clamped (loads of an out-of-range tile read valid memory and are
  // discarded: only the last n-block of a WN > 1 grid has such warps)
  auto tile_nt = [&](int ti) { return min(((int)blockIdx.x + ti * gx) * p.WN + wn, NT - 1); };
  auto wptr = [&](int ti) { return p.qpk + ((size_t)tile_nt(ti) * p.KT + ws0) * 32 + lane; };
  auto sofs = [&](int ti) { return (tile_nt(ti) * p.NG + gi0) * 8 + g; };

  // ---- prefetch the first PF weight loads and the first group's scales (before the activations)
  uint4 buf[PF];  // the register ring (unused by CPA builds)
#pragma unroll
  for (int i = 0; i < PF; ++i) buf[i] = make_uint4(0, 0, 0, 0);
  // FILL(i, q): slot i <- the weight load at q (CPA: a cp.async of this lane's 16 bytes; the visit
  // commits). SLOT(i): the weights of slot i. Macros, so that i stays a compile-time constant of the
  // unrolled loops and the register ring never spills to local memory.
#define FILL(i, q)                              \
  do {                                          \
    if constexpr (CPA) cp_async16(ring + (i) * 512, (q)); \
    else buf[i] = ld_stream(q);                 \
  } while (0)
#define SLOT(i) (CPA ? (cp_async_wait<PF - 1>(), lds128(ring + (i) * 512)) : buf[i])
  uint4 sc_nxt = make_uint4(0, 0, 0, 0);
  uint2 z_nxt = make_uint2(0, 0);
  if (active && ntiles > 0) {
    const uint4* wp = wptr(0);
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      if (i < wcnt) FILL(i, wp + i * 32);
      if constexpr (CPA) cp_async_commit();
    }
    if (!CPA && lane == 0 && wcnt > PF) prefetch_l2(wp + PF * 32, (uint32_t)min(PF, wcnt - PF) * 512u);
    const int o = sofs(0);
    sc_nxt = __ldg(p.scl + o);
    z_nxt = __ldg(p.zp + o);
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
  // SWAP: per k16 step of the CTA's K range, the sums of x over the step's 16 channels for rows
  // (2 t, 2 t + 1), t = 0..3, in fp32 from the staged values the MMA reads: sXp[step * 4 + t]
  float2* sXp = reinterpret_cast<float2*>(smem + (size_t)R * AST * sizeof(T) + (size_t)R * W4A16_NWARPS * 64 * 4 +
                                          (CPA ? (size_t)W4A16_NWARPS * PF * 512 : 0));
  if constexpr (SWAP) {
    for (int e = tid; e < L * 4; e += NTHREADS) {
      const int c = e >> 2, t = e & 3;
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const T* src = sA + (size_t)(2 * t + h) * AST + (size_t)c * 16;
#pragma unroll
        for (int i = 0; i < 16; i += 8) {
          union { uint4 u; T v[8]; } w;
          w.u = *reinterpret_cast<const uint4*>(src + i);
#pragma unroll
          for (int q = 0; q < 8; ++q) sum[h] += to_f<T>(w.v[q]);
        }
      }
      sXp[e] = make_float2(sum[0], sum[1]);
    }
    __syncthreads();
  }
  // this lane's pair for this warp's first step; + 32 bytes per step
  const uint32_t sx_base = (uint32_t)__cvta_generic_to_shared(sXp + (ws0 - c0) * 4 + t4);

  // ldmatrix address of this lane for this warp's first step
  uint32_t a_base;
  {
    // x4: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0..a3. With R = 8 the row-8..15 matrices
    // repeat rows 0-7 (their products land in acc[][2..3], which are never read): the fragment
    // registers are then written in place by one ldmatrix, with no moves or zeroing per step.
    // SWAP: x2, matrices (rows 0-7) x (k 0-7 | 8-15) -> the B fragment b0, b1 of x^T (lanes 16-31
    // repeat lanes 0-15's addresses: ldmatrix.x2 ignores them)
    int mat = lane >> 3, r = lane & 7, col = SWAP ? (mat & 1) * 8 : (mat >> 1) * 8;
    if (R16) r += (mat & 1) * 8;
    a_base = (uint32_t)__cvta_generic_to_shared(sA + (size_t)r * AST + col + (ws0 - c0) * 16);
  }
  constexpr uint32_t ASTEP = 16 * sizeof(T);  // bytes of one k16 step of an activation row

  float acc[8][4];
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[s][e] = 0.f;
  // the group's scales: bf16x2 / half2 pairs and -(magic + zero) pairs; SWAP: fp32 bits of the scale
  // and of scale * (magic + zero), per column of the thread's A fragments
  uint32_t s2[8], zz[8];
#pragma unroll
  for (int s = 0; s < 8; ++s) { s2[s] = 0; zz[s] = SWAP ? 0 : EX; }
  float sx0 = 0.f, sx1 = 0.f;  // SWAP: sums of x for rows 2 t4, 2 t4 + 1 over the group's steps so far
  constexpr float MAGIC = BF16 ? 128.f : 1024.f;

  for (int ti = 0; ti < ntiles; ++ti) {
    const int nb = blockIdx.x + ti * gx;
    const bool nt_ok = nb * p.WN + wn < NT;
    const bool has_next = ti + 1 < ntiles;
    const uint4* wp = wptr(ti);        // this tile's step 0
    const uint4* wq = wptr(ti + 1);    // next tile's step 0 (clamped; loaded only if has_next)
    const int so_next = sofs(ti + 1);  // next tile's first group scales (clamped: a valid address)
    int so = sofs(ti);                 // scales of the group starting at gs
    int gs = gs0;                      // tile-local step where the next group starts

    // SWAP: fold the finished group's MMA sums (acc[4 + j]) into acc[j], scaled and zero-corrected
    auto flush = [&]() {
      if constexpr (SWAP) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int s = 2 * j + (e >> 1);
            const float sxm = (e & 1) ? sx1 : sx0;
            acc[j][e] = fmaf(__uint_as_float(s2[s]), acc[4 + j][e], acc[j][e]);
            acc[j][e] = fmaf(-__uint_as_float(zz[s]), sxm, acc[j][e]);
            acc[4 + j][e] = 0.f;
          }
        sx0 = sx1 = 0.f;
      }
    };

    // take the prefetched scales of the group starting at gs, prefetch the following group's
    auto enter = [&]() {
      const uint32_t sw[4] = {sc_nxt.x, sc_nxt.y, sc_nxt.z, sc_nxt.w};
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const uint32_t zw = (s < 4) ? z_nxt.x : z_nxt.y;
        const uint32_t b = s & 3;
        if constexpr (SWAP) {
          const uint32_t bits = (sw[s >> 1] >> ((s & 1) * 16)) & 0xffffu;
          float sc;
          if constexpr (BF16) sc = __uint_as_float(bits << 16);
          else sc = __half2float(__ushort_as_half((unsigned short)bits));
          const float z = (float)((zw >> (8 * b)) & 0xffu);
          s2[s] = __float_as_uint(sc);
          zz[s] = __float_as_uint(sc * (MAGIC + z));
        } else {
          s2[s] = __byte_perm(sw[s >> 1], 0, (s & 1) ? 0x3232 : 0x1010);
          zz[s] = __byte_perm(zw, 0, 0x4040 | b | (b << 8)) | EX | 0x80008000u;  // -(magic + zero)
        }
      }

      gs += SPG;
      so += 8;
      const int o = gs < wcnt ? so : so_next;
      sc_nxt = __ldg(p.scl + o);
      z_nxt = __ldg(p.zp + o);
    };

    // addr: the step's ldmatrix address; xs: its sums of x (SWAP), both shared-space byte addresses
    auto step = [&](const uint4 w, uint32_t addr, uint32_t xs) {
      if constexpr (SWAP) {
        uint32_t b0, b1;
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(b0), "=r"(b1) : "r"(addr));
        float2 xsum;
        asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(xsum.x), "=f"(xsum.y) : "r"(xs));
        sx0 += xsum.x;
        sx1 += xsum.y;
        const uint32_t wq4[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t q = wq4[j];
          const uint32_t a[4] = {nib2<EX>(q), nib2<EX>(q >> 8), nib2<EX>(q >> 4), nib2<EX>(q >> 12)};
          mma16816<BF16>(acc[4 + j], a, b0, b1);
        }
        return;
      }
      uint32_t a[4];
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                   : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                   : "r"(addr));
      const uint32_t wq4[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t q = wq4[j];
        const uint32_t v0 = nib2<EX>(q), v1 = nib2<EX>(q >> 4), v2 = nib2<EX>(q >> 8),
                       v3 = nib2<EX>(q >> 12);
        const int sa = 2 * j, sb = 2 * j + 1;
        mma16816<BF16>(acc[sa], a, sub_mul<BF16>(v0, zz[sa], s2[sa]), sub_mul<BF16>(v1, zz[sa], s2[sa]));
        mma16816<BF16>(acc[sb], a, sub_mul<BF16>(v2, zz[sb], s2[sb]), sub_mul<BF16>(v3, zz[sb], s2[sb]));
      }
    };

    if (active) {
      enter();  // first group of the tile (gs0 <= 0 = step 0)
      // main loop: whole chunks whose refills stay inside this tile; no guards
      const int nmain = nswp - 2 * PF;
      const uint4* lp = wp + PF * 32;
      uint32_t aa = a_base;
      int base = 0;
      for (; base < nmain; base += PF) {
        // chunk base/PF + 2 (inside this tile: base + 2 PF < nswp) into L2
        if (!CPA && lane == 0) prefetch_l2(lp - lane + PF * 32, (uint32_t)min(PF, wcnt - base - 2 * PF) * 512u);
#pragma unroll
        for (int i = 0; i < PF; ++i) {
          if (base + i == gs) { flush(); enter(); }
          step(SLOT(i), aa + i * ASTEP, sx_base + (uint32_t)(base + i) * 32u);
          FILL(i, lp + i * 32);
          if constexpr (CPA) cp_async_commit();
        }
        lp += PF * 32;
        aa += PF * ASTEP;
      }
      // tail: the last (up to) two chunks; steps past wcnt skipped, refills past the tile go to the
      // next tile's first steps (slot i <- its step i). Its first two chunks into L2 now.
      if (!CPA && lane == 0 && has_next) prefetch_l2(wq - lane, (uint32_t)min(2 * PF, wcnt) * 512u);
      for (; base < nswp; base += PF) {
#pragma unroll
        for (int i = 0; i < PF; ++i) {
          const int s = base + i;
          if (s < wcnt) {
            if (s == gs) { flush(); enter(); }
            step(SLOT(i), aa + i * ASTEP, sx_base + (uint32_t)s * 32u);
          }
          const int t = s + PF;
          if (t < wcnt) {
            FILL(i, wp + t * 32);
          } else if (t >= nswp && has_next && t - nswp < wcnt) {
            FILL(i, wq + (t - nswp) * 32);
          }
          if constexpr (CPA) cp_async_commit();
        }
        aa += PF * ASTEP;
      }
    }

    flush();  // SWAP: the tile's last group (a no-op otherwise, and for inactive warps: all zero)

    // ---- tile epilogue (every warp of the CTA gets here the same number of times)
    __syncthreads();  // previous epilogue done reading red
    if (SWAP && nt_ok) {
      // acc[j][e] = y[row 2 t4 + (e & 1)][column 16 j + 8 (e >> 1) + g of this warp's 64]
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          red[(size_t)(wk * R + 2 * t4 + (e & 1)) * NBC + wn * 64 + 16 * j + 8 * (e >> 1) + g] = acc[j][e];
    }
    if (!SWAP && nt_ok) {
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
#undef FILL
#undef SLOT
}

template <bool BF16, bool R16, int PF, int MINB, bool CPA, bool SWAP = false>
cudaError_t launch_t(const W4A16Params& p, int gx, int smem, cudaStream_t stream) {
  auto kern = w4a16_verify_kernel<BF16, R16, PF, MINB, CPA, SWAP>;
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

template <bool CPA>
cudaError_t launch_occ(const W4A16Params& p, bool bf, bool r16, int occ, int gx, int smem, cudaStream_t stream) {
  if (occ == 2) {
    if (bf && r16) return launch_t<true, true, 8, 2, CPA>(p, gx, smem, stream);
    if (bf) return launch_t<true, false, 8, 2, CPA>(p, gx, smem, stream);
    if (r16) return launch_t<false, true, 8, 2, CPA>(p, gx, smem, stream);
    return launch_t<false, false, 8, 2, CPA>(p, gx, smem, stream);
  }
  if (bf && r16) return launch_t<true, true, 16, 1, CPA>(p, gx, smem, stream);
  if (bf) return launch_t<true, false, 16, 1, CPA>(p, gx, smem, stream);
  if (r16) return launch_t<false, true, 16, 1, CPA>(p, gx, smem, stream);
  return launch_t<false, false, 16, 1, CPA>(p, gx, smem, stream);
}

template <bool CPA>
cudaError_t launch_swap(const W4A16Params& p, bool bf, int occ, int gx, int smem, cudaStream_t stream) {
  if (occ == 2) {
    if (bf) return launch_t<true, false, 8, 2, CPA, true>(p, gx, smem, stream);
    return launch_t<false, false, 8, 2, CPA, true>(p, gx, smem, stream);
  }
  if (bf) return launch_t<true, false, 16, 1, CPA, true>(p, gx, smem, stream);
  return launch_t<false, false, 16, 1, CPA, true>(p, gx, smem, stream);
}

cudaError_t w4a16_verify_launch(const W4A16Params& p, bool bf, bool r16, int occ, bool cpa, bool swap, int gx,
                                int smem, cudaStream_t stream) {
  if (swap) {
    if (r16) return cudaErrorInvalidValue;  // the swapped kernel serves M <= 8
    return cpa ? launch_swap<true>(p, bf, occ, gx, smem, stream) : launch_swap<false>(p, bf, occ, gx, smem, stream);
  }
  return cpa ? launch_occ<true>(p, bf, r16, occ, gx, smem, stream)
             : launch_occ<false>(p, bf, r16, occ, gx, smem, stream);
}
