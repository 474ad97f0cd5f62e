// CPU kernels of vqkernels::fsq_quantize (finite scalar quantization) and its backward.
// Elementwise: bound, round, scale, and each row's mixed-radix index.
//
// float32 work (float32, float16 and bfloat16 inputs; the halves are converted to float32 first)
// runs one generic body over lanes of floats: 16 with AVX-512, 8 with AVX2, 1 on the portable
// path, picked per call from the active CPU ISA. The rows of a block are one flat run of
// elements, so the lanes stay full whatever d is; element p of a run uses column p mod d, whose
// constants come from tables repeating them over lcm(d, lanes) elements. tanh is computed here
// (tanh_lanes). The lanes use plain multiplies and adds in a fixed order, never fused into FMAs
// (the entry points turn contraction off), so every ISA gives the same bits. float64 inputs take
// a scalar path with std::tanh.
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/fsq.h"
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

// The constants of the columns repeated over `period` elements, the least multiple of d that is one
// of `lanes` too: in a flat run of whole rows, element p reads its column's at p mod period, a whole
// vector at a time. (Not std::lcm: GCC 12.2 compiled its absolute value wrongly here, giving -lcm.)
struct FsqTables {
  int64_t period;
  std::vector<float> shift, half_l, offset, half_width, levels_minus_1, symmetric_scale;

  FsqTables(const FsqConstants& k, int64_t d, int64_t lanes) : period(d) {
    while (period % lanes != 0) period += d;
    for (int64_t p = 0; p < period; ++p) {
      const int64_t j = p % d;
      shift.push_back(k.shift[j]);
      half_l.push_back(k.half_l[j]);
      offset.push_back(k.offset[j]);
      half_width.push_back(static_cast<float>(k.half_width[j]));
      levels_minus_1.push_back(static_cast<float>(k.levels_minus_1[j]));
      symmetric_scale.push_back(k.symmetric_scale[j]);
    }
  }
};

// The constants and tables of one (levels, hard_clamp), built once per process (they take a dozen
// ATen ops, several microseconds a call); the cache holds up to kCacheSize level sets.
// The tables of the 16-row index sums (row_indices_16): 16 rows of d int32 levels are d vectors of 16, row r's
// level j at flat position r d + j. Per j, the pairs of vectors (q, q + 1) that hold some of those positions
// give a two-source permute (index: position - 16 q) under a mask of the lanes they hold; basis[q] is the
// mixed-radix weight of each lane of vector q. For d <= 16 and a codebook of at most 2**26 codes, so that a
// level of -1 (NaN) can weigh -2**26 and leave any row holding one negative, without overflow.
struct FsqRowSums {
  static constexpr int64_t kMaxD = 16, kMaxCodes = int64_t{1} << 26;
  bool usable = false;
  std::vector<int32_t> index, basis;  // [d][pairs][16], [d][16]
  std::vector<uint16_t> mask;         // [d][pairs]

  FsqRowSums(const FsqConstants& k, at::IntArrayRef levels) {
    const int64_t d = static_cast<int64_t>(levels.size());
    int64_t codes = 1;
    for (const int64_t level : levels)
      if ((codes *= level) > kMaxCodes) return;  // (levels are at least 2, checked: the product only grows)
    usable = d <= kMaxD;
    if (!usable) return;
    const int64_t pairs = (d + 1) / 2;
    for (int64_t j = 0; j < d; ++j)
      for (int64_t pair = 0; pair < pairs; ++pair) {
        uint16_t m = 0;
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t at = r * d + j - 32 * pair;  // the position within vectors (2 pair, 2 pair + 1)
          const bool held = at >= 0 && at < (2 * pair + 1 < d ? 32 : 16);
          index.push_back(held ? static_cast<int32_t>(at) : 0);
          m |= static_cast<uint16_t>(held) << r;
        }
        mask.push_back(m);
      }
    for (int64_t q = 0; q < d; ++q)
      for (int64_t lane = 0; lane < 16; ++lane) basis.push_back(static_cast<int32_t>(k.basis[(16 * q + lane) % d]));
  }
};

struct FsqSetup {
  FsqConstants k;
  FsqTables lanes1, lanes8, lanes16;
  FsqRowSums row_sums;

  FsqSetup(at::IntArrayRef levels, bool hard_clamp)
      : k(levels, hard_clamp),
        lanes1(k, levels.size(), 1),
        lanes8(k, levels.size(), 8),
        lanes16(k, levels.size(), 16),
        row_sums(k, levels) {}

  const FsqTables& tables(int64_t lanes) const { return lanes == 16 ? lanes16 : lanes == 8 ? lanes8 : lanes1; }
};

std::shared_ptr<const FsqSetup> fsq_setup(at::IntArrayRef levels, bool hard_clamp) {
  constexpr size_t kCacheSize = 64;
  static std::mutex mutex;
  static std::map<std::pair<std::vector<int64_t>, bool>, std::shared_ptr<const FsqSetup>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(levels.vec(), hard_clamp);
  if (const auto hit = cache.find(key); hit != cache.end()) return hit->second;
  if (cache.size() >= kCacheSize) cache.clear();  // callers still holding a setup keep it alive
  auto setup = std::make_shared<const FsqSetup>(levels, hard_clamp);
  cache.emplace(std::move(key), setup);
  return setup;
}

// ---------------------------------------------------------------------------------------
// Row blocks, shared by the float64 and float32 kernels (T: the compute type).

template <typename T>
struct Scratch {
  std::vector<T> z, g, out;
  std::vector<int32_t> levels;
};
using FloatScratch = Scratch<float>;

// Results in T are written straight to an output of type T, else through scratch then converted.
template <typename T, typename scalar_t>
T* compute_target(scalar_t* out, std::vector<T>& scratch, int64_t count) {
  if constexpr (std::is_same<scalar_t, T>::value) {
    return out;
  } else {
    scratch.resize(count);
    return scratch.data();
  }
}

template <typename T, typename scalar_t>
void convert_out(const T* from, int64_t count, scalar_t* out) {
  if constexpr (!std::is_same<scalar_t, T>::value)
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<scalar_t>(from[i]);
}

