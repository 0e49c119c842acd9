// CUTLASS baseline instance: tile 128 weight rows x 128 tokens x 64 k, cooperative schedule, stream-K / split-K tile scheduler.
#include "w4a16_cutlass.cuh"
QB_CUTLASS_DEFINE("c128x128_coop_sk", 128, 128, false, true)
