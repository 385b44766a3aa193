// CCGR's center-context-gap box refinement (Eq. 2-3) with every gradient step inside the op: for
// each box B, L = Φ(C) − Φ(B), the mean score in the context ring C (B scaled by `context_scale`
// about its centre, minus B, both clamped to the image) minus the mean inside B, read from the
// integral image S of the box's class map (BoxScore.h); its gradient with respect to the four
// coordinates is analytic (the same one-sided derivatives at integer coordinates and the same
// zero gradient at the image bounds as the box-scoring op, exactly what autograd gives through
// box_context_gap). Each step is Adam (β1 = 0.9, β2 = 0.999, ε = 1e-8, step `lr` pixels), then
// the box is clamped into the image and to at least `min_size` (min(min_size, W or H)) wide and
// high; with `grow_only`, the box is then projected onto the boxes that contain its start box
// (x1 = min(x1, x1⁰), y1 = min(y1, y1⁰), x2 = max(x2, x2⁰), y2 = max(y2, y2⁰)): projected
// gradient descent that can only enlarge it. A box whose step would make it contain a peak of its
// class other than its own stops for good at its previous coordinates. All arithmetic in float64.
//
// With `search` (MODEL.CCGR.REFINE_SEARCH), a global search over the allowed boxes comes first and
// the descent only polishes its result (search_box below; why: the gradient is zero on plateaus of
// S, where the descent alone stalls); the op then returns the allowed box of least L among those
// the search and the descent visited.
//
// Python: wsis_d2.layers.refine_context_gap (and its pure-PyTorch reference, the same loop of
// autograd steps and the same search in tensor ops).
#pragma once
#include <torch/types.h>
#include <tuple>

#include "BoxScore/BoxScore.h"

namespace wsis_d2 {

// S (1, C, H+1, W+1) float64 integral images; boxes (K, 4) float64 x1, y1, x2, y2; classes (K,)
// long; peaks (P, 3) float64 rows (class, x, y); own (K,) long row of each box's own peak or −1;
// snapshot_steps (T,) long step counts in [0, steps]; grow_only: keep each box containing its
// (clamped) start box; search: search the allowed boxes first (search_box). Returns (boxes (K, 4),
// snapshots (T, K, 4), stopped (K,) bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor> refine_context_gap_cpu(
    const at::Tensor& S, const at::Tensor& boxes, const at::Tensor& classes,
    const at::Tensor& peaks, const at::Tensor& own, int64_t steps, double lr,
    double context_scale, double min_size, const at::Tensor& snapshot_steps, bool grow_only,
    bool search);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> refine_context_gap_cuda(
    const at::Tensor& S, const at::Tensor& boxes, const at::Tensor& classes,
    const at::Tensor& peaks, const at::Tensor& own, int64_t steps, double lr,
    double context_scale, double min_size, const at::Tensor& snapshot_steps, bool grow_only,
    bool search);
#endif

// ---- the per-box loop, shared by the CPU and CUDA kernels ----

