#include "BoxScore.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace wsis_d2 {

namespace {

constexpr int64_t kRowBlock = 8;
// boxes scored from a prebuilt S cost ~0.1 us each: only large batches are worth a second thread
constexpr int64_t kBoxGrain = 4096;

// S (H+1, W+1) float64 of one map, O(H*W). Row prefix sums run kRowBlock rows side by side (so
// that the additions of a row do not wait on each other), then rows are accumulated downwards.
template <typename scalar_t>
void build_integral(const scalar_t* map, double* s, int64_t H, int64_t W) {
  const int64_t SW = W + 1;
  std::fill(s, s + SW, 0.0);
  for (int64_t y0 = 0; y0 < H; y0 += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, H - y0);
    double* first = s + (y0 + 1) * SW;
    for (int64_t j = 0; j < nb; ++j) first[j * SW] = 0;
    if (nb == kRowBlock) {
      double acc[kRowBlock] = {0, 0, 0, 0, 0, 0, 0, 0};
      const scalar_t* src = map + y0 * W;
      for (int64_t x = 0; x < W; ++x) {
        for (int64_t j = 0; j < kRowBlock; ++j) {
          acc[j] += static_cast<double>(src[j * W + x]);
          first[j * SW + x + 1] = acc[j];
        }
      }
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        double acc = 0;
        const scalar_t* src = map + (y0 + j) * W;
        for (int64_t x = 0; x < W; ++x) {
          acc += static_cast<double>(src[x]);
          first[j * SW + x + 1] = acc;
        }
      }
    }
    for (int64_t j = 0; j < nb; ++j) {
      double* row = first + j * SW;
      const double* prev = row - SW;
      for (int64_t x = 1; x <= W; ++x) row[x] += prev[x];
    }
  }
}

// ---- forward: the entries of S that the box corners need, computed while sweeping the map ----
//
// Sweeping y = 0..H, the column sums col[x] = sum of map[:y, x] are updated row by row
// (O(H*W)). A corner (x, y) in cell (i, j) reads S at rows j and j+1 only, and the two corners of
// a box edge share their rows, so a box needs 4 row reads of F(x2) - F(x1) = sum of col over the
// box's columns (O(box width)), never the whole (H+1) x (W+1) array: the map is read once and the
// working set (two rows) stays in the L1 cache. The rows are added into a block accumulator of
// the map's dtype (`part`, vectorised at the dtype's width), flushed into the float64 `col` every
// kFlushRows rows, so that float32 maps are summed at float32 SIMD width with float64 accuracy
// over the whole map.

constexpr int64_t kFlushRows = 32;  // rows summed in the map dtype between flushes
// Each row is prefetched this far ahead of the sweep: the hardware prefetcher alone leaves the
// sweep latency bound (2.0x the time of maps.sum() on one thread, 1.4x on two; with this 1.4x
// and 1.14x).
constexpr int64_t kPrefetchBytes = 16384;

// Prefetch the bytes [p, p + n) of a map row into the cache (one hint per 64-byte line).
inline void prefetch_row(const void* p, int64_t n) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i);
#endif
}

// Hot loops compiled for AVX-512, AVX2 and the baseline ISA, chosen at load time (GCC function
// multi-versioning), since the extension cannot assume either at build time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define WSIS_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WSIS_MULTIVERSION
#endif