// A backward over z [n][d] and its gradient g, block by block: run(g, z, count, out) on each block's rows as T, as
// one flat run of count = rows * d elements (or row by row where either input is strided: count = d), its results
// converted into out. A run starts at a row, so element p of it is in column p mod d.
template <typename T, typename scalar_t, typename Run>
void backward_blocks(const at::Tensor& grad, const at::Tensor& z, int64_t grain, scalar_t* out, Run&& run) {
  const int64_t n = z.size(0), d = z.size(1);
  const RowSource<T> zsrc(z), gsrc(grad);
  parallel_row_blocks<Scratch<T>>(
      n,
      [&](Scratch<T>& s, int64_t, int64_t r0, int64_t r1) {
        const int64_t rows = r1 - r0;
        int64_t ldz, ldg;
        const T* zr = zsrc.rows(r0, rows, s.z, ldz);
        const T* gr = gsrc.rows(r0, rows, s.g, ldg);
        T* gz = compute_target(out + r0 * d, s.out, rows * d);
        if (ldz == d && ldg == d) {
          run(gr, zr, rows * d, gz);
        } else {
          for (int64_t i = 0; i < rows; ++i) run(gr + i * ldg, zr + i * ldz, d, gz + i * d);
        }
        convert_out(gz, rows * d, out + r0 * d);
      },
      grain);
}

// ---------------------------------------------------------------------------------------
// float64: one value at a time.

// tanh, or the hard clamp to [-1, 1] that keeps a NaN (as torch.clamp).
double squash(double v, bool hard_clamp) {
  if (!hard_clamp) return std::tanh(v);
  return std::isnan(v) ? v : std::min(std::max(v, -1.0), 1.0);
}

// Its derivative: 1 - tanh^2, or 1 inside [-1, 1] (bounds included, as torch.clamp's backward) and 0 outside.
double squash_grad(double v, bool hard_clamp) {
  if (hard_clamp) return (v >= -1.0 && v <= 1.0) ? 1.0 : 0.0;
  const double th = std::tanh(v);
  return 1.0 - th * th;
}

// One value's level (0 .. L - 1, NaN for a NaN) and code, one rounding per step as torch evaluates
// vector-quantize-pytorch's expressions tensor by tensor.
void fsq_value(double z, const FsqConstants& k, int64_t j, bool symmetric, bool hard_clamp, double& level,
               double& code) {
  if (symmetric) {  // floor((L - 1) * (squash(z) + 1) / 2 + 0.5), then (2 / (L - 1)) * level - 1
    const double lm1 = static_cast<double>(k.levels_minus_1[j]);
    level = std::floor(lm1 * (squash(z, hard_clamp) + 1.0) / 2.0 + 0.5);
    code = static_cast<double>(k.symmetric_scale[j]) * level - 1.0;  // a zero code is +0.0: 1 - 1
    return;
  }
  const double bounded = squash(z + k.shift[j], hard_clamp) * k.half_l[j] - k.offset[j];
  double rounded = std::nearbyint(bounded);  // half to even, as torch.round
  if (rounded == 0.0) rounded = 0.0;         // +0.0: vector-quantize-pytorch's z + (round(z) - z)
  level = rounded + static_cast<double>(k.half_width[j]);
  code = rounded / static_cast<double>(k.half_width[j]);
}

// One value's gradient, in the order of torch's autograd through vector-quantize-pytorch's expressions.
double fsq_grad_value(double g, double z, const FsqConstants& k, int64_t j, bool symmetric, bool hard_clamp) {
  if (symmetric)  // * (2 / (L - 1)), / 2, * (L - 1), squash'
    return g * k.symmetric_scale[j] / 2.0 * static_cast<double>(k.levels_minus_1[j]) * squash_grad(z, hard_clamp);
  // / half_width, * half_l, squash'
  return g / static_cast<double>(k.half_width[j]) * k.half_l[j] * squash_grad(z + k.shift[j], hard_clamp);
}

void quantize_double(const at::Tensor& z, const FsqConstants& k, bool symmetric, bool hard_clamp, double* out,
                     int64_t* idx) {
  const int64_t n = z.size(0), d = z.size(1);
  const RowSource<double> src(z);
  parallel_row_blocks<std::vector<double>>(
      n,
      [&](std::vector<double>& buf, int64_t, int64_t r0, int64_t r1) {
        int64_t ld;
        const double* zr = src.rows(r0, r1 - r0, buf, ld);
        for (int64_t r = r0; r < r1; ++r) {
          const double* zrow = zr + (r - r0) * ld;
          int64_t index = 0;
          bool nan = false;
          for (int64_t j = 0; j < d; ++j) {
            double level;
            fsq_value(zrow[j], k, j, symmetric, hard_clamp, level, out[r * d + j]);
            if (std::isnan(level))
              nan = true;
            else
              index += static_cast<int64_t>(level) * k.basis[j];
          }
          idx[r] = nan ? -1 : index;
        }
      },
      elementwise_grain(n, d));
}

void backward_double(const at::Tensor& grad_codes, const at::Tensor& z, const FsqConstants& k, bool symmetric,
                     bool hard_clamp, double* out) {
  const int64_t d = z.size(1);
  backward_blocks<double>(grad_codes, z, elementwise_grain(z.size(0), d), out,
                          [&](const double* g, const double* zr, int64_t count, double* o) {
                            for (int64_t p = 0; p < count; ++p)
                              o[p] = fsq_grad_value(g[p], zr[p], k, p % d, symmetric, hard_clamp);
                          });
}

// residual_fsq_quantize, one value at a time: level l quantizes residual / scale_l, adds code * scale_l to the
// output and takes it from the residual. scales: [num_levels][d]; idx: [n][num_levels].
void residual_quantize_double(const at::Tensor& z, const double* scales, int64_t num_levels, const FsqConstants& k,
                              bool symmetric, bool hard_clamp, double* out, int64_t* idx) {
  const int64_t n = z.size(0), d = z.size(1);
  const RowSource<double> src(z);
  struct Scratch {
    std::vector<double> z, residual;
  };
  parallel_row_blocks<Scratch>(
      n,
      [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
        int64_t ld;
        const double* zr = src.rows(r0, r1 - r0, s.z, ld);
        for (int64_t r = r0; r < r1; ++r) {
          s.residual.assign(zr + (r - r0) * ld, zr + (r - r0) * ld + d);
          double* o = out + r * d;
          for (int64_t l = 0; l < num_levels; ++l) {
            int64_t index = 0;
            bool nan = false;
            for (int64_t j = 0; j < d; ++j) {
              const double scale = scales[l * d + j];
              double level, code;
              fsq_value(s.residual[j] / scale, k, j, symmetric, hard_clamp, level, code);
              const double q = code * scale;
              s.residual[j] = s.residual[j] - q;
              o[j] = l == 0 ? 0.0 + q : o[j] + q;
              if (std::isnan(level))
                nan = true;
              else
                index += static_cast<int64_t>(level) * k.basis[j];
            }
            idx[r * num_levels + l] = nan ? -1 : index;
          }
          if (num_levels == 0) std::fill(o, o + d, 0.0);
        }
      },
      elementwise_grain(n, d * std::max<int64_t>(1, num_levels)));
}