// L = ring − inside and dL/d(x1, y1, x2, y2) of box b (unclamped coordinates).
WSIS_HOST_DEVICE inline void context_gap_grad(const double* s, int64_t H, int64_t W,
                                              const double* b, double scale, double* grad) {
  const double cx = (b[0] + b[2]) / 2, cy = (b[1] + b[3]) / 2;
  const double hw = (b[2] - b[0]) * (scale / 2), hh = (b[3] - b[1]) * (scale / 2);
  const double rows_b[5] = {0, b[0], b[1], b[2], b[3]};
  const double rows_c[5] = {0, cx - hw, cy - hh, cx + hw, cy + hh};
  double cb[4], ib[4], cc[4], ic[4], gb[4], gc[4];
  clamp_box(rows_b, H, W, cb, ib);
  clamp_box(rows_c, H, W, cc, ic);
  const double sb = box_integral(s, H, W, cb), sc = box_integral(s, H, W, cc);
  box_integral_grad(s, H, W, cb, gb);
  box_integral_grad(s, H, W, cc, gc);
  const double wb = cb[2] - cb[0], hb = cb[3] - cb[1], wc = cc[2] - cc[0], hc = cc[3] - cc[1];
  const double ab = wb * hb, ac = wc * hc, ar = ac - ab, sr = sc - sb;
  const double dab[4] = {-hb, -wb, hb, wb}, dac[4] = {-hc, -wc, hc, wc};
  double d_b[4], d_c[4];  // dL / d(clamped B), dL / d(clamped C)
  for (int q = 0; q < 4; ++q) {
    const double d_inside = ab > 0 ? (gb[q] * ab - sb * dab[q]) / (ab * ab) : 0.0;
    const double d_ring_b = ar > 0 ? (-gb[q] * ar + sr * dab[q]) / (ar * ar) : 0.0;
    const double d_ring_c = ar > 0 ? (gc[q] * ar - sr * dac[q]) / (ar * ar) : 0.0;
    d_b[q] = (d_ring_b - d_inside) * ib[q];
    d_c[q] = d_ring_c * ic[q];
  }
  // C's corners as functions of B's: C1 = (1/2 + s/2)·B1 + (1/2 − s/2)·B2, C2 the mirror
  const double a = 0.5 + scale / 2, o = 0.5 - scale / 2;
  grad[0] = d_b[0] + a * d_c[0] + o * d_c[2];
  grad[1] = d_b[1] + a * d_c[1] + o * d_c[3];
  grad[2] = d_b[2] + o * d_c[0] + a * d_c[2];
  grad[3] = d_b[3] + o * d_c[1] + a * d_c[3];
}

WSIS_HOST_DEVICE inline void clamp_refined(double* b, int64_t H, int64_t W, double min_size) {
  const double mw = min_size < static_cast<double>(W) ? min_size : static_cast<double>(W);
  const double mh = min_size < static_cast<double>(H) ? min_size : static_cast<double>(H);
  const double x1 = fmin(fmax(b[0], 0.0), W - mw);
  const double y1 = fmin(fmax(b[1], 0.0), H - mh);
  const double x2 = fmin(fmax(b[2], x1 + mw), static_cast<double>(W));
  const double y2 = fmin(fmax(b[3], y1 + mh), static_cast<double>(H));
  b[0] = x1;
  b[1] = y1;
  b[2] = x2;
  b[3] = y2;
}

// ---- the search before the descent (`search`) ----
//
// Why a search: while B and its ring C lie in one flat region of S, Φ(B) = Φ(C) and ∂L/∂B = 0, so
// the descent from a box deep inside an object (a MIL box on its discriminative part) does not
// move; S averaged over image regions (SCORE_MODE "regions") is piecewise constant, which makes
// such plateaus the rule. Every box scores in O(1) from S, so the search looks at whole ranges of
// boxes instead of one gradient, over the allowed set A: boxes inside the image, at least
// (min(min_size, W), min(min_size, H)), holding their own peak (when they have one) and no other
// peak of their class (closed boxes, as the descent's guard), and with grow_only containing the
// start box B⁰. Candidate coordinates are the integers and B⁰'s own coordinates (the descent
// then polishes to sub-pixel ones).
//  1. Coarse global grid: each coordinate on a ladder of distances 0, 2, 4, 8, ... pixels from its
//     anchor (the own peak, else B⁰'s centre; with grow_only B⁰'s side) out to the image border
//     (so O(log W) values each, whatever the object's size), every allowed combination scored;
//     the `kSearchStarts` best that overlap each other at IoU <= kSearchBasinIoU (distinct
//     basins) are kept.
//  2. From B⁰ and from each of those, coordinate-wise exact line search: each coordinate in turn
//     moves to its best allowed value (all of them, O(W)), until a whole round moves none.
//     Coordinate search alone stalls where two coordinates must move together (an L-shape's two
//     arms, a triangle's tip, a neighbour's peak blocking one way out); the several starts of
//     step 1 answer that.
// The box of least L found goes to the descent, which only polishes it; the op returns the allowed
// box of least L among those the search and the descent visited. Ties: L values within kSearchTol
// are equal and the first in the scan order wins, so that the CPU kernel, the CUDA kernel (which
// fuses multiply-adds) and the reference pick the same box. Measured on plateau maps against an
// exhaustive search over all integer boxes: tests/layers/test_box_refine.py.

