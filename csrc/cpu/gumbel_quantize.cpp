// CPU kernels of vqkernels::gumbel_quantize (Gumbel-softmax quantization with
// taming-transformers' KL-to-uniform term) and its backward.
//
// Rows are processed in blocks (parallel_row_blocks); a row's softmaxes live in the task's
// scratch (K values each), never in an N x K buffer; its exponentials, logarithms and sums
// are softmax_rows.h's row primitives. The soft lookup y @ codebook is one matrix product
// per row block, summed over the codes in a fixed order (fixed_order_product.h: MKL splits
// such sums by its thread count, even inside a parallel task); the hard lookup copies the
// chosen row.
//
// The backward recomputes both softmaxes. Its first pass, over row blocks, forms the logits'
// gradient: y's softmax Jacobian applied to grad_quantized @ codebook^T (also for hard: the
// straight-through value's gradient is y's), plus the KL term's. The codebook's gradient is
// then a scatter of grad_quantized rows by index (hard) or y^T @ grad_quantized (soft),
// computed per fixed chunk of codes over fixed tiles of rows (y recomputed from the row's
// saved maximum and normaliser). Every product is a fixed-order one, so every sum runs in
// the same order for any thread count.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/fixed_order_product.h"
#include "cpu/scatter.h"
#include "cpu/search.h"
#include "cpu/softmax_rows.h"

