// CPU kernel of the fused mimicking loss: rows in parallel (at::parallel_for), each row's work in
// short loops over the classes that the compiler vectorises (`omp simd`, built with -fopenmp-simd),
// compiled for several x86 levels and picked at load time (GCC target_clones).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <memory>

#include "fused_loss.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DHM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DHM_CLONES
#endif

namespace dhm {
namespace {

// log of a softmax denominator (>= 1, or NaN from NaN logits, which must stay NaN): the inline
// polynomial log instead of a libm call, which was ~4% of a row at K = 100.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t sum_log(acc_t x) {
  return x >= acc_t(1) && x <= std::numeric_limits<acc_t>::max() ? row_log(x) : std::log(x);
}

// Everything one row needs besides its logits.
template <typename acc_t>
struct RowJob {
  const RowConsts<acc_t>* c;
  const float* ce_w;  // [H]
  const float* kl_w;  // [H, H], teacher row, student column
  int64_t kpad;       // stride between the per-head scratch arrays (K rounded up to 16)
  int64_t n;          // classes the loops run over: K, or kpad for padded rows
  acc_t uniform_w;    // w when every head teaches every other with weight w (DHM's default), else 0
};

// One row: per-head CE and softmaxes, all pairwise KL terms, and (when g != nullptr) the gradient
// of the row's share of the loss w.r.t. every head's logits. `out` gets the row's stats
// [ce (H), kl (H*H), correct (H)]; `work` holds row_work_size(H, kpad, ...) values.
// The loops run over job.n classes: K, or (for small K) kpad, a multiple of 16, with z = -inf in
// the padding, so that they run whole vectors with no scalar remainder (a quarter of the time at
// K = 100). The padding gets q = 0, and log q~ and p~ are set to 0 there: it adds to no sum.
template <typename acc_t, bool kSmooth, bool kTwoTemps>
inline __attribute__((always_inline)) void compute_row(const RowJob<acc_t>& job,
                                                       const acc_t* const* z, acc_t* const* g,
                                                       int64_t y, acc_t* out, acc_t* work) {
  const RowConsts<acc_t>& c = *job.c;
  const int heads = c.heads;
  const int64_t K = c.classes, kpad = job.kpad, n = job.n;
  acc_t* next = work;
  const auto take = [&](int64_t n) {
    acc_t* p = next;
    next += n;
    return p;
  };
  acc_t* q = take(heads * kpad);                       // softmax(z / T), per head
  acc_t* lq = take(heads * kpad);                      // log q~, per head
  acc_t* pt = kSmooth ? take(heads * kpad) : q;        // p~ (teacher), per head; eps = 0: q
  acc_t* s = kTwoTemps ? take(heads * kpad) : q;       // softmax(z), per head; T = 1: q
  acc_t* mix = take(kpad);                             // one student's teacher mixture
  const bool uniform = job.uniform_w != acc_t(0) && heads > 2;
  acc_t* total = uniform ? take(kpad) : nullptr;       // sum_i p~_i over every head
  acc_t* ce = out;
  acc_t* kl = out + heads;
  acc_t* correct = out + heads + heads * heads;
  const acc_t inv_t = c.inv_t;

  for (int h = 0; h < heads; ++h) {
    const acc_t* zh = z[h];
    acc_t* qh = q + h * kpad;
    acc_t* sh = s + h * kpad;
    acc_t* lqh = lq + h * kpad;
    acc_t* pth = pt + h * kpad;
    acc_t m = zh[0];
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < n; ++k) m = zh[k] > m ? zh[k] : m;
    acc_t shifted_sum = 0;  // sum_k (z_k - max), for label smoothing
    if (c.smooth != acc_t(0)) {
#pragma omp simd reduction(+ : shifted_sum)
      for (int64_t k = 0; k < K; ++k) shifted_sum += zh[k] - m;
    }
    // Correct iff the target holds the first maximum (torch.argmax's tie rule).
    const acc_t zy = zh[y];
    int earlier_max = 0;
    if (zy == m) {
#pragma omp simd reduction(| : earlier_max)
      for (int64_t k = 0; k < y; ++k) earlier_max |= zh[k] == m;
    }
    const bool hit = zy == m && earlier_max == 0;
    correct[h] = hit ? acc_t(1) : acc_t(0);

    acc_t sum_t = 0;
#pragma omp simd reduction(+ : sum_t)
    for (int64_t k = 0; k < n; ++k) {
      const acc_t e = row_exp((zh[k] - m) * inv_t);
      qh[k] = e;
      sum_t += e;
    }
    acc_t sum_1 = sum_t;
    if (kTwoTemps) {
      sum_1 = 0;
#pragma omp simd reduction(+ : sum_1)
      for (int64_t k = 0; k < n; ++k) {
        const acc_t e = row_exp(zh[k] - m);
        sh[k] = e;
        sum_1 += e;
      }
      const acc_t inv_1 = acc_t(1) / sum_1;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) sh[k] *= inv_1;
    }
    ce[h] = row_ce<acc_t>(sum_log(sum_1), m - zy, shifted_sum / static_cast<acc_t>(K), c.smooth);
    const acc_t log_sum_t = sum_log(sum_t), inv_sum_t = acc_t(1) / sum_t;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const acc_t qk = qh[k] * inv_sum_t;
      qh[k] = qk;
      lqh[k] = student_log_prob<kSmooth>(qk, (zh[k] - m) * inv_t, log_sum_t, c);
      if (kSmooth) pth[k] = teacher_prob<kSmooth>(qk, c);
    }
    for (int64_t k = K; k < n; ++k) {
      lqh[k] = 0;
      pth[k] = 0;
    }
  }

  // KL(p~_i || q~_j) = sum_k p~_ik (log q~_ik - log q~_jk), summed directly (no cancellation
  // between two large cross-entropies when the heads agree).
  // Two students per pass over the teacher's arrays.
  for (int i = 0; i < heads; ++i) {
    const acc_t* pti = pt + i * kpad;
    const acc_t* lqi = lq + i * kpad;
    kl[i * heads + i] = 0;
    int students[kMaxHeads];
    int n_students = 0;
    for (int j = 0; j < heads; ++j)
      if (j != i) students[n_students++] = j;
    int t = 0;
    for (; t + 1 < n_students; t += 2) {
      const acc_t* lqa = lq + students[t] * kpad;
      const acc_t* lqb = lq + students[t + 1] * kpad;
      acc_t acc_a = 0, acc_b = 0;
#pragma omp simd reduction(+ : acc_a, acc_b)
      for (int64_t k = 0; k < n; ++k) {
        acc_a += pti[k] * (lqi[k] - lqa[k]);
        acc_b += pti[k] * (lqi[k] - lqb[k]);
      }
      kl[i * heads + students[t]] = acc_a;
      kl[i * heads + students[t + 1]] = acc_b;
    }
    if (t < n_students) {
      const acc_t* lqj = lq + students[t] * kpad;
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) acc += pti[k] * (lqi[k] - lqj[k]);
      kl[i * heads + students[t]] = acc;
    }
  }
  if (g == nullptr) return;

  if (uniform) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) total[k] = pt[k] + pt[kpad + k];
    for (int h = 2; h < heads; ++h) {
      const acc_t* pth = pt + h * kpad;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) total[k] += pth[k];
    }
  }

  for (int j = 0; j < heads; ++j) {
    acc_t* gj = g[j];
    const acc_t* qj = q + j * kpad;
    const acc_t* sj = s + j * kpad;
    const acc_t ce_scale = static_cast<acc_t>(job.ce_w[j]) * c.inv_batch;
    // mix becomes rho_j * P_j, P_j = sum_i w_ij p~_i (this student's teacher mixture), and w_j its
    // class sum W_j; with eps = 0, rho = 1 and W_j = sum_i w_ij.
    acc_t w_j = 0;
    int n_teachers = 0;
    if (uniform) {
      // P_j = w (S - p~_j): one pass instead of one per teacher.
      const acc_t w = job.uniform_w;
      const acc_t* ptj = pt + j * kpad;
      n_teachers = heads - 1;
#pragma omp simd reduction(+ : w_j)
      for (int64_t k = 0; k < n; ++k) {
        const acc_t rp = student_ratio<kSmooth>(qj[k], c) * (w * (total[k] - ptj[k]));
        mix[k] = rp;
        w_j += rp;
      }
      if (!kSmooth) w_j = w * static_cast<acc_t>(n_teachers);
    } else {
      // The teachers with non-zero weights: all but the last summed into mix, the last added in the
      // pass that applies rho.
      int teachers[kMaxHeads];
      acc_t w_sum = 0;
      for (int i = 0; i < heads; ++i) {
        const acc_t w = static_cast<acc_t>(job.kl_w[i * heads + j]);
        if (i == j || w == acc_t(0)) continue;
        teachers[n_teachers++] = i;
        w_sum += w;
      }
      for (int t = 0; t + 1 < n_teachers; ++t) {
        const int i = teachers[t];
        const acc_t w = static_cast<acc_t>(job.kl_w[i * heads + j]);
        const acc_t* pti = pt + i * kpad;
        if (t == 0) {
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) mix[k] = w * pti[k];
        } else {
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) mix[k] += w * pti[k];
        }
      }
      if (n_teachers > 0) {
        const int last = teachers[n_teachers - 1];
        const acc_t w_last = static_cast<acc_t>(job.kl_w[last * heads + j]);
        const acc_t* pt_last = pt + last * kpad;
        if (n_teachers > 1) {
#pragma omp simd reduction(+ : w_j)
          for (int64_t k = 0; k < n; ++k) {
            const acc_t rp = student_ratio<kSmooth>(qj[k], c) * (mix[k] + w_last * pt_last[k]);
            mix[k] = rp;
            w_j += rp;
          }
        } else {
#pragma omp simd reduction(+ : w_j)
          for (int64_t k = 0; k < n; ++k) {
            const acc_t rp = student_ratio<kSmooth>(qj[k], c) * (w_last * pt_last[k]);
            mix[k] = rp;
            w_j += rp;
          }
        }
        if (!kSmooth) w_j = w_sum;
      }
    }
    if (n_teachers == 0) {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) gj[k] = grad_elem<acc_t>(ce_scale, sj[k], 0, 0, 0, c);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) gj[k] = grad_elem<acc_t>(ce_scale, sj[k], qj[k], w_j, mix[k], c);
    }
    gj[y] += target_grad_fix<acc_t>(ce_scale, c);
  }
}

