// The fused nearest-code search engine shared by the CPU kernels of nearest_code,
// nearest_code_topk, vq_quantize and residual_quantize.
//
// The codebook is packed once into panels of kLanes codes ([panel][D][kLanes], so one
// SIMD load holds one coordinate of many codes), scaled by alpha and with a per-code term
// so that the score
//     score(x, c) = cterm[c] + <x, alpha * c>
// orders codes like the metric's distance (l2: |c|^2 - 2<x,c>; ip and cosine on
// normalised codes: -<x,c>). alpha is -2 or -1, so the scaling is exact, and the
// accumulators start at cterm: the tile's sums are the scores. A register tile of rows x
// codes (6 x 16 portable and AVX2, 12 x 32 AVX-512; one row x the whole L1 chunk for
// D <= 8) is accumulated over D and folded into a running minimum per row and lane; the
// N x K distance matrix is never formed. Rows are processed in blocks (row_block_size), one
// task each (at::parallel_for), and the codebook in L2-sized chunks of panels. The
// reported distance of the chosen code is recomputed exactly (double, direct form).
//
// NaN rules: a code holding a NaN gets cterm = NaN, so its score is NaN and loses every
// strict '<' comparison: it is never chosen. A row of x holding a NaN scores NaN
// everywhere and gets index -1. A row left without any candidate (all scores NaN or
// +inf: overflow, infinite inputs) is settled by an exact scan.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VQK_X86 1
#define VQK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define VQK_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define VQK_X86 0
#endif

