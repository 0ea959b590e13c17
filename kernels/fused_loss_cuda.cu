// CUDA entry of the fused mimicking loss: dtype dispatch and registration. The kernels are in
// fused_loss_cuda.cuh; float16 and bfloat16 are instantiated in their own files (compiled in parallel).
#include "fused_loss_cuda.cuh"

namespace dhm {
namespace cuda_detail {

// float32 and float64 are instantiated here, by the dispatch below.
extern template LossOutputs fused_loss_cuda_impl<at::Half, float>(
    const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const CallShape&, double, double, double, double, bool);
extern template LossOutputs fused_loss_cuda_impl<at::BFloat16, float>(
    const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const CallShape&, double, double, double, double, bool);

namespace {

LossOutputs fused_loss_cuda(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                            const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                            double temperature, double alpha, double eps, double label_smoothing,
                            bool compute_grad) {
  const CallShape shape =
      check_args(logits, target, ce_weights, kl_weights, temperature, eps, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits[0].device());
  switch (logits[0].scalar_type()) {
    case at::kFloat:
      return fused_loss_cuda_impl<float, float>(logits, target, ce_weights, kl_weights, shape,
                                                temperature, alpha, eps, label_smoothing,
                                                compute_grad);
    case at::kDouble:
      return fused_loss_cuda_impl<double, double>(logits, target, ce_weights, kl_weights, shape,
                                                  temperature, alpha, eps, label_smoothing,
                                                  compute_grad);
    case at::kHalf:
      return fused_loss_cuda_impl<at::Half, float>(logits, target, ce_weights, kl_weights, shape,
                                                   temperature, alpha, eps, label_smoothing,
                                                   compute_grad);
    case at::kBFloat16:
      return fused_loss_cuda_impl<at::BFloat16, float>(logits, target, ce_weights, kl_weights,
                                                       shape, temperature, alpha, eps,
                                                       label_smoothing, compute_grad);
    default:
      TORCH_CHECK_VALUE(false, "unsupported logits dtype ", logits[0].scalar_type());
  }
}

}  // namespace
}  // namespace cuda_detail
}  // namespace dhm

TORCH_LIBRARY_IMPL(dhm_fast, CUDA, m) { m.impl("fused_loss", &dhm::cuda_detail::fused_loss_cuda); }
