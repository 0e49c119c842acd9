// W4A16 GEMM for batched verification (17..256+ rows of x) on Hopper (sm_90a): warpgroup MMAs
// (wgmma.mma_async m64nTBk16) with the dequantized weights as the register operand A and the
// activations as the shared-memory operand B, so the weights never make a round trip through
// shared memory after dequantization and one CTA multiplies each weight into up to 128 tokens.
//
// Weights: its own re-layout of the mma.sync kernel's packed words (quasar_kernels/w4a16_cuda.py,
// wgmma_pack): per (column tile of 64 rows, stage of 8 k16 steps) 4 KB, [4 warps][2 halves][32 lanes]
// x 16 bytes, where the 16 bytes of (warp w, half h, lane l) are k16 steps 4 h .. 4 h + 3 of lane l's
// mma.m16n8k16 A fragment of rows 16 w .. 16 w + 15 (each word read in the order q, q>>8, q>>4,
// q>>12) — exactly what warp w of a warpgroup supplies to an m64 wgmma. Scales / zeros (shared with
// the mma.sync kernel) of rows 16 w + g and 16 w + 8 + g sit side by side ([nt][group][g][2 w], [2 w + 1]).
//
// CTA = 2 or 3 warpgroups x nw column tiles = a block of 64 wg nw weight rows x TB tokens; grid (CTAs per
// token block, token blocks), the (block, stage) units split evenly over the CTAs (stream-K, see the
// kernel). A 4-stage cp.async pipeline brings, per stage, the packed weights, the scales / zeros of the
// groups the stage touches and the activation tile (TB x 128 channels, K-major, 128-byte swizzled: a
// 128-byte row of 64 channels per token, 1024-byte atoms) into shared memory (QB_WG_TMA / QB_WG_WS:
// candidate builds that stage through the copy engine instead); each warp dequantizes its A fragments
// (lop3 + an add and a multiply in bf16x2 per pair) while the previous k16 step's wgmmas run, the
// chain running on across stages. Every per-thread load address is computed once per column block; a
// stage adds its offset. A block's output leaves through shared memory (see finish_block).
// Requirements (checked by the binding): group size / 16 a power of two, K a multiple of 8, x rows
// 16-byte aligned.
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "w4a16_device.cuh"
#include "w4a16_marlin.h"

namespace {

#include "w4a16_wgmma_ops.inc"

#ifndef QB_WG_STAGES  // overridden only by quasar_kernels/microbench/wgmma_ablate.py's diagnostic builds
#define QB_WG_STAGES 4
#endif
constexpr int WG_STAGES = QB_WG_STAGES;
// QB_WG_NODRAIN (shipped since run 10b, 13-16 % faster on gate+up at M = 64 / 128, outputs bit for bit
// those of the drained loop, which QB_WG_NODRAIN=0 still builds for diagnosis): no wgmma drain at the end of each stage. The
// warpgroup keeps its last step's wgmmas in flight into the next stage (the A register sets and the
// wait_group 1 chain carry across stages; drained only before a block's output is read), and the
// loader runs WG_STAGES - 2 stages ahead instead of WG_STAGES - 1, so the buffer it overwrites is one
// whose wgmmas every warpgroup has finished by the barrier.
#ifndef QB_WG_NODRAIN
#define QB_WG_NODRAIN 1
#endif
constexpr bool WG_NODRAIN = QB_WG_NODRAIN != 0;
constexpr int WG_AHEAD = WG_NODRAIN ? WG_STAGES - 2 : WG_STAGES - 1;  // stages the loader runs ahead
// QB_WG_LOAD_AFTER (cp.async no-drain loop): the loader's copies for stage j + WG_AHEAD are issued after the
// wgmmas of k16 step QB_WG_LOAD_AFTER - 1 of stage j, not right after the stage's barrier (0). Between the
// barrier and a stage's first wgmma only the previous stage's last wgmma is in flight, so whatever
// sits there (the loader's ~40 instructions per warp, then step 0's shared loads and dequantization)
// leaves the tensor pipe idle (SASS, session 20); later, it runs in the shadow of queued wgmmas. Measured 0-3 %
// faster at 2 / 4 (run 19), so not shipped; at 1 ptxas serializes the (3, 1) instances' wgmmas (C7513).
#ifndef QB_WG_LOAD_AFTER
#define QB_WG_LOAD_AFTER 0
#endif
constexpr int WG_LOAD_AFTER = QB_WG_LOAD_AFTER;
static_assert(WG_LOAD_AFTER >= 0 && WG_LOAD_AFTER < 8, "QB_WG_LOAD_AFTER: a k16 step of the stage (0: before step 0)");
// QB_WG_ASETS (diagnostic builds only): A register sets per tile. Step i dequantizes into set i % ASETS and
// waits until at most ASETS - 1 of the warpgroup's wgmmas are in flight (wait_group ASETS - 1), so 2 sets
// keep two wgmmas in flight per warpgroup (shipped) and 4 keep four. A power of two dividing the 8 steps of a
// stage, so a step's set is known at compile time across stages.
#ifndef QB_WG_ASETS
#define QB_WG_ASETS 2
#endif
constexpr int WG_ASETS = QB_WG_ASETS;
// QB_ABLATE_UNSAFE: timing-only builds that drop the per-stage proxy fence while still copying (outputs not
// guaranteed: the wgmmas may read a stage before the copies are visible to the async proxy)
#if (defined(QB_ABLATE_NOBAR) || defined(QB_ABLATE_NOFENCE)) && !defined(QB_ABLATE_NOLOAD) && !defined(QB_ABLATE_UNSAFE)
#error "QB_ABLATE_NOBAR / NOFENCE drop what publishes each stage's copies: only with QB_ABLATE_NOLOAD (or QB_ABLATE_UNSAFE)"
#endif
static_assert(WG_ASETS == 2 || WG_ASETS == 4, "A register sets: 2 or 4");
// QB_WG_TMA: one thread per CTA stages each stage with the copy engine — the packed weights and scales /
// zeros by 1-D bulk copies, the activations by a 2-D tensor-map load that writes the 128-byte swizzle
// and zero-fills past M and K — completing on the stage's mbarrier, instead of every thread issuing
// cp.async copies with their own address math (19-22 % of the kernel's time, ncu run 11). The per-stage
// CTA barrier stays (a buffer is refilled only after every warpgroup is done with it).
#ifndef QB_WG_TMA
#define QB_WG_TMA 0
#endif
// QB_WG_WS (implies QB_WG_TMA): warp-specialized. One extra warp per CTA (the producer) issues every
// stage's copies as soon as the buffer is free; each buffer has a second mbarrier on which every consumer
// thread arrives once its warpgroup's wgmmas of that stage are done (after the next stage's first wait),
// so there is no per-stage CTA barrier and the consumer warpgroups never stop for the copies or for each
// other (a third of the time at M = 64 went to copy issue, waits and barriers, all warpgroups at once:
// ncu, run 12). A block's last buffer is released only after its epilogue has used it.
#ifndef QB_WG_WS
#define QB_WG_WS 0
#endif
#if QB_WG_WS && !QB_WG_TMA
#undef QB_WG_TMA
#define QB_WG_TMA 1
#endif
constexpr bool WG_WS = QB_WG_WS != 0;
constexpr int WG_PRODUCER_THREADS = WG_WS ? 32 : 0;
constexpr bool WG_TMA = QB_WG_TMA != 0;
#if QB_WG_TMA && !QB_WG_NODRAIN
#error "QB_WG_TMA is built for the no-drain loop only"
#endif
// QB_WG_PDL (diagnostic builds only, cp.async loop): programmatic dependent launch. The kernel is launched
// with programmatic stream serialization, so it may start while the previous kernel in the stream is still
// finishing: the first stages' weights and scales / zeros (which no kernel writes) are fetched before
// `griddepcontrol.wait`; the activations (which the previous kernel may have written) and every global
// write (workspace, counters, output) come after it. Each CTA lets the next kernel launch once its last
// stage is issued. Down's fixed cost per launch (~5.5 us of ~23 at M = 64: launch gap, pipeline fill,
// block hand-over; run 19) is what it aims at; a chain of launches gains, a single GEMM timed alone does
// not, and cuBLAS gets no such overlap in our timing, so its time is reported apart from kernel times.
#ifndef QB_WG_PDL
#define QB_WG_PDL 0
#endif
constexpr bool WG_PDL = QB_WG_PDL != 0;
#if QB_WG_PDL && QB_WG_TMA
#error "QB_WG_PDL is built for the cp.async loop only"
#endif
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

constexpr int WG_LKS = 3;
constexpr int WG_KSTEPS = 1 << WG_LKS;      // k16 steps per stage (a stage's fixed cost is what bounds the kernel)
constexpr int WG_SZ_BYTES = 192;           // one (column tile, group): 64 scales (128 B) + 64 zero codes

// cp.async of 16 bytes, zeros instead of the source unless `valid` (the source is then not read: PTX's
// ignore-src), issued only if `on`; both predicates, no branch
__device__ __forceinline__ void cp_async16_zero_unless(uint32_t dst, const void* src, bool valid, bool on) {
  asm volatile("{\n .reg .pred p, z;\n setp.ne.b32 p, %3, 0;\n setp.eq.b32 z, %2, 0;\n"
               " @p cp.async.cg.shared.global [%0], [%1], 16, z;\n}"
               ::"r"(dst), "l"(__cvta_generic_to_global(src)), "r"((int)valid), "r"((int)on)
               : "memory");
}

// cp.async under a predicate, no branch: with wgmmas in flight across the loader (QB_WG_NODRAIN) a
// per-thread branch may make ptxas serialize every wgmma (C7518: its waits in a divergent path)
__device__ __forceinline__ void cp_async16_if(uint32_t dst, const void* src, bool on) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n}"
               ::"r"(dst), "l"(__cvta_generic_to_global(src)), "r"((int)on)
               : "memory");
}

