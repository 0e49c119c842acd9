#!/bin/bash
# Run 19, call 6 (session 20): the core of a dequantize-into-shared-memory design
# (quasar_kernels/microbench/dequant_smem.cu; standalone, nothing from global memory in the loop).
o=$OUT/run19; mkdir -p $o
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I quasar_kernels/csrc \
  quasar_kernels/microbench/dequant_smem.cu -o /tmp/dequant_smem && timeout 60 /tmp/dequant_smem | tee $o/dequant_smem.txt
