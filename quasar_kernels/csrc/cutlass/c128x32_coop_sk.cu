// CUTLASS baseline instance: tile 128 weight rows x 32 tokens x 64 k, cooperative schedule, stream-K / split-K tile scheduler.
#include "w4a16_cutlass.cuh"
QB_CUTLASS_DEFINE("c128x32_coop_sk", 128, 32, false, true)
