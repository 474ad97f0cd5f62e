// CPU kernels of vqkernels::binary_one_hot (BinaryMapper's one-hot of sampled bit codes, Fleuret 2025,
// arXiv:2510.17558) and its backward, the gradient of the joint code probabilities
//     G[n, c] = prod_b p[n, b]^c_b (1 - p[n, b])^(1 - c_b),   p = sigmoid(logits),  c_b = (c >> b) & 1:
//     grad_logits[n, b] = sum_c g[n, c] G[n, c] (c_b - p[n, b]).
// G factors into a table over the low bits times one over the high bits, G[h L + l] = low[l] high[h], so one pass
// over a row of g gives u[l] = sum_h high[h] g[h L + l] and v[h] = sum_l low[l] g[h L + l], and from them every sum
// the gradient needs: S = sum_c g G = sum_l low[l] u[l], the low bits' sum_l low[l] u[l] l_b and the high bits'
// sum_h high[h] v[h] h_b. G is never formed: two multiply-adds per element of g and O(2^(bits/2)) scratch.
// Rows in parallel blocks, and in a block 8 rows at a time, one a vector lane: their entries of g are read 8 x 8 and
// transposed, so the two sums, the probabilities, tables and bit sums of 8 rows run as one row's would (a row at a
// time, the per-row work and the horizontal sums took most of the time: 6.2 -> 1.7 ms at 16384 x 8 bits on one
// thread). Float32 sums (float64 for float64 logits).
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

constexpr int kGroupRows = 8;  // rows of a group: row i of the group is lane i of every vector

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

// p = sigmoid(l) and q = 1 - p of one bit of a group's rows, each from one exp without cancellation: with
// e = exp(-|l|), the larger is 1 / (1 + e) and the smaller e / (1 + e).
template <typename T>
VQK_LANES void bit_probs(Vec<T> l, Vec<T>& p, Vec<T>& q) {
  if constexpr (std::is_same<T, float>::value) {
    const f32x8 e = exp_neg(l < 0.0f ? -l : l), big = 1.0f / (1.0f + e), small = e * big;
    p = l >= 0.0f ? big : small;  // NaN: small (NaN) both
    q = l >= 0.0f ? small : big;
  } else {
    for (int i = 0; i < kGroupRows; ++i) {
      const T e = std::exp(-std::abs(l[i])), big = T(1) / (T(1) + e), small = e * big;
      p[i] = l[i] >= 0 ? big : small;
      q[i] = l[i] >= 0 ? small : big;
    }
  }
}

// table[i] = prod_{b < count} (bit b of i ? p[b] : q[b]), i < 2^count, built bit by bit (doubling).
template <typename V>
VQK_LANES void bit_table(const V* p, const V* q, int count, V* table) {
  table[0] = V{} + 1;
  for (int b = 0; b < count; ++b) {
    const int64_t half = int64_t(1) << b;
    for (int64_t i = 0; i < half; ++i) {
      table[i + half] = table[i] * p[b];
      table[i] *= q[b];
    }
  }
}

// sum_i w[i] over the i with bit b set, in increasing i, for each b < count, into out[0..count).
template <typename V>
VQK_LANES void bit_sums(const V* w, int count, V* out) {
  for (int b = 0; b < count; ++b) {
    V sum = {};
    for (int64_t i = int64_t(1) << b; i < (int64_t(1) << count); i = (i + 1) | (int64_t(1) << b)) sum += w[i];
    out[b] = sum;
  }
}

