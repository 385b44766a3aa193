#include "BoxScore.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

namespace wsis_d2 {

namespace {

constexpr int kThreads = 256;

int num_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

// One thread per box: 16 reads of S.
template <typename scalar_t>
__global__ void box_sum_kernel(const double* __restrict__ S, const scalar_t* __restrict__ b,
                               const int64_t* __restrict__ cls, scalar_t* __restrict__ out,
                               int64_t K, int64_t C, int64_t H, int64_t W) {
  const int64_t SS = (H + 1) * (W + 1);
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < K;
       k += (int64_t)blockDim.x * gridDim.x) {
    const double* s = S + (static_cast<int64_t>(b[5 * k]) * C + cls[k]) * SS;
    double c[4], inside[4];
    clamp_box(b + 5 * k, H, W, c, inside);
    out[k] = static_cast<scalar_t>(box_integral(s, H, W, c));
  }
}

// One thread per box: box gradients, and (when G is given) the bilinear splat of the incoming
// gradient at the four corners into dL/dS, with atomics since boxes share maps.
template <typename scalar_t>
__global__ void box_sum_backward_kernel(const double* __restrict__ S,
                                        const scalar_t* __restrict__ b,
                                        const int64_t* __restrict__ cls,
                                        const scalar_t* __restrict__ g, double* G,
                                        scalar_t* __restrict__ gb, int64_t K, int64_t C,
                                        int64_t H, int64_t W) {
  const int64_t SW = W + 1, SS = (H + 1) * (W + 1);
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < K;
       k += (int64_t)blockDim.x * gridDim.x) {
    const int64_t off = (static_cast<int64_t>(b[5 * k]) * C + cls[k]) * SS;
    const double gk = static_cast<double>(g[k]);
    double c[4], inside[4], d[4];
    clamp_box(b + 5 * k, H, W, c, inside);
    box_integral_grad(S + off, H, W, c, d);
    gb[5 * k] = 0;
    for (int q = 0; q < 4; ++q)
      gb[5 * k + 1 + q] = static_cast<scalar_t>(gk * d[q] * inside[q]);
    if (G == nullptr) continue;
    const double xs[4] = {c[2], c[0], c[2], c[0]}, ys[4] = {c[3], c[3], c[1], c[1]};
    const double sign[4] = {1, -1, -1, 1};
    for (int q = 0; q < 4; ++q) {
      const Corner p = locate(xs[q], ys[q], H, W);
      const double v = sign[q] * gk;
      double* r0 = G + off + p.j * SW + p.i;
      atomicAdd(r0, v * (1 - p.fy) * (1 - p.fx));
      atomicAdd(r0 + 1, v * (1 - p.fy) * p.fx);
      atomicAdd(r0 + SW, v * p.fy * (1 - p.fx));
      atomicAdd(r0 + SW + 1, v * p.fy * p.fx);
    }
  }
}

// (N, C, H, W) -> S (N, C, H+1, W+1) float64 (ATen's device scans)
at::Tensor integral_images(const at::Tensor& maps) {
  auto s = maps.to(at::kDouble).cumsum(2).cumsum(3);
  return at::constant_pad_nd(s, {1, 0, 1, 0}, 0).contiguous();
}

void check_shapes(const at::Tensor& maps, const at::Tensor& boxes, const at::Tensor& classes) {
  TORCH_CHECK_VALUE(maps.dim() == 4, "box_sum: maps must be (N, C, H, W), got ", maps.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 5, "box_sum: boxes must be (K, 5), got ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(classes.dim() == 1 && classes.size(0) == boxes.size(0),
                    "box_sum: classes must be (K,) with K = ", boxes.size(0), ", got ",
                    classes.sizes());
  TORCH_CHECK_VALUE(maps.size(2) > 0 && maps.size(3) > 0, "box_sum: maps have zero size ",
                    maps.sizes());
}

// Index ranges and NaN coordinates of the boxes; with S, also finiteness of every scored map (its
// total S[H][W]). One host synchronisation on the valid path; a few more on failure, to name the
// map of the first box that scores a non-finite one.
void check_boxes(const at::Tensor& boxes, const at::Tensor& classes, int64_t N, int64_t C,
                 const at::Tensor* S) {
  auto n = boxes.select(1, 0);
  auto bad = (n != n.floor()) | (n < 0) | (n >= N) | (classes < 0) | (classes >= C) |
             boxes.narrow(1, 1, 4).isnan().any(1);
  std::vector<at::Tensor> flags = {bad.any()};
  at::Tensor not_finite;
  if (S != nullptr) {
    const int64_t H = S->size(2) - 1, W = S->size(3) - 1;
    auto totals = S->select(2, H).select(2, W).reshape({-1});
    auto m = (n.to(at::kLong) * C + classes).clamp(0, N * C - 1);
    not_finite = at::isfinite(totals.index({m})).logical_not();  // (K,)
    flags.push_back(not_finite.any());
  }
  auto host = at::stack(flags).cpu();
  const bool* f = host.data_ptr<bool>();
  TORCH_CHECK_VALUE(!f[0], "box_sum: boxes have an image index outside [0, ", N,
                    ") or not an integer, a class outside [0, ", C, "), or a NaN coordinate");
  if (S != nullptr && f[1]) {
    // "maps[n, c] ... contains NaN or inf", as the CPU kernel and the Python checks say
    const int64_t k = at::nonzero(not_finite).select(1, 0).select(0, 0).item<int64_t>();
    const int64_t nk = static_cast<int64_t>(n.select(0, k).item<double>());
    const int64_t ck = classes.select(0, k).item<int64_t>();
    TORCH_CHECK_VALUE(false, "box_sum: maps[", nk, ", ", ck, "] (scored by boxes[", k,
                      "]) contains NaN or inf");
  }
}

} // namespace