// Scratch values compute_row needs per row.
inline int64_t row_work_size(int heads, int64_t kpad, bool smooth, bool two_temps) {
  return (2 + (smooth ? 1 : 0) + (two_temps ? 1 : 0)) * heads * kpad + 2 * kpad;
}

// w when every off-diagonal KL weight is the same non-zero w (all heads teach all others), else 0.
template <typename acc_t>
acc_t uniform_teacher_weight(const float* kl_w, int heads) {
  const float w = heads > 1 ? kl_w[1] : 0.0f;
  for (int i = 0; i < heads; ++i)
    for (int j = 0; j < heads; ++j)
      if (i != j && kl_w[i * heads + j] != w) return acc_t(0);
  return static_cast<acc_t>(w);
}

// float32 math: one non-template entry per ISA clone, the variants inlined into each.
DHM_CLONES void row_f32(const RowJob<float>& job, bool smooth, bool two_temps, const float* const* z,
                        float* const* g, int64_t y, float* out, float* work) {
  if (smooth) {
    if (two_temps) compute_row<float, true, true>(job, z, g, y, out, work);
    else compute_row<float, true, false>(job, z, g, y, out, work);
  } else {
    if (two_temps) compute_row<float, false, true>(job, z, g, y, out, work);
    else compute_row<float, false, false>(job, z, g, y, out, work);
  }
}

