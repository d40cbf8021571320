// CPU chunk epilogue of the chunked strategy: the native twin of grpo_kernels/torch_ops.py's chunk_stats and
// chunk_dlogits_ (same math, stated there). Built and loaded by grpo_kernels/native.py.
//
// With z = logits * inv_t, lse = log sum_v e^{z_v}, p = e^{z - lse}, H = -sum_v p_v log p_v:
//   chunk_stats:    lse, logp = z_y - lse and (optionally) H, per row; one read of the row from memory.
//                   The row (<= a few hundred KiB) is read twice while it sits in cache: max, then
//                   s = sum e^{z-m} and a = sum e^{z-m} (z-m), so lse = m + log s and H = log s - a / s
//                   (both terms >= 0: no cancellation for |z| ~ 1e3).
//   chunk_dlogits_: in place, logits <- [g (1[v=y] - p_v) - e p_v (log p_v + H)] * inv_t, one read and one
//                   write of the row; g and e arrive already multiplied by inv_t. Rows with g = 0 and no
//                   entropy term (e = 0) are written as zeros without computing p.
// Rows are split across ATen's intra-op threads (torch.set_num_threads applies). fp32 uses a vectorisable
// exp (Cephes polynomial, ~1 ulp); fp64 uses std::exp. Non-finite row maxima take a std::exp path so
// +-inf logits give what torch.logsumexp gives.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace {

// e^x for x <= ~88 (callers pass x <= 0 up to rounding). Branch-free so that `omp simd` loops vectorise.
inline float exp_f32(float x) {
  const float lo = -87.3f, hi = 88.3f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  y = x < lo ? 0.0f : y;   // underflow (and -inf) -> 0
  return x != x ? x : y;   // NaN stays NaN
}

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp_f32(x); }

constexpr int64_t kBlock = 512;  // fp32 partial sums per block, blocks summed in double

template <typename T>
struct RowStats {
  double m, s, a;  // max, sum e^{z-m}, sum e^{z-m} (z-m)
};

template <typename T>
RowStats<T> row_stats(const T* x, int64_t V, T inv_t, bool want_a) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = std::max(m, x[v] * inv_t);
  // a NaN in the row, whether or not the max saw it, makes s (so lse and logp) NaN below, as in torch
  // torch.logsumexp shifts by 0 when the max is infinite
  const bool finite = std::isfinite(m);
  const T shift = finite ? m : T(0);
  double s = 0.0, a = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t v1 = std::min(V, v0 + kBlock);
    T bs = 0, ba = 0;
    if (finite) {
#pragma omp simd reduction(+ : bs, ba)
      for (int64_t v = v0; v < v1; ++v) {
        const T d = x[v] * inv_t - shift;
        const T e = exp_any(d);
        bs += e;
        ba += e * d;
      }
    } else {
      for (int64_t v = v0; v < v1; ++v) {
        const T d = x[v] * inv_t - shift;
        const T e = static_cast<T>(std::exp(static_cast<double>(d)));
        bs += e;
        if (want_a) ba += e * d;
      }
    }
    s += bs;
    a += ba;
  }
  return {static_cast<double>(shift), s, a};
}

template <typename T, typename I>
void stats_impl(const at::Tensor& logits, const at::Tensor& targets, double inv_t_d, at::Tensor& lse,
                at::Tensor& logp, T* ent) {
  const int64_t M = logits.size(0), V = logits.size(1), rs = logits.stride(0);
  const T* base = logits.const_data_ptr<T>();
  const I* tgt = targets.const_data_ptr<I>();
  T* lse_p = lse.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  const T inv_t = static_cast<T>(inv_t_d);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = base + r * rs;
      const RowStats<T> st = row_stats<T>(x, V, inv_t, ent != nullptr);
      const double log_s = std::log(st.s);
      const double l = st.m + log_s;
      lse_p[r] = static_cast<T>(l);
      logp_p[r] = x[tgt[r]] * inv_t - static_cast<T>(l);
      if (ent) ent[r] = static_cast<T>(log_s - st.a / st.s);
    }
  });
}

// x <- -g p (the one-hot term is added by the caller)
template <typename T>
void row_dlogp(T* __restrict__ x, int64_t V, T inv_t, T lse, T g) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) x[v] = -g * exp_any(x[v] * inv_t - lse);
}

// x <- -p (g + e (log p + H))
template <typename T>
void row_dlogp_dent(T* __restrict__ x, int64_t V, T inv_t, T lse, T g, T e, T h) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const T lp = x[v] * inv_t - lse;
    x[v] = -((lp + h) * e + g) * exp_any(lp);
  }
}

