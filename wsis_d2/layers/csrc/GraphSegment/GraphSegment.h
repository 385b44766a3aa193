// Graph-based image segmentation (Felzenszwalb & Huttenlocher, "Efficient Graph-Based Image
// Segmentation", IJCV 2004) of the 8-connected pixel grid, given its edge weights.
//
// CPU only, no CUDA kernel: the merge loop is a union-find over the sorted edges, inherently
// sequential, and costs about 2 ms for a 160x240 image; the Python wrapper runs CUDA inputs here.
//
// Edges: weights[d, y, x] joins pixel (y, x) to its neighbour in direction d,
//   d = 0: (y, x+1) right, 1: (y+1, x) down, 2: (y+1, x+1) down-right, 3: (y-1, x+1) up-right;
// entries whose neighbour is outside the image are ignored. Edge id = (y*W + x)*4 + d.
//
// Algorithm: edges sorted ascending by (weight, id), a total order. Each component C keeps |C|
// and Int(C), the weight of the last edge merged into it (0 for a single pixel); edge (a, b) of
// weight w between different components merges them iff
//   w <= min(Int(C_a) + k/|C_a|, Int(C_b) + k/|C_b|),  k = scale  (thresholds in float64).
// Then a second pass over the edges in the same order merges any two different components of
// which at least one has fewer than min_size pixels. Labels 0..S-1 number the components by
// their first pixel in raster order.
#pragma once
#include <torch/types.h>

namespace wsis_d2 {

// weights (4, H, W) float32 contiguous, finite and >= 0 where used; scale k >= 0 (finite);
// min_size >= 0; H, W >= 1 and H*W < 2^30. Returns (H, W) int64 labels. ValueError otherwise.
at::Tensor graph_segment_cpu(const at::Tensor& weights, double scale, int64_t min_size);

} // namespace wsis_d2
