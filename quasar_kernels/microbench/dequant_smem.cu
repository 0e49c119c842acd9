// Can a W4A16 kernel whose dequantization runs in its own warps beat the shipped one's loop? The shipped
// wgmma kernel (csrc/w4a16_wgmma.cu) dequantizes into registers and multiplies 64 weight rows by the
// token block per m64n64k16 wgmma, in the same warps; run 19 (quasar_kernels/NOTES.md) measured its
// skeleton alone — no copies, no dequantization — at ~60-68 cycles per 64x64x16 step per SM where the
// tensor pipe needs 32, and with the dequantization ~74. The alternative measured here, with nothing
// from global memory in the loop: producer warpgroups dequantize a stage of 256 weight rows x 64 k into
// a ring of bf16 shared-memory slots (K-major, 128-byte swizzle), and one consumer warpgroup multiplies
// the 64-token activation tile (A, shared memory) by each slot with four m64n256k16 wgmmas (both
// operands by descriptor: 4x the work of m64n64k16 per instruction), handing slots back through
// mbarriers (full: producers -> consumer, empty: consumer -> producers).
//   deq      the producers' real dequantization (w4a16_device.cuh's nib2 / sub_mul: lop3 and two bf16x2
//            FMAs per pair, q, q>>8, q>>4, q>>12), packed words and a scale / zero pair per row from
//            shared memory, 16-byte swizzled stores
//   copy     the producers store the packed words as they are (shared-memory traffic and hand-over, no ALU)
//   mma      no producers: the consumer multiplies the same slot over and over (the wgmma rate alone)
// with 1 or 2 producer warpgroups. Prints cycles per stage (4 m64n256k16 wgmmas: 512 tensor cycles at
// the dense peak), the same per 64x64x16 step per SM (32 at the peak; comparable to the shipped loop's
// figures above) and tensor TFLOP/s from CUDA events. Values are random, results are discarded.
// Build and run on Hopper: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
//   -I quasar_kernels/csrc quasar_kernels/microbench/dequant_smem.cu -o /tmp/dequant_smem && /tmp/dequant_smem
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <algorithm>
#include <vector>

#include "w4a16_device.cuh"

constexpr int STAGES = 1024;          // stages of 64 k per CTA
constexpr int NSLOT = 4;              // bf16 slots in the ring
constexpr int ROWS = 256;             // weight rows per slot (the wgmma's N)
constexpr int SLOT_BYTES = ROWS * 128;  // 64 k of bf16 per row: one 128-byte swizzle row
constexpr int A_BYTES = 64 * 128;     // 64 tokens x 64 k
constexpr int PACKED_BYTES = ROWS * 32;  // 64 int4 codes per row
constexpr int SZ_BYTES = ROWS * 4;    // a bf16 scale and a zero code pair per row
constexpr int SMEM = NSLOT * SLOT_BYTES + A_BYTES + PACKED_BYTES + SZ_BYTES + 2 * NSLOT * 8 + 1024;
enum Mode { DEQ = 0, COPY = 1, MMA = 2 };

__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile("{\n .reg .pred done;\nWAIT%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               " @!done bra WAIT%=;\n}" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void hold(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// m64n256k16, both operands from shared-memory descriptors (K-major, 128-byte swizzle), D += A B
__device__ __forceinline__ void wgmma_ss_m64n256k16_bf16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db));
}

template <int NPROD, int MODE>
__global__ void __launch_bounds__((NPROD + 1) * 128, 1) dequant_smem_kernel(long long* cycles, float* sink, uint32_t seed) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = ((uint32_t)__cvta_generic_to_shared(smem_raw) + 1023u) & ~1023u;
  uint8_t* sm = smem_raw + (base - (uint32_t)__cvta_generic_to_shared(smem_raw));
  const uint32_t a_off = NSLOT * SLOT_BYTES, pk_off = a_off + A_BYTES, sz_off = pk_off + PACKED_BYTES;
  const uint32_t bar_off = sz_off + SZ_BYTES;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (int i = tid; i < (int)bar_off / 4; i += nthreads) {  // small random bf16 pairs, random codes
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    const bool codes = i >= (int)pk_off / 4 && i < (int)sz_off / 4;
    reinterpret_cast<uint32_t*>(sm)[i] = codes ? h : (i >= (int)sz_off / 4 ? 0x3C003C00u | (h & 0x000f000fu) : h & 0x3F7F3F7Fu);
  }
  auto full = [&](int s) { return base + bar_off + 8 * s; };
  auto empty = [&](int s) { return base + bar_off + 8 * (NSLOT + s); };
  if (tid == 0) {
    for (int s = 0; s < NSLOT; ++s) {
      mbar_init(full(s), NPROD * 4);  // one arrival per producer warp
      mbar_init(empty(s), 1);         // the consumer's elected thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  const int wg = tid >> 7;
  if (wg < NPROD) {  // producers
    if constexpr (MODE == MMA) return;
    constexpr int RPT = ROWS / (NPROD * 128);  // rows per producer thread
    for (int j = 0; j < STAGES; ++j) {
      const int s = j % NSLOT;
      if (j >= NSLOT) mbar_wait(empty(s), (uint32_t)(j / NSLOT - 1) & 1);
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
        const int r = tid + rr * NPROD * 128;
        uint32_t w[8];
        // packed codes as [2 halves][256 rows][16 bytes]: a warp's 16-byte loads are contiguous
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                     : "r"(base + pk_off + r * 16) : "memory");
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[4]), "=r"(w[5]), "=r"(w[6]), "=r"(w[7])
                     : "r"(base + pk_off + ROWS * 16 + r * 16) : "memory");
        uint32_t sz;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sz) : "r"(base + sz_off + r * 4) : "memory");
        const uint32_t sc = __byte_perm(sz, 0, 0x1010), zz = 0xC300C300u | ((sz >> 16) & 0x000f000fu);
        const uint32_t row = base + (uint32_t)s * SLOT_BYTES + r * 128;
