// Argument checks shared by the CPU and CUDA implementations of the l2v ops. Each TORCH_CHECK
// message names the op and says what was expected, so a bad call fails with a readable error.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace l2v {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// True when t's rows are stored with stride 1 along the last dimension.
inline bool last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1;
}

inline void check_lora_merge_args(const at::Tensor& weight, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 2, "l2v::lora_merge_: weight must be 2-D [N, K], got shape ",
              weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2, "l2v::lora_merge_: lora_A must be 2-D [r, K], got shape ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2, "l2v::lora_merge_: lora_B must be 2-D [N, r], got shape ",
              lora_B.sizes());
  const int64_t n = weight.size(0), k = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(lora_A.size(1) == k, "l2v::lora_merge_: lora_A must be [r, K] with K = ", k,
              " (weight.size(1)), got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == n && lora_B.size(1) == r,
              "l2v::lora_merge_: lora_B must be [N, r] = [", n, ", ", r, "], got shape ",
              lora_B.sizes());
  TORCH_CHECK(is_float_type(weight.scalar_type()),
              "l2v::lora_merge_: weight must be float32, float16 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(is_float_type(lora_A.scalar_type()) && lora_A.scalar_type() == lora_B.scalar_type(),
              "l2v::lora_merge_: lora_A and lora_B must have the same dtype, one of float32, "
              "float16, bfloat16; got ", lora_A.scalar_type(), " and ", lora_B.scalar_type());
  TORCH_CHECK(lora_A.device() == weight.device() && lora_B.device() == weight.device(),
              "l2v::lora_merge_: weight, lora_A and lora_B must be on one device, got ",
              weight.device(), ", ", lora_A.device(), ", ", lora_B.device());
  TORCH_CHECK(last_dim_contiguous(weight),
              "l2v::lora_merge_: weight must have a contiguous last dimension (stride 1), got "
              "strides ", weight.strides());
}

// allow_float32: the CPU implementation computes in fp32 anyway; the CUDA one is bf16/fp16.
inline void check_gemm_residual_args(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& bias, bool allow_float32) {
  TORCH_CHECK(x.dim() == 2, "l2v::gemm_residual: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "l2v::gemm_residual: w must be 2-D [N, K], got shape ", w.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k, "l2v::gemm_residual: w must be [N, K] with K = ", k,
              " (x.size(1)), got shape ", w.sizes());
  const auto dtype = x.scalar_type();
  const bool dtype_ok = dtype == at::kHalf || dtype == at::kBFloat16 ||
                        (allow_float32 && dtype == at::kFloat);
  TORCH_CHECK(dtype_ok, "l2v::gemm_residual: x must be ",
              allow_float32 ? "float32, float16 or bfloat16" : "float16 or bfloat16 on CUDA",
              ", got ", dtype);
  TORCH_CHECK(w.scalar_type() == dtype, "l2v::gemm_residual: w must have x's dtype ", dtype,
              ", got ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "l2v::gemm_residual: w must be on x's device ",
              x.device(), ", got ", w.device());
  TORCH_CHECK(last_dim_contiguous(x) && last_dim_contiguous(w),
              "l2v::gemm_residual: x and w must have a contiguous last dimension (stride 1), got "
              "strides ", x.strides(), " and ", w.strides());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.dim() == 2 && r.size(0) == m && r.size(1) == n,
                "l2v::gemm_residual: residual must be [M, N] = [", m, ", ", n, "], got shape ",
                r.sizes());
    TORCH_CHECK(r.scalar_type() == dtype, "l2v::gemm_residual: residual must have x's dtype ",
                dtype, ", got ", r.scalar_type());
    TORCH_CHECK(r.device() == x.device(), "l2v::gemm_residual: residual must be on x's device ",
                x.device(), ", got ", r.device());
    TORCH_CHECK(last_dim_contiguous(r),
                "l2v::gemm_residual: residual must have a contiguous last dimension (stride 1), "
                "got strides ", r.strides());
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "l2v::gemm_residual: bias must be [N] = [", n,
                "], got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, "l2v::gemm_residual: bias must have x's dtype ", dtype,
                ", got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "l2v::gemm_residual: bias must be on x's device ",
                x.device(), ", got ", b.device());
  }
}

}  // namespace l2v
