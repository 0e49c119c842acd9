// CUTLASS baseline instance: tile 64 weight rows x 64 tokens x 64 k, ping-pong schedule, persistent data-parallel tile scheduler.
#include "w4a16_cutlass.cuh"
QB_CUTLASS_DEFINE("c64x64_pp", 64, 64, true, false)
