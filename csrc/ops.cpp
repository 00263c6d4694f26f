// The l2v operator library: schemas, CPU implementations and the Python module entry point.
//
// The schemas are the one registered-op boundary the Python wrappers in l2v_kernels/gemm.py
// call (torch.ops.l2v.*); that module also registers their fake (meta) functions, so the ops
// trace under torch.compile and run inside CUDA graphs. CUDA implementations: cuda_ops.cpp.
//
// No pybind11 and no torch/extension.h: `import l2v_kernels._C` only has to load this shared
// library so the TORCH_LIBRARY blocks below run; that keeps the build small and fast.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace l2v {
namespace {

// W += scale * B @ A: the product in fp32, one rounding to W's dtype. Row blocks bound the
// fp32 temporary to ~64 MiB whatever W's size.
void lora_merge_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                    double scale) {
  check_lora_merge_args(weight, lora_A, lora_B);
  const int64_t n = weight.size(0), k = weight.size(1);
  if (weight.numel() == 0 || lora_A.size(0) == 0) return;
  const at::Tensor a32 = lora_A.to(at::kFloat);
  const at::Tensor b32 = lora_B.to(at::kFloat);
  const int64_t rows_per_block = std::max<int64_t>(1, (int64_t{1} << 24) / k);
  for (int64_t r0 = 0; r0 < n; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, n - r0);
    at::Tensor w_rows = weight.narrow(0, r0, rows);
    const at::Tensor delta = at::mm(b32.narrow(0, r0, rows), a32);
    if (weight.scalar_type() == at::kFloat) {
      w_rows.add_(delta, scale);
    } else {
      w_rows.copy_(w_rows.to(at::kFloat).add_(delta, scale));
    }
  }
}

// x @ w.T (+ bias) (+ residual) in fp32, one rounding. The Python wrapper runs the same math in
// torch on CPU; this kernel exists so the schema and fake function are checked on CPU-only CI.
at::Tensor gemm_residual_cpu(const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& bias) {
  check_gemm_residual_args(x, w, residual, bias, /*allow_float32=*/true);
  at::Tensor acc = at::mm(x.to(at::kFloat), w.to(at::kFloat).t());
  if (bias.has_value()) acc.add_(bias->to(at::kFloat));
  if (residual.has_value()) acc.add_(residual->to(at::kFloat));
  return acc.to(x.scalar_type());
}

}  // namespace
}  // namespace l2v

TORCH_LIBRARY(l2v, m) {
  // Fake (meta) functions live in this Python module; torch imports it when it needs them.
  m.set_python_module("l2v_kernels.gemm");
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
  m.def("gemm_residual(Tensor x, Tensor w, Tensor? residual=None, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(l2v, CPU, m) {
  m.impl("lora_merge_", &l2v::lora_merge_cpu);
  m.impl("gemm_residual", &l2v::gemm_residual_cpu);
}

// `import l2v_kernels._C` needs a module object; the ops live in torch.ops.l2v.
static PyModuleDef l2v_module = {PyModuleDef_HEAD_INIT, "_C",
                                 "l2v C++/CUDA ops; use them through torch.ops.l2v", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&l2v_module); }
