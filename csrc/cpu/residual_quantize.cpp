// CPU kernels of vqkernels::residual_quantize (RQ-VAE) and its backward.
//
// Forward: one pass over row blocks. A block's residuals stay in the task's scratch across
// all L levels, each level searching its codebook, packed once per call (a shared codebook
// once for all levels): greedy with nearest_rows, beam search with topk_rows per beam. The
// quantized rows and per-level loss sums then follow each row's chosen code path; the loss
// sums are per block in double, added in block order (independent of the thread count).
// Backward: the residuals are recomputed level by level from x, the codebooks and the
// indices (one [N, D] buffer), and each level's codebook gradient is a per-code scatter.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/scatter.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

// A beam-search candidate: kept path `beam` extended by `code`, whose new residual has
// squared norm `key`. The order is the tie rule: key, then the lower-ranked beam, then the
// lower code index (a beam's candidates come from topk_rows already in that order).
template <typename T>
struct Candidate {
  T key;
  int64_t beam, code;
  bool operator<(const Candidate& o) const { return std::tie(key, beam, code) < std::tie(o.key, o.beam, o.code); }
};

template <typename T>
struct Scratch {
  std::vector<T> rows, res, next, best, dist, tile, acc, qsum;
  std::vector<int32_t> bidx;
  std::vector<int64_t> idx, path, next_path;
  std::vector<std::pair<T, int64_t>> ranked;
  std::vector<Candidate<T>> cand;
};

