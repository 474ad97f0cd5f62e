// CPU kernels of vqkernels::rotation_trick (its value: tgt) and its backward, src's gradient
// through vector-quantize-pytorch's rotate_to (Fifty et al. 2024, arXiv:2410.06424):
//     grad_src = s (g - 2 (g.w) w + 2 (g.q) u),  u = src / max(|src|, eps), q = tgt / max(|tgt|, eps),
//     w = (u + q) / max(|u + q|, eps),  s = |tgt| / max(|src|, eps),  eps = 1e-6
// Rows in parallel blocks; each row's dot products accumulate in double, so the result is the
// formula's rounded once more into src's dtype.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

constexpr double kEps = 1e-6;  // vector-quantize-pytorch's l2norm and safe_div

at::Tensor rotation_trick(const at::Tensor& src, const at::Tensor& tgt) {
  check_rotation("rotation_trick", src, tgt);
  return tgt.clone(at::MemoryFormat::Contiguous);
}

at::Tensor rotation_trick_backward(const at::Tensor& grad, const at::Tensor& src, const at::Tensor& tgt) {
  const char* op = "rotation_trick_backward";
  check_rotation_backward(op, grad, src, tgt);
  const int64_t n = src.size(0), D = src.size(1);
  at::Tensor out = at::empty({n, D}, src.options());
  if (n == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(compute_dtype(grad, src, tgt), "rotation_trick_backward", [&] {
    using T = scalar_t;
    const RowSource<T> gsrc(grad), esrc(src), tsrc(tgt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "rotation_trick_backward_out", [&] {
      scalar_t* outp = out.data_ptr<scalar_t>();
      struct Scratch {
        std::vector<T> g, e, t;
      };
      parallel_row_blocks<Scratch>(n, [&](Scratch& w, int64_t, int64_t r0, int64_t r1) {
        int64_t ldg, lde, ldt;
        const T* g = gsrc.rows(r0, r1 - r0, w.g, ldg);
        const T* e = esrc.rows(r0, r1 - r0, w.e, lde);
        const T* t = tsrc.rows(r0, r1 - r0, w.t, ldt);
        for (int64_t i = 0; i < r1 - r0; ++i, g += ldg, e += lde, t += ldt) {
          double ee = 0, tt = 0, et = 0, ge = 0, gt = 0;
          for (int64_t d = 0; d < D; ++d) {
            const double ev = e[d], tv = t[d], gv = g[d];
            ee += ev * ev;
            tt += tv * tv;
            et += ev * tv;
            ge += gv * ev;
            gt += gv * tv;
          }
          const double se = std::max(std::sqrt(ee), kEps), st = std::max(std::sqrt(tt), kEps);
          // |u + q|^2 = |u|^2 + 2 u.q + |q|^2 (clamped at 0 against rounding when u = -q)
          const double uq2 = std::max(ee / (se * se) + 2.0 * et / (se * st) + tt / (st * st), 0.0);
          const double nw = std::max(std::sqrt(uq2), kEps);
          const double gq = gt / st, gw = (ge / se + gq) / nw, s = std::sqrt(tt) / se;
          scalar_t* o = outp + (r0 + i) * D;
          for (int64_t d = 0; d < D; ++d) {
            const double u = e[d] / se, q = t[d] / st;
            o[d] = static_cast<scalar_t>(s * (g[d] - 2.0 * gw * (u + q) / nw + 2.0 * gq * u));
          }
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("rotation_trick", &vqk::cpu::rotation_trick);
  m.impl("rotation_trick_backward", &vqk::cpu::rotation_trick_backward);
}
