// Per-row math of the fused mimicking loss, shared by the CPU kernel (fused_loss_cpu.cpp) and the
// CUDA kernel (fused_loss_cuda.cu). Everything here is a small inline function of scalars, so the CPU
// compiler can vectorise the loops that call it and nvcc can keep it in registers.
//
// For one row (sample) and H heads with logits z_h [K], temperature T and smoothing eps:
//   q_h   = softmax(z_h / T)                      (student distribution, with gradient)
//   p~_h  = (q_h + eps) / (1 + K eps)             (teacher distribution, detached)
//   log q~_h = log(q_h + eps) - log1p(K eps)      (eps = 0: the plain log-softmax)
//   KL_ij = sum_k p~_ik (log q~_ik - log q~_jk)   (p~_i = q~_i, so this is KL(p~_i || q~_j))
//   CE_h  = (1 - ls) (lse_h - z_hy) + ls (lse_h - mean_k z_hk),  lse_h = logsumexp(z_h)
// and the gradient of lambda_j/B CE_j + alpha T^2/B sum_i w_ij KL_ij w.r.t. z_j:
//   lambda_j/B (s_j - y~) + alpha T/B (q_j W_j - rho_j P_j)
//   with s_j = softmax(z_j), y~ = (1 - ls) onehot(y) + ls/K, P_jk = sum_i w_ij p~_ik,
//   rho_jk = q_jk / (q_jk + eps) and W_j = sum_k rho_jk P_jk (eps = 0: rho = 1, W_j = sum_i w_ij).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DHM_HD __host__ __device__ __forceinline__
#else
#define DHM_HD inline __attribute__((always_inline))
#endif

namespace dhm {

// Heads one call may have (CUDA keeps per-head state in fixed-size register arrays).
constexpr int kMaxHeads = 8;

// Length of the flat stats vector: [ce (H), kl (H*H, row = teacher), correct (H)].
DHM_HD int stats_size(int heads) { return 2 * heads + heads * heads; }

// Call-wide constants, in the accumulation type (float, or double for float64 logits).
template <typename acc_t>
struct RowConsts {
  int heads;
  int64_t classes;
  acc_t inv_t;      // 1 / T
  acc_t eps;        // smoothing of both distributions before the KL
  acc_t inv_norm;   // 1 / (1 + K eps)
  acc_t log_norm;   // log1p(K eps)
  acc_t smooth;     // label smoothing
  acc_t smooth_k;   // label smoothing / K
  acc_t inv_batch;  // 1 / B
  acc_t kl_scale;   // alpha T / B: the KL gradient's factor (alpha T^2 times d(z/T)/dz)
};

#if !defined(__CUDA_ARCH__)
// Host exp/log as plain arithmetic: unlike libm calls, the compiler vectorises loops over these.
// exp, for x <= 0 (every caller passes a logit minus its row max, or NaN): x = n ln2 + r with
// |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by Taylor to degree 7 (truncation ~5e-9, below
// float rounding), scaled by 2^n through the exponent bits. Max relative error ~1e-7 (measured).
inline __attribute__((always_inline)) float host_exp(float x) {
  const float lo = -87.33654f;  // log(FLT_MIN): below it the result is 0 (no denormals)
  const bool under = x < lo;
  const float xc = under ? lo : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;  // ln2 high part, exact in n * hi
  r = r + n * 2.12194440e-4f;       // minus ln2's low part
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : p * scale;  // NaN input: `under` is false and p is NaN
}

// log, for normal x > 0 (callers pass q + eps with eps >= 1e-30): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)) (found with integer arithmetic: shift the bits so that the exponent field
// rolls over at sqrt(1/2)), f = m - 1 and log1p(f) = f - f^2/2 + f^3 R(f), R a degree-7 polynomial
// fitted (least squares, relative error weighted) for this project: relative error 7e-9, no division.
inline __attribute__((always_inline)) float host_log(float x) {
  constexpr int32_t kSqrtHalf = 0x3f3504f3;  // bits of sqrt(1/2)
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t shifted = bits + (0x3f800000 - kSqrtHalf);
  const int32_t e = (shifted >> 23) - 127;
  const int32_t mbits = (shifted & 0x007fffff) + kSqrtHalf;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float f = m - 1.0f;
  float r = -0.0736286787f;
  r = r * f + 0.126203275f;
  r = r * f - 0.132021042f;
  r = r * f + 0.142271140f;
  r = r * f - 0.166213699f;
  r = r * f + 0.199998266f;
  r = r * f - 0.250008519f;
  r = r * f + 0.333333540f;
  const float f2 = f * f;
  const float log_m = f - 0.5f * f2 + f2 * f * r;
  const float fe = static_cast<float>(e);
  return fe * 0.693359375f + (log_m - fe * 2.12194440e-4f);
}
#endif

DHM_HD float row_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_exp(x);
#endif
}

DHM_HD float row_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return host_log(x);
#endif
}

DHM_HD double row_exp(double x) { return exp(x); }
DHM_HD double row_log(double x) { return log(x); }

// Cross-entropy of one row from log sum_k exp(z_k - max), max - z_target and mean_k (z_k - max).
// Kept relative to the max: with logits near 1e4, max + log-sum in float32 would lose ~1e-3.
template <typename acc_t>
DHM_HD acc_t row_ce(acc_t log_sum, acc_t target_gap, acc_t mean_shifted, acc_t smooth) {
  return (acc_t(1) - smooth) * (log_sum + target_gap) + smooth * (log_sum - mean_shifted);
}

// Student probability q_k from the scaled logit zs = (z_k - max) / T and log sum_k exp(zs).
template <typename acc_t>
DHM_HD acc_t student_prob(acc_t zs, acc_t log_sum) {
  return row_exp(zs - log_sum);
}