// Its gradient: the levels' straight-through gradients (each level's residual recomputed) summed from the last level
// to the first, as autograd sums them through the levels' loop.
void residual_backward_double(const at::Tensor& grad, const at::Tensor& z, const double* scales, int64_t num_levels,
                              const FsqConstants& k, bool symmetric, bool hard_clamp, double* out) {
  const int64_t d = z.size(1);
  backward_blocks<double>(grad, z, elementwise_grain(z.size(0), d * std::max<int64_t>(1, num_levels)), out,
                          [&](const double* g, const double* zr, int64_t count, double* o) {
                            std::vector<double> grads(num_levels);  // one element's level gradients
                            for (int64_t p = 0; p < count; ++p) {
                              const int64_t j = p % d;
                              double residual = zr[p];
                              for (int64_t l = 0; l < num_levels; ++l) {
                                const double scale = scales[l * d + j], zl = residual / scale;
                                grads[l] = fsq_grad_value(g[p] * scale, zl, k, j, symmetric, hard_clamp) / scale;
                                double level, code;
                                fsq_value(zl, k, j, symmetric, hard_clamp, level, code);
                                residual = residual - code * scale;
                              }
                              double sum = 0.0;
                              for (int64_t l = num_levels - 1; l >= 0; --l)
                                sum = l == num_levels - 1 ? grads[l] : grads[l] + sum;
                              o[p] = sum;
                            }
                          });
}

// ---------------------------------------------------------------------------------------
// float32 lanes. F is float (portable) or a GCC vector of 8 (AVX2) or 16 (AVX-512) floats; the
// same code serves all three (a vector's arithmetic is lane by lane, a scalar operand is splat).

// (f32x8 and i32x8: cpu/search.h)
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <typename F>
struct LaneInt {
  using type = int32_t;
};
template <>
struct LaneInt<f32x8> {
  using type = i32x8;
};
template <>
struct LaneInt<f32x16> {
  using type = i32x16;
};
template <typename F>
using lane_int = typename LaneInt<F>::type;  // int32 lanes of F's width
template <typename F>
constexpr int kWidth = sizeof(F) / sizeof(float);

template <typename F>
VQK_LANES F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
VQK_LANES void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename F>
VQK_LANES F splat(float c) {
  if constexpr (kWidth<F> == 1)
    return c;
  else
    return F{} + c;  // not for -0.0
}

// a where m is set (true, or all bits of the lane), b elsewhere.
template <typename M, typename F>
VQK_LANES F select(M m, F a, F b) {
  return m ? a : b;
}

// Integral-valued lanes to int32.
template <typename F>
VQK_LANES lane_int<F> to_int(F v) {
  if constexpr (kWidth<F> == 1)
    return static_cast<int32_t>(v);
  else
    return __builtin_convertvector(v, lane_int<F>);
}

// Round to nearest, ties to even (as torch.round and std::nearbyint) for |v| < 2**22: adding
// 1.5 * 2**23 leaves no fraction bits. A zero result is +0.0; NaN stays NaN.
template <typename F>
VQK_LANES F round_even(F v) {
  constexpr float kShifter = 12582912.0f;
  return (v + kShifter) - kShifter;
}

// tanh(x) within 1.07 ulp of the exact value for every float32 x (1.0661 ulp at most, checked against
// float64 over all of them; 0.13% are not correctly rounded); tanh(+-0) = +-0, +-1 for |x| >= 9.1 and
// +-inf, NaN for NaN. |tanh| is computed from |x|, then x's sign is put on:
//   |x| < 0.75: |x| + |x|^3 P(x^2), P a degree-5 minimax fit of (tanh(x) - x) / x^3 (relative error of
//     tanh 1.6e-9 before rounding);
//   |x| >= 0.75: 1 - 2 / (1 + exp(2|x|)), |x| capped at 9.1, past the 9.011 from which tanh rounds to 1.
//     exp(y) = 2^n exp(r), n = round(y / ln 2), r = y - n ln 2 in [-ln2/2, ln2/2] with ln 2 in two parts
//     (n times the first, 16 bits, is exact), exp(r) = 1 + r + r^2 Q(r), Q a degree-4 minimax fit
//     (relative error 3.1e-9).
// scripts/fit_fsq_tanh.py fits P and Q.
template <typename F>
VQK_LANES F tanh_lanes(F x) {
  using I = lane_int<F>;
  const I bits = std::bit_cast<I>(x);
  const F ax = std::bit_cast<F>(bits & std::numeric_limits<int32_t>::max());
  const F s = ax * ax;
  F p = s * 1.736916834e-03f + -7.657226641e-03f;
  p = p * s + 2.145201899e-02f;
  p = p * s + -5.389272049e-02f;
  p = p * s + 1.333269477e-01f;
  p = p * s + -3.333331645e-01f;
  const F small = ax + (ax * s) * p;
  const F a = select(ax < 9.1f, ax, splat<F>(9.1f));
  const F y = a + a;
  const F n = round_even(y * 1.44269504f);
  const F r = (y - n * 0.693145752f) - n * 1.42860677e-06f;
  F q = r * 1.381460694e-03f + 8.368719369e-03f;
  q = q * r + 4.166838899e-02f;
  q = q * r + 1.666652113e-01f;
  q = q * r + 4.999999404e-01f;
  const F e = (1.0f + (r + (r * r) * q)) * std::bit_cast<F>((to_int(n) + 127) << 23);
  const F large = 1.0f - 2.0f / (1.0f + e);
  const I magnitude = std::bit_cast<I>(select(ax >= 0.75f, large, small));  // NaN: small
  return std::bit_cast<F>(magnitude | (bits & std::numeric_limits<int32_t>::min()));
}

// tanh, or the hard clamp to [-1, 1] that keeps a NaN (as torch.clamp).
template <bool kHardClamp, typename F>
VQK_LANES F squash_lanes(F v) {
  if constexpr (kHardClamp)
    return select(v < -1.0f, splat<F>(-1.0f), select(v > 1.0f, splat<F>(1.0f), v));
  else
    return tanh_lanes(v);
}

// Its derivative: 1 - tanh^2, or 1 inside [-1, 1] (bounds included) and 0 outside.
template <bool kHardClamp, typename F>
VQK_LANES F squash_grad_lanes(F v) {
  if constexpr (kHardClamp) {
    // 1 where the clamp leaves v as it is (a NaN compares unequal): GCC 12 compiles v >= -1 & v <= 1 on
    // 16-float vectors into a scalar loop (8x slower)
    return select(squash_lanes<true>(v) == v, splat<F>(1.0f), F{});
  } else {
    const F t = tanh_lanes(v);
    return 1.0f - t * t;
  }
}

