#include "BoxScore.h"

#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>

namespace wsis_d2 {

namespace {

// A box costs ~100 ns; waking a second thread costs more than a few thousand boxes.
constexpr int64_t kBoxGrain = 16384;

// S[m] (H+1, W+1) with S[y][x] = sum of map[m][:y, :x]; one task per map.
template <typename scalar_t, typename acc_t>
void integral_images(const scalar_t* maps, acc_t* S, int64_t M, int64_t H, int64_t W) {
  const int64_t SW = W + 1, SS = (H + 1) * (W + 1);
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      acc_t* s = S + m * SS;
      const scalar_t* map = maps + m * H * W;
      for (int64_t x = 0; x <= W; ++x) s[x] = 0;
      for (int64_t y = 1; y <= H; ++y) {
        acc_t row = 0;
        s[y * SW] = 0;
        for (int64_t x = 1; x <= W; ++x) {
          row += static_cast<acc_t>(map[(y - 1) * W + (x - 1)]);
          s[y * SW + x] = s[(y - 1) * SW + x] + row;
        }
      }
    }
  });
}

template <typename acc_t>
inline acc_t interp(const acc_t* s, int64_t SW, const IntegralPoint<acc_t>& p) {
  const acc_t* r0 = s + p.j * SW + p.i;
  const acc_t* r1 = r0 + SW;
  return (1 - p.fy) * ((1 - p.fx) * r0[0] + p.fx * r0[1]) +
         p.fy * ((1 - p.fx) * r1[0] + p.fx * r1[1]);
}

template <typename acc_t>
inline void interp_grad(const acc_t* s, int64_t SW, const IntegralPoint<acc_t>& p, acc_t* dx,
                        acc_t* dy) {
  const acc_t* r0 = s + p.j * SW + p.i;
  const acc_t* r1 = r0 + SW;
  *dx = (1 - p.fy) * (r0[1] - r0[0]) + p.fy * (r1[1] - r1[0]);
  *dy = (1 - p.fx) * (r1[0] - r0[0]) + p.fx * (r1[1] - r0[1]);
}

void check_inputs(const at::Tensor& maps, const at::Tensor& boxes, const at::Tensor& classes) {
  TORCH_CHECK(maps.dim() == 4, "box_sum: maps must be (N, C, H, W), got ", maps.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 5, "box_sum: boxes must be (K, 5), got ",
              boxes.sizes());
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == boxes.size(0),
              "box_sum: classes must be (K,)");
  TORCH_CHECK(maps.size(2) > 0 && maps.size(3) > 0, "box_sum: empty maps");
}

} // namespace

at::Tensor integral_image_cpu(const at::Tensor& maps_in) {
  TORCH_CHECK(maps_in.dim() == 4, "integral_image: maps must be (N, C, H, W), got ", maps_in.sizes());
  auto maps = maps_in.contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  auto S = at::empty({N, C, H + 1, W + 1}, maps.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "integral_image_cpu", [&] {
    integral_images<scalar_t, double>(maps.data_ptr<scalar_t>(), S.data_ptr<double>(), N * C, H, W);
  });
  return S;
}

