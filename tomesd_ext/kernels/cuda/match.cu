// Fused cosine matching: for every source row, the best destination row by dot product
// (inputs are L2-normalised), without materialising the (S x D) score matrix.
//
// src: (G*b, S, C), dst: (G*b, D, C) contiguous; output score (b, S) float32, index (b, S) int64.
// With G > 1 ("align_batch", e.g. the cond/uncond halves of a CFG batch) the score of (s, d) for
// output sample j combines the G samples g*b + j by max (or mean), so all G share one matching.
// Tiles of BM source rows stream over tiles of BN destination rows; each row keeps a running
// (max, argmax) in registers, so memory is O(S). Accumulation is float32 for every input dtype.
// Ties resolve to the lowest destination index (torch.max semantics).
//
// Two implementations: a SIMT kernel for every dtype (CUDA cores) and a tensor-core kernel
// (WMMA 16x16x16, fp32 accumulators) for float16 (sm_70+) and bfloat16 (sm_80+).

#include "common.cuh"

#include <climits>
#include <mma.h>

namespace tomesd_ext {
namespace {

// ---------------------------------------------------------------- SIMT kernel (any dtype)
constexpr int SIMT_BM = 64, SIMT_BN = 64, SIMT_BK = 16, SIMT_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(SIMT_THREADS)
match_simt_kernel(const T* __restrict__ src, const T* __restrict__ dst, float* __restrict__ score,
                  int64_t* __restrict__ index, int b, int G, int S, int D, int C, bool mean) {
  __shared__ float As[SIMT_BK][SIMT_BM + 1];
  __shared__ float Bs[SIMT_BK][SIMT_BN + 1];
  const int j = blockIdx.y;
  const int row0 = blockIdx.x * SIMT_BM;
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // rows ty + 16 i, columns tx + 16 jj
  const float inv_g = 1.0f / G;

  float best[4];
  int best_i[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = -INFINITY;
    best_i[i] = INT_MAX;
  }

  for (int n0 = 0; n0 < D; n0 += SIMT_BN) {
    float comb[4][4];
    for (int g = 0; g < G; ++g) {
      const T* A = src + (size_t)(g * b + j) * S * C;
      const T* B = dst + (size_t)(g * b + j) * D * C;
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.0f;

      for (int k0 = 0; k0 < C; k0 += SIMT_BK) {
        for (int e = tid; e < SIMT_BM * SIMT_BK; e += SIMT_THREADS) {
          const int r = e / SIMT_BK, k = e % SIMT_BK;
          const int gr = row0 + r, gk = k0 + k;
          As[k][r] = (gr < S && gk < C) ? to_float(A[(size_t)gr * C + gk]) : 0.0f;
          const int gn = n0 + r;
          Bs[k][r] = (gn < D && gk < C) ? to_float(B[(size_t)gn * C + gk]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < SIMT_BK; ++k) {
          float a[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) bv[jj] = Bs[k][tx + 16 * jj];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(a[i], bv[jj], acc[i][jj]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          if (g == 0) comb[i][jj] = acc[i][jj];
          else if (mean) comb[i][jj] += acc[i][jj];
          else comb[i][jj] = fmaxf(comb[i][jj], acc[i][jj]);
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = -INFINITY;
      int vi = INT_MAX;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int col = n0 + tx + 16 * jj;
        const float s = (mean && G > 1) ? comb[i][jj] * inv_g : comb[i][jj];
        if (col < D && better(s, col, v, vi)) {
          v = s;
          vi = col;
        }
      }
      // the 16 threads of one row group are 16 consecutive lanes of a warp
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, vi, off);
        if (better(ov, oi, v, vi)) {
          v = ov;
          vi = oi;
        }
      }
      if (better(v, vi, best[i], best_i[i])) {
        best[i] = v;
        best_i[i] = vi;
      }
    }
  }

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = row0 + ty + 16 * i;
      if (r < S) {
        score[(size_t)j * S + r] = best[i];
        index[(size_t)j * S + r] = best_i[i];
      }
    }
  }
}

// ---------------------------------------------------------------- tensor-core kernel (fp16/bf16)
constexpr int TC_BM = 64, TC_BN = 64, TC_BK = 32, TC_LD = TC_BK + 8, TC_CLD = TC_BN + 4, TC_THREADS = 128;

template <typename T>
struct TcEnabled {
  static constexpr bool value = false;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
template <>
struct TcEnabled<__half> {
  static constexpr bool value = true;
};
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct TcEnabled<__nv_bfloat16> {
  static constexpr bool value = true;
};
#endif

template <typename T, bool Enabled = TcEnabled<T>::value>
struct TcBody {
  __device__ static void run(const T*, const T*, float*, int64_t*, int, int, int, int, int, bool, bool) {}
};

template <typename T>
struct TcBody<T, true> {
  __device__ static void run(const T* __restrict__ src, const T* __restrict__ dst, float* __restrict__ score,
                             int64_t* __restrict__ index, int b, int G, int S, int D, int C, bool mean,
                             bool vec) {
    using namespace nvcuda;
    __shared__ __align__(32) T As[TC_BM * TC_LD];
    __shared__ __align__(32) T Bs[TC_BN * TC_LD];
    __shared__ __align__(32) float Cs[TC_BM * TC_CLD];
    const int j = blockIdx.y;
    const int row0 = blockIdx.x * TC_BM;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int my_row = tid / 2, my_half = tid % 2;  // row scan: two threads per row, 32 columns each
    const T zero = from_float<T>(0.0f);
    const float inv_g = 1.0f / G;

    float best = -INFINITY;
    int best_i = INT_MAX;

    for (int n0 = 0; n0 < D; n0 += TC_BN) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> comb[4], acc[4];
      for (int g = 0; g < G; ++g) {
        const T* A = src + (size_t)(g * b + j) * S * C;
        const T* B = dst + (size_t)(g * b + j) * D * C;
#pragma unroll
        for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.0f);
        for (int k0 = 0; k0 < C; k0 += TC_BK) {
          if (vec) {
            // 16-byte loads of 8 elements: C % 8 == 0 and 16-byte aligned bases (checked by the
            // launcher), so a vector never straddles the end of a row; zero bits are +0.0.
            constexpr int V = TC_BK / 8;
            for (int e = tid; e < TC_BM * V; e += TC_THREADS) {
              const int r = e / V, kv = e % V;
              const int gk = k0 + kv * 8;
              const int gr = row0 + r, gn = n0 + r;
              uint4 va = make_uint4(0u, 0u, 0u, 0u), vb = make_uint4(0u, 0u, 0u, 0u);
              if (gr < S && gk < C) va = *reinterpret_cast<const uint4*>(A + (size_t)gr * C + gk);
              if (gn < D && gk < C) vb = *reinterpret_cast<const uint4*>(B + (size_t)gn * C + gk);
              *reinterpret_cast<uint4*>(As + r * TC_LD + kv * 8) = va;
              *reinterpret_cast<uint4*>(Bs + r * TC_LD + kv * 8) = vb;
            }
          } else {
            for (int e = tid; e < TC_BM * TC_BK; e += TC_THREADS) {
              const int r = e / TC_BK, k = e % TC_BK;
              const int gk = k0 + k;
              const int gr = row0 + r;
              As[r * TC_LD + k] = (gr < S && gk < C) ? A[(size_t)gr * C + gk] : zero;
              const int gn = n0 + r;
              Bs[r * TC_LD + k] = (gn < D && gk < C) ? B[(size_t)gn * C + gk] : zero;
            }
          }
          __syncthreads();
#pragma unroll
          for (int kk = 0; kk < TC_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::load_matrix_sync(a, As + warp * 16 * TC_LD + kk, TC_LD);
#pragma unroll
            for (int f = 0; f < 4; ++f) {
              // dst rows stored row-major are the columns of B = dst^T: a column-major K x N tile
              wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
              wmma::load_matrix_sync(bf, Bs + f * 16 * TC_LD + kk, TC_LD);
              wmma::mma_sync(acc[f], a, bf, acc[f]);
            }
          }
          __syncthreads();
        }
#pragma unroll
        for (int f = 0; f < 4; ++f)
          for (int t = 0; t < comb[f].num_elements; ++t) {
            if (g == 0) comb[f].x[t] = acc[f].x[t];
            else if (mean) comb[f].x[t] += acc[f].x[t];
            else comb[f].x[t] = fmaxf(comb[f].x[t], acc[f].x[t]);
          }
      }
#pragma unroll
      for (int f = 0; f < 4; ++f)
        wmma::store_matrix_sync(Cs + warp * 16 * TC_CLD + f * 16, comb[f], TC_CLD, wmma::mem_row_major);
      __syncthreads();