#if QB_WG_TMA
// Copy-engine staging (QB_WG_TMA). Each issue is predicated, not branched (see cp_async16_if).
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx_if(uint32_t bar, uint32_t bytes, bool on) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n}"
               ::"r"(bar), "r"(bytes), "r"((int)on) : "memory");
}
// bytes (a multiple of 16, 16-byte aligned on both sides) global -> shared, completing on bar
__device__ __forceinline__ void bulk_g2s_if(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, bool on) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n"
               " @p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n}"
               ::"r"(dst), "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(bar), "r"((int)on) : "memory");
}
// one box of a 2-D tensor map at (c0, c1) into dst (1024-byte aligned for the 128-byte swizzle), completing on bar
__device__ __forceinline__ void tma_2d_if(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar, bool on) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
               " @p cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n}"
               ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "r"((int)on) : "memory");
}
[[maybe_unused]] __device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool on) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p mbarrier.arrive.shared::cta.b64 _, [%0];\n}"
               ::"r"(bar), "r"((int)on) : "memory");
}
// Wait for the phase of `parity` to complete. A loop inside one asm block (as CUTLASS's barrier wait),
// so ptxas sees no divergent branch between a warpgroup's wgmmas; a phase that never completes (a
// byte count that does not match the copies) traps after ~16 M tries instead of hanging the GPU.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile("{\n .reg .pred done, more;\n .reg .u32 n;\n mov.u32 n, 0;\n"
               "WAIT%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @done bra DONE%=;\n"
               " add.u32 n, n, 1;\n setp.lt.u32 more, n, 16777216;\n @more bra WAIT%=;\n trap;\n"
               "DONE%=:\n}" ::"r"(bar), "r"(parity) : "memory");
}
#endif

// A CTA-uniform value marked warp-uniform for ptxas (a lane-0 broadcast, as CUTLASS does): with
// wgmmas in flight across the loop (QB_WG_NODRAIN) every branch between issue and wait must be
// provably non-divergent, and ptxas cannot see through the 64-bit divisions of the work split.
template <bool ON>
__device__ __forceinline__ int warp_uniform(int v) {
  if constexpr (ON) return __shfl_sync(0xffffffffu, v, 0);
  else return v;
}

