// CPU kernels of vqkernels::vq_quantize (fused search + lookup + losses) and its backward.
#include <torch/library.h>

#include "cpu/scatter.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

// The backward's two row updates, d < D. Restrict lets the compiler vectorise them: with loads that might alias the
// store they stayed scalar and took most of the backward.
// out[d] = g[d] + a * (x[d] - q[d])
template <typename T>
inline void add_scaled_difference(T* __restrict out, const T* __restrict g, T a, const T* __restrict x,
                                  const T* __restrict q, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = g[d] + a * (x[d] - q[d]);
}

// acc[d] += a * (x[d] - q[d])
template <typename T>
inline void accumulate_scaled_difference(T* __restrict acc, T a, const T* __restrict x, const T* __restrict q,
                                         int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += a * (x[d] - q[d]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize(const at::Tensor& x, const at::Tensor& codebook,
                                                                       c10::string_view metric_name) {
  const Metric metric = check_search("vq_quantize", x, codebook, metric_name);
  const int64_t n = x.size(0), D = x.size(1);
  const auto loss_opts = x.options().dtype(compute_dtype(x, codebook));
  at::Tensor quantized = at::empty({n, D}, x.options());
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  if (n == 0 || D == 0) {
    indices.zero_();  // D == 0: every code is at distance 0 and the first wins
    return {quantized, indices, at::zeros({}, loss_opts), at::zeros({}, loss_opts)};
  }
  std::vector<double> partial(row_block_count(n), 0.0);  // per-block sums, added in block order: deterministic
  with_compute_type(x, codebook, [&](auto t) {
    using T = decltype(t);
    const PackedCodebook<T> pc = pack_codebook<T>(codebook, metric);
    // The raw rows to look up: the packed codebook's own rows, except for cosine, where those
    // are normalised and the raw codebook is converted once more.
    at::Tensor raw;
    if (metric == Metric::Cosine) raw = codebook.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* cbp = metric == Metric::Cosine ? raw.const_data_ptr<T>() : pc.row(0);
    const RowSource<T> src(x);
    int64_t* idx = indices.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vq_quantize", [&] {
      scalar_t* q = quantized.data_ptr<scalar_t>();
      struct Scratch {
        std::vector<T> rows, best, dist;
        std::vector<int32_t> bidx;
      };
      parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t block, int64_t r0, int64_t r1) {
        int64_t ld;
        const T* xr = src.rows(r0, r1 - r0, s.rows, ld);
        s.dist.resize(r1 - r0);
        nearest_rows(pc, xr, ld, r1 - r0, s.best, s.bidx, idx + r0, s.dist.data());
        double sum = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const T* xrow = xr + (r - r0) * ld;
          scalar_t* qrow = q + r * D;
          const int64_t k = idx[r];
          if (k < 0) {
            std::fill(qrow, qrow + D, std::numeric_limits<scalar_t>::quiet_NaN());
            sum = std::numeric_limits<double>::quiet_NaN();
            continue;
          }
          const T* c = cbp + k * D;
          for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<scalar_t>(c[d]);
          sum += pc.exact(xrow, c, D, Metric::L2);  // |x - c|^2 in double, in lanes (not one chain of D additions)
        }
        partial[block] = sum;
      });
    });
  });
  double total = 0;
  for (double v : partial) total += v;
  at::Tensor loss = at::full({}, total / static_cast<double>(n * D), loss_opts);
  return {quantized, indices, loss, loss.clone()};
}

std::tuple<at::Tensor, at::Tensor> vq_quantize_backward(const at::Tensor& grad_quantized,
                                                        const at::Tensor& grad_commit_loss,
                                                        const at::Tensor& grad_codebook_loss, const at::Tensor& x,
                                                        const at::Tensor& codebook, const at::Tensor& indices) {
  const char* op = "vq_quantize_backward";
  check_vq_quantize_backward(op, grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices);
  const int64_t n = x.size(0), D = x.size(1), K = codebook.size(0);
  const auto ct = compute_dtype(x, codebook);
  const double scale = 2.0 / static_cast<double>(std::max<int64_t>(n * D, 1));
  const double a = grad_commit_loss.item<double>() * scale, b = grad_codebook_loss.item<double>() * scale;
  at::Tensor gx = at::empty({n, D}, x.options().dtype(ct));
  at::Tensor gcb = at::zeros({K, D}, codebook.options().dtype(ct));
  const at::Tensor xs = x.to(ct).contiguous(), cb = codebook.to(ct).contiguous(), idx = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "vq_quantize_backward", [&] {
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    const scalar_t* cp = cb.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gcp = gcb.data_ptr<scalar_t>();
    const RowSource<scalar_t> gsrc(grad_quantized);  // read in place (any layout), converted block by block if needed
    const std::vector<scalar_t> nan_row(D, std::numeric_limits<scalar_t>::quiet_NaN());  // the code of index -1
    parallel_row_blocks<std::vector<scalar_t>>(n, [&](std::vector<scalar_t>& buf, int64_t, int64_t r0, int64_t r1) {
      int64_t ldg;
      const scalar_t* g = gsrc.rows(r0, r1 - r0, buf, ldg);
      for (int64_t r = r0; r < r1; ++r, g += ldg) {
        const scalar_t* q = ip[r] >= 0 ? cp + ip[r] * D : nan_row.data();
        add_scaled_difference(gxp + r * D, g, static_cast<scalar_t>(a), xp + r * D, q, D);
      }
    });
    scatter_by_code(ip, n, K, [&](int64_t k, int64_t r) {
      accumulate_scaled_difference(gcp + k * D, static_cast<scalar_t>(b), cp + k * D, xp + r * D, D);
    });
  });
  return {gx.to(x.scalar_type()), gcb.to(codebook.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("vq_quantize", &vqk::cpu::vq_quantize);
  m.impl("vq_quantize_backward", &vqk::cpu::vq_quantize_backward);
}
