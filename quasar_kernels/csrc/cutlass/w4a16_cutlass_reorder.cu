// The offline reorder of int4 weights [N, K] (K contiguous, two values per byte, low nibble first) into the
// layout every CUTLASS baseline instance reads (w4a16_cutlass_layout.cuh). Done once per weight, outside timing.
#include "w4a16_cutlass_layout.cuh"

int qb_cutlass_reorder(const void* src, void* dst, int n, int k) {
  using namespace cute;
  auto shape = make_shape(n, k, 1);
  auto plain = make_layout(shape, cutlass::make_cute_packed_stride(qb_cutlass::StrideW{}, shape));
  auto reordered = tile_to_shape(qb_cutlass::LayoutAtomQuant{}, shape);
  cutlass::reorder_tensor(static_cast<const qb_cutlass::QuantType*>(src), plain,
                          static_cast<qb_cutlass::QuantType*>(dst), reordered);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