// Shared memory written through the generic proxy (cp.async, st.shared) is read by wgmma through the
// async proxy: each thread fences its own writes before the barrier that publishes them.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// wgmma reads its register operands (A and the accumulators) asynchronously, until wait_group: an
// empty asm that "redefines" a register keeps the compiler from reusing or moving it across that point.
__device__ __forceinline__ void hold(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void hold(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// Per-thread constants computed once: made opaque so the compiler keeps them in registers instead of
// recomputing them from threadIdx each stage (it did: ~150 instructions of loader per stage, run 7).
__device__ __forceinline__ void pin(uint32_t& r) { asm volatile("" : "+r"(r)); }
__device__ __forceinline__ void pin(int& r) { asm volatile("" : "+r"(r)); }
template <typename P>
__device__ __forceinline__ void pin(P*& ptr) { asm volatile("" : "+l"(ptr)); }

// Epilogue helpers. Two floats rounded to one 32-bit pair of the output type (low half first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
// Four 8x8 16-bit matrices in the mma accumulator layout (lane l holds row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1 of each), stored transposed: lane 8 i + k names where column k of matrix i goes.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t* r) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
               ::"r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
// A barrier of `threads` threads on barrier `id` (0 is __syncthreads').
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Shared-memory matrix descriptor, K-major with the 128-byte swizzle: each token's 64 channels are
// one 128-byte row, 8 rows form a 1024-byte atom (SBO 1024 B; LBO unused for swizzled K-major), and
// 16-byte chunk c of row r sits at chunk c ^ (r % 8) (address bits 4-6 XOR bits 7-9, so atoms are
// 1024-byte aligned). The no-swizzle layout it replaces left wgmma's reads bank-conflicted: 1.6x
// slower at 64 tokens (quasar_kernels/NOTES.md, runs 6e / 6f).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// Byte offset of 16-byte chunk c (8 channels) of token row t in a swizzled atom column.
__device__ __forceinline__ uint32_t sw128_offset(int t, int c) { return (uint32_t)(t * 128 + ((c ^ (t & 7)) << 4)); }

template <bool BF16, int TB>
__device__ __forceinline__ void wgmma_tb(float* d, const uint32_t* a, uint64_t desc) {
  if constexpr (BF16) {
    if constexpr (TB == 32) wgmma_m64n32k16_bf16(d, a, desc, 1);
    else if constexpr (TB == 64) wgmma_m64n64k16_bf16(d, a, desc, 1);
    else wgmma_m64n128k16_bf16(d, a, desc, 1);
  } else {
    if constexpr (TB == 32) wgmma_m64n32k16_f16(d, a, desc, 1);
    else if constexpr (TB == 64) wgmma_m64n64k16_f16(d, a, desc, 1);
    else wgmma_m64n128k16_f16(d, a, desc, 1);
  }
}

// Shared memory of one pipeline stage, in bytes: packed weights, scales + zeros, activations, for a
// block of CT column tiles.
template <int TB, int CT>
struct WgStage {
  static constexpr int W = CT * 4096;  // per 64-row tile: 8 k16 steps x 512 B
  // up to WG_KSTEPS groups per stage (G = 16), padded so the activations start 1024-byte aligned: the
  // 128-byte swizzle is a function of address bits 4-9 (3 tiles, unpadded, put them 512 bytes off)
  static constexpr int SZ = (CT * WG_KSTEPS * WG_SZ_BYTES + 1023) / 1024 * 1024;
  static constexpr int X = TB * WG_KSTEPS * 16 * 2;
  static constexpr int BYTES = W + SZ + X;
  static_assert((W + SZ) % 1024 == 0 && BYTES % 1024 == 0, "swizzled activation atoms must be 1024-byte aligned");
};

#ifndef QB_CTA_TIMES
#define QB_CTA_TIMES 0
#endif
#if QB_CTA_TIMES  // diagnostic builds only (wgmma_ablate.py --times): when each CTA ran, and where
constexpr int QB_TIMES_CTAS = 16384;
__device__ unsigned long long qb_cta_times[3 * QB_TIMES_CTAS];  // per CTA of token block 0: start ns, end ns, SM
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

// NTW: column tiles (of 64 weight rows) per warpgroup, NWG: warpgroups per CTA, so a CTA's block covers
// 64 NWG NTW weight rows and reads each activation tile once per block. NWG = 3 (one CTA per SM) makes
// gate+up's 384 tiles 128 blocks, one per SM, where NWG = 2 made 192 blocks on 132 SMs: 60 SMs with
// two blocks, 72 idle half the time (quasar_kernels/NOTES.md, run 10).
//
// Work split (stream-K): the (column block, stage) units of one token block, U = NB x KS of them, are
// cut into gridDim.x equal contiguous ranges, one per CTA, so every CTA gets the same number of stages
// whatever the number of column blocks (a grid of one CTA per block left SMs idle: 192 blocks on 132
// SMs). A CTA's range crosses column blocks; a block it covers whole is written straight to the output,
// a part of one goes to the workspace slot of its rank among the block's CTAs, and the last of them to
// arrive sums the slots in rank order (deterministic) and resets the block's counter.
template <bool BF16, int TB, int NTW, int NWG, int MINB>
__global__ void __launch_bounds__(NWG * 128 + WG_PRODUCER_THREADS, MINB) w4a16_wgmma_kernel(const __grid_constant__ CUtensorMap xmap, const W4A16Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename std::conditional<BF16, __nv_bfloat16, __half>::type;
  constexpr int WG_THREADS = NWG * 128;
  constexpr int CT = NWG * NTW;  // column tiles per block
  using L = WgStage<TB, CT>;
  static_assert(NWG * TB * 128 <= L::BYTES, "a stage buffer holds every warpgroup's staged output tile (block epilogue)");
  constexpr uint32_t EX = BF16 ? 0x43004300u : 0x64006400u;
  constexpr uint32_t NEG = BF16 ? 0xC300C300u : 0xE400E400u;  // -(magic), a zero code ORed into each half
  extern __shared__ __align__(1024) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3, g = lane >> 2;
  const int tok0 = blockIdx.y * TB;
#if QB_CTA_TIMES
  if (tid == 0 && blockIdx.y == 0 && blockIdx.x < QB_TIMES_CTAS) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    qb_cta_times[3 * blockIdx.x] = global_ns();
    qb_cta_times[3 * blockIdx.x + 2] = sm;
  }
#endif
  const int KS = p.wg_stages, NB = (p.NT + CT - 1) / CT;
  const long long U = (long long)NB * KS, GC = gridDim.x;
  const long long u0 = blockIdx.x * U / GC, u1 = (blockIdx.x + 1) * U / GC;
  const int nst = warp_uniform<WG_NODRAIN>((int)(u1 - u0));  // stages of this CTA
  uint32_t sbase = ((uint32_t)__cvta_generic_to_shared(smem) + 1023u) & ~1023u;  // swizzle atoms: 1024-aligned
  pin(sbase);
  const T* x = reinterpret_cast<const T*>(p.x);
  const uint4* qwg = p.qpk;  // [NT][KS][4 wq][2 h][32 lanes][4 steps] words: see w4a16_cuda.wgmma_pack

  // Per-thread load plan: pointers fixed per column block (recomputed when the loader enters a new
  // block, at most a few times per CTA); a stage adds its offset, at most one 64-bit add per copy. At
  // (2, 1) x 64 the loader is 39 of a warp's ~231 instructions per stage (SASS, session 19; it was 76 of
  // ~268 with one address select per activation chunk: quasar_kernels/NOTES.md, run 18).
  const int lg = p.WN, sh = min(p.WN, WG_LKS);  // log2(k16 steps per group); k16 step i of a stage uses group slot i >> sh
  // scales / zeros: the stage's slots used (WG_KSTEPS >> sh groups per tile) numbered densely, chunk
  // c = (tile v, slot, 16-byte piece ch) of c < CT x slots x 12, so they sit in the first warps, and the
  // warps with none skip the copies with a warp-uniform branch
  const int szn = CT * (WG_KSTEPS >> sh) * 12;  // chunks per stage
  constexpr int SZR = (CT * WG_KSTEPS * 12 + WG_THREADS - 1) / WG_THREADS;
  const uint8_t* sz_src[SZR];  // piece ch of (tile v, group slot) of the loader's block at group 0
  int sz_mul[SZR], sz_slot[SZR], sz_v[SZR], sz_ch[SZR];
  uint32_t sz_dst[SZR];
#pragma unroll
  for (int r = 0; r < SZR; ++r) {
    const int c = min(tid + r * WG_THREADS, szn - 1), ch = c % 12;  // past szn: never issued
    sz_ch[r] = ch;
    sz_v[r] = c / ((WG_KSTEPS >> sh) * 12);
    sz_slot[r] = (c / 12) % (WG_KSTEPS >> sh);
    sz_mul[r] = ch < 8 ? 128 : 64;
    sz_dst[r] = L::W + (sz_v[r] * WG_KSTEPS + sz_slot[r]) * WG_SZ_BYTES + ch * 16;
  }
  const bool sz_warp = warp_uniform<true>(warp) * 32 < szn;  // this warp holds scale / zero copies
  // activations: thread tid copies the 16-byte chunks q = tid & 7 and q + 8 (channels 8 q .. 8 q + 7 of
  // both 64-channel atom columns of the stage) of token rows (tid >> 3) + XROWS r, r < XR. Both chunks of
  // a row sit at the same swizzled place of their atom column, so the second is the first plus an
  // immediate on both sides (TB x 128 bytes in shared memory, 64 channels in global); the passes lie
  // XROWS rows apart, a multiple of 8, so at the same swizzle phase (another immediate).
  constexpr int XROWS = WG_THREADS / 8;
  constexpr int XR = (TB + XROWS - 1) / XROWS;
  constexpr bool XFULL = TB % XROWS == 0;  // else some threads' last pass lies past the block's TB rows
  static_assert(XROWS % 8 == 0 && L::BYTES % 16 == 0, "swizzle phase per pass, whole chunks");
  const int xq = tid & 7, xtok = tid >> 3;
  uint32_t xdst = L::W + L::SZ + sw128_offset(xtok, xq);
  pin(xdst);
  const T* xsrc[XR];  // channel 8 q of the pass's token row (row M - 1 past M: an address only, never read)
  int xklim[XR];      // chunk q holds data while k0 < xklim, chunk q + 8 while k0 + 64 < xklim (rows past M: never)
  uint32_t xin = 0;   // bit r: pass r's row lies inside the block's TB rows
#pragma unroll
  for (int r = 0; r < XR; ++r) {
    const int tok = tok0 + xtok + XROWS * r;
    xsrc[r] = x + (size_t)min(tok, p.M - 1) * p.x_stride + xq * 8;
    xklim[r] = tok < p.M ? p.K - xq * 8 : 0;
    xin |= (uint32_t)(xtok + XROWS * r < TB) << r;
    pin(xsrc[r]);
    pin(xklim[r]);
  }
  if constexpr (!XFULL) pin(xin);
  // weights: a stage's CT tiles are CT x 256 chunks of 16 bytes, contiguous in shared memory; thread tid
  // copies chunks tid + WG_THREADS r (tile c >> 8, chunk c & 255 of it)
  constexpr int WR = CT * 256 / WG_THREADS;
  static_assert(CT * 256 % WG_THREADS == 0, "whole weight chunks per thread");
  const uint4* wsrc[WR];  // this thread's weight chunk r at stage 0 of the loader's block
  int ld_blk = warp_uniform<WG_NODRAIN>((int)(u0 / KS)), ld_st = warp_uniform<WG_NODRAIN>((int)(u0 % KS));
  auto enter_block = [&](int blk) {
#pragma unroll
    for (int r = 0; r < WR; ++r) {  // clamped tiles: loaded, never stored
      const int c = tid + r * WG_THREADS;
      wsrc[r] = qwg + (size_t)min(blk * CT + (c >> 8), p.NT - 1) * KS * 256 + (c & 255);
      pin(wsrc[r]);
    }
#pragma unroll
    for (int r = 0; r < SZR; ++r) {
      const uint8_t* base = sz_ch[r] < 8 ? reinterpret_cast<const uint8_t*>(p.scl) + sz_ch[r] * 16
                                         : reinterpret_cast<const uint8_t*>(p.zp) + (sz_ch[r] - 8) * 16;
      sz_src[r] = base + (size_t)min(blk * CT + sz_v[r], p.NT - 1) * p.NG * sz_mul[r];
      pin(sz_src[r]);
    }
  };
  enter_block(ld_blk);

  // copy the loader's stage into buffer j % WG_STAGES: its weights and scales / zeros, its activations
  auto stage_buf = [&](int j) { return sbase + (uint32_t)(j & (WG_STAGES - 1)) * L::BYTES; };
  auto load_w = [&](uint32_t buf) {
    (void)buf;
#ifndef QB_ABLATE_NOWLOAD  // diagnostic (timing only): the weights and scales / zeros are not refreshed
#pragma unroll
    for (int r = 0; r < WR; ++r) cp_async16(buf + (r * WG_THREADS + tid) * 16, wsrc[r] + ld_st * 256);
    if (sz_warp) {  // warp-uniform: no divergent branch between the wgmmas (see warp_uniform)
      const int g0 = (ld_st << WG_LKS) >> lg;  // the stage's first group
#pragma unroll
      for (int r = 0; r < SZR; ++r) {  // group slots past the last group (K's tail): its last group, unused
        const int gi = min(g0 + sz_slot[r], p.NG - 1);
        cp_async16_if(buf + sz_dst[r], sz_src[r] + (size_t)gi * sz_mul[r], tid + r * WG_THREADS < szn);
      }
    }
#endif
  };
  auto load_x = [&](uint32_t buf) {
    (void)buf;
#ifndef QB_ABLATE_NOXLOAD  // diagnostic (timing only): the activations are not refreshed
    const int k0 = ld_st * (WG_KSTEPS * 16);
#pragma unroll
    for (int r = 0; r < XR; ++r) {  // predicated, no branch: zeros past K and M; a pass past the block's rows copies nothing
      const T* s = xsrc[r] + k0;
      const bool on = XFULL || ((xin >> r) & 1);
      const uint32_t d = buf + xdst + r * (XROWS * 128);
      cp_async16_zero_unless(d, s, k0 < xklim[r], on);
      cp_async16_zero_unless(d + TB * 128, s + 64, k0 + 64 < xklim[r], on);
    }
#endif
  };
  auto advance_loader = [&]() {
    if (++ld_st == KS) {
      ld_st = 0;
      enter_block(++ld_blk);
    }
  };
  // copy the loader's next stage into buffer j % WG_STAGES, then advance the loader
  auto load_next = [&](int j) {
    const uint32_t buf = stage_buf(j);
    load_w(buf);
    load_x(buf);
    advance_loader();
  };

  float acc[NTW][TB / 2];
#pragma unroll
  for (int j = 0; j < NTW; ++j)
#pragma unroll
    for (int i = 0; i < TB / 2; ++i) acc[j][i] = 0.f;
  uint32_t a[WG_ASETS][NTW][4];  // A register sets: step i dequantizes into set i % WG_ASETS (see mma_stage)

#if QB_WG_TMA
  // one mbarrier per buffer: the issuing thread's expect_tx arrival plus the copies' bytes complete a phase
  __shared__ __align__(8) uint64_t full[WG_STAGES], empty[WG_STAGES];
  auto full_bar = [&](int j) { return (uint32_t)__cvta_generic_to_shared(&full[j & (WG_STAGES - 1)]); };
  auto empty_bar = [&](int j) { return (uint32_t)__cvta_generic_to_shared(&empty[j & (WG_STAGES - 1)]); };
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < WG_STAGES; ++s) {
      mbar_init(full_bar(s), 1);
      if constexpr (WG_WS) mbar_init(empty_bar(s), NWG * 128);  // every consumer thread releases each use
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();
  // one warp per stage computes the copies' addresses (its lane 0 issues them), a different warp each
  // stage so that no warpgroup falls behind the others at the next barrier; a warp-uniform branch, so
  // ptxas keeps every warpgroup's wgmmas asynchronous across it
  const int uwarp = warp_uniform<true>(warp);
  const uint8_t* scl8 = reinterpret_cast<const uint8_t*>(p.scl);
  const uint8_t* zp8 = reinterpret_cast<const uint8_t*>(p.zp);
  // the loader's next stage into buffer j % WG_STAGES by thread 0; every thread keeps the loader's place
  auto tma_next = [&](int j, auto one_group) {
    const uint32_t buf = sbase + (uint32_t)(j & (WG_STAGES - 1)) * L::BYTES, fb = full_bar(j);
    const bool on = lane == 0;
    constexpr int MAXSLOTS = decltype(one_group)::value ? 1 : WG_KSTEPS;  // groups a stage touches, at most
    const int slots = WG_KSTEPS >> sh;
    mbar_expect_tx_if(fb, CT * 4096 + CT * slots * WG_SZ_BYTES + 2 * TB * 128, on);
#pragma unroll
    for (int v = 0; v < CT; ++v) {
      const int nt = min(ld_blk * CT + v, p.NT - 1);  // clamped tiles: loaded, never stored
      bulk_g2s_if(buf + v * 4096, qwg + ((size_t)nt * KS + ld_st) * 256, 4096, fb, on);
#pragma unroll
      for (int slot = 0; slot < MAXSLOTS; ++slot) {
        const int gi = min(((ld_st << WG_LKS) >> lg) + slot, p.NG - 1);
        const uint32_t sz = buf + L::W + (v * WG_KSTEPS + slot) * WG_SZ_BYTES;
        bulk_g2s_if(sz, scl8 + ((size_t)nt * p.NG + gi) * 128, 128, fb, on && slot < slots);
        bulk_g2s_if(sz + 128, zp8 + ((size_t)nt * p.NG + gi) * 64, 64, fb, on && slot < slots);
      }
    }
    // channels 128 ld_st .. + 63 and + 64 .. + 127 of tokens tok0 .. tok0 + TB - 1: one swizzled atom
    // column each; past M and K the copy engine writes zeros
    tma_2d_if(buf + L::W + L::SZ, &xmap, ld_st * (WG_KSTEPS * 16), tok0, fb, on);
    tma_2d_if(buf + L::W + L::SZ + TB * 128, &xmap, ld_st * (WG_KSTEPS * 16) + 64, tok0, fb, on);
  };
  auto tma_advance = [&]() {  // every thread keeps the loader's place: the issuing warp rotates
    if (++ld_st == KS) {
      ld_st = 0;
      ++ld_blk;
    }
  };
#else
  if constexpr (WG_PDL) {  // the weights of the first stages while the previous kernel finishes (they join group 0)
    const int blk0 = ld_blk, st0 = ld_st;
#pragma unroll
    for (int st = 0; st < WG_AHEAD; ++st)
      if (st < nst) {
        load_w(stage_buf(st));
        advance_loader();
      }
    ld_blk = blk0;
    ld_st = st0;
    enter_block(ld_blk);
    griddep_wait();  // the previous kernel is complete and its writes are visible
#pragma unroll
    for (int st = 0; st < WG_AHEAD; ++st) {
      if (st < nst) {
        load_x(stage_buf(st));
        advance_loader();
      }
      cp_async_commit();
    }
  } else {
#pragma unroll
    for (int st = 0; st < WG_AHEAD; ++st) {
      if (st < nst) load_next(st);
      cp_async_commit();
    }
  }
#endif
  // The A fragments of buffer j's k16 steps for each of this warpgroup's tiles. Warp wq's words of a
  // tile and stage are two contiguous 512-byte runs (steps 0-3, 4-7; each lane's 16 bytes are its 4
  // steps), so each run is one conflict-free 16-byte load per lane: the mma.sync layout's word wq of a
  // lane's 16 bytes cost a 4-way bank conflict per 4-byte load (ncu, run 6f: 3.6-way on average).
  uint32_t aoff = wq * 1024 + lane * 16, soff = g * 8 + 2 * wq;  // this lane's weight words / scale pair
  pin(aoff);
  pin(soff);
  // Stage j: each k16 step's A fragments are dequantized into one of two register sets and its wgmmas
  // issued at once; the warpgroup waits only for the previous step's wgmmas (wait_group 1) before
  // reusing that set, so it dequantizes step i + 1 while the tensor cores run step i (run 7c; before,
  // all 8 steps were dequantized, then multiplied and waited for: ALU and tensor work alternated).
  // one_group: the stage lies in one group (G >= 128), so the per-step group checks compile away.
  // every wgmma of this warpgroup done: the accumulators (and both A sets) are the thread's again
  auto drain = [&]() {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int jj = 0; jj < NTW; ++jj) {
#pragma unroll
      for (int e = 0; e < TB / 2; ++e) hold(acc[jj][e]);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < WG_ASETS; ++q) hold(a[q][jj][r]);
    }
  };
  const uint64_t xdesc0 = smem_desc_sw128(sbase + L::W + L::SZ);  // buffer 0, step 0: a buffer / k16
  // step adds its byte offset / 16 to the address field (bits 0-13; offsets stay under 256 KB)
  auto mma_stage = [&](int j, auto one_group, bool release_prev, auto after_step) {
    const uint32_t buf = sbase + (uint32_t)(j & (WG_STAGES - 1)) * L::BYTES;
    const uint64_t desc = xdesc0 + (uint64_t)((uint32_t)(j & (WG_STAGES - 1)) * (L::BYTES >> 4));
    uint32_t q[NTW][WG_KSTEPS];
#pragma unroll
    for (int jj = 0; jj < NTW; ++jj) {  // warp wq's words: two contiguous 512-byte runs, conflict-free
      const uint32_t wa = buf + (wg * NTW + jj) * 4096 + aoff;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(q[jj][0]), "=r"(q[jj][1]), "=r"(q[jj][2]), "=r"(q[jj][3]) : "r"(wa) : "memory");
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(q[jj][4]), "=r"(q[jj][5]), "=r"(q[jj][6]), "=r"(q[jj][7]) : "r"(wa + 512) : "memory");
    }
    uint32_t s_lo[NTW], s_hi[NTW], z_lo[NTW], z_hi[NTW];
