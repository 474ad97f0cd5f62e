// CPU kernels of the lookup-free quantization ops: vqkernels::lfq_quantize (sign codes,
// indices, commitment loss) and vqkernels::lfq_entropy with its backward.
//
// lfq_entropy never forms the N x 2**d probability matrix. The logit of code c in
// {-1, +1}**d for row x is 2 * tau * <x, c>, so a row's distribution factorises over the bits,
// p(c_j = +1) = sigmoid(4 * tau * x_j), and with the bits split into a top half (da = d / 2
// bits) and a bottom half (db = d - da), p_n(c) = A[n, c_top] * B[n, c_bottom]. The batch
// average is then one GEMM, avg = A^T B / N [2**da, 2**db] (row-major: index
// c_top * 2**db + c_bottom, the code index). The backward pulls the gradient G wrt avg back
// with two more GEMMs (dA = B G^T / N, dB = A G / N) and then to the bit logits in the log
// domain: d A[n, a] / d l_j = A[n, a] * (bit_j(a) - p_j), so no probability is ever divided.
// Extra memory: O(N * 2**(d/2) + 2**d).
//
// Row weights w (optional): A's row n is scaled by w_n, so that A^T B = sum_n w_n p_n, and the
// N above becomes W = sum_n w_n (1 where it is 0); in the backward every row's gradient then
// carries its w_n once (through A in both halves' sums, and in the per-sample term). A row of
// weight 0 is skipped: zeros in A and B, gradient 0, whatever x holds.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/fixed_order_product.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

constexpr double kProbEps = 1e-5;    // vector-quantize-pytorch's clamp inside the log
constexpr int64_t kSumBlock = 4096;  // entries per partial sum over the 2**d codes (fixed: deterministic)

// Sums f(i) over [0, n) in double: fixed blocks in parallel, added in block order.
template <typename F>
double deterministic_sum(int64_t n, F&& f) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      for (int64_t i = b * kSumBlock; i < std::min(n, (b + 1) * kSumBlock); ++i) s += f(i);
      partial[b] = s;
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

// A (weighted) probability of magnitude below the smallest normal number as 0; NaN kept. Sharp distributions
// (LFQ's default inverse temperature is 100) make many pattern probabilities subnormal, and an Intel core takes a
// microcode assist of about a hundred cycles for each multiply or FMA that meets one: lfq_entropy at 16384 rows x
// 2**16 codes, tau 100, took 0.7 s on a Xeon (Emerald Rapids, 2 threads) with them, 0.11 s with them flushed
// here. Such probabilities weigh under 1.2e-38 (float) in sums whose log is clamped at 1e-5.
template <typename T>
inline T flush_subnormal(T v) {
  return std::abs(v) < std::numeric_limits<T>::min() ? T(0) : v;
}

// The 2**k probabilities of the sign patterns of k bits with per-bit probabilities p0 (bit -1)
// and p1 (bit +1), the first bit the top bit of the pattern's index: out[2i + b] = out'[i] * p_b
// (subnormal products flushed to 0).
template <typename T>
void pattern_probs(const T* p0, const T* p1, int64_t k, T* out) {
  out[0] = T(1);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = (int64_t(1) << j) - 1; i >= 0; --i) {
      const T v = out[i];
      out[2 * i + 1] = flush_subnormal(v * p1[j]);
      out[2 * i] = flush_subnormal(v * p0[j]);
    }
}

// Per-bit logits l = 4 tau x and probabilities of one row.
template <typename T>
struct BitRow {
  std::vector<T> l, p0, p1;
  void set(const T* xrow, int64_t d, T scale) {
    l.resize(d);
    p0.resize(d);
    p1.resize(d);
    for (int64_t j = 0; j < d; ++j) {
      l[j] = xrow[j] * scale;
      p1[j] = T(1) / (T(1) + std::exp(-l[j]));
      p0[j] = T(1) / (T(1) + std::exp(l[j]));
    }
  }
};

// Entropy of sigmoid(l) without cancellation: softplus(-|l|) + |l| sigmoid(-|l|), 0 at |l| = inf.
template <typename T>
T binary_entropy(T l) {
  const T a = std::abs(l), e = std::exp(-a);
  return std::log1p(e) + (std::isinf(a) ? T(0) : a * e / (T(1) + e));
}