// a[x] += r[x]
WSIS_MULTIVERSION void add_row_f(float* __restrict a, const float* __restrict r, int64_t W) {
  for (int64_t x = 0; x < W; ++x) a[x] += r[x];
}
WSIS_MULTIVERSION void add_row_d(double* __restrict a, const double* __restrict r, int64_t W) {
  for (int64_t x = 0; x < W; ++x) a[x] += r[x];
}
// col[x] += a[x]; a[x] = 0
WSIS_MULTIVERSION void flush_f(double* __restrict col, float* __restrict a, int64_t W) {
  for (int64_t x = 0; x < W; ++x) {
    col[x] += static_cast<double>(a[x]);
    a[x] = 0.f;
  }
}
WSIS_MULTIVERSION void flush_d(double* __restrict col, double* __restrict a, int64_t W) {
  for (int64_t x = 0; x < W; ++x) {
    col[x] += a[x];
    a[x] = 0.0;
  }
}
// sum of col[x] + a[x] over x in [x0, x1), with 8 independent partial sums (vectorisable
// without reassociation flags, and not bound by the latency of one addition chain)
template <typename T>
inline double range_sum_impl(const double* __restrict col, const T* __restrict a, int64_t x0,
                             int64_t x1) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t x = x0;
  for (; x + 8 <= x1; x += 8)
    for (int k = 0; k < 8; ++k) p[k] += col[x + k] + static_cast<double>(a[x + k]);
  double s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; x < x1; ++x) s += col[x] + static_cast<double>(a[x]);
  return s;
}
WSIS_MULTIVERSION double range_sum_f(const double* __restrict col, const float* __restrict a,
                                     int64_t x0, int64_t x1) {
  return range_sum_impl(col, a, x0, x1);
}
WSIS_MULTIVERSION double range_sum_d(const double* __restrict col, const double* __restrict a,
                                     int64_t x0, int64_t x1) {
  return range_sum_impl(col, a, x0, x1);
}
inline void add_row(float* a, const float* r, int64_t W) { add_row_f(a, r, W); }
inline void add_row(double* a, const double* r, int64_t W) { add_row_d(a, r, W); }
inline void flush(double* col, float* a, int64_t W) { flush_f(col, a, W); }
inline void flush(double* col, double* a, int64_t W) { flush_d(col, a, W); }
inline double range_sum(const double* col, const float* a, int64_t x0, int64_t x1) {
  return range_sum_f(col, a, x0, x1);
}
inline double range_sum(const double* col, const double* a, int64_t x0, int64_t x1) {
  return range_sum_d(col, a, x0, x1);
}

// Two bilinear reads of S in one row, at the right (i2, fx2) and left (i1, fx1) corners of a box:
// acc[box] += w * (F(x2) - F(x1)), F(x) = (1 - fx) * S[row][i] + fx * S[row][i + 1]. With c the
// column sums, F(x2) - F(x1) = sum(c[i1 .. i2)) + fx2 * c[i2] - fx1 * c[i1]: O(box width).
struct RowRead {
  int64_t row, box, i1, i2;
  double fx1, fx2, w;
};

// Per-thread buffers of sweep_map, reused across maps.
template <typename scalar_t>
struct SweepScratch {
  std::vector<double> col, acc;
  std::vector<scalar_t> part;
  std::vector<RowRead> reads, sorted;
  std::vector<int64_t> row_start;
  SweepScratch(int64_t H, int64_t W) : col(W), part(W), row_start(H + 3) {}
};

// Sums over one map of the B boxes b[5 * order[t]], t < B, into out[order[t]];
// O(H*W + B*box width).
// Returns false (out untouched) if the map has NaN or inf (or float32 partial sums overflow).
template <typename scalar_t>
bool sweep_map(const scalar_t* map, int64_t H, int64_t W, const scalar_t* b, const int64_t* order,
               int64_t B, SweepScratch<scalar_t>& s, scalar_t* out) {
  // the 4 row reads of each box: y2 (+) and y1 (-), rows j and j + 1 of each
  s.reads.clear();
  double c[4], inside[4];
  for (int64_t t = 0; t < B; ++t) {
    clamp_box(b + 5 * order[t], H, W, c, inside);
    for (int q = 0; q < 2; ++q) {
      const double y = q == 0 ? c[3] : c[1], sign = q == 0 ? 1.0 : -1.0;
      const Corner right = locate(c[2], y, H, W), left = locate(c[0], y, H, W);
      s.reads.push_back({right.j, t, left.i, right.i, left.fx, right.fx, sign * (1 - right.fy)});
      s.reads.push_back({right.j + 1, t, left.i, right.i, left.fx, right.fx, sign * right.fy});
    }
  }
  // counting sort of the reads by row
  std::fill(s.row_start.begin(), s.row_start.end(), 0);
  for (const RowRead& r : s.reads) ++s.row_start[r.row + 2];
  for (int64_t y = 0; y <= H; ++y) s.row_start[y + 2] += s.row_start[y + 1];
  s.sorted.resize(s.reads.size());
  for (const RowRead& r : s.reads) s.sorted[s.row_start[r.row + 1]++] = r;
  // now reads of row y are sorted[row_start[y] .. row_start[y + 1])
  s.acc.assign(B, 0.0);
  std::fill(s.col.begin(), s.col.end(), 0.0);
  std::fill(s.part.begin(), s.part.end(), scalar_t(0));
  double* col = s.col.data();
  scalar_t* part = s.part.data();
  int64_t rows_in_part = 0;
  const int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t y = 0; y <= H;) {
    for (int64_t t = s.row_start[y]; t < s.row_start[y + 1]; ++t) {
      const RowRead& r = s.sorted[t];
      const double c1 = col[r.i1] + static_cast<double>(part[r.i1]);
      const double c2 = col[r.i2] + static_cast<double>(part[r.i2]);
      s.acc[r.box] += r.w * (range_sum(col, part, r.i1, r.i2) + r.fx2 * c2 - r.fx1 * c1);
    }
    if (y == H) break;
    if ((y + 1) * W + ahead <= H * W) prefetch_row(map + y * W + ahead, W * sizeof(scalar_t));
    add_row(part, map + y * W, W);
    ++y;
    if (++rows_in_part == kFlushRows) {
      flush(col, part, W);
      rows_in_part = 0;
    }
  }
  flush(col, part, W);
  // col holds the column totals: all finite iff every value of the map is
  for (int64_t x = 0; x < W; ++x)
    if (!std::isfinite(col[x])) return false;
  for (int64_t t = 0; t < B; ++t) out[order[t]] = static_cast<scalar_t>(s.acc[t]);
  return true;
}

