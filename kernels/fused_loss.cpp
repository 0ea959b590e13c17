// The op's schema (namespace dhm_fast), argument checks shared by both devices, the autograd
// formula, and the Python module `kernels._C` whose import registers everything. Kernels:
// fused_loss_cpu.cpp, fused_loss_cuda*.cu. The fake (meta) implementation is in kernels/__init__.py.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_variable.h>
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

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FusedLossSignature = LossOutputs(const std::vector<at::Tensor>&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, double, double, double,
                                       double, bool);

const c10::TypedOperatorHandle<FusedLossSignature>& fused_loss_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dhm_fast::fused_loss", "")
                             .typed<FusedLossSignature>();
  return op;
}

LossOutputs call_below_autograd(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                                const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                                double temperature, double alpha, double eps, double label_smoothing,
                                bool compute_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return fused_loss_handle().call(logits, target, ce_weights, kl_weights, temperature, alpha, eps,
                                  label_smoothing, compute_grad);
}

// True for a real tensor seen by eager autograd; false while torch.compile, opcheck or a
// functorch transform traces (values unreadable, or reading one would bake it into a graph).
bool is_eager_tensor(const at::Tensor& t) {
  const auto keys = t.key_set();
  return !c10::impl::TorchDispatchModeTLS::any_modes_set() &&
         !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Functionalize) &&
         !keys.has(c10::DispatchKey::FuncTorchBatched) &&
         !keys.has(c10::DispatchKey::FuncTorchGradWrapper);
}

// Whether a CPU scalar is exactly 1, read directly for float32/64 (item() is a dispatcher call: a
// measurable share of a small call's backward).
bool is_one(const at::Tensor& t) {
  if (t.numel() != 1) return false;
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>() == 1.0f;
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>() == 1.0;
  return t.item<double>() == 1.0;
}

// The gradient w.r.t. every head's logits is computed by the forward kernel and saved (float16
// logits: in float32, see saved_grad_type); backward only scales it by grad_output (skipped for the
// exact 1 that loss.backward() sends on the CPU) and casts it to the logits' dtype. Scaling before
// the cast keeps a GradScaler's loss scale from meeting float16's subnormal range.
class FusedLossFunction : public torch::autograd::Function<FusedLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList logits, const at::Tensor& target,
                               const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                               double temperature, double alpha, double eps, double label_smoothing,
                               bool compute_grad) {
    auto [loss, stats, grads] = call_below_autograd(logits.vec(), target, ce_weights, kl_weights,
                                                    temperature, alpha, eps, label_smoothing,
                                                    compute_grad);
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits[0].scalar_type());
    ctx->save_for_backward(grads);
    ctx->set_materialize_grads(false);  // no zero-filled [B, K] tensors for the other outputs
    variable_list out{loss, stats};
    out.insert(out.end(), grads.begin(), grads.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = ctx->get_saved_variables();
    const int64_t heads = static_cast<int64_t>(grads.size());
    variable_list result(heads + 8);  // logits..., then the 8 arguments without a gradient
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return result;
    TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
                "dhm_fast::fused_loss was called with compute_grad=False: no gradient was saved");
    const bool eager = is_eager_tensor(grad_loss);
    const bool unit = eager && grad_loss.is_cpu() && !grad_loss.requires_grad() && is_one(grad_loss);
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    for (int64_t h = 0; h < heads; ++h) {
      at::Tensor g = unit ? grads[h] : grads[h].mul(grad_loss);
      result[h] = g.scalar_type() == dtype ? g : g.to(dtype);
    }
    if (eager && at::GradMode::is_enabled()) {
      // create_graph=True: the saved gradients are constants here, so a second derivative through
      // them would be silently wrong. Any use of one fails loudly instead.
      variable_list inputs;
      for (int64_t h = 0; h < heads; ++h) inputs.push_back(result[h].detach().requires_grad_(true));
      auto fail = std::make_shared<torch::autograd::DelayedError>(
          "dhm_fast::fused_loss is not twice differentiable", heads);
      variable_list wrapped = fail->apply(std::move(inputs));
      for (int64_t h = 0; h < heads; ++h) result[h] = wrapped[h];
    }
    return result;
  }
};

LossOutputs fused_loss_autograd(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                                const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                                double temperature, double alpha, double eps, double label_smoothing,
                                bool compute_grad) {
  variable_list out = FusedLossFunction::apply(at::TensorList(logits), target, ce_weights, kl_weights,
                                               temperature, alpha, eps, label_smoothing, compute_grad);
  return {out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.end())};
}

}  // namespace
}  // namespace dhm