constexpr double kSearchTol = 1e-9;
constexpr int kSearchStarts = 6;
constexpr double kSearchBasinIoU = 0.3;
constexpr int kSearchRounds = 100;

// min / max of non-NaN values, inlined (fmin / fmax are library calls in these inner loops)
WSIS_HOST_DEVICE inline double dmin(double a, double b) { return b < a ? b : a; }
WSIS_HOST_DEVICE inline double dmax(double a, double b) { return b > a ? b : a; }

// F(x, y) of BoxScore.h's `interp` at a point already clamped into the image; at integer
// coordinates (B's, mostly) S itself, which the bilinear formula gives bit for bit.
WSIS_HOST_DEVICE inline double corner_integral(const double* s, int64_t H, int64_t W, double x,
                                               double y) {
  // x, y >= 0: the integer cast truncates as floor would (a call to libm)
  if (x == static_cast<double>(static_cast<int64_t>(x)) &&
      y == static_cast<double>(static_cast<int64_t>(y))) {
    return s[static_cast<int64_t>(y) * (W + 1) + static_cast<int64_t>(x)];
  }
  return interp(s, W + 1, locate(x, y, H, W));
}

// L = Φ(C) − Φ(B) of box b (the value context_gap_grad differentiates).
WSIS_HOST_DEVICE inline double context_gap(const double* s, int64_t H, int64_t W, const double* b,
                                           double scale) {
  const double cx = (b[0] + b[2]) / 2, cy = (b[1] + b[3]) / 2;
  const double hw = (b[2] - b[0]) * (scale / 2), hh = (b[3] - b[1]) * (scale / 2);
  const double cb[4] = {clamp_coord(b[0], W), clamp_coord(b[1], H), clamp_coord(b[2], W),
                        clamp_coord(b[3], H)};
  const double cc[4] = {clamp_coord(cx - hw, W), clamp_coord(cy - hh, H),
                        clamp_coord(cx + hw, W), clamp_coord(cy + hh, H)};
  const double sb = corner_integral(s, H, W, cb[2], cb[3]) -
                    corner_integral(s, H, W, cb[0], cb[3]) -
                    corner_integral(s, H, W, cb[2], cb[1]) + corner_integral(s, H, W, cb[0], cb[1]);
  const double sc = corner_integral(s, H, W, cc[2], cc[3]) -
                    corner_integral(s, H, W, cc[0], cc[3]) -
                    corner_integral(s, H, W, cc[2], cc[1]) + corner_integral(s, H, W, cc[0], cc[1]);
  const double ab = (cb[2] - cb[0]) * (cb[3] - cb[1]), ac = (cc[2] - cc[0]) * (cc[3] - cc[1]);
  const double inside = ab > 0 ? sb / ab : 0.0;
  const double ring = ac - ab > 0 ? (sc - sb) / (ac - ab) : 0.0;
  return ring - inside;
}

// Ladder values of a coordinate on an axis of D pixels: at most 3 + bit length of D.
WSIS_HOST_DEVICE inline int64_t ladder_capacity(int64_t D) {
  int64_t n = 3;
  for (; D > 0; D >>= 1) ++n;
  return n;
}

// Scratch doubles that the search of one box needs on an H x W map with P peaks.
WSIS_HOST_DEVICE inline int64_t search_scratch_size(int64_t H, int64_t W, int64_t P) {
  const int64_t lx = ladder_capacity(W), ly = ladder_capacity(H);
  const int64_t line = 2 * ((H > W ? H : W) + 3), grid = lx * lx * ly * ly;
  return 2 * P + 2 * (lx + ly) + (grid > line ? grid : line);
}

// The allowed set A of one box.
struct SearchSpace {
  const double* s;  // the integral image of the box's class
  int64_t H, W;
  double scale, mw, mh;
  bool grow_only, has_own;
  double x0[4];    // the start box B⁰
  double ox, oy;   // its own peak (has_own)
  const double* others;  // (Q, 2) x, y of the other peaks of its class
  int64_t Q;
};