// Boxes grouped by the map they score (counting sort): boxes of map m are
// order[start[m] .. start[m+1]); `used` lists the maps with at least one box.
struct Buckets {
  std::vector<int64_t> order, start, used;
};

template <typename scalar_t>
void check_indices(const scalar_t* b, const int64_t* cls, int64_t K, int64_t N, int64_t C) {
  // same messages as wsis_d2.layers.box_score._validate, which the CPU path of box_sum skips
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* r = b + 5 * k;
    for (int q = 0; q < 5; ++q)
      TORCH_CHECK_VALUE(!std::isnan(static_cast<double>(r[q])),
                        "box_sum: boxes contain NaN (boxes[", k, "])");
    const double n = static_cast<double>(r[0]);
    TORCH_CHECK_VALUE(n == std::floor(n) && n >= 0 && n < static_cast<double>(N),
                      "box_sum: boxes[:, 0] (image indices) must be integers in [0, ", N,
                      "), boxes[", k, ", 0] = ", n);
    TORCH_CHECK_VALUE(cls[k] >= 0 && cls[k] < C, "box_sum: classes must be in [0, ", C,
                      "), classes[", k, "] = ", cls[k]);
    TORCH_CHECK_VALUE(r[3] >= r[1] && r[4] >= r[2], "box_sum: boxes[", k,
                      "] has x2 < x1 or y2 < y1: (", n, ", ", r[1], ", ", r[2], ", ", r[3], ", ",
                      r[4], ")");
  }
}

template <typename scalar_t>
Buckets bucket_boxes(const scalar_t* b, const int64_t* cls, int64_t K, int64_t N, int64_t C) {
  check_indices(b, cls, K, N, C);
  Buckets out;
  const int64_t M = N * C;
  std::vector<int64_t> map_of(K);
  out.start.assign(M + 1, 0);
  for (int64_t k = 0; k < K; ++k) {
    map_of[k] = static_cast<int64_t>(b[5 * k]) * C + cls[k];
    ++out.start[map_of[k] + 1];
  }
  for (int64_t m = 0; m < M; ++m) {
    if (out.start[m + 1] > 0) out.used.push_back(m);
    out.start[m + 1] += out.start[m];
  }
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  out.order.resize(K);
  for (int64_t k = 0; k < K; ++k) out.order[fill[map_of[k]]++] = k;
  return out;
}

void check_shapes(const at::Tensor& maps, const at::Tensor& boxes, const at::Tensor& classes) {
  TORCH_CHECK_VALUE(maps.dim() == 4, "box_sum: maps must be (N, C, H, W), got ", maps.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 5, "box_sum: boxes must be (K, 5), got ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(classes.dim() == 1 && classes.size(0) == boxes.size(0),
                    "box_sum: classes must be (K,) with K = ", boxes.size(0), ", got ",
                    classes.sizes());
  TORCH_CHECK_VALUE(maps.size(2) > 0 && maps.size(3) > 0, "box_sum: maps have zero size ",
                    maps.sizes());
}

void check_integral(const at::Tensor& S) {
  TORCH_CHECK_VALUE(S.dim() == 4 && S.scalar_type() == at::kDouble && S.size(2) > 1 &&
                        S.size(3) > 1,
                    "box_sum_integral: S must be a float64 (N, C, H+1, W+1) integral image, got ",
                    S.scalar_type(), " ", S.sizes());
}