// The active ISA's instance of a kernel compiled once per ISA as NAME_portable and, on x86, NAME_avx2 and
// NAME_avx512, with the template arguments that follow NAME: VQK_ACTIVE_ISA(backward, <T, S>).
#if VQK_X86
#define VQK_ACTIVE_ISA(NAME, ...)                           \
  (active_isa() == Isa::Avx512 ? &NAME##_avx512 __VA_ARGS__ \
   : active_isa() == Isa::Avx2 ? &NAME##_avx2 __VA_ARGS__   \
                               : &NAME##_portable __VA_ARGS__)
#else
#define VQK_ACTIVE_ISA(NAME, ...) (&NAME##_portable __VA_ARGS__)
#endif

#include "checks.h"
#include "cpu/cpu_isa.h"

// The lane functions are always inlined, so that they compile for the target ISA of the entry
// point calling them (a function without a target attribute may be inlined into one with it).
#define VQK_LANES inline __attribute__((always_inline))
// The lanes' arithmetic rounds every product and sum as written: GCC otherwise fuses a * b + c
// into an FMA where the target has one (-ffp-contract=fast is its C++ default), which would
// make the AVX paths round differently from the portable one and from vector-quantize-pytorch.
// (Other compilers get no attribute; the isas_agree_bitwise tests of test_fsq.py and
// test_rotation_trick.py would show a fusion.)
#if defined(__GNUC__) && !defined(__clang__)
#define VQK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define VQK_NO_CONTRACT
#endif

// GCC warns that passing vectors wider than the default target has changes the ABI: the lane
// functions are always inlined into entry points compiled for a target that has them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace vqk {
namespace cpu {

constexpr int kLanes = 16;                      // codes per panel: two AVX2 registers
constexpr int kMR = 6;                          // rows per register tile: 12 accumulators + 2 code loads + 1 broadcast
constexpr int64_t kRowBlock = 96;               // rows per parallel task (fewer for small N)
constexpr int64_t kChunkBytes = 256 << 10;      // packed codebook bytes swept per pass over a row block
constexpr int64_t kSmallD = 8;                  // D at most this: rows stream the codebook one at a time...
constexpr int64_t kSmallChunkBytes = 16 << 10;  // ...so their chunk stays in L1
constexpr double kNormEps = 1e-12;              // as torch.nn.functional.normalize

// A 64-byte aligned array: every panel row starts a cache line, so no SIMD load is split.
template <typename T>
class AlignedBuffer {
 public:
  void allocate(int64_t n) {  // uninitialised
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(ptr_, "vqkernels: out of memory packing the codebook (", bytes, " bytes)");
  }
  void assign(int64_t n, T value) {
    allocate(n);
    std::fill(ptr_.get(), ptr_.get() + n, value);
  }
  T* data() { return ptr_.get(); }
  const T* data() const { return ptr_.get(); }
  T& operator[](int64_t i) { return ptr_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
};

// A row pair's distance in double as the metric defines it (exact_distance_kernel: the active ISA's, defined below).
template <typename T>
using ExactDistanceFn = double (*)(const T* x, const T* c, int64_t D, Metric metric);
template <typename T>
ExactDistanceFn<T> exact_distance_kernel();

template <typename T>
struct PackedCodebook {
  int64_t K = 0, D = 0, P = 0;  // codes, dimension, panels
  Metric metric = Metric::L2;
  T alpha = T(-2);                     // the packed codes are alpha * c (exact: a power of two)
  AlignedBuffer<T> data;               // [P][D][kLanes], padding codes are zero
  const T* rows = nullptr;             // [K][D]: the codes as the metric sees them (normalised for cosine):
  std::vector<T> rows_copy;            // the codebook itself when it already is contiguous T, else this copy
  AlignedBuffer<T> cterm;              // [P * kLanes], NaN for codes never to be chosen (NaN rows, padding)
  std::vector<uint8_t> bad;            // [K]: the code holds a NaN
  ExactDistanceFn<T> exact = nullptr;  // the active ISA's exact distance, picked once per packing

  const T* panel(int64_t p) const { return data.data() + p * D * kLanes; }
  const T* row(int64_t k) const { return rows + k * D; }
};

// One full panel of a codebook that is already contiguous T, for L2 or IP: writes the packed alpha * c
// [D][kLanes], and per code the sum of squares over d in order (in double, unfused: the bits of the generic
// loop of pack_codebook) and whether it holds a NaN. The kLanes codes are independent lanes, so this compiles to
// vector code on each ISA (a strided load per coordinate), where one code at a time is a chain of D dependent
// double additions.
template <typename T>
VQK_LANES void pack_panel_lanes(const T* rows, int64_t D, T alpha, T* dst, double* norm2, bool* nan) {
  typedef T V __attribute__((vector_size(sizeof(T) * kLanes)));            // one coordinate of the panel's codes
  typedef double W __attribute__((vector_size(sizeof(double) * kLanes)));  // the same in double
  W acc = {};
  decltype(V{} != V{}) bad = {};
  for (int64_t d = 0; d < D; ++d) {
    V v;
    for (int j = 0; j < kLanes; ++j) v[j] = rows[j * D + d];
    const V scaled = alpha * v;
    std::memcpy(dst + d * kLanes, &scaled, sizeof scaled);
    const W w = __builtin_convertvector(v, W);
    acc += w * w;
    bad |= v != v;
  }
  for (int j = 0; j < kLanes; ++j) {
    norm2[j] = acc[j];
    nan[j] = bad[j] != 0;
  }
}

template <typename T>
using PackPanelFn = void (*)(const T* rows, int64_t D, T alpha, T* dst, double* norm2, bool* nan);

template <typename T>
VQK_NO_CONTRACT void pack_panel_portable(const T* rows, int64_t D, T alpha, T* dst, double* norm2, bool* nan) {
  pack_panel_lanes(rows, D, alpha, dst, norm2, nan);
}
#if VQK_X86
template <typename T>
VQK_TARGET_AVX2 VQK_NO_CONTRACT void pack_panel_avx2(const T* rows, int64_t D, T alpha, T* dst, double* norm2,
                                                     bool* nan) {
  pack_panel_lanes(rows, D, alpha, dst, norm2, nan);
}
template <typename T>
VQK_TARGET_AVX512 VQK_NO_CONTRACT void pack_panel_avx512(const T* rows, int64_t D, T alpha, T* dst, double* norm2,
                                                         bool* nan) {
  pack_panel_lanes(rows, D, alpha, dst, norm2, nan);
}
#endif

template <typename T>
PackedCodebook<T> pack_codebook(const at::Tensor& codebook, Metric metric) {
  PackedCodebook<T> pc;
  pc.K = codebook.size(0);
  pc.D = codebook.size(1);
  pc.P = (pc.K + kLanes - 1) / kLanes;
  pc.metric = metric;
  pc.alpha = metric == Metric::L2 ? T(-2) : T(-1);
  pc.exact = exact_distance_kernel<T>();
  pc.data.allocate(pc.P * pc.D * kLanes);
  for (int64_t k = pc.K; k < pc.P * kLanes; ++k)  // the padding codes of the last panel
    for (int64_t d = 0; d < pc.D; ++d) pc.data[(k / kLanes) * pc.D * kLanes + d * kLanes + k % kLanes] = T(0);
  const bool use_input = metric != Metric::Cosine && codebook.is_contiguous() &&
                         codebook.scalar_type() == c10::CppTypeToScalarType<T>::value;
  if (use_input) {
    pc.rows = codebook.const_data_ptr<T>();
  } else {
    pc.rows_copy.resize(pc.K * pc.D);
    pc.rows = pc.rows_copy.data();
  }
  pc.cterm.assign(pc.P * kLanes, std::numeric_limits<T>::quiet_NaN());
  pc.bad.assign(pc.K, 0);
  const int64_t s0 = codebook.stride(0), s1 = codebook.stride(1), D = pc.D;
  const PackPanelFn<T> pack_panel = VQK_ACTIVE_ISA(pack_panel, <T>);
  // A panel's codes at a time, coordinate by coordinate: every code's sums still run over d in order (the same
  // bits as one code at a time), but the panel's kLanes sums are independent chains, not one chain of D
  // dependent double additions per code, and each coordinate's store fills a contiguous row of the panel.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "vqk_pack", [&] {
    const scalar_t* src = codebook.const_data_ptr<scalar_t>();
    at::parallel_for(0, pc.P, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t k0 = q * kLanes, nk = std::min<int64_t>(kLanes, pc.K - k0);
        const scalar_t* rows = src + k0 * s0;
        double norm[kLanes], norm2[kLanes];
        bool nan[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          norm[j] = 1.0;
          norm2[j] = 0.0;
          nan[j] = false;
        }
        if (metric == Metric::Cosine) {  // divided by max(|c|, eps), as F.normalize does
          double sq[kLanes] = {};
          for (int64_t d = 0; d < D; ++d)
            for (int64_t j = 0; j < nk; ++j) {
              const double raw = static_cast<double>(rows[j * s0 + d * s1]);
              sq[j] += raw * raw;
            }
          for (int64_t j = 0; j < nk; ++j) norm[j] = std::max(std::sqrt(sq[j]), kNormEps);
        }
        T* dst = pc.data.data() + q * D * kLanes;
        T* out = use_input ? nullptr : pc.rows_copy.data() + k0 * D;
        int64_t generic = nk;  // codes left to the generic loop
        if constexpr (std::is_same<scalar_t, T>::value) {
          if (use_input && nk == kLanes) {  // the common case, vectorised: the same values
            pack_panel(rows, D, pc.alpha, dst, norm2, nan);
            generic = 0;
          }
        }
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < generic; ++j) {
            const double raw = static_cast<double>(rows[j * s0 + d * s1]);
            const T v = static_cast<T>(metric == Metric::Cosine ? raw / norm[j] : raw);
            nan[j] |= raw != raw;
            dst[d * kLanes + j] = pc.alpha * v;
            if (out) out[j * D + d] = v;
            norm2[j] += static_cast<double>(v) * static_cast<double>(v);
          }
        for (int64_t j = 0; j < nk; ++j) {
          pc.bad[k0 + j] = nan[j];
          pc.cterm[k0 + j] =
              nan[j] ? std::numeric_limits<T>::quiet_NaN() : (metric == Metric::L2 ? static_cast<T>(norm2[j]) : T(0));
        }
      }
    });
  });
  return pc;
}

