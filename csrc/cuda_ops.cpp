// CUDA implementations of the l2v ops: the LoRA merge (kernel in lora_merge_kernel.cu) and the
// GEMM with a fused bias + residual epilogue on cuBLASLt.
//
// gemm_residual computes out[M, N] = x[M, K] @ w[N, K].T (+ bias[N]) (+ residual[M, N]) as one
// cuBLASLt call, D = alpha * op(A) @ op(B) + beta * C (+ bias), with compute type 32F: the
// residual (C, beta = 1) and the bias (CUBLASLT_EPILOGUE_BIAS) are added to the fp32 accumulator
// and the sum is rounded once to bf16/fp16. Row-major tensors are handed to the column-major
// library transposed: out^T[N, M] = w[N, K] @ x^T[K, M], i.e. A = w (stored K x N, op T),
// B = x (stored K x M, op N), C = residual^T and D = out^T (stored N x M).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <mutex>
#include <optional>

#include "checks.h"
#include "lora_merge.h"

namespace l2v {
namespace {

// ----------------------------------------------------------------------------------------------
// LoRA merge
// ----------------------------------------------------------------------------------------------

void lora_merge_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     double scale) {
  check_lora_merge_args(weight, lora_A, lora_B);
  TORCH_CHECK(weight.is_cuda(), "l2v::lora_merge_: expected CUDA tensors, got ", weight.device());
  const int64_t n = weight.size(0), k = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(n <= lora_merge_max_rows(), "l2v::lora_merge_: weight has ", n,
              " rows; the kernel handles at most ", lora_merge_max_rows(),
              " per call (merge row slices)");
  if (weight.numel() == 0 || r == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  // A and B are small (r x K, N x r): one fp32 copy of each lets a single kernel serve every
  // adapter dtype and keeps the kernel's inner loop in fp32.
  const at::Tensor a32 = lora_A.to(at::kFloat).contiguous();
  const at::Tensor b32 = lora_B.to(at::kFloat).contiguous();
  WeightType type = WeightType::kFloat32;
  if (weight.scalar_type() == at::kHalf) type = WeightType::kFloat16;
  if (weight.scalar_type() == at::kBFloat16) type = WeightType::kBFloat16;
  const int64_t row_stride = n > 1 ? weight.stride(0) : k;
  TORCH_CHECK(row_stride >= k, "l2v::lora_merge_: weight rows overlap (row stride ", row_stride,
              " < K = ", k, ")");
  const cudaError_t err =
      launch_lora_merge(weight.data_ptr(), type, row_stride, a32.data_ptr<float>(),
                        b32.data_ptr<float>(), n, k, r, static_cast<float>(scale),
                        at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "l2v::lora_merge_: kernel launch failed: ",
              cudaGetErrorString(err));
}

// ----------------------------------------------------------------------------------------------
// cuBLASLt GEMM with bias + residual epilogue
// ----------------------------------------------------------------------------------------------

#define L2V_CUBLASLT_CHECK(expr)                                                             \
  do {                                                                                       \
    const cublasStatus_t status_ = (expr);                                                   \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "l2v::gemm_residual: ", #expr, " failed: ", \
                cublasLtGetStatusString(status_));                                           \
  } while (0)

// RAII owners of the cuBLASLt descriptors (created per call: cheap host-side structs).
struct MatrixLayout {
  cublasLtMatrixLayout_t handle = nullptr;
  MatrixLayout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    L2V_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&handle, type, rows, cols, ld));
  }
  ~MatrixLayout() {
    if (handle) cublasLtMatrixLayoutDestroy(handle);
  }
  MatrixLayout(const MatrixLayout&) = delete;
  MatrixLayout& operator=(const MatrixLayout&) = delete;
};

struct MatmulDesc {
  cublasLtMatmulDesc_t handle = nullptr;
  MatmulDesc() { L2V_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&handle, CUBLAS_COMPUTE_32F, CUDA_R_32F)); }
  ~MatmulDesc() {
    if (handle) cublasLtMatmulDescDestroy(handle);
  }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attr, const T& value) {
    L2V_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(handle, attr, &value, sizeof(value)));
  }
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
};

struct MatmulPreference {
  cublasLtMatmulPreference_t handle = nullptr;
  MatmulPreference() { L2V_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&handle)); }
  ~MatmulPreference() {
    if (handle) cublasLtMatmulPreferenceDestroy(handle);
  }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
    L2V_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(handle, attr, &value, sizeof(value)));
  }
  MatmulPreference(const MatmulPreference&) = delete;
  MatmulPreference& operator=(const MatmulPreference&) = delete;
};

// Largest power of two (up to 256) dividing the address: cuBLASLt only returns algorithms whose
// alignment needs the buffers meet (its default assumption is 256 bytes).
uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t alignment = 1;
  while (alignment < 256 && address % (alignment * 2) == 0) alignment *= 2;
  return alignment;
}

// Workspace cuBLASLt may use (split-K etc.); allocated per call from the caching allocator, so it
// follows the current stream and CUDA-graph memory pools.
constexpr uint64_t kMaxWorkspaceBytes = uint64_t{32} << 20;

