// Put on the include path only where the CUDA toolkit has no cuRAND headers (this project's CPU machines):
// CUTLASS's tools/util headers, which the baseline includes for its weight-reorder helper, declare device-side
// random fills with cuRAND types. Nothing in the baseline calls them, so declarations suffice to compile.
#pragma once
struct curandStateXORWOW {
  unsigned int d, v[5];
  int boxmuller_flag, boxmuller_flag_double;
  float boxmuller_extra;
  double boxmuller_extra_double;
};
typedef struct curandStateXORWOW curandState_t;
typedef struct curandStateXORWOW curandState;
__device__ float curand_normal(curandState_t* state);
__device__ double curand_normal_double(curandState_t* state);
__device__ float curand_uniform(curandState_t* state);
__device__ double curand_uniform_double(curandState_t* state);
__device__ void curand_init(unsigned long long seed, unsigned long long subsequence, unsigned long long offset, curandState_t* state);