// The A and B factors of rows [0, n): A [n, 2**da] with row r scaled by w[r], B [n, 2**db] (w null:
// every weight 1; a row of weight 0 gets zeros in both); returns sum_r w[r] * (row r's bit entropies)
// when `entropy` (else 0), summed per row, per row block and then in block order.
template <typename T>
double factor_rows(const RowSource<T>& src, int64_t n, int64_t d, T scale, const T* w, T* a, T* b, bool entropy) {
  const int64_t da = d / 2, db = d - da, ka = int64_t(1) << da, kb = int64_t(1) << db;
  std::vector<double> partial(row_block_count(n), 0.0);
  struct Scratch {
    std::vector<T> rows;
    BitRow<T> bits;
  };
  parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t block, int64_t r0, int64_t r1) {
    int64_t ld;
    const T* xr = src.rows(r0, r1 - r0, s.rows, ld);
    double h = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const T wr = w ? w[r] : T(1);
      T* ar = a + r * ka;
      T* br = b + r * kb;
      if (wr == T(0)) {
        std::fill(ar, ar + ka, T(0));
        std::fill(br, br + kb, T(0));
        continue;
      }
      s.bits.set(xr + (r - r0) * ld, d, scale);
      pattern_probs(s.bits.p0.data(), s.bits.p1.data(), da, ar);
      pattern_probs(s.bits.p0.data() + da, s.bits.p1.data() + da, db, br);
      if (wr != T(1))
        for (int64_t i = 0; i < ka; ++i) ar[i] = flush_subnormal(ar[i] * wr);
      if (entropy) {
        double hr = 0;
        for (int64_t j = 0; j < d; ++j) hr += static_cast<double>(binary_entropy(s.bits.l[j]));
        h += static_cast<double>(wr) * hr;
      }
    }
    partial[block] = h;
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

// Adds to grad_l [k] the gradient wrt the k bit logits of sum_a g[a] * probs[a], probs =
// pattern_probs(p0, p1): with w = g * probs, p0_j * sum_{bit_j(a) = 1} w[a] - p1_j * sum_{bit_j(a) = 0} w[a].
template <typename T>
void pattern_probs_backward(const T* g, const T* probs, const T* p0, const T* p1, int64_t k, T* grad_l,
                            std::vector<T>& s1, std::vector<T>& s0) {
  s1.assign(k, T(0));
  s0.assign(k, T(0));
  for (int64_t a = 0; a < (int64_t(1) << k); ++a) {
    const T w = g[a] * probs[a];
    for (int64_t j = 0; j < k; ++j) ((a >> (k - 1 - j)) & 1 ? s1[j] : s0[j]) += w;
  }
  for (int64_t j = 0; j < k; ++j) grad_l[j] += p0[j] * s1[j] - p1[j] * s0[j];
}

// lfq_entropy's row weights in the compute dtype (undefined without weights) and the divisor W of
// the weighted sums: N without weights, else the weights' sum (fixed-order, in double), 1 where it is 0.
struct RowWeights {
  at::Tensor w;
  double total;

