// CPU kernels of vqkernels::binary_one_hot (BinaryMapper's one-hot of sampled bit codes, Fleuret 2025,
// arXiv:2510.17558) and its backward, the gradient of the joint code probabilities
//     G[n, c] = prod_b p[n, b]^c_b (1 - p[n, b])^(1 - c_b),   p = sigmoid(logits),  c_b = (c >> b) & 1:
//     grad_logits[n, b] = sum_c g[n, c] G[n, c] (c_b - p[n, b]).
// G factors into a table over the low bits times one over the high bits, G[h L + l] = low[l] high[h], so one pass
// over a row of g gives u[l] = sum_h high[h] g[h L + l] and v[h] = sum_l low[l] g[h L + l], and from them every sum
// the gradient needs: S = sum_c g G = sum_l low[l] u[l], the low bits' sum_l low[l] u[l] l_b and the high bits'
// sum_h high[h] v[h] h_b. G is never formed: two multiply-adds per element of g and O(2^(bits/2)) scratch a row.
// Rows in parallel blocks; float32 sums (float64 for float64 logits).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

constexpr int kParts = 8;  // lanes of the vectors over a row's low codes

template <typename T>
struct VecOf {
  using type = f32x8;
};
template <>
struct VecOf<double> {
  using type = f64x8;
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
VQK_LANES Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
VQK_LANES void store_vec(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// e^-a of 8 lanes a >= 0 (Cody-Waite reduction by ln 2 and Cephes' expf polynomial, within 2 ulp), 0 past a = 87
// (below float's normal range), NaN for NaN.
VQK_LANES f32x8 exp_neg(f32x8 a) {
  const f32x8 x = -(a < 87.0f ? a : f32x8{} + 87.0f);
  const i32x8 n = -__builtin_convertvector(-x * 1.44269504f + 0.5f, i32x8);  // round(x / ln 2), x <= 0
  const f32x8 nf = __builtin_convertvector(n, f32x8);
  const f32x8 r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  f32x8 poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const f32x8 e = ((poly * (r * r) + r) + 1.0f) * reinterpret_cast<f32x8>((n + 127) << 23);
  return a == a ? (a < 87.0f ? e : f32x8{}) : a;
}

// p = sigmoid(l) and q = 1 - p of `bits` logits, each from one exp without cancellation: with e = exp(-|l|), the
// larger is 1 / (1 + e) and the smaller e / (1 + e).
template <typename T>
VQK_LANES void bit_probs(const T* lg, int bits, T* p, T* q) {
  if constexpr (std::is_same<T, float>::value) {
    for (int b0 = 0; b0 < bits; b0 += 8) {
      const int m = std::min(8, bits - b0);
      f32x8 l = {};
      std::memcpy(&l, lg + b0, m * sizeof(float));
      const f32x8 e = exp_neg(l < 0.0f ? -l : l), big = 1.0f / (1.0f + e), small = e * big;
      const f32x8 pv = l >= 0.0f ? big : small, qv = l >= 0.0f ? small : big;  // NaN: small (NaN) both
      std::memcpy(p + b0, &pv, m * sizeof(float));
      std::memcpy(q + b0, &qv, m * sizeof(float));
    }
  } else {
    for (int b = 0; b < bits; ++b) {
      const T e = std::exp(-std::abs(lg[b])), big = T(1) / (T(1) + e), small = e * big;
      p[b] = lg[b] >= 0 ? big : small;
      q[b] = lg[b] >= 0 ? small : big;
    }
  }
}

template <typename T>
struct Scratch {
  std::vector<T> lg, g, row;  // converted rows of logits and of the gradient; one row's tables
};

// table[i] = prod_{b < count} (bit b of i ? p[first + b] : q[first + b]), i < 2^count, built bit by bit (doubling).
template <typename T>
VQK_LANES void bit_table(const T* p, const T* q, int first, int count, T* table) {
  table[0] = T(1);
  for (int b = 0; b < count; ++b) {
    const int64_t half = int64_t(1) << b;
    for (int64_t i = 0; i < half; ++i) {
      table[i + half] = table[i] * p[first + b];
      table[i] *= q[first + b];
    }
  }
}

// sum_i w[i] over the i with bit b set, for each b < count, into out[0..count).
template <typename T>
VQK_LANES void bit_sums(const T* w, int count, T* out) {
  for (int b = 0; b < count; ++b) {
    T sum = 0;
    for (size_t i = size_t(1) << b; i < (size_t(1) << count); i = (i + 1) | (size_t(1) << b)) sum += w[i];
    out[b] = sum;
  }
}

// The scratch of one row: p, q [bits], low, u [L], high, v [H], parts [H][kParts] (s.row, sized once a block).
template <typename T>
struct RowScratch {
  T *p, *q, *low, *u, *high, *v, *parts;
  RowScratch(Scratch<T>& s, int bits) {
    const int64_t L = int64_t(1) << (bits / 2), H = int64_t(1) << (bits - bits / 2);
    s.row.resize(2 * bits + 2 * L + (2 + kParts) * H);
    p = s.row.data(), q = p + bits, low = q + bits, u = low + L, high = u + L, v = high + H, parts = v + H;
  }
};

// grad_logits of one row: logits lg[bits], g[2^bits] -> out[bits].
template <typename T, typename S>
VQK_LANES void backward_row(const T* lg, const T* g, int bits, const RowScratch<T>& w, S* out) {
  const int lo = bits / 2, hi = bits - lo;
  const int64_t L = int64_t(1) << lo, H = int64_t(1) << hi;
  T *p = w.p, *q = w.q, *low = w.low, *u = w.u, *high = w.high, *v = w.v, *parts = w.parts;
  T sums[kMaxOneHotBits];  // per bit: sum_c g[c] G[c] c_b
  bit_probs(lg, bits, p, q);
  bit_table(p, q, 0, lo, low);
  bit_table(p, q, lo, hi, high);
  if (L >= kParts) {
    // kParts low codes at a time: their u in a register over every h, each v[h] in kParts lanes (parts[h]);
    // no sum waits on the previous h
    std::fill(parts, parts + H * kParts, T(0));
    for (int64_t l0 = 0; l0 < L; l0 += kParts) {
      const Vec<T> lowv = load_vec(low + l0);
      Vec<T> uv = {};
      for (int64_t h = 0; h < H; ++h) {
        const Vec<T> gv = load_vec(g + h * L + l0);
        uv += (Vec<T>{} + high[h]) * gv;
        store_vec(parts + h * kParts, load_vec(parts + h * kParts) + lowv * gv);
      }
      store_vec(u + l0, uv);
    }
    // the high bits' sums over h of high[h] v[h], in kParts lanes until the end
    for (int64_t h = 0; h < H; ++h) store_vec(parts + h * kParts, load_vec(parts + h * kParts) * high[h]);
    for (int b = 0; b < hi; ++b) {
      Vec<T> acc = {};
      for (int64_t h = int64_t(1) << b; h < H; h = (h + 1) | (int64_t(1) << b)) acc += load_vec(parts + h * kParts);
      sums[lo + b] = 0;
      for (int k = 0; k < kParts; ++k) sums[lo + b] += acc[k];
    }
  } else {  // fewer than kParts low codes (bits < 6)
    std::fill(u, u + L, T(0));
    for (int64_t h = 0; h < H; ++h) {
      T acc = 0;
      for (int64_t l = 0; l < L; ++l) {
        u[l] += high[h] * g[h * L + l];
        acc += low[l] * g[h * L + l];
      }
      v[h] = acc * high[h];  // high[h] v[h]
    }
    bit_sums(v, hi, sums + lo);
  }
  T total = 0;
  for (int64_t l = 0; l < L; ++l) {
    u[l] *= low[l];  // low[l] u[l]
    total += u[l];
  }
  bit_sums(u, lo, sums);
  for (int b = 0; b < bits; ++b) out[b] = static_cast<S>(sums[b] - p[b] * total);
}

// `rows` rows (strides ldl, ldg) into out [rows][bits]: one body per ISA, no contraction, so the same bits on each.
#define VQK_ONE_HOT_BACKWARD(NAME, TARGET)                                                                    \
  template <typename T, typename S>                                                                           \
  TARGET VQK_NO_CONTRACT void NAME(const T* lg, int64_t ldl, const T* g, int64_t ldg, int64_t rows, int bits, \
                                   Scratch<T>& s, S* out) {                                                   \
    const RowScratch<T> w(s, bits);                                                                           \
    for (int64_t r = 0; r < rows; ++r) backward_row(lg + r * ldl, g + r * ldg, bits, w, out + r * bits);      \
  }
VQK_ONE_HOT_BACKWARD(backward_portable, )
#if VQK_X86
VQK_ONE_HOT_BACKWARD(backward_avx2, VQK_TARGET_AVX2)
VQK_ONE_HOT_BACKWARD(backward_avx512, VQK_TARGET_AVX512)
#endif
#undef VQK_ONE_HOT_BACKWARD

at::Tensor binary_one_hot(const at::Tensor& logits, const at::Tensor& indices) {
  const char* op = "binary_one_hot";
  check_binary_one_hot(op, logits, indices);
  const int64_t n = logits.size(0), codes = int64_t(1) << logits.size(1);
  const at::Tensor idx = indices.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    VQK_CHECK(ip[i] >= 0 && ip[i] < codes, op, "indices must be in [0, 2**bits = ", codes, "), got ", ip[i], " at row ",
              i);
  at::Tensor out = at::empty({n, codes}, logits.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  // one pass: each row written once, zeros and its one
  at::parallel_for(0, n, std::max<int64_t>(1, (int64_t(1) << 16) / codes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(o + r * codes, o + (r + 1) * codes, 0.0f);
      o[r * codes + ip[r]] = 1.0f;
    }
  });
  return out;
}

at::Tensor binary_one_hot_backward(const at::Tensor& grad_one_hot, const at::Tensor& logits) {
  const char* op = "binary_one_hot_backward";
  check_binary_one_hot_backward(op, grad_one_hot, logits);
  const int64_t n = logits.size(0);
  const int bits = static_cast<int>(logits.size(1));
  at::Tensor out = at::empty({n, bits}, logits.options());
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(compute_dtype(grad_one_hot, logits), "binary_one_hot_backward", [&] {
    using T = scalar_t;
    const RowSource<T> lsrc(logits), gsrc(grad_one_hot);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "binary_one_hot_backward_out", [&] {
      scalar_t* outp = out.data_ptr<scalar_t>();
      const auto kernel = VQK_ACTIVE_ISA(backward, <T, scalar_t>);
      parallel_row_blocks<Scratch<T>>(n, [&](Scratch<T>& s, int64_t, int64_t r0, int64_t r1) {
        int64_t ldl, ldg;
        const T* lg = lsrc.rows(r0, r1 - r0, s.lg, ldl);
        const T* g = gsrc.rows(r0, r1 - r0, s.g, ldg);
        kernel(lg, ldl, g, ldg, r1 - r0, bits, s, outp + r0 * bits);
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("binary_one_hot", &vqk::cpu::binary_one_hot);
  m.impl("binary_one_hot_backward", &vqk::cpu::binary_one_hot_backward);
}
