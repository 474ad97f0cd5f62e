// CPU kernels of vqkernels::multiscale_quantize_step (one scale of VAR's multi-scale residual
// quantizer: area downsampling, nearest-code search and lookup in one pass) and its backward.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/scatter.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

constexpr int64_t kSerialScatter = 1 << 20;  // cells x channels up to which the backward runs on one thread

// The input window of output cell o along an axis of n_in inputs and n_out outputs, as
// adaptive average pooling (F.interpolate(mode='area')) takes it: [floor(o * n_in / n_out),
// ceil((o + 1) * n_in / n_out)).
inline int64_t window_start(int64_t o, int64_t n_in, int64_t n_out) { return (o * n_in) / n_out; }
inline int64_t window_end(int64_t o, int64_t n_in, int64_t n_out) { return ((o + 1) * n_in + n_out - 1) / n_out; }

// Rows [r0, r1) of the area-downsampled f_rest, channels last, as T into out [r1 - r0][C].
// Row r is the output cell (b, y, x) with r = (b * ph + y) * pw + x. Each channel's window is
// summed in f_rest's opmath type, rows of the window outer and columns inner, divided by the
// window's height then its width, and rounded to f_rest's dtype: what adaptive_avg_pool2d
// computes (and F.interpolate returns) for a contiguous f_rest and an output larger than 1 x 1.
// For a 1 x 1 output PyTorch takes the mean over (H, W) instead, and so do we (of f_rest made
// contiguous, so that the result never depends on the layout): `means` [B, C] holds it.
template <typename scalar_t, typename T>
void area_rows(const at::Tensor& f_rest, const at::Tensor& means, int64_t ph, int64_t pw, int64_t r0, int64_t r1,
               T* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = f_rest.size(1), H = f_rest.size(2), W = f_rest.size(3);
  if (means.defined()) {
    const scalar_t* m = means.const_data_ptr<scalar_t>();
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < C; ++c) out[(r - r0) * C + c] = static_cast<T>(m[r * C + c]);
    return;
  }
  const int64_t sb = f_rest.stride(0), sc = f_rest.stride(1), sh = f_rest.stride(2), sw = f_rest.stride(3);
  const scalar_t* src = f_rest.const_data_ptr<scalar_t>();
  std::vector<acc_t> acc(C);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t x = r % pw, y = (r / pw) % ph, b = r / (pw * ph);
    const int64_t h0 = window_start(y, H, ph), h1 = window_end(y, H, ph);
    const int64_t w0 = window_start(x, W, pw), w1 = window_end(x, W, pw);
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t i = h0; i < h1; ++i)
      for (int64_t j = w0; j < w1; ++j) {
        const scalar_t* px = src + b * sb + i * sh + j * sw;
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(px[c * sc]);
      }
    const acc_t kh = static_cast<acc_t>(h1 - h0), kw = static_cast<acc_t>(w1 - w0);
    T* o = out + (r - r0) * C;
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(static_cast<scalar_t>(acc[c] / kh / kw));
  }
}

std::tuple<at::Tensor, at::Tensor> multiscale_quantize_step(const at::Tensor& f_rest, const at::Tensor& codebook,
                                                            at::IntArrayRef pn, c10::string_view metric_name) {
  const char* op = "multiscale_quantize_step";
  const Metric metric = check_multiscale(op, f_rest, codebook, pn, metric_name);
  const int64_t B = f_rest.size(0), C = f_rest.size(1), ph = pn[0], pw = pn[1];
  const int64_t n = B * ph * pw;
  at::Tensor indices = at::empty({B, ph, pw}, f_rest.options().dtype(at::kLong));
  at::Tensor h = at::empty({B, C, ph, pw}, codebook.options());
  if (n == 0) return {indices, h};
  if (C == 0) {  // every code is at distance 0 and the first wins
    indices.zero_();
    return {indices, h};
  }
  int64_t* idx = indices.data_ptr<int64_t>();
  const at::Tensor means = ph == 1 && pw == 1 ? f_rest.contiguous().mean({2, 3}) : at::Tensor();
  with_compute_type(f_rest, codebook, [&](auto t) {
    using T = decltype(t);
    const PackedCodebook<T> pc = pack_codebook<T>(codebook, metric);
    struct Scratch {
      std::vector<T> rows, best, dist;
      std::vector<int32_t> bidx;
    };
    parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
      s.rows.resize((r1 - r0) * C);
      s.dist.resize(r1 - r0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f_rest.scalar_type(), "multiscale_area",
                                      [&] { area_rows<scalar_t>(f_rest, means, ph, pw, r0, r1, s.rows.data()); });
      nearest_rows(pc, s.rows.data(), C, r1 - r0, s.best, s.bidx, idx + r0, s.dist.data());
      // h[b, :, y, x] = codebook[idx[r]], NCHW, in the codebook's dtype (NaN for index -1).
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "multiscale_lookup", [&] {
        const scalar_t* cb = codebook.const_data_ptr<scalar_t>();
        const int64_t cs0 = codebook.stride(0), cs1 = codebook.stride(1), plane = ph * pw;
        scalar_t* hp = h.data_ptr<scalar_t>();
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t cell = r % plane;
          scalar_t* dst = hp + (r / plane) * C * plane + cell;
          const int64_t k = idx[r];
          for (int64_t c = 0; c < C; ++c)
            dst[c * plane] = k >= 0 ? cb[k * cs0 + c * cs1] : std::numeric_limits<scalar_t>::quiet_NaN();
        }
      });
    });
  });
  return {indices, h};
}

at::Tensor multiscale_quantize_step_backward(const at::Tensor& grad_h, const at::Tensor& codebook,
                                             const at::Tensor& indices) {
  const char* op = "multiscale_quantize_step_backward";
  check_multiscale_backward(op, grad_h, codebook, indices);
  const int64_t K = codebook.size(0), C = codebook.size(1);
  const int64_t ph = grad_h.size(2), pw = grad_h.size(3), plane = ph * pw, n = grad_h.size(0) * plane;
  const auto ct = compute_dtype(grad_h, codebook);
  at::Tensor acc = at::zeros({K, C}, codebook.options().dtype(ct));
  const at::Tensor idx = indices.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(ct, "multiscale_backward", [&] {
    using acc_t = scalar_t;
    acc_t* out = acc.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_h.scalar_type(), "multiscale_backward_grad", [&] {
      const scalar_t* g = grad_h.const_data_ptr<scalar_t>();
      const int64_t sb = grad_h.stride(0), sc = grad_h.stride(1), sh = grad_h.stride(2), sw = grad_h.stride(3);
      auto add_row = [&](int64_t k, int64_t r) {
        const int64_t cell = r % plane;
        const scalar_t* src = g + (r / plane) * sb + (cell / pw) * sh + (cell % pw) * sw;
        acc_t* dst = out + k * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<acc_t>(src[c * sc]);
      };
      // Per code, its rows in increasing order either way: the same sums whatever the thread
      // count. VAR's scales are small (B * 256 cells at most): a parallel region costs more
      // than the adds there.
      if (n * C <= kSerialScatter) {
        for (int64_t r = 0; r < n; ++r)
          if (ip[r] >= 0) add_row(ip[r], r);
      } else {
        scatter_by_code(ip, n, K, add_row);
      }
    });
  });
  return acc.to(codebook.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("multiscale_quantize_step", &vqk::cpu::multiscale_quantize_step);
  m.impl("multiscale_quantize_step_backward", &vqk::cpu::multiscale_quantize_step_backward);
}