at::Tensor box_sum_integral_cpu(const at::Tensor& S_in, const at::Tensor& boxes_in,
                                const at::Tensor& classes_in) {
  TORCH_CHECK(S_in.dim() == 4 && S_in.scalar_type() == at::kDouble,
              "box_sum_integral: S must be a double (N, C, H+1, W+1) integral image");
  TORCH_CHECK(boxes_in.dim() == 2 && boxes_in.size(1) == 5, "box_sum: boxes must be (K, 5)");
  TORCH_CHECK(classes_in.dim() == 1 && classes_in.size(0) == boxes_in.size(0),
              "box_sum: classes must be (K,)");
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  const int64_t N = S.size(0), C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1;
  const int64_t K = boxes.size(0), SW = W + 1, SS = (H + 1) * (W + 1);
  auto out = at::zeros({K}, boxes.options());
  if (K == 0) return out;
  const double* Sp = S.data_ptr<double>();
  const int64_t* cls = classes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_cpu", [&] {
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, K, kBoxGrain, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        const int64_t n = static_cast<int64_t>(b[k * 5]), c = cls[k];
        TORCH_CHECK(n >= 0 && n < N && c >= 0 && c < C, "box_sum: box ", k,
                    " has image/class index out of range");
        const double* s = Sp + (n * C + c) * SS;
        const double x1 = b[k * 5 + 1], y1 = b[k * 5 + 2], x2 = b[k * 5 + 3], y2 = b[k * 5 + 4];
        o[k] = static_cast<scalar_t>(
            interp(s, SW, locate(x2, y2, H, W)) - interp(s, SW, locate(x1, y2, H, W)) -
            interp(s, SW, locate(x2, y1, H, W)) + interp(s, SW, locate(x1, y1, H, W)));
      }
    });
  });
  return out;
}

at::Tensor box_sum_forward_cpu(const at::Tensor& maps_in, const at::Tensor& boxes_in,
                               const at::Tensor& classes_in) {
  check_inputs(maps_in, boxes_in, classes_in);
  return box_sum_integral_cpu(integral_image_cpu(maps_in), boxes_in.to(maps_in.scalar_type()),
                              classes_in);
}

namespace {

// d sums / d boxes from the integral images; also d sums / d S into gS when gS != nullptr
template <typename scalar_t>
void box_sum_backward_impl(const double* S, const scalar_t* b, const int64_t* cls,
                           const scalar_t* g, scalar_t* gb, double* gS, int64_t K, int64_t C,
                           int64_t H, int64_t W) {
  const int64_t SW = W + 1, SS = (H + 1) * (W + 1);
  at::parallel_for(0, K, kBoxGrain, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      const int64_t n = static_cast<int64_t>(b[k * 5]), c = cls[k];
      const double* s = S + (n * C + c) * SS;
      const double x1 = b[k * 5 + 1], y1 = b[k * 5 + 2], x2 = b[k * 5 + 3], y2 = b[k * 5 + 4];
      double dx22, dy22, dx12, dy12, dx21, dy21, dx11, dy11;
      interp_grad(s, SW, locate(x2, y2, H, W), &dx22, &dy22);
      interp_grad(s, SW, locate(x1, y2, H, W), &dx12, &dy12);
      interp_grad(s, SW, locate(x2, y1, H, W), &dx21, &dy21);
      interp_grad(s, SW, locate(x1, y1, H, W), &dx11, &dy11);
      const double gk = g[k];
      gb[k * 5 + 0] = 0;
      gb[k * 5 + 1] = static_cast<scalar_t>(gk * (dx11 - dx12));
      gb[k * 5 + 2] = static_cast<scalar_t>(gk * (dy11 - dy21));
      gb[k * 5 + 3] = static_cast<scalar_t>(gk * (dx22 - dx21));
      gb[k * 5 + 4] = static_cast<scalar_t>(gk * (dy22 - dy12));
    }
  });
  if (gS == nullptr) return;
  // d sum / d S: bilinear weights at the corners (serial: boxes may share maps; 16 adds a box)
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = static_cast<int64_t>(b[k * 5]), c = cls[k];
    double* gs = gS + (n * C + c) * SS;
    const double x1 = b[k * 5 + 1], y1 = b[k * 5 + 2], x2 = b[k * 5 + 3], y2 = b[k * 5 + 4];
    const double xs[4] = {x2, x1, x2, x1}, ys[4] = {y2, y2, y1, y1}, sg[4] = {1, -1, -1, 1};
    for (int q = 0; q < 4; ++q) {
      const auto p = locate(xs[q], ys[q], H, W);
      const double w = sg[q] * static_cast<double>(g[k]);
      double* r0 = gs + p.j * SW + p.i;
      r0[0] += w * (1 - p.fy) * (1 - p.fx);
      r0[1] += w * (1 - p.fy) * p.fx;
      r0[SW] += w * p.fy * (1 - p.fx);
      r0[SW + 1] += w * p.fy * p.fx;
    }
  }
}

} // namespace