// Rows of x as T: a pointer straight into x when it already is row-contiguous T,
// else converted block by block into a scratch buffer (never a full copy of x).
template <typename T>
class RowSource {
  template <typename S>
  static void convert_row(const S* __restrict src, int64_t D, T* __restrict out) {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(src[d]);
  }

 public:
  explicit RowSource(const at::Tensor& x)
      : x_(x), D_(x.size(1)), direct_(x.scalar_type() == c10::CppTypeToScalarType<T>::value && x.stride(1) == 1) {}

  const T* rows(int64_t r0, int64_t n, std::vector<T>& buf, int64_t& ld) const {
    if (direct_) {
      ld = x_.stride(0);
      return x_.const_data_ptr<T>() + r0 * ld;
    }
    buf.resize(n * D_);
    ld = D_;
    const int64_t s0 = x_.stride(0), s1 = x_.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "vqk_rows", [&] {
      const scalar_t* src = x_.const_data_ptr<scalar_t>() + r0 * s0;
      T* out = buf.data();
      // The common layouts get loops the compiler vectorises: rows of another dtype (a conversion) and rows that
      // repeat one value (stride 0 along D: an expanded gradient, such as a mean's), else any strides.
      if (s1 == 1) {
        for (int64_t i = 0; i < n; ++i) convert_row(src + i * s0, D_, out + i * D_);
      } else if (s1 == 0) {
        for (int64_t i = 0; i < n; ++i) std::fill(out + i * D_, out + (i + 1) * D_, static_cast<T>(src[i * s0]));
      } else {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t d = 0; d < D_; ++d) out[i * D_ + d] = static_cast<T>(src[i * s0 + d * s1]);
      }
    });
    return buf.data();
  }

 private:
  const at::Tensor& x_;
  int64_t D_;
  bool direct_;
};

// Calls f(std::integral_constant<int, V>{}) for the run-time v in [Lo, Hi] (Hi for any v past it).
template <int Lo, int Hi, typename F>
inline void with_const(int64_t v, F&& f) {
  if constexpr (Lo == Hi) {
    f(std::integral_constant<int, Lo>{});
  } else {
    if (v == Lo) return f(std::integral_constant<int, Lo>{});
    with_const<Lo + 1, Hi>(v, std::forward<F>(f));
  }
}

// ---------------------------------------------------------------------------------------
// Register-tile kernels. Each kernel type offers
//   nearest<MR>(x, ldx, pc, p0, p1, best, bidx): fold panels [p0, p1) into the running
//       minimum best/bidx [MR][kLanes] of MR rows (strict '<': the earlier code keeps a tie);
//   scores<MR>(x, ldx, pc, p, thr, out, mask): the scores of MR rows against panel p into
//       out [MR][kLanes], and per row the bit mask of lanes scoring below thr[r].

template <typename T>
struct PortableKernel {
  static constexpr int kRows = kMR;  // rows per nearest() call

  template <int MR>
  static void tile(const T* x, int64_t ldx, const PackedCodebook<T>& pc, int64_t p, T (&acc)[MR][kLanes]) {
    const T* ct = pc.cterm.data() + p * kLanes;
    const T* pan = pc.panel(p);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < kLanes; ++j) acc[r][j] = ct[j];
    for (int64_t d = 0; d < pc.D; ++d) {
      const T* c = pan + d * kLanes;
      for (int r = 0; r < MR; ++r) {
        const T xv = x[r * ldx + d];
        for (int j = 0; j < kLanes; ++j) acc[r][j] += xv * c[j];
      }
    }
  }

  template <int MR>
  static void nearest(const T* x, int64_t ldx, const PackedCodebook<T>& pc, int64_t p0, int64_t p1, T* best,
                      int32_t* bidx) {
    T acc[MR][kLanes];
    for (int64_t p = p0; p < p1; ++p) {
      tile<MR>(x, ldx, pc, p, acc);
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < kLanes; ++j)
          if (acc[r][j] < best[r * kLanes + j]) {
            best[r * kLanes + j] = acc[r][j];
            bidx[r * kLanes + j] = static_cast<int32_t>(p * kLanes + j);
          }
    }
  }

  template <int MR>
  static void scores(const T* x, int64_t ldx, const PackedCodebook<T>& pc, int64_t p, const T* thr, T* out,
                     uint32_t* mask) {
    T acc[MR][kLanes];
    tile<MR>(x, ldx, pc, p, acc);
    for (int r = 0; r < MR; ++r) {
      mask[r] = 0;
      for (int j = 0; j < kLanes; ++j) {
        out[r * kLanes + j] = acc[r][j];
        mask[r] |= static_cast<uint32_t>(acc[r][j] < thr[r]) << j;
      }
    }
  }
};

