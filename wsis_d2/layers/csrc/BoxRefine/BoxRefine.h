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
// Python: wsis_d2.layers.refine_context_gap (and its pure-PyTorch reference, the same loop of
// autograd steps).
#pragma once
#include <torch/types.h>
#include <tuple>

#include "BoxScore/BoxScore.h"

namespace wsis_d2 {

// S (1, C, H+1, W+1) float64 integral images; boxes (K, 4) float64 x1, y1, x2, y2; classes (K,)
// long; peaks (P, 3) float64 rows (class, x, y); own (K,) long row of each box's own peak or −1;
// snapshot_steps (T,) long step counts in [0, steps]; grow_only: keep each box containing its
// (clamped) start box. Returns (boxes (K, 4), snapshots (T, K, 4), stopped (K,) bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor> refine_context_gap_cpu(
    const at::Tensor& S, const at::Tensor& boxes, const at::Tensor& classes,
    const at::Tensor& peaks, const at::Tensor& own, int64_t steps, double lr,
    double context_scale, double min_size, const at::Tensor& snapshot_steps, bool grow_only);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> refine_context_gap_cuda(
    const at::Tensor& S, const at::Tensor& boxes, const at::Tensor& classes,
    const at::Tensor& peaks, const at::Tensor& own, int64_t steps, double lr,
    double context_scale, double min_size, const at::Tensor& snapshot_steps, bool grow_only);
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

// Refines box k in place (x: 4 doubles), writing snapshots; returns whether it stopped.
WSIS_HOST_DEVICE inline bool refine_one_box(const double* s, int64_t H, int64_t W, double* x,
                                            int64_t cls, const double* peaks, int64_t P,
                                            int64_t own, int64_t steps, double lr, double scale,
                                            double min_size, bool grow_only,
                                            const int64_t* snap_steps, int64_t T,
                                            double* snap_out, int64_t snap_stride) {
  clamp_refined(x, H, W, min_size);
  const double x0[4] = {x[0], x[1], x[2], x[3]};  // the start box (grow_only keeps it inside)
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
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      if (snap_steps[t] == step) {
        for (int q = 0; q < 4; ++q) snap_out[t * snap_stride + q] = x[q];
      }
    }
  }
  return stopped;
}

} // namespace wsis_d2
