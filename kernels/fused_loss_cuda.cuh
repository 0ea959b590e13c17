// CUDA kernels of the fused mimicking loss, as templates: fused_loss_cuda.cu instantiates float32
// and float64, fused_loss_cuda_half.cu and fused_loss_cuda_bf16.cu the 16-bit dtypes (separate
// files, so nvcc compiles them in parallel).
// One warp per row when K is small, one block per row otherwise. A row is read from global memory
// once: pass 1 (online max/sum/argmax per head) stages it in shared memory as fp32 when it fits,
// and passes 2 (KL terms, W_j) and 3 (gradients, written once in the logits' dtype, float32 for
// float16 logits: see SavedGrad) read it from
// there. Per-row stats go to a [B, P] buffer that a second kernel reduces in a fixed order (no
// atomics), so results are bitwise reproducible. The per-element math is dhm_row.h, shared with
// the CPU kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "fused_loss.h"

namespace dhm {
namespace cuda_detail {

constexpr int kWarp = 32;
constexpr int kSmallK = 512;               // up to this many classes: a warp per row
constexpr int kLargeRowThreads = 256;      // otherwise: a block of this many threads per row
constexpr size_t kMaxCacheBytes = 64 << 10;  // per-row staging limit (keeps >= 2-3 blocks per SM)

template <typename scalar_t>
struct HeadArgs {
  const scalar_t* x[kMaxHeads];
  int64_t stride_row[kMaxHeads];
  int64_t stride_col[kMaxHeads];
  SavedGrad<scalar_t>* g[kMaxHeads];  // contiguous [B, K] gradients (unused without compute_grad)
};

template <typename acc_t>
__device__ __forceinline__ OnlineState<acc_t> shfl_down_state(const OnlineState<acc_t>& s, int off) {
  OnlineState<acc_t> r;
  r.max = __shfl_down_sync(0xffffffffu, s.max, off);
  r.sum_t = __shfl_down_sync(0xffffffffu, s.sum_t, off);
  r.sum_1 = __shfl_down_sync(0xffffffffu, s.sum_1, off);
  r.arg = static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(s.arg), off));
  return r;
}

template <typename acc_t>
__device__ __forceinline__ OnlineState<acc_t> shfl_state(const OnlineState<acc_t>& s, int src) {
  OnlineState<acc_t> r;
  r.max = __shfl_sync(0xffffffffu, s.max, src);
  r.sum_t = __shfl_sync(0xffffffffu, s.sum_t, src);
  r.sum_1 = __shfl_sync(0xffffffffu, s.sum_1, src);
  r.arg = static_cast<int64_t>(__shfl_sync(0xffffffffu, static_cast<long long>(s.arg), src));
  return r;
}

// Tree sum over the warp in a fixed order; lane 0 holds the result.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_logit(const HeadArgs<scalar_t>& a, int h, int64_t row,
                                            int64_t k) {
  return static_cast<acc_t>(a.x[h][row * a.stride_row[h] + k * a.stride_col[h]]);
}