#if VQK_X86
// The D dispatch the SIMD kernels share: D <= kSmallD to Kern::nearest_rows_small<D>,
// D = 16 and 32 to tiles compiled for that D, any other D to the run-time-D tile.
template <typename Kern, int MR>
inline void dispatch_nearest(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0, int64_t p1,
                             float* best, int32_t* bidx) {
  if (pc.D >= 1 && pc.D <= kSmallD)
    return with_const<1, kSmallD>(pc.D, [&](auto dc) {
      Kern::template nearest_rows_small<decltype(dc)::value>(MR, x, ldx, pc, p0, p1, best, bidx);
    });
  switch (pc.D) {
    case 16:
      return Kern::template nearest_d<MR, 16>(x, ldx, pc, p0, p1, best, bidx);
    case 32:
      return Kern::template nearest_d<MR, 32>(x, ldx, pc, p0, p1, best, bidx);
    default:
      return Kern::template nearest_d<MR, 0>(x, ldx, pc, p0, p1, best, bidx);
  }
}

struct Avx2Kernel {
  static constexpr int kRows = kMR;

  // DC > 0: D known at compile time (fully unrolled small-D paths); DC == 0: run-time D.
  template <int MR, int DC>
  VQK_TARGET_AVX2 static inline void tile(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p,
                                          __m256 (&acc)[MR][2]) {
    const int64_t n = DC > 0 ? DC : pc.D;
    const float* pan = pc.panel(p);
    const __m256 ct0 = _mm256_loadu_ps(pc.cterm.data() + p * kLanes);
    const __m256 ct1 = _mm256_loadu_ps(pc.cterm.data() + p * kLanes + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = ct0;
      acc[r][1] = ct1;
    }
#pragma GCC unroll 4
    for (int64_t d = 0; d < n; ++d) {
      const __m256 c0 = _mm256_loadu_ps(pan + d * kLanes);
      const __m256 c1 = _mm256_loadu_ps(pan + d * kLanes + 8);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * ldx + d);
        acc[r][0] = _mm256_fmadd_ps(xv, c0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, c1, acc[r][1]);
      }
    }
  }

  template <int MR, int DC>
  VQK_TARGET_AVX2 static void nearest_d(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0,
                                        int64_t p1, float* best, int32_t* bidx) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[MR][2];
    for (int64_t p = p0; p < p1; ++p) {
      tile<MR, DC>(x, ldx, pc, p, acc);
      const __m256i id0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(p * kLanes)), lane);
      const __m256i id1 = _mm256_add_epi32(id0, _mm256_set1_epi32(8));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        float* b = best + r * kLanes;
        int32_t* bi = bidx + r * kLanes;
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        const __m256 m0 = _mm256_cmp_ps(acc[r][0], b0, _CMP_LT_OQ), m1 = _mm256_cmp_ps(acc[r][1], b1, _CMP_LT_OQ);
        _mm256_storeu_ps(b, _mm256_blendv_ps(b0, acc[r][0], m0));
        _mm256_storeu_ps(b + 8, _mm256_blendv_ps(b1, acc[r][1], m1));
        const __m256 i0 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bi)));
        const __m256 i1 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bi + 8)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bi),
                            _mm256_castps_si256(_mm256_blendv_ps(i0, _mm256_castsi256_ps(id0), m0)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bi + 8),
                            _mm256_castps_si256(_mm256_blendv_ps(i1, _mm256_castsi256_ps(id1), m1)));
      }
    }
  }

  // Small D (<= kSmallD): one row at a time with its coordinates held in registers and its
  // running minimum too, streaming an L1-resident chunk of panels 8 codes per step. Lane j
  // of the state covers the codes = j (mod 8), visited in increasing order, so the strict
  // '<' still leaves ties to the lower index; the state lives in lanes 0-7 of best/bidx.
  template <int DC>
  VQK_TARGET_AVX2 static void nearest_row_small(const float* x, const PackedCodebook<float>& pc, int64_t p0, int64_t p1,
                                                float* best, int32_t* bidx) {
    __m256 xv[DC];
#pragma GCC unroll 8
    for (int d = 0; d < DC; ++d) xv[d] = _mm256_set1_ps(x[d]);
    __m256 b = _mm256_loadu_ps(best);
    __m256 bi = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bidx)));
    __m256i cur = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(p0 * kLanes)),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i step = _mm256_set1_epi32(8);
    for (int64_t p = p0; p < p1; ++p) {
      const float* pan = pc.panel(p);
      const float* ct = pc.cterm.data() + p * kLanes;
#pragma GCC unroll 2
      for (int h = 0; h < kLanes; h += 8) {
        __m256 acc = _mm256_loadu_ps(ct + h);
#pragma GCC unroll 8
        for (int d = 0; d < DC; ++d) acc = _mm256_fmadd_ps(xv[d], _mm256_loadu_ps(pan + d * kLanes + h), acc);
        const __m256 m = _mm256_cmp_ps(acc, b, _CMP_LT_OQ);
        b = _mm256_min_ps(acc, b);  // a NaN score or a tie keeps b (the second operand)
        bi = _mm256_blendv_ps(bi, _mm256_castsi256_ps(cur), m);
        cur = _mm256_add_epi32(cur, step);
      }
    }
    _mm256_storeu_ps(best, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bidx), _mm256_castps_si256(bi));
  }

  template <int DC>
  static void nearest_rows_small(int mr, const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0,
                                 int64_t p1, float* best, int32_t* bidx) {
    for (int r = 0; r < mr; ++r) nearest_row_small<DC>(x + r * ldx, pc, p0, p1, best + r * kLanes, bidx + r * kLanes);
  }

  template <int MR>
  static void nearest(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0, int64_t p1, float* best,
                      int32_t* bidx) {
    dispatch_nearest<Avx2Kernel, MR>(x, ldx, pc, p0, p1, best, bidx);
  }

  template <int MR>
  VQK_TARGET_AVX2 static void scores(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p,
                                     const float* thr, float* out, uint32_t* mask) {
    __m256 acc[MR][2];
    tile<MR, 0>(x, ldx, pc, p, acc);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(out + r * kLanes, acc[r][0]);
      _mm256_storeu_ps(out + r * kLanes + 8, acc[r][1]);
      const __m256 t = _mm256_set1_ps(thr[r]);
      mask[r] = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[r][0], t, _CMP_LT_OQ))) |
                static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[r][1], t, _CMP_LT_OQ))) << 8;
    }
  }
};

