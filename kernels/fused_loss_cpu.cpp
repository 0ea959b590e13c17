// CPU kernel of the fused mimicking loss: rows in parallel (at::parallel_for) above a size where
// threads pay off, each row's work in loops over whole 64-byte vectors of classes (GCC vector
// extensions for the accumulators, `omp simd` for the element math of dhm_row.h), compiled for
// several x86 levels and picked at load time (GCC target_clones).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "fused_loss.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DHM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DHM_CLONES
#endif
#define DHM_INLINE inline __attribute__((always_inline))
// The helpers below pass 64-byte vectors by value; they are always inlined, so no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dhm {
namespace {

// N values of T as one GCC vector: 64 bytes live in one zmm register in the x86-64-v4 clone, two
// ymm in the v3 clone, four xmm in the default one. Loops keep their running sums and maxima in
// such a vector and reduce it once, as a tree: `omp simd` reductions ended in scalar code that
// added the lanes one by one through the stack, which was most of a row's time at K = 100.
template <typename T, int N>
struct VecN {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T>
constexpr int kLanes = 64 / sizeof(T);
template <typename T>
using Vec = typename VecN<T, kLanes<T>>::type;

template <typename T>
DHM_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
DHM_INLINE void vstore(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}
// Lane masks (compare results) of a Vec<T>, and its lane indices.
template <typename T>
using Mask = typename VecN<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>, kLanes<T>>::type;
template <typename T>
DHM_INLINE Mask<T> lane_index() {
  Mask<T> m;
  for (int l = 0; l < kLanes<T>; ++l) m[l] = l;
  return m;
}
template <typename V>
DHM_INLINE V vmax(V a, V b) {
  return a > b ? a : b;  // the scalar loop's rule: a NaN never replaces the running max
}

// The lanes of v combined by op, halves first: a fixed order, so the same bits on every call.
template <typename T, int N, typename Op>
DHM_INLINE T reduce(typename VecN<T, N>::type v, Op op) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    typename VecN<T, N / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return reduce<T, N / 2>(op(lo, hi), op);
  }
}
template <typename T>
DHM_INLINE T hsum(Vec<T> v) {
  return reduce<T, kLanes<T>>(v, [](auto a, auto b) { return a + b; });
}
template <typename T>
DHM_INLINE T hmax(Vec<T> v) {
  return reduce<T, kLanes<T>>(v, [](auto a, auto b) { return vmax(a, b); });
}

// sum_{k < K} (z_k - m), for label smoothing: whole vectors, then the rest (the padding is excluded).
template <typename acc_t>
DHM_INLINE acc_t shifted_sum(const acc_t* z, int64_t K, acc_t m) {
  constexpr int W = kLanes<acc_t>;
  Vec<acc_t> acc = {};
  int64_t k = 0;
  for (; k + W <= K; k += W) acc += vload(z + k) - m;
  acc_t rest = 0;
  for (; k < K; ++k) rest += z[k] - m;
  return hsum<acc_t>(acc) + rest;
}

// Whether some z_k with k < y equals m (torch.argmax's tie rule: the first maximum wins).
template <typename acc_t>
DHM_INLINE bool max_before(const acc_t* z, int64_t y, acc_t m) {
  constexpr int W = kLanes<acc_t>;
  int64_t k = 0;
  Mask<acc_t> any = {};
  for (; k + W <= y; k += W) any |= vload(z + k) == m;  // lanes of -1 where equal
  bool found = reduce<typename std::remove_reference_t<decltype(any[0])>, W>(
                   any, [](auto a, auto b) { return a | b; }) != 0;
  for (; k < y; ++k) found = found || z[k] == m;
  return found;
}

// log of a softmax denominator (>= 1, or NaN from NaN logits, which must stay NaN): the inline
// polynomial log instead of a libm call, which was ~4% of a row at K = 100.
template <typename acc_t>
DHM_INLINE acc_t sum_log(acc_t x) {
  return x >= acc_t(1) && x <= std::numeric_limits<acc_t>::max() ? row_log(x) : std::log(x);
}

// Everything one row needs besides its logits.
template <typename acc_t>
struct RowJob {
  const RowConsts<acc_t>* c;
  const float* ce_w;  // [H]
  const float* kl_w;  // [H, H], teacher row, student column
  int64_t kpad;       // stride between the per-head arrays: K rounded up to whole vectors
  acc_t uniform_w;    // w when every head teaches every other with weight w (DHM's default), else 0
};

