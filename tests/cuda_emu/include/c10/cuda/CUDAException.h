// Stands in for c10's header in the CUDA execution model (tests/cuda_emu): the same two checks.
#pragma once

#include "../../../emu_runtime.h"

#define C10_CUDA_CHECK(EXPR) ::dhm_emu::check((EXPR), __FILE__, __LINE__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
