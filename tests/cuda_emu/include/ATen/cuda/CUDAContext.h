// Stands in for ATen's header in the CUDA execution model (tests/cuda_emu): the current stream and
// the emulated device's properties.
#pragma once

#include "../../../emu_runtime.h"

namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return &::dhm_emu::state().prop; }
}  // namespace cuda
}  // namespace at
