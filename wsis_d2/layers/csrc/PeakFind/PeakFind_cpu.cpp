#include "PeakFind.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace wsis_d2 {

namespace {

template <typename scalar_t>
struct Peak {
  scalar_t value;
  int64_t index;  // flat index y * W + x within the map
};

// Scratch space of one worker thread, reused across the maps it processes.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> padded;  // one row, NaN -> -inf, r cells of -inf on both sides
  std::vector<scalar_t> row_max;  // (H, W) horizontal window maxima
  std::vector<scalar_t> col_max;  // (W,) full window maxima of the current row
  Scratch(int64_t H, int64_t W, int64_t r)
      : padded(W + 2 * r, -std::numeric_limits<scalar_t>::infinity()),
        row_max(H * W),
        col_max(W) {}
};

// One map: separable window maximum (rows, then columns: O(H*W*(2r+1))), mask, then the peaks
// sorted by value descending, ties by ascending flat index (O(P log P)).
template <typename scalar_t>
void peaks_of_map(const scalar_t* map, scalar_t thr, int64_t H, int64_t W, int64_t r,
                  Scratch<scalar_t>& s, bool* mask, std::vector<Peak<scalar_t>>& peaks) {
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  scalar_t* pad = s.padded.data() + r;
  for (int64_t y = 0; y < H; ++y) {
    const scalar_t* row = map + y * W;
    // NaN never wins a window: it is -inf for the maxima (and fails v >= max itself below)
    for (int64_t x = 0; x < W; ++x) pad[x] = std::isnan(row[x]) ? ninf : row[x];
    scalar_t* rm = s.row_max.data() + y * W;
    const scalar_t* p = s.padded.data();
    for (int64_t x = 0; x < W; ++x) rm[x] = p[x];
    for (int64_t d = 1; d <= 2 * r; ++d)
      for (int64_t x = 0; x < W; ++x) rm[x] = std::max(rm[x], p[x + d]);
  }
  scalar_t* cm = s.col_max.data();
  for (int64_t y = 0; y < H; ++y) {
    const int64_t y0 = std::max<int64_t>(0, y - r), y1 = std::min<int64_t>(H - 1, y + r);
    std::copy(s.row_max.data() + y0 * W, s.row_max.data() + (y0 + 1) * W, cm);
    for (int64_t yy = y0 + 1; yy <= y1; ++yy) {
      const scalar_t* rm = s.row_max.data() + yy * W;
      for (int64_t x = 0; x < W; ++x) cm[x] = std::max(cm[x], rm[x]);
    }
    const scalar_t* row = map + y * W;
    bool* out = mask + y * W;
    // v >= window max (v is in its window, so this means v == max); false for NaN v
    for (int64_t x = 0; x < W; ++x) out[x] = (row[x] >= cm[x]) & (row[x] >= thr);
    for (int64_t x = 0; x < W; ++x)
      if (out[x]) peaks.push_back({row[x], y * W + x});
  }
  std::sort(peaks.begin(), peaks.end(), [](const Peak<scalar_t>& a, const Peak<scalar_t>& b) {
    return a.value > b.value || (a.value == b.value && a.index < b.index);
  });
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> find_peaks_cpu(
    const at::Tensor& maps_in, int64_t radius, const at::Tensor& thresholds_in) {
  TORCH_CHECK_VALUE(maps_in.dim() == 4, "find_peaks: maps must be (N, C, H, W), got ",
                    maps_in.sizes());
  TORCH_CHECK_VALUE(radius >= 0, "find_peaks: radius must be >= 0, got ", radius);
  auto maps = maps_in.contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t M = N * C, HW = H * W;
  TORCH_CHECK_VALUE(thresholds_in.numel() == M, "find_peaks: thresholds must have N*C = ", M,
                    " elements, got ", thresholds_in.numel());
  auto thresholds = thresholds_in.to(maps.scalar_type()).contiguous();
  auto mask = at::empty(maps.sizes(), maps.options().dtype(at::kBool));
  auto counts = at::zeros({N, C}, maps.options().dtype(at::kLong));
  at::Tensor indices, values;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "find_peaks_cpu", [&] {
    std::vector<std::vector<Peak<scalar_t>>> per_map(M);
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    const scalar_t* tp = thresholds.data_ptr<scalar_t>();
    bool* maskp = mask.data_ptr<bool>();
    if (HW > 0) {
      at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        Scratch<scalar_t> scratch(H, W, radius);
        for (int64_t m = begin; m < end; ++m)
          peaks_of_map(mp + m * HW, tp[m], H, W, radius, scratch, maskp + m * HW, per_map[m]);
      });
    }
    std::vector<int64_t> offsets(M + 1, 0);
    int64_t* cp = counts.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      cp[m] = static_cast<int64_t>(per_map[m].size());
      offsets[m + 1] = offsets[m] + cp[m];
    }
    indices = at::empty({offsets[M], 4}, maps.options().dtype(at::kLong));
    values = at::empty({offsets[M]}, maps.options());
    int64_t* ip = indices.data_ptr<int64_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const auto& peaks = per_map[m];
        for (size_t k = 0; k < peaks.size(); ++k) {
          const int64_t p = offsets[m] + static_cast<int64_t>(k);
          ip[4 * p + 0] = m / C;
          ip[4 * p + 1] = m % C;
          ip[4 * p + 2] = peaks[k].index / W;
          ip[4 * p + 3] = peaks[k].index % W;
          vp[p] = peaks[k].value;
        }
      }
    });
  });
  return {mask, indices, values, counts};
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("find_peaks", &find_peaks_cpu);
}

} // namespace wsis_d2
