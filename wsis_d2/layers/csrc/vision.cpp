// The single binding file of wsis_d2._C: the operator schemas (torch.ops.wsis_d2.*, kernels are
// registered for CPU in */*_cpu.cpp and for CUDA in */*_cuda.cu) and the Python module.
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
  // PeakFind: (mask, indices, values, counts); see PeakFind/PeakFind.h
  m.def("find_peaks(Tensor maps, int radius, Tensor thresholds)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // BoxScore: integrals of maps over boxes and their gradients; see BoxScore/BoxScore.h
  m.def("box_sum_forward(Tensor maps, Tensor boxes, Tensor classes) -> Tensor");
  m.def("box_sum_backward(Tensor grad, Tensor maps, Tensor boxes, Tensor classes)"
        " -> (Tensor, Tensor)");
  m.def("integral_image(Tensor maps) -> Tensor");
  m.def("box_sum_integral(Tensor S, Tensor boxes, Tensor classes) -> Tensor");
  m.def("box_sum_integral_backward(Tensor grad, Tensor S, Tensor boxes, Tensor classes)"
        " -> Tensor");
  // BoxRefine: CCGR's center-context-gap refinement, all steps in the op; see BoxRefine/BoxRefine.h
  m.def("refine_context_gap(Tensor S, Tensor boxes, Tensor classes, Tensor peaks, Tensor own,"
        " int steps, float lr, float context_scale, float min_size, Tensor snapshot_steps,"
        " bool grow_only, bool search=False)"
        " -> (Tensor, Tensor, Tensor)");
  // GraphSegment: Felzenszwalb-Huttenlocher labels (H, W) from grid edge weights (4, H, W), CPU
  // only; see GraphSegment/GraphSegment.h
  m.def("graph_segment(Tensor weights, float scale, int min_size) -> Tensor");
  // SelectiveSearch: hierarchical grouping of over-segmentations and superpixel straddling of
  // boxes, CPU only; see SelectiveSearch/SelectiveSearch.h
  m.def("selective_search(Tensor labels, Tensor colour_bins, Tensor texture_bins, Tensor weights)"
        " -> (Tensor, Tensor)");
  m.def("box_straddling(Tensor labels, Tensor boxes) -> Tensor");
}

} // namespace wsis_d2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wsis_d2 custom ops; importing registers torch.ops.wsis_d2.*";
  m.def("has_cuda", &wsis_d2::has_cuda, "whether the CUDA kernels were compiled in");
}