// Adjoint of "S -> F at the four corners of box c, signed": bilinear splat of w into G.
inline void splat_box(double* G, int64_t H, int64_t W, const double* c, double w) {
  const int64_t SW = W + 1;
  const double xs[4] = {c[2], c[0], c[2], c[0]}, ys[4] = {c[3], c[3], c[1], c[1]};
  const double sign[4] = {1, -1, -1, 1};
  for (int q = 0; q < 4; ++q) {
    const Corner p = locate(xs[q], ys[q], H, W);
    const double v = sign[q] * w;
    double* r0 = G + p.j * SW + p.i;
    r0[0] += v * (1 - p.fy) * (1 - p.fx);
    r0[1] += v * (1 - p.fy) * p.fx;
    r0[SW] += v * p.fy * (1 - p.fx);
    r0[SW + 1] += v * p.fy * p.fx;
  }
}

// S[y][x] = sum_{j<y, i<x} m[j][i]  =>  dL/dm[j][i] = sum_{y>j, x>i} dL/dS[y][x]. Overwrites G.
template <typename scalar_t>
void integral_adjoint(double* G, scalar_t* grad_map, int64_t H, int64_t W) {
  const int64_t SW = W + 1;
  for (int64_t y = H - 1; y >= 1; --y) {
    double* row = G + y * SW;
    const double* below = row + SW;
    for (int64_t x = 1; x <= W; ++x) row[x] += below[x];
  }
  for (int64_t y = 1; y <= H; ++y) {
    const double* row = G + y * SW;
    scalar_t* out = grad_map + (y - 1) * W;
    double acc = 0;
    for (int64_t x = W; x >= 1; --x) {
      acc += row[x];
      out[x - 1] = static_cast<scalar_t>(acc);
    }
  }
}

} // namespace

at::Tensor box_sum_forward_cpu(const at::Tensor& maps_in, const at::Tensor& boxes_in,
                               const at::Tensor& classes_in) {
  check_shapes(maps_in, boxes_in, classes_in);
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t K = boxes.size(0), HW = H * W;
  auto out = at::zeros({K}, maps.options());
  if (K == 0) return out;
  std::atomic<int64_t> bad_map{-1};
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_forward_cpu", [&] {
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const Buckets bk = bucket_boxes(b, classes.data_ptr<int64_t>(), K, N, C);
    at::parallel_for(0, static_cast<int64_t>(bk.used.size()), 1, [&](int64_t ub, int64_t ue) {
      SweepScratch<scalar_t> scratch(H, W);
      for (int64_t u = ub; u < ue; ++u) {
        const int64_t m = bk.used[u];
        const int64_t* order = bk.order.data() + bk.start[m];
        if (!sweep_map(mp + m * HW, H, W, b, order, bk.start[m + 1] - bk.start[m], scratch, o))
          bad_map.store(m);
      }
    });
  });
  const int64_t bad = bad_map.load();
  TORCH_CHECK_VALUE(bad < 0, "box_sum: maps[", bad / std::max<int64_t>(C, 1), ", ",
                    bad % std::max<int64_t>(C, 1), "] contains NaN or inf");
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_sum_backward_cpu(const at::Tensor& grad_in,
                                                        const at::Tensor& maps_in,
                                                        const at::Tensor& boxes_in,
                                                        const at::Tensor& classes_in) {
  check_shapes(maps_in, boxes_in, classes_in);
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(maps.scalar_type()).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t K = boxes.size(0), HW = H * W, SS = (H + 1) * (W + 1);
  TORCH_CHECK_VALUE(grad.numel() == K, "box_sum_backward: grad must have K = ", K, " elements");
  auto grad_maps = at::zeros_like(maps);
  auto grad_boxes = at::zeros({K, 5}, maps.options());
  if (K == 0) return {grad_maps, grad_boxes};
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_backward_cpu", [&] {
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gm = grad_maps.data_ptr<scalar_t>();
    scalar_t* gb = grad_boxes.data_ptr<scalar_t>();
    const Buckets bk = bucket_boxes(b, classes.data_ptr<int64_t>(), K, N, C);
    at::parallel_for(0, static_cast<int64_t>(bk.used.size()), 1, [&](int64_t ub, int64_t ue) {
      std::vector<double> S(SS), G(SS);
      double c[4], inside[4], d[4];
      for (int64_t u = ub; u < ue; ++u) {
        const int64_t m = bk.used[u];
        build_integral(mp + m * HW, S.data(), H, W);
        std::fill(G.begin(), G.end(), 0.0);
        for (int64_t t = bk.start[m]; t < bk.start[m + 1]; ++t) {
          const int64_t k = bk.order[t];
          const double gk = static_cast<double>(g[k]);
          clamp_box(b + 5 * k, H, W, c, inside);
          box_integral_grad(S.data(), H, W, c, d);
          for (int q = 0; q < 4; ++q)
            gb[5 * k + 1 + q] = static_cast<scalar_t>(gk * d[q] * inside[q]);
          splat_box(G.data(), H, W, c, gk);
        }
        integral_adjoint(G.data(), gm + m * HW, H, W);
      }
    });
  });
  return {grad_maps, grad_boxes};
}