  RowWeights(const std::optional<at::Tensor>& weights, int64_t n, at::ScalarType ct) : total(static_cast<double>(n)) {
    if (!weights) return;
    w = weights->to(ct).contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "lfq_weights", [&] {
      const scalar_t* p = w.const_data_ptr<scalar_t>();
      total = deterministic_sum(n, [&](int64_t i) { return static_cast<double>(p[i]); });
    });
    if (total == 0) total = 1;
  }

  template <typename T>
  const T* data() const {
    return w.defined() ? w.const_data_ptr<T>() : nullptr;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_quantize(const at::Tensor& x, double codebook_scale) {
  const char* op = "lfq_quantize";
  check_lfq(op, x, kLfqMaxBits);
  check_finite(op, "codebook_scale", codebook_scale);
  const int64_t n = x.size(0), d = x.size(1);
  const auto loss_opts = x.options().dtype(compute_dtype(x, x));
  at::Tensor codes = at::empty({n, d}, x.options());
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  if (n == 0) return {codes, indices, at::zeros({}, loss_opts)};
  std::vector<double> partial(row_block_count(n), 0.0);
  with_compute_type(x, x, [&](auto t) {
    using T = decltype(t);
    const RowSource<T> src(x);
    int64_t* idx = indices.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lfq_quantize", [&] {
      // +-scale rounded to T (float32 for half inputs), then to x's dtype
      const scalar_t pos = static_cast<scalar_t>(static_cast<T>(codebook_scale));
      const scalar_t neg = static_cast<scalar_t>(static_cast<T>(-codebook_scale));
      scalar_t* out = codes.data_ptr<scalar_t>();
      parallel_row_blocks<std::vector<T>>(n, [&](std::vector<T>& buf, int64_t block, int64_t r0, int64_t r1) {
        int64_t ld;
        const T* xr = src.rows(r0, r1 - r0, buf, ld);
        // Branch-free (the signs of random data would mispredict half the time): the codes are looked up, by
        // sign (and NaN), in local tables. The squared errors are summed in 8 lanes by column (j mod 8) over the
        // block's rows rather than in one chain of dependent additions. A NaN's error is NaN, as its block's sum.
        const scalar_t code[3] = {neg, pos, std::numeric_limits<scalar_t>::quiet_NaN()};
        const double code_t[2] = {static_cast<T>(neg), static_cast<T>(pos)};  // the codes as T, in double
        f64x8 sums = {};
        for (int64_t r = r0; r < r1; ++r) {
          const T* xrow = xr + (r - r0) * ld;
          scalar_t* orow = out + r * d;
          uint64_t index = 0;
          bool nan = false;
          for (int64_t j = 0; j < d; ++j) {
            const T v = xrow[j];
            const bool up = v > T(0), bad = v != v;
            index = (index << 1) | uint64_t(up);  // the first column ends up the top bit
            nan |= bad;
            orow[j] = code[bad ? 2 : up];
            const double e = static_cast<double>(v) - code_t[up];
            sums[j & 7] += e * e;
          }
          idx[r] = nan ? -1 : static_cast<int64_t>(index);
        }
        partial[block] = pairwise_sum(sums);
      });
    });
  });
  double total = 0;
  for (double v : partial) total += v;
  return {codes, indices, at::full({}, total / static_cast<double>(n * d), loss_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_entropy(const at::Tensor& x, double inv_temperature,
                                                           const std::optional<at::Tensor>& weights) {
  const NoAutocastGuard no_autocast;
  const char* op = "lfq_entropy";
  check_lfq_entropy(op, x, inv_temperature, weights);
  const int64_t n = x.size(0), d = x.size(1), da = d / 2, db = d - da;
  const auto opts = x.options().dtype(compute_dtype(x, x));
  if (n == 0) return {at::zeros({}, opts), at::zeros({}, opts), at::zeros({int64_t(1) << d}, opts)};
  at::Tensor a = at::empty({n, int64_t(1) << da}, opts), b = at::empty({n, int64_t(1) << db}, opts);
  const RowWeights rw(weights, n, compute_dtype(x, x));
  at::Tensor avg;
  double per_sample = 0, codebook = 0;
  with_compute_type(x, x, [&](auto t) {
    using T = decltype(t);
    const RowSource<T> src(x);
    per_sample = factor_rows<T>(src, n, d, static_cast<T>(4.0 * inv_temperature), rw.data<T>(), a.data_ptr<T>(),
                                b.data_ptr<T>(), true) /
                 rw.total;
    // the batch average A^T B, in a fixed order (a BLAS may split the sum over the rows by its thread count)
    avg = at::zeros({a.size(1), b.size(1)}, opts);
    fixed_order_product<T>({a.const_data_ptr<T>(), a.size(1), 1}, {b.const_data_ptr<T>(), b.size(1), 1}, n, a.size(1),
                           b.size(1), avg.data_ptr<T>(), b.size(1), true);
    avg = avg.div_(rw.total).reshape({-1});
    const T* p = avg.const_data_ptr<T>();
    codebook = -deterministic_sum(avg.numel(), [&](int64_t i) {
      const double v = static_cast<double>(p[i]);
      return v * std::log(std::max(v, kProbEps));
    });
  });
  return {at::full({}, per_sample, opts), at::full({}, codebook, opts), avg};
}

at::Tensor lfq_entropy_backward(const at::Tensor& grad_per_sample, const at::Tensor& grad_codebook,
                                const at::Tensor& grad_avg_probs, const at::Tensor& x, const at::Tensor& avg_probs,
                                double inv_temperature, const std::optional<at::Tensor>& weights) {
  const NoAutocastGuard no_autocast;
  check_lfq_entropy_backward("lfq_entropy_backward", grad_per_sample, grad_codebook, grad_avg_probs, x, avg_probs,
                             inv_temperature, weights);
  const int64_t n = x.size(0), d = x.size(1), da = d / 2, db = d - da, k = int64_t(1) << d;
  at::Tensor grad = at::empty({n, d}, x.options());
  if (n == 0) return grad;
  const auto ct = compute_dtype(x, x);
  const RowWeights rw(weights, n, ct);
  const double gps = grad_per_sample.item<double>(), gcb = grad_codebook.item<double>();
  with_compute_type(x, x, [&](auto t) {
    using T = decltype(t);
    const T scale = static_cast<T>(4.0 * inv_temperature);
    // G = d loss / d avg, over W: gcb * (-log(max(avg, eps)) - [avg >= eps]) + grad_avg_probs
    // (torch's clamp_min passes the gradient at eps itself)
    const at::Tensor avg = avg_probs.to(ct).contiguous(), gavg = grad_avg_probs.to(ct).contiguous();
    at::Tensor g = at::empty({int64_t(1) << da, int64_t(1) << db}, x.options().dtype(ct));
    {
      const T* ap = avg.const_data_ptr<T>();
      const T* gp = gavg.const_data_ptr<T>();
      T* out = g.data_ptr<T>();
      at::parallel_for(0, k, kSumBlock, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const T v = ap[i];
          const T dv = -(std::log(std::max(v, T(kProbEps))) + (v >= T(kProbEps) ? T(1) : T(0)));
          out[i] = (static_cast<T>(gcb) * dv + gp[i]) / static_cast<T>(rw.total);
        }
      });
    }
    at::Tensor a = at::empty({n, int64_t(1) << da}, g.options()), b = at::empty({n, int64_t(1) << db}, g.options());
    const RowSource<T> src(x);
    const T* w = rw.data<T>();
    factor_rows<T>(src, n, d, scale, w, a.data_ptr<T>(), b.data_ptr<T>(), false);
    const at::Tensor ga = at::mm(b, g.t()), gb = at::mm(a, g);  // d loss / dA, d loss / dB
    const T* ap = a.const_data_ptr<T>();
    const T* bp = b.const_data_ptr<T>();
    const T* gap = ga.const_data_ptr<T>();
    const T* gbp = gb.const_data_ptr<T>();
    const T gl = static_cast<T>(gps / rw.total);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lfq_entropy_backward", [&] {
      scalar_t* out = grad.data_ptr<scalar_t>();
      struct Scratch {
        std::vector<T> rows, grad_l, s1, s0;
        BitRow<T> bits;
      };
      parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
        int64_t ld;
        const T* xr = src.rows(r0, r1 - r0, s.rows, ld);
        for (int64_t r = r0; r < r1; ++r) {
          const T wr = w ? w[r] : T(1);
          if (wr == T(0)) {
            std::fill(out + r * d, out + (r + 1) * d, scalar_t(0));
            continue;
          }
          s.bits.set(xr + (r - r0) * ld, d, scale);
          const T* p0 = s.bits.p0.data();
          const T* p1 = s.bits.p1.data();
          const T glr = gl * wr;  // the pattern sums below carry w[r] through A
          s.grad_l.resize(d);
          for (int64_t j = 0; j < d; ++j) {  // per-sample entropy: d H(sigmoid(l)) / dl = -l p1 p0
            const T l = s.bits.l[j];
            s.grad_l[j] = std::isinf(l) ? T(0) : glr * (-l * p1[j] * p0[j]);
          }
          pattern_probs_backward(gap + r * (int64_t(1) << da), ap + r * (int64_t(1) << da), p0, p1, da, s.grad_l.data(),
                                 s.s1, s.s0);
          pattern_probs_backward(gbp + r * (int64_t(1) << db), bp + r * (int64_t(1) << db), p0 + da, p1 + da, db,
                                 s.grad_l.data() + da, s.s1, s.s0);
          for (int64_t j = 0; j < d; ++j) out[r * d + j] = static_cast<scalar_t>(s.grad_l[j] * scale);
        }
      });
    });
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("lfq_quantize", &vqk::cpu::lfq_quantize);
  m.impl("lfq_entropy", &vqk::cpu::lfq_entropy);
  m.impl("lfq_entropy_backward", &vqk::cpu::lfq_entropy_backward);
}
