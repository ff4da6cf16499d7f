// Python bindings of the tomesd-ext CUDA kernels: argument checks, output allocation, launches on
// the current stream. The kernels themselves live in match.cu and merge.cu.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

// (ATen/cuda/CUDAContext.h is avoided: it needs the cuBLAS/cuSPARSE headers, which toolkits
// installed without the math libraries lack.)

namespace tomesd_ext {
cudaError_t launch_best_match(int dtype, const void* src, const void* dst, float* score, int64_t* index, int b, int G,
                              int S, int D, int C, bool mean, bool tensor_cores, cudaStream_t stream);
cudaError_t launch_merge_csr(int dtype, const void* x, const int64_t* order, const int64_t* offsets,
                             const float* weight, const float* size, void* out, int B, int N, int M, int C,
                             cudaStream_t stream);
cudaError_t launch_unmerge_gather(const void* y, const int64_t* group, void* out, int B, int N, int M,
                                  size_t row_bytes, cudaStream_t stream);
}  // namespace tomesd_ext

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " is not supported (float32, float16, bfloat16)");
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), ", expected ", ref.device());
}

int compute_capability(int device) {
  int major = 0, minor = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess,
              "cannot query the compute capability of device ", device);
  return major * 10 + minor;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "tomesd_ext ", what, " launch failed: ", cudaGetErrorString(err));
}

// src: (B, S, C), dst: (B, D, C) -> (score (B/groups, S) float32, index (B/groups, S) int64).
std::vector<at::Tensor> best_match(at::Tensor src, at::Tensor dst, int64_t groups, bool mean, bool tensor_cores) {
  check_cuda(src, "src", src);
  check_cuda(dst, "dst", src);
  TORCH_CHECK(src.dim() == 3 && dst.dim() == 3, "src and dst must be (B, S, C) and (B, D, C)");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "src and dst must have one dtype");
  TORCH_CHECK(src.size(0) == dst.size(0) && src.size(2) == dst.size(2), "src ", src.sizes(), " and dst ",
              dst.sizes(), " disagree in batch or channels");
  TORCH_CHECK(groups >= 1 && src.size(0) % groups == 0, "batch ", src.size(0), " is not a multiple of groups=", groups);
  TORCH_CHECK(dst.size(1) > 0, "dst has no rows");
  const int code = dtype_code(src, "src");
  const int64_t B = src.size(0), S = src.size(1), D = dst.size(1), C = src.size(2);
  TORCH_CHECK(S < INT_MAX && D < INT_MAX && C < INT_MAX, "sizes too large");
  const int64_t b = B / groups;
  auto score = at::empty({b, S}, src.options().dtype(at::kFloat));
  auto index = at::empty({b, S}, src.options().dtype(at::kLong));
  if (S == 0 || b == 0) return {score, index};
  c10::cuda::CUDAGuard guard(src.device());
  src = src.contiguous();
  dst = dst.contiguous();
  const int cap = compute_capability(src.get_device());
  const bool tc = tensor_cores && ((code == 1 && cap >= 70) || (code == 2 && cap >= 80));
  check_launch(tomesd_ext::launch_best_match(code, src.data_ptr(), dst.data_ptr(), score.data_ptr<float>(),
                                             index.data_ptr<int64_t>(), (int)b, (int)groups, (int)S, (int)D, (int)C,
                                             mean, tc, c10::cuda::getCurrentCUDAStream().stream()),
               "best_match");
  return {score, index};
}

// x: (B, N, C); order: (B, N) int64 tokens sorted by group; offsets: (B, M + 1) int64;
// weight: optional (B, N); size: (B, M) -> (B, M, C) in x's dtype.
at::Tensor merge_csr(at::Tensor x, at::Tensor order, at::Tensor offsets, c10::optional<at::Tensor> weight,
                     at::Tensor size) {
  check_cuda(x, "x", x);
  check_cuda(order, "order", x);
  check_cuda(offsets, "offsets", x);
  check_cuda(size, "size", x);
  TORCH_CHECK(x.dim() == 3, "x must be (B, N, C)");
  const int code = dtype_code(x, "x");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = size.size(1);
  TORCH_CHECK(order.sizes() == at::IntArrayRef({B, N}) && order.scalar_type() == at::kLong, "order must be (B, N) int64");
  TORCH_CHECK(offsets.sizes() == at::IntArrayRef({B, M + 1}) && offsets.scalar_type() == at::kLong,
              "offsets must be (B, M + 1) int64");
  TORCH_CHECK(size.dim() == 2 && size.size(0) == B, "size must be (B, M)");
  c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  order = order.contiguous();
  offsets = offsets.contiguous();
  auto size_f = size.to(at::kFloat).contiguous();
  at::Tensor w;
  if (weight.has_value()) {
    w = weight->to(x.device(), at::kFloat).contiguous();
    TORCH_CHECK(w.sizes() == at::IntArrayRef({B, N}), "weight must be (B, N)");
  }
  auto out = at::empty({B, M, C}, x.options());
  check_launch(tomesd_ext::launch_merge_csr(code, x.data_ptr(), order.data_ptr<int64_t>(),
                                            offsets.data_ptr<int64_t>(), w.defined() ? w.data_ptr<float>() : nullptr,
                                            size_f.data_ptr<float>(), out.data_ptr(), (int)B, (int)N, (int)M, (int)C,
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "merge");
  return out;
}

// y: (B, M, C), group: (B, N) int64 -> (B, N, C).
at::Tensor unmerge_gather(at::Tensor y, at::Tensor group) {
  check_cuda(y, "y", y);
  check_cuda(group, "group", y);
  TORCH_CHECK(y.dim() == 3 && group.dim() == 2 && group.size(0) == y.size(0), "y must be (B, M, C), group (B, N)");
  TORCH_CHECK(group.scalar_type() == at::kLong, "group must be int64");
  c10::cuda::CUDAGuard guard(y.device());
  y = y.contiguous();
  group = group.contiguous();
  const int64_t B = y.size(0), M = y.size(1), C = y.size(2), N = group.size(1);
  auto out = at::empty({B, N, C}, y.options());
  check_launch(tomesd_ext::launch_unmerge_gather(y.data_ptr(), group.data_ptr<int64_t>(), out.data_ptr(), (int)B,
                                                 (int)N, (int)M, (size_t)C * y.element_size(),
                                                 c10::cuda::getCurrentCUDAStream().stream()),
               "unmerge");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tomesd-ext CUDA kernels: fused matching, CSR merge, gather unmerge";
  m.def("best_match", &best_match, "fused cosine best match", py::arg("src"), py::arg("dst"), py::arg("groups") = 1,
        py::arg("mean") = false, py::arg("tensor_cores") = true);
  m.def("merge_csr", &merge_csr, "size-weighted mean per group (CSR, deterministic)", py::arg("x"), py::arg("order"),
        py::arg("offsets"), py::arg("weight"), py::arg("size"));
  m.def("unmerge_gather", &unmerge_gather, "copy each group's row back to its members", py::arg("y"),
        py::arg("group"));
}