// Rows are prefetched up to this many classes: a longer row would evict the current row's arrays
// (measured: 1.1-1.2x the time at K = 21843), and the hardware prefetcher streams it anyway.
constexpr int64_t kPrefetchClasses = 4096;

// Copies a row of K logits into zh, -inf from K up to n (a whole number of vectors), and returns its
// maximum, in one pass; then starts loading `next` (the next row, or nullptr) into the cache, where
// it arrives while this row is computed.
template <typename acc_t>
DHM_INLINE acc_t copy_max(const acc_t* src, acc_t* zh, int64_t K, int64_t n, const acc_t* next) {
  using V = Vec<acc_t>;
  constexpr int W = kLanes<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  V mv = V{} + m;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const V v = vload(src + k);
    vstore(zh + k, v);
    mv = vmax(v, mv);
  }
  for (; k < K; ++k) {
    zh[k] = src[k];
    m = src[k] > m ? src[k] : m;
  }
  if (n > K) {  // the padding is in the last vector
    const Mask<acc_t> pad = lane_index<acc_t>() >= static_cast<int>(W - (n - K));
    vstore(zh + n - W, pad ? V{} - std::numeric_limits<acc_t>::infinity() : vload(zh + n - W));
  }
  const acc_t mw = hmax<acc_t>(mv);
  if (next != nullptr && K <= kPrefetchClasses)
    for (int64_t i = 0; i < K; i += W) __builtin_prefetch(next + i, 0, 3);
  return mw > m ? mw : m;
}