#pragma unroll
    for (int i = 0; i < WG_KSTEPS; ++i) {
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj) {
        if (i == 0 || (!decltype(one_group)::value && (i & ((1 << sh) - 1)) == 0)) {  // a new group
          const uint32_t sz = buf + L::W + ((wg * NTW + jj) * WG_KSTEPS + (i >> sh)) * WG_SZ_BYTES;
          uint32_t sw;
          unsigned short zh;
          asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sw) : "r"(sz + soff * 2) : "memory");
          asm volatile("ld.shared.u16 %0, [%1];" : "=h"(zh) : "r"(sz + 128 + soff) : "memory");
          const uint32_t zw = zh;
          s_lo[jj] = __byte_perm(sw, 0, 0x1010);  // rows 16 wq + g (low) and 16 wq + 8 + g (high)
          s_hi[jj] = __byte_perm(sw, 0, 0x3232);
          z_lo[jj] = NEG | (zw & 0xffu) | ((zw & 0xffu) << 16);
          z_hi[jj] = NEG | (zw >> 8) | ((zw >> 8) << 16);
        }
        uint32_t* f = a[i % WG_ASETS][jj];
#ifdef QB_ABLATE_NODEQ  // diagnostic (timing only): the packed words themselves as A, no dequantization
        f[0] = q[jj][i];
        f[1] = s_lo[jj];
        f[2] = z_lo[jj];
        f[3] = s_hi[jj] ^ z_hi[jj];
