#include "SelectiveSearch.h"

#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#include <queue>
#include <tuple>
#include <vector>

namespace wsis_d2 {

namespace {

constexpr int kColourBins = 25;
constexpr int kTextureBins = 80;
constexpr int kChannels = 3;
constexpr int kColourDims = kChannels * kColourBins;
constexpr int kTextureDims = kChannels * kTextureBins;

struct Region {
  int64_t size = 0;
  int64_t x1 = 0, y1 = 0, x2 = 0, y2 = 0;  // x2, y2 exclusive
  int64_t level = 0;
  std::vector<float> colour, texture;       // L1-normalised histograms
  std::vector<int64_t> neighbours;          // may name regions merged since (skipped then)
};

struct Pair {
  double sim;
  int64_t i, j;  // i < j
  bool operator<(const Pair& o) const {  // priority_queue: largest sim first, then smallest ids
    if (sim != o.sim) return sim < o.sim;
    if (i != o.i) return i > o.i;
    return j > o.j;
  }
};

inline float intersection(const std::vector<float>& a, const std::vector<float>& b) {
  float s = 0.f;
  for (size_t k = 0; k < a.size(); ++k) s += std::min(a[k], b[k]);
  return s;
}

struct Grouping {
  std::vector<Region> regions;
  std::vector<uint8_t> alive;
  double im_size;
  double wc, wt, ws, wf;

  double similarity(int64_t i, int64_t j) const {
    const Region& a = regions[i];
    const Region& b = regions[j];
    double s = 0.0;
    if (wc != 0.0) s += wc * intersection(a.colour, b.colour);
    if (wt != 0.0) s += wt * intersection(a.texture, b.texture);
    if (ws != 0.0) s += ws * (1.0 - double(a.size + b.size) / im_size);
    if (wf != 0.0) {
      const double bb = double(std::max(a.x2, b.x2) - std::min(a.x1, b.x1)) *
                        double(std::max(a.y2, b.y2) - std::min(a.y1, b.y1));
      s += wf * (1.0 - (bb - double(a.size) - double(b.size)) / im_size);
    }
    return s;
  }
};

// One strategy: initial regions from the labels, then greedy merging.
void group_one(const int64_t* lab, const uint8_t* cbin, const uint8_t* tbin, int64_t H, int64_t W,
               const double* w, std::vector<int64_t>& out_boxes, std::vector<int64_t>& out_ids,
               std::vector<int64_t>& out_levels) {
  const int64_t N = H * W;
  int64_t R = 0;
  for (int64_t p = 0; p < N; ++p) R = std::max(R, lab[p] + 1);
  Grouping g;
  g.im_size = double(N);
  g.wc = w[0];
  g.wt = w[1];
  g.ws = w[2];
  g.wf = w[3];
  g.regions.resize(R);
  g.regions.reserve(2 * R);
  for (int64_t r = 0; r < R; ++r) {
    Region& reg = g.regions[r];
    reg.x1 = W;
    reg.y1 = H;
    reg.colour.assign(kColourDims, 0.f);
    reg.texture.assign(kTextureDims, 0.f);
  }
  std::vector<std::vector<int64_t>> adjacency(R);
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      const int64_t p = y * W + x;
      const int64_t r = lab[p];
      Region& reg = g.regions[r];
      reg.size += 1;
      reg.x1 = std::min(reg.x1, x);
      reg.y1 = std::min(reg.y1, y);
      reg.x2 = std::max(reg.x2, x + 1);
      reg.y2 = std::max(reg.y2, y + 1);
      for (int c = 0; c < kChannels; ++c) {
        reg.colour[c * kColourBins + cbin[c * N + p]] += 1.f;
        reg.texture[c * kTextureBins + tbin[c * N + p]] += 1.f;
      }
      if (x + 1 < W && lab[p + 1] != r) {
        adjacency[r].push_back(lab[p + 1]);
        adjacency[lab[p + 1]].push_back(r);
      }
      if (y + 1 < H && lab[p + W] != r) {
        adjacency[r].push_back(lab[p + W]);
        adjacency[lab[p + W]].push_back(r);
      }
    }
  }
  std::priority_queue<Pair> heap;
  for (int64_t r = 0; r < R; ++r) {
    Region& reg = g.regions[r];
    if (reg.size == 0) {
      TORCH_CHECK_VALUE(false, "selective_search: label ", r, " of 0..", R - 1, " is unused");
    }
    const float inv = 1.f / float(reg.size * kChannels);
    for (auto& v : reg.colour) v *= inv;
    for (auto& v : reg.texture) v *= inv;
    auto& adj = adjacency[r];
    std::sort(adj.begin(), adj.end());
    adj.erase(std::unique(adj.begin(), adj.end()), adj.end());
    reg.neighbours = adj;
  }
  g.alive.assign(R, 1);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t q : g.regions[r].neighbours) {
      if (q > r) heap.push({g.similarity(r, q), r, q});
    }
  }
  while (!heap.empty()) {
    const Pair top = heap.top();
    heap.pop();
    if (!g.alive[top.i] || !g.alive[top.j]) continue;
    const int64_t k = static_cast<int64_t>(g.regions.size());
    g.alive[top.i] = 0;
    g.alive[top.j] = 0;
    Region merged;
    {
      const Region& a = g.regions[top.i];
      const Region& b = g.regions[top.j];
      merged.size = a.size + b.size;
      merged.x1 = std::min(a.x1, b.x1);
      merged.y1 = std::min(a.y1, b.y1);
      merged.x2 = std::max(a.x2, b.x2);
      merged.y2 = std::max(a.y2, b.y2);
      merged.level = 1 + std::max(a.level, b.level);
      const float fa = float(a.size) / float(merged.size);
      const float fb = 1.f - fa;
      merged.colour.resize(kColourDims);
      merged.texture.resize(kTextureDims);
      for (int d = 0; d < kColourDims; ++d) merged.colour[d] = fa * a.colour[d] + fb * b.colour[d];
      for (int d = 0; d < kTextureDims; ++d)
        merged.texture[d] = fa * a.texture[d] + fb * b.texture[d];
      for (const Region* part : {&a, &b}) {
        for (int64_t q : part->neighbours) {
          if (g.alive[q]) merged.neighbours.push_back(q);
        }
      }
    }
    auto& nb = merged.neighbours;
    std::sort(nb.begin(), nb.end());
    nb.erase(std::unique(nb.begin(), nb.end()), nb.end());
    g.regions.push_back(std::move(merged));
    g.alive.push_back(1);
    for (int64_t q : g.regions[k].neighbours) {
      g.regions[q].neighbours.push_back(k);
      heap.push({g.similarity(q, k), q, k});
    }
  }
  // the merged regions' histograms are no longer needed: the caller copies boxes only
  const int64_t total = static_cast<int64_t>(g.regions.size());
  out_boxes.resize(total * 4);
  out_ids.resize(total);
  out_levels.resize(total);
  for (int64_t r = 0; r < total; ++r) {
    const Region& reg = g.regions[r];
    out_boxes[r * 4 + 0] = reg.x1;
    out_boxes[r * 4 + 1] = reg.y1;
    out_boxes[r * 4 + 2] = reg.x2;
    out_boxes[r * 4 + 3] = reg.y2;
    out_ids[r] = r;
    out_levels[r] = reg.level;
  }
}