// One row per ROW_THREADS threads (a warp, or a whole block). MAXH >= H bounds the register arrays.
template <typename scalar_t, typename acc_t, int MAXH, int ROW_THREADS>
__global__ void __launch_bounds__(ROW_THREADS >= 128 ? ROW_THREADS : 128)
    fused_rows_kernel(const __grid_constant__ HeadArgs<scalar_t> a, const int64_t* __restrict__ target,
                      const float* __restrict__ ce_w, const float* __restrict__ kl_w,
                      const RowConsts<acc_t> c, const int64_t batch, const bool smooth,
                      const bool two_temps, const bool compute_grad, const bool cached,
                      acc_t* __restrict__ partial) {
  constexpr int kBlock = ROW_THREADS >= 128 ? ROW_THREADS : 128;
  constexpr int kRowsPerBlock = kBlock / ROW_THREADS;
  constexpr int kWarpsPerRow = ROW_THREADS / kWarp;
  constexpr int kSums = MAXH * MAXH + 2 * MAXH;  // KL matrix, W_j, sum_k (z_hk - max_h)
  constexpr int kRedWarps = kWarpsPerRow > 1 ? kWarpsPerRow : 1;
  __shared__ float s_w[MAXH * MAXH + MAXH];  // kl_w [H*H], then ce_w [H]
  __shared__ OnlineState<acc_t> s_state[kRowsPerBlock][kRedWarps][MAXH];
  __shared__ acc_t s_sums[kRowsPerBlock][kRedWarps][kSums];
  extern __shared__ __align__(16) unsigned char s_dyn[];

  const int H = c.heads;
  const int64_t K = c.classes;
  for (int t = threadIdx.x; t < H * H; t += blockDim.x) s_w[t] = kl_w[t];
  for (int t = threadIdx.x; t < H; t += blockDim.x) s_w[MAXH * MAXH + t] = ce_w[t];
  __syncthreads();

  const int row_in_block = threadIdx.x / ROW_THREADS;
  const int lane = threadIdx.x % ROW_THREADS;
  const int warp = lane / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + row_in_block;
  // Whole rows (a warp each, or the whole block) leave together: no barrier is left waiting.
  if (row >= batch) return;
  acc_t* cache = reinterpret_cast<acc_t*>(s_dyn) + static_cast<int64_t>(row_in_block) * H * K;
  const int64_t y = target[row];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K);

  // Pass 1: online softmax state of every head; stage the row.
  OnlineState<acc_t> st[MAXH];
#pragma unroll
  for (int h = 0; h < MAXH; ++h) online_init(st[h]);
  for (int64_t k = lane; k < K; k += ROW_THREADS) {
#pragma unroll
    for (int h = 0; h < MAXH; ++h) {
      if (h < H) {
        const acc_t v = load_logit<scalar_t, acc_t>(a, h, row, k);
        if (cached) cache[h * K + k] = v;
        online_add(st[h], v, k, c.inv_t, two_temps);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < MAXH; ++h) {
    if (h < H) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2)
        st[h] = online_merge(st[h], shfl_down_state(st[h], off), c.inv_t, two_temps);
      st[h] = shfl_state(st[h], 0);
      if (kWarpsPerRow > 1 && lane % kWarp == 0) s_state[row_in_block][warp][h] = st[h];
    }
  }
  if (kWarpsPerRow > 1) {
    __syncthreads();
#pragma unroll
    for (int h = 0; h < MAXH; ++h) {
      if (h < H) {
        st[h] = s_state[row_in_block][0][h];
        for (int w = 1; w < kWarpsPerRow; ++w)
          st[h] = online_merge(st[h], s_state[row_in_block][w][h], c.inv_t, two_temps);
      }
    }
  } else {
    __syncwarp();  // the staged row is visible to the whole warp
  }

  acc_t row_max[MAXH], log_sum_t[MAXH], log_sum_1[MAXH];
#pragma unroll
  for (int h = 0; h < MAXH; ++h) {
    if (h < H) {
      row_max[h] = st[h].max;
      log_sum_t[h] = row_log(st[h].sum_t);
      log_sum_1[h] = two_temps ? row_log(st[h].sum_1) : log_sum_t[h];
    }
  }

  // Pass 2: KL(p~_i || q~_j) for all pairs, with eps > 0 W_j = sum_k rho_jk P_jk, and the
  // shifted logit sums that label smoothing's CE term needs.
  acc_t kl[MAXH][MAXH];
  acc_t w_acc[MAXH], shifted[MAXH];