WSIS_HOST_DEVICE inline bool search_allowed(const SearchSpace& sp, const double* b) {
  if (!(b[0] >= 0 && b[1] >= 0 && b[2] <= static_cast<double>(sp.W) &&
        b[3] <= static_cast<double>(sp.H) && b[2] - b[0] >= sp.mw && b[3] - b[1] >= sp.mh)) {
    return false;
  }
  if (sp.grow_only && !(b[0] <= sp.x0[0] && b[1] <= sp.x0[1] && b[2] >= sp.x0[2] &&
                        b[3] >= sp.x0[3])) {
    return false;
  }
  if (sp.has_own && !(b[0] <= sp.ox && sp.ox <= b[2] && b[1] <= sp.oy && sp.oy <= b[3])) {
    return false;
  }
  for (int64_t q = 0; q < sp.Q; ++q) {
    const double px = sp.others[2 * q], py = sp.others[2 * q + 1];
    if (b[0] <= px && px <= b[2] && b[1] <= py && py <= b[3]) return false;
  }
  return true;
}

WSIS_HOST_DEVICE inline double box_iou(const double* a, const double* b) {
  const double iw = dmax(dmin(a[2], b[2]) - dmax(a[0], b[0]), 0.0);
  const double ih = dmax(dmin(a[3], b[3]) - dmax(a[1], b[1]), 0.0);
  const double inter = iw * ih;
  const double uni = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
  return uni > 0 ? inter / uni : 0.0;
}

// Ascending distinct ladder values in [0, D] of a lower (x1, y1) or upper (x2, y2) coordinate:
// the anchor a (as is when `exact`, else rounded outwards to an integer), the integers a ∓ 2, 4,
// 8, ... (rounded outwards) and the image bound. Returns their count.
WSIS_HOST_DEVICE inline int64_t ladder(double a, bool exact, bool lower, int64_t D, double* out) {
  const double d = static_cast<double>(D);
  const int64_t cap = ladder_capacity(D);
  int64_t n = 0;
  out[n++] = lower ? 0.0 : d;
  const double base = exact ? a : (lower ? floor(a) : ceil(a));
  if (base >= 0 && base <= d) out[n++] = base;
  double step = 2;
  for (int i = 0; i < 62 && n < cap; ++i, step *= 2) {  // bounded also for a NaN or huge anchor
    const double v = lower ? floor(a - step) : ceil(a + step);
    if (lower ? !(v >= 0) : !(v <= d)) break;
    if (v >= 0 && v <= d) out[n++] = v;
  }
  for (int64_t i = 1; i < n; ++i) {  // insertion sort, then drop repeats
    const double v = out[i];
    int64_t j = i - 1;
    for (; j >= 0 && out[j] > v; --j) out[j + 1] = out[j];
    out[j + 1] = v;
  }
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (m == 0 || out[i] != out[m - 1]) out[m++] = out[i];
  }
  return m;
}

