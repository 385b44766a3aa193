// Hierarchical grouping of selective search (Uijlings, van de Sande, Gevers & Smeulders,
// "Selective Search for Object Recognition", IJCV 2013) over given over-segmentations, and the
// superpixel-straddling objectness of boxes (Alexe, Deselaers & Ferrari, "Measuring the
// objectness of image windows", TPAMI 2012). CPU only, no CUDA kernel: both are irregular,
// per-image loops of a few milliseconds; the Python wrappers run CUDA inputs here.
#pragma once
#include <torch/types.h>

namespace wsis_d2 {

// Greedy hierarchical grouping, one independent run per strategy s (OpenMP over s).
//
// labels (S, H, W) int64: over-segmentation s, labels 0..R_s-1 (every label used).
// colour_bins (S, 3, H, W) uint8: per pixel and channel the colour bin, < 25.
// texture_bins (S, 3, H, W) uint8: per pixel and channel the texture bin, < 80 (8 orientations x
//   10 magnitude bins).
// weights (S, 4) float64: weights (a_colour, a_texture, a_size, a_fill) >= 0 of the similarity
//   s(r_i, r_j) = a_c·s_colour + a_t·s_texture + a_s·s_size + a_f·s_fill, with
//   s_colour = Σ_k min(c_i^k, c_j^k) over the L1-normalised 75-bin colour histograms,
//   s_texture the same over the 240-bin texture histograms,
//   s_size = 1 − (|r_i| + |r_j|) / |im|,  s_fill = 1 − (|BB_ij| − |r_i| − |r_j|) / |im|.
// The most similar pair of neighbouring (4-connected) regions is merged (histograms averaged by
// size), until no neighbouring pair is left; ties are broken by the smaller pair of region ids.
//
// Returns (boxes (B, 4) int64 rows x1, y1, x2, y2 with x2, y2 exclusive, so continuous pixel
// coordinates; info (B, 3) int64 rows (strategy s, region id, hierarchy level)): every initial
// region (ids 0..R_s-1, level 0) and every merged region (ids R_s.., in merge order, level =
// 1 + the larger level of its two parts) of every strategy.
std::tuple<at::Tensor, at::Tensor> selective_search_cpu(const at::Tensor& labels,
                                                        const at::Tensor& colour_bins,
                                                        const at::Tensor& texture_bins,
                                                        const at::Tensor& weights);

// Superpixel straddling SS(b) = 1 − Σ_s min(|s \ b|, |s ∩ b|) / |b| of integer boxes b (B, 4)
// int64 (x1, y1, x2, y2), x2, y2 exclusive, clipped to the image) over the segments of labels
// (H, W) int64 (0..R-1). 1 when no segment crosses the box edge. Returns (B,) float32; an empty
// box gets 0. Cost O(area of b) per box (OpenMP over boxes).
at::Tensor box_straddling_cpu(const at::Tensor& labels, const at::Tensor& boxes);

} // namespace wsis_d2
