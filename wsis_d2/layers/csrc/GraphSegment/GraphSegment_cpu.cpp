#include "GraphSegment.h"

#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace wsis_d2 {

namespace {

// An edge packed as (weight bits << 32) | id. The bit pattern of a non-negative float32, read as
// an unsigned integer, orders like the float, so a stable sort of the packed values by their high
// half, starting from ascending ids, gives the (weight, id) order.
using Edge = uint64_t;

constexpr int kDigitBits = 11;
constexpr uint32_t kBuckets = 1u << kDigitBits;
constexpr uint32_t kDigitMask = kBuckets - 1;
constexpr int kPasses = 3;  // 3 x 11 bits cover the 32 key bits
constexpr uint32_t kNegativeZero = 0x80000000u;
constexpr uint32_t kInfinity = 0x7f800000u;  // patterns >= this: inf, NaN or negative
// Workspaces of images up to this many pixels (~85 bytes each) stay allocated between calls:
// fresh multi-megabyte buffers cost more in page faults than the sort (~0.8 ms at 160x240).
constexpr int64_t kKeepPixels = int64_t(1) << 19;

// A pixel of the union-find forest; size and threshold are those of the component it roots.
struct Node {
  int32_t parent;
  int32_t size;
  double threshold;  // Int(C) + k/|C|, in float64 like the reference
};

struct Workspace {
  std::vector<Edge> edges, scratch;
  std::vector<Node> nodes;
  std::vector<int32_t> label;
  std::vector<uint8_t> small;
};

inline float key_to_float(Edge e) {
  const uint32_t bits = static_cast<uint32_t>(e >> 32);
  float w;
  std::memcpy(&w, &bits, sizeof(w));
  return w;
}

// Root of x's component, halving the path on the way (a form of path compression).
inline int32_t find(Node* nodes, int32_t x) {
  // union by size and halving keep the trees flat: two hops without a branch find most roots
  const int32_t grandparent = nodes[nodes[x].parent].parent;
  nodes[x].parent = grandparent;
  x = grandparent;
  while (nodes[x].parent != x) {
    nodes[x].parent = nodes[nodes[x].parent].parent;
    x = nodes[x].parent;
  }
  return x;
}

// Union by size of the components of roots a != b. Returns the new root.
inline int32_t unite(Node* nodes, int32_t a, int32_t b) {
  if (nodes[a].size < nodes[b].size) std::swap(a, b);
  nodes[b].parent = a;
  nodes[a].size += nodes[b].size;
  return a;
}

// Writes the valid edges of the grid in ascending id order to `out`, counts the radix digits of
// their keys into `count` (kPasses x kBuckets) and returns their number. Sets *max_bits to the
// largest (sign-normalised) weight bit pattern, to validate all weights with one comparison.
size_t grid_edges(const float* weights, int64_t H, int64_t W, Edge* out, uint32_t* count,
                  uint32_t* max_bits) {
  const int64_t N = H * W;
  uint32_t top = 0;
  Edge* e = out;
  auto emit = [&](int64_t d, int64_t p) {
    uint32_t bits;
    std::memcpy(&bits, weights + d * N + p, sizeof(bits));
    bits = bits == kNegativeZero ? 0u : bits;  // -0 is 0: sort it with +0
    top = std::max(top, bits);
    for (int k = 0; k < kPasses; ++k)
      ++count[k * kBuckets + ((bits >> (k * kDigitBits)) & kDigitMask)];
    *e++ = (static_cast<Edge>(bits) << 32) | static_cast<uint32_t>(p * 4 + d);
  };
  for (int64_t y = 0; y < H; ++y) {
    const bool down = y + 1 < H, up = y > 0;
    for (int64_t x = 0; x + 1 < W; ++x) {
      const int64_t p = y * W + x;
      emit(0, p);
      if (down) {
        emit(1, p);
        emit(2, p);
      }
      if (up) emit(3, p);
    }
    if (down) emit(1, y * W + W - 1);  // last column: only the edge down
  }
  *max_bits = top;
  return static_cast<size_t>(e - out);
}

// Stable LSD radix sort of edges[0, n) by their high 32 bits, O(n), given the digit counts of
// every pass: one scatter per pass; a pass whose digit is the same for all keys (e.g. the exponent
// bits when the weights span a narrow range) is skipped. Returns the buffer that holds the result
// (edges or tmp).
Edge* sort_edges(Edge* edges, Edge* tmp, size_t n, uint32_t* count) {
  if (n < 2) return edges;
  Edge* src = edges;
  Edge* dst = tmp;
  for (int k = 0; k < kPasses; ++k) {
    uint32_t* start = count + k * kBuckets;
    const int shift = 32 + k * kDigitBits;
    if (start[(src[0] >> shift) & kDigitMask] == n) continue;
    uint32_t offset = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const uint32_t c = start[b];
      start[b] = offset;
      offset += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const Edge e = src[i];
      dst[start[(e >> shift) & kDigitMask]++] = e;
    }
    std::swap(src, dst);
  }
  return src;
}

// The first used weight that is negative, inf or NaN, for the error message.
void report_bad_weight(const float* weights, const Edge* edges, size_t n, int64_t H, int64_t W) {
  for (size_t i = 0; i < n; ++i) {
    if (static_cast<uint32_t>(edges[i] >> 32) >= kInfinity) {
      const uint32_t id = static_cast<uint32_t>(edges[i]);
      const int64_t p = id >> 2, d = id & 3;
      TORCH_CHECK_VALUE(false, "graph_segment: weights must be finite and >= 0, got ",
                        weights[d * H * W + p], " at (", d, ", ", p / W, ", ", p % W, ")");
    }
  }
}