// One row: per-head CE and softmaxes, all pairwise KL terms, and (when g != nullptr) the gradient
// of the row's share of the loss w.r.t. every head's logits. src[h] is head h's row of K logits;
// it is copied into `zbuf` (H rows of kpad, padded with -inf), so that every loop runs whole vectors
// with no remainder: the padding gets q = 0, and log q~ and p~ are set to 0 there, so it adds to no
// sum. log q~ then overwrites the copy in place (one array less to keep in cache at large K). next[h] is the next row's (prefetched), or nullptr. g[h] gets the K gradient
// values; `out` the row's stats [ce (H), kl (H*H), correct (H)]; `work` holds
// row_work_size(H, kpad, ...) values.
template <typename acc_t, bool kSmooth, bool kTwoTemps>
DHM_INLINE void compute_row(const RowJob<acc_t>& job, const acc_t* const* src, const acc_t* const* next,
                            acc_t* zbuf, acc_t* const* g, int64_t y, acc_t* out, acc_t* work) {
  using V = Vec<acc_t>;
  constexpr int W = kLanes<acc_t>;
  const RowConsts<acc_t>& c = *job.c;
  const int heads = c.heads;
  const int64_t K = c.classes, n = job.kpad;
  acc_t* unused = work;
  const auto take = [&](int64_t size) {
    acc_t* p = unused;
    unused += size;
    return p;
  };
  acc_t* q = take(heads * n);                       // softmax(z / T), per head
  acc_t* lq = zbuf;                                 // log q~, per head: replaces the logits' copy
  acc_t* pt = kSmooth ? take(heads * n) : q;        // p~ (teacher), per head; eps = 0: q
  acc_t* s = kTwoTemps ? take(heads * n) : q;       // softmax(z), per head; T = 1: q
  acc_t* mix = take(n);                             // one student's teacher mixture
  const bool uniform = job.uniform_w != acc_t(0) && heads > 2;
  acc_t* total = uniform ? take(n) : nullptr;       // sum_i p~_i over every head
  acc_t* ce = out;
  acc_t* kl = out + heads;
  acc_t* correct = out + heads + heads * heads;
  const acc_t inv_t = c.inv_t;

  if (g != nullptr && K <= kPrefetchClasses)  // the gradient rows are written last: fetch them meanwhile
    for (int h = 0; h < heads; ++h)
      for (int64_t k = 0; k < K; k += W) __builtin_prefetch(g[h] + k, 1, 3);
  // Each step runs over all heads before the next one starts: a head's chain of dependent scalar
  // steps (max, sum, log) then overlaps with the other heads' vector work instead of stalling it
  // (a fifth of a row's time at K = 100 when done head by head).
  acc_t m[kMaxHeads], sum_t[kMaxHeads], sum_1[kMaxHeads], log_sum_t[kMaxHeads], inv_sum_t[kMaxHeads];
  for (int h = 0; h < heads; ++h)
    m[h] = copy_max<acc_t>(src[h], zbuf + h * n, K, n, next == nullptr ? nullptr : next[h]);
  for (int h = 0; h < heads; ++h) {
    const acc_t* zh = zbuf + h * n;
    acc_t* qh = q + h * n;
    acc_t* sh = s + h * n;
    const acc_t mh = m[h];
    V sum_tv = {}, sum_1v = {};
    for (int64_t k = 0; k < n; k += W) {
      alignas(64) acc_t e[W];
#pragma omp simd
      for (int l = 0; l < W; ++l) e[l] = row_exp((zh[k + l] - mh) * inv_t);
      const V ev = vload(e);
      vstore(qh + k, ev);
      sum_tv += ev;
      if (kTwoTemps) {
#pragma omp simd
        for (int l = 0; l < W; ++l) e[l] = row_exp(zh[k + l] - mh);
        const V e1 = vload(e);
        vstore(sh + k, e1);
        sum_1v += e1;
      }
    }
    sum_t[h] = hsum<acc_t>(sum_tv);
    sum_1[h] = kTwoTemps ? hsum<acc_t>(sum_1v) : sum_t[h];
    if (kTwoTemps) {
      const acc_t inv_1 = acc_t(1) / sum_1[h];
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) sh[k] *= inv_1;
    }
  }
  for (int h = 0; h < heads; ++h) {
    const acc_t* zh = zbuf + h * n;
    const acc_t zy = zh[y];
    const acc_t mean_shifted =
        c.smooth != acc_t(0) ? shifted_sum(zh, K, m[h]) / static_cast<acc_t>(K) : acc_t(0);
    ce[h] = row_ce<acc_t>(sum_log(sum_1[h]), m[h] - zy, mean_shifted, c.smooth);
    correct[h] = zy == m[h] && !max_before(zh, y, m[h]) ? acc_t(1) : acc_t(0);
    log_sum_t[h] = kTwoTemps ? sum_log(sum_t[h]) : sum_log(sum_1[h]);
    inv_sum_t[h] = acc_t(1) / sum_t[h];
  }
  for (int h = 0; h < heads; ++h) {
    acc_t* lqh = lq + h * n;  // holds the logits until this pass replaces them
    acc_t* qh = q + h * n;
    acc_t* pth = pt + h * n;
    const acc_t mh = m[h], lse = log_sum_t[h], inv = inv_sum_t[h];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const acc_t qk = qh[k] * inv;
      qh[k] = qk;
      lqh[k] = student_log_prob<kSmooth>(qk, (lqh[k] - mh) * inv_t, lse, c);
      if (kSmooth) pth[k] = teacher_prob<kSmooth>(qk, c);
    }
    if (n > K) {  // the padding is in the last vector: zero its lanes from K on
      const Mask<acc_t> pad = lane_index<acc_t>() >= static_cast<int>(W - (n - K));
      vstore(lqh + n - W, pad ? V{} : vload(lqh + n - W));
      vstore(pth + n - W, pad ? V{} : vload(pth + n - W));
    }
  }

  // KL(p~_i || q~_j) = sum_k p~_ik (log q~_ik - log q~_jk), summed directly (no cancellation
  // between two large cross-entropies when the heads agree). Two students per pass over the
  // teacher's arrays.
  for (int i = 0; i < heads; ++i) {
    const acc_t* pti = pt + i * n;
    const acc_t* lqi = lq + i * n;
    kl[i * heads + i] = 0;
    int students[kMaxHeads];
    int n_students = 0;
    for (int j = 0; j < heads; ++j)
      if (j != i) students[n_students++] = j;
    int t = 0;
    for (; t + 1 < n_students; t += 2) {
      const acc_t* lqa = lq + students[t] * n;
      const acc_t* lqb = lq + students[t + 1] * n;
      V acc_a = {}, acc_b = {};
      for (int64_t k = 0; k < n; k += W) {
        const V p = vload(pti + k), l = vload(lqi + k);
        acc_a += p * (l - vload(lqa + k));
        acc_b += p * (l - vload(lqb + k));
      }
      kl[i * heads + students[t]] = hsum<acc_t>(acc_a);
      kl[i * heads + students[t + 1]] = hsum<acc_t>(acc_b);
    }
    if (t < n_students) {
      const acc_t* lqj = lq + students[t] * n;
      V acc = {};
      for (int64_t k = 0; k < n; k += W) acc += vload(pti + k) * (vload(lqi + k) - vload(lqj + k));
      kl[i * heads + students[t]] = hsum<acc_t>(acc);
    }
  }
  if (g == nullptr) return;

  if (uniform) {
    for (int64_t k = 0; k < n; k += W) {
      V sum = vload(pt + k) + vload(pt + n + k);
      for (int h = 2; h < heads; ++h) sum += vload(pt + h * n + k);
      vstore(total + k, sum);
    }
  }

  for (int j = 0; j < heads; ++j) {
    acc_t* gj = g[j];
    const acc_t* qj = q + j * n;
    const acc_t* sj = s + j * n;
    const acc_t ce_scale = static_cast<acc_t>(job.ce_w[j]) * c.inv_batch;
    // mix becomes rho_j * P_j, P_j = sum_i w_ij p~_i (this student's teacher mixture), and w_j its
    // class sum W_j; with eps = 0, rho = 1 and W_j = sum_i w_ij.
    V w_jv = {};
    acc_t w_j = 0;
    int n_teachers = 0;
    if (uniform) {
      // P_j = w (S - p~_j): one pass instead of one per teacher.
      const acc_t w = job.uniform_w;
      const acc_t* ptj = pt + j * n;
      n_teachers = heads - 1;
      for (int64_t k = 0; k < n; k += W) {
        alignas(64) acc_t rp[W];
#pragma omp simd
        for (int l = 0; l < W; ++l)
          rp[l] = student_ratio<kSmooth>(qj[k + l], c) * (w * (total[k + l] - ptj[k + l]));
        const V rv = vload(rp);
        vstore(mix + k, rv);
        w_jv += rv;
      }
      w_j = kSmooth ? hsum<acc_t>(w_jv) : w * static_cast<acc_t>(n_teachers);
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
        const acc_t* pti = pt + i * n;
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
        const acc_t* pt_last = pt + last * n;
        const bool one = n_teachers == 1;
        for (int64_t k = 0; k < n; k += W) {
          alignas(64) acc_t rp[W];
#pragma omp simd
          for (int l = 0; l < W; ++l)
            rp[l] = student_ratio<kSmooth>(qj[k + l], c) *
                    ((one ? acc_t(0) : mix[k + l]) + w_last * pt_last[k + l]);
          const V rv = vload(rp);
          vstore(mix + k, rv);
          w_jv += rv;
        }
        w_j = kSmooth ? hsum<acc_t>(w_jv) : w_sum;
      }
    }
    if (n_teachers == 0) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) gj[k] = grad_elem<acc_t>(ce_scale, sj[k], 0, 0, 0, c);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) gj[k] = grad_elem<acc_t>(ce_scale, sj[k], qj[k], w_j, mix[k], c);
    }
    gj[y] += target_grad_fix<acc_t>(ce_scale, c);
  }
}

