// Row primitives of the softmax-based CPU kernels (gumbel_quantize): exponentials, the KL
// term's logarithms and dot products over one row of K values.
//
// float rows use AVX2+FMA (8 lanes) whenever the active ISA is AVX2 or AVX-512, with
// Cephes-style polynomial exp and log (within a few ulp of the correctly rounded value);
// the portable ISA and double rows use std::exp and std::log. Sums are accumulated per lane
// and the lanes added in a fixed order, so a row's result depends on K and the ISA only,
// never on the thread count. Sums of the scalar forms accumulate in double.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/search.h"

namespace vqk {
namespace cpu {

#if VQK_X86
namespace avx2 {

// Lanes [0, n) set (n <= 8), for the row's tail.
VQK_TARGET_AVX2 inline __m256i tail_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

VQK_TARGET_AVX2 inline double hsum(__m256 v) {  // lanes added in a fixed order, in double
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((double(l[0]) + l[1]) + (double(l[2]) + l[3])) + ((double(l[4]) + l[5]) + (double(l[6]) + l[7]));
}

// exp(x) for x <= 0 (softmax arguments): 0 below the smallest normal result, NaN kept. Lanes below that range are
// computed as exp(0) and then zeroed: clamped to log(FLT_MIN) instead, they came out just below FLT_MIN, and an Intel
// core takes a microcode assist for every multiply with a subnormal result (the soft gumbel_quantize forward at
// tau 0.1, where most arguments are below the range, took twice as long as at tau 1 on a Xeon).
VQK_TARGET_AVX2 inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654475f);  // log(FLT_MIN)
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 xc = _mm256_andnot_ps(below, x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two so that n * hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_andnot_ps(below, y);
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// log(x) for positive normal finite x.
VQK_TARGET_AVX2 inline __m256 log_pos(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  // mantissa m in [0.5, 1); below sqrt(1/2) use 2m (one exponent less), then subtract 1
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// Lane-wise fold of v into the running maximum best (strict '>': a lane keeps its first
// maximum) and its index bidx; NaN lanes are recorded in nan.
VQK_TARGET_AVX2 inline void max_step(__m256 v, __m256i idx, __m256& best, __m256i& bidx, __m256& nan) {
  const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
  best = _mm256_blendv_ps(best, v, gt);
  bidx = _mm256_blendv_epi8(bidx, idx, _mm256_castps_si256(gt));
  nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// The lanes' first maximum: the largest value, the lowest index among equal ones.
VQK_TARGET_AVX2 inline int64_t max_lanes(__m256 best, __m256i bidx, float& value) {
  alignas(32) float b[8];
  alignas(32) int32_t i[8];
  _mm256_store_ps(b, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(i), bidx);
  int j = 0;
  for (int t = 1; t < 8; ++t)
    if (b[t] > b[j] || (b[t] == b[j] && i[t] < i[j])) j = t;
  value = b[j];
  return i[j];
}

// s = l + g; returns the index of s's first maximum (0 when every s_k = -inf) and sets smax
// to it, or returns -1 and sets NaN when s holds a NaN. K < 2**31.
VQK_TARGET_AVX2 inline int64_t score_row(const float* l, const float* g, int64_t K, float* s, float& smax) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 best = ninf, nan = _mm256_setzero_ps();
  __m256i bidx = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8, idx = _mm256_add_epi32(idx, eight)) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(l + k), _mm256_loadu_ps(g + k));
    _mm256_storeu_ps(s + k, v);
    max_step(v, idx, best, bidx, nan);
  }
  if (k < K) {
    const __m256i m = tail_mask(K - k);
    const __m256 v = _mm256_add_ps(_mm256_maskload_ps(l + k, m), _mm256_maskload_ps(g + k, m));
    _mm256_maskstore_ps(s + k, m, v);
    max_step(_mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(m)), idx, best, bidx, nan);
  }
  if (_mm256_movemask_ps(nan)) {
    smax = std::numeric_limits<float>::quiet_NaN();
    return -1;
  }
  return max_lanes(best, bidx, smax);
}

// max_k x_k, NaN when x holds a NaN.
VQK_TARGET_AVX2 inline float row_max(const float* x, int64_t K) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 best = ninf, nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    best = _mm256_max_ps(best, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (k < K) {
    const __m256i m = tail_mask(K - k);
    const __m256 v = _mm256_blendv_ps(ninf, _mm256_maskload_ps(x + k, m), _mm256_castsi256_ps(m));
    best = _mm256_max_ps(best, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
  float value;
  max_lanes(best, _mm256_setzero_si256(), value);
  return value;
}

VQK_TARGET_AVX2 inline double exp_row(const float* x, int64_t K, float shift, float scale, float* y) {
  const __m256 sh = _mm256_set1_ps(shift), sc = _mm256_set1_ps(scale);
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 e = exp_nonpos(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), sh), sc));
    _mm256_storeu_ps(y + k, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (k < K) {
    const __m256i m = tail_mask(K - k);
    const __m256 e = _mm256_and_ps(exp_nonpos(_mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(x + k, m), sh), sc)),
                                   _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(y + k, m, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum(acc);
}

// sum_k q_k log(q_k a + b)
VQK_TARGET_AVX2 inline double xlog_row(const float* q, int64_t K, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(q + k);
    acc = _mm256_fmadd_ps(v, log_pos(_mm256_fmadd_ps(v, va, vb)), acc);
  }
  if (k < K) {  // masked lanes load q = 0: log(b) times 0
    const __m256 v = _mm256_maskload_ps(q + k, tail_mask(K - k));
    acc = _mm256_fmadd_ps(v, log_pos(_mm256_fmadd_ps(v, va, vb)), acc);
  }
  return hsum(acc);
}