// The segmentation proper (see GraphSegment.h) into labels[0, H*W).
void segment(const float* weights, int64_t H, int64_t W, double scale, int64_t min_size,
             Workspace& ws, int64_t* labels) {
  const int32_t N = static_cast<int32_t>(H * W);
  ws.edges.resize(4 * static_cast<size_t>(N));
  ws.scratch.resize(4 * static_cast<size_t>(N));
  ws.nodes.resize(N);
  ws.label.resize(N);
  ws.small.resize(N);

  std::vector<uint32_t> count(kPasses * kBuckets, 0);
  uint32_t max_bits = 0;
  const size_t n = grid_edges(weights, H, W, ws.edges.data(), count.data(), &max_bits);
  if (max_bits >= kInfinity) report_bad_weight(weights, ws.edges.data(), n, H, W);
  const Edge* edges = sort_edges(ws.edges.data(), ws.scratch.data(), n, count.data());

  const int32_t offset[4] = {1, static_cast<int32_t>(W), static_cast<int32_t>(W) + 1,
                             1 - static_cast<int32_t>(W)};
  Node* nodes = ws.nodes.data();
  for (int32_t p = 0; p < N; ++p) nodes[p] = Node{p, 1, scale};  // Int = 0 for one pixel
  for (size_t i = 0; i < n; ++i) {
    const uint32_t id = static_cast<uint32_t>(edges[i]);
    const int32_t p = static_cast<int32_t>(id >> 2);
    const int32_t a = find(nodes, p), b = find(nodes, p + offset[id & 3]);
    const double w = key_to_float(edges[i]);
    // one branch (&, not &&) for both tests: they are hard to predict, and a misprediction
    // costs more than reading the thresholds of a == b
    if ((a != b) & (w <= std::min(nodes[a].threshold, nodes[b].threshold))) {
      const int32_t r = unite(nodes, a, b);
      nodes[r].threshold = w + scale / static_cast<double>(nodes[r].size);
    }
  }

  // Components of fewer than min_size pixels join a neighbour, in the same edge order. Sizes only
  // grow, so an edge between two components that are large now never merges: only edges with a
  // pixel in a small component need the union-find.
  if (min_size > 1) {
    uint8_t* small = ws.small.data();
    int64_t num_small = 0;
    for (int32_t p = 0; p < N; ++p) {
      small[p] = nodes[find(nodes, p)].size < min_size;
      num_small += nodes[p].parent == p && small[p];
    }
    for (size_t i = 0; i < n && num_small > 0; ++i) {
      const uint32_t id = static_cast<uint32_t>(edges[i]);
      const int32_t p = static_cast<int32_t>(id >> 2), q = p + offset[id & 3];
      if (!(small[p] | small[q])) continue;
      const int32_t a = find(nodes, p), b = find(nodes, q);
      if (a == b) continue;
      const bool small_a = nodes[a].size < min_size, small_b = nodes[b].size < min_size;
      if (small_a || small_b) {
        const int32_t r = unite(nodes, a, b);
        num_small += (nodes[r].size < min_size) - small_a - small_b;
      }
    }
  }

  int32_t* label_of_root = ws.label.data();
  std::fill(label_of_root, label_of_root + N, -1);
  int32_t next = 0;
  for (int32_t p = 0; p < N; ++p) {
    const int32_t r = find(nodes, p);
    if (label_of_root[r] < 0) label_of_root[r] = next++;
    labels[p] = label_of_root[r];
  }
}

thread_local Workspace workspace;

} // namespace

at::Tensor graph_segment_cpu(const at::Tensor& weights, double scale, int64_t min_size) {
  TORCH_CHECK_VALUE(weights.device().is_cpu(), "graph_segment: weights must be a CPU tensor, got ",
                    weights.device());
  TORCH_CHECK_VALUE(weights.scalar_type() == at::kFloat,
                    "graph_segment: weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.size(0) == 4,
                    "graph_segment: weights must have shape (4, H, W), got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.is_contiguous(), "graph_segment: weights must be contiguous");
  const int64_t H = weights.size(1), W = weights.size(2);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "graph_segment: the image must be at least 1x1, got ", H,
                    "x", W);
  // pixel indices are int32 and edge ids (4 per pixel) uint32
  TORCH_CHECK_VALUE(H * W < (int64_t(1) << 30), "graph_segment: at most 2^30 pixels, got ", H,
                    "x", W);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0,
                    "graph_segment: scale must be finite and >= 0, got ", scale);
  TORCH_CHECK_VALUE(min_size >= 0, "graph_segment: min_size must be >= 0, got ", min_size);

  auto labels = at::empty({H, W}, weights.options().dtype(at::kLong));
  Workspace local;
  Workspace& ws = H * W <= kKeepPixels ? workspace : local;
  segment(weights.data_ptr<float>(), H, W, scale, min_size, ws, labels.data_ptr<int64_t>());
  return labels;
}

TORCH_LIBRARY_IMPL(wsis_d2, CPU, m) {
  m.impl("graph_segment", &graph_segment_cpu);
}

} // namespace wsis_d2
