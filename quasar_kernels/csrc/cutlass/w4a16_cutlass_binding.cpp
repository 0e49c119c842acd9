// torch binding of the CUTLASS baseline (quasar_kernels/cutlass_w4a16.py): the registry of instances, the
// offline weight reorder and one GEMM call on the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <string>
#include <vector>

#include "w4a16_cutlass_problem.h"

int qb_cutlass_reorder(const void* src, void* dst, int n, int k);

namespace qb_cutlass {
static std::map<std::string, InstanceFn>& instances() {
  static std::map<std::string, InstanceFn> m;
  return m;
}
bool register_instance(const char* name, InstanceFn fn) {
  instances()[name] = fn;
  return true;
}
}  // namespace qb_cutlass

static qb_cutlass::InstanceFn find(const std::string& name) {
  auto it = qb_cutlass::instances().find(name);
  TORCH_CHECK(it != qb_cutlass::instances().end(), "no CUTLASS instance named ", name);
  return it->second;
}

std::vector<std::string> names() {
  std::vector<std::string> out;
  for (auto& kv : qb_cutlass::instances()) out.push_back(kv.first);
  return out;
}

torch::Tensor reorder(torch::Tensor packed, int64_t n, int64_t k) {
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed: contiguous uint8 on CUDA");
  TORCH_CHECK(packed.numel() * 2 == n * k, "packed holds ", packed.numel() * 2, " values, expected N x K = ", n * k);
  c10::cuda::CUDAGuard guard(packed.device());
  auto out = torch::empty_like(packed);
  TORCH_CHECK(qb_cutlass_reorder(packed.data_ptr(), out.data_ptr(), (int)n, (int)k) == 0, "CUTLASS reorder failed");
  return out;
}

static qb_cutlass::Problem problem(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                   const torch::Tensor& zero, int64_t group, int64_t splits, int64_t sm_count) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && zero.scalar_type() == torch::kBFloat16 && scale.is_contiguous() && zero.is_contiguous(),
              "scale, zero: contiguous bf16 [K / G, N]");
  const int64_t m = x.size(0), k = x.size(1), n = scale.size(1);
  TORCH_CHECK(scale.size(0) * group == k && zero.sizes() == scale.sizes(), "scale / zero shape [K / G, N] does not match K = ", k);
  TORCH_CHECK(w.numel() * 2 == n * k, "weights hold ", w.numel() * 2, " values, expected N x K = ", n * k);
  return qb_cutlass::Problem{(int)m, (int)n, (int)k, (int)group, (int)splits, (int)sm_count,
                             x.data_ptr(), w.data_ptr(), scale.data_ptr(), zero.data_ptr(), nullptr};
}

// (can the library run it, workspace bytes)
std::tuple<bool, int64_t> query(const std::string& name, torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero,
                                int64_t group, int64_t splits, int64_t sm_count) {
  auto p = problem(x, w, scale, zero, group, splits, sm_count);
  size_t need = 0;
  int rc = find(name)(p, nullptr, 0, &need, nullptr);
  return {rc == 0, (int64_t)need};
}

torch::Tensor gemm(const std::string& name, torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero,
                   int64_t group, int64_t splits, int64_t sm_count, torch::Tensor workspace) {
  auto p = problem(x, w, scale, zero, group, splits, sm_count);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), scale.size(1)}, x.options());
  p.out = out.data_ptr();
  int rc = find(name)(p, workspace.numel() ? workspace.data_ptr() : nullptr, (size_t)workspace.numel(), nullptr,
                      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc == 0, "CUTLASS ", name, " failed (status ", rc, ": 1 cannot implement, 2 workspace, 3 initialize, 4 launch)");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("names", &names);
  m.def("reorder", &reorder);
  m.def("query", &query);
  m.def("gemm", &gemm);
}