#else
        f[0] = sub_mul<BF16>(nib2<EX>(q[jj][i]), z_lo[jj], s_lo[jj]);
        f[1] = sub_mul<BF16>(nib2<EX>(q[jj][i] >> 8), z_hi[jj], s_hi[jj]);
        f[2] = sub_mul<BF16>(nib2<EX>(q[jj][i] >> 4), z_lo[jj], s_lo[jj]);
        f[3] = sub_mul<BF16>(nib2<EX>(q[jj][i] >> 12), z_hi[jj], s_hi[jj]);
#endif
      }
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
        for (int e = 0; e < TB / 2; ++e) hold(acc[jj][e]);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      // no branch between the wgmmas (one makes ptxas serialize them, warning C7519): k16 steps past K
      // multiply finite weights by zero-filled activations
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj)  // k16 step i: atom column i / 4, 32 bytes per step inside the row
        wgmma_tb<BF16, TB>(acc[jj], a[i % WG_ASETS][jj], desc + (uint64_t)(((i >> 2) * TB * 128 + (i & 3) * 32) >> 4));
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      if (i > 0 || WG_NODRAIN) {  // step i + 1 - ASETS (at i = 0: of the previous stage) is done: its set may be rewritten
        if constexpr (WG_ASETS == 2) asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        else asm volatile("wgmma.wait_group.sync.aligned 3;" ::: "memory");
#pragma unroll
        for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
          for (int r = 0; r < 4; ++r) hold(a[(i + 1) % WG_ASETS][jj][r]);
#if QB_WG_WS
        // at step 0 every wgmma of stage j - 1 is done: its buffer goes back to the producer (predicated:
        // no branch between wgmmas), except a block's last stage, released after its epilogue
        if (i == 0) mbar_arrive_if(empty_bar(j - 1), release_prev);
#endif
      }
      after_step(i);  // i is a constant once unrolled: no branch remains
    }
    if constexpr (!WG_NODRAIN) drain();
  };

  // acc[j][4 u + e]: weight row (output column) 64 nt + 16 wq + g + 8 (e >> 1), token tok0 + 8 u + 2 t4 + (e & 1)
  T* out = reinterpret_cast<T*>(p.out);
  const T* bias = reinterpret_cast<const T*>(p.bias);
  const int wtid = tid & 127;  // thread within its warpgroup
  __shared__ int s_last;
  // the CTA owning unit u: the last c with floor(c U / GC) <= u
  auto owner = [&](long long u) { return (int)(((u + 1) * GC - 1) / U); };
  // out rows may take 16-byte stores when every row starts 16-byte aligned
  const bool out_vec = (p.N & 7) == 0 && (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;
  // Block epilogue. A block shared by several CTAs first goes through the workspace: each CTA stores its
  // fragments as they sit in registers (float4 per 4 accumulators, a warp's stores contiguous), the last
  // to arrive sums every CTA's slot in rank order (deterministic) back into its registers. The block's
  // output is then staged through the shared-memory buffer of the stage just computed (stmatrix .trans
  // turns the fragments' weight-row-major 8x8 tiles into token rows of 8 outputs) and written with
  // 16-byte stores, a warp's 32 stores covering 4 contiguous 128-byte runs. It replaced scalar stores with
  // per-element index math, fully unrolled: ~550 / ~1 400 instructions per warp once per block at tb 64 /
  // 128, stalled on instruction fetch, 21-30 % of the kernel's time (ncu, run 11).
  // the consumer warpgroups' barrier: the whole CTA unless a producer warp runs beside them
  auto consumers_sync = [&]() {
    if constexpr (WG_WS) named_bar_sync(5, NWG * 128);
    else __syncthreads();
  };
  auto finish_block = [&](int blk, bool whole, uint32_t ebuf) {
    if (!whole) {
      const int first = owner((long long)blk * KS), parts = owner((long long)blk * KS + KS - 1) - first + 1;
      const size_t slot = (size_t)CT * 64 * TB, blk_slot = ((size_t)blockIdx.y * NB + blk) * slot;
      const size_t rank_stride = (size_t)gridDim.y * NB * slot;
      float* mine = p.ws + (size_t)((int)blockIdx.x - first) * rank_stride + blk_slot;
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
        for (int u = 0; u < TB / 8; ++u)
          __stcg(reinterpret_cast<float4*>(mine + (((wg * NTW + jj) * (TB / 8) + u) * 128 + wtid) * 4),
                 make_float4(acc[jj][4 * u], acc[jj][4 * u + 1], acc[jj][4 * u + 2], acc[jj][4 * u + 3]));
      __threadfence();
      consumers_sync();
      const int cidx = blockIdx.y * NB + blk;
      if (tid == 0) s_last = (atomicAdd(p.cnt + cidx, 1) == parts - 1);
      consumers_sync();
      if (!s_last) return;
      __threadfence();
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
        for (int i = 0; i < TB / 2; ++i) acc[jj][i] = 0.f;
      for (int q = 0; q < parts; ++q) {
        const float* part = p.ws + (size_t)q * rank_stride + blk_slot;
#pragma unroll
        for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
          for (int u = 0; u < TB / 8; ++u) {
            const float4 w = __ldcg(reinterpret_cast<const float4*>(part + (((wg * NTW + jj) * (TB / 8) + u) * 128 + wtid) * 4));
            acc[jj][4 * u] += w.x;
            acc[jj][4 * u + 1] += w.y;
            acc[jj][4 * u + 2] += w.z;
            acc[jj][4 * u + 3] += w.w;
          }
      }
      if (tid == 0) p.cnt[cidx] = 0;  // ready for the next call
    }
    // every warpgroup's wgmmas have read the last stage's buffer (each drained before this): it is free
    // until the loader's next write to it, two stage barriers away
    fence_async_smem();
    consumers_sync();
    const uint32_t wbuf = ebuf + (uint32_t)wg * (TB * 128);  // this warpgroup's [TB tokens][64 rows] bf16 tile, swizzled
#pragma unroll
    for (int jj = 0; jj < NTW; ++jj) {
      const int nt = blk * CT + wg * NTW + jj;
      float b0 = 0.f, b1 = 0.f;  // bias of this thread's two rows
      if (bias) {
        const int n = nt * 64 + 16 * wq + g;
        b0 = n < p.N ? to_f<T>(bias[n]) : 0.f;
        b1 = n + 8 < p.N ? to_f<T>(bias[n + 8]) : 0.f;
      }
      if (jj > 0) named_bar_sync(1 + wg, 128);  // the previous tile's rows are read out
#pragma unroll
      for (int u = 0; u < TB / 8; u += 2) {  // matrices (u, rows g), (u, rows g + 8), (u + 1, ...), (u + 1, ...)
        uint32_t r[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int uu = u + (i >> 1), e = 2 * (i & 1);
          const float bb = (i & 1) ? b1 : b0, lo = acc[jj][4 * uu + e], hi = acc[jj][4 * uu + e + 1];
          r[i] = bias ? pack2<T>(lo + bb, hi + bb) : pack2<T>(lo, hi);
        }
        // lane 8 i + k gives the address of token row k of matrix i: token 8 (u + (i >> 1)) + k, 16-byte chunk 2 wq + (i & 1)
        const int i = lane >> 3, t = 8 * (u + (i >> 1)) + (lane & 7), c = 2 * wq + (i & 1);
        stmatrix_x4_trans(wbuf + t * 128 + ((c ^ (t & 7)) << 4), r);
      }
      named_bar_sync(1 + wg, 128);  // the tile is staged
#pragma unroll
      for (int rr = 0; rr < TB / 16; ++rr) {  // 16-byte chunk c: token c >> 3, rows 8 (c & 7) .. + 7
        const int c = rr * 128 + wtid, t = c >> 3, q = c & 7, tok = tok0 + t, n0 = nt * 64 + 8 * q;
        if (tok >= p.M || n0 >= p.N) continue;
        uint4 v;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "r"(wbuf + t * 128 + ((q ^ (t & 7)) << 4)) : "memory");
        T* dst = out + (size_t)tok * p.N + n0;
        if (out_vec && n0 + 8 <= p.N) {
          *reinterpret_cast<uint4*>(dst) = v;
        } else {  // a row not 16-byte aligned, or the last rows of N
          const T* e = reinterpret_cast<const T*>(&v);
          for (int k = 0; k < 8 && n0 + k < p.N; ++k) dst[k] = e[k];
        }
      }
    }
    if constexpr (WG_TMA) fence_async_smem();  // this buffer's next writer is the copy engine (async proxy)
  };

  int cu_blk = warp_uniform<WG_NODRAIN>((int)(u0 / KS)), cu_st = warp_uniform<WG_NODRAIN>((int)(u0 % KS));
  if constexpr (WG_NODRAIN) {
    // wgmmas stay in flight from stage to stage, so no branch ptxas could call divergent may sit
    // between them (C7518 serializes every wgmma otherwise): the group-size choice is hoisted out of
    // the loop, and the block's output is written after an inner loop over its stages, not under an
    // `if` inside the stage loop.
    // a block's (or the CTA's part of it) stages first_st .. first_st + seg - 1 are done, the last one in
    // buffer j - 1: its output, then fresh accumulators for the next block
    auto close_block = [&](int first_st, int seg, int j) {
      if (WG_PDL && j == nst) griddep_launch_dependents();  // the CTA's last stage is issued: the next kernel may launch
      drain();
      finish_block(cu_blk, first_st == 0 && first_st + seg == KS, sbase + (uint32_t)((j - 1) & (WG_STAGES - 1)) * L::BYTES);
#if QB_WG_WS
      mbar_arrive_if(empty_bar(j - 1), true);  // the block's last buffer, after the epilogue used it
#endif
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
        for (int i = 0; i < TB / 2; ++i) acc[jj][i] = 0.f;
      cu_st = 0;
      ++cu_blk;
    };
    auto run = [&](auto one_group) {
#if QB_WG_WS
      if (warp == NWG * 4) {  // the producer warp: every stage of the CTA's range, as buffers free up
        for (int jj = 0; jj < nst; ++jj) {
          if (jj >= WG_STAGES) mbar_wait(empty_bar(jj), (uint32_t)(jj / WG_STAGES - 1) & 1);
          tma_next(jj, one_group);
          tma_advance();
        }
        return;
      }
      for (int j = 0; j < nst;) {  // consumers: one column block (or the part of it in this CTA's range) per pass
        const int first_st = cu_st, seg = min(KS - cu_st, nst - j);
        for (int s = 0; s < seg; ++s, ++j) {
          mbar_wait(full_bar(j), (uint32_t)(j / WG_STAGES) & 1);  // stage j is in
          mma_stage(j, one_group, s > 0, [](auto) {});
        }
        close_block(first_st, seg, j);
      }
#else
#if QB_WG_TMA
#pragma unroll
      for (int st = 0; st < WG_AHEAD; ++st)
        if (st < nst) {
          if (uwarp == st) tma_next(st, one_group);
          tma_advance();
        }
#endif
      for (int j = 0; j < nst;) {  // one column block (or the part of it in this CTA's range) per pass
        const int first_st = cu_st, seg = min(KS - cu_st, nst - j);
        for (int s = 0; s < seg; ++s, ++j) {
#if QB_WG_TMA
          __syncthreads();  // every warpgroup is done with stage j - 2, whose buffer the loader refills now
          if (j + WG_AHEAD < nst) {
            if (uwarp == (j + WG_AHEAD) % (NWG * 4)) tma_next(j + WG_AHEAD, one_group);
            tma_advance();
          }
          mbar_wait(full_bar(j), (uint32_t)(j / WG_STAGES) & 1);  // stage j is in
#ifndef QB_ABLATE_NOMMA
          mma_stage(j, one_group, false, [](auto) {});
#endif
          continue;
#endif
          cp_async_wait<WG_AHEAD - 1>();
#ifndef QB_ABLATE_NOBAR  // diagnostic (with NOLOAD only: no copies, so nothing to publish): warpgroups not in lockstep
#ifndef QB_ABLATE_NOFENCE  // diagnostic (NOLOAD only): the barrier without the proxy fence (MEMBAR + FENCE.VIEW.ASYNC)
          fence_async_smem();
#endif
          __syncthreads();  // stage j is in for every thread; every warpgroup is done with stage j - 2
#endif
          auto load = [&]() {
#ifndef QB_ABLATE_NOLOAD
            if (j + WG_AHEAD < nst) load_next(j + WG_AHEAD);
#endif
            cp_async_commit();
          };
#ifndef QB_ABLATE_NOMMA
          if constexpr (WG_LOAD_AFTER == 0) load();
          mma_stage(j, one_group, false, [&](int step) {
            if (WG_LOAD_AFTER > 0 && step == WG_LOAD_AFTER - 1) load();
          });
#else
          load();
#endif
        }
        close_block(first_st, seg, j);
      }
#endif  // QB_WG_WS
    };
    if (sh == WG_LKS) run(std::true_type{});
    else run(std::false_type{});
  } else {
  int first_st = cu_st;
  for (int j = 0; j < nst; ++j) {
    cp_async_wait<WG_AHEAD - 1>();
    fence_async_smem();
    __syncthreads();  // stage j is in for every thread; every warpgroup is done with stage j - 1
#ifndef QB_ABLATE_NOLOAD  // diagnostic builds only (wgmma_ablate.py): compute on stale buffers / move data without computing
    if (j + WG_AHEAD < nst) load_next(j + WG_AHEAD);
#endif
    cp_async_commit();
#ifndef QB_ABLATE_NOMMA
    if (sh == WG_LKS) mma_stage(j, std::true_type{}, false, [](auto) {});
    else mma_stage(j, std::false_type{}, false, [](auto) {});
#endif
    if (cu_st == KS - 1 || j == nst - 1) {  // the block ends here or the CTA's range does
      finish_block(cu_blk, first_st == 0 && cu_st == KS - 1, sbase + (uint32_t)(j & (WG_STAGES - 1)) * L::BYTES);
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
        for (int i = 0; i < TB / 2; ++i) acc[jj][i] = 0.f;
      first_st = 0;
    }
    if (++cu_st == KS) {
      cu_st = 0;
      ++cu_blk;
    }
  }
  }