// col[j] = the kGroupRows rows' entries c + j (j < kGroupRows): kGroupRows row vectors loaded and transposed.
template <typename T>
VQK_LANES void load_columns(const T* const* rows, int64_t c, Vec<T>* col) {
  using V = Vec<T>;
  V r[kGroupRows];
  for (int i = 0; i < kGroupRows; ++i) std::memcpy(&r[i], rows[i] + c, sizeof(V));
  V t[kGroupRows], s[kGroupRows];
  for (int i = 0; i < kGroupRows; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < kGroupRows; i += 4)
    for (int k = 0; k < 2; ++k) {
      s[i + 2 * k] = __builtin_shufflevector(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      s[i + 2 * k + 1] = __builtin_shufflevector(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    col[j] = __builtin_shufflevector(s[j], s[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    col[j + 4] = __builtin_shufflevector(s[j], s[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

template <typename T>
struct Scratch {
  std::vector<T> lg, g;   // converted rows of logits and of the gradient
  std::vector<T> tables;  // a group's vectors p, q [bits], low, u [L], high, v [H], sized once a block

  // The tables' first vector: `count` vectors, aligned (a vector type as a template argument loses its alignment).
  Vec<T>* vectors(int64_t count) {
    tables.resize((count + 1) * kGroupRows);
    const auto at = reinterpret_cast<std::uintptr_t>(tables.data());
    return reinterpret_cast<Vec<T>*>((at + sizeof(Vec<T>) - 1) / sizeof(Vec<T>) * sizeof(Vec<T>));
  }
};

// grad_logits of a group of kGroupRows rows (row i: logits lg[i][bits], g[i][2^bits]) into out[i][bits] for i < valid.
template <typename T, typename S>
VQK_LANES void backward_group(const T* const* lg, const T* const* g, int bits, Vec<T>* tables, int valid, S* out) {
  using V = Vec<T>;
  const int lo = bits / 2, hi = bits - lo;
  const int64_t L = int64_t(1) << lo, H = int64_t(1) << hi, C = L * H;
  V *p = tables, *q = p + bits, *low = q + bits, *u = low + L, *high = u + L, *v = high + H;
  V sums[kMaxOneHotBits];  // per bit: sum_c g[c] G[c] c_b
  for (int b = 0; b < bits; ++b) {
    V l;
    for (int i = 0; i < kGroupRows; ++i) l[i] = lg[i][b];
    bit_probs<T>(l, p[b], q[b]);
  }
  bit_table(p, q, lo, low);
  bit_table(p + lo, q + lo, hi, high);
  // u[l] = sum_h high[h] g[h L + l] in increasing h, v[h] = sum_l low[l] g[h L + l] in increasing l
  std::fill(v, v + H, V{});
  if (L >= kGroupRows) {  // kGroupRows low codes at a time, their u in registers over every h
    for (int64_t l0 = 0; l0 < L; l0 += kGroupRows) {
      V acc[kGroupRows] = {};
      for (int64_t h = 0; h < H; ++h) {
        V col[kGroupRows];
        load_columns(g, h * L + l0, col);
        V vh = v[h];
        for (int j = 0; j < kGroupRows; ++j) {
          acc[j] += high[h] * col[j];
          vh += low[l0 + j] * col[j];
        }
        v[h] = vh;
      }
      std::memcpy(u + l0, acc, sizeof acc);
    }
  } else {  // fewer than kGroupRows low codes (bits < 6): code by code, in increasing c
    std::fill(u, u + L, V{});
    const auto add = [&](int64_t c, V col) {
      const int64_t h = c >> lo, l = c & (L - 1);
      u[l] += high[h] * col;
      v[h] += low[l] * col;
    };
    for (int64_t c0 = 0; c0 < C; c0 += kGroupRows) {
      V col[kGroupRows];
      if (C >= kGroupRows) {
        load_columns(g, c0, col);
      } else {  // fewer codes than lanes (bits < 3)
        for (int64_t c = 0; c < C; ++c)
          for (int i = 0; i < kGroupRows; ++i) col[c][i] = g[i][c];
      }
      for (int64_t j = 0; j < std::min<int64_t>(kGroupRows, C); ++j) add(c0 + j, col[j]);
    }
  }
  V total = {};
  for (int64_t l = 0; l < L; ++l) {
    u[l] *= low[l];  // low[l] u[l]
    total += u[l];
  }
  for (int64_t h = 0; h < H; ++h) v[h] *= high[h];  // high[h] v[h]
  bit_sums(u, lo, sums);
  bit_sums(v, hi, sums + lo);
  for (int b = 0; b < bits; ++b) {
    const V grad = sums[b] - p[b] * total;
    for (int i = 0; i < valid; ++i) out[i * bits + b] = static_cast<S>(grad[i]);
  }
}

// `rows` rows (strides ldl, ldg) into out [rows][bits], kGroupRows rows a group (a last, shorter group repeats its last
// row in the lanes it does not store): one body per ISA, every lane's arithmetic the same sequence of roundings (no
// contraction), so the same bits on each ISA and in every lane.
#define VQK_ONE_HOT_BACKWARD(NAME, TARGET)                                                                    \
  template <typename T, typename S>                                                                           \
  TARGET VQK_NO_CONTRACT void NAME(const T* lg, int64_t ldl, const T* g, int64_t ldg, int64_t rows, int bits, \
                                   Scratch<T>& s, S* out) {                                                   \
    const int64_t L = int64_t(1) << (bits / 2), H = int64_t(1) << (bits - bits / 2);                          \
    Vec<T>* tables = s.vectors(2 * bits + 2 * L + 2 * H);                                                     \
    for (int64_t r0 = 0; r0 < rows; r0 += kGroupRows) {                                                       \
      const int valid = static_cast<int>(std::min<int64_t>(kGroupRows, rows - r0));                           \
      const T* lrow[kGroupRows];                                                                              \
      const T* grow[kGroupRows];                                                                              \
      for (int i = 0; i < kGroupRows; ++i) {                                                                  \
        const int64_t r = r0 + std::min(i, valid - 1);                                                        \
        lrow[i] = lg + r * ldl;                                                                               \
        grow[i] = g + r * ldg;                                                                                \
      }                                                                                                       \
      backward_group(lrow, grow, bits, tables, valid, out + r0 * bits);                                       \
    }                                                                                                         \
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
