// CPU kernels of vqkernels::fsq_quantize (finite scalar quantization) and its backward.
// Elementwise per row: bound, round, scale, and the row's mixed-radix index, in one pass.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

// Row blocks per parallel task: elementwise work this light pays for a thread only in large chunks.
int64_t elementwise_grain(int64_t n, int64_t d) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_block_size(n) * d));
}

// The bound's constants per dimension, float32 and computed by the same ATen ops as
// vqkernels.reference.fsq_constants (and vector-quantize-pytorch): half_l = (L - 1) * 1.001 / 2,
// offset = 0.5 for even L else 0, shift = atanh(offset / half_l) (offset / half_l with the hard
// clamp); plus L // 2, L - 1 and the mixed-radix basis (the first dimension varies fastest).
struct FsqConstants {
  std::vector<float> half_l, offset, shift, symmetric_scale;
  std::vector<int64_t> half_width, basis, levels_minus_1;

  FsqConstants(at::IntArrayRef levels, bool hard_clamp) {
    const at::Tensor lv = at::tensor(levels.vec(), at::kLong);
    const at::Tensor hl = ((lv.to(at::kFloat) - 1) * (1.0 + 1e-3) / 2).contiguous();
    const at::Tensor off = at::where(lv.remainder(2) == 0, 0.5, 0.0).to(at::kFloat);
    const at::Tensor sh = (hard_clamp ? off / hl : at::atanh(off / hl)).contiguous();
    const float* hlp = hl.const_data_ptr<float>();
    const float* shp = sh.const_data_ptr<float>();
    int64_t b = 1;
    for (size_t j = 0; j < levels.size(); ++j) {
      half_l.push_back(hlp[j]);
      offset.push_back(levels[j] % 2 == 0 ? 0.5f : 0.0f);
      shift.push_back(shp[j]);
      half_width.push_back(levels[j] / 2);
      levels_minus_1.push_back(levels[j] - 1);
      symmetric_scale.push_back(2.0f / static_cast<float>(levels[j] - 1));  // float32 for every dtype, as there
      basis.push_back(b);
      b *= levels[j];
    }
  }
};

// tanh, or the hard clamp to [-1, 1] that keeps a NaN (as torch.clamp).
template <typename T>
T squash(T v, bool hard_clamp) {
  if (!hard_clamp) return std::tanh(v);
  return std::isnan(v) ? v : std::min(std::max(v, T(-1)), T(1));
}

// Its derivative: 1 - tanh^2, or 1 inside [-1, 1] (bounds included, as torch.clamp's backward) and 0 outside.
template <typename T>
T squash_grad(T v, bool hard_clamp) {
  if (hard_clamp) return (v >= T(-1) && v <= T(1)) ? T(1) : T(0);
  const T th = std::tanh(v);
  return T(1) - th * th;
}

// One value's level (0 .. L - 1, NaN for a NaN) and code, in T, one rounding per step as torch evaluates
// vector-quantize-pytorch's expressions tensor by tensor.
template <typename T>
void fsq_value(T z, const FsqConstants& k, int64_t j, bool symmetric, bool hard_clamp, T& level, T& code) {
  if (symmetric) {  // floor((L - 1) * (squash(z) + 1) / 2 + 0.5), then (2 / (L - 1)) * level - 1
    const T lm1 = T(k.levels_minus_1[j]);
    level = std::floor(lm1 * (squash(z, hard_clamp) + T(1)) / T(2) + T(0.5));
    code = T(k.symmetric_scale[j]) * level - T(1) + T(0);
    return;
  }
  const T bounded = squash(z + T(k.shift[j]), hard_clamp) * T(k.half_l[j]) - T(k.offset[j]);
  T rounded = std::nearbyint(bounded);  // half to even, as torch.round
  if (rounded == T(0)) rounded = T(0);  // +0.0: vector-quantize-pytorch's z + (round(z) - z)
  level = rounded + T(k.half_width[j]);
  code = rounded / T(k.half_width[j]);
}

