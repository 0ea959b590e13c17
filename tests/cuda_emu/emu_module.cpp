// The CUDA execution model's Python module: the fused loss's CUDA kernels (kernels/fused_loss_cuda.cuh,
// its launch sites rewritten by build.py) and the self-test kernels, run on the CPU under the
// checking runtime of emu_runtime.h. Tensors are CPU tensors; "device" memory is host memory.
#include <torch/extension.h>

#include "emu_device.h"
#include "fused_loss_cuda_emu.cuh"
#include "selftest_kernels.h"

namespace dhm {
namespace cuda_detail {
// Every kernel's `extern __shared__` array, with room for the canary after the largest launch.
thread_local __attribute__((aligned(16))) unsigned char s_dyn[dhm_emu::kDynCapacity + dhm_emu::kCanaryBytes];
}  // namespace cuda_detail
}  // namespace dhm

unsigned char* dhm_emu::dynamic_shared_memory() { return dhm::cuda_detail::s_dyn; }

namespace {

using dhm_emu::LaunchConfig;

// An emulated GPU: its opt-in shared memory per block (T4 64 KiB, A100 163 KiB, H100 227 KiB), and
// the order in which fibers (and blocks) run. Forgets every cudaFuncSetAttribute, as a new process would.
void configure(int64_t optin_bytes, const std::string& order, int64_t seed) {
  TORCH_CHECK(optin_bytes >= 0 && static_cast<size_t>(optin_bytes) <= dhm_emu::kDynCapacity,
              "optin_bytes out of range");
  auto& s = dhm_emu::state();
  cudaDeviceProp p{};
  std::snprintf(p.name, sizeof(p.name), "cuda_emu (%lld B opt-in shared memory)", static_cast<long long>(optin_bytes));
  p.sharedMemPerBlock = dhm_emu::kDefaultSharedLimit;
  p.sharedMemPerBlockOptin = static_cast<size_t>(optin_bytes);
  p.maxThreadsPerBlock = 1024;
  p.maxThreadsDim[0] = 1024;
  p.maxThreadsDim[1] = 1024;
  p.maxThreadsDim[2] = 64;
  p.maxGridSize[0] = 2147483647;
  p.maxGridSize[1] = 65535;
  p.maxGridSize[2] = 65535;
  p.warpSize = dhm_emu::kWarpSize;
  s.prop = p;
  if (order == "forward") s.order = dhm_emu::Order::kForward;
  else if (order == "reverse") s.order = dhm_emu::Order::kReverse;
  else if (order == "random") s.order = dhm_emu::Order::kRandom;
  else TORCH_CHECK(false, "order must be forward, reverse or random, got ", order);
  s.seed = static_cast<uint64_t>(seed);
  s.max_dynamic_smem.clear();
  s.last_error = cudaSuccess;
  s.last_message.clear();
}

// The launches since the last call: (kernel, grid.x, block.x, dynamic bytes, static bytes).
std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t>> take_launches() {
  std::vector<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t>> out;
  for (const auto& l : dhm_emu::state().launches)
    out.emplace_back(dhm_emu::demangled(l.kernel), l.grid.x, l.block.x, static_cast<int64_t>(l.dynamic_smem),
                     static_cast<int64_t>(l.static_smem));
  dhm_emu::state().launches.clear();
  return out;
}

// dhm_fadhm::cuda_detail::selftest_fused_loss's CUDA implementation, on CPU tensors.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> fused_loss(
    const std::vector<at::Tensor>& logits, const at::Tensor& target, const at::Tensor& ce_weights,
    const at::Tensor& kl_weights, double temperature, double alpha, double eps, double label_smoothing,
    bool compute_grad) {
  TORCH_CHECK(!logits.empty() && logits.size() <= static_cast<size_t>(dhm::kMaxHeads), "1 to 8 heads");
  const dhm::CallShape shape{static_cast<int>(logits.size()), logits[0].size(0), logits[0].size(1)};
  using namespace dhm::cuda_detail;
  switch (logits[0].scalar_type()) {
    case at::kFloat:
      return fused_loss_cuda_impl<float, float>(logits, target, ce_weights, kl_weights, shape, temperature,
                                                alpha, eps, label_smoothing, compute_grad);
    case at::kDouble:
      return fused_loss_cuda_impl<double, double>(logits, target, ce_weights, kl_weights, shape, temperature,
                                                  alpha, eps, label_smoothing, compute_grad);
    case at::kHalf:
      return fused_loss_cuda_impl<at::Half, float>(logits, target, ce_weights, kl_weights, shape, temperature,
                                                   alpha, eps, label_smoothing, compute_grad);
    case at::kBFloat16:
      return fused_loss_cuda_impl<at::BFloat16, float>(logits, target, ce_weights, kl_weights, shape,
                                                       temperature, alpha, eps, label_smoothing, compute_grad);
    default:
      TORCH_CHECK(false, "unsupported logits dtype ", logits[0].scalar_type());
  }
}