namespace vqk {
namespace cpu {
namespace {

constexpr double kKlEps = 1e-10;   // taming-transformers: sum_k q_k log(q_k K + 1e-10)
constexpr int64_t kRowTile = 512;  // rows per product of the soft codebook gradient

// Codes per task of the soft codebook gradient: small codebooks still give every thread work.
inline int64_t code_chunk(int64_t K) { return K <= 256 ? 16 : 128; }

// y = softmax(s * scale), given smax = max(s) (NaN: the row comes out NaN); y may be s.
// Returns the normaliser 1 / sum_k exp((s_k - smax) * scale).
template <typename T>
T softmax_row(const T* s, int64_t K, T smax, T scale, T* y) {
  const T inv = static_cast<T>(1.0 / exp_row(s, K, smax, scale, y));
  for (int64_t k = 0; k < K; ++k) y[k] *= inv;
  return inv;
}

// sum_k q_k log(q_k K + 1e-10) with q = softmax(l), q a scratch row of K values. NaN where
// torch's softmax is NaN: a NaN or +inf in l, or every entry -inf.
template <typename T>
double kl_row(const T* l, int64_t K, T* q) {
  const T m = row_max(l, K);
  if (!std::isfinite(m)) return std::numeric_limits<double>::quiet_NaN();
  softmax_row(l, K, m, T(1), q);
  return xlog_row(q, K, static_cast<T>(K), static_cast<T>(kKlEps));
}

// out += c * d(kl_row)/dl = c * q (f - <q, f>), f_k = log(q_k K + eps) + q_k K / (q_k K + eps).
template <typename T>
void add_kl_grad(const T* l, int64_t K, T c, T* q, T* f, T* out) {
  const T m = row_max(l, K);
  if (!std::isfinite(m)) {
    std::fill(out, out + K, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  softmax_row(l, K, m, T(1), q);
  const T qf = static_cast<T>(kl_deriv_row(q, K, static_cast<T>(K), static_cast<T>(kKlEps), f));
  for (int64_t k = 0; k < K; ++k) out[k] += c * q[k] * (f[k] - qf);
}

// The [rows, cols] block of the 2-D tensor t at (r0, c0), converted to T, row-major into out.
template <typename T>
void load_block(const at::Tensor& t, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* out) {
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "vqk_load_block", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>() + r0 * s0 + c0 * s1;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = static_cast<T>(p[i * s0 + j * s1]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_quantize(const at::Tensor& logits, const at::Tensor& codebook,
                                                               const at::Tensor& gumbels, double tau, bool hard) {
  const NoAutocastGuard no_autocast;
  const char* op = "gumbel_quantize";
  check_gumbel(op, logits, codebook, gumbels, tau);
  const int64_t n = logits.size(0), K = logits.size(1), D = codebook.size(1);
  const auto ct = compute_dtype(logits, codebook, gumbels);
  const auto out_type = at::promote_types(logits.scalar_type(), codebook.scalar_type());
  at::Tensor quantized = at::empty({n, D}, logits.options().dtype(out_type));
  at::Tensor indices = at::empty({n}, logits.options().dtype(at::kLong));
  if (n == 0) return {quantized, indices, at::zeros({}, logits.options().dtype(ct))};
  const at::Tensor cb = codebook.to(ct).contiguous();
  std::vector<double> partial(row_block_count(n), 0.0);  // per-block KL sums, added in block order
  AT_DISPATCH_FLOATING_TYPES(ct, "gumbel_quantize", [&] {
    using T = scalar_t;
    const RowSource<T> lsrc(logits), gsrc(gumbels);
    const T* cbp = cb.const_data_ptr<T>();
    const T scale = static_cast<T>(1.0 / tau);
    int64_t* idx = indices.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "gumbel_quantize_out", [&] {
      scalar_t* qp = quantized.data_ptr<scalar_t>();
      struct Scratch {
        std::vector<T> lrows, grows, s, q;
        std::vector<T> y, out;  // soft: the block's y [rows, K] and y @ codebook [rows, D]
      };
      parallel_row_blocks<Scratch>(n, [&](Scratch& w, int64_t block, int64_t r0, int64_t r1) {
        const int64_t rows = r1 - r0;
        int64_t ldl, ldg;
        const T* l = lsrc.rows(r0, rows, w.lrows, ldl);
        const T* g = gsrc.rows(r0, rows, w.grows, ldg);
        w.q.resize(K);
        if (hard)
          w.s.resize(K);
        else
          w.y.resize(rows * K);
        T* y = hard ? nullptr : w.y.data();
        double kl = 0;
        for (int64_t i = 0; i < rows; ++i) {
          T* s = hard ? w.s.data() : y + i * K;
          T smax;
          const int64_t k = score_row(l + i * ldl, g + i * ldg, K, s, smax);
          idx[r0 + i] = k;
          kl += kl_row(l + i * ldl, K, w.q.data());
          if (!hard) {
            softmax_row(s, K, smax, scale, s);
          } else if (k < 0) {
            std::fill(qp + (r0 + i) * D, qp + (r0 + i + 1) * D, std::numeric_limits<scalar_t>::quiet_NaN());
          } else {
            for (int64_t d = 0; d < D; ++d) qp[(r0 + i) * D + d] = static_cast<scalar_t>(cbp[k * D + d]);
          }
        }
        partial[block] = kl;
        if (!hard) {
          w.out.assign(rows * D, T(0));
          fixed_order_product<T>({y, 1, K}, {cbp, D, 1}, K, rows, D, w.out.data(), D, false);
          for (int64_t i = 0; i < rows * D; ++i) qp[r0 * D + i] = static_cast<scalar_t>(w.out[i]);
        }
      });
    });
  });
  double total = 0;
  for (double v : partial) total += v;
  return {quantized, indices, at::full({}, total / static_cast<double>(n), logits.options().dtype(ct))};
}

std::tuple<at::Tensor, at::Tensor> gumbel_quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& grad_kl,
                                                            const at::Tensor& logits, const at::Tensor& codebook,
                                                            const at::Tensor& gumbels, const at::Tensor& indices,
                                                            double tau, bool hard) {
  const NoAutocastGuard no_autocast;
  const char* op = "gumbel_quantize_backward";
  check_gumbel_backward(op, grad_quantized, grad_kl, logits, codebook, gumbels, indices, tau);
  const int64_t n = logits.size(0), K = logits.size(1), D = codebook.size(1);
  const auto ct = compute_dtype(logits, codebook, gumbels);
  at::Tensor grad_logits = at::empty({n, K}, logits.options().dtype(ct));
  at::Tensor grad_codebook = at::zeros({K, D}, codebook.options().dtype(ct));
  if (n == 0) return {grad_logits.to(logits.scalar_type()), grad_codebook.to(codebook.scalar_type())};
  const double c = grad_kl.item<double>() / static_cast<double>(n);
  const at::Tensor cb = codebook.to(ct).contiguous(), gq = grad_quantized.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "gumbel_quantize_backward", [&] {
    using T = scalar_t;
    const RowSource<T> lsrc(logits), gsrc(gumbels);
    const T scale = static_cast<T>(1.0 / tau), kl_scale = static_cast<T>(c);
    // soft: each row's softmax maximum and normaliser, for the codebook pass
    std::vector<T> smax(hard ? 0 : n), norm(hard ? 0 : n);
    T* glp = grad_logits.data_ptr<T>();
    const T* gp = gq.const_data_ptr<T>();
    const at::Tensor cbt = cb.t().contiguous();  // [D, K]: the rows of the first pass's product
    const T* cbtp = cbt.const_data_ptr<T>();
    struct Scratch {
      std::vector<T> lrows, grows, y, q, f;
    };
    parallel_row_blocks<Scratch>(n, [&](Scratch& w, int64_t, int64_t r0, int64_t r1) {
      const int64_t rows = r1 - r0;
      int64_t ldl, ldg;
      const T* l = lsrc.rows(r0, rows, w.lrows, ldl);
      const T* g = gsrc.rows(r0, rows, w.grows, ldg);
      w.y.resize(K);
      // dL/dy = grad_quantized @ codebook^T, straight into the block's rows of grad_logits
      std::fill(glp + r0 * K, glp + r1 * K, T(0));
      fixed_order_product<T>({gp + r0 * D, 1, D}, {cbtp, K, 1}, D, rows, K, glp + r0 * K, K, false);
      for (int64_t i = 0; i < rows; ++i) {
        const T* li = l + i * ldl;
        T* gl = glp + (r0 + i) * K;
        T m;
        score_row(li, g + i * ldg, K, w.y.data(), m);
        const T inv = softmax_row(w.y.data(), K, m, scale, w.y.data());
        if (!hard) {
          smax[r0 + i] = m;
          norm[r0 + i] = inv;
        }
        const T yd = static_cast<T>(dot_row(w.y.data(), gl, K));
        for (int64_t k = 0; k < K; ++k) gl[k] = w.y[k] * (gl[k] - yd) * scale;
        if (c != 0) {  // a zero grad_kl adds nothing, not even a NaN row's NaN
          w.q.resize(K);
          w.f.resize(K);
          add_kl_grad(li, K, kl_scale, w.q.data(), w.f.data(), gl);
        }
      }
    });
    T* gc = grad_codebook.data_ptr<T>();
    if (hard) {
      const at::Tensor idx = indices.contiguous();
      scatter_by_code(idx.const_data_ptr<int64_t>(), n, K, [&](int64_t k, int64_t r) {
        for (int64_t d = 0; d < D; ++d) gc[k * D + d] += gp[r * D + d];
      });
      return;
    }
    const int64_t chunk = code_chunk(K), chunks = (K + chunk - 1) / chunk;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> lt(kRowTile * chunk), gt(kRowTile * chunk), yt(kRowTile * chunk);
      T* yp = yt.data();
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t k0 = ch * chunk, kc = std::min(chunk, K - k0);
        for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
          const int64_t rows = std::min(kRowTile, n - r0);
          load_block(logits, r0, rows, k0, kc, lt.data());
          load_block(gumbels, r0, rows, k0, kc, gt.data());
          for (int64_t i = 0; i < rows; ++i) {  // y's columns [k0, k0 + kc), as the first pass formed them
            T* s = lt.data() + i * kc;
            for (int64_t j = 0; j < kc; ++j) s[j] += gt[i * kc + j];
            T* y = yp + i * chunk;
            exp_row(s, kc, smax[r0 + i], scale, y);
            for (int64_t j = 0; j < kc; ++j) y[j] *= norm[r0 + i];
          }
          fixed_order_product<T>({yp, chunk, 1}, {gp + r0 * D, D, 1}, rows, kc, D, gc + k0 * D, D, false);
        }
      }
    });
  });
  return {grad_logits.to(logits.scalar_type()), grad_codebook.to(codebook.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("gumbel_quantize", &vqk::cpu::gumbel_quantize);
  m.impl("gumbel_quantize_backward", &vqk::cpu::gumbel_quantize_backward);
}
