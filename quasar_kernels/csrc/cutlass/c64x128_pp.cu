// CUTLASS baseline instance: tile 64 weight rows x 128 tokens x 64 k, ping-pong schedule, persistent data-parallel tile scheduler.
#include "w4a16_cutlass.cuh"
QB_CUTLASS_DEFINE("c64x128_pp", 64, 128, true, false)
