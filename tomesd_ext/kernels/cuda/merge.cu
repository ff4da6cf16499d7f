// Merge (size-weighted mean per group) and unmerge (gather) without atomics.
//
// merge: x (B, N, C); the plan's tokens sorted by group once (CSR): order (B, N) token indices,
// offsets (B, M + 1) so group m of sample b owns order[b, offsets[b, m] : offsets[b, m + 1]];
// weight (B, N) float32 or null; size (B, M) float32 -> out (B, M, C) in x's dtype.
// Each output row sums its members in ascending token order in float32: deterministic.
// unmerge: y (B, M, C), group (B, N) -> out (B, N, C) = y[b, group[b, n]].

#include "common.cuh"

namespace tomesd_ext {
namespace {

constexpr int MERGE_THREADS = 128;

template <typename T>
__global__ void __launch_bounds__(MERGE_THREADS)
merge_csr_kernel(const T* __restrict__ x, const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                 const float* __restrict__ weight, const float* __restrict__ size, T* __restrict__ out, int N, int M,
                 int C) {
  const int m = blockIdx.x;
  const int b = blockIdx.y;
  const int64_t k0 = offsets[(size_t)b * (M + 1) + m];
  const int64_t k1 = offsets[(size_t)b * (M + 1) + m + 1];
  const float s = size[(size_t)b * M + m];
  const int64_t* ord = order + (size_t)b * N;
  const T* xb = x + (size_t)b * N * C;
  T* o = out + ((size_t)b * M + m) * C;
  for (int c = threadIdx.x; c < C; c += MERGE_THREADS) {
    float acc = 0.0f;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = ord[k];
      const float w = weight ? weight[(size_t)b * N + n] : 1.0f;
      acc += to_float(xb[n * C + c]) * w;
    }
    o[c] = from_float<T>(acc / s);
  }
}

constexpr int GATHER_THREADS = 128;

// Copies rows of `row_bytes` bytes; Vec is uint4 when rows and base pointers are 16-byte aligned.
template <typename Vec>
__global__ void __launch_bounds__(GATHER_THREADS)
unmerge_gather_kernel(const char* __restrict__ y, const int64_t* __restrict__ group, char* __restrict__ out, int N,
                      int M, size_t row_bytes) {
  const int n = blockIdx.x;
  const int b = blockIdx.y;
  const int64_t g = group[(size_t)b * N + n];
  const Vec* from = reinterpret_cast<const Vec*>(y + ((size_t)b * M + g) * row_bytes);
  Vec* to = reinterpret_cast<Vec*>(out + ((size_t)b * N + n) * row_bytes);
  const size_t count = row_bytes / sizeof(Vec);
  for (size_t i = threadIdx.x; i < count; i += GATHER_THREADS) to[i] = from[i];
}

template <typename T>
void merge_typed(const void* x, const int64_t* order, const int64_t* offsets, const float* weight, const float* size,
                 void* out, int B, int N, int M, int C, cudaStream_t stream) {
  dim3 grid(M, B);
  merge_csr_kernel<T><<<grid, MERGE_THREADS, 0, stream>>>(static_cast<const T*>(x), order, offsets, weight, size,
                                                          static_cast<T*>(out), N, M, C);
}

}  // namespace

cudaError_t launch_merge_csr(int dtype, const void* x, const int64_t* order, const int64_t* offsets,
                             const float* weight, const float* size, void* out, int B, int N, int M, int C,
                             cudaStream_t stream) {
  if (M == 0 || B == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat:
      merge_typed<float>(x, order, offsets, weight, size, out, B, N, M, C, stream);
      break;
    case kHalf:
      merge_typed<__half>(x, order, offsets, weight, size, out, B, N, M, C, stream);
      break;
    case kBFloat16:
      merge_typed<__nv_bfloat16>(x, order, offsets, weight, size, out, B, N, M, C, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_unmerge_gather(const void* y, const int64_t* group, void* out, int B, int N, int M,
                                  size_t row_bytes, cudaStream_t stream) {
  if (N == 0 || B == 0 || row_bytes == 0) return cudaSuccess;
  dim3 grid(N, B);
  const bool aligned = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned) {
    unmerge_gather_kernel<uint4><<<grid, GATHER_THREADS, 0, stream>>>(static_cast<const char*>(y), group,
                                                                     static_cast<char*>(out), N, M, row_bytes);
  } else if (row_bytes % 2 == 0 && reinterpret_cast<uintptr_t>(y) % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 2 == 0) {
    unmerge_gather_kernel<unsigned short><<<grid, GATHER_THREADS, 0, stream>>>(
        static_cast<const char*>(y), group, static_cast<char*>(out), N, M, row_bytes);
  } else {
    unmerge_gather_kernel<unsigned char><<<grid, GATHER_THREADS, 0, stream>>>(
        static_cast<const char*>(y), group, static_cast<char*>(out), N, M, row_bytes);
  }
  return cudaGetLastError();
}

}  // namespace tomesd_ext