// Ascending allowed values of coordinate q (0..3: x1, y1, x2, y2) of b, the others fixed: the
// integers and B⁰'s coordinates on that axis. Returns their count.
WSIS_HOST_DEVICE inline int64_t line_values(const SearchSpace& sp, const double* b, int q,
                                            double* vals) {
  const int axis = q & 1;
  const bool lower = q < 2;
  const double D = static_cast<double>(axis == 0 ? sp.W : sp.H);
  const double mn = axis == 0 ? sp.mw : sp.mh, own = axis == 0 ? sp.ox : sp.oy;
  // a range that holds every allowed value (A is an interval along one coordinate)
  double lo, hi;
  if (lower) {
    lo = 0;
    hi = b[q + 2] - mn;
    if (sp.has_own) hi = dmin(hi, own);
    if (sp.grow_only) hi = dmin(hi, sp.x0[q]);
  } else {
    lo = b[q - 2] + mn;
    hi = D;
    if (sp.has_own) lo = dmax(lo, own);
    if (sp.grow_only) lo = dmax(lo, sp.x0[q]);
  }
  for (int64_t p = 0; p < sp.Q; ++p) {
    const double c = sp.others[2 * p + axis], t = sp.others[2 * p + 1 - axis];
    if (!(b[1 - axis] <= t && t <= b[3 - axis])) continue;
    if (lower && c <= b[q + 2]) lo = dmax(lo, c);
    if (!lower && c >= b[q - 2]) hi = dmin(hi, c);
  }
  double box[4] = {b[0], b[1], b[2], b[3]};
  const double starts[2] = {sp.x0[axis], sp.x0[axis + 2]};  // ascending (min size)
  int64_t n = 0;
  int next = 0;
  for (double v = ceil(lo); v <= hi; v += 1) {
    for (; next < 2 && starts[next] < v; ++next) {
      box[q] = starts[next];
      if (starts[next] >= lo && starts[next] != floor(starts[next]) && search_allowed(sp, box)) {
        vals[n++] = starts[next];
      }
    }
    box[q] = v;
    if (search_allowed(sp, box)) vals[n++] = v;
  }
  for (; next < 2; ++next) {
    box[q] = starts[next];
    if (starts[next] >= lo && starts[next] <= hi && starts[next] != floor(starts[next]) &&
        search_allowed(sp, box)) {
      vals[n++] = starts[next];
    }
  }
  return n;
}

// Coordinate-wise exact line search from the allowed box b (gap L) in place; returns its gap.
// Converged when every coordinate is at its best given the others: 4 line searches in a row moved
// nothing, or 3 after the last move (the moved coordinate is at its best already). A search that
// reaches one of the `D` boxes `done` (earlier searches' results) stops there: it would end as
// that one did.
WSIS_HOST_DEVICE inline double coordinate_search(const SearchSpace& sp, double* b, double L,
                                                 double* vals, double* gaps, const double* done,
                                                 int D) {
  int idle = 0, need = 4;
  for (int64_t it = 0; it < 4 * kSearchRounds; ++it) {
    for (int d = 0; d < D; ++d) {
      const double* e = done + 4 * d;
      if (b[0] == e[0] && b[1] == e[1] && b[2] == e[2] && b[3] == e[3]) return L;
    }
    const int q = static_cast<int>(it % 4);
    const int64_t n = line_values(sp, b, q, vals);
    double t[4] = {b[0], b[1], b[2], b[3]};
    double lmin = INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      t[q] = vals[i];
      gaps[i] = context_gap(sp.s, sp.H, sp.W, t, sp.scale);
      lmin = dmin(lmin, gaps[i]);
    }
    if (lmin < L - kSearchTol) {
      int64_t i = 0;
      while (gaps[i] > lmin + kSearchTol) ++i;
      b[q] = vals[i];
      L = gaps[i];
      idle = 0;
      need = 3;
    } else if (++idle >= need) {
      break;
    }
  }
  return L;
}