// float64 (gradcheck and tests): exact library exp/log, no speed goal.
void row_f64(const RowJob<double>& job, bool smooth, bool two_temps, const double* const* z,
             double* const* g, int64_t y, double* out, double* work) {
  if (smooth) {
    if (two_temps) compute_row<double, true, true>(job, z, g, y, out, work);
    else compute_row<double, true, false>(job, z, g, y, out, work);
  } else {
    if (two_temps) compute_row<double, false, true>(job, z, g, y, out, work);
    else compute_row<double, false, false>(job, z, g, y, out, work);
  }
}

inline void row_dispatch(const RowJob<float>& job, bool smooth, bool two, const float* const* z,
                         float* const* g, int64_t y, float* out, float* work) {
  row_f32(job, smooth, two, z, g, y, out, work);
}
inline void row_dispatch(const RowJob<double>& job, bool smooth, bool two, const double* const* z,
                         double* const* g, int64_t y, double* out, double* work) {
  row_f64(job, smooth, two, z, g, y, out, work);
}

template <typename scalar_t, typename acc_t>
LossOutputs fused_loss_cpu_impl(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                                const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                                const CallShape& shape, double temperature, double alpha, double eps,
                                double label_smoothing, bool compute_grad) {
  using grad_t = SavedGrad<scalar_t>;
  const int heads = shape.heads;
  const int64_t B = shape.batch, K = shape.classes;
  const int P = stats_size(heads);
  const RowConsts<acc_t> consts = make_consts<acc_t>(shape, temperature, alpha, eps, label_smoothing);
  const at::Tensor ce_w = ce_weights.contiguous(), kl_w = kl_weights.contiguous();
  const int64_t kpad = (K + 15) / 16 * 16;
  const bool smooth = eps > 0.0, two_temps = temperature != 1.0;

  const at::Tensor tgt = target.contiguous();
  const int64_t* y = tgt.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(y[b] >= 0 && y[b] < K, "target ", y[b], " at row ", b,
                      " is outside the class range [0, ", K, ")");

  std::vector<const scalar_t*> x(heads);
  std::vector<int64_t> stride_row(heads), stride_col(heads);
  for (int h = 0; h < heads; ++h) {
    x[h] = logits[h].data_ptr<scalar_t>();
    stride_row[h] = logits[h].stride(0);
    stride_col[h] = logits[h].stride(1);
  }
  std::vector<at::Tensor> grads;
  std::vector<grad_t*> gx(heads, nullptr);
  const auto grad_options = logits[0].options().dtype(c10::CppTypeToScalarType<grad_t>::value);
  for (int h = 0; h < heads; ++h) {
    grads.push_back(compute_grad ? at::empty({B, K}, grad_options) : at::empty({0}, grad_options));
    if (compute_grad) gx[h] = grads.back().data_ptr<grad_t>();
  }

  // Rows are read in place when they are float32/64 with unit stride and the remainder loops are
  // cheap (K >= 512 or a multiple of 16). Otherwise they are copied in (converted, strides resolved,
  // padded to kpad) and the gradients copied out: two cheap passes.
  bool direct = std::is_same_v<scalar_t, acc_t> && (K >= 512 || K % 16 == 0);
  for (int h = 0; h < heads; ++h) direct = direct && stride_col[h] == 1;
  const RowJob<acc_t> job{&consts, ce_w.data_ptr<float>(), kl_w.data_ptr<float>(), kpad,
                          direct ? K : kpad, uniform_teacher_weight<acc_t>(kl_w.data_ptr<float>(), heads)};
  const int64_t row_work = row_work_size(heads, kpad, smooth, two_temps);
  const int64_t work_size = row_work + (direct ? 0 : heads * kpad * (compute_grad ? 2 : 1));
  std::vector<acc_t> partial(static_cast<size_t>(B) * P);
  // At least ~64k logits per task: smaller tasks cost more in thread wake-ups than they save.
  const int64_t grain = std::max<int64_t>(1, 65536 / (heads * K));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> work(new acc_t[work_size]);
    acc_t* in_buf = work.get() + row_work;
    acc_t* out_buf = in_buf + heads * kpad;
    const acc_t* zrow[kMaxHeads];
    acc_t* grow[kMaxHeads];
    if (!direct) {
      for (int h = 0; h < heads; ++h) {
        acc_t* dst = in_buf + h * kpad;
        for (int64_t k = K; k < kpad; ++k) dst[k] = -std::numeric_limits<acc_t>::infinity();
        zrow[h] = dst;
        grow[h] = out_buf + h * kpad;
      }
    }
    for (int64_t b = begin; b < end; ++b) {
      for (int h = 0; h < heads; ++h) {
        const scalar_t* src = x[h] + b * stride_row[h];
        if (direct) {
          zrow[h] = reinterpret_cast<const acc_t*>(src);
          if (compute_grad) grow[h] = reinterpret_cast<acc_t*>(gx[h] + b * K);
          continue;
        }
        acc_t* dst = in_buf + h * kpad;
        const int64_t sc = stride_col[h];
        if (sc == 1) {
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k]);
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k * sc]);
        }
      }
      row_dispatch(job, smooth, two_temps, zrow, compute_grad ? grow : nullptr, y[b],
                   partial.data() + b * P, work.get());
      if (compute_grad && !direct) {
        for (int h = 0; h < heads; ++h) {
          grad_t* dst = gx[h] + b * K;
          const acc_t* src = out_buf + h * kpad;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<grad_t>(src[k]);
        }
      }
    }
  });

  // Batch reduction in a fixed order (row by row, in double): the same bits for any thread count.
  std::vector<double> mean(P, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int p = 0; p < P; ++p) mean[p] += static_cast<double>(partial[b * P + p]);
  for (int p = 0; p < heads + heads * heads; ++p) mean[p] /= static_cast<double>(B);
  const double loss =
      combine_loss(mean.data(), job.ce_w, job.kl_w, heads, alpha, temperature);

  at::Tensor stats = at::empty({P}, at::TensorOptions().dtype(at::kFloat));
  float* sp = stats.data_ptr<float>();
  for (int p = 0; p < P; ++p) sp[p] = static_cast<float>(mean[p]);
  const auto loss_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor loss_t = at::scalar_tensor(loss, at::TensorOptions().dtype(loss_type));
  return {loss_t, stats, grads};
}