at::Tensor integral_image_cpu(const at::Tensor& maps_in) {
  TORCH_CHECK_VALUE(maps_in.dim() == 4, "integral_image: maps must be (N, C, H, W), got ",
                    maps_in.sizes());
  auto maps = maps_in.contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  auto S = at::empty({N, C, H + 1, W + 1}, maps.options().dtype(at::kDouble));
  const int64_t HW = H * W, SS = (H + 1) * (W + 1);
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "integral_image_cpu", [&] {
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    double* sp = S.data_ptr<double>();
    at::parallel_for(0, N * C, 1, [&](int64_t mb, int64_t me) {
      for (int64_t m = mb; m < me; ++m) build_integral(mp + m * HW, sp + m * SS, H, W);
    });
  });
  return S;
}

at::Tensor box_sum_integral_cpu(const at::Tensor& S_in, const at::Tensor& boxes_in,
                                const at::Tensor& classes_in) {
  check_integral(S_in);
  check_shapes(S_in, boxes_in, classes_in);
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t N = S.size(0), C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1;
  const int64_t K = boxes.size(0), SS = (H + 1) * (W + 1);
  auto out = at::zeros({K}, boxes.options());
  if (K == 0) return out;
  const double* sp = S.data_ptr<double>();
  const int64_t* cls = classes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_cpu", [&] {
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    check_indices(b, cls, K, N, C);
    at::parallel_for(0, K, kBoxGrain, [&](int64_t kb, int64_t ke) {
      double c[4], inside[4];
      for (int64_t k = kb; k < ke; ++k) {
        const double* s = sp + (static_cast<int64_t>(b[5 * k]) * C + cls[k]) * SS;
        clamp_box(b + 5 * k, H, W, c, inside);
        o[k] = static_cast<scalar_t>(box_integral(s, H, W, c));
      }
    });
  });
  return out;
}

at::Tensor box_sum_integral_backward_cpu(const at::Tensor& grad_in, const at::Tensor& S_in,
                                         const at::Tensor& boxes_in,
                                         const at::Tensor& classes_in) {
  check_integral(S_in);
  check_shapes(S_in, boxes_in, classes_in);
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(boxes.scalar_type()).contiguous();
  const int64_t N = S.size(0), C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1;
  const int64_t K = boxes.size(0), SS = (H + 1) * (W + 1);
  TORCH_CHECK_VALUE(grad.numel() == K, "box_sum_integral_backward: grad must have K = ", K,
                    " elements");
  auto grad_boxes = at::zeros({K, 5}, boxes.options());
  if (K == 0) return grad_boxes;
  const double* sp = S.data_ptr<double>();
  const int64_t* cls = classes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_backward_cpu", [&] {
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gb = grad_boxes.data_ptr<scalar_t>();
    check_indices(b, cls, K, N, C);
    at::parallel_for(0, K, kBoxGrain, [&](int64_t kb, int64_t ke) {
      double c[4], inside[4], d[4];
      for (int64_t k = kb; k < ke; ++k) {
        const double* s = sp + (static_cast<int64_t>(b[5 * k]) * C + cls[k]) * SS;
        clamp_box(b + 5 * k, H, W, c, inside);
        box_integral_grad(s, H, W, c, d);
        const double gk = static_cast<double>(g[k]);
        for (int q = 0; q < 4; ++q)
          gb[5 * k + 1 + q] = static_cast<scalar_t>(gk * d[q] * inside[q]);
      }
    });
  });
  return grad_boxes;
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("box_sum_forward", &box_sum_forward_cpu);
  m.impl("box_sum_backward", &box_sum_backward_cpu);
  m.impl("integral_image", &integral_image_cpu);
  m.impl("box_sum_integral", &box_sum_integral_cpu);
  m.impl("box_sum_integral_backward", &box_sum_integral_backward_cpu);
}

} // namespace wsis_d2
