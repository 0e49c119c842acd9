// What the torch binding and the CUTLASS instances share (no CUTLASS headers here: the binding is plain C++).
#pragma once
#include <cuda_runtime.h>
#include <cstddef>

namespace qb_cutlass {
struct Problem {
  int m, n, k, group, splits, sm_count;
  const void *x, *w, *scale, *zero;
  void* out;  // nullptr: report the workspace size and whether the library can run it
};
using InstanceFn = int (*)(const Problem&, void* workspace, size_t ws_bytes, size_t* ws_needed, cudaStream_t);
// each instance file registers itself under its name at load time (w4a16_cutlass.cuh, QB_CUTLASS_DEFINE)
bool register_instance(const char* name, InstanceFn fn);
}  // namespace qb_cutlass
