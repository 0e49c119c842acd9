// Torch binding of the W4A16 verify GEMM (kernel: w4a16_marlin.cu; layout: quasar_kernels/w4a16_cuda.py).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "w4a16_marlin.h"

// The fields both kernels read the same way: tensors, strides and the packed geometry.
static W4A16Params common_params(const torch::Tensor& x, const torch::Tensor& qpk, const torch::Tensor& scl,
                                 const torch::Tensor& zp, const torch::Tensor& out,
                                 const c10::optional<torch::Tensor>& bias, const torch::Tensor& ws,
                                 const torch::Tensor& cnt, int64_t N, int64_t K, int64_t G) {
  W4A16Params p{};
  p.qpk = reinterpret_cast<const uint4*>(qpk.data_ptr());
  p.scl = reinterpret_cast<const uint4*>(scl.data_ptr());
  p.zp = reinterpret_cast<const uint2*>(zp.data_ptr());
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N, "bad bias");
    p.bias = bias->data_ptr();
  }
  p.ws = ws.data_ptr<float>();
  p.cnt = cnt.data_ptr<int>();
  p.x_stride = x.stride(0);
  p.M = x.size(0);
  p.N = N;
  p.K = K;
  p.G = G;
  p.NT = qpk.size(0);
  p.KT = qpk.size(1);
  p.NG = scl.size(1);
  p.Gp = p.KT * 16 / p.NG;
  p.SPG = p.Gp / 16;
  return p;
}

// out[M, N] = x[M, K] @ W^T (+ bias) for M <= 16 rows of x (the caller loops over 16-row chunks).
void w4a16_verify_gemm(torch::Tensor x, torch::Tensor qpk, torch::Tensor scl, torch::Tensor zp,
                       torch::Tensor out, c10::optional<torch::Tensor> bias, torch::Tensor ws,
                       torch::Tensor cnt, int64_t N, int64_t K, int64_t G, int64_t WN, int64_t S,
                       int64_t gx, int64_t occ, int64_t pipe, int64_t swap) {
  TORCH_CHECK(x.is_cuda() && qpk.is_cuda() && scl.is_cuda() && zp.is_cuda() && out.is_cuda() &&
                  ws.is_cuda() && cnt.is_cuda(),
              "w4a16_verify_gemm: CUDA tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with unit inner stride");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.size(0) == x.size(0) &&
                  out.size(1) == N,
              "bad out");
  TORCH_CHECK(scl.scalar_type() == x.scalar_type(), "scales must have x's dtype");
  TORCH_CHECK(qpk.scalar_type() == at::kInt && qpk.dim() == 4 && qpk.size(2) == 32 && qpk.size(3) == 4,
              "qpk must be int32 [NT, KT, 32, 4]");
  TORCH_CHECK(zp.scalar_type() == at::kByte, "zeros must be uint8");
  TORCH_CHECK(scl.dim() == 4 && scl.size(0) == qpk.size(0) && zp.sizes() == scl.sizes(), "bad scales/zeros shape");
  TORCH_CHECK(qpk.is_contiguous() && scl.is_contiguous() && zp.is_contiguous(), "packed tensors must be contiguous");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && cnt.scalar_type() == at::kInt, "bad workspace dtypes");
  const int M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 16, "M must be 1..16 per launch");
  TORCH_CHECK(occ == 1 || occ == 2, "occ must be 1 or 2");
  TORCH_CHECK(pipe == 0 || pipe == 1, "pipe must be 0 (register ring) or 1 (cp.async ring)");
  TORCH_CHECK(swap == 0 || (swap == 1 && x.size(0) <= 8), "swap=1 (weights as the MMA's A operand) serves M <= 8");
  TORCH_CHECK(WN == 1 || WN == 2 || WN == 4 || WN == 8, "WN must be 1, 2, 4 or 8");
  const c10::cuda::CUDAGuard guard(x.device());
  W4A16Params p = common_params(x, qpk, scl, zp, out, bias, ws, cnt, N, K, G);
  TORCH_CHECK(p.Gp % 16 == 0 && p.Gp >= G && (int64_t)p.NT * 64 >= N, "inconsistent packed geometry");
  p.WN = WN;
  p.WK = W4A16_NWARPS / WN;
  p.nblocks = (p.NT + WN - 1) / WN;
  p.S = S;
  p.gps = (p.NG + S - 1) / S;
  TORCH_CHECK((p.NG + p.gps - 1) / p.gps == S, "S must equal ceil(NG / ceil(NG / S))");
  TORCH_CHECK(gx >= 1 && gx <= p.nblocks, "bad gx");
  TORCH_CHECK(S == 1 || (ws.numel() >= (int64_t)S * 16 * p.NT * 64 && cnt.numel() >= p.nblocks),
              "workspace too small");
  p.vec = (x.stride(0) % 8 == 0) && (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0);
  const bool r16 = M > 8;
  const int R = r16 ? 16 : 8;
  const int AST = p.gps * p.SPG * 16 + 8;
  const int smem = R * AST * 2 + R * W4A16_NWARPS * 64 * 4 +
                   (pipe ? W4A16_NWARPS * w4a16_ring_depth((int)occ) * 512 : 0) + (swap ? p.gps * p.SPG * 4 * 8 : 0);
  TORCH_CHECK(smem <= 227 * 1024, "w4a16_verify_gemm: shared memory ", smem, " B over the limit (use more splits)");
  TORCH_CHECK(occ == 1 || smem <= 113 * 1024, "occ=2 needs <= 113 KB of shared memory, got ", smem);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(w4a16_verify_launch(p, x.scalar_type() == at::kBFloat16, r16, (int)occ, pipe == 1, swap == 1,
                                     (int)gx, smem, stream));
}