#pragma unroll
        for (int c = 0; c < 8; ++c) {  // 16-byte chunk c (k 8c .. 8c + 7) of the row, at chunk c ^ (r % 8)
          uint32_t v[4];
          if constexpr (MODE == DEQ) {
            v[0] = sub_mul<true>(nib2<0x43004300u>(w[c]), zz, sc);
            v[1] = sub_mul<true>(nib2<0x43004300u>(w[c] >> 8), zz, sc);
            v[2] = sub_mul<true>(nib2<0x43004300u>(w[c] >> 4), zz, sc);
            v[3] = sub_mul<true>(nib2<0x43004300u>(w[c] >> 12), zz, sc);
          } else {
            v[0] = w[c];
            v[1] = w[c] ^ 1u;
            v[2] = w[c] ^ 2u;
            v[3] = w[c] ^ 3u;
          }
          asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(row + ((c ^ (r & 7)) << 4)), "r"(v[0]), "r"(v[1]),
                       "r"(v[2]), "r"(v[3]) : "memory");
        }
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the stores, visible to the wgmmas
      __syncwarp();
      if ((tid & 31) == 0) mbar_arrive(full(s));
    }
    return;
  }
  // the consumer warpgroup
  float acc[128];
#pragma unroll
  for (int e = 0; e < 128; ++e) acc[e] = 0.f;
  const uint64_t da = desc_sw128(base + a_off);
  const long long t0 = clock64();
  for (int j = 0; j < STAGES; ++j) {
    const int s = MODE == MMA ? 0 : j % NSLOT;
    if constexpr (MODE != MMA) mbar_wait(full(s), (uint32_t)(j / NSLOT) & 1);
    const uint64_t db = desc_sw128(base + (uint32_t)s * SLOT_BYTES);
#pragma unroll
    for (int e = 0; e < 128; ++e) hold(acc[e]);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma_ss_m64n256k16_bf16(acc, da + 2 * i, db + 2 * i);  // k16 step i: 32 bytes on
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // stage j - 1's wgmmas are done
#pragma unroll
    for (int e = 0; e < 128; ++e) hold(acc[e]);
    if (MODE != MMA && j > 0 && (tid & 127) == 0) mbar_arrive(empty((j - 1) % NSLOT));
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  const long long t1 = clock64();
  float tot = 0.f;
#pragma unroll
  for (int e = 0; e < 128; ++e) tot += acc[e];
  sink[blockIdx.x * 128 + (tid & 127)] = tot;
  if ((tid & 127) == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int NPROD, int MODE>
void run(const char* name, int sms) {
  auto kern = dequant_smem_kernel<NPROD, MODE>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  long long* cyc;
  float* sink;
  cudaMalloc(&cyc, sizeof(long long) * sms);
  cudaMalloc(&sink, sizeof(float) * sms * 128);
  const int threads = (NPROD + 1) * 128;
  kern<<<sms, threads, SMEM>>>(cyc, sink, 1);  // warm-up
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  kern<<<sms, threads, SMEM>>>(cyc, sink, 2);
  cudaEventRecord(e1);
  const cudaError_t err = cudaEventSynchronize(e1);
  if (err != cudaSuccess) {
    printf("%-5s %d producer wg: %s\n", name, NPROD, cudaGetErrorString(err));
    return;
  }
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  std::vector<long long> c(sms);
  cudaMemcpy(c.data(), cyc, sizeof(long long) * sms, cudaMemcpyDeviceToHost);
  std::sort(c.begin(), c.end());
  const double per_stage = (double)c[sms / 2] / STAGES;
  const double flops = 2.0 * 64 * ROWS * 64 * STAGES * sms;
  printf("%-5s %d producer wg   cycles/stage %7.1f (peak 512)  cycles per 64x64x16 per SM %5.1f (peak 32)  %6.1f TFLOP/s\n",
         name, NPROD, per_stage, per_stage / 16, flops / (ms * 1e-3) / 1e12);
  cudaFree(cyc);
  cudaFree(sink);
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("%s, %d SMs; one CTA per SM, %d stages of 256 rows x 64 k x 64 tokens each\n", prop.name,
         prop.multiProcessorCount, STAGES);
  const int sms = prop.multiProcessorCount;
  run<1, MMA>("mma", sms);
  run<1, COPY>("copy", sms);
  run<2, COPY>("copy", sms);
  run<1, DEQ>("deq", sms);
  run<2, DEQ>("deq", sms);
  return 0;
}
