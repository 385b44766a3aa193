// Peak finding: local maxima of score maps within a (2r+1)x(2r+1) window.
#pragma once
#include <torch/types.h>
#include <tuple>

namespace wsis_d2 {

// maps (N, C, H, W) float/double -> bool (N, C, H, W): v[y,x] >= every value of its window
// (window clipped at the border), v not NaN.
at::Tensor peak_mask_cpu(const at::Tensor& maps, int64_t radius);

// Peaks of `mask` with value >= thresholds[n, c], sorted per map by value descending (ties: lower
// flat index y*W+x first), maps n-major then c. Returns (indices (P, 4) long [n, c, y, x],
// values (P,), counts (N, C) long).
std::tuple<at::Tensor, at::Tensor, at::Tensor> peak_list_cpu(
    const at::Tensor& maps, const at::Tensor& mask, const at::Tensor& thresholds);

#ifdef WITH_CUDA
at::Tensor peak_mask_cuda(const at::Tensor& maps, int64_t radius);
std::tuple<at::Tensor, at::Tensor, at::Tensor> peak_list_cuda(
    const at::Tensor& maps, const at::Tensor& mask, const at::Tensor& thresholds);
#endif

} // namespace wsis_d2