#if QB_CTA_TIMES
  __syncthreads();  // every thread of the CTA is past its last store (a CTA whose part was not last too)
  if (tid == 0 && blockIdx.y == 0 && blockIdx.x < QB_TIMES_CTAS) qb_cta_times[3 * blockIdx.x + 1] = global_ns();
#endif
#else
  __trap();  // built for a target without wgmma: never launched (w4a16_wgmma_launch checks sm_90a)
#endif
}

template <bool BF16, int TB, int NTW, int NWG, int MINB>
cudaError_t launch_wg(const CUtensorMap& xmap, const W4A16Params& p, int ctas, cudaStream_t stream) {
  auto kern = w4a16_wgmma_kernel<BF16, TB, NTW, NWG, MINB>;
  const int smem = WG_STAGES * WgStage<TB, NWG * NTW>::BYTES + 1024;  // + room to align the base
  static bool configured = false;
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  dim3 grid(ctas, (p.M + TB - 1) / TB);
  if constexpr (WG_PDL) {  // may start before the previous kernel in the stream has finished (see QB_WG_PDL)
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(NWG * 128 + WG_PRODUCER_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kern, xmap, p);
  }
  kern<<<grid, NWG * 128 + WG_PRODUCER_THREADS, smem, stream>>>(xmap, p);
  return cudaGetLastError();
}