// The codes of one vector of z whose first element reads the tables at c, and its levels (0 .. L - 1, NaN for
// NaN); each step rounded as torch evaluates vector-quantize-pytorch's expressions.
template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES F quantize_lanes(F z, const FsqTables& tb, int64_t c, F& level) {
  F code;
  if constexpr (kSymmetric) {  // floor((L - 1) * (squash(z) + 1) / 2 + 0.5), then (2 / (L - 1)) * level - 1
    // (* 0.5 rounds as / 2 does)
    const F y = load<F>(&tb.levels_minus_1[c]) * (squash_lanes<kHardClamp>(z) + 1.0f) * 0.5f + 0.5f;
    const F r = round_even(y);
    level = select(r > y, r - 1.0f, r);                     // floor, as y >= 0
    code = load<F>(&tb.symmetric_scale[c]) * level - 1.0f;  // a zero code is +0.0: 1 - 1
  } else {  // round(squash(z + shift) * half_l - offset): + L // 2, / (L // 2)
    const F hw = load<F>(&tb.half_width[c]);
    const F bounded =
        squash_lanes<kHardClamp>(z + load<F>(&tb.shift[c])) * load<F>(&tb.half_l[c]) - load<F>(&tb.offset[c]);
    const F rounded = round_even(bounded);  // a zero is +0.0, as vector-quantize-pytorch's z + (round(z) - z)
    level = rounded + hw;
    code = rounded / hw;
  }
  return code;
}

// Levels as int32, -1 for NaN.
template <typename F>
VQK_LANES lane_int<F> level_ints(F level) {
  return to_int(select(level == level, level, splat<F>(-1.0f)));
}

template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void forward_lanes(F z, const FsqTables& tb, int64_t c, float* codes, int32_t* levels) {
  F level;
  store(codes, quantize_lanes<F, kSymmetric, kHardClamp>(z, tb, c, level));
  store(levels, level_ints(level));
}

// The gradient of one vector, in the order of torch's autograd through vector-quantize-pytorch's expressions.
template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES F backward_lanes(F g, F z, const FsqTables& tb, int64_t c) {
  if constexpr (kSymmetric)  // * (2 / (L - 1)), / 2, * (L - 1), squash'
    return g * load<F>(&tb.symmetric_scale[c]) * 0.5f * load<F>(&tb.levels_minus_1[c]) *
           squash_grad_lanes<kHardClamp>(z);
  else  // / half_width, * half_l, squash'
    return g / load<F>(&tb.half_width[c]) * load<F>(&tb.half_l[c]) *
           squash_grad_lanes<kHardClamp>(z + load<F>(&tb.shift[c]));
}

// Vectors through the residual levels at a time: each level is a chain of a dozen dependent operations (a division
// among them), so independent vectors side by side keep the core busy.
constexpr int kChains = 4;

// residual_fsq_quantize on K consecutive vectors of z whose first element reads the tables at c (K independent
// chains through the levels, for the core to overlap): out, and level l's int32 levels at levels + l * stride.
// scales: the levels' scales repeated over the tables' period, [levels][period].
template <int K, typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void residual_lanes(const float* z, const FsqTables& tb, int64_t c, const float* scales, int64_t num_levels,
                              float* out, int32_t* levels, int64_t stride) {
  constexpr int W = kWidth<F>;
  F residual[K], sum[K];
  int64_t ck[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    residual[k] = load<F>(z + k * W);
    sum[k] = F{};
    ck[k] = (c + k * W) % tb.period;
  }
  for (int64_t l = 0; l < num_levels; ++l) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const F scale = load<F>(scales + l * tb.period + ck[k]);
      F level;
      const F q = quantize_lanes<F, kSymmetric, kHardClamp>(residual[k] / scale, tb, ck[k], level) * scale;
      residual[k] = residual[k] - q;
      sum[k] = sum[k] + q;  // level order: ((0 + q_0) + q_1) + ...
      store(levels + l * stride + k * W, level_ints(level));
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) store(out + k * W, sum[k]);
}

// Its gradient for K vectors: every level's straight-through gradient (kept in `grads`, [levels][K W]), summed
// from the last level to the first, g_0 + (g_1 + (... + g_{Q-1})), as autograd sums them through the levels' loop.
template <int K, typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void residual_backward_lanes(const float* g, const float* z, const FsqTables& tb, int64_t c,
                                       const float* scales, int64_t num_levels, float* grads, float* out) {
  constexpr int W = kWidth<F>;
  F residual[K], grad[K];
  int64_t ck[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    residual[k] = load<F>(z + k * W);
    grad[k] = load<F>(g + k * W);
    ck[k] = (c + k * W) % tb.period;
  }
  for (int64_t l = 0; l < num_levels; ++l) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const F scale = load<F>(scales + l * tb.period + ck[k]);
      const F zl = residual[k] / scale;
      store(grads + (l * K + k) * W, backward_lanes<F, kSymmetric, kHardClamp>(grad[k] * scale, zl, tb, ck[k]) / scale);
      F level;
      residual[k] = residual[k] - quantize_lanes<F, kSymmetric, kHardClamp>(zl, tb, ck[k], level) * scale;
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    F sum{};
    for (int64_t l = num_levels - 1; l >= 0; --l) {
      const F gl = load<F>(grads + (l * K + k) * W);
      sum = l == num_levels - 1 ? gl : gl + sum;
    }
    store(out + k * W, sum);
  }
}

// A flat run of `count` elements of whole rows (or of one row): codes and int32 levels.
template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void forward_run(const float* z, int64_t count, const FsqTables& tb, float* codes, int32_t* levels) {
  constexpr int W = kWidth<F>;
  int64_t p = 0, c = 0;
  for (; p + W <= count; p += W) {
    forward_lanes<F, kSymmetric, kHardClamp>(load<F>(z + p), tb, c, codes + p, levels + p);
    c = c + W == tb.period ? 0 : c + W;
  }
  if constexpr (W > 1) {
    if (p < count) {  // the tail, through copies padded to a vector
      float zt[W] = {}, ct[W];
      int32_t lt[W];
      std::copy(z + p, z + count, zt);
      forward_lanes<F, kSymmetric, kHardClamp>(load<F>(zt), tb, c, ct, lt);
      std::copy(ct, ct + (count - p), codes + p);
      std::copy(lt, lt + (count - p), levels + p);
    }
  }
}

template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void backward_run(const float* g, const float* z, int64_t count, const FsqTables& tb, float* out) {
  constexpr int W = kWidth<F>;
  int64_t p = 0, c = 0;
  for (; p + W <= count; p += W) {
    store(out + p, backward_lanes<F, kSymmetric, kHardClamp>(load<F>(g + p), load<F>(z + p), tb, c));
    c = c + W == tb.period ? 0 : c + W;
  }
  if constexpr (W > 1) {
    if (p < count) {
      float gt[W] = {}, zt[W] = {}, ot[W];
      std::copy(g + p, g + count, gt);
      std::copy(z + p, z + count, zt);
      store(ot, backward_lanes<F, kSymmetric, kHardClamp>(load<F>(gt), load<F>(zt), tb, c));
      std::copy(ot, ot + (count - p), out + p);
    }
  }
}