// Scratch values compute_row needs per row.
inline int64_t row_work_size(int heads, int64_t kpad, bool smooth, bool two_temps) {
  return (1 + (smooth ? 1 : 0) + (two_temps ? 1 : 0)) * heads * kpad + 2 * kpad;
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
                        const float* const* next, float* zbuf, float* const* g, int64_t y, float* out,
                        float* work) {
  if (smooth) {
    if (two_temps) compute_row<float, true, true>(job, z, next, zbuf, g, y, out, work);
    else compute_row<float, true, false>(job, z, next, zbuf, g, y, out, work);
  } else {
    if (two_temps) compute_row<float, false, true>(job, z, next, zbuf, g, y, out, work);
    else compute_row<float, false, false>(job, z, next, zbuf, g, y, out, work);
  }
}

// float64 (gradcheck and tests): exact library exp/log, no speed goal.
void row_f64(const RowJob<double>& job, bool smooth, bool two_temps, const double* const* z,
             const double* const* next, double* zbuf, double* const* g, int64_t y, double* out,
             double* work) {
  if (smooth) {
    if (two_temps) compute_row<double, true, true>(job, z, next, zbuf, g, y, out, work);
    else compute_row<double, true, false>(job, z, next, zbuf, g, y, out, work);
  } else {
    if (two_temps) compute_row<double, false, true>(job, z, next, zbuf, g, y, out, work);
    else compute_row<double, false, false>(job, z, next, zbuf, g, y, out, work);
  }
}

inline void row_dispatch(const RowJob<float>& job, bool smooth, bool two, const float* const* z,
                         const float* const* next, float* zbuf, float* const* g, int64_t y, float* out,
                         float* work) {
  row_f32(job, smooth, two, z, next, zbuf, g, y, out, work);
}
inline void row_dispatch(const RowJob<double>& job, bool smooth, bool two, const double* const* z,
                         const double* const* next, double* zbuf, double* const* g, int64_t y,
                         double* out, double* work) {
  row_f64(job, smooth, two, z, next, zbuf, g, y, out, work);
}