void check_bins(const at::Tensor& bins, const char* name, const at::Tensor& labels, int limit) {
  TORCH_CHECK_VALUE(bins.dim() == 4 && bins.size(0) == labels.size(0) && bins.size(1) == kChannels &&
                        bins.size(2) == labels.size(1) && bins.size(3) == labels.size(2),
                    "selective_search: ", name, " must be (S, 3, H, W) with labels (S, H, W), got ",
                    bins.sizes(), " and ", labels.sizes());
  TORCH_CHECK_VALUE(bins.scalar_type() == at::kByte, "selective_search: ", name,
                    " must be uint8, got ", bins.scalar_type());
  if (bins.numel() > 0) {
    TORCH_CHECK_VALUE(bins.max().item<int64_t>() < limit, "selective_search: ", name,
                      " must be < ", limit);
  }
}

} // namespace

std::tuple<at::Tensor, at::Tensor> selective_search_cpu(const at::Tensor& labels_in,
                                                        const at::Tensor& colour_in,
                                                        const at::Tensor& texture_in,
                                                        const at::Tensor& weights_in) {
  TORCH_CHECK_VALUE(labels_in.dim() == 3 && labels_in.scalar_type() == at::kLong,
                    "selective_search: labels must be (S, H, W) int64, got ", labels_in.sizes(),
                    " ", labels_in.scalar_type());
  TORCH_CHECK_VALUE(labels_in.size(1) > 0 && labels_in.size(2) > 0,
                    "selective_search: empty image ", labels_in.sizes());
  check_bins(colour_in, "colour_bins", labels_in, kColourBins);
  check_bins(texture_in, "texture_bins", labels_in, kTextureBins);
  TORCH_CHECK_VALUE(weights_in.dim() == 2 && weights_in.size(0) == labels_in.size(0) &&
                        weights_in.size(1) == 4 && weights_in.scalar_type() == at::kDouble,
                    "selective_search: weights must be (S, 4) float64, got ", weights_in.sizes(),
                    " ", weights_in.scalar_type());
  if (labels_in.numel() > 0) {
    TORCH_CHECK_VALUE(labels_in.min().item<int64_t>() >= 0,
                      "selective_search: labels must be >= 0");
  }
  TORCH_CHECK_VALUE((weights_in >= 0).all().item<bool>(),
                    "selective_search: weights must be >= 0");
  const auto labels = labels_in.contiguous();
  const auto colour = colour_in.contiguous();
  const auto texture = texture_in.contiguous();
  const auto weights = weights_in.contiguous();
  const int64_t S = labels.size(0), H = labels.size(1), W = labels.size(2);
  std::vector<std::vector<int64_t>> boxes(S), ids(S), levels(S);
  std::vector<std::string> errors(S);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const uint8_t* cb = colour.data_ptr<uint8_t>();
  const uint8_t* tb = texture.data_ptr<uint8_t>();
  const double* w = weights.data_ptr<double>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t s = 0; s < S; ++s) {
    try {
      group_one(lab + s * H * W, cb + s * 3 * H * W, tb + s * 3 * H * W, H, W, w + s * 4, boxes[s],
                ids[s], levels[s]);
    } catch (const std::exception& e) {
      errors[s] = e.what();
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(errors[s].empty(), "strategy ", s, ": ", errors[s]);
  }
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) total += static_cast<int64_t>(ids[s].size());
  auto out_boxes = at::empty({total, 4}, labels.options());
  auto out_info = at::empty({total, 3}, labels.options());
  int64_t* ob = out_boxes.data_ptr<int64_t>();
  int64_t* oi = out_info.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = static_cast<int64_t>(ids[s].size());
    std::copy(boxes[s].begin(), boxes[s].end(), ob);
    for (int64_t r = 0; r < n; ++r) {
      oi[r * 3 + 0] = s;
      oi[r * 3 + 1] = ids[s][r];
      oi[r * 3 + 2] = levels[s][r];
    }
    ob += n * 4;
    oi += n * 3;
  }
  return {out_boxes, out_info};
}

