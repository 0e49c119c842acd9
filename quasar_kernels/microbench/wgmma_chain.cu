// How fast can one warpgroup issue register-A wgmmas (m64n64k16, bf16) the way the W4A16 wgmma
// kernel does? Run-8's ncu says its consumers take ~350 cycles per k16 step with 2 warpgroups per
// SM and ~750 with 4, against 32 cycles of tensor work at peak: this program measures the step
// itself, with nothing else in the kernel (B operand: a zeroed 16 KB shared buffer; no global
// memory), for the patterns the kernel could use:
//   wait1       fence; wgmma on the one accumulator; commit; wait_group 1 (the kernel today)
//   wait1_alu   the same plus a dependent dequantize-like chain writing the A registers (lop3 +
//               2 bf16x2 FMAs per register, 4 registers) before each wgmma
//   batch8      8 wgmmas on the one accumulator back to back, one commit, wait_group 0
//   acc2        two independent accumulators alternating, wait_group 1 (two chains in flight)
//   acc2_alu    acc2 plus the dequantize-like chain
//   stage       wait1_alu inside the kernel's stage frame: per 8 steps the weight words come from
//               shared memory (2 ld.shared.v4 per thread), and the stage ends with wait_group 0
//               and a CTA barrier (the cp.async kernel's buffer hand-over, minus the copies)
//   ss_wait1    A from shared memory too (both operands by descriptor), wait_group 1: what a kernel
//               that stages dequantized weights in shared memory would issue
//   ss_batch8   the same, 8 back to back, one wait 0
//   n128_alu    wait1_alu with m64n128k16 (128 tokens per wgmma: twice the work per instruction)
//   n128_b8     m64n128k16 register-A, 8 back to back (a dequantized stage held in registers)
//   stage_rand  stage with random shared memory (B operand and weight words) instead of zeros: does
//               real data (tensor-core power, clocks) slow the step?
//   stage_real  stage_rand with the kernel's own dequantization (w4a16_device.cuh's nib2 / sub_mul,
//               the q, q>>8, q>>4, q>>12 order, the per-stage scale word and zero codes read from
//               shared memory and spread with byte_perm): the shipped kernel's stage minus the copies
// The stage modes also run as 2 CTAs of 2 warpgroups per SM (the shipped kernel's residency, "2x2").
// One CTA per SM of 1, 2 or 4 warpgroups. Prints cycles per step per warpgroup (clock64, median
// over warpgroups), cycles per step per SM (/ warpgroups) and tensor TFLOP/s from CUDA events.
// Build and run on Hopper: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
//   -I quasar_kernels/csrc quasar_kernels/microbench/wgmma_chain.cu -o /tmp/wgmma_chain && /tmp/wgmma_chain
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <algorithm>
#include <utility>
#include <vector>

#include "w4a16_device.cuh"
#include "w4a16_wgmma_ops.inc"

constexpr int STEPS = 4096;  // k16 steps per warpgroup (multiple of 8)

__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// both operands from shared memory (A K-major, 128-byte swizzle, like B)
__device__ __forceinline__ void wgmma_ss_m64n64k16_bf16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db));
}
__device__ __forceinline__ void hold(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void hold(float& r) { asm volatile("" : "+f"(r)::"memory"); }

__device__ __forceinline__ uint32_t fake_dequant(uint32_t q, uint32_t s) {  // lop3 + 2 x bf16x2 fma
  uint32_t v, t, d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(q), "n"(0x000f000f), "n"(0x43004300));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(t) : "r"(v), "r"(0x3F803F80u), "r"(0xC300C300u));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(t), "r"(s), "r"(0x80008000u));
  return d;
}