// The coarse grid (step 1): writes up to kSearchStarts boxes to `starts`; returns their count.
WSIS_HOST_DEVICE inline int coarse_starts(const SearchSpace& sp, double* ladders, double* gaps,
                                          double* starts) {
  const double ax = sp.has_own ? sp.ox : (sp.x0[0] + sp.x0[2]) / 2;
  const double ay = sp.has_own ? sp.oy : (sp.x0[1] + sp.x0[3]) / 2;
  const int64_t lx = ladder_capacity(sp.W), ly = ladder_capacity(sp.H);
  double* l0 = ladders;
  double* l1 = ladders + lx;
  double* l2 = ladders + lx + ly;
  double* l3 = ladders + 2 * lx + ly;
  const bool g = sp.grow_only;
  const int64_t n0 = ladder(g ? sp.x0[0] : ax, g, true, sp.W, l0);
  const int64_t n1 = ladder(g ? sp.x0[1] : ay, g, true, sp.H, l1);
  const int64_t n2 = ladder(g ? sp.x0[2] : ax, g, false, sp.W, l2);
  const int64_t n3 = ladder(g ? sp.x0[3] : ay, g, false, sp.H, l3);
  int64_t i = 0;  // x1 slowest, y2 fastest
  double lmin = INFINITY;
  for (int64_t i0 = 0; i0 < n0; ++i0) {
    for (int64_t i1 = 0; i1 < n1; ++i1) {
      for (int64_t i2 = 0; i2 < n2; ++i2) {
        for (int64_t i3 = 0; i3 < n3; ++i3, ++i) {
          const double b[4] = {l0[i0], l1[i1], l2[i2], l3[i3]};
          gaps[i] = search_allowed(sp, b) ? context_gap(sp.s, sp.H, sp.W, b, sp.scale) : INFINITY;
          lmin = dmin(lmin, gaps[i]);
        }
      }
    }
  }
  int m = 0;
  for (; m < kSearchStarts && lmin < INFINITY; ++m) {
    int64_t k = 0;
    while (!(gaps[k] <= lmin + kSearchTol)) ++k;
    double* pick = starts + 4 * m;
    pick[0] = l0[k / (n1 * n2 * n3)];
    pick[1] = l1[k / (n2 * n3) % n1];
    pick[2] = l2[k / n3 % n2];
    pick[3] = l3[k % n3];
    i = 0;  // one start per basin: drop the boxes that overlap the pick, find the next least L
    lmin = INFINITY;
    for (int64_t i0 = 0; i0 < n0; ++i0) {
      for (int64_t i1 = 0; i1 < n1; ++i1) {
        for (int64_t i2 = 0; i2 < n2; ++i2) {
          for (int64_t i3 = 0; i3 < n3; ++i3, ++i) {
            if (!(gaps[i] < INFINITY)) continue;
            const double b[4] = {l0[i0], l1[i1], l2[i2], l3[i3]};
            if (box_iou(b, pick) > kSearchBasinIoU) {
              gaps[i] = INFINITY;
            } else {
              lmin = dmin(lmin, gaps[i]);
            }
          }
        }
      }
    }
  }
  return m;
}

// Steps 1-2 from the (clamped) start box b; writes the best box found to b and its gap to *L.
// Returns false (b unchanged) when no allowed box was found.
WSIS_HOST_DEVICE inline bool search_box(const SearchSpace& sp, double* b, double* L,
                                        double* scratch) {
  const int64_t lx = ladder_capacity(sp.W), ly = ladder_capacity(sp.H);
  double* ladders = scratch;
  double* work = scratch + 2 * (lx + ly);
  const int64_t line = (sp.H > sp.W ? sp.H : sp.W) + 3;
  double starts[4 * (kSearchStarts + 1)];
  int m = 0;
  if (search_allowed(sp, b)) {
    for (int q = 0; q < 4; ++q) starts[q] = b[q];
    m = 1;
  }
  m += coarse_starts(sp, ladders, work, starts + 4 * m);
  bool found = false;
  double best[4] = {b[0], b[1], b[2], b[3]}, lbest = 0;
  for (int j = 0; j < m; ++j) {  // the results stay in `starts`, for later searches to meet
    double* t = starts + 4 * j;
    const double l = coordinate_search(sp, t, context_gap(sp.s, sp.H, sp.W, t, sp.scale), work,
                                       work + line, starts, j);
    if (!found || l < lbest - kSearchTol) {
      for (int q = 0; q < 4; ++q) best[q] = t[q];
      lbest = l;
      found = true;
    }
  }
  for (int q = 0; q < 4; ++q) b[q] = best[q];
  *L = lbest;
  return found;
}