// out = parent - code k of pc (all NaN for k = -1: no usable code).
template <typename T>
inline void subtract_code(const PackedCodebook<T>& pc, int64_t k, const T* parent, T* out) {
  if (k < 0) {
    std::fill(out, out + pc.D, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const T* c = pc.row(k);
  for (int64_t d = 0; d < pc.D; ++d) out[d] = parent[d] - c[d];
}

// The packed codebooks: level l searches level(l).
template <typename T>
struct LevelCodebooks {
  std::vector<PackedCodebook<T>> packed;  // one per level, or the shared one
  const PackedCodebook<T>& level(int64_t l) const { return packed[packed.size() == 1 ? 0 : l]; }
};

// Greedy: the nearest code of every residual, level after level; out [rows][L].
template <typename T>
void greedy_block(const LevelCodebooks<T>& cbs, int64_t levels, const T* xr, int64_t ld, int64_t rows, Scratch<T>& s,
                  int64_t* out) {
  const int64_t D = cbs.level(0).D;
  s.res.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) std::copy(xr + r * ld, xr + r * ld + D, s.res.data() + r * D);
  s.idx.resize(rows);
  s.dist.resize(rows);
  for (int64_t l = 0; l < levels; ++l) {
    const PackedCodebook<T>& pc = cbs.level(l);
    nearest_rows(pc, s.res.data(), D, rows, s.best, s.bidx, s.idx.data(), s.dist.data());
    for (int64_t r = 0; r < rows; ++r) {
      out[r * levels + l] = s.idx[r];
      subtract_code(pc, s.idx[r], s.res.data() + r * D, s.res.data() + r * D);
    }
  }
}

// Beam search with B beams per row; out [rows][L] gets the best path. Beams are kept best
// first; a slot without a candidate (fewer usable codes than B) holds a NaN residual, which
// yields no candidates later, and the path of beam 0 ended by -1.
template <typename T>
void beam_block(const LevelCodebooks<T>& cbs, int64_t levels, int64_t B, const T* xr, int64_t ld, int64_t rows,
                Scratch<T>& s, int64_t* out) {
  const int64_t D = cbs.level(0).D;
  s.idx.resize(rows * B * B);
  s.dist.resize(rows * B * B);
  s.res.resize(rows * B * D);
  s.next.resize(rows * B * D);
  s.path.resize(rows * B * levels);
  s.next_path.resize(rows * B * levels);
  const T* parents = xr;  // level 0: one beam per row, x itself
  int64_t pld = ld, beams = 1;
  for (int64_t l = 0; l < levels; ++l) {
    const PackedCodebook<T>& pc = cbs.level(l);
    topk_rows(pc, parents, pld, rows * beams, B, s.tile, s.ranked, s.idx.data(), s.dist.data());
    for (int64_t r = 0; r < rows; ++r) {
      s.cand.clear();
      for (int64_t b = 0; b < beams; ++b)
        for (int64_t j = 0; j < B; ++j) {
          const int64_t slot = (r * beams + b) * B + j;
          if (s.idx[slot] >= 0) s.cand.push_back({s.dist[slot], b, s.idx[slot]});
        }
      const int64_t kept = std::min<int64_t>(B, static_cast<int64_t>(s.cand.size()));
      std::partial_sort(s.cand.begin(), s.cand.begin() + kept, s.cand.end());
      for (int64_t i = 0; i < B; ++i) {
        const int64_t b = i < kept ? s.cand[i].beam : 0, code = i < kept ? s.cand[i].code : -1;
        subtract_code(pc, code, parents + (r * beams + b) * pld, s.next.data() + (r * B + i) * D);
        const int64_t* from = s.path.data() + (r * beams + b) * levels;
        int64_t* to = s.next_path.data() + (r * B + i) * levels;
        std::copy(from, from + l, to);
        to[l] = code;
      }
    }
    std::swap(s.res, s.next);
    std::swap(s.path, s.next_path);
    parents = s.res.data();
    pld = D;
    beams = B;
  }
  for (int64_t r = 0; r < rows; ++r) std::copy_n(s.path.data() + r * B * levels, levels, out + r * levels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_quantize(const at::Tensor& x,
                                                                             const at::Tensor& codebooks,
                                                                             int64_t num_levels, int64_t beam_size) {
  const int64_t levels = check_residual("residual_quantize", x, codebooks, num_levels, beam_size);
  const int64_t n = x.size(0), D = x.size(1);
  const auto loss_opts = x.options().dtype(compute_dtype(x, codebooks));
  at::Tensor quantized = at::empty({n, D}, x.options());
  at::Tensor indices = at::empty({n, levels}, x.options().dtype(at::kLong));
  if (n == 0 || D == 0) {
    indices.zero_();  // D == 0: every code is at distance 0 and the first wins
    return {quantized, indices, at::zeros({levels}, loss_opts), at::zeros({levels}, loss_opts)};
  }
  // partial[block * L + l]: the block's sum of |r_l - q_l|^2 (double), added in block order below.
  std::vector<double> partial(row_block_count(n) * levels, 0.0);
  with_compute_type(x, codebooks, [&](auto t) {
    using T = decltype(t);
    LevelCodebooks<T> cbs;
    const int64_t packs = codebooks.dim() == 3 ? levels : 1;
    for (int64_t l = 0; l < packs; ++l)
      cbs.packed.push_back(pack_codebook<T>(codebooks.dim() == 3 ? codebooks.select(0, l) : codebooks, Metric::L2));
    const RowSource<T> src(x);
    int64_t* idx = indices.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_quantize", [&] {
      scalar_t* q = quantized.data_ptr<scalar_t>();
      parallel_row_blocks<Scratch<T>>(n, [&](Scratch<T>& s, int64_t block, int64_t r0, int64_t r1) {
        int64_t ld;
        const T* xr = src.rows(r0, r1 - r0, s.rows, ld);
        int64_t* out = idx + r0 * levels;
        if (beam_size == 1)
          greedy_block(cbs, levels, xr, ld, r1 - r0, s, out);
        else
          beam_block(cbs, levels, beam_size, xr, ld, r1 - r0, s, out);
        // The chosen paths: quantized = q_0 + ... + q_{L-1} and each level's |r_l - q_l|^2.
        double* sums = partial.data() + block * levels;
        s.acc.resize(D);
        s.qsum.resize(D);
        for (int64_t r = 0; r < r1 - r0; ++r) {
          std::copy(xr + r * ld, xr + r * ld + D, s.acc.begin());
          std::fill(s.qsum.begin(), s.qsum.end(), T(0));
          scalar_t* qrow = q + (r0 + r) * D;
          int64_t l = 0;
          for (; l < levels; ++l) {
            const int64_t k = out[r * levels + l];
            if (k < 0) break;
            const PackedCodebook<T>& pc = cbs.level(l);
            const T* c = pc.row(k);
            sums[l] += pc.exact(s.acc.data(), c, D, Metric::L2);  // |r_l - q_l|^2 in double, in lanes
            for (int64_t d = 0; d < D; ++d) {
              s.acc[d] -= c[d];
              s.qsum[d] += c[d];
            }
          }
          if (l < levels) {  // no usable code from level l on: a NaN row, NaN losses from l on
            std::fill(qrow, qrow + D, std::numeric_limits<scalar_t>::quiet_NaN());
            std::fill(sums + l, sums + levels, std::numeric_limits<double>::quiet_NaN());
            continue;
          }
          for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<scalar_t>(s.qsum[d]);
        }
      });
    });
  });
  at::Tensor totals = at::zeros({levels}, at::kDouble);
  double* tp = totals.data_ptr<double>();
  for (int64_t b = 0; b < row_block_count(n); ++b)
    for (int64_t l = 0; l < levels; ++l) tp[l] += partial[b * levels + l];
  at::Tensor losses = (totals / static_cast<double>(n * D)).to(loss_opts.dtype());
  return {quantized, indices, losses, losses.clone()};
}

std::tuple<at::Tensor, at::Tensor> residual_quantize_backward(const at::Tensor& grad_quantized,
                                                              const at::Tensor& grad_commit_losses,
                                                              const at::Tensor& grad_codebook_losses,
                                                              const at::Tensor& x, const at::Tensor& codebooks,
                                                              const at::Tensor& indices) {
  const char* op = "residual_quantize_backward";
  const int64_t levels =
      check_residual_backward(op, grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices);
  const int64_t n = x.size(0), D = x.size(1), K = codebooks.size(-2);
  const at::Tensor idx = indices.t().contiguous();  // [L, N]: each level's indices contiguous, for the scatter
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  VQK_CHECK(std::all_of(ip, ip + n * levels, [&](int64_t v) { return v >= -1 && v < K; }), op,
            "indices must be in [-1, K=", K, "), got values outside it");
  const auto ct = compute_dtype(x, codebooks);
  const double scale = 2.0 / static_cast<double>(std::max<int64_t>(n * D, 1));
  const at::Tensor gc = grad_commit_losses.to(at::kDouble).contiguous();
  const at::Tensor gb = grad_codebook_losses.to(at::kDouble).contiguous();
  at::Tensor gx = grad_quantized.to(ct).contiguous();  // a fresh buffer unless already contiguous ct
  if (gx.is_same(grad_quantized)) gx = gx.clone();
  at::Tensor gcb = at::zeros(codebooks.sizes(), codebooks.options().dtype(ct));
  at::Tensor res = at::empty({n, D}, x.options().dtype(ct));
  res.copy_(x);
  const at::Tensor cb = codebooks.to(ct).contiguous();
  const bool shared = codebooks.dim() == 2;
  AT_DISPATCH_FLOATING_TYPES(ct, "residual_quantize_backward", [&] {
    scalar_t* rp = res.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    for (int64_t l = 0; l < levels; ++l) {
      const scalar_t* cl = cb.const_data_ptr<scalar_t>() + (shared ? 0 : l * K * D);
      scalar_t* gl = gcb.data_ptr<scalar_t>() + (shared ? 0 : l * K * D);
      const int64_t* il = ip + l * n;
      const scalar_t a = static_cast<scalar_t>(gc.const_data_ptr<double>()[l] * scale);
      const scalar_t b = static_cast<scalar_t>(-gb.const_data_ptr<double>()[l] * scale);
      // r_{l+1} = r_l - q_l in place; grad_x += a * r_{l+1}.
      at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t k = il[r];
          for (int64_t d = 0; d < D; ++d) {
            rp[r * D + d] -= k >= 0 ? cl[k * D + d] : std::numeric_limits<scalar_t>::quiet_NaN();
            gxp[r * D + d] += a * rp[r * D + d];
          }
        }
      });
      // d/dq_l of mean((sg(r_l) - q_l)^2) = -2 r_{l+1} / (N D), summed per code in row order.
      scatter_by_code(il, n, K, [&](int64_t k, int64_t r) {
        for (int64_t d = 0; d < D; ++d) gl[k * D + d] += b * rp[r * D + d];
      });
    }
  });
  return {gx.to(x.scalar_type()), gcb.to(codebooks.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("residual_quantize", &vqk::cpu::residual_quantize);
  m.impl("residual_quantize_backward", &vqk::cpu::residual_quantize_backward);
}