// residual_fsq_quantize on a flat run of `count` elements: out, and level l's int32 levels at levels + l * stride.
template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void residual_run(const float* z, int64_t count, const FsqTables& tb, const float* scales, int64_t num_levels,
                            float* out, int32_t* levels, int64_t stride) {
  constexpr int W = kWidth<F>;
  int64_t p = 0;
  for (; p + kChains * W <= count; p += kChains * W)
    residual_lanes<kChains, F, kSymmetric, kHardClamp>(z + p, tb, p % tb.period, scales, num_levels, out + p,
                                                       levels + p, stride);
  for (; p + W <= count; p += W)
    residual_lanes<1, F, kSymmetric, kHardClamp>(z + p, tb, p % tb.period, scales, num_levels, out + p, levels + p,
                                                 stride);
  if constexpr (W > 1) {
    if (p < count) {  // the tail, through copies padded to a vector (levels: W a level)
      float zt[W] = {}, ot[W];
      std::vector<int32_t> lt(W * num_levels);
      std::copy(z + p, z + count, zt);
      residual_lanes<1, F, kSymmetric, kHardClamp>(zt, tb, p % tb.period, scales, num_levels, ot, lt.data(), W);
      std::copy(ot, ot + (count - p), out + p);
      for (int64_t l = 0; l < num_levels; ++l)
        std::copy(lt.data() + l * W, lt.data() + l * W + (count - p), levels + l * stride + p);
    }
  }
}

template <typename F, bool kSymmetric, bool kHardClamp>
VQK_LANES void residual_backward_run(const float* g, const float* z, int64_t count, const FsqTables& tb,
                                     const float* scales, int64_t num_levels, float* out) {
  constexpr int W = kWidth<F>;
  std::vector<float> grads(num_levels * kChains * W);
  int64_t p = 0;
  for (; p + kChains * W <= count; p += kChains * W)
    residual_backward_lanes<kChains, F, kSymmetric, kHardClamp>(g + p, z + p, tb, p % tb.period, scales, num_levels,
                                                                grads.data(), out + p);
  for (; p + W <= count; p += W)
    residual_backward_lanes<1, F, kSymmetric, kHardClamp>(g + p, z + p, tb, p % tb.period, scales, num_levels,
                                                          grads.data(), out + p);
  if constexpr (W > 1) {
    if (p < count) {
      float gt[W] = {}, zt[W] = {}, ot[W];
      std::copy(g + p, g + count, gt);
      std::copy(z + p, z + count, zt);
      residual_backward_lanes<1, F, kSymmetric, kHardClamp>(gt, zt, tb, p % tb.period, scales, num_levels, grads.data(),
                                                            ot);
      std::copy(ot, ot + (count - p), out + p);
    }
  }
}

template <typename F>
VQK_LANES void tanh_run(const float* x, int64_t n, float* y) {
  constexpr int W = kWidth<F>;
  int64_t p = 0;
  for (; p + W <= n; p += W) store(y + p, tanh_lanes(load<F>(x + p)));
  if constexpr (W > 1) {
    if (p < n) {
      float xt[W] = {}, yt[W];
      std::copy(x + p, x + n, xt);
      store(yt, tanh_lanes(load<F>(xt)));
      std::copy(yt, yt + (n - p), y + p);
    }
  }
}

// The mode as template arguments (explicit branches: a lambda here would not inherit the caller's target ISA).
template <typename F>
VQK_LANES void forward_any(bool symmetric, bool hard_clamp, const float* z, int64_t count, const FsqTables& tb,
                           float* codes, int32_t* levels) {
  if (symmetric) {
    if (hard_clamp)
      forward_run<F, true, true>(z, count, tb, codes, levels);
    else
      forward_run<F, true, false>(z, count, tb, codes, levels);
  } else {
    if (hard_clamp)
      forward_run<F, false, true>(z, count, tb, codes, levels);
    else
      forward_run<F, false, false>(z, count, tb, codes, levels);
  }
}

template <typename F>
VQK_LANES void backward_any(bool symmetric, bool hard_clamp, const float* g, const float* z, int64_t count,
                            const FsqTables& tb, float* out) {
  if (symmetric) {
    if (hard_clamp)
      backward_run<F, true, true>(g, z, count, tb, out);
    else
      backward_run<F, true, false>(g, z, count, tb, out);
  } else {
    if (hard_clamp)
      backward_run<F, false, true>(g, z, count, tb, out);
    else
      backward_run<F, false, false>(g, z, count, tb, out);
  }
}

template <typename F>
VQK_LANES void residual_any(bool symmetric, bool hard_clamp, const float* z, int64_t count, const FsqTables& tb,
                            const float* scales, int64_t num_levels, float* out, int32_t* levels, int64_t stride) {
  if (symmetric) {
    if (hard_clamp)
      residual_run<F, true, true>(z, count, tb, scales, num_levels, out, levels, stride);
    else
      residual_run<F, true, false>(z, count, tb, scales, num_levels, out, levels, stride);
  } else {
    if (hard_clamp)
      residual_run<F, false, true>(z, count, tb, scales, num_levels, out, levels, stride);
    else
      residual_run<F, false, false>(z, count, tb, scales, num_levels, out, levels, stride);
  }
}

template <typename F>
VQK_LANES void residual_backward_any(bool symmetric, bool hard_clamp, const float* g, const float* z, int64_t count,
                                     const FsqTables& tb, const float* scales, int64_t num_levels, float* out) {
  if (symmetric) {
    if (hard_clamp)
      residual_backward_run<F, true, true>(g, z, count, tb, scales, num_levels, out);
    else
      residual_backward_run<F, true, false>(g, z, count, tb, scales, num_levels, out);
  } else {
    if (hard_clamp)
      residual_backward_run<F, false, true>(g, z, count, tb, scales, num_levels, out);
    else
      residual_backward_run<F, false, false>(g, z, count, tb, scales, num_levels, out);
  }
}

// The entry points of each ISA.