// AVX-512: tiles of 6 rows x 64 codes with mask-register updates of a 16-lane running minimum, at every D past
// kSmallD. Measured on a Zen 5 EPYC (full-width 512-bit FMA units), 2 threads: 86-90% of the measured FMA peak at
// D = 32..256, twice the AVX2 tile's rate at D >= 48, and 4-8% faster than 12 x 32 tiles at D = 16..32 (8 x 48 and
// 4 x 96 were slower). On Zen 4, which splits a 512-bit FMA in two, the AVX2 tile had measured 3-4% faster at
// D >= 48. For small D (<= kSmallD) two rows at a time share each 16-code load, with both rows' coordinates and
// running minima held in the 32 registers. The top-k scores use the AVX2 tile (every AVX-512 CPU has AVX2).
struct Avx512Kernel {
  static constexpr int kRows = 12;     // rows per nearest() call: two tiles' rows
  static constexpr int kTileRows = 6;  // a tile: 6 rows x 4 panels (64 codes), 24 accumulators of the 32 registers
  static constexpr int kTilePanels = 4;

  // MR rows x NP panels (16 codes each) accumulated over D, starting from cterm.
  template <int MR, int DC, int NP>
  VQK_TARGET_AVX512 static inline void tile(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p,
                                            __m512 (&acc)[MR][NP]) {
    const int64_t n = DC > 0 ? DC : pc.D;
    const int64_t stride = pc.D * kLanes;  // floats from one panel to the next
    const float* pan = pc.panel(p);
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const __m512 ct = _mm512_load_ps(pc.cterm.data() + (p + q) * kLanes);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) acc[r][q] = ct;
    }
#pragma GCC unroll 4
    for (int64_t d = 0; d < n; ++d) {
      __m512 c[NP];
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) c[q] = _mm512_load_ps(pan + q * stride + d * kLanes);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * ldx + d]);
#pragma GCC unroll 4
        for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_fmadd_ps(xv, c[q], acc[r][q]);
      }
    }
  }

  // Running minimum per row in 16 lanes (lane j: the codes = j mod 16), folded panel by panel.
  template <int MR, int DC, int NP>
  VQK_TARGET_AVX512 static void nearest_tile(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p,
                                             float* best, int32_t* bidx) {
    __m512 acc[MR][NP];
    tile<MR, DC, NP>(x, ldx, pc, p, acc);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      __m512 b = _mm512_loadu_ps(best + r * kLanes);
      __m512i bi = _mm512_loadu_si512(bidx + r * kLanes);
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) {
        const __mmask16 m = _mm512_cmp_ps_mask(acc[r][q], b, _CMP_LT_OQ);
        b = _mm512_mask_mov_ps(b, m, acc[r][q]);
        bi = _mm512_mask_mov_epi32(bi, m,
                                   _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>((p + q) * kLanes)), lane));
      }
      _mm512_storeu_ps(best + r * kLanes, b);
      _mm512_storeu_si512(bidx + r * kLanes, bi);
    }
  }

  template <int MR, int DC>
  static void nearest_d(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0, int64_t p1,
                        float* best, int32_t* bidx) {
    constexpr int H = MR < kTileRows ? MR : kTileRows;
    sweep<H, DC>(x, ldx, pc, p0, p1, best, bidx);
    if constexpr (MR > kTileRows)
      sweep<MR - kTileRows, DC>(x + kTileRows * ldx, ldx, pc, p0, p1, best + kTileRows * kLanes,
                                bidx + kTileRows * kLanes);
  }

  // MR rows against panels [p0, p1), kTilePanels at a time.
  template <int MR, int DC>
  static void sweep(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0, int64_t p1, float* best,
                    int32_t* bidx) {
    int64_t p = p0;
    for (; p + kTilePanels <= p1; p += kTilePanels) nearest_tile<MR, DC, kTilePanels>(x, ldx, pc, p, best, bidx);
    for (; p < p1; ++p) nearest_tile<MR, DC, 1>(x, ldx, pc, p, best, bidx);
  }

  template <int DC, int NR>
  VQK_TARGET_AVX512 static void nearest_small(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0,
                                              int64_t p1, float* best, int32_t* bidx) {
    __m512 xv[NR][DC], b[NR];
    __m512i bi[NR];
#pragma GCC unroll 2
    for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 8
      for (int d = 0; d < DC; ++d) xv[r][d] = _mm512_set1_ps(x[r * ldx + d]);
      b[r] = _mm512_loadu_ps(best + r * kLanes);
      bi[r] = _mm512_loadu_si512(bidx + r * kLanes);
    }
    __m512i cur = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(p0 * kLanes)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i step = _mm512_set1_epi32(kLanes);
    for (int64_t p = p0; p < p1; ++p) {
      const float* pan = pc.panel(p);
      const __m512 ct = _mm512_load_ps(pc.cterm.data() + p * kLanes);
      __m512 acc[NR];
#pragma GCC unroll 2
      for (int r = 0; r < NR; ++r) acc[r] = ct;
#pragma GCC unroll 8
      for (int d = 0; d < DC; ++d) {
        const __m512 c = _mm512_load_ps(pan + d * kLanes);
#pragma GCC unroll 2
        for (int r = 0; r < NR; ++r) acc[r] = _mm512_fmadd_ps(xv[r][d], c, acc[r]);
      }
#pragma GCC unroll 2
      for (int r = 0; r < NR; ++r) {
        const __mmask16 m = _mm512_cmp_ps_mask(acc[r], b[r], _CMP_LT_OQ);
        b[r] = _mm512_mask_mov_ps(b[r], m, acc[r]);
        bi[r] = _mm512_mask_mov_epi32(bi[r], m, cur);
      }
      cur = _mm512_add_epi32(cur, step);
    }