// out[M, N] = x[M, K] @ W^T (+ bias) through warpgroup MMAs (sm_90a), any M, tb tokens per CTA, `ctas`
// CTAs per token block. qwg: the wgmma layout of the packed weights (w4a16_cuda.wgmma_pack).
void w4a16_wgmma_gemm(torch::Tensor x, torch::Tensor qwg, torch::Tensor scl, torch::Tensor zp, torch::Tensor out,
                      c10::optional<torch::Tensor> bias, torch::Tensor ws, torch::Tensor cnt, int64_t N, int64_t K,
                      int64_t G, int64_t KT, int64_t ctas, int64_t tb, int64_t nw, int64_t nwg) {
  TORCH_CHECK(x.is_cuda() && qwg.is_cuda() && out.is_cuda() && ws.is_cuda() && cnt.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x must be 2-D with 16-byte aligned rows");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  TORCH_CHECK(scl.scalar_type() == x.scalar_type() && zp.scalar_type() == at::kByte, "bad scales/zeros dtypes");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.size(0) == x.size(0) &&
                  out.size(1) == N, "bad out");
  TORCH_CHECK(qwg.scalar_type() == at::kInt && qwg.dim() == 6 && qwg.size(2) == 4 && qwg.size(3) == 2 &&
                  qwg.size(4) == 32 && qwg.size(5) == 4 && qwg.is_contiguous() && scl.is_contiguous() &&
                  zp.is_contiguous(), "bad packed tensors (qwg must be int32 [NT, KS, 4, 2, 32, 4])");
  TORCH_CHECK(G % 16 == 0 && K % 8 == 0, "the wgmma kernel needs group_size % 16 == 0 and K % 8 == 0");
  TORCH_CHECK(tb == 32 || tb == 64 || tb == 128, "tb must be 32, 64 or 128");
  TORCH_CHECK((nwg == 2 && (nw == 1 || nw == 2)) || (nwg == 3 && nw == 1), "(wg, nw) must be (2, 1), (2, 2) or (3, 1)");
  const c10::cuda::CUDAGuard guard(x.device());
  W4A16Params p = common_params(x, qwg, scl, zp, out, bias, ws, cnt, N, K, G);
  p.KT = KT;  // common_params read dim 1 of qwg (stages): the geometry is in k16 steps
  p.Gp = p.KT * 16 / p.NG;
  p.SPG = p.Gp / 16;
  p.wg_stages = qwg.size(1);
  TORCH_CHECK(p.Gp == G && (int64_t)p.NT * 64 >= N && (int64_t)p.wg_stages * 8 >= KT, "inconsistent packed geometry");
  TORCH_CHECK((p.SPG & (p.SPG - 1)) == 0, "the wgmma kernel needs group_size / 16 to be a power of two");
  p.WN = 0;  // log2(k16 steps per group)
  while ((1 << p.WN) < p.SPG) ++p.WN;
  const int64_t blocks = (p.NT + nwg * nw - 1) / (nwg * nw), units = blocks * p.wg_stages;
  TORCH_CHECK(ctas >= 1 && ctas <= units, "ctas must be in [1, column blocks x stages]");
  // the most CTAs sharing one block: each covers >= floor(units / ctas) stages
  const int64_t per = units / ctas, parts = ctas == blocks ? 1 : (p.wg_stages + per - 1) / per + 1;
  TORCH_CHECK(p.M >= 1 && (p.M + tb - 1) / tb <= 65535, "bad M");
  TORCH_CHECK(parts == 1 || (ws.numel() >= (int64_t)parts * ((p.M + tb - 1) / tb) * blocks * nwg * nw * 64 * tb &&
                             cnt.numel() >= blocks * ((p.M + tb - 1) / tb)), "workspace too small");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  CUtensorMap xmap;  // the copy-engine build reads x through a tensor map made for this call
  const bool tma = w4a16_wgmma_uses_tma();
  if (tma) C10_CUDA_CHECK(w4a16_wgmma_xmap(&xmap, x.data_ptr(), bf16, p.M, p.K, (long long)x.stride(0), (int)tb));
  C10_CUDA_CHECK(w4a16_wgmma_launch(tma ? &xmap : nullptr, p, bf16, (int)tb, (int)nw, (int)nwg, (int)ctas,
                                    c10::cuda::getCurrentCUDAStream()));
}