VQK_NO_CONTRACT void forward_portable(bool symmetric, bool hard_clamp, const float* z, int64_t count,
                                      const FsqTables& tb, float* codes, int32_t* levels) {
  forward_any<float>(symmetric, hard_clamp, z, count, tb, codes, levels);
}
VQK_NO_CONTRACT void backward_portable(bool symmetric, bool hard_clamp, const float* g, const float* z, int64_t count,
                                       const FsqTables& tb, float* out) {
  backward_any<float>(symmetric, hard_clamp, g, z, count, tb, out);
}
VQK_NO_CONTRACT void residual_portable(bool symmetric, bool hard_clamp, const float* z, int64_t count,
                                       const FsqTables& tb, const float* scales, int64_t num_levels, float* out,
                                       int32_t* levels, int64_t stride) {
  residual_any<float>(symmetric, hard_clamp, z, count, tb, scales, num_levels, out, levels, stride);
}
VQK_NO_CONTRACT void residual_backward_portable(bool symmetric, bool hard_clamp, const float* g, const float* z,
                                                int64_t count, const FsqTables& tb, const float* scales,
                                                int64_t num_levels, float* out) {
  residual_backward_any<float>(symmetric, hard_clamp, g, z, count, tb, scales, num_levels, out);
}
VQK_NO_CONTRACT void tanh_portable(const float* x, int64_t n, float* y) { tanh_run<float>(x, n, y); }

#if VQK_X86
VQK_TARGET_AVX2 VQK_NO_CONTRACT void forward_avx2(bool symmetric, bool hard_clamp, const float* z, int64_t count,
                                                  const FsqTables& tb, float* codes, int32_t* levels) {
  forward_any<f32x8>(symmetric, hard_clamp, z, count, tb, codes, levels);
}
VQK_TARGET_AVX2 VQK_NO_CONTRACT void backward_avx2(bool symmetric, bool hard_clamp, const float* g, const float* z,
                                                   int64_t count, const FsqTables& tb, float* out) {
  backward_any<f32x8>(symmetric, hard_clamp, g, z, count, tb, out);
}
VQK_TARGET_AVX2 VQK_NO_CONTRACT void residual_avx2(bool symmetric, bool hard_clamp, const float* z, int64_t count,
                                                   const FsqTables& tb, const float* scales, int64_t num_levels,
                                                   float* out, int32_t* levels, int64_t stride) {
  residual_any<f32x8>(symmetric, hard_clamp, z, count, tb, scales, num_levels, out, levels, stride);
}
VQK_TARGET_AVX2 VQK_NO_CONTRACT void residual_backward_avx2(bool symmetric, bool hard_clamp, const float* g,
                                                            const float* z, int64_t count, const FsqTables& tb,
                                                            const float* scales, int64_t num_levels, float* out) {
  residual_backward_any<f32x8>(symmetric, hard_clamp, g, z, count, tb, scales, num_levels, out);
}
VQK_TARGET_AVX2 VQK_NO_CONTRACT void tanh_avx2(const float* x, int64_t n, float* y) { tanh_run<f32x8>(x, n, y); }

VQK_TARGET_AVX512 VQK_NO_CONTRACT void forward_avx512(bool symmetric, bool hard_clamp, const float* z, int64_t count,
                                                      const FsqTables& tb, float* codes, int32_t* levels) {
  forward_any<f32x16>(symmetric, hard_clamp, z, count, tb, codes, levels);
}
VQK_TARGET_AVX512 VQK_NO_CONTRACT void backward_avx512(bool symmetric, bool hard_clamp, const float* g, const float* z,
                                                       int64_t count, const FsqTables& tb, float* out) {
  backward_any<f32x16>(symmetric, hard_clamp, g, z, count, tb, out);
}
VQK_TARGET_AVX512 VQK_NO_CONTRACT void residual_avx512(bool symmetric, bool hard_clamp, const float* z, int64_t count,
                                                       const FsqTables& tb, const float* scales, int64_t num_levels,
                                                       float* out, int32_t* levels, int64_t stride) {
  residual_any<f32x16>(symmetric, hard_clamp, z, count, tb, scales, num_levels, out, levels, stride);
}
VQK_TARGET_AVX512 VQK_NO_CONTRACT void residual_backward_avx512(bool symmetric, bool hard_clamp, const float* g,
                                                                const float* z, int64_t count, const FsqTables& tb,
                                                                const float* scales, int64_t num_levels, float* out) {
  residual_backward_any<f32x16>(symmetric, hard_clamp, g, z, count, tb, scales, num_levels, out);
}
VQK_TARGET_AVX512 VQK_NO_CONTRACT void tanh_avx512(const float* x, int64_t n, float* y) { tanh_run<f32x16>(x, n, y); }
#endif

// The float32 kernels of the active ISA and their lane count.
struct FloatPath {
  int64_t lanes;
  void (*forward)(bool, bool, const float*, int64_t, const FsqTables&, float*, int32_t*);
  void (*backward)(bool, bool, const float*, const float*, int64_t, const FsqTables&, float*);
  void (*tanh)(const float*, int64_t, float*);
  void (*residual)(bool, bool, const float*, int64_t, const FsqTables&, const float*, int64_t, float*, int32_t*,
                   int64_t);
  void (*residual_backward)(bool, bool, const float*, const float*, int64_t, const FsqTables&, const float*, int64_t,
                            float*);
};

FloatPath float_path() {
#if VQK_X86
  if (active_isa() == Isa::Avx512)
    return {16, forward_avx512, backward_avx512, tanh_avx512, residual_avx512, residual_backward_avx512};
  if (active_isa() == Isa::Avx2)
    return {8, forward_avx2, backward_avx2, tanh_avx2, residual_avx2, residual_backward_avx2};
#endif
  return {1, forward_portable, backward_portable, tanh_portable, residual_portable, residual_backward_portable};
}

// Each row's index sum_j level_j * basis_j from its int32 levels [rows][d]; -1 for a row holding a -1
// (NaN). d is an int64_t, or a std::integral_constant for the lengths unrolled at compile time.
template <typename Dim>
void row_indices(const int32_t* levels, int64_t rows, Dim d, const int64_t* basis, int64_t* idx) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* lv = levels + r * d;
    int64_t index = 0;
    int32_t any = 0;
    for (int64_t j = 0; j < d; ++j) {
      any |= lv[j];
      index += lv[j] * basis[j];
    }
    idx[r] = any < 0 ? -1 : index;
  }
}