// One self-test kernel, launched and checked the way the fused op's launches are.
at::Tensor selftest(const std::string& name, int64_t a, int64_t b, int64_t c) {
  at::Tensor out = at::zeros({256}, at::kFloat);
  float* o = out.data_ptr<float>();
  if (name == "divergent_barrier") {
    dhm_emu::launch(dhm::cuda_detail::selftest_divergent_barrier, LaunchConfig(1, 32), o);
  } else if (name == "shuffle_exited_lane") {
    dhm_emu::launch(dhm::cuda_detail::selftest_shuffle_exited_lane, LaunchConfig(1, 32), o);
  } else if (name == "partial_warp_shuffle") {
    dhm_emu::launch(dhm::cuda_detail::selftest_partial_warp_shuffle, LaunchConfig(1, 32), o);
  } else if (name == "shared_overrun") {  // a = threads = floats of dynamic shared memory
    dhm_emu::launch(dhm::cuda_detail::selftest_shared_overrun, LaunchConfig(1, a, a * sizeof(float)), o, static_cast<int>(a));
  } else if (name == "big_shared") {  // a = dynamic bytes, b = set the attribute first, c = threads
    if (b) C10_CUDA_CHECK(cudaFuncSetAttribute(dhm::cuda_detail::selftest_big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(a)));
    dhm_emu::launch(dhm::cuda_detail::selftest_big_shared, LaunchConfig(1, c, a), o);
  } else if (name == "lane_outside_mask") {
    dhm_emu::launch(dhm::cuda_detail::selftest_lane_outside_mask, LaunchConfig(1, 32), o);
  } else if (name == "failing_assert") {  // thread 3's target is a, with b classes
    at::Tensor target = at::zeros({32}, at::kLong);
    target[3] = a;
    dhm_emu::launch(dhm::cuda_detail::selftest_failing_assert, LaunchConfig(1, 32), target.data_ptr<int64_t>(), b);
  } else if (name == "threads") {  // a block of a threads (b = grid.y)
    dhm_emu::launch(dhm::cuda_detail::selftest_big_shared, LaunchConfig(dim3(1, static_cast<unsigned>(b)), a, 0), o);
  } else if (name == "shuffle_sources") {  // a = mode, b = arg, c = width
    at::Tensor src = at::zeros({32}, at::kInt);
    dhm_emu::launch(dhm::cuda_detail::selftest_shuffle_sources, LaunchConfig(1, 32), src.data_ptr<int>(), static_cast<int>(a),
                    static_cast<int>(b), static_cast<int>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return src;
  } else {
    TORCH_CHECK(false, "no self-test kernel named ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T>
at::Tensor shuffle_bits_typed(const at::Tensor& in) {
  at::Tensor out = at::empty_like(in);
  dhm_emu::launch(dhm::cuda_detail::selftest_shuffle_bits<T>, LaunchConfig(1, 32), reinterpret_cast<const T*>(in.data_ptr()),
                  reinterpret_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// __shfl_down_sync(full, in[lane], 1) of 32 values: float32, float64 or int64 (as `long long`).
at::Tensor shuffle_bits(const at::Tensor& in) {
  TORCH_CHECK(in.numel() == 32 && in.is_contiguous(), "32 contiguous values");
  switch (in.scalar_type()) {
    case at::kFloat: return shuffle_bits_typed<float>(in);
    case at::kDouble: return shuffle_bits_typed<double>(in);
    case at::kLong: return shuffle_bits_typed<long long>(in);
    case at::kInt: return shuffle_bits_typed<int>(in);
    default: TORCH_CHECK(false, "no shuffle of ", in.scalar_type());
  }
}

// A shared-memory tree sum per block of 256 (correct only if every barrier holds).
at::Tensor block_sum(const at::Tensor& in) {
  TORCH_CHECK(in.numel() % 256 == 0 && in.scalar_type() == at::kFloat, "float32, a multiple of 256");
  const int64_t blocks = in.numel() / 256;
  at::Tensor out = at::empty({blocks}, at::kFloat);
  dhm_emu::launch(dhm::cuda_detail::selftest_block_sum, LaunchConfig(static_cast<unsigned>(blocks), 256), in.data_ptr<float>(),
                  out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// dhm_row.h's row_exp/row_log on float32 values, as the kernels here call them (its device path).
at::Tensor row_math(const at::Tensor& x, bool log) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "contiguous float32");
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) o[i] = log ? dhm::row_log(in[i]) : dhm::row_exp(in[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The fused loss's CUDA kernels under a checking CUDA execution model, on the CPU.";
  configure(232448, "forward", 0);  // an H100 until told otherwise
  m.def("configure", &configure, "emulated opt-in shared memory per block, fiber order, seed");
  m.def("take_launches", &take_launches, "the launches since the last call");
  m.def("fused_loss", &fused_loss, "fused_loss_cuda_impl on CPU tensors");
  m.def("selftest", &selftest, "run a self-test kernel", py::arg("name"), py::arg("a") = 0, py::arg("b") = 0,
        py::arg("c") = 0);
  m.def("shuffle_bits", &shuffle_bits, "__shfl_down_sync(full, v, 1) of 32 values");
  m.def("row_math", &row_math, "dhm_row.h's row_exp (log=False) or row_log (log=True) on float32");
  m.def("block_sum", &block_sum, "shared-memory tree sum per block of 256");
}