// Tests only: one wgmma with the wgmma kernel's layouts (sm_90a).
torch::Tensor wgmma_probe(torch::Tensor A, torch::Tensor B) {
  TORCH_CHECK(A.is_cuda() && B.is_cuda() && A.scalar_type() == at::kBFloat16 && B.scalar_type() == at::kBFloat16 &&
                  A.is_contiguous() && B.is_contiguous() && A.size(0) == 64 && A.size(1) == 16 && B.size(0) == 16 &&
                  B.size(1) == 32, "wgmma_probe: bf16 A [64, 16] and B [16, 32], contiguous, on the GPU");
  const c10::cuda::CUDAGuard guard(A.device());
  auto D = torch::empty({64, 32}, A.options().dtype(at::kFloat));
  C10_CUDA_CHECK(wgmma_probe_launch(A.data_ptr(), B.data_ptr(), D.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return D;
}

// Diagnostics only (a QB_CTA_TIMES build, wgmma_ablate.py --times): [ctas, 3] int64 of the last launch.
torch::Tensor wgmma_cta_times(int64_t ctas) {
  auto t = torch::empty({ctas, 3}, torch::dtype(torch::kInt64));
  const cudaError_t e = w4a16_wgmma_cta_times(reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>()), (int)ctas);
  TORCH_CHECK(e != cudaErrorNotSupported, "this build records no CTA times (build with -DQB_CTA_TIMES=1)");
  C10_CUDA_CHECK(e);
  return t;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wgmma_cta_times", &wgmma_cta_times, "diagnostics: per-CTA start / end ns and SM of the last launch");
  m.def("wgmma_probe", &wgmma_probe, "tests: one wgmma with the wgmma kernel's layouts");
  m.def("w4a16_wgmma_gemm", &w4a16_wgmma_gemm, "W4A16 GEMM through wgmma (sm_90a), batched verification");
  m.def("w4a16_verify_gemm", &w4a16_verify_gemm, "W4A16 verify GEMM (M <= 16), Marlin-style layout");
}