at::Tensor box_sum_forward_cuda(const at::Tensor& maps_in, const at::Tensor& boxes_in,
                                const at::Tensor& classes_in) {
  check_shapes(maps_in, boxes_in, classes_in);
  at::cuda::CUDAGuard guard(maps_in.device());
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t K = boxes.size(0);
  auto out = at::zeros({K}, maps.options());
  if (K == 0) return out;
  auto S = integral_images(maps);
  check_boxes(boxes, classes, N, C, &S);
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_forward_cuda", [&] {
    box_sum_kernel<scalar_t><<<num_blocks(K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        S.data_ptr<double>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), K, C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_sum_backward_cuda(const at::Tensor& grad_in,
                                                         const at::Tensor& maps_in,
                                                         const at::Tensor& boxes_in,
                                                         const at::Tensor& classes_in) {
  check_shapes(maps_in, boxes_in, classes_in);
  at::cuda::CUDAGuard guard(maps_in.device());
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(maps.scalar_type()).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t K = boxes.size(0);
  TORCH_CHECK_VALUE(grad.numel() == K, "box_sum_backward: grad must have K = ", K, " elements");
  auto grad_boxes = at::zeros({K, 5}, maps.options());
  if (K == 0) return {at::zeros_like(maps), grad_boxes};
  check_boxes(boxes, classes, N, C, nullptr);
  auto S = integral_images(maps);
  auto G = at::zeros_like(S);
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_backward_cuda", [&] {
    box_sum_backward_kernel<scalar_t>
        <<<num_blocks(K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<double>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
            grad.data_ptr<scalar_t>(), G.data_ptr<double>(), grad_boxes.data_ptr<scalar_t>(), K,
            C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // S[y][x] = sum_{j<y, i<x} m[j][i]  =>  dL/dm[j][i] = sum_{y>j, x>i} dL/dS[y][x]
  auto g = G.narrow(2, 1, H).narrow(3, 1, W).flip({2, 3}).cumsum(2).cumsum(3).flip({2, 3});
  return {g.to(maps.scalar_type()).contiguous(), grad_boxes};
}

at::Tensor integral_image_cuda(const at::Tensor& maps) {
  TORCH_CHECK_VALUE(maps.dim() == 4, "integral_image: maps must be (N, C, H, W), got ",
                    maps.sizes());
  at::cuda::CUDAGuard guard(maps.device());
  return integral_images(maps.contiguous());
}

at::Tensor box_sum_integral_cuda(const at::Tensor& S_in, const at::Tensor& boxes_in,
                                 const at::Tensor& classes_in) {
  TORCH_CHECK_VALUE(S_in.dim() == 4 && S_in.scalar_type() == at::kDouble,
                    "box_sum_integral: S must be a float64 (N, C, H+1, W+1) integral image");
  check_shapes(S_in, boxes_in, classes_in);
  at::cuda::CUDAGuard guard(S_in.device());
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t N = S.size(0), C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1;
  const int64_t K = boxes.size(0);
  auto out = at::zeros({K}, boxes.options());
  if (K == 0) return out;
  check_boxes(boxes, classes, N, C, nullptr);
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_cuda", [&] {
    box_sum_kernel<scalar_t><<<num_blocks(K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        S.data_ptr<double>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), K, C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor box_sum_integral_backward_cuda(const at::Tensor& grad_in, const at::Tensor& S_in,
                                          const at::Tensor& boxes_in,
                                          const at::Tensor& classes_in) {
  TORCH_CHECK_VALUE(S_in.dim() == 4 && S_in.scalar_type() == at::kDouble,
                    "box_sum_integral: S must be a float64 (N, C, H+1, W+1) integral image");
  check_shapes(S_in, boxes_in, classes_in);
  at::cuda::CUDAGuard guard(S_in.device());
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(boxes.scalar_type()).contiguous();
  const int64_t N = S.size(0), C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1;
  const int64_t K = boxes.size(0);
  TORCH_CHECK_VALUE(grad.numel() == K, "box_sum_integral_backward: grad must have K = ", K,
                    " elements");
  auto grad_boxes = at::zeros({K, 5}, boxes.options());
  if (K == 0) return grad_boxes;
  check_boxes(boxes, classes, N, C, nullptr);
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_backward_cuda", [&] {
    box_sum_backward_kernel<scalar_t>
        <<<num_blocks(K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<double>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
            grad.data_ptr<scalar_t>(), nullptr, grad_boxes.data_ptr<scalar_t>(), K, C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_boxes;
}

TORCH_LIBRARY_IMPL(wsis_d2, CUDA, m) {
  m.impl("box_sum_forward", &box_sum_forward_cuda);
  m.impl("box_sum_backward", &box_sum_backward_cuda);
  m.impl("integral_image", &integral_image_cuda);
  m.impl("box_sum_integral", &box_sum_integral_cuda);
  m.impl("box_sum_integral_backward", &box_sum_integral_backward_cuda);
}

} // namespace wsis_d2