#if VQK_X86
// row_indices for 16 rows at a time by in-register permutes (FsqRowSums), the rest of the rows as row_indices:
// the same indices in half the time of the scalar sums, 8-12% off the forward at 16384 rows of 4-6 dims (Zen 5).
// D: the row length, a compile-time constant so that the 16 rows' D vectors stay in registers.
template <int D>
VQK_TARGET_AVX512 void row_indices_16(const int32_t* levels, int64_t rows, const FsqRowSums& t, const int64_t* basis,
                                      int64_t* idx) {
  constexpr int kPairs = (D + 1) / 2;
  const __m512i nan_weight = _mm512_set1_epi32(-static_cast<int32_t>(FsqRowSums::kMaxCodes));
  const __m512i zero = _mm512_setzero_si512();
  int64_t r = 0;
  for (; r + 16 <= rows; r += 16) {
    __m512i w[D];
#pragma GCC unroll 16
    for (int q = 0; q < D; ++q) {
      const __m512i lv = _mm512_loadu_si512(levels + r * D + 16 * q);
      w[q] = _mm512_mask_mov_epi32(_mm512_mullo_epi32(lv, _mm512_loadu_si512(t.basis.data() + 16 * q)),
                                   _mm512_cmplt_epi32_mask(lv, zero), nan_weight);
    }
    __m512i sum = zero;
#pragma GCC unroll 16
    for (int j = 0; j < D; ++j)
#pragma GCC unroll 8
      for (int pair = 0; pair < kPairs; ++pair) {
        const int q = 2 * pair, at = j * kPairs + pair;
        const __m512i picked =
            _mm512_permutex2var_epi32(w[q], _mm512_loadu_si512(t.index.data() + 16 * at), w[q + 1 < D ? q + 1 : q]);
        sum = _mm512_mask_add_epi32(sum, t.mask[at], sum, picked);
      }
    sum = _mm512_mask_mov_epi32(sum, _mm512_cmplt_epi32_mask(sum, zero), _mm512_set1_epi32(-1));
    _mm512_storeu_si512(idx + r, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(sum)));
    _mm512_storeu_si512(idx + r + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(sum, 1)));
  }
  row_indices(levels + r * D, rows - r, std::integral_constant<int, D>{}, basis, idx + r);
}
#endif

// Each row's index from its int32 levels [rows][d] (-1 for a row holding a NaN), by the fastest row sums here.
void level_row_indices(const FloatPath& path, const FsqSetup& setup, const int32_t* levels, int64_t rows, int64_t d,
                       int64_t* idx) {
  const int64_t* basis = setup.k.basis.data();
#if VQK_X86
  if (path.lanes == 16 && setup.row_sums.usable)
    return with_const<1, FsqRowSums::kMaxD>(
        d, [&](auto dc) { row_indices_16<decltype(dc)::value>(levels, rows, setup.row_sums, basis, idx); });
#endif
  if (d <= 8)
    with_const<1, 8>(d, [&](auto dc) { row_indices(levels, rows, dc, basis, idx); });
  else
    row_indices(levels, rows, d, basis, idx);
}

template <typename scalar_t>
void quantize_float(const at::Tensor& z, const FsqSetup& setup, bool symmetric, bool hard_clamp, scalar_t* out,
                    int64_t* idx) {
  const int64_t n = z.size(0), d = z.size(1);
  const FloatPath path = float_path();
  const FsqTables& tb = setup.tables(path.lanes);
  const RowSource<float> src(z);
  parallel_row_blocks<FloatScratch>(
      n,
      [&](FloatScratch& s, int64_t, int64_t r0, int64_t r1) {
        const int64_t rows = r1 - r0;
        int64_t ld;
        const float* zr = src.rows(r0, rows, s.z, ld);
        float* codes = compute_target(out + r0 * d, s.out, rows * d);
        s.levels.resize(rows * d);
        if (ld == d) {
          path.forward(symmetric, hard_clamp, zr, rows * d, tb, codes, s.levels.data());
        } else {
          for (int64_t i = 0; i < rows; ++i)
            path.forward(symmetric, hard_clamp, zr + i * ld, d, tb, codes + i * d, s.levels.data() + i * d);
        }
        convert_out(codes, rows * d, out + r0 * d);
        level_row_indices(path, setup, s.levels.data(), rows, d, idx + r0);
      },
      elementwise_grain(n, d));
}

// The scales [num_levels][d] repeated over the tables' period: [num_levels][period].
std::vector<float> scale_tables(const float* scales, int64_t num_levels, int64_t d, const FsqTables& tb) {
  std::vector<float> t(num_levels * tb.period);
  for (int64_t l = 0; l < num_levels; ++l)
    for (int64_t p = 0; p < tb.period; ++p) t[l * tb.period + p] = scales[l * d + p % d];
  return t;
}

template <typename scalar_t>
void residual_quantize_float(const at::Tensor& z, const float* scales, int64_t num_levels, const FsqSetup& setup,
                             bool symmetric, bool hard_clamp, scalar_t* out, int64_t* idx) {
  const int64_t n = z.size(0), d = z.size(1);
  const FloatPath path = float_path();
  const FsqTables& tb = setup.tables(path.lanes);
  const std::vector<float> st = scale_tables(scales, num_levels, d, tb);
  const RowSource<float> src(z);
  struct Scratch : FloatScratch {
    std::vector<int64_t> idx;
  };
  parallel_row_blocks<Scratch>(
      n,
      [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
        const int64_t rows = r1 - r0, count = rows * d;
        int64_t ld;
        const float* zr = src.rows(r0, rows, s.z, ld);
        float* q = compute_target(out + r0 * d, s.out, count);
        s.levels.resize(num_levels * count);
        if (ld == d) {
          path.residual(symmetric, hard_clamp, zr, count, tb, st.data(), num_levels, q, s.levels.data(), count);
        } else {
          for (int64_t i = 0; i < rows; ++i)
            path.residual(symmetric, hard_clamp, zr + i * ld, d, tb, st.data(), num_levels, q + i * d,
                          s.levels.data() + i * d, count);
        }
        convert_out(q, count, out + r0 * d);
        s.idx.resize(rows);
        for (int64_t l = 0; l < num_levels; ++l) {
          level_row_indices(path, setup, s.levels.data() + l * count, rows, d, s.idx.data());
          for (int64_t i = 0; i < rows; ++i) idx[(r0 + i) * num_levels + l] = s.idx[i];
        }
      },
      elementwise_grain(n, d * std::max<int64_t>(1, num_levels)));
}

template <typename scalar_t>
void residual_backward_float(const at::Tensor& grad, const at::Tensor& z, const float* scales, int64_t num_levels,
                             const FsqSetup& setup, bool symmetric, bool hard_clamp, scalar_t* out) {
  const FloatPath path = float_path();
  const FsqTables& tb = setup.tables(path.lanes);
  const std::vector<float> st = scale_tables(scales, num_levels, z.size(1), tb);
  backward_blocks<float>(grad, z, elementwise_grain(z.size(0), z.size(1) * std::max<int64_t>(1, num_levels)), out,
                         [&](const float* g, const float* zr, int64_t count, float* o) {
                           path.residual_backward(symmetric, hard_clamp, g, zr, count, tb, st.data(), num_levels, o);
                         });
}

