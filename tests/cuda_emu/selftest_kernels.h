// Kernels with one deliberate fault each (and a few correct ones), proving that the execution model
// catches what it claims to. In the kernels' namespace, so that `extern __shared__` names the same
// dynamic shared memory. Named selftest_*.
#pragma once

namespace dhm {
namespace cuda_detail {
// Fault: a barrier inside a divergent branch (two call sites).
__global__ void selftest_divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// Fault: a full-mask shuffle after one lane has exited.
__global__ void selftest_shuffle_exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<float>(threadIdx.x), 0);
}

// Fault: half a warp in a full-mask shuffle, the other half already at the next warp barrier.
__global__ void selftest_partial_warp_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  __syncwarp();
  out[threadIdx.x] = v;
}

// Fault: every thread writes one float past the dynamic shared memory it was launched with.
__global__ void selftest_shared_overrun(float* out, int floats) {
  extern __shared__ __align__(16) unsigned char s_dyn[];
  float* buf = reinterpret_cast<float*>(s_dyn);
  buf[threadIdx.x + 1] = 1.0f;  // thread blockDim.x - 1 writes buf[floats] when floats == blockDim.x
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x % floats];
}

// Correct, but launched with more than 48 KiB of dynamic shared memory: needs the attribute.
__global__ void selftest_big_shared(float* out) {
  extern __shared__ __align__(16) unsigned char s_dyn[];
  reinterpret_cast<float*>(s_dyn)[threadIdx.x] = 3.0f;
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<float*>(s_dyn)[(threadIdx.x + 1) % blockDim.x];
}

// Fault: the calling lane is not in its own mask.
__global__ void selftest_lane_outside_mask(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);
}

// Fault: a failing device-side assert.
__global__ void selftest_failing_assert(const int64_t* target, int64_t classes) {
  CUDA_KERNEL_ASSERT(target[threadIdx.x] < classes);
}

// Correct: every lane records the lane each shuffle variant reads (CUDA's semantics in the test).
__global__ void selftest_shuffle_sources(int* out, int mode, int arg, int width) {
  const int lane = static_cast<int>(threadIdx.x);
  int v = 0;
  switch (mode) {
    case 0: v = __shfl_sync(0xffffffffu, lane, arg, width); break;
    case 1: v = __shfl_up_sync(0xffffffffu, lane, static_cast<unsigned>(arg), width); break;
    case 2: v = __shfl_down_sync(0xffffffffu, lane, static_cast<unsigned>(arg), width); break;
    default: v = __shfl_xor_sync(0xffffffffu, lane, arg, width); break;
  }
  out[lane] = v;
}

// Correct: values of every type the fused kernels shuffle survive a shuffle bit for bit.
template <typename T>
__global__ void selftest_shuffle_bits(const T* in, T* out) {
  const int lane = static_cast<int>(threadIdx.x);
  out[lane] = __shfl_down_sync(0xffffffffu, in[lane], 1);
}

// Correct: a shared-memory reduction that is right only if the barriers hold (order-independent).
__global__ void selftest_block_sum(const float* in, float* out) {
  __shared__ float s[256];
  s[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

}  // namespace cuda_detail
}  // namespace dhm
