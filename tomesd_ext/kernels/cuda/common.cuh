// Shared helpers of the tomesd-ext CUDA kernels (no torch headers: the .cu files compile fast).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace tomesd_ext {

// dtype codes passed from the bindings (bindings.cpp): 0 float32, 1 float16, 2 bfloat16.
enum DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Running best (value, index): a strictly larger value wins; on equal values the lower index wins,
// the same rule as torch.max / argmax (first maximal value).
__device__ __forceinline__ bool better(float v, int i, float best, int best_i) {
  return v > best || (v == best && i < best_i);
}

}  // namespace tomesd_ext