struct Plan {
  cublasLtMatmulAlgo_t algo;
  size_t workspace_bytes;
};

// Heuristic results per problem: (device, M, N, K, leading dims, dtype, epilogue, alignments).
using PlanKey = std::array<int64_t, 14>;
std::mutex plan_mutex;
std::map<PlanKey, Plan> plan_cache;

at::Tensor gemm_residual_cuda(const at::Tensor& x, const at::Tensor& w,
                              const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& bias) {
  check_gemm_residual_args(x, w, residual, bias, /*allow_float32=*/false);
  TORCH_CHECK(x.is_cuda(), "l2v::gemm_residual: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  if (k == 0) {  // nothing to multiply: the epilogue alone, still one rounding
    at::Tensor acc = at::zeros({m, n}, x.options().dtype(at::kFloat));
    if (bias.has_value()) acc.add_(bias->to(at::kFloat));
    if (residual.has_value()) acc.add_(residual->to(at::kFloat));
    return out.copy_(acc);
  }

  // Leading dimensions: the row stride (a single row may carry any stride; use its length).
  const auto leading_dim = [](const at::Tensor& t, const char* name) {
    const int64_t ld = t.size(0) > 1 ? t.stride(0) : t.size(1);
    TORCH_CHECK(ld >= t.size(1), "l2v::gemm_residual: ", name, " rows overlap (row stride ", ld,
                " < row length ", t.size(1), "); call .contiguous() first");
    return ld;
  };
  const int64_t ldx = leading_dim(x, "x");
  const int64_t ldw = leading_dim(w, "w");
  const int64_t ldr = residual.has_value() ? leading_dim(*residual, "residual") : n;

  // The bias epilogue reads a packed vector; copy a strided or misaligned one (N elements).
  at::Tensor bias_buf;
  if (bias.has_value()) {
    bias_buf = *bias;
    if (!bias_buf.is_contiguous() || alignment_of(bias_buf.data_ptr()) < 16) {
      bias_buf = bias_buf.clone(at::MemoryFormat::Contiguous);
    }
  }

  const cudaDataType_t type = x.scalar_type() == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  const void* c_ptr = residual.has_value() ? residual->data_ptr() : out.data_ptr();
  MatrixLayout a_layout(type, k, n, ldw);
  MatrixLayout b_layout(type, k, m, ldx);
  MatrixLayout c_layout(type, n, m, ldr);
  MatrixLayout d_layout(type, n, m, n);
  MatmulDesc desc;
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(CUBLAS_OP_T));
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(CUBLAS_OP_N));
  const cublasLtEpilogue_t epilogue =
      bias.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (bias.has_value()) {
    const void* bias_ptr = bias_buf.data_ptr();
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_ptr);
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(type));
  }

  const uint32_t align_w = alignment_of(w.data_ptr());
  const uint32_t align_x = alignment_of(x.data_ptr());
  const uint32_t align_c = alignment_of(c_ptr);
  const uint32_t align_d = alignment_of(out.data_ptr());
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const PlanKey key = {x.get_device(), m, n, k, ldx, ldw, ldr, static_cast<int64_t>(type),
                       bias.has_value(), residual.has_value(), align_w, align_x, align_c, align_d};
  Plan plan{};
  bool cached = false;
  {
    const std::lock_guard<std::mutex> lock(plan_mutex);
    const auto it = plan_cache.find(key);
    if (it != plan_cache.end()) {
      plan = it->second;
      cached = true;
    }
  }
  if (!cached) {
    MatmulPreference pref;
    pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kMaxWorkspaceBytes);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle, desc.handle, a_layout.handle, b_layout.handle,
                                       c_layout.handle, d_layout.handle, pref.handle, 1, &result,
                                       &found);
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS && found > 0,
                "l2v::gemm_residual: cuBLASLt has no algorithm for M=", m, " N=", n, " K=", k,
                " (", x.scalar_type(), ", row strides x ", ldx, " w ", ldw, ", pointer alignments "
                "x ", align_x, " w ", align_w, " residual ", align_c, " bytes): ",
                cublasLtGetStatusString(status),
                ". Pass contiguous 16-byte aligned tensors or use impl='torch'.");
    plan = Plan{result.algo, result.workspaceSize};
    const std::lock_guard<std::mutex> lock(plan_mutex);
    plan_cache.emplace(key, plan);
  }

  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
  }
  const float alpha = 1.0f;
  const float beta = residual.has_value() ? 1.0f : 0.0f;
  L2V_CUBLASLT_CHECK(cublasLtMatmul(
      handle, desc.handle, &alpha, w.data_ptr(), a_layout.handle, x.data_ptr(), b_layout.handle,
      &beta, c_ptr, c_layout.handle, out.data_ptr(), d_layout.handle, &plan.algo,
      plan.workspace_bytes > 0 ? workspace.data_ptr() : nullptr, plan.workspace_bytes,
      at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace l2v

TORCH_LIBRARY_IMPL(l2v, CUDA, m) {
  m.impl("lora_merge_", &l2v::lora_merge_cuda);
  m.impl("gemm_residual", &l2v::gemm_residual_cuda);
}
