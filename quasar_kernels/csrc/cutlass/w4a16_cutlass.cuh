// CUTLASS's own Hopper mixed-input GEMM (int4 weights x bf16 activations, group-wise scale and additive
// zero, the collective that vLLM's Machete builds on), instantiated here as a *baseline* for the kernel
// table: what NVIDIA's library reaches at the verify pass's shapes. Nothing in the decode loop calls it.
//
// The library keeps the narrow operand in registers, so the problem is posed swapped, as CUTLASS's
// example 55 does: D (N x M, column-major = out [M, N] row-major) = W (N x K, int4, reordered offline so a
// thread's values are contiguous) x X^T (K x M, the activations [M, K] row-major). Weight value =
// scale * q + zero with q in [-8, 7] (int4b_t), scale and zero bf16 [K / G, N].
//
// One instance per file (c*.cu beside this), so the build compiles them in parallel and adding one is adding a
// file: QB_CUTLASS_DEFINE(name, weight rows per tile, tokens per tile, ping-pong?, stream-K scheduler?).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "w4a16_cutlass_layout.cuh"

namespace qb_cutlass {

template <int TileN, int TileM, bool Pingpong, bool StreamK>
struct W4A16Gemm {
  using TileShape = cute::Shape<cute::Int<TileN>, cute::Int<TileM>, cute::_64>;  // K tile: 128 bytes of bf16
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = std::conditional_t<Pingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<Pingpong, cutlass::epilogue::TmaWarpSpecialized,
                                              cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using Scheduler = std::conditional_t<StreamK, cutlass::gemm::StreamKScheduler, cutlass::gemm::PersistentScheduler>;
  // no C operand (beta = 0): the epilogue reserves no shared memory for it
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, 8, MmaType, cutlass::layout::ColumnMajor, 8,
      EpilogueSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<QuantType, MmaType, MmaType>, LayoutWReordered, 32,
      MmaType, cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const Problem& p) {
    using namespace cute;
    auto layout_w = tile_to_shape(LayoutAtomQuant{}, make_shape(p.n, p.k, 1));
    auto stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(p.m, p.k, 1));
    auto stride_s = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{}, make_shape(p.n, p.k / p.group, 1));
    auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(p.n, p.m, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(p.n, p.m, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.n, p.m, p.k, 1},
        {static_cast<const QuantType*>(p.w), layout_w, static_cast<const MmaType*>(p.x), stride_x,
         static_cast<const MmaType*>(p.scale), stride_s, p.group, static_cast<const MmaType*>(p.zero)},
        {{1.0f, 0.0f}, nullptr, stride_c, static_cast<MmaType*>(p.out), stride_d}};
    args.hw_info.sm_count = p.sm_count;
    if constexpr (StreamK) {
      using Mode = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
      // splits > 1: split-K into that many parts; 1: stream-K as the library's heuristic decides; 0: data-parallel
      args.scheduler.splits = p.splits > 1 ? p.splits : 1;
      args.scheduler.decomposition_mode = p.splits > 1 ? Mode::SplitK : p.splits == 1 ? Mode::Heuristic : Mode::DataParallel;
    }
    return args;
  }

  // status: 0 ok; 1 the library cannot run this problem; 2 workspace too small (needed bytes in *ws_needed);
  // 3 initialize failed; 4 launch failed. With ws_needed and no output pointer it only reports the size.
  static int run(const Problem& p, void* workspace, size_t ws_bytes, size_t* ws_needed, cudaStream_t stream) {
    auto args = arguments(p);
    size_t need = Gemm::get_workspace_size(args);
    if (ws_needed) *ws_needed = need;
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (p.out == nullptr) return 0;
    if (need > ws_bytes) return 2;
    Gemm gemm;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
    return 0;
  }
};

}  // namespace qb_cutlass

#define QB_CUTLASS_DEFINE(name, tn, tm, pingpong, streamk)                                                     \
  namespace {                                                                                                   \
  int run_instance(const qb_cutlass::Problem& p, void* ws, size_t ws_bytes, size_t* ws_needed, cudaStream_t s) { \
    return qb_cutlass::W4A16Gemm<tn, tm, pingpong, streamk>::run(p, ws, ws_bytes, ws_needed, s);                 \
  }                                                                                                             \
  const bool registered = qb_cutlass::register_instance(name, run_instance);                                   \
  }