at::Tensor box_sum_integral_backward_cpu(const at::Tensor& grad_in, const at::Tensor& S_in,
                                         const at::Tensor& boxes_in,
                                         const at::Tensor& classes_in) {
  auto S = S_in.contiguous();
  auto boxes = boxes_in.contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(boxes.scalar_type()).contiguous();
  const int64_t C = S.size(1), H = S.size(2) - 1, W = S.size(3) - 1, K = boxes.size(0);
  auto grad_boxes = at::zeros({K, 5}, boxes.options());
  if (K == 0) return grad_boxes;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "box_sum_integral_backward_cpu", [&] {
    box_sum_backward_impl<scalar_t>(S.data_ptr<double>(), boxes.data_ptr<scalar_t>(),
                                    classes.data_ptr<int64_t>(), grad.data_ptr<scalar_t>(),
                                    grad_boxes.data_ptr<scalar_t>(), nullptr, K, C, H, W);
  });
  return grad_boxes;
}

std::tuple<at::Tensor, at::Tensor> box_sum_backward_cpu(const at::Tensor& grad_in,
                                                        const at::Tensor& maps_in,
                                                        const at::Tensor& boxes_in,
                                                        const at::Tensor& classes_in) {
  check_inputs(maps_in, boxes_in, classes_in);
  auto maps = maps_in.contiguous();
  auto boxes = boxes_in.to(maps.scalar_type()).contiguous();
  auto classes = classes_in.to(at::kLong).contiguous();
  auto grad = grad_in.to(maps.scalar_type()).contiguous();
  const int64_t N = maps.size(0), C = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t K = boxes.size(0), SW = W + 1, SS = (H + 1) * (W + 1);
  auto grad_maps = at::zeros_like(maps);
  auto grad_boxes = at::zeros({K, 5}, maps.options());
  if (K == 0) return {grad_maps, grad_boxes};
  auto S = integral_image_cpu(maps);
  std::vector<double> gS(N * C * SS, 0);
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "box_sum_backward_cpu", [&] {
    box_sum_backward_impl<scalar_t>(S.data_ptr<double>(), boxes.data_ptr<scalar_t>(),
                                    classes.data_ptr<int64_t>(), grad.data_ptr<scalar_t>(),
                                    grad_boxes.data_ptr<scalar_t>(), gS.data(), K, C, H, W);
    // S[y][x] = sum_{j<y, i<x} m[j][i]  =>  dL/dm[j][i] = sum_{y>j, x>i} dL/dS[y][x]
    scalar_t* gm = grad_maps.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t mb, int64_t me) {
      std::vector<double> col(W);
      for (int64_t m = mb; m < me; ++m) {
        const double* gs = gS.data() + m * SS;
        std::fill(col.begin(), col.end(), 0.0);
        for (int64_t y = H; y >= 1; --y) {
          double row = 0;
          for (int64_t x = W; x >= 1; --x) {
            row += gs[y * SW + x];
            col[x - 1] += row;
            gm[m * H * W + (y - 1) * W + (x - 1)] = static_cast<scalar_t>(col[x - 1]);
          }
        }
      }
    });
  });
  return {grad_maps, grad_boxes};
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("box_sum_forward", &box_sum_forward_cpu);
  m.impl("box_sum_backward", &box_sum_backward_cpu);
  m.impl("integral_image", &integral_image_cpu);
  m.impl("box_sum_integral", &box_sum_integral_cpu);
  m.impl("box_sum_integral_backward", &box_sum_integral_backward_cpu);
}

} // namespace wsis_d2