// Layout probe (tests only): D[64][32] = A[64][16] @ B[16][32] with one warpgroup and one wgmma,
// A loaded into registers, B staged into shared memory and D written back exactly as the kernel
// above does, so a GPU test can tell a wrong layout assumption from a wrong pipeline.
__global__ void wgmma_probe_kernel(const __nv_bfloat16* A, const __nv_bfloat16* B, float* D) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) __nv_bfloat16 sb[32 * 64];  // 32 token rows of 128 B (16 channels used)
  const int tid = threadIdx.x, lane = tid & 31, wq = tid >> 5, g = lane >> 2, t4 = lane & 3;
  // B[k][n] -> token row n, chunk k / 8 swizzled as the kernel stages it
  for (int e = tid; e < 32 * 64; e += 128) sb[e] = __float2bfloat16(0.f);
  __syncthreads();
  for (int e = tid; e < 16 * 32; e += 128) {
    const int k = e / 32, n = e % 32;
    sb[sw128_offset(n, k >> 3) / 2 + (k & 7)] = B[k * 32 + n];
  }
  fence_async_smem();
  __syncthreads();
  auto pack = [&](int r, int c) {  // A[r][c], A[r][c + 1] as one bf16x2 register
    const uint32_t lo = __bfloat16_as_ushort(A[r * 16 + c]), hi = __bfloat16_as_ushort(A[r * 16 + c + 1]);
    return lo | (hi << 16);
  };
  const int r0 = 16 * wq + g;
  const uint32_t a[4] = {pack(r0, 2 * t4), pack(r0 + 8, 2 * t4), pack(r0, 2 * t4 + 8), pack(r0 + 8, 2 * t4 + 8)};
  float d[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) d[i] = 0.f;
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
  wgmma_m64n32k16_bf16(d, a, smem_desc_sw128((uint32_t)__cvta_generic_to_shared(sb)), 1);
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) D[(r0 + 8 * (e >> 1)) * 32 + 8 * j + 2 * t4 + (e & 1)] = d[4 * j + e];
#else
  __trap();