#pragma unroll
  for (int i = 0; i < MAXH; ++i) {
    w_acc[i] = 0;
    shifted[i] = 0;
#pragma unroll
    for (int j = 0; j < MAXH; ++j) kl[i][j] = 0;
  }
  for (int64_t k = lane; k < K; k += ROW_THREADS) {
    acc_t q[MAXH], lq[MAXH], pt[MAXH];
#pragma unroll
    for (int h = 0; h < MAXH; ++h) {
      if (h < H) {
        const acc_t v = cached ? cache[h * K + k] : load_logit<scalar_t, acc_t>(a, h, row, k);
        shifted[h] += v - row_max[h];
        const acc_t zs = (v - row_max[h]) * c.inv_t;
        q[h] = student_prob(zs, log_sum_t[h]);
        lq[h] = smooth ? student_log_prob<true>(q[h], zs, log_sum_t[h], c)
                       : student_log_prob<false>(q[h], zs, log_sum_t[h], c);
        pt[h] = smooth ? teacher_prob<true>(q[h], c) : teacher_prob<false>(q[h], c);
      }
    }
#pragma unroll
    for (int i = 0; i < MAXH; ++i) {
#pragma unroll
      for (int j = 0; j < MAXH; ++j) {
        if (i < H && j < H && i != j) kl[i][j] += pt[i] * (lq[i] - lq[j]);
      }
    }
    if (smooth) {
#pragma unroll
      for (int j = 0; j < MAXH; ++j) {
        if (j < H) {
          acc_t mix = 0;
#pragma unroll
          for (int i = 0; i < MAXH; ++i)
            if (i < H && i != j) mix += static_cast<acc_t>(s_w[i * H + j]) * pt[i];
          w_acc[j] += student_ratio<true>(q[j], c) * mix;
        }
      }
    }
  }
  // Row sums: warp trees, then (block rows) the warps in order; every thread gets W_j.