// log q~_k. With eps > 0 it needs q itself; with eps = 0 it is exact from the logit (no log(0)).
template <bool kSmooth, typename acc_t>
DHM_HD acc_t student_log_prob(acc_t q, acc_t zs, acc_t log_sum, const RowConsts<acc_t>& c) {
  if (kSmooth) return row_log(q + c.eps) - c.log_norm;
  return zs - log_sum;
}

// p~_k, the detached teacher distribution.
template <bool kSmooth, typename acc_t>
DHM_HD acc_t teacher_prob(acc_t q, const RowConsts<acc_t>& c) {
  return kSmooth ? (q + c.eps) * c.inv_norm : q;
}

// rho_k = q_k / (q_k + eps) = d log(q_k + eps) / d log q_k.
template <bool kSmooth, typename acc_t>
DHM_HD acc_t student_ratio(acc_t q, const RowConsts<acc_t>& c) {
  return kSmooth ? q / (q + c.eps) : acc_t(1);
}

// One element of student j's gradient, without the target's one-hot part (see target_grad_fix):
// ce_scale = lambda_j / B, s = softmax(z_j)_k, q = softmax(z_j/T)_k, rho_p = rho_k * P_jk.
template <typename acc_t>
DHM_HD acc_t grad_elem(acc_t ce_scale, acc_t s, acc_t q, acc_t w_sum, acc_t rho_p,
                       const RowConsts<acc_t>& c) {
  return ce_scale * (s - c.smooth_k) + c.kl_scale * (q * w_sum - rho_p);
}

// The target class's extra term: - lambda_j / B (1 - ls).
template <typename acc_t>
DHM_HD acc_t target_grad_fix(acc_t ce_scale, const RowConsts<acc_t>& c) {
  return -ce_scale * (acc_t(1) - c.smooth);
}

// Online softmax state of one head over part of a row (CUDA): running max and sums of
// exp((z - max)/T) and, when T != 1, exp(z - max); the first index of the max (argmax).
template <typename acc_t>
struct OnlineState {
  acc_t max;
  acc_t sum_t;
  acc_t sum_1;
  int64_t arg;
};

template <typename acc_t>
DHM_HD void online_init(OnlineState<acc_t>& st) {
  st.max = -INFINITY;
  st.sum_t = acc_t(0);
  st.sum_1 = acc_t(0);
  st.arg = INT64_MAX;
}

// Add element z at index k (indices arrive in increasing order within one state).
template <typename acc_t>
DHM_HD void online_add(OnlineState<acc_t>& st, acc_t z, int64_t k, acc_t inv_t, bool two_temps) {
  if (z > st.max) {
    // Rescale the sums to the new max; an empty state (max = -inf) has zero sums.
    const bool empty = st.max == -INFINITY;
    st.sum_t = (empty ? acc_t(0) : st.sum_t * row_exp((st.max - z) * inv_t)) + acc_t(1);
    if (two_temps) st.sum_1 = (empty ? acc_t(0) : st.sum_1 * row_exp(st.max - z)) + acc_t(1);
    st.max = z;
    st.arg = k;
  } else if (st.max != -INFINITY) {
    st.sum_t += row_exp((z - st.max) * inv_t);
    if (two_temps) st.sum_1 += row_exp(z - st.max);
  } else if (z != z) {
    st.max = z;  // NaN: make it stick so the loss reports it
  }
}

// Merge two states (commutative, so every thread of a butterfly reduction gets the same bits).
template <typename acc_t>
DHM_HD OnlineState<acc_t> online_merge(const OnlineState<acc_t>& a, const OnlineState<acc_t>& b,
                                       acc_t inv_t, bool two_temps) {
  OnlineState<acc_t> r;
  if (a.max != a.max || b.max != b.max) {
    r.max = a.max != a.max ? a.max : b.max;
    r.sum_t = r.max;
    r.sum_1 = r.max;
    r.arg = a.arg < b.arg ? a.arg : b.arg;
    return r;
  }
  r.max = a.max > b.max ? a.max : b.max;
  if (a.max == b.max) {
    r.arg = a.arg < b.arg ? a.arg : b.arg;
  } else {
    r.arg = a.max > b.max ? a.arg : b.arg;
  }
  if (r.max == -INFINITY) {
    r.sum_t = acc_t(0);
    r.sum_1 = acc_t(0);
    return r;
  }
  const acc_t fa = a.max == -INFINITY ? acc_t(0) : row_exp((a.max - r.max) * inv_t);
  const acc_t fb = b.max == -INFINITY ? acc_t(0) : row_exp((b.max - r.max) * inv_t);
  r.sum_t = a.sum_t * fa + b.sum_t * fb;
  if (two_temps) {
    const acc_t ga = a.max == -INFINITY ? acc_t(0) : row_exp(a.max - r.max);
    const acc_t gb = b.max == -INFINITY ? acc_t(0) : row_exp(b.max - r.max);
    r.sum_1 = a.sum_1 * ga + b.sum_1 * gb;
  } else {
    r.sum_1 = r.sum_t;
  }
  return r;
}

// Loss from the batch-mean stats: sum_h lambda_h CE_h + alpha T^2 sum_ij w_ij KL_ij.
template <typename T>
DHM_HD double combine_loss(const T* stats, const float* ce_w, const float* kl_w, int heads,
                           double alpha, double temperature) {
  double ce = 0.0, kl = 0.0;
  for (int h = 0; h < heads; ++h) ce += static_cast<double>(ce_w[h]) * static_cast<double>(stats[h]);
  for (int p = 0; p < heads * heads; ++p)
    kl += static_cast<double>(kl_w[p]) * static_cast<double>(stats[heads + p]);
  return ce + alpha * temperature * temperature * kl;
}

}  // namespace dhm
