// The op's schema (namespace dhm_fast), argument checks shared by both devices, and the Python
// module stub whose import registers everything. Kernels: fused_loss_cpu.cpp, fused_loss_cuda.cu.
// Autograd and the fake (meta) implementation are registered in Python (dhm_fast/fused.py).
#include <Python.h>
#include <torch/library.h>

#include "fused_loss.h"

namespace dhm {

CallShape check_args(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                     const at::Tensor& ce_weights, const at::Tensor& kl_weights, double temperature,
                     double eps, double label_smoothing) {
  const int64_t heads = static_cast<int64_t>(logits.size());
  TORCH_CHECK_VALUE(heads >= 1 && heads <= kMaxHeads, "fused_loss takes 1 to ", kMaxHeads,
                    " heads of logits, got ", heads);
  const at::Tensor& first = logits[0];
  TORCH_CHECK_VALUE(first.dim() == 2, "logits must be 2-D [batch, classes], got shape ",
                    first.sizes());
  const auto st = first.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    "logits must be float32, float64, float16 or bfloat16, got ", st);
  for (int64_t h = 1; h < heads; ++h) {
    TORCH_CHECK_VALUE(logits[h].sizes() == first.sizes(), "logits of head ", h, " have shape ",
                      logits[h].sizes(), " but head 0 has ", first.sizes());
    TORCH_CHECK_VALUE(logits[h].scalar_type() == st, "logits of head ", h, " are ",
                      logits[h].scalar_type(), " but head 0 is ", st);
    TORCH_CHECK_VALUE(logits[h].device() == first.device(), "logits of head ", h, " are on ",
                      logits[h].device(), " but head 0 is on ", first.device());
  }
  const int64_t batch = first.size(0), classes = first.size(1);
  TORCH_CHECK_VALUE(batch >= 1 && classes >= 1, "logits need at least one row and one class, got ",
                    first.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == batch, "target must have shape [",
                    batch, "], got ", target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, "target must be int64, got ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == first.device(), "target is on ", target.device(),
                    " but the logits are on ", first.device());
  TORCH_CHECK_VALUE(ce_weights.numel() == heads && ce_weights.scalar_type() == at::kFloat &&
                        ce_weights.device() == first.device(),
                    "ce_weights must be ", heads, " float32 values on ", first.device());
  TORCH_CHECK_VALUE(kl_weights.numel() == heads * heads && kl_weights.scalar_type() == at::kFloat &&
                        kl_weights.device() == first.device(),
                    "kl_weights must be ", heads, "x", heads, " float32 values on ", first.device());
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "temperature must be positive and finite, got ", temperature);
  // A positive eps below 1e-30 would only add denormals (which the CPU's vectorised log skips).
  TORCH_CHECK_VALUE(eps == 0.0 || (eps >= 1e-30 && std::isfinite(eps)),
                    "eps must be 0 or between 1e-30 and inf, got ", eps);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  return CallShape{static_cast<int>(heads), batch, classes};
}

}  // namespace dhm

TORCH_LIBRARY(dhm_fast, m) {
  // The fake (meta) kernel and the autograd formula live in this Python module.
  m.set_python_module("dhm_fast.fused");
  m.def(
      "fused_loss(Tensor[] logits, Tensor target, Tensor ce_weights, Tensor kl_weights, "
      "float temperature, float alpha, float eps, float label_smoothing, bool compute_grad) "
      "-> (Tensor loss, Tensor stats, Tensor[] grads)");
}

// `import dhm_fast._C` runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "Native kernels of the fused mimicking loss", -1, nullptr};
  return PyModule_Create(&module_def);
}
