// at::Half instantiation of the CUDA kernels (its own file so that nvcc compiles dtypes in parallel).
#include "fused_loss_cuda.cuh"

namespace dhm {
namespace cuda_detail {

template LossOutputs fused_loss_cuda_impl<at::Half, float>(const std::vector<at::Tensor>&,
                                                      const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const CallShape&, double,
                                                      double, double, double, bool);

}  // namespace cuda_detail
}  // namespace dhm