// f = log(q a + b) + q a / (q a + b) for 8 lanes of q; adds q f to acc.
VQK_TARGET_AVX2 inline __m256 kl_deriv(__m256 q, __m256 a, __m256 b, __m256& acc) {
  const __m256 qa = _mm256_mul_ps(q, a), den = _mm256_add_ps(qa, b);
  const __m256 f = _mm256_add_ps(log_pos(den), _mm256_div_ps(qa, den));
  acc = _mm256_fmadd_ps(q, f, acc);
  return f;
}

// f_k = log(q_k a + b) + q_k a / (q_k a + b); returns sum_k q_k f_k
VQK_TARGET_AVX2 inline double kl_deriv_row(const float* q, int64_t K, float a, float b, float* f) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(f + k, kl_deriv(_mm256_loadu_ps(q + k), va, vb, acc));
  if (k < K) {  // masked lanes load q = 0: they add nothing
    const __m256i m = tail_mask(K - k);
    _mm256_maskstore_ps(f + k, m, kl_deriv(_mm256_maskload_ps(q + k, m), va, vb, acc));
  }
  return hsum(acc);
}

VQK_TARGET_AVX2 inline double dot_row(const float* a, const float* b, int64_t K) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  if (k < K) {
    const __m256i m = tail_mask(K - k);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + k, m), _mm256_maskload_ps(b + k, m), acc);
  }
  return hsum(acc);
}

}  // namespace avx2
#endif

template <typename T>
inline bool use_avx2_rows() {
#if VQK_X86
  return std::is_same<T, float>::value && active_isa() != Isa::Portable;
#else
  return false;
#endif
}

// s = l + g; returns the index of s's first maximum (0 when every s_k = -inf) and sets smax
// to it, or returns -1 and sets smax to NaN when s holds a NaN.
template <typename T>
int64_t score_row(const T* l, const T* g, int64_t K, T* s, T& smax) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value)
    if (use_avx2_rows<T>() && K < (int64_t(1) << 31)) return avx2::score_row(l, g, K, s, smax);
#endif
  int64_t best = 0;
  bool nan = false;
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    const T v = l[k] + g[k];
    s[k] = v;
    nan |= v != v;
    if (v > m) {
      m = v;
      best = k;
    }
  }
  smax = nan ? std::numeric_limits<T>::quiet_NaN() : m;
  return nan ? -1 : best;
}

// max_k x_k, NaN when x holds a NaN.
template <typename T>
T row_max(const T* x, int64_t K) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value)
    if (use_avx2_rows<T>()) return avx2::row_max(x, K);
#endif
  T m = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    nan |= x[k] != x[k];
    m = x[k] > m ? x[k] : m;
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}

// y_k = exp((x_k - shift) * scale), where every (x_k - shift) * scale <= 0 or NaN; returns sum_k y_k.
template <typename T>
double exp_row(const T* x, int64_t K, T shift, T scale, T* y) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value)
    if (use_avx2_rows<T>()) return avx2::exp_row(x, K, shift, scale, y);
#endif
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    y[k] = std::exp((x[k] - shift) * scale);
    sum += y[k];
  }
  return sum;
}

// sum_k q_k log(q_k a + b), for q_k >= 0 and b > 0 (every argument positive and normal).
template <typename T>
double xlog_row(const T* q, int64_t K, T a, T b) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value)
    if (use_avx2_rows<T>()) return avx2::xlog_row(q, K, a, b);
#endif
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += q[k] * std::log(q[k] * a + b);
  return sum;
}

// f_k = d(q log(q a + b))/dq at q_k = log(q_k a + b) + q_k a / (q_k a + b); returns sum_k q_k f_k.
template <typename T>
double kl_deriv_row(const T* q, int64_t K, T a, T b, T* f) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value)
    if (use_avx2_rows<T>()) return avx2::kl_deriv_row(q, K, a, b, f);
#endif
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T qa = q[k] * a;
    f[k] = std::log(qa + b) + qa / (qa + b);
    sum += q[k] * f[k];
  }
  return sum;
}

template <typename T>
double dot_row(const T* a, const T* b, int64_t K) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value)
    if (use_avx2_rows<T>()) return avx2::dot_row(a, b, K);
#endif
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(a[k]) * b[k];
  return sum;
}

}  // namespace cpu
}  // namespace vqk