// 64-byte aligned scratch (whole vectors never straddle a cache line).
struct FreeAligned {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeAligned>;
template <typename T>
Buffer<T> aligned_buffer(int64_t n) {
  T* p = static_cast<T*>(std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64));
  TORCH_CHECK(p != nullptr, "fused_loss: out of memory for ", n, " scratch values");
  return Buffer<T>(p);
}

// A task's scratch: each thread keeps its buffer between calls, grown to the largest request up to
// 4 MiB (a fresh buffer per call cost an allocation and, for large rows, page faults: 1.15x the old
// time at K = 21843); a larger request gets its own buffer, in `own`.
template <typename acc_t>
acc_t* scratch(int64_t size, Buffer<acc_t>& own) {
  constexpr int64_t kKeptMax = (4 << 20) / sizeof(acc_t);
  if (size > kKeptMax) {
    own = aligned_buffer<acc_t>(size);
    return own.get();
  }
  thread_local Buffer<acc_t> kept;
  thread_local int64_t kept_size = 0;
  if (kept_size < size) {
    kept = aligned_buffer<acc_t>(size);
    kept_size = size;
  }
  return kept.get();
}

// Rows per task (at::parallel_for's grain): a problem of fewer than kSerialLogits logits runs on the
// calling thread alone. Measured on 2 cores (docs/benchmarks.md): below it a second thread saves at
// most ~20% even on an idle machine, and on a busy one waiting for it to be scheduled cost
// milliseconds.
constexpr int64_t kSerialLogits = 65536;
int64_t serial_rows(int heads, int64_t classes) {
  return std::max<int64_t>(1, kSerialLogits / (heads * classes));
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
  const int64_t kpad = (K + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;  // whole vectors
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

  // Rows of the math's dtype with unit stride are read in place (the row kernel copies them into
  // padded buffers as it finds their maxima); others are first converted into a buffer. Gradients
  // are written straight into the output rows when their dtype is the math's, else into a buffer
  // and converted.
  constexpr bool kGradInPlace = std::is_same_v<grad_t, acc_t>;
  bool in_place = std::is_same_v<scalar_t, acc_t>;
  for (int h = 0; h < heads; ++h) in_place = in_place && stride_col[h] == 1;
  const RowJob<acc_t> job{&consts, ce_w.data_ptr<float>(), kl_w.data_ptr<float>(), kpad,
                          uniform_teacher_weight<acc_t>(kl_w.data_ptr<float>(), heads)};
  const int64_t row_work = row_work_size(heads, kpad, smooth, two_temps);
  const int64_t work_size =
      row_work + heads * kpad * (1 + (in_place ? 0 : 1) + (compute_grad && !kGradInPlace ? 1 : 0));
  std::vector<acc_t> partial(static_cast<size_t>(B) * P);

  at::parallel_for(0, B, serial_rows(heads, K), [&](int64_t begin, int64_t end) {
    Buffer<acc_t> own;
    acc_t* work = scratch(work_size, own);
    acc_t* zbuf = work + row_work;
    acc_t* conv = zbuf + heads * kpad;
    acc_t* out_buf = conv + (in_place ? 0 : heads * kpad);
    const acc_t* zrow[kMaxHeads];
    const acc_t* znext[kMaxHeads];
    acc_t* grow[kMaxHeads];
    for (int h = 0; h < heads; ++h) grow[h] = out_buf + h * kpad;
    for (int64_t b = begin; b < end; ++b) {
      for (int h = 0; h < heads; ++h) {
        const scalar_t* src = x[h] + b * stride_row[h];
        if (in_place) {
          zrow[h] = reinterpret_cast<const acc_t*>(src);
          znext[h] = b + 1 < end ? zrow[h] + stride_row[h] : nullptr;
        } else {
          acc_t* dst = conv + h * kpad;
          const int64_t sc = stride_col[h];
          if (sc == 1) {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k]);
          } else {
            for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k * sc]);
          }
          zrow[h] = dst;
        }
        if (compute_grad && kGradInPlace) grow[h] = reinterpret_cast<acc_t*>(gx[h] + b * K);
      }
      row_dispatch(job, smooth, two_temps, zrow, in_place ? znext : nullptr, zbuf,
                   compute_grad ? grow : nullptr, y[b], partial.data() + b * P, work);
      if (compute_grad && !kGradInPlace) {
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