#pragma unroll
  for (int i = 0; i < MAXH; ++i) {
    if (i < H) {
      w_acc[i] = warp_sum(w_acc[i]);
      shifted[i] = warp_sum(shifted[i]);
#pragma unroll
      for (int j = 0; j < MAXH; ++j)
        if (j < H) kl[i][j] = warp_sum(kl[i][j]);
    }
  }
  if (kWarpsPerRow > 1) {
    if (lane % kWarp == 0) {
#pragma unroll
      for (int i = 0; i < MAXH; ++i) {
        if (i < H) {
          s_sums[row_in_block][warp][MAXH * MAXH + i] = w_acc[i];
          s_sums[row_in_block][warp][MAXH * MAXH + MAXH + i] = shifted[i];
#pragma unroll
          for (int j = 0; j < MAXH; ++j)
            if (j < H) s_sums[row_in_block][warp][i * MAXH + j] = kl[i][j];
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < MAXH; ++i) {
      if (i < H) {
        acc_t w = s_sums[row_in_block][0][MAXH * MAXH + i];
        for (int v = 1; v < kWarpsPerRow; ++v) w += s_sums[row_in_block][v][MAXH * MAXH + i];
        w_acc[i] = w;
        if (lane == 0) {
          acc_t d = s_sums[row_in_block][0][MAXH * MAXH + MAXH + i];
          for (int v = 1; v < kWarpsPerRow; ++v) d += s_sums[row_in_block][v][MAXH * MAXH + MAXH + i];
          shifted[i] = d;
#pragma unroll
          for (int j = 0; j < MAXH; ++j) {
            if (j < H) {
              acc_t s = s_sums[row_in_block][0][i * MAXH + j];
              for (int v = 1; v < kWarpsPerRow; ++v) s += s_sums[row_in_block][v][i * MAXH + j];
              kl[i][j] = s;
            }
          }
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < MAXH; ++i)
      if (i < H) w_acc[i] = __shfl_sync(0xffffffffu, w_acc[i], 0);
  }

  // Row stats: [ce (H), kl (H*H), correct (H)].
  if (lane == 0) {
    const int P = stats_size(H);
    acc_t* out = partial + row * P;
#pragma unroll
    for (int h = 0; h < MAXH; ++h) {
      if (h < H) {
        const acc_t zy = load_logit<scalar_t, acc_t>(a, h, row, y);
        out[h] = row_ce<acc_t>(log_sum_1[h], row_max[h] - zy, shifted[h] / static_cast<acc_t>(K),
                               c.smooth);
        out[H + H * H + h] = st[h].arg == y ? acc_t(1) : acc_t(0);
#pragma unroll
        for (int j = 0; j < MAXH; ++j)
          if (j < H) out[H + h * H + j] = h == j ? acc_t(0) : kl[h][j];
      }
    }
  }
  if (!compute_grad) return;

  // Pass 3: gradients, written once.
  acc_t w_sum[MAXH], ce_scale[MAXH];
#pragma unroll
  for (int j = 0; j < MAXH; ++j) {
    if (j < H) {
      ce_scale[j] = static_cast<acc_t>(s_w[MAXH * MAXH + j]) * c.inv_batch;
      acc_t w = 0;
#pragma unroll
      for (int i = 0; i < MAXH; ++i)
        if (i < H && i != j) w += static_cast<acc_t>(s_w[i * H + j]);
      w_sum[j] = smooth ? w_acc[j] : w;
    }
  }
  for (int64_t k = lane; k < K; k += ROW_THREADS) {
    acc_t q[MAXH], s[MAXH], pt[MAXH];
#pragma unroll
    for (int h = 0; h < MAXH; ++h) {
      if (h < H) {
        const acc_t v = cached ? cache[h * K + k] : load_logit<scalar_t, acc_t>(a, h, row, k);
        q[h] = student_prob((v - row_max[h]) * c.inv_t, log_sum_t[h]);
        s[h] = two_temps ? student_prob(v - row_max[h], log_sum_1[h]) : q[h];
        pt[h] = smooth ? teacher_prob<true>(q[h], c) : teacher_prob<false>(q[h], c);
      }
    }
#pragma unroll
    for (int j = 0; j < MAXH; ++j) {
      if (j < H) {
        acc_t mix = 0;
#pragma unroll
        for (int i = 0; i < MAXH; ++i)
          if (i < H && i != j) mix += static_cast<acc_t>(s_w[i * H + j]) * pt[i];
        const acc_t rho_p = smooth ? student_ratio<true>(q[j], c) * mix : mix;
        acc_t g = grad_elem<acc_t>(ce_scale[j], s[j], q[j], w_sum[j], rho_p, c);
        if (k == y) g += target_grad_fix<acc_t>(ce_scale[j], c);
        a.g[j][row * K + k] = static_cast<SavedGrad<scalar_t>>(g);
      }
    }
  }
}

// Fixed-order batch reduction of one stats entry per block (tree over a fixed thread layout).
template <typename acc_t>
__global__ void reduce_stats_kernel(const acc_t* __restrict__ partial, int64_t batch, int P,
                                    double* __restrict__ sums) {
  constexpr int kThreads = 256;
  __shared__ double s[kThreads];
  const int p = blockIdx.x;
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) acc += static_cast<double>(partial[b * P + p]);
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[p] = s[0];
}

// Batch means -> stats (float32) and the loss.
template <typename loss_t>
__global__ void finish_kernel(double* __restrict__ sums, const float* __restrict__ ce_w,
                              const float* __restrict__ kl_w, int H, int64_t batch, double alpha,
                              double temperature, float* __restrict__ stats, loss_t* __restrict__ loss) {
  const int P = stats_size(H);
  for (int p = 0; p < H + H * H; ++p) sums[p] /= static_cast<double>(batch);
  for (int p = 0; p < P; ++p) stats[p] = static_cast<float>(sums[p]);
  *loss = static_cast<loss_t>(combine_loss(sums, ce_w, kl_w, H, alpha, temperature));
}

template <typename scalar_t, typename acc_t, int MAXH, int ROW_THREADS>
void launch_rows(const HeadArgs<scalar_t>& a, const at::Tensor& target, const at::Tensor& ce_w,
                 const at::Tensor& kl_w, const RowConsts<acc_t>& c, int64_t batch, bool smooth,
                 bool two_temps, bool compute_grad, const at::Tensor& partial, cudaStream_t stream) {
  constexpr int kBlock = ROW_THREADS >= 128 ? ROW_THREADS : 128;
  constexpr int kRowsPerBlock = kBlock / ROW_THREADS;
  auto kernel = fused_rows_kernel<scalar_t, acc_t, MAXH, ROW_THREADS>;
  const size_t row_bytes = static_cast<size_t>(c.heads) * c.classes * sizeof(acc_t);
  const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  static const size_t static_smem = [&] {  // the kernel's own __shared__ arrays, once
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    return attr.sharedSizeBytes;
  }();
  const size_t dyn = row_bytes * kRowsPerBlock;
  const bool cached = row_bytes <= kMaxCacheBytes && static_smem + dyn <= static_cast<size_t>(optin);
  const size_t smem = cached ? dyn : 0;
  if (smem + static_smem > (48u << 10))
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  const int64_t blocks = (batch + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "fused_loss: batch too large for one launch");
  kernel<<<static_cast<unsigned>(blocks), kBlock, smem, stream>>>(
      a, target.data_ptr<int64_t>(), ce_w.data_ptr<float>(), kl_w.data_ptr<float>(), c, batch,
      smooth, two_temps, compute_grad, cached, partial.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int MAXH>
void launch_rows_for_k(const HeadArgs<scalar_t>& a, const at::Tensor& target, const at::Tensor& ce_w,
                       const at::Tensor& kl_w, const RowConsts<acc_t>& c, int64_t batch, bool smooth,
                       bool two_temps, bool compute_grad, const at::Tensor& partial,
                       cudaStream_t stream) {
  if (c.classes <= kSmallK) {
    launch_rows<scalar_t, acc_t, MAXH, kWarp>(a, target, ce_w, kl_w, c, batch, smooth, two_temps,
                                              compute_grad, partial, stream);
  } else {
    launch_rows<scalar_t, acc_t, MAXH, kLargeRowThreads>(a, target, ce_w, kl_w, c, batch, smooth,
                                                         two_temps, compute_grad, partial, stream);
  }
}

template <typename scalar_t, typename acc_t>
LossOutputs fused_loss_cuda_impl(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                                 const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                                 const CallShape& shape, double temperature, double alpha,
                                 double eps, double label_smoothing, bool compute_grad) {
  const int H = shape.heads;
  const int64_t B = shape.batch, K = shape.classes;
  const int P = stats_size(H);
  const RowConsts<acc_t> c = make_consts<acc_t>(shape, temperature, alpha, eps, label_smoothing);
  const at::Tensor ce_w = ce_weights.contiguous(), kl_w = kl_weights.contiguous();
  const at::Tensor tgt = target.contiguous();
  using grad_t = SavedGrad<scalar_t>;
  HeadArgs<scalar_t> a{};
  std::vector<at::Tensor> grads;
  const auto grad_options = logits[0].options().dtype(c10::CppTypeToScalarType<grad_t>::value);
  for (int h = 0; h < H; ++h) {
    a.x[h] = logits[h].data_ptr<scalar_t>();
    a.stride_row[h] = logits[h].stride(0);
    a.stride_col[h] = logits[h].stride(1);
    grads.push_back(compute_grad ? at::empty({B, K}, grad_options) : at::empty({0}, grad_options));
    a.g[h] = compute_grad ? grads.back().data_ptr<grad_t>() : nullptr;
  }
  const auto acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const auto opts = logits[0].options();
  at::Tensor partial = at::empty({B, P}, opts.dtype(acc_type));
  const bool smooth = eps > 0.0, two_temps = temperature != 1.0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if constexpr (std::is_same_v<acc_t, double>) {
    // float64 exists for gradient checks: one generic instantiation is enough.
    launch_rows<scalar_t, acc_t, kMaxHeads, kLargeRowThreads>(
        a, tgt, ce_w, kl_w, c, B, smooth, two_temps, compute_grad, partial, stream);
  } else if (H <= 4) {
    launch_rows_for_k<scalar_t, acc_t, 4>(a, tgt, ce_w, kl_w, c, B, smooth, two_temps,
                                          compute_grad, partial, stream);
  } else {
    launch_rows_for_k<scalar_t, acc_t, kMaxHeads>(a, tgt, ce_w, kl_w, c, B, smooth, two_temps,
                                                  compute_grad, partial, stream);
  }
  at::Tensor sums = at::empty({P}, opts.dtype(at::kDouble));
  reduce_stats_kernel<acc_t><<<P, 256, 0, stream>>>(partial.data_ptr<acc_t>(), B, P,
                                                    sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor stats = at::empty({P}, opts.dtype(at::kFloat));
  at::Tensor loss = at::empty({}, opts.dtype(acc_type));
  finish_kernel<acc_t><<<1, 1, 0, stream>>>(sums.data_ptr<double>(), ce_w.data_ptr<float>(),
                                            kl_w.data_ptr<float>(), H, B, alpha, temperature,
                                            stats.data_ptr<float>(), loss.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats, grads};
}

}  // namespace cuda_detail
}  // namespace dhm
