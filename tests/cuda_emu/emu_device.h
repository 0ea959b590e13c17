// CUDA's device-side language for the execution model: included after every host header, right
// before the kernel sources, so that nothing else sees these macros.
#pragma once

#include "emu_runtime.h"

// The device code path of the shared headers (kernels/dhm_row.h: expf/logf, not the host polynomials).
#define __CUDA_ARCH__ 900

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// Block-scope thread_locals have static storage: one copy that all fibers (threads) of the block
// share, poisoned before every block. `extern __shared__` is the launch's dynamic shared memory.
#define __shared__ thread_local

#define threadIdx (::dhm_emu::self().tid)
#define blockIdx (::dhm_emu::state().block_idx)
#define blockDim (::dhm_emu::state().block)
#define gridDim (::dhm_emu::state().grid)
constexpr int warpSize = ::dhm_emu::kWarpSize;  // a built-in variable in CUDA, not a macro

#define __syncthreads() ::dhm_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::dhm_emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define DHM_EMU_WIDTH(w, ...) w
#define __shfl_sync(mask, var, lane, ...) \
  ::dhm_emu::shuffle(::dhm_emu::Op::kShfl, __FILE__, __LINE__, mask, var, lane, DHM_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __shfl_up_sync(mask, var, delta, ...) \
  ::dhm_emu::shuffle(::dhm_emu::Op::kShflUp, __FILE__, __LINE__, mask, var, delta, DHM_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __shfl_down_sync(mask, var, delta, ...) \
  ::dhm_emu::shuffle(::dhm_emu::Op::kShflDown, __FILE__, __LINE__, mask, var, delta, DHM_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::dhm_emu::shuffle(::dhm_emu::Op::kShflXor, __FILE__, __LINE__, mask, var, lane_mask, DHM_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(, ) 32))

// torch's host definition aborts the process; here a failed assert fails the launch.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) ::dhm_emu::kernel_assert(#cond, __FILE__, __LINE__); \
  } while (0)