#pragma GCC unroll 2
    for (int r = 0; r < NR; ++r) {
      _mm512_storeu_ps(best + r * kLanes, b[r]);
      _mm512_storeu_si512(bidx + r * kLanes, bi[r]);
    }
  }

  template <int DC>
  static void nearest_rows_small(int mr, const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0,
                                 int64_t p1, float* best, int32_t* bidx) {
    int r = 0;
    for (; r + 2 <= mr; r += 2)
      nearest_small<DC, 2>(x + r * ldx, ldx, pc, p0, p1, best + r * kLanes, bidx + r * kLanes);
    if (r < mr) nearest_small<DC, 1>(x + r * ldx, ldx, pc, p0, p1, best + r * kLanes, bidx + r * kLanes);
  }

  template <int MR>
  static void nearest(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p0, int64_t p1, float* best,
                      int32_t* bidx) {
    dispatch_nearest<Avx512Kernel, MR>(x, ldx, pc, p0, p1, best, bidx);
  }

  template <int MR>
  static void scores(const float* x, int64_t ldx, const PackedCodebook<float>& pc, int64_t p, const float* thr,
                     float* out, uint32_t* mask) {
    Avx2Kernel::scores<MR>(x, ldx, pc, p, thr, out, mask);
  }
};
#endif

// Calls f(std::integral_constant<int, MR>{}) for a run-time MR in [1, kMR].
template <typename F>
inline void with_mr(int64_t mr, F&& f) {
  with_const<1, kMR>(mr, std::forward<F>(f));
}

// Calls f(kernel) with the kernel type the active ISA selects for T.
template <typename T, typename F>
inline void with_kernel(F&& f) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value) {
    if (active_isa() == Isa::Avx512) return f(Avx512Kernel{});
    if (active_isa() == Isa::Avx2) return f(Avx2Kernel{});
  }
#endif
  f(PortableKernel<T>{});
}

// ---------------------------------------------------------------------------------------
// Exact per-row quantities (accumulated in double): the distance to one code as the metric
// defines it, used for the reported distances and for rows the fast path could not settle.

// Sums in double over a row pair: eight interleaved partial sums (a vector of 8 doubles), added
// pairwise at the end, in the same order on every ISA (the entry points round without FMAs).
typedef double f64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// p[0..8) (float or double) as doubles.
template <typename T>
VQK_LANES f64x8 load8(const T* p) {
  if constexpr (std::is_same<T, double>::value) {
    f64x8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, f64x8);
  }
}

