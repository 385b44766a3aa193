#include "PeakFind.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace wsis_d2 {

namespace {

template <typename scalar_t>
void peak_mask_kernel(const scalar_t* maps, bool* out, int64_t num_maps, int64_t H, int64_t W,
                      int64_t r) {
  // one task = one row of one map
  at::parallel_for(0, num_maps * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t m = row / H, y = row % H;
      const scalar_t* map = maps + m * H * W;
      bool* o = out + m * H * W + y * W;
      const int64_t y0 = std::max<int64_t>(0, y - r), y1 = std::min<int64_t>(H - 1, y + r);
      for (int64_t x = 0; x < W; ++x) {
        const scalar_t v = map[y * W + x];
        bool peak = !std::isnan(v);
        const int64_t x0 = std::max<int64_t>(0, x - r), x1 = std::min<int64_t>(W - 1, x + r);
        for (int64_t yy = y0; peak && yy <= y1; ++yy) {
          const scalar_t* line = map + yy * W;
          for (int64_t xx = x0; xx <= x1; ++xx) {
            // NaN neighbours never beat v (comparison is false)
            if (line[xx] > v) {
              peak = false;
              break;
            }
          }
        }
        o[x] = peak;
      }
    }
  });
}

template <typename scalar_t>
void peak_list_kernel(const scalar_t* maps, const bool* mask, const scalar_t* thr,
                      int64_t num_maps, int64_t C, int64_t H, int64_t W,
                      std::vector<int64_t>& counts, std::vector<int64_t>& offsets,
                      int64_t* idx_out, scalar_t* val_out, bool fill) {
  const int64_t HW = H * W;
  if (!fill) {
    at::parallel_for(0, num_maps, 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        int64_t n = 0;
        const scalar_t t = thr[m];
        for (int64_t i = 0; i < HW; ++i) n += (mask[m * HW + i] && maps[m * HW + i] >= t);
        counts[m] = n;
      }
    });
    return;
  }
  at::parallel_for(0, num_maps, 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> flat;
    for (int64_t m = b; m < e; ++m) {
      flat.clear();
      const scalar_t* map = maps + m * HW;
      const scalar_t t = thr[m];
      for (int64_t i = 0; i < HW; ++i)
        if (mask[m * HW + i] && map[i] >= t) flat.push_back(i);
      // stable: equal values keep ascending flat index order
      std::stable_sort(flat.begin(), flat.end(),
                       [map](int64_t a, int64_t c) { return map[a] > map[c]; });
      const int64_t n = m / C, c = m % C;
      for (size_t k = 0; k < flat.size(); ++k) {
        const int64_t p = offsets[m] + static_cast<int64_t>(k);
        idx_out[p * 4 + 0] = n;
        idx_out[p * 4 + 1] = c;
        idx_out[p * 4 + 2] = flat[k] / W;
        idx_out[p * 4 + 3] = flat[k] % W;
        val_out[p] = map[flat[k]];
      }
    }
  });
}

} // namespace

at::Tensor peak_mask_cpu(const at::Tensor& maps_in, int64_t radius) {
  TORCH_CHECK(maps_in.dim() == 4, "peak_mask: maps must be (N, C, H, W), got ", maps_in.sizes());
  TORCH_CHECK(radius >= 0, "peak_mask: radius must be >= 0, got ", radius);
  auto maps = maps_in.contiguous();
  auto out = at::empty(maps.sizes(), maps.options().dtype(at::kBool));
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  if (maps.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "peak_mask_cpu", [&] {
    peak_mask_kernel<scalar_t>(maps.data_ptr<scalar_t>(), out.data_ptr<bool>(), N * C, H, W,
                               radius);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> peak_list_cpu(
    const at::Tensor& maps_in, const at::Tensor& mask_in, const at::Tensor& thr_in) {
  TORCH_CHECK(maps_in.dim() == 4 && mask_in.sizes() == maps_in.sizes(),
              "peak_list: maps and mask must be (N, C, H, W) of equal shape");
  auto maps = maps_in.contiguous();
  auto mask = mask_in.to(at::kBool).contiguous();
  auto thr = thr_in.to(maps.scalar_type()).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  TORCH_CHECK(thr.numel() == N * C, "peak_list: thresholds must have N*C elements");
  const int64_t M = N * C;
  std::vector<int64_t> counts(M, 0), offsets(M + 1, 0);
  at::Tensor idx, val;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "peak_list_cpu", [&] {
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    const scalar_t* tp = thr.data_ptr<scalar_t>();
    peak_list_kernel<scalar_t>(mp, mask.data_ptr<bool>(), tp, M, C, H, W, counts, offsets,
                               nullptr, nullptr, false);
    std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
    idx = at::empty({offsets[M], 4}, maps.options().dtype(at::kLong));
    val = at::empty({offsets[M]}, maps.options());
    peak_list_kernel<scalar_t>(mp, mask.data_ptr<bool>(), tp, M, C, H, W, counts, offsets,
                               idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), true);
  });
  auto cnt = at::empty({N, C}, maps.options().dtype(at::kLong));
  std::copy(counts.begin(), counts.end(), cnt.data_ptr<int64_t>());
  return {idx, val, cnt};
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("peak_mask", &peak_mask_cpu);
  m.impl("peak_list", &peak_list_cpu);
}

} // namespace wsis_d2
