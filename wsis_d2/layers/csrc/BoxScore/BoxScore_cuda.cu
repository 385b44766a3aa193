#include "BoxScore.h"

#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace wsis_d2 {

namespace {

template <typename acc_t>
__device__ inline acc_t interp(const acc_t* s, int64_t SW, const IntegralPoint<acc_t>& p) {
  const acc_t* r0 = s + p.j * SW + p.i;
  const acc_t* r1 = r0 + SW;
  return (1 - p.fy) * ((1 - p.fx) * r0[0] + p.fx * r0[1]) +
         p.fy * ((1 - p.fx) * r1[0] + p.fx * r1[1]);
}

template <typename scalar_t, typename acc_t>
__global__ void box_sum_forward_kernel(const acc_t* __restrict__ S,
                                       const scalar_t* __restrict__ b,
                                       const int64_t* __restrict__ cls, scalar_t* out, int64_t K,
                                       int64_t C, int64_t H, int64_t W) {
  const int64_t SW = W + 1, SS = (H + 1) * (W + 1);
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < K;
       k += (int64_t)blockDim.x * gridDim.x) {
    const int64_t n = static_cast<int64_t>(b[k * 5]);
    const acc_t* s = S + (n * C + cls[k]) * SS;
    const acc_t x1 = b[k * 5 + 1], y1 = b[k * 5 + 2], x2 = b[k * 5 + 3], y2 = b[k * 5 + 4];
    out[k] = static_cast<scalar_t>(
        interp(s, SW, locate(x2, y2, H, W)) - interp(s, SW, locate(x1, y2, H, W)) -
        interp(s, SW, locate(x2, y1, H, W)) + interp(s, SW, locate(x1, y1, H, W)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void box_sum_backward_kernel(const acc_t* __restrict__ S,
                                        const scalar_t* __restrict__ b,
                                        const int64_t* __restrict__ cls,
                                        const scalar_t* __restrict__ g, acc_t* gS,
                                        scalar_t* gb, int64_t K, int64_t C, int64_t H,
                                        int64_t W) {
  const int64_t SW = W + 1, SS = (H + 1) * (W + 1);
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < K;
       k += (int64_t)blockDim.x * gridDim.x) {
    const int64_t n = static_cast<int64_t>(b[k * 5]);
    const int64_t off = (n * C + cls[k]) * SS;
    const acc_t x1 = b[k * 5 + 1], y1 = b[k * 5 + 2], x2 = b[k * 5 + 3], y2 = b[k * 5 + 4];
    const acc_t xs[4] = {x2, x1, x2, x1}, ys[4] = {y2, y2, y1, y1}, sg[4] = {1, -1, -1, 1};
    acc_t dx[4], dy[4];
    const acc_t gk = static_cast<acc_t>(g[k]);
    for (int q = 0; q < 4; ++q) {
      const auto p = locate(xs[q], ys[q], H, W);
      const acc_t* r0 = S + off + p.j * SW + p.i;
      const acc_t* r1 = r0 + SW;
      dx[q] = (1 - p.fy) * (r0[1] - r0[0]) + p.fy * (r1[1] - r1[0]);
      dy[q] = (1 - p.fx) * (r1[0] - r0[0]) + p.fx * (r1[1] - r0[1]);
      if (gS != nullptr) {
        acc_t* w0 = gS + off + p.j * SW + p.i;
        const acc_t w = sg[q] * gk;
        atomicAdd(w0, w * (1 - p.fy) * (1 - p.fx));
        atomicAdd(w0 + 1, w * (1 - p.fy) * p.fx);
        atomicAdd(w0 + SW, w * p.fy * (1 - p.fx));
        atomicAdd(w0 + SW + 1, w * p.fy * p.fx);
      }
    }
    // corners: 0 = (x2, y2), 1 = (x1, y2), 2 = (x2, y1), 3 = (x1, y1)
    gb[k * 5 + 0] = 0;
    gb[k * 5 + 1] = static_cast<scalar_t>(gk * (dx[3] - dx[1]));
    gb[k * 5 + 2] = static_cast<scalar_t>(gk * (dy[3] - dy[2]));
    gb[k * 5 + 3] = static_cast<scalar_t>(gk * (dx[0] - dx[2]));
    gb[k * 5 + 4] = static_cast<scalar_t>(gk * (dy[0] - dy[1]));
  }
}

// (N, C, H, W) -> (N*C, H+1, W+1) integral images in the accumulation type
at::Tensor integral_images(const at::Tensor& maps, at::ScalarType acc) {
  auto s = maps.to(acc).cumsum(2).cumsum(3);
  return at::constant_pad_nd(s, {1, 0, 1, 0}, 0).contiguous();
}

void check_inputs(const at::Tensor& maps, const at::Tensor& boxes, const at::Tensor& classes) {
  TORCH_CHECK(maps.dim() == 4, "box_sum: maps must be (N, C, H, W), got ", maps.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 5, "box_sum: boxes must be (K, 5)");
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == boxes.size(0),
              "box_sum: classes must be (K,)");
}

} // namespace

at::Tensor box_sum_forward_cuda(const at::Tensor& maps_in, const at::Tensor& boxes_in,
                                const at::Tensor& classes_in) {
  check_inputs(maps_in, boxes_in, classes_in);
  at::cuda::CUDAGuard guard(maps_in.device());
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t C = maps.size(1), H = maps.size(2), W = maps.size(3), K = boxes.size(0);
  auto out = at::zeros({K}, maps.options());
  if (K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto S = integral_images(maps, c10::CppTypeToScalarType<acc_t>::value);
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((K + threads - 1) / threads, 65535));
    box_sum_forward_kernel<scalar_t, acc_t>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<acc_t>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
            out.data_ptr<scalar_t>(), K, C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_sum_backward_cuda(const at::Tensor& grad_in,
                                                         const at::Tensor& maps_in,
                                                         const at::Tensor& boxes_in,
                                                         const at::Tensor& classes_in) {
  check_inputs(maps_in, boxes_in, classes_in);
  at::cuda::CUDAGuard guard(maps_in.device());
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(maps.scalar_type()).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t K = boxes.size(0);
  auto grad_boxes = at::zeros({K, 5}, maps.options());
  if (K == 0) return {at::zeros_like(maps), grad_boxes};
  at::Tensor grad_maps;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    auto S = integral_images(maps, acc);
    auto gS = at::zeros_like(S);
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((K + threads - 1) / threads, 65535));
    box_sum_backward_kernel<scalar_t, acc_t>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<acc_t>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
            grad.data_ptr<scalar_t>(), gS.data_ptr<acc_t>(), grad_boxes.data_ptr<scalar_t>(), K,
            C, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dL/dm[j][i] = sum_{y>j, x>i} dL/dS[y][x]: reversed cumulative sums over both axes
    auto g = gS.view({N, C, H + 1, W + 1}).narrow(2, 1, H).narrow(3, 1, W);
    g = g.flip({2, 3}).cumsum(2).cumsum(3).flip({2, 3});
    grad_maps = g.to(maps.scalar_type()).contiguous();
  });
  return {grad_maps, grad_boxes};
}

