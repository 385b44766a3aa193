// Integral-image box scoring: integrals of score maps over continuous-coordinate boxes.
//
// Pixel (y, x) covers [x, x+1) x [y, y+1). The integral image S (H+1, W+1) of a map, S[y][x] = sum
// of map[:y, :x], interpolated bilinearly between its integer corners is exactly
// F(x, y) = integral of the piecewise-constant map over [0, x] x [0, y]; a box [x1, x2] x [y1, y2]
// integrates to F(x2, y2) - F(x1, y2) - F(x2, y1) + F(x1, y1). Coordinates are clamped to the image
// [0, W] x [0, H]; as with torch.clamp, a coordinate at or beyond a bound gets zero gradient.
#pragma once
#include <torch/types.h>
#include <cmath>
#include <tuple>

#ifdef __CUDACC__
#define WSIS_HOST_DEVICE __host__ __device__
#else
#define WSIS_HOST_DEVICE
#endif

namespace wsis_d2 {

// maps (N, C, H, W); boxes (K, 5) rows [n, x1, y1, x2, y2] of maps' dtype; classes (K,) long.
// Returns sums (K,) of the map (n, classes[k]) over each box. ValueError when a scored map is not
// finite (NaN / inf) or an index is out of range. Accumulates in float64.
at::Tensor box_sum_forward_cpu(const at::Tensor& maps, const at::Tensor& boxes,
                               const at::Tensor& classes);
// grad (K,) -> (grad_maps (N, C, H, W), grad_boxes (K, 5), column 0 zero).
std::tuple<at::Tensor, at::Tensor> box_sum_backward_cpu(const at::Tensor& grad,
                                                        const at::Tensor& maps,
                                                        const at::Tensor& boxes,
                                                        const at::Tensor& classes);
// Integral images S (N, C, H+1, W+1) float64, then box sums and their box gradients read from
// them (fixed maps: CCGR's box refinement reuses S at every gradient step).
at::Tensor integral_image_cpu(const at::Tensor& maps);
at::Tensor box_sum_integral_cpu(const at::Tensor& S, const at::Tensor& boxes,
                                const at::Tensor& classes);
at::Tensor box_sum_integral_backward_cpu(const at::Tensor& grad, const at::Tensor& S,
                                         const at::Tensor& boxes, const at::Tensor& classes);

#ifdef WITH_CUDA
at::Tensor box_sum_forward_cuda(const at::Tensor& maps, const at::Tensor& boxes,
                                const at::Tensor& classes);
std::tuple<at::Tensor, at::Tensor> box_sum_backward_cuda(const at::Tensor& grad,
                                                         const at::Tensor& maps,
                                                         const at::Tensor& boxes,
                                                         const at::Tensor& classes);
at::Tensor integral_image_cuda(const at::Tensor& maps);
at::Tensor box_sum_integral_cuda(const at::Tensor& S, const at::Tensor& boxes,
                                 const at::Tensor& classes);
at::Tensor box_sum_integral_backward_cuda(const at::Tensor& grad, const at::Tensor& S,
                                          const at::Tensor& boxes, const at::Tensor& classes);
#endif

// ---- helpers shared by the CPU and CUDA kernels (S of one map, row stride W+1, float64) ----

// A continuous point and the cell of S holding it: i in [0, W-1], j in [0, H-1], fx, fy in [0, 1].
struct Corner {
  int64_t i, j;
  double fx, fy;
};

WSIS_HOST_DEVICE inline double clamp_coord(double v, int64_t hi) {
  return v < 0 ? 0 : (v > static_cast<double>(hi) ? static_cast<double>(hi) : v);
}

// At an integer coordinate the cell to the right/below is used (the left/above one at W / H), so
// derivatives there are one-sided.
WSIS_HOST_DEVICE inline Corner locate(double x, double y, int64_t H, int64_t W) {
  Corner p;
  int64_t i = static_cast<int64_t>(floor(x)), j = static_cast<int64_t>(floor(y));
  p.i = i < 0 ? 0 : (i > W - 1 ? W - 1 : i);
  p.j = j < 0 ? 0 : (j > H - 1 ? H - 1 : j);
  p.fx = x - static_cast<double>(p.i);
  p.fy = y - static_cast<double>(p.j);
  return p;
}

// F(x, y): bilinear interpolation of S
WSIS_HOST_DEVICE inline double interp(const double* s, int64_t SW, const Corner& p) {
  const double* r0 = s + p.j * SW + p.i;
  const double* r1 = r0 + SW;
  return (1 - p.fy) * ((1 - p.fx) * r0[0] + p.fx * r0[1]) +
         p.fy * ((1 - p.fx) * r1[0] + p.fx * r1[1]);
}

// dF/dx (the map integrated along x = const from 0 to y) and dF/dy
WSIS_HOST_DEVICE inline void interp_grad(const double* s, int64_t SW, const Corner& p, double* dx,
                                         double* dy) {
  const double* r0 = s + p.j * SW + p.i;
  const double* r1 = r0 + SW;
  *dx = (1 - p.fy) * (r0[1] - r0[0]) + p.fy * (r1[1] - r1[0]);
  *dy = (1 - p.fx) * (r1[0] - r0[0]) + p.fx * (r1[1] - r0[1]);
}

// The clamped box of row b = [n, x1, y1, x2, y2]: c = [x1, y1, x2, y2]; inside[q] is 1 where the
// coordinate lies strictly inside its bounds (its gradient passes, as through torch.clamp), 0
// otherwise.
template <typename scalar_t>
WSIS_HOST_DEVICE inline void clamp_box(const scalar_t* b, int64_t H, int64_t W, double* c,
                                       double* inside) {
  const int64_t hi[4] = {W, H, W, H};
  for (int q = 0; q < 4; ++q) {
    const double v = static_cast<double>(b[q + 1]);
    c[q] = clamp_coord(v, hi[q]);
    inside[q] = (v > 0 && v < static_cast<double>(hi[q])) ? 1.0 : 0.0;
  }
}

WSIS_HOST_DEVICE inline double box_integral(const double* s, int64_t H, int64_t W,
                                            const double* c) {
  const int64_t SW = W + 1;
  return interp(s, SW, locate(c[2], c[3], H, W)) - interp(s, SW, locate(c[0], c[3], H, W)) -
         interp(s, SW, locate(c[2], c[1], H, W)) + interp(s, SW, locate(c[0], c[1], H, W));
}

// d(box integral)/d(x1, y1, x2, y2) at the clamped box c
WSIS_HOST_DEVICE inline void box_integral_grad(const double* s, int64_t H, int64_t W,
                                               const double* c, double* g) {
  const int64_t SW = W + 1;
  double dx22, dy22, dx12, dy12, dx21, dy21, dx11, dy11;
  interp_grad(s, SW, locate(c[2], c[3], H, W), &dx22, &dy22);
  interp_grad(s, SW, locate(c[0], c[3], H, W), &dx12, &dy12);
  interp_grad(s, SW, locate(c[2], c[1], H, W), &dx21, &dy21);
  interp_grad(s, SW, locate(c[0], c[1], H, W), &dx11, &dy11);
  g[0] = dx11 - dx12;
  g[1] = dy11 - dy21;
  g[2] = dx22 - dx21;
  g[3] = dy22 - dy12;
}

} // namespace wsis_d2