      float v = -INFINITY;
      int vi = INT_MAX;
      for (int c = my_half * 32; c < my_half * 32 + 32; ++c) {
        const int col = n0 + c;
        float s = Cs[my_row * TC_CLD + c];
        if (mean && G > 1) s *= inv_g;
        if (col < D && better(s, col, v, vi)) {
          v = s;
          vi = col;
        }
      }
      const float ov = __shfl_xor_sync(0xffffffffu, v, 1);
      const int oi = __shfl_xor_sync(0xffffffffu, vi, 1);
      if (better(ov, oi, v, vi)) {
        v = ov;
        vi = oi;
      }
      if (better(v, vi, best, best_i)) {
        best = v;
        best_i = vi;
      }
      __syncthreads();  // Cs is overwritten by the next tile
    }

    const int r = row0 + my_row;
    if (my_half == 0 && r < S) {
      score[(size_t)j * S + r] = best;
      index[(size_t)j * S + r] = best_i;
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(TC_THREADS)
match_tc_kernel(const T* __restrict__ src, const T* __restrict__ dst, float* __restrict__ score,
                int64_t* __restrict__ index, int b, int G, int S, int D, int C, bool mean, bool vec) {
  TcBody<T>::run(src, dst, score, index, b, G, S, D, C, mean, vec);
}

template <typename T>
void launch_typed(const void* src, const void* dst, float* score, int64_t* index, int b, int G, int S, int D,
                  int C, bool mean, bool tensor_cores, cudaStream_t stream) {
  const T* s = static_cast<const T*>(src);
  const T* d = static_cast<const T*>(dst);
  if (tensor_cores) {
    dim3 grid((S + TC_BM - 1) / TC_BM, b);
    const bool vec = C % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
    match_tc_kernel<T><<<grid, TC_THREADS, 0, stream>>>(s, d, score, index, b, G, S, D, C, mean, vec);
  } else {
    dim3 grid((S + SIMT_BM - 1) / SIMT_BM, b);
    match_simt_kernel<T><<<grid, SIMT_THREADS, 0, stream>>>(s, d, score, index, b, G, S, D, C, mean);
  }
}

}  // namespace

// Host entry point (declared in bindings.cpp). tensor_cores is honoured for fp16/bf16 only; the
// caller checks the device's compute capability.
cudaError_t launch_best_match(int dtype, const void* src, const void* dst, float* score, int64_t* index, int b, int G,
                              int S, int D, int C, bool mean, bool tensor_cores, cudaStream_t stream) {
  switch (dtype) {
    case kFloat:
      launch_typed<float>(src, dst, score, index, b, G, S, D, C, mean, false, stream);
      break;
    case kHalf:
      launch_typed<__half>(src, dst, score, index, b, G, S, D, C, mean, tensor_cores, stream);
      break;
    case kBFloat16:
      launch_typed<__nv_bfloat16>(src, dst, score, index, b, G, S, D, C, mean, tensor_cores, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tomesd_ext