template <typename T, typename I>
void dlogits_impl(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad,
                  double inv_t_d, const T* ent, const T* gent) {
  const int64_t M = logits.size(0), V = logits.size(1), rs = logits.stride(0);
  T* base = logits.data_ptr<T>();
  const I* tgt = targets.const_data_ptr<I>();
  const T* lse_p = lse.const_data_ptr<T>();
  const T* g_p = grad.const_data_ptr<T>();
  const T inv_t = static_cast<T>(inv_t_d);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* x = base + r * rs;
      const T g = g_p[r] * inv_t;  // dL/dlogp / T
      const T e = gent ? gent[r] * inv_t : T(0);
      const T l = lse_p[r];
      if (g == T(0) && e == T(0)) {  // nothing flows through this row
        std::fill(x, x + V, T(0));
        continue;
      }
      if (gent == nullptr)
        row_dlogp(x, V, inv_t, l, g);
      else
        row_dlogp_dent(x, V, inv_t, l, g, e, ent[r]);
      x[tgt[r]] += g;
    }
  });
}

template <typename I>
void check_targets(const at::Tensor& targets, int64_t V) {
  const I* t = targets.const_data_ptr<I>();
  for (int64_t r = 0, n = targets.numel(); r < n; ++r)
    TORCH_CHECK(t[r] >= 0 && t[r] < V, "targets: index ", static_cast<int64_t>(t[r]),
                " is out of bounds for a vocabulary of size ", V);
}

// The Python side (grpo_kernels/native.py) has checked devices, dtypes, shapes and strides; these checks only
// guard memory safety.
void check_common(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1,
              "logits: a CPU [M, V] tensor with unit column stride");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "logits: float32 or float64");
  TORCH_CHECK(logits.size(1) > 0, "logits: empty vocabulary");
  TORCH_CHECK(targets.dim() == 1 && targets.is_contiguous() && targets.size(0) == logits.size(0) &&
                  (targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt),
              "targets: contiguous int32/int64 [M]");
  if (targets.scalar_type() == at::kLong)
    check_targets<int64_t>(targets, logits.size(1));
  else
    check_targets<int32_t>(targets, logits.size(1));
}

void check_row(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == logits.size(0) &&
                  t.scalar_type() == logits.scalar_type(),
              name, ": contiguous [M] tensor of the logits' dtype");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats(const at::Tensor& logits, const at::Tensor& targets,
                                                           double inv_t, bool return_entropy) {
  check_common(logits, targets);
  const int64_t M = logits.size(0);
  at::Tensor lse = at::empty({M}, logits.options());
  at::Tensor logp = at::empty({M}, logits.options());
  at::Tensor ent = at::empty({return_entropy ? M : 0}, logits.options());
  const bool i64 = targets.scalar_type() == at::kLong;
  if (logits.scalar_type() == at::kFloat) {
    float* e = return_entropy ? ent.data_ptr<float>() : nullptr;
    if (i64) stats_impl<float, int64_t>(logits, targets, inv_t, lse, logp, e);
    else stats_impl<float, int32_t>(logits, targets, inv_t, lse, logp, e);
  } else {
    double* e = return_entropy ? ent.data_ptr<double>() : nullptr;
    if (i64) stats_impl<double, int64_t>(logits, targets, inv_t, lse, logp, e);
    else stats_impl<double, int32_t>(logits, targets, inv_t, lse, logp, e);
  }
  return {lse, logp, ent};
}

void chunk_dlogits_(at::Tensor logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad,
                    double inv_t, const c10::optional<at::Tensor>& entropy,
                    const c10::optional<at::Tensor>& grad_entropy) {
  check_common(logits, targets);
  check_row(lse, logits, "lse");
  check_row(grad, logits, "grad");
  const bool with_e = grad_entropy.has_value();
  if (with_e) {
    TORCH_CHECK(entropy.has_value(), "grad_entropy needs entropy");
    check_row(*entropy, logits, "entropy");
    check_row(*grad_entropy, logits, "grad_entropy");
  }
  const bool i64 = targets.scalar_type() == at::kLong;
  if (logits.scalar_type() == at::kFloat) {
    const float* h = with_e ? entropy->const_data_ptr<float>() : nullptr;
    const float* e = with_e ? grad_entropy->const_data_ptr<float>() : nullptr;
    if (i64) dlogits_impl<float, int64_t>(logits, targets, lse, grad, inv_t, h, e);
    else dlogits_impl<float, int32_t>(logits, targets, lse, grad, inv_t, h, e);
  } else {
    const double* h = with_e ? entropy->const_data_ptr<double>() : nullptr;
    const double* e = with_e ? grad_entropy->const_data_ptr<double>() : nullptr;
    if (i64) dlogits_impl<double, int64_t>(logits, targets, lse, grad, inv_t, h, e);
    else dlogits_impl<double, int32_t>(logits, targets, lse, grad, inv_t, h, e);
  }
}

}  // namespace

TORCH_LIBRARY(grpo_native, m) {
  m.def("chunk_stats(Tensor logits, Tensor targets, float inv_t, bool return_entropy) -> (Tensor, Tensor, Tensor)",
        &chunk_stats);
  m.def("chunk_dlogits_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor grad, float inv_t, Tensor? entropy, "
        "Tensor? grad_entropy) -> ()",
        &chunk_dlogits_);
}
