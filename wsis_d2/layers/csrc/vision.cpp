// The single binding file of wsis_d2._C: operator schemas (torch.ops.wsis_d2.*) and the Python module.
#include <torch/extension.h>
#include <torch/library.h>

namespace wsis_d2 {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(wsis_d2, m) {
  m.def("peak_mask(Tensor maps, int radius) -> Tensor");
  m.def("peak_list(Tensor maps, Tensor mask, Tensor thresholds) -> (Tensor, Tensor, Tensor)");
  m.def("box_sum_forward(Tensor maps, Tensor boxes, Tensor classes) -> Tensor");
  m.def("box_sum_backward(Tensor grad, Tensor maps, Tensor boxes, Tensor classes)"
        " -> (Tensor, Tensor)");
  m.def("integral_image(Tensor maps) -> Tensor");
  m.def("box_sum_integral(Tensor S, Tensor boxes, Tensor classes) -> Tensor");
  m.def("box_sum_integral_backward(Tensor grad, Tensor S, Tensor boxes, Tensor classes) -> Tensor");
}

} // namespace wsis_d2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &wsis_d2::has_cuda, "whether the CUDA kernels were compiled");
}