TORCH_LIBRARY(dhm_fast, m) {
  // The fake (meta) kernels live in this Python module.
  m.set_python_module("kernels");
  m.def(
      "fused_loss(Tensor[] logits, Tensor target, Tensor ce_weights, Tensor kl_weights, "
      "float temperature, float alpha, float eps, float label_smoothing, bool compute_grad) "
      "-> (Tensor loss, Tensor stats, Tensor[] grads)");
  // The in-memory loader's crop + normalise (kernels/crop_normalize_cpu.cpp). CPU only, and eager
  // only (no fake kernel): on a GPU the loader's torch formulation is fast already.
  m.def(
      "crop_normalize(Tensor images, Tensor source, Tensor offsets, int height, int width, Tensor table, "
      "bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(dhm_fast, Autograd, m) { m.impl("fused_loss", &dhm::fused_loss_autograd); }

// What the build put in: setup.py passes the CUDA targets (cubins sm_XY, PTX compute_XY) as
// -DDHM_CUDA_TARGETS=sm_75,sm_80,...; -fopenmp defines _OPENMP.
#define DHM_STRINGIFY_(...) #__VA_ARGS__
#define DHM_STRINGIFY(...) DHM_STRINGIFY_(__VA_ARGS__)
#ifdef DHM_CUDA_TARGETS
static const char* const kCudaTargets = DHM_STRINGIFY(DHM_CUDA_TARGETS);
#else
static const char* const kCudaTargets = "";
#endif
#ifdef _OPENMP
static const bool kOpenmp = true;
#else
static const bool kOpenmp = false;
#endif

static PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:O}", "cuda_targets", kCudaTargets, "openmp", kOpenmp ? Py_True : Py_False);
}

// fused_loss_eager(logits, target, ce_weights, kl_weights, temperature, alpha, eps, label_smoothing,
// compute_grad) -> (loss, stats), or NotImplemented. The op through the dispatcher (autograd
// included) without torch.ops' generic argument parsing, and without handing the per-head gradients
// (kept for backward) to Python: at small shapes both were a measurable share of a call. Only for
// plain tensors with no __torch_function__ mode active; anything else gets NotImplemented, and the
// caller uses torch.ops (as it does under torch.compile).
static PyObject* fused_loss_eager(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *seq, *target, *ce_w, *kl_w;
  double temperature, alpha, eps, label_smoothing;
  int compute_grad;
  if (!PyArg_ParseTuple(args, "OOOOddddp", &seq, &target, &ce_w, &kl_w, &temperature, &alpha, &eps,
                        &label_smoothing, &compute_grad))
    return nullptr;
  const bool plain = (PyList_Check(seq) || PyTuple_Check(seq)) && THPVariable_CheckExact(target) &&
                     THPVariable_CheckExact(ce_w) && THPVariable_CheckExact(kl_w) &&
                     !at::impl::torch_function_mode_enabled();
  if (!plain) Py_RETURN_NOTIMPLEMENTED;
  const Py_ssize_t heads = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<at::Tensor> logits;
  logits.reserve(heads);
  for (Py_ssize_t h = 0; h < heads; ++h) {
    if (!THPVariable_CheckExact(items[h])) Py_RETURN_NOTIMPLEMENTED;
    logits.push_back(THPVariable_Unpack(items[h]));
  }
  dhm::LossOutputs out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does: other Python threads (loaders) run on
    out = dhm::fused_loss_handle().call(logits, THPVariable_Unpack(target), THPVariable_Unpack(ce_w),
                                        THPVariable_Unpack(kl_w), temperature, alpha, eps,
                                        label_smoothing, compute_grad != 0);
  }
  return Py_BuildValue("(NN)", THPVariable_Wrap(std::get<0>(out)),
                       THPVariable_Wrap(std::get<1>(out)));
  END_HANDLE_TH_ERRORS
}

static PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "{'cuda_targets': 'sm_80,...,compute_90' (empty without CUDA), 'openmp': bool}"},
    {"fused_loss_eager", fused_loss_eager, METH_VARARGS,
     "fused_loss for plain eager tensors: (loss, stats), or NotImplemented (then use torch.ops)"},
    {nullptr, nullptr, 0, nullptr}};

// `import kernels._C` runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "kernels._C",
                                   "Native kernels of the fused mimicking loss and the loaders", -1, kMethods};
  return PyModule_Create(&module_def);
}