LossOutputs fused_loss_cpu(const std::vector<at::Tensor>& logits, const at::Tensor& target,
                           const at::Tensor& ce_weights, const at::Tensor& kl_weights,
                           double temperature, double alpha, double eps, double label_smoothing,
                           bool compute_grad) {
  const CallShape shape =
      check_args(logits, target, ce_weights, kl_weights, temperature, eps, label_smoothing);
  switch (logits[0].scalar_type()) {
    case at::kFloat:
      return fused_loss_cpu_impl<float, float>(logits, target, ce_weights, kl_weights, shape,
                                               temperature, alpha, eps, label_smoothing, compute_grad);
    case at::kDouble:
      return fused_loss_cpu_impl<double, double>(logits, target, ce_weights, kl_weights, shape,
                                                 temperature, alpha, eps, label_smoothing,
                                                 compute_grad);
    case at::kHalf:
      return fused_loss_cpu_impl<at::Half, float>(logits, target, ce_weights, kl_weights, shape,
                                                  temperature, alpha, eps, label_smoothing,
                                                  compute_grad);
    case at::kBFloat16:
      return fused_loss_cpu_impl<at::BFloat16, float>(logits, target, ce_weights, kl_weights, shape,
                                                      temperature, alpha, eps, label_smoothing,
                                                      compute_grad);
    default:
      TORCH_CHECK_VALUE(false, "unsupported logits dtype ", logits[0].scalar_type());
  }
}

}  // namespace
}  // namespace dhm

TORCH_LIBRARY_IMPL(dhm_fast, CPU, m) { m.impl("fused_loss", &dhm::fused_loss_cpu); }
