// Types shared by every CUTLASS baseline instance and by the offline weight reorder (w4a16_cutlass_reorder.cu).
#pragma once
#include <cuda_runtime.h>
#include <cstddef>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"  // after the builder: it uses types the builder's headers declare

#include "w4a16_cutlass_problem.h"

namespace qb_cutlass {
using MmaType = cutlass::bfloat16_t;
using QuantType = cutlass::int4b_t;
// The library's fast int4 -> bf16 conversion wants each 8 values stored in the order 0 2 4 6 1 3 5 7, and the
// values one thread reads in one wgmma contiguous (one 64-bit shared-memory load): both done once, offline.
using ValueShuffle = cute::Layout<cute::Shape<cute::_2, cute::_4>, cute::Stride<cute::_4, cute::_1>>;
using LayoutAtomQuant = decltype(cutlass::compute_memory_reordering_atom<MmaType, cute::Layout<cute::Shape<cute::_1, cute::_1>>, ValueShuffle>());
using StrideX = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;     // activations [M, K]
using StrideW = cutlass::detail::TagToStrideB_t<cutlass::layout::ColumnMajor>;  // weights [N, K], K contiguous
using LayoutWReordered = decltype(cute::tile_to_shape(LayoutAtomQuant{}, cute::Layout<cute::Shape<int, int, int>, StrideW>{}));

}  // namespace qb_cutlass