VQK_LANES double pairwise_sum(f64x8 a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

template <typename T>
VQK_LANES double exact_distance_lanes(const T* x, const T* c, int64_t D, Metric metric) {
  f64x8 acc = {}, xx = {};
  int64_t d = 0;
  if (metric == Metric::L2) {
    for (; d + 8 <= D; d += 8) {
      const f64x8 e = load8(x + d) - load8(c + d);
      acc += e * e;
    }
    for (int u = 0; d < D; ++d, ++u) {
      const double e = static_cast<double>(x[d]) - static_cast<double>(c[d]);
      acc[u] += e * e;
    }
    return pairwise_sum(acc);
  }
  for (; d + 8 <= D; d += 8) {
    const f64x8 xv = load8(x + d);
    acc += xv * load8(c + d);
    xx += xv * xv;
  }
  for (int u = 0; d < D; ++d, ++u) {
    const double xv = x[d];
    acc[u] += xv * static_cast<double>(c[d]);
    xx[u] += xv * xv;
  }
  const double dot = pairwise_sum(acc);
  if (metric == Metric::IP) return -dot;
  return 1.0 - dot / std::max(std::sqrt(pairwise_sum(xx)), kNormEps);
}

template <typename T>
VQK_NO_CONTRACT double exact_distance_portable(const T* x, const T* c, int64_t D, Metric metric) {
  return exact_distance_lanes(x, c, D, metric);
}
#if VQK_X86
template <typename T>
VQK_TARGET_AVX2 VQK_NO_CONTRACT double exact_distance_avx2(const T* x, const T* c, int64_t D, Metric metric) {
  return exact_distance_lanes(x, c, D, metric);
}
template <typename T>
VQK_TARGET_AVX512 VQK_NO_CONTRACT double exact_distance_avx512(const T* x, const T* c, int64_t D, Metric metric) {
  return exact_distance_lanes(x, c, D, metric);
}
#endif

template <typename T>
ExactDistanceFn<T> exact_distance_kernel() {
  return VQK_ACTIVE_ISA(exact_distance, <T>);
}

// The distance of row xr to code k as the metric defines it, in double.
template <typename T>
double exact_distance(const PackedCodebook<T>& pc, const T* xr, int64_t k) {
  return pc.exact(xr, pc.row(k), pc.D, pc.metric);
}

template <typename T>
bool row_has_nan(const T* xr, int64_t D) {
  for (int64_t d = 0; d < D; ++d)
    if (std::isnan(static_cast<double>(xr[d]))) return true;
  return false;
}

// Ranks every usable code of one row by exact distance (NaN distances rank as +inf),
// ties to the lower index, and keeps the first k: the slow path for rows whose scores
// were all NaN or infinite. Missing slots: index -1, distance +inf.
template <typename T>
void rank_row_exact(const PackedCodebook<T>& pc, const T* xr, int64_t k, int64_t* idx, T* dist) {
  std::vector<std::pair<double, int64_t>> cand;
  for (int64_t c = 0; c < pc.K; ++c) {
    if (pc.bad[c]) continue;
    const double v = exact_distance(pc, xr, c);
    cand.emplace_back(std::isnan(v) ? std::numeric_limits<double>::infinity() : v, c);
  }
  const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
  std::partial_sort(cand.begin(), cand.begin() + m, cand.end());
  for (int64_t j = 0; j < k; ++j) {
    idx[j] = j < m ? cand[j].second : -1;
    dist[j] = static_cast<T>(j < m ? cand[j].first : std::numeric_limits<double>::infinity());
  }
}

// The winner of one row's kLanes running minima (scores s, codes i; -1: the lane never took a code): the lowest
// score, ties to the lowest code; -1 when no lane holds a code. A lane holds a code exactly when its score is
// below +inf (a score replaces +inf only by comparing less), so the SIMD forms take the minimum score, then the
// minimum code among the lanes equal to it.
template <typename T>
int64_t lane_winner(const T* s, const int32_t* i) {
  int64_t bi = -1;
  T bs = std::numeric_limits<T>::infinity();
  for (int j = 0; j < kLanes; ++j)
    if (i[j] >= 0 && (bi < 0 || s[j] < bs || (s[j] == bs && i[j] < bi))) {
      bi = i[j];
      bs = s[j];
    }
  return bi;
}

#if VQK_X86
VQK_TARGET_AVX512 inline int64_t lane_winner_avx512(const float* s, const int32_t* i) {
  const __m512 v = _mm512_loadu_ps(s);
  const float m = _mm512_reduce_min_ps(v);
  if (!(m < std::numeric_limits<float>::infinity())) return -1;
  const __mmask16 eq = _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(eq, _mm512_loadu_si512(i));
}

VQK_TARGET_AVX2 inline int64_t lane_winner_avx2(const float* s, const int32_t* i) {
  const __m256 a = _mm256_loadu_ps(s), b = _mm256_loadu_ps(s + 8);
  __m256 m = _mm256_min_ps(a, b);
  m = _mm256_min_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));  // every lane: the minimum
  if (!(_mm256_cvtss_f32(m) < std::numeric_limits<float>::infinity())) return -1;
  const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
  const __m256i ia = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i));
  const __m256i ib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i + 8));
  __m256i c = _mm256_min_epi32(_mm256_blendv_epi8(none, ia, _mm256_castps_si256(_mm256_cmp_ps(a, m, _CMP_EQ_OQ))),
                               _mm256_blendv_epi8(none, ib, _mm256_castps_si256(_mm256_cmp_ps(b, m, _CMP_EQ_OQ))));
  c = _mm256_min_epi32(c, _mm256_permute2x128_si256(c, c, 1));
  c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, _MM_SHUFFLE(1, 0, 3, 2)));
  c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_cvtsi256_si32(c);
}
#endif

// lane_winner on the active ISA.
template <typename T>
int64_t row_winner(const T* s, const int32_t* i) {
#if VQK_X86
  if constexpr (std::is_same<T, float>::value) {
    if (active_isa() == Isa::Avx512) return lane_winner_avx512(s, i);
    if (active_isa() == Isa::Avx2) return lane_winner_avx2(s, i);
  }
#endif
  return lane_winner(s, i);
}

