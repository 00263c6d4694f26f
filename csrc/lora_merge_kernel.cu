// In-place LoRA merge on the GPU: W += scale * B @ A, summed in fp32, rounded once to W's type.
//
// Memory-bound: W (N x K, bf16/fp16/fp32) is read and written exactly once; A (r x K) and
// B (N x r) are tiny and come from L2. Each thread block owns a 32-row tile of W that one warp
// spans horizontally with 16-byte accesses (256 columns for 16-bit types, 128 for fp32). The
// block stages B's rows for its tile and A's columns for its tile in shared memory (in fp32),
// 32 ranks at a time, so any rank works; each thread accumulates its 4 x 8 (fp32 W: 4 x 4)
// outputs in fp32 registers, then reads its 4 x 16 bytes of W, adds, rounds and writes back.
// W is read only after the rank loop so it is not live during it: ~80 registers, 3 blocks per
// SM, and one block's loads overlap the other blocks' arithmetic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_merge.h"

namespace l2v {
namespace {

constexpr int kThreadsX = 32;                             // one warp across a tile row
constexpr int kThreadsY = 8;                              // warps per block
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kRowsPerThread = 4;                         // rows ty, ty + 8, ty + 16, ty + 24
constexpr int kTileRows = kThreadsY * kRowsPerThread;    // 32 rows of W per block
constexpr int kRankChunk = 32;                            // ranks staged in shared memory at once
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Where column c of a tile lives in a_tile's row. Thread t reads columns t*kVec .. t*kVec+kVec-1
// as kVec/4 float4s; storing float4 number q of every thread contiguously (q * 128 + t * 4) makes
// those reads conflict-free instead of 2-way conflicted for 16-bit types.
template <int kVec>
__device__ __forceinline__ int a_slot(int c) {
  const int t = c / kVec, v = c % kVec;
  return (v / 4) * (kThreadsX * 4) + t * 4 + (v % 4);
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    lora_merge_kernel(T* __restrict__ weight, int64_t row_stride, const float* __restrict__ lora_a,
                      const float* __restrict__ lora_b, int64_t n_rows, int64_t n_cols,
                      int64_t rank, float scale) {
  constexpr int kVec = 16 / sizeof(T);            // elements per 16-byte access
  constexpr int kTileCols = kThreadsX * kVec;
  __shared__ __align__(16) float a_tile[kRankChunk][kTileCols];
  __shared__ float b_tile[kTileRows][kRankChunk + 1];  // +1: staging writes avoid bank conflicts

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t tile_col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t tile_row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t col0 = tile_col0 + tx * kVec;

  float acc[kRowsPerThread][kVec];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[i][v] = 0.f;
  }

  for (int64_t r0 = 0; r0 < rank; r0 += kRankChunk) {
    const int chunk = static_cast<int>(rank - r0 < kRankChunk ? rank - r0 : kRankChunk);
    __syncthreads();  // the previous chunk has been read by every thread
    for (int i = tid; i < chunk * kTileCols; i += kThreads) {
      const int j = i / kTileCols, c = i % kTileCols;
      const int64_t col = tile_col0 + c;
      a_tile[j][a_slot<kVec>(c)] = col < n_cols ? lora_a[(r0 + j) * n_cols + col] : 0.f;
    }
    for (int i = tid; i < kTileRows * kRankChunk; i += kThreads) {
      const int r = i / kRankChunk, j = i % kRankChunk;
      const int64_t row = tile_row0 + r;
      if (j < chunk) b_tile[r][j] = row < n_rows ? lora_b[row * rank + r0 + j] : 0.f;
    }
    __syncthreads();

    for (int j = 0; j < chunk; ++j) {
      float a[kVec];
#pragma unroll
      for (int q = 0; q < kVec / 4; ++q) {
        const float4 v4 = *reinterpret_cast<const float4*>(&a_tile[j][q * kThreadsX * 4 + tx * 4]);
        a[4 * q + 0] = v4.x;
        a[4 * q + 1] = v4.y;
        a[4 * q + 2] = v4.z;
        a[4 * q + 3] = v4.w;
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float b = b_tile[ty + i * kThreadsY][j];  // same address across the warp: broadcast
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[i][v] = fmaf(b, a[v], acc[i][v]);
      }
    }
  }

  // Read W (all of this thread's 16-byte loads in flight together), add, round once, write.
  alignas(16) T w[kRowsPerThread][kVec];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = tile_row0 + ty + i * kThreadsY;
    if (row >= n_rows) continue;
    const T* src = weight + row * row_stride + col0;
    if constexpr (kVectorized) {
      if (col0 < n_cols) *reinterpret_cast<uint4*>(w[i]) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        if (col0 + v < n_cols) w[i][v] = src[v];
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = tile_row0 + ty + i * kThreadsY;
    if (row >= n_rows) continue;
    T* dst = weight + row * row_stride + col0;
    if constexpr (kVectorized) {
      if (col0 < n_cols) {
        alignas(16) T out[kVec];
#pragma unroll
        for (int v = 0; v < kVec; ++v) out[v] = from_float<T>(fmaf(scale, acc[i][v], to_float(w[i][v])));
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(out);
      }
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        if (col0 + v < n_cols) dst[v] = from_float<T>(fmaf(scale, acc[i][v], to_float(w[i][v])));
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(T* weight, int64_t row_stride, const float* lora_a, const float* lora_b,
                         int64_t n_rows, int64_t n_cols, int64_t rank, float scale,
                         cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kTileCols = kThreadsX * kVec;
  const dim3 block(kThreadsX, kThreadsY);
  const dim3 grid(static_cast<unsigned>((n_cols + kTileCols - 1) / kTileCols),
                  static_cast<unsigned>((n_rows + kTileRows - 1) / kTileRows));
  // 16-byte accesses need every row start 16-byte aligned and no vector straddling the end.
  const bool vectorized = reinterpret_cast<uintptr_t>(weight) % 16 == 0 &&
                          row_stride % kVec == 0 && n_cols % kVec == 0;
  if (vectorized) {
    lora_merge_kernel<T, true><<<grid, block, 0, stream>>>(weight, row_stride, lora_a, lora_b,
                                                           n_rows, n_cols, rank, scale);
  } else {
    lora_merge_kernel<T, false><<<grid, block, 0, stream>>>(weight, row_stride, lora_a, lora_b,
                                                            n_rows, n_cols, rank, scale);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t lora_merge_max_rows() { return static_cast<int64_t>(kMaxGridY) * kTileRows; }

cudaError_t launch_lora_merge(void* weight, WeightType type, int64_t row_stride,
                              const float* lora_a, const float* lora_b, int64_t n_rows,
                              int64_t n_cols, int64_t rank, float scale, cudaStream_t stream) {
  if (n_rows == 0 || n_cols == 0 || rank == 0) return cudaSuccess;
  if (n_rows > lora_merge_max_rows()) return cudaErrorInvalidValue;
  switch (type) {
    case WeightType::kFloat32:
      return launch_typed(static_cast<float*>(weight), row_stride, lora_a, lora_b, n_rows, n_cols,
                          rank, scale, stream);
    case WeightType::kFloat16:
      return launch_typed(static_cast<__half*>(weight), row_stride, lora_a, lora_b, n_rows,
                          n_cols, rank, scale, stream);
    case WeightType::kBFloat16:
      return launch_typed(static_cast<__nv_bfloat16*>(weight), row_stride, lora_a, lora_b,
                          n_rows, n_cols, rank, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace l2v
