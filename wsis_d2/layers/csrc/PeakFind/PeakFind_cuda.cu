#include "PeakFind.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace wsis_d2 {

namespace {

// One thread per pixel: compare with its clipped window, O((2r+1)^2) reads.
template <typename scalar_t>
__global__ void peak_mask_kernel(const scalar_t* __restrict__ maps,
                                 const scalar_t* __restrict__ thresholds, bool* __restrict__ out,
                                 int64_t total, int64_t H, int64_t W, int64_t r) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const int64_t x = idx % W, y = (idx / W) % H, m = idx / (H * W);
    const scalar_t* map = maps + m * H * W;
    const scalar_t v = map[y * W + x];
    // false for NaN v; NaN neighbours never beat v (the comparison is false)
    bool peak = v >= thresholds[m];
    const int64_t y0 = y - r < 0 ? 0 : y - r, y1 = y + r > H - 1 ? H - 1 : y + r;
    const int64_t x0 = x - r < 0 ? 0 : x - r, x1 = x + r > W - 1 ? W - 1 : x + r;
    for (int64_t yy = y0; peak && yy <= y1; ++yy)
      for (int64_t xx = x0; peak && xx <= x1; ++xx) peak = !(map[yy * W + xx] > v);
    out[idx] = peak;
  }
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> find_peaks_cuda(
    const at::Tensor& maps_in, int64_t radius, const at::Tensor& thresholds_in) {
  TORCH_CHECK_VALUE(maps_in.dim() == 4, "find_peaks: maps must be (N, C, H, W), got ",
                    maps_in.sizes());
  TORCH_CHECK_VALUE(radius >= 0, "find_peaks: radius must be >= 0, got ", radius);
  at::cuda::CUDAGuard guard(maps_in.device());
  auto maps = maps_in.contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  TORCH_CHECK_VALUE(thresholds_in.numel() == N * C, "find_peaks: thresholds must have N*C = ",
                    N * C, " elements, got ", thresholds_in.numel());
  auto thresholds = thresholds_in.to(maps.device(), maps.scalar_type()).contiguous();
  auto mask = at::empty(maps.sizes(), maps.options().dtype(at::kBool));
  const int64_t total = maps.numel();
  if (total > 0) {
    const int threads = 256;
    const int blocks =
        static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
    AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "find_peaks_cuda", [&] {
      peak_mask_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          maps.data_ptr<scalar_t>(), thresholds.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
          total, H, W, radius);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // compaction and ordering with ATen's device primitives (nonzero, stable radix sorts)
  auto flat_mask = mask.view({N * C, H * W});
  auto nz = at::nonzero(flat_mask);  // rows (map, flat index), both ascending
  auto m = nz.select(1, 0), flat = nz.select(1, 1);
  auto vals = maps.view({N * C, H * W}).index({m, flat});
  // value descending (stable: ties keep ascending flat index), then map ascending (stable)
  auto by_value = std::get<1>(vals.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  auto by_map = std::get<1>(m.index({by_value}).sort(/*stable=*/true, 0, false));
  auto order = by_value.index({by_map});
  m = m.index({order});
  flat = flat.index({order});
  auto indices = at::stack(
      {at::div(m, C, "floor"), at::remainder(m, C), at::div(flat, W, "floor"),
       at::remainder(flat, W)},
      1);
  auto counts = flat_mask.sum(1).view({N, C});
  return {mask, indices, vals.index({order}), counts};
}

TORCH_LIBRARY_IMPL(wsis_d2, CUDA, m) {
  m.impl("find_peaks", &find_peaks_cuda);
}

} // namespace wsis_d2
