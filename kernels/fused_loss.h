// Declarations shared by the op registration (fused_loss.cpp) and the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "dhm_row.h"

namespace dhm {

// (loss, stats, per-head gradients of the loss w.r.t. the logits, empty when not asked for)
using LossOutputs = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// The dtype of the gradient the forward kernels compute and autograd saves: float32 for float16
// logits (float16's range is too small for a gradient before GradScaler's loss scale applies, and
// the cast after scaling is in backward), the logits' dtype otherwise.
template <typename scalar_t>
using SavedGrad = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, float, scalar_t>;

// Shapes of a validated call.
struct CallShape {
  int heads;
  int64_t batch;
  int64_t classes;
};

// Checks every argument (one clear message per problem, raised as ValueError in Python).
CallShape check_args(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                     const at::Tensor& ce_weights, const at::Tensor& kl_weights, double temperature,
                     double eps, double label_smoothing);

template <typename acc_t>
RowConsts<acc_t> make_consts(const CallShape& s, double temperature, double alpha, double eps,
                             double label_smoothing) {
  RowConsts<acc_t> c;
  c.heads = s.heads;
  c.classes = s.classes;
  c.inv_t = static_cast<acc_t>(1.0 / temperature);
  c.eps = static_cast<acc_t>(eps);
  const double k_eps = static_cast<double>(s.classes) * eps;
  c.inv_norm = static_cast<acc_t>(1.0 / (1.0 + k_eps));
  c.log_norm = static_cast<acc_t>(std::log1p(k_eps));
  c.smooth = static_cast<acc_t>(label_smoothing);
  c.smooth_k = static_cast<acc_t>(label_smoothing / static_cast<double>(s.classes));
  c.inv_batch = static_cast<acc_t>(1.0 / static_cast<double>(s.batch));
  c.kl_scale = static_cast<acc_t>(alpha * temperature / static_cast<double>(s.batch));
  return c;
}

}  // namespace dhm