std::tuple<at::Tensor, at::Tensor> fsq_quantize(const at::Tensor& z, at::IntArrayRef levels, bool symmetric,
                                                bool hard_clamp) {
  check_fsq("fsq_quantize", z, levels);
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor codes = at::empty({n, d}, z.options());
  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  if (n == 0) return {codes, indices};
  const FsqConstants k(levels, hard_clamp);
  with_compute_type(z, z, [&](auto t) {
    using T = decltype(t);
    const RowSource<T> src(z);
    int64_t* idx = indices.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fsq_quantize", [&] {
      scalar_t* out = codes.data_ptr<scalar_t>();
      parallel_row_blocks<std::vector<T>>(n, [&](std::vector<T>& buf, int64_t, int64_t r0, int64_t r1) {
        int64_t ld;
        const T* zr = src.rows(r0, r1 - r0, buf, ld);
        for (int64_t r = r0; r < r1; ++r) {
          const T* zrow = zr + (r - r0) * ld;
          scalar_t* orow = out + r * d;
          int64_t index = 0;
          bool nan = false;
          for (int64_t j = 0; j < d; ++j) {
            T level, code;
            fsq_value(zrow[j], k, j, symmetric, hard_clamp, level, code);
            orow[j] = static_cast<scalar_t>(code);
            if (std::isnan(level))
              nan = true;
            else
              index += static_cast<int64_t>(level) * k.basis[j];
          }
          idx[r] = nan ? -1 : index;
        }
      }, elementwise_grain(n, d));
    });
  });
  return {codes, indices};
}

at::Tensor fsq_quantize_backward(const at::Tensor& grad_codes, const at::Tensor& z, at::IntArrayRef levels,
                                 bool symmetric, bool hard_clamp) {
  const char* op = "fsq_quantize_backward";
  check_fsq(op, z, levels);
  check_float(op, "grad_codes", grad_codes);
  VQK_CHECK(grad_codes.sizes() == z.sizes(), op, "grad_codes must have z's shape ", shape_str(z), ", got ",
            shape_str(grad_codes));
  VQK_CHECK(grad_codes.device() == z.device(), op, "grad_codes is on ", grad_codes.device(), " but z is on ",
            z.device());
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor grad = at::empty({n, d}, z.options());
  if (n == 0) return grad;
  const FsqConstants k(levels, hard_clamp);
  with_compute_type(z, z, [&](auto t) {
    using T = decltype(t);
    const RowSource<T> zsrc(z), gsrc(grad_codes);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fsq_quantize_backward", [&] {
      scalar_t* out = grad.data_ptr<scalar_t>();
      struct Scratch {
        std::vector<T> z, g;
      };
      parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
        int64_t ldz, ldg;
        const T* zr = zsrc.rows(r0, r1 - r0, s.z, ldz);
        const T* gr = gsrc.rows(r0, r1 - r0, s.g, ldg);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < d; ++j) {
            const T zv = zr[(r - r0) * ldz + j], gv = gr[(r - r0) * ldg + j];
            // the order of torch's autograd through vector-quantize-pytorch's expressions
            T g;
            if (symmetric) {  // * (2 / (L - 1)), / 2, * (L - 1), squash'
              const T lm1 = T(k.levels_minus_1[j]);
              g = gv * T(k.symmetric_scale[j]) / T(2) * lm1 * squash_grad(zv, hard_clamp);
            } else {  // / half_width, * half_l, squash'
              g = gv / T(k.half_width[j]) * T(k.half_l[j]) * squash_grad(zv + T(k.shift[j]), hard_clamp);
            }
            out[r * d + j] = static_cast<scalar_t>(g);
          }
      }, elementwise_grain(n, d));
    });
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("fsq_quantize", &vqk::cpu::fsq_quantize);
  m.impl("fsq_quantize_backward", &vqk::cpu::fsq_quantize_backward);
}