at::Tensor box_straddling_cpu(const at::Tensor& labels_in, const at::Tensor& boxes_in) {
  TORCH_CHECK_VALUE(labels_in.dim() == 2 && labels_in.scalar_type() == at::kLong,
                    "box_straddling: labels must be (H, W) int64, got ", labels_in.sizes(), " ",
                    labels_in.scalar_type());
  TORCH_CHECK_VALUE(boxes_in.dim() == 2 && boxes_in.size(1) == 4 &&
                        boxes_in.scalar_type() == at::kLong,
                    "box_straddling: boxes must be (B, 4) int64, got ", boxes_in.sizes(), " ",
                    boxes_in.scalar_type());
  const auto labels = labels_in.contiguous();
  const auto boxes = boxes_in.contiguous();
  const int64_t H = labels.size(0), W = labels.size(1), B = boxes.size(0);
  auto out = at::zeros({B}, labels.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || W == 0) return out;
  TORCH_CHECK_VALUE(labels.min().item<int64_t>() >= 0, "box_straddling: labels must be >= 0");
  const int64_t R = labels.max().item<int64_t>() + 1;
  const int64_t* lab = labels.data_ptr<int64_t>();
  std::vector<int64_t> sizes(R, 0);
  for (int64_t p = 0; p < H * W; ++p) sizes[lab[p]] += 1;
  const int64_t* bx = boxes.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
#pragma omp parallel
  {
    std::vector<int64_t> inside(R, 0);
    std::vector<int64_t> touched;
#pragma omp for schedule(dynamic, 16)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t x1 = std::clamp<int64_t>(bx[b * 4 + 0], 0, W);
      const int64_t y1 = std::clamp<int64_t>(bx[b * 4 + 1], 0, H);
      const int64_t x2 = std::clamp<int64_t>(bx[b * 4 + 2], 0, W);
      const int64_t y2 = std::clamp<int64_t>(bx[b * 4 + 3], 0, H);
      if (x2 <= x1 || y2 <= y1) continue;
      touched.clear();
      for (int64_t y = y1; y < y2; ++y) {
        const int64_t* row = lab + y * W;
        for (int64_t x = x1; x < x2; ++x) {
          const int64_t r = row[x];
          if (inside[r]++ == 0) touched.push_back(r);
        }
      }
      int64_t straddle = 0;
      for (int64_t r : touched) {
        straddle += std::min(inside[r], sizes[r] - inside[r]);
        inside[r] = 0;
      }
      const double area = double(x2 - x1) * double(y2 - y1);
      o[b] = static_cast<float>(1.0 - double(straddle) / area);
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("selective_search", &selective_search_cpu);
  m.impl("box_straddling", &box_straddling_cpu);
}

} // namespace wsis_d2
