// CPU kernels of vqkernels::rotation_trick (its value: tgt) and its backward, src's gradient
// through vector-quantize-pytorch's rotate_to (Fifty et al. 2024, arXiv:2410.06424):
//     grad_src = s (g - 2 (g.w) w + 2 (g.q) u),  u = src / max(|src|, eps), q = tgt / max(|tgt|, eps),
//     w = (u + q) / max(|u + q|, eps),  s = |tgt| / max(|src|, eps),  eps = 1e-6
// which is, per row, a g + b src + c tgt with three scalars from five dot products.
// Rows in parallel blocks; each row's dot products accumulate in double (in 8 interleaved partial
// sums, a vector's lanes, added pairwise), and so does a g + b src + c tgt, so the result is the
// formula's rounded once more into src's dtype. One body serves every CPU ISA, compiled per ISA
// without fused multiply-adds: every ISA gives the same bits.
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

constexpr double kEps = 1e-6;  // vector-quantize-pytorch's l2norm and safe_div
constexpr int kSplit = 8;      // partial sums per dot product

// v rounded into p[0..8).
template <typename S>
VQK_LANES void store8(S* p, f64x8 v) {
  if constexpr (std::is_same<S, double>::value) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same<S, float>::value) {
    const f32x8 f = __builtin_convertvector(v, f32x8);
    std::memcpy(p, &f, sizeof f);
  } else {
    for (int k = 0; k < kSplit; ++k) p[k] = static_cast<S>(v[k]);
  }
}

// grad_src of `rows` rows (row-major with strides ldg / lde / ldt) into out [rows][D].
template <typename T, typename S>
VQK_LANES void backward_rows(const T* g, int64_t ldg, const T* e, int64_t lde, const T* t, int64_t ldt, int64_t rows,
                             int64_t D, S* out) {
  for (int64_t i = 0; i < rows; ++i, g += ldg, e += lde, t += ldt, out += D) {
    f64x8 ee = {}, tt = {}, et = {}, ge = {}, gt = {};
    int64_t d = 0;
    for (; d + kSplit <= D; d += kSplit) {
      const f64x8 ev = load8(e + d), tv = load8(t + d), gv = load8(g + d);
      ee += ev * ev;
      tt += tv * tv;
      et += ev * tv;
      ge += gv * ev;
      gt += gv * tv;
    }
    for (int k = 0; d < D; ++d, ++k) {
      const double ev = e[d], tv = t[d], gv = g[d];
      ee[k] += ev * ev;
      tt[k] += tv * tv;
      et[k] += ev * tv;
      ge[k] += gv * ev;
      gt[k] += gv * tv;
    }
    const double see = pairwise_sum(ee), stt = pairwise_sum(tt), set = pairwise_sum(et);
    const double se = std::max(std::sqrt(see), kEps), st = std::max(std::sqrt(stt), kEps);
    // |u + q|^2 = |u|^2 + 2 u.q + |q|^2 (clamped at 0 against rounding when u = -q)
    const double uq2 = std::max(see / (se * se) + 2.0 * set / (se * st) + stt / (st * st), 0.0);
    const double nw = std::max(std::sqrt(uq2), kEps);
    const double gq = pairwise_sum(gt) / st, gw = (pairwise_sum(ge) / se + gq) / nw, s = std::sqrt(stt) / se;
    // s (g - 2 gw (u + q) / nw + 2 gq u) = a g + b src + c tgt
    const double a = s, b = s * (2.0 * gq - 2.0 * gw / nw) / se, c = -s * 2.0 * gw / (nw * st);
    for (d = 0; d + kSplit <= D; d += kSplit) store8(out + d, a * load8(g + d) + b * load8(e + d) + c * load8(t + d));
    for (; d < D; ++d)
      out[d] =
          static_cast<S>(a * static_cast<double>(g[d]) + b * static_cast<double>(e[d]) + c * static_cast<double>(t[d]));
  }
}

template <typename T, typename S>
VQK_NO_CONTRACT void backward_portable(const T* g, int64_t ldg, const T* e, int64_t lde, const T* t, int64_t ldt,
                                       int64_t rows, int64_t D, S* out) {
  backward_rows(g, ldg, e, lde, t, ldt, rows, D, out);
}
#if VQK_X86
template <typename T, typename S>
VQK_TARGET_AVX2 VQK_NO_CONTRACT void backward_avx2(const T* g, int64_t ldg, const T* e, int64_t lde, const T* t,
                                                   int64_t ldt, int64_t rows, int64_t D, S* out) {
  backward_rows(g, ldg, e, lde, t, ldt, rows, D, out);
}
template <typename T, typename S>
VQK_TARGET_AVX512 VQK_NO_CONTRACT void backward_avx512(const T* g, int64_t ldg, const T* e, int64_t lde, const T* t,
                                                       int64_t ldt, int64_t rows, int64_t D, S* out) {
  backward_rows(g, ldg, e, lde, t, ldt, rows, D, out);
}
#endif

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
      const auto kernel = VQK_ACTIVE_ISA(backward, <T, scalar_t>);
      struct Scratch {
        std::vector<T> g, e, t;
      };
      parallel_row_blocks<Scratch>(n, [&](Scratch& w, int64_t, int64_t r0, int64_t r1) {
        int64_t ldg, lde, ldt;
        const T* g = gsrc.rows(r0, r1 - r0, w.g, ldg);
        const T* e = esrc.rows(r0, r1 - r0, w.e, lde);
        const T* t = tsrc.rows(r0, r1 - r0, w.t, ldt);
        kernel(g, ldg, e, lde, t, ldt, r1 - r0, D, outp + r0 * D);
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