at::Tensor integral_image_cuda(const at::Tensor& maps) {
  TORCH_CHECK(maps.dim() == 4, "integral_image: maps must be (N, C, H, W), got ", maps.sizes());
  at::cuda::CUDAGuard guard(maps.device());
  return integral_images(maps.contiguous(), at::kDouble);
}

at::Tensor box_sum_integral_cuda(const at::Tensor& S_in, const at::Tensor& boxes_in,
                                 const at::Tensor& classes_in) {
  TORCH_CHECK(S_in.dim() == 4 && S_in.scalar_type() == at::kDouble,
              "box_sum_integral: S must be a double (N, C, H+1, W+1) integral image");
  at::cuda::CUDAGuard guard(S_in.device());
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1, K = boxes.size(0);
  auto out = at::zeros({K}, boxes.options());
  if (K == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((K + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_cuda", [&] {
    box_sum_forward_kernel<scalar_t, double>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<double>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
            out.data_ptr<scalar_t>(), K, C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor box_sum_integral_backward_cuda(const at::Tensor& grad_in, const at::Tensor& S_in,
                                          const at::Tensor& boxes_in,
                                          const at::Tensor& classes_in) {
  at::cuda::CUDAGuard guard(S_in.device());
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(boxes.scalar_type()).contiguous();
  const int64_t C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1, K = boxes.size(0);
  auto grad_boxes = at::zeros({K, 5}, boxes.options());
  if (K == 0) return grad_boxes;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((K + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_backward_cuda", [&] {
    box_sum_backward_kernel<scalar_t, double>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            S.data_ptr<double>(), boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(),
            grad.data_ptr<scalar_t>(), nullptr, grad_boxes.data_ptr<scalar_t>(), K, C, H, W);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_boxes;
}

TORCH_LIBRARY_IMPL(wsis_d2, CUDA, m) {
  m.impl("integral_image", &integral_image_cuda);
  m.impl("box_sum_integral", &box_sum_integral_cuda);
  m.impl("box_sum_integral_backward", &box_sum_integral_backward_cuda);
  m.impl("box_sum_forward", &box_sum_forward_cuda);
  m.impl("box_sum_backward", &box_sum_backward_cuda);
}

} // namespace wsis_d2
