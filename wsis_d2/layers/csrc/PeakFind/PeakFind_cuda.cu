#include "PeakFind.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace wsis_d2 {

namespace {

template <typename scalar_t>
__global__ void peak_mask_kernel(const scalar_t* __restrict__ maps, bool* __restrict__ out,
                                 int64_t total, int64_t H, int64_t W, int64_t r) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const int64_t x = idx % W, y = (idx / W) % H, m = idx / (H * W);
    const scalar_t* map = maps + m * H * W;
    const scalar_t v = map[y * W + x];
    bool peak = !isnan(static_cast<double>(v));
    const int64_t y0 = y - r < 0 ? 0 : y - r, y1 = y + r > H - 1 ? H - 1 : y + r;
    const int64_t x0 = x - r < 0 ? 0 : x - r, x1 = x + r > W - 1 ? W - 1 : x + r;
    for (int64_t yy = y0; peak && yy <= y1; ++yy)
      for (int64_t xx = x0; xx <= x1; ++xx)
        if (map[yy * W + xx] > v) {
          peak = false;
          break;
        }
    out[idx] = peak;
  }
}

} // namespace

at::Tensor peak_mask_cuda(const at::Tensor& maps_in, int64_t radius) {
  TORCH_CHECK(maps_in.dim() == 4, "peak_mask: maps must be (N, C, H, W), got ", maps_in.sizes());
  TORCH_CHECK(radius >= 0, "peak_mask: radius must be >= 0, got ", radius);
  at::cuda::CUDAGuard guard(maps_in.device());
  auto maps = maps_in.contiguous();
  auto out = at::empty(maps.sizes(), maps.options().dtype(at::kBool));
  const int64_t total = maps.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "peak_mask_cuda", [&] {
    peak_mask_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        maps.data_ptr<scalar_t>(), out.data_ptr<bool>(), total, maps.size(2), maps.size(3),
        radius);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> peak_list_cuda(
    const at::Tensor& maps_in, const at::Tensor& mask_in, const at::Tensor& thr_in) {
  TORCH_CHECK(maps_in.dim() == 4 && mask_in.sizes() == maps_in.sizes(),
              "peak_list: maps and mask must be (N, C, H, W) of equal shape");
  at::cuda::CUDAGuard guard(maps_in.device());
  const int64_t N = maps_in.size(0), C = maps_in.size(1), H = maps_in.size(2), W = maps_in.size(3);
  auto maps = maps_in.contiguous().view({N * C, H * W});
  auto thr = thr_in.to(maps.scalar_type()).reshape({N * C, 1});
  auto keep = mask_in.to(at::kBool).contiguous().view({N * C, H * W}) & (maps >= thr);
  auto nz = at::nonzero(keep);  // row-major: map then flat index ascending
  auto m = nz.select(1, 0), flat = nz.select(1, 1);
  auto vals = maps.index({m, flat});
  // order by value descending (stable keeps flat order for ties), then by map (stable)
  auto by_val = std::get<1>(vals.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  auto m_sorted = m.index({by_val});
  auto by_map = std::get<1>(m_sorted.sort(/*stable=*/true, 0, false));
  auto order = by_val.index({by_map});
  m = m.index({order});
  flat = flat.index({order});
  auto idx = at::stack({m.div(C, "floor"), m.remainder(C), flat.div(W, "floor"), flat.remainder(W)},
                       1);
  auto counts = keep.sum(1).view({N, C});
  return {idx, vals.index({order}), counts};
}

TORCH_LIBRARY_IMPL(wsis_d2, CUDA, m) {
  m.impl("peak_mask", &peak_mask_cuda);
  m.impl("peak_list", &peak_list_cuda);
}

} // namespace wsis_d2