#endif
}

template <int NTW, int NWG>
cudaError_t launch_tb(const CUtensorMap& xmap, const W4A16Params& p, bool bf16, int tb, int ctas, cudaStream_t stream) {
  // 2 CTAs per SM where registers (<= 128 per thread) and shared memory allow it (2 warpgroups only)
  constexpr int MINB_SMALL = NTW == 1 && NWG == 2 ? 2 : 1;
  if (tb == 32) return bf16 ? launch_wg<true, 32, NTW, NWG, MINB_SMALL>(xmap, p, ctas, stream) : launch_wg<false, 32, NTW, NWG, MINB_SMALL>(xmap, p, ctas, stream);
  if (tb == 64) return bf16 ? launch_wg<true, 64, NTW, NWG, MINB_SMALL>(xmap, p, ctas, stream) : launch_wg<false, 64, NTW, NWG, MINB_SMALL>(xmap, p, ctas, stream);
  if (tb == 128) return bf16 ? launch_wg<true, 128, NTW, NWG, 1>(xmap, p, ctas, stream) : launch_wg<false, 128, NTW, NWG, 1>(xmap, p, ctas, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t wgmma_probe_launch(const void* A, const void* B, float* D, cudaStream_t stream) {
  wgmma_probe_kernel<<<1, 128, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(A),
                                            reinterpret_cast<const __nv_bfloat16*>(B), D);
  return cudaGetLastError();
}

cudaError_t w4a16_wgmma_launch(const CUtensorMap* xmap, const W4A16Params& p, bool bf16, int tb, int nw, int nwg, int ctas, cudaStream_t stream) {
  if (nwg == 2 && nw == 1) return launch_tb<1, 2>(xmap ? *xmap : CUtensorMap{}, p, bf16, tb, ctas, stream);
  if (nwg == 2 && nw == 2) return launch_tb<2, 2>(xmap ? *xmap : CUtensorMap{}, p, bf16, tb, ctas, stream);
  // 3 warpgroups x 2 tiles: 4 stages of tb 128 do not fit in shared memory, so not built
  if (nwg == 3 && nw == 1) return launch_tb<1, 3>(xmap ? *xmap : CUtensorMap{}, p, bf16, tb, ctas, stream);
  return cudaErrorInvalidValue;
}

bool w4a16_wgmma_uses_tma() { return WG_TMA; }

// Diagnostic builds (QB_CTA_TIMES): copy the last launch's per-CTA [start ns, end ns, SM id] to host.
cudaError_t w4a16_wgmma_cta_times(unsigned long long* host, int ctas) {
#if QB_CTA_TIMES
  if (ctas < 1 || ctas > QB_TIMES_CTAS) return cudaErrorInvalidValue;
  return cudaMemcpyFromSymbol(host, qb_cta_times, sizeof(unsigned long long) * 3 * ctas);
#else
  (void)host;
  (void)ctas;
  return cudaErrorNotSupported;
#endif
}

// The activations' tensor map (2-D: K channels x M tokens, row stride x_stride elements; boxes of 64
// channels x tb tokens, 128-byte swizzle, zeros out of bounds), encoded through the driver entry
// point so the extension does not link libcuda.
cudaError_t w4a16_wgmma_xmap(CUtensorMap* map, const void* x, bool bf16, int M, int K, long long x_stride, int tb) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult q;
    void* fn = nullptr;
#if CUDART_VERSION >= 12050
    cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
#else  // the versioned query arrived in CUDA 12.5 (and the unversioned one is deprecated in 13)
    cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<Encode>(fn);
  }
  const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)M};
  const cuuint64_t strides[1] = {(cuuint64_t)x_stride * 2};
  const cuuint32_t box[2] = {64, (cuuint32_t)tb};
  const cuuint32_t estr[2] = {1, 1};
  CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                      const_cast<void*>(x), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}
