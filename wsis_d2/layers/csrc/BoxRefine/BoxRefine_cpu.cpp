#include "BoxRefine.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace wsis_d2 {

namespace {

void check_inputs(const at::Tensor& S, const at::Tensor& boxes, const at::Tensor& classes,
                  const at::Tensor& peaks, const at::Tensor& own, int64_t steps,
                  const at::Tensor& snapshot_steps) {
  TORCH_CHECK_VALUE(S.dim() == 4 && S.size(0) == 1 && S.scalar_type() == at::kDouble &&
                        S.size(2) > 1 && S.size(3) > 1,
                    "refine_context_gap: S must be the float64 (1, C, H+1, W+1) integral images "
                    "of one image, got ", S.scalar_type(), " ", S.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.scalar_type() == at::kDouble,
                    "refine_context_gap: boxes must be (K, 4) float64, got ", boxes.sizes());
  const int64_t K = boxes.size(0);
  TORCH_CHECK_VALUE(classes.dim() == 1 && classes.size(0) == K && own.dim() == 1 &&
                        own.size(0) == K,
                    "refine_context_gap: classes and own must be (K,) with K = ", K);
  TORCH_CHECK_VALUE(peaks.dim() == 2 && peaks.size(1) == 3 && peaks.scalar_type() == at::kDouble,
                    "refine_context_gap: peaks must be (P, 3) float64 rows (class, x, y), got ",
                    peaks.sizes());
  TORCH_CHECK_VALUE(steps >= 0, "refine_context_gap: steps must be >= 0, got ", steps);
  TORCH_CHECK_VALUE(snapshot_steps.dim() == 1, "refine_context_gap: snapshot_steps must be 1-D");
  if (K > 0) {
    const auto c = classes.to(at::kCPU);
    TORCH_CHECK_VALUE(c.min().item<int64_t>() >= 0 && c.max().item<int64_t>() < S.size(1),
                      "refine_context_gap: classes must be in [0, ", S.size(1), ")");
    const auto o = own.to(at::kCPU);
    TORCH_CHECK_VALUE(o.min().item<int64_t>() >= -1 && o.max().item<int64_t>() < peaks.size(0),
                      "refine_context_gap: own must be -1 or a row of peaks");
    TORCH_CHECK_VALUE(at::isfinite(boxes).all().item<bool>(),
                      "refine_context_gap: boxes must be finite");
  }
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> refine_context_gap_cpu(
    const at::Tensor& S_in, const at::Tensor& boxes_in, const at::Tensor& classes_in,
    const at::Tensor& peaks_in, const at::Tensor& own_in, int64_t steps, double lr,
    double context_scale, double min_size, const at::Tensor& snapshot_steps_in, bool grow_only,
    bool search) {
  check_inputs(S_in, boxes_in, classes_in, peaks_in, own_in, steps, snapshot_steps_in);
  const auto S = S_in.contiguous();
  auto out = boxes_in.contiguous().clone();
  const auto classes = classes_in.to(at::kLong).contiguous();
  const auto peaks = peaks_in.contiguous();
  const auto own = own_in.to(at::kLong).contiguous();
  const auto snap_steps = snapshot_steps_in.to(at::kLong).contiguous();
  const int64_t K = out.size(0), P = peaks.size(0), T = snap_steps.size(0);
  const int64_t H = S.size(2) - 1, W = S.size(3) - 1, SS = (H + 1) * (W + 1);
  auto snaps = at::zeros({T, K, 4}, out.options());
  auto stopped = at::zeros({K}, out.options().dtype(at::kBool));
  if (K == 0) return {out, snaps, stopped};
  const double* sp = S.data_ptr<double>();
  const int64_t* cls = classes.data_ptr<int64_t>();
  const double* pk = peaks.data_ptr<double>();
  const int64_t* ow = own.data_ptr<int64_t>();
  const int64_t* st = snap_steps.data_ptr<int64_t>();
  double* x = out.data_ptr<double>();
  double* sn = snaps.data_ptr<double>();
  bool* stop = stopped.data_ptr<bool>();
  at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
    std::vector<double> scratch(search ? search_scratch_size(H, W, P) : 0);
    for (int64_t k = kb; k < ke; ++k) {
      stop[k] = refine_one_box(sp + cls[k] * SS, H, W, x + 4 * k, cls[k], pk, P, ow[k], steps, lr,
                               context_scale, min_size, grow_only, st, T, sn + 4 * k, 4 * K,
                               search, scratch.data());
    }
  });
  return {out, snaps, stopped};
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("refine_context_gap", &refine_context_gap_cpu);
}

} // namespace wsis_d2
