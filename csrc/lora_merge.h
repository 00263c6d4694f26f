// Launcher of the CUDA LoRA-merge kernel (csrc/lora_merge_kernel.cu).
//
// Kept free of ATen/torch headers on purpose: the .cu file then compiles in seconds for each
// target architecture, and the torch-facing code lives in csrc/cuda_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace l2v {

enum class WeightType { kFloat32, kFloat16, kBFloat16 };

// In place: weight[n, k] = round(weight[n, k] + scale * sum_j lora_b[n, j] * lora_a[j, k]),
// the sum in fp32, one rounding to the weight's type.
//   weight: n_rows x n_cols, element (n, k) at weight + n * row_stride + k
//   lora_a: fp32, contiguous, rank x n_cols
//   lora_b: fp32, contiguous, n_rows x rank
// Returns the launch status (cudaSuccess, or the error of cudaGetLastError()).
cudaError_t launch_lora_merge(void* weight, WeightType type, int64_t row_stride,
                              const float* lora_a, const float* lora_b, int64_t n_rows,
                              int64_t n_cols, int64_t rank, float scale, cudaStream_t stream);

// Largest row count one launch handles (grid.y limit times the rows of a tile).
int64_t lora_merge_max_rows();

}  // namespace l2v
