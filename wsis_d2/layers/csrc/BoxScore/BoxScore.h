// Integral-image box scoring: sums of score maps over continuous-coordinate boxes.
#pragma once
#include <torch/types.h>
#include <tuple>

namespace wsis_d2 {

// maps (N, C, H, W); boxes (K, 5) [n, x1, y1, x2, y2] with 0 <= x1 <= x2 <= W, 0 <= y1 <= y2 <= H
// (the caller clips); classes (K,) long. Pixel (y, x) covers [x, x+1) x [y, y+1).
// Returns sums (K,): the integral of the piecewise-constant map c=classes[k] of image n over the box,
// i.e. the bilinear interpolation of the integral image at the four corners.
at::Tensor box_sum_forward_cpu(const at::Tensor& maps, const at::Tensor& boxes,
                               const at::Tensor& classes);
// Returns (grad_maps (N, C, H, W), grad_boxes (K, 5); column 0 is zero).
std::tuple<at::Tensor, at::Tensor> box_sum_backward_cpu(const at::Tensor& grad,
                                                        const at::Tensor& maps,
                                                        const at::Tensor& boxes,
                                                        const at::Tensor& classes);
// Integral images S (N, C, H+1, W+1) float64, and box sums / their box gradients read from them
// (maps fixed: CCGR's box refinement reuses S for every gradient step).
at::Tensor integral_image_cpu(const at::Tensor& maps);
at::Tensor box_sum_integral_cpu(const at::Tensor& S, const at::Tensor& boxes,
                                const at::Tensor& classes);
at::Tensor box_sum_integral_backward_cpu(const at::Tensor& grad, const at::Tensor& S,
                                         const at::Tensor& boxes, const at::Tensor& classes);
#ifdef WITH_CUDA
at::Tensor integral_image_cuda(const at::Tensor& maps);
at::Tensor box_sum_integral_cuda(const at::Tensor& S, const at::Tensor& boxes,
                                 const at::Tensor& classes);
at::Tensor box_sum_integral_backward_cuda(const at::Tensor& grad, const at::Tensor& S,
                                          const at::Tensor& boxes, const at::Tensor& classes);
at::Tensor box_sum_forward_cuda(const at::Tensor& maps, const at::Tensor& boxes,
                                const at::Tensor& classes);
std::tuple<at::Tensor, at::Tensor> box_sum_backward_cuda(const at::Tensor& grad,
                                                         const at::Tensor& maps,
                                                         const at::Tensor& boxes,
                                                         const at::Tensor& classes);
#endif

// Shared by the CPU and CUDA kernels: the integral image S (H+1, W+1) of one map, its bilinear
// interpolation F(x, y) at a continuous point, and the partial derivatives of F.
template <typename acc_t>
struct IntegralPoint {
  int64_t i, j;  // cell of S containing the point: i in [0, W-1], j in [0, H-1]
  acc_t fx, fy;  // position inside the cell, in [0, 1]
};

template <typename acc_t>
#ifdef __CUDACC__
__host__ __device__
#endif
inline IntegralPoint<acc_t> locate(acc_t x, acc_t y, int64_t H, int64_t W) {
  IntegralPoint<acc_t> p;
  int64_t i = static_cast<int64_t>(floor(x)), j = static_cast<int64_t>(floor(y));
  i = i < 0 ? 0 : (i > W - 1 ? W - 1 : i);
  j = j < 0 ? 0 : (j > H - 1 ? H - 1 : j);
  p.i = i;
  p.j = j;
  p.fx = x - static_cast<acc_t>(i);
  p.fy = y - static_cast<acc_t>(j);
  return p;
}

} // namespace wsis_d2
