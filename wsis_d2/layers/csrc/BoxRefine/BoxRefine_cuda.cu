#include "BoxRefine.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace wsis_d2 {

namespace {

// One thread per box runs its search and all of its steps (a few boxes per image, a few hundred
// steps each); `scratch` holds each box's search_scratch_size doubles (row k of (K, n)).
__global__ void refine_kernel(const double* S, int64_t H, int64_t W, double* boxes,
                              const int64_t* classes, const double* peaks, int64_t P,
                              const int64_t* own, int64_t K, int64_t steps, double lr,
                              double scale, double min_size, bool grow_only,
                              const int64_t* snap_steps, int64_t T, double* snaps, bool* stopped,
                              bool search, double* scratch, int64_t scratch_stride) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  const int64_t SS = (H + 1) * (W + 1);
  stopped[k] = refine_one_box(S + classes[k] * SS, H, W, boxes + 4 * k, classes[k], peaks, P,
                              own[k], steps, lr, scale, min_size, grow_only, snap_steps, T,
                              snaps + 4 * k, 4 * K, search, scratch + k * scratch_stride);
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> refine_context_gap_cuda(
    const at::Tensor& S_in, const at::Tensor& boxes_in, const at::Tensor& classes_in,
    const at::Tensor& peaks_in, const at::Tensor& own_in, int64_t steps, double lr,
    double context_scale, double min_size, const at::Tensor& snapshot_steps_in, bool grow_only,
    bool search) {
  TORCH_CHECK_VALUE(S_in.dim() == 4 && S_in.size(0) == 1 && S_in.scalar_type() == at::kDouble,
                    "refine_context_gap: S must be the float64 (1, C, H+1, W+1) integral images "
                    "of one image, got ", S_in.scalar_type(), " ", S_in.sizes());
  TORCH_CHECK_VALUE(boxes_in.dim() == 2 && boxes_in.size(1) == 4 &&
                        boxes_in.scalar_type() == at::kDouble,
                    "refine_context_gap: boxes must be (K, 4) float64, got ", boxes_in.sizes());
  TORCH_CHECK_VALUE(peaks_in.dim() == 2 && peaks_in.size(1) == 3 &&
                        peaks_in.scalar_type() == at::kDouble,
                    "refine_context_gap: peaks must be (P, 3) float64, got ", peaks_in.sizes());
  TORCH_CHECK_VALUE(steps >= 0, "refine_context_gap: steps must be >= 0, got ", steps);
  at::cuda::CUDAGuard guard(S_in.device());
  const auto S = S_in.contiguous();
  auto out = boxes_in.contiguous().clone();
  const auto classes = classes_in.to(at::kLong).contiguous();
  const auto peaks = peaks_in.contiguous();
  const auto own = own_in.to(at::kLong).contiguous();
  const auto snap_steps = snapshot_steps_in.to(S.device(), at::kLong).contiguous();
  const int64_t K = out.size(0), P = peaks.size(0), T = snap_steps.size(0);
  const int64_t H = S.size(2) - 1, W = S.size(3) - 1;
  TORCH_CHECK_VALUE(classes.size(0) == K && own.size(0) == K,
                    "refine_context_gap: classes and own must be (K,) with K = ", K);
  auto snaps = at::zeros({T, K, 4}, out.options());
  auto stopped = at::zeros({K}, out.options().dtype(at::kBool));
  if (K == 0) return {out, snaps, stopped};
  TORCH_CHECK_VALUE(classes.min().item<int64_t>() >= 0 && classes.max().item<int64_t>() < S.size(1),
                    "refine_context_gap: classes must be in [0, ", S.size(1), ")");
  const int64_t scratch_stride = search ? search_scratch_size(H, W, P) : 0;
  auto scratch = at::empty({search ? K : 0, scratch_stride}, out.options());
  const int threads = 64;
  const int blocks = static_cast<int>((K + threads - 1) / threads);
  refine_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      S.data_ptr<double>(), H, W, out.data_ptr<double>(), classes.data_ptr<int64_t>(),
      peaks.data_ptr<double>(), P, own.data_ptr<int64_t>(), K, steps, lr, context_scale, min_size,
      grow_only, snap_steps.data_ptr<int64_t>(), T, snaps.data_ptr<double>(),
      stopped.data_ptr<bool>(), search, scratch.data_ptr<double>(), scratch_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, snaps, stopped};
}

TORCH_LIBRARY_IMPL(wsis_d2, CUDA, m) {
  m.impl("refine_context_gap", &refine_context_gap_cuda);
}

} // namespace wsis_d2