// Nearest code of `rows` rows starting at x (leading dimension ldx): writes idx (-1 for a
// NaN row or when no code is usable) and the exact distance (NaN for those rows).
template <typename T>
void nearest_rows(const PackedCodebook<T>& pc, const T* x, int64_t ldx, int64_t rows, std::vector<T>& best,
                  std::vector<int32_t>& bidx, int64_t* idx, T* dist) {
  best.assign(rows * kLanes, std::numeric_limits<T>::infinity());
  bidx.assign(rows * kLanes, -1);
  const int64_t bytes = pc.D <= kSmallD ? kSmallChunkBytes : kChunkBytes;
  const int64_t chunk = std::max<int64_t>(1, bytes / std::max<int64_t>(1, pc.D * kLanes * int64_t(sizeof(T))));
  with_kernel<T>([&](auto kern) {
    using Kern = decltype(kern);
    for (int64_t p0 = 0; p0 < pc.P; p0 += chunk) {
      const int64_t p1 = std::min(pc.P, p0 + chunk);
      for (int64_t r = 0; r < rows; r += Kern::kRows) {
        with_const<1, Kern::kRows>(std::min<int64_t>(Kern::kRows, rows - r), [&](auto mr) {
          Kern::template nearest<decltype(mr)::value>(x + r * ldx, ldx, pc, p0, p1, best.data() + r * kLanes,
                                                      bidx.data() + r * kLanes);
        });
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    const int64_t bi = row_winner(best.data() + r * kLanes, bidx.data() + r * kLanes);
    // A NaN row makes every score NaN, so it never has a candidate: check only those rows.
    if (bi < 0 && row_has_nan(xr, pc.D)) {
      idx[r] = -1;
      dist[r] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    if (bi < 0) {  // every score NaN or +inf (overflow, infinite inputs): rank exactly
      rank_row_exact(pc, xr, 1, idx + r, dist + r);
      if (idx[r] < 0) dist[r] = std::numeric_limits<T>::quiet_NaN();  // no usable code at all
      continue;
    }
    idx[r] = bi;
    dist[r] = static_cast<T>(exact_distance(pc, xr, bi));
  }
}

// Inserts (s, code) into the sorted list (d, i) of length k if it beats the last entry;
// equal scores keep the earlier (lower) code first.
template <typename T>
inline void topk_insert(T* d, int64_t* i, int64_t k, T s, int64_t code) {
  if (!(s < d[k - 1])) return;
  int64_t pos = k - 1;
  while (pos > 0 && d[pos - 1] > s) {
    d[pos] = d[pos - 1];
    i[pos] = i[pos - 1];
    --pos;
  }
  d[pos] = s;
  i[pos] = code;
}

// The k best of one row by score -> by exact distance, re-sorted (distance, then index).
template <typename T>
void finish_topk_row(const PackedCodebook<T>& pc, const T* xr, int64_t k, int64_t* i, T* d,
                     std::vector<std::pair<T, int64_t>>& v) {
  if (row_has_nan(xr, pc.D)) {
    std::fill(i, i + k, -1);
    std::fill(d, d + k, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  if (i[k - 1] < 0) {  // fewer than k codes with a finite score: rank exactly
    rank_row_exact(pc, xr, k, i, d);
    return;
  }
  v.resize(k);  // the task's scratch: no allocation per row
  for (int64_t j = 0; j < k; ++j) v[j] = {static_cast<T>(exact_distance(pc, xr, i[j])), i[j]};
  std::sort(v.begin(), v.end());
  for (int64_t j = 0; j < k; ++j) std::tie(d[j], i[j]) = v[j];
}

// The k nearest codes of `rows` rows starting at x (leading dimension ldx), sorted by
// exact distance then index, into idx / dist [rows][k] (rules of nearest_code_topk).
// tile and ranked are the caller's scratch.
template <typename T>
void topk_rows(const PackedCodebook<T>& pc, const T* x, int64_t ldx, int64_t rows, int64_t k, std::vector<T>& tile,
               std::vector<std::pair<T, int64_t>>& ranked, int64_t* idx, T* dist) {
  tile.resize(kMR * kLanes);
  std::fill(dist, dist + rows * k, std::numeric_limits<T>::infinity());
  std::fill(idx, idx + rows * k, -1);
  with_kernel<T>([&](auto kern) {
    using Kern = decltype(kern);
    for (int64_t r = 0; r < rows; r += kMR) {
      with_mr(std::min<int64_t>(kMR, rows - r), [&](auto m) {
        constexpr int MR = decltype(m)::value;
        T thr[MR];
        uint32_t mask[MR];
        for (int64_t p = 0; p < pc.P; ++p) {
          for (int rr = 0; rr < MR; ++rr) thr[rr] = dist[(r + rr) * k + k - 1];  // the current k-th best
          Kern::template scores<MR>(x + r * ldx, ldx, pc, p, thr, tile.data(), mask);
          for (int rr = 0; rr < MR; ++rr)
            for (uint32_t bits = mask[rr]; bits; bits &= bits - 1) {  // only the lanes that beat it
              const int j = __builtin_ctz(bits);
              topk_insert(dist + (r + rr) * k, idx + (r + rr) * k, k, tile[rr * kLanes + j], p * kLanes + j);
            }
        }
      });
    }
  });
  for (int64_t r = 0; r < rows; ++r) finish_topk_row(pc, x + r * ldx, k, idx + r * k, dist + r * k, ranked);
}

// The row blocks of n rows, one parallel task each: count = row_block_count(n) blocks, block b
// holding the rows [row_block_start(n, count, b), row_block_start(n, count, b + 1)). About kRowBlock
// rows a block (at least 12, two tiles), a block count that is a multiple of 12 where n allows, and
// block starts at the multiples of the tile height nearest to b * n / count, so that 1, 2, 3, 4, 6
// or 12 threads get shares within a few rows of equal. (Blocks of exactly kRowBlock rows split
// 1024 rows 576 / 448 over 2 threads, 4096 rows 2112 / 1984.) It depends on n alone, never on
// the thread count, so per-block partial sums are the same for any number of threads.
inline int64_t row_block_count(int64_t n) {
  if (n <= 0) return 0;
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  return std::max<int64_t>(1, std::min<int64_t>((blocks + 11) / 12 * 12, n / 12));
}

inline int64_t row_block_start(int64_t n, int64_t count, int64_t b) {
  return b >= count ? n : std::min(n, (b * n / count + kMR / 2) / kMR * kMR);
}

// The most rows a block of n rows holds.
inline int64_t row_block_size(int64_t n) {
  const int64_t count = row_block_count(n);
  return count == 0 ? 0 : (n + count - 1) / count + kMR;
}

// Runs fn(scratch, block, r0, r1) over the row blocks in parallel, at least grain_blocks
// blocks per task; each parallel task owns one Scratch.
template <typename Scratch, typename F>
void parallel_row_blocks(int64_t n, F&& fn, int64_t grain_blocks = 1) {
  const int64_t count = row_block_count(n);
  at::parallel_for(0, count, grain_blocks, [&](int64_t b0, int64_t b1) {
    Scratch scratch;
    for (int64_t b = b0; b < b1; ++b) fn(scratch, b, row_block_start(n, count, b), row_block_start(n, count, b + 1));
  });
}

// Calls f(T{}) with T = double when either tensor is float64, else float.
template <typename F>
inline void with_compute_type(const at::Tensor& a, const at::Tensor& b, F&& f) {
  if (compute_dtype(a, b) == at::kDouble)
    f(double{});
  else
    f(float{});
}

}  // namespace cpu
}  // namespace vqk