template <typename scalar_t>
void backward_float(const at::Tensor& grad_codes, const at::Tensor& z, const FsqSetup& setup, bool symmetric,
                    bool hard_clamp, scalar_t* out) {
  const FloatPath path = float_path();
  const FsqTables& tb = setup.tables(path.lanes);
  backward_blocks<float>(grad_codes, z, elementwise_grain(z.size(0), z.size(1)), out,
                         [&](const float* g, const float* zr, int64_t count, float* o) {
                           path.backward(symmetric, hard_clamp, g, zr, count, tb, o);
                         });
}

std::tuple<at::Tensor, at::Tensor> fsq_quantize(const at::Tensor& z, at::IntArrayRef levels, bool symmetric,
                                                bool hard_clamp) {
  check_fsq("fsq_quantize", z, levels);
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor codes = at::empty({n, d}, z.options());
  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  if (n == 0) return {codes, indices};
  const auto setup = fsq_setup(levels, hard_clamp);
  int64_t* idx = indices.data_ptr<int64_t>();
  switch (z.scalar_type()) {
    case at::kDouble:
      quantize_double(z, setup->k, symmetric, hard_clamp, codes.data_ptr<double>(), idx);
      break;
    case at::kFloat:
      quantize_float(z, *setup, symmetric, hard_clamp, codes.data_ptr<float>(), idx);
      break;
    case at::kHalf:
      quantize_float(z, *setup, symmetric, hard_clamp, codes.data_ptr<at::Half>(), idx);
      break;
    default:
      quantize_float(z, *setup, symmetric, hard_clamp, codes.data_ptr<at::BFloat16>(), idx);
      break;
  }
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
  const auto setup = fsq_setup(levels, hard_clamp);
  switch (z.scalar_type()) {
    case at::kDouble:
      backward_double(grad_codes, z, setup->k, symmetric, hard_clamp, grad.data_ptr<double>());
      break;
    case at::kFloat:
      backward_float(grad_codes, z, *setup, symmetric, hard_clamp, grad.data_ptr<float>());
      break;
    case at::kHalf:
      backward_float(grad_codes, z, *setup, symmetric, hard_clamp, grad.data_ptr<at::Half>());
      break;
    default:
      backward_float(grad_codes, z, *setup, symmetric, hard_clamp, grad.data_ptr<at::BFloat16>());
      break;
  }
  return grad;
}

// scales as one contiguous [num_levels][d] of T.
template <typename T>
at::Tensor scales_as(const at::Tensor& scales) {
  return scales.to(c10::CppTypeToScalarType<T>::value).contiguous();
}

std::tuple<at::Tensor, at::Tensor> residual_fsq_quantize(const at::Tensor& z, const at::Tensor& scales,
                                                         at::IntArrayRef levels, bool symmetric, bool hard_clamp) {
  check_residual_fsq("residual_fsq_quantize", z, scales, levels);
  const int64_t n = z.size(0), d = z.size(1), num_levels = scales.size(0);
  at::Tensor quantized = at::empty({n, d}, z.options());
  at::Tensor indices = at::empty({n, num_levels}, z.options().dtype(at::kLong));
  const auto setup = fsq_setup(levels, hard_clamp);
  int64_t* idx = indices.data_ptr<int64_t>();
  if (compute_dtype(z, scales) == at::kDouble) {
    const at::Tensor s = scales_as<double>(scales);
    if (n == 0) return {quantized, indices};
    at::Tensor out = z.scalar_type() == at::kDouble ? quantized : at::empty({n, d}, z.options().dtype(at::kDouble));
    residual_quantize_double(z, s.const_data_ptr<double>(), num_levels, setup->k, symmetric, hard_clamp,
                             out.data_ptr<double>(), idx);
    if (!out.is_same(quantized)) quantized.copy_(out);
    return {quantized, indices};
  }
  const at::Tensor s = scales_as<float>(scales);
  if (n == 0) return {quantized, indices};
  const float* sp = s.const_data_ptr<float>();
  switch (z.scalar_type()) {
    case at::kFloat:
      residual_quantize_float(z, sp, num_levels, *setup, symmetric, hard_clamp, quantized.data_ptr<float>(), idx);
      break;
    case at::kHalf:
      residual_quantize_float(z, sp, num_levels, *setup, symmetric, hard_clamp, quantized.data_ptr<at::Half>(), idx);
      break;
    default:
      residual_quantize_float(z, sp, num_levels, *setup, symmetric, hard_clamp, quantized.data_ptr<at::BFloat16>(),
                              idx);
      break;
  }
  return {quantized, indices};
}

at::Tensor residual_fsq_quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& z,
                                          const at::Tensor& scales, at::IntArrayRef levels, bool symmetric,
                                          bool hard_clamp) {
  check_residual_fsq_backward("residual_fsq_quantize_backward", grad_quantized, z, scales, levels);
  const int64_t n = z.size(0), d = z.size(1), num_levels = scales.size(0);
  at::Tensor grad = at::empty({n, d}, z.options());
  const auto setup = fsq_setup(levels, hard_clamp);
  if (compute_dtype(z, scales, grad_quantized) == at::kDouble) {
    const at::Tensor s = scales_as<double>(scales);
    if (n == 0) return grad;
    at::Tensor out = z.scalar_type() == at::kDouble ? grad : at::empty({n, d}, z.options().dtype(at::kDouble));
    residual_backward_double(grad_quantized, z, s.const_data_ptr<double>(), num_levels, setup->k, symmetric, hard_clamp,
                             out.data_ptr<double>());
    if (!out.is_same(grad)) grad.copy_(out);
    return grad;
  }
  const at::Tensor s = scales_as<float>(scales);
  if (n == 0) return grad;
  const float* sp = s.const_data_ptr<float>();
  switch (z.scalar_type()) {
    case at::kFloat:
      residual_backward_float(grad_quantized, z, sp, num_levels, *setup, symmetric, hard_clamp, grad.data_ptr<float>());
      break;
    case at::kHalf:
      residual_backward_float(grad_quantized, z, sp, num_levels, *setup, symmetric, hard_clamp,
                              grad.data_ptr<at::Half>());
      break;
    default:
      residual_backward_float(grad_quantized, z, sp, num_levels, *setup, symmetric, hard_clamp,
                              grad.data_ptr<at::BFloat16>());
      break;
  }
  return grad;
}

}  // namespace

void fsq_tanh(const float* x, int64_t n, float* y) { float_path().tanh(x, n, y); }

}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("fsq_quantize", &vqk::cpu::fsq_quantize);
  m.impl("fsq_quantize_backward", &vqk::cpu::fsq_quantize_backward);
  m.impl("residual_fsq_quantize", &vqk::cpu::residual_fsq_quantize);
  m.impl("residual_fsq_quantize_backward", &vqk::cpu::residual_fsq_quantize_backward);
}
