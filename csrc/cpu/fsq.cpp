// CPU kernels of vqkernels::fsq_quantize (finite scalar quantization) and its backward.
// Elementwise per row: bound, round, scale, and the row's mixed-radix index, in one pass.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

// The bound's constants per dimension, float32 and computed by the same ATen ops as
// vqkernels.reference.fsq_constants (and vector-quantize-pytorch): half_l = (L - 1) * 1.001 / 2,
// offset = 0.5 for even L else 0, shift = atanh(offset / half_l); plus L // 2 and the
// mixed-radix basis (the first dimension varies fastest).
// Row blocks per parallel task: elementwise work this light pays for a thread only in large chunks.
int64_t elementwise_grain(int64_t n, int64_t d) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_block_size(n) * d));
}

struct FsqConstants {
  std::vector<float> half_l, offset, shift;
  std::vector<int64_t> half_width, basis;

  explicit FsqConstants(at::IntArrayRef levels) {
    const at::Tensor lv = at::tensor(levels.vec(), at::kLong);
    const at::Tensor hl = ((lv.to(at::kFloat) - 1) * (1.0 + 1e-3) / 2).contiguous();
    const at::Tensor off = at::where(lv.remainder(2) == 0, 0.5, 0.0).to(at::kFloat);
    const at::Tensor sh = at::atanh(off / hl).contiguous();
    const float* hlp = hl.const_data_ptr<float>();
    const float* shp = sh.const_data_ptr<float>();
    int64_t b = 1;
    for (size_t j = 0; j < levels.size(); ++j) {
      half_l.push_back(hlp[j]);
      offset.push_back(levels[j] % 2 == 0 ? 0.5f : 0.0f);
      shift.push_back(shp[j]);
      half_width.push_back(levels[j] / 2);
      basis.push_back(b);
      b *= levels[j];
    }
  }
};

std::tuple<at::Tensor, at::Tensor> fsq_quantize(const at::Tensor& z, at::IntArrayRef levels) {
  check_fsq("fsq_quantize", z, levels);
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor codes = at::empty({n, d}, z.options());
  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  if (n == 0) return {codes, indices};
  const FsqConstants k(levels);
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
            // One rounding per step, in T, as torch evaluates the same expression tensor by tensor.
            const T bounded = std::tanh(zrow[j] + T(k.shift[j])) * T(k.half_l[j]) - T(k.offset[j]);
            T level = std::nearbyint(bounded);  // half to even, as torch.round
            if (level == T(0)) level = T(0);    // +0.0: vector-quantize-pytorch's z + (round(z) - z)
            orow[j] = static_cast<scalar_t>(level / T(k.half_width[j]));
            if (std::isnan(bounded))
              nan = true;
            else
              index += (static_cast<int64_t>(level) + k.half_width[j]) * k.basis[j];
          }
          idx[r] = nan ? -1 : index;
        }
      }, elementwise_grain(n, d));
    });
  });
  return {codes, indices};
}

at::Tensor fsq_quantize_backward(const at::Tensor& grad_codes, const at::Tensor& z, at::IntArrayRef levels) {
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
  const FsqConstants k(levels);
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
            const T th = std::tanh(zr[(r - r0) * ldz + j] + T(k.shift[j]));
            // the order of torch's autograd through bounded / half_width: divide, scale, tanh'
            const T g = gr[(r - r0) * ldg + j] / T(k.half_width[j]) * T(k.half_l[j]);
            out[r * d + j] = static_cast<scalar_t>(g * (T(1) - th * th));
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