template <int MODE>
__global__ void chain_kernel(long long* cycles, float* sink, uint32_t seed) {
  __shared__ __align__(1024) uint8_t sb[40960];
  for (int i = threadIdx.x; i < 40960 / 4; i += blockDim.x) {  // zeros, or small random bf16 pairs
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    reinterpret_cast<uint32_t*>(sb)[i] = MODE >= 10 ? (h & 0x3F7F3F7Fu) : 0u;  // |value| < 1, finite
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  const uint64_t d0 = desc_sw128((uint32_t)__cvta_generic_to_shared(sb));
  const uint64_t da = desc_sw128((uint32_t)__cvta_generic_to_shared(sb) + 20480);  // SS modes' A (zeros)
  float acc[2][32];
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[j][e] = 0.f;
  uint32_t a[2][4];
  uint32_t q = seed ^ threadIdx.x, s = 0x3F803F80u;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[j][r] = 0x3F803F80u;
  const long long t0 = clock64();
  for (int it = 0; it < STEPS; it += 8) {
    uint32_t w[8];
    uint32_t s_lo = 0x3F803F80u, s_hi = 0x3F803F80u, z_lo = 0xC300C300u, z_hi = 0xC300C300u;
    if constexpr (MODE == 11) {  // the stage's scale word and zero codes, spread as the kernel does
      const uint32_t sz = (uint32_t)__cvta_generic_to_shared(sb) + 24576 + ((threadIdx.x * 8 + it) & 1023);
      uint32_t sw;
      unsigned short zh;
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sw) : "r"(sz & ~3u) : "memory");
      asm volatile("ld.shared.u16 %0, [%1];" : "=h"(zh) : "r"((sz + 128) & ~1u) : "memory");
      const uint32_t zw = zh;
      s_lo = __byte_perm(sw, 0, 0x1010);
      s_hi = __byte_perm(sw, 0, 0x3232);
      z_lo = 0xC300C300u | (zw & 0xffu) | ((zw & 0xffu) << 16);
      z_hi = 0xC300C300u | (zw >> 8) | ((zw >> 8) << 16);
    }
    if constexpr (MODE == 5 || MODE == 10 || MODE == 11) {  // the stage's weight words, read from shared memory as the kernel does
      const uint32_t wa = (uint32_t)__cvta_generic_to_shared(sb) + ((threadIdx.x * 16 + it * 4) & 8191);
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(wa) : "memory");
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[4]), "=r"(w[5]), "=r"(w[6]), "=r"(w[7]) : "r"(wa + 8192) : "memory");
    }
    if constexpr (MODE == 6 || MODE == 7) {  // both operands from shared memory
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        wgmma_ss_m64n64k16_bf16(acc[0], da + (uint64_t)((i * 32) >> 4), d0 + (uint64_t)((i * 32) >> 4));
        if constexpr (MODE == 6) {
          asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
          asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        }
      }
      if constexpr (MODE == 7) {
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      }
#pragma unroll
      for (int e = 0; e < 32; ++e) hold(acc[0][e]);
    } else if constexpr (MODE == 9) {  // n128, 8 back to back on one accumulator
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int i = 0; i < 8; ++i) wgmma_m64n128k16_bf16(&acc[0][0], a[0], d0 + (uint64_t)((i * 32) >> 4), 1);
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 32; ++e) hold(acc[j][e]);
    } else if constexpr (MODE == 2) {  // batch8
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int i = 0; i < 8; ++i) wgmma_m64n64k16_bf16(acc[0], a[0], d0 + (uint64_t)((i * 32) >> 4), 1);
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
      for (int e = 0; e < 32; ++e) hold(acc[0][e]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        uint32_t* f = a[i & 1];
        if constexpr (MODE == 11) {  // the kernel's dequantization of k16 step i (no dependence between steps)
          f[0] = sub_mul<true>(nib2<0x43004300u>(w[i]), z_lo, s_lo);
          f[1] = sub_mul<true>(nib2<0x43004300u>(w[i] >> 8), z_hi, s_hi);
          f[2] = sub_mul<true>(nib2<0x43004300u>(w[i] >> 4), z_lo, s_lo);
          f[3] = sub_mul<true>(nib2<0x43004300u>(w[i] >> 12), z_hi, s_hi);
        } else if constexpr (MODE == 1 || MODE == 4 || MODE == 5 || MODE == 8 || MODE == 10) {
          q = (MODE == 5 || MODE == 10) ? (w[i] ^ q) : q * 1664525u + 1013904223u;
#pragma unroll
          for (int r = 0; r < 4; ++r) f[r] = fake_dequant(q >> (4 * r), s);
        }
        constexpr bool TWO = MODE == 3 || MODE == 4;
        float* d = acc[TWO ? (i & 1) : 0];
#pragma unroll
        for (int e = 0; e < 32; ++e) hold(d[e]);
        if constexpr (MODE == 8) {
#pragma unroll
          for (int e = 0; e < 32; ++e) hold(acc[1][e]);
        }
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        if constexpr (MODE == 8) wgmma_m64n128k16_bf16(&acc[0][0], f, d0 + (uint64_t)((i * 32) >> 4), 1);
        else wgmma_m64n64k16_bf16(d, f, d0 + (uint64_t)((i * 32) >> 4), 1);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
#pragma unroll
        for (int r = 0; r < 4; ++r) hold(a[(i + 1) & 1][r]);
      }
      if constexpr (MODE == 5 || MODE == 10 || MODE == 11) {  // end of stage: drain, then the barrier that frees the buffer
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        __syncthreads();
      }
    }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  const long long t1 = clock64();
  float tot = 0.f;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 32; ++e) tot += acc[j][e];
  sink[blockIdx.x * blockDim.x + threadIdx.x] = tot;
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * (blockDim.x / 128) + threadIdx.x / 128] = t1 - t0;
}

