// Peak finding: local maxima of score maps within a (2r+1)x(2r+1) window.
//
// Pixel (y, x) of map (n, c) is a peak iff its value v is not NaN, v >= every value of its window
// (window clipped at the border, NaN neighbours ignored) and v >= thresholds[n, c].
#pragma once
#include <torch/types.h>
#include <tuple>

namespace wsis_d2 {

// maps (N, C, H, W) float/double, thresholds (N, C) (-inf: none). Returns
//   mask (N, C, H, W) bool,
//   indices (P, 4) long rows [n, c, y, x], per map by value descending, ties by lower flat index
//     y*W+x, maps n-major then c,
//   values (P,) of maps' dtype,
//   counts (N, C) long, peaks per map.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> find_peaks_cpu(
    const at::Tensor& maps, int64_t radius, const at::Tensor& thresholds);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> find_peaks_cuda(
    const at::Tensor& maps, int64_t radius, const at::Tensor& thresholds);
#endif

} // namespace wsis_d2