// Refines box k in place (x: 4 doubles), writing snapshots; returns whether it stopped. With
// `search`, `scratch` holds search_scratch_size(H, W, P) doubles.
WSIS_HOST_DEVICE inline bool refine_one_box(const double* s, int64_t H, int64_t W, double* x,
                                            int64_t cls, const double* peaks, int64_t P,
                                            int64_t own, int64_t steps, double lr, double scale,
                                            double min_size, bool grow_only,
                                            const int64_t* snap_steps, int64_t T,
                                            double* snap_out, int64_t snap_stride, bool search,
                                            double* scratch) {
  clamp_refined(x, H, W, min_size);
  const double x0[4] = {x[0], x[1], x[2], x[3]};  // the start box (grow_only keeps it inside)
  // with `search`: the allowed box of least L so far (searched: one was found)
  SearchSpace sp = {};
  bool searched = false;
  double best[4] = {x[0], x[1], x[2], x[3]}, lbest = 0;
  if (search) {
    sp.s = s;
    sp.H = H;
    sp.W = W;
    sp.scale = scale;
    sp.mw = min_size < static_cast<double>(W) ? min_size : static_cast<double>(W);
    sp.mh = min_size < static_cast<double>(H) ? min_size : static_cast<double>(H);
    sp.grow_only = grow_only;
    for (int q = 0; q < 4; ++q) sp.x0[q] = x0[q];
    sp.has_own = own >= 0;
    sp.ox = sp.has_own ? peaks[3 * own + 1] : 0.0;
    sp.oy = sp.has_own ? peaks[3 * own + 2] : 0.0;
    sp.Q = 0;
    for (int64_t p = 0; p < P; ++p) {
      if (p == own || static_cast<int64_t>(peaks[3 * p]) != cls) continue;
      scratch[2 * sp.Q] = peaks[3 * p + 1];
      scratch[2 * sp.Q + 1] = peaks[3 * p + 2];
      ++sp.Q;
    }
    sp.others = scratch;
    searched = search_box(sp, x, &lbest, scratch + 2 * sp.Q);
    for (int q = 0; q < 4; ++q) best[q] = x[q];
  }
  for (int64_t t = 0; t < T; ++t) {
    if (snap_steps[t] == 0) {
      for (int q = 0; q < 4; ++q) snap_out[t * snap_stride + q] = x[q];
    }
  }
  double m[4] = {0, 0, 0, 0}, v[4] = {0, 0, 0, 0};
  bool stopped = false;
  for (int64_t step = 1; step <= steps; ++step) {
    if (!stopped) {
      // bias corrections as pow(β, t), like the reference
      const double b1t = pow(0.9, static_cast<double>(step));
      const double b2t = pow(0.999, static_cast<double>(step));
      double g[4];
      context_gap_grad(s, H, W, x, scale, g);
      double nx[4];
      for (int q = 0; q < 4; ++q) {
        const double gq = (g[q] - g[q] == 0.0) ? g[q] : 0.0;  // NaN or inf -> 0
        m[q] = 0.9 * m[q] + (1 - 0.9) * gq;
        v[q] = 0.999 * v[q] + (1 - 0.999) * gq * gq;
        const double mhat = m[q] / (1 - b1t);
        const double vhat = v[q] / (1 - b2t);
        nx[q] = x[q] - lr * mhat / (sqrt(vhat) + 1e-8);
      }
      clamp_refined(nx, H, W, min_size);
      if (grow_only) {  // x0 is inside the image and large enough: the clamp still holds
        nx[0] = fmin(nx[0], x0[0]);
        nx[1] = fmin(nx[1], x0[1]);
        nx[2] = fmax(nx[2], x0[2]);
        nx[3] = fmax(nx[3], x0[3]);
      }
      for (int64_t p = 0; p < P && !stopped; ++p) {
        if (p == own || static_cast<int64_t>(peaks[3 * p]) != cls) continue;
        const double px = peaks[3 * p + 1], py = peaks[3 * p + 2];
        stopped = nx[0] <= px && px <= nx[2] && nx[1] <= py && py <= nx[3];
      }
      if (!stopped) {
        for (int q = 0; q < 4; ++q) x[q] = nx[q];
        if (searched && search_allowed(sp, x)) {
          const double l = context_gap(s, H, W, x, scale);
          if (l < lbest - kSearchTol) {
            for (int q = 0; q < 4; ++q) best[q] = x[q];
            lbest = l;
          }
        }
      }
    }
    const double* out = searched ? best : x;
    for (int64_t t = 0; t < T; ++t) {
      if (snap_steps[t] == step) {
        for (int q = 0; q < 4; ++q) snap_out[t * snap_stride + q] = out[q];
      }
    }
  }
  if (searched) {
    for (int q = 0; q < 4; ++q) x[q] = best[q];
  }
  return stopped;
}

} // namespace wsis_d2