template <int MODE>
void run(const char* name, int sms, int nwg, int per_sm = 1) {
  sms *= per_sm;  // CTAs in the grid (per_sm CTAs of nwg warpgroups per SM)
  long long* cyc;
  float* sink;
  cudaMalloc(&cyc, sizeof(long long) * sms * nwg);
  cudaMalloc(&sink, sizeof(float) * sms * nwg * 128);
  chain_kernel<MODE><<<sms, nwg * 128>>>(cyc, sink, 1);  // warm-up
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  chain_kernel<MODE><<<sms, nwg * 128>>>(cyc, sink, 2);
  cudaEventRecord(e1);
  cudaError_t err = cudaEventSynchronize(e1);
  if (err != cudaSuccess) {
    printf("%-10s %dx%d: %s\n", name, per_sm, nwg, cudaGetErrorString(err));
    return;
  }
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  std::vector<long long> c(sms * nwg);
  cudaMemcpy(c.data(), cyc, sizeof(long long) * c.size(), cudaMemcpyDeviceToHost);
  std::sort(c.begin(), c.end());
  const double per_step = (double)c[c.size() / 2] / STEPS;
  const double flops = 2.0 * 64 * (MODE >= 8 ? 128 : 64) * 16 * STEPS * sms * nwg;
  printf("%-10s %dx%d   cycles/step/warpgroup %7.1f  cycles/step/SM %6.1f  %6.1f TFLOP/s\n", name, per_sm, nwg,
         per_step, per_step / (nwg * per_sm), flops / (ms * 1e-3) / 1e12);
  cudaFree(cyc);
  cudaFree(sink);
}

constexpr const char* MODE_NAMES[] = {"wait1",    "wait1_alu", "batch8",  "acc2",       "acc2_alu",  "stage",
                                     "ss_wait1", "ss_batch8", "n128_alu", "n128_b8", "stage_rand", "stage_real"};

template <int... MODES>
void run_modes(std::integer_sequence<int, MODES...>, int sms, int nwg, int per_sm) {
  (run<MODES>(MODE_NAMES[MODES], sms, nwg, per_sm), ...);
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("%s, %d SMs; m64n64k16 bf16 = 32 tensor cycles per SM at the dense peak (n128: 64)\n", prop.name,
         prop.multiProcessorCount);
  const int sms = prop.multiProcessorCount;
  for (int nwg : {1, 2, 4}) run_modes(std::make_integer_sequence<int, 12>{}, sms, nwg, 1);
  printf("2 CTAs of 2 warpgroups per SM (the shipped kernel's residency):\n");
  run_modes(std::integer_sequence<int, 5, 10, 11>{}, sms, 2, 2);
  return 0;
}
