// KV-cache compaction after a verification round: the math shared by the CPU and CUDA kernels.
//
// A cache is viewed as rows [outer, S, D] where outer = (leading dims) * B * H. For batch row b the
// accepted tree entries live at slots src[b, 0..n_b) (n_b = entries before the first -1) and move to the
// contiguous slots dst[b] .. dst[b] + n_b. Sources may overlap destinations (they do after every round), so
// every kernel reads all sources of a row before writing any destination.
#pragma once
#include "hass/common.h"

namespace hass {

struct CacheGeom {
  int64_t lead;        // product of dims before B (1 for a [B,H,S,D] cache, 2*layers for a stacked one)
  int64_t B, H, S, D;  // batch, kv heads, sequence slots, head dim
  int64_t s_lead, s_b, s_h, s_s;  // element strides (the last dim is contiguous)
};

// Number of valid entries in one row of src (entries after the first negative one are padding).
HASS_HD int64_t compact_count(const int64_t* src_row, int64_t m) {
  int64_t n = 0;
  while (n < m && src_row[n] >= 0) ++n;
  return n;
}

// Element offset of (lead index l, batch b, head h, slot s) in a cache.
HASS_HD int64_t cache_offset(const CacheGeom& g, int64_t l, int64_t b, int64_t h, int64_t s) {
  return l * g.s_lead + b * g.s_b + h * g.s_h + s * g.s_s;
}

// Row r of the flattened [lead*B*H] outer index -> (l, b, h).
HASS_HD void split_row(const CacheGeom& g, int64_t r, int64_t* l, int64_t* b, int64_t* h) {
  *h = r % g.H;
  *b = (r / g.H) % g.B;
  *l = r / (g.H * g.B);
}

// Validates one batch row of the plan; returns kOk or kBadIndex.
HASS_HD int compact_check_row(const int64_t* src_row, int64_t m, int64_t dst, int64_t S) {
  const int64_t n = compact_count(src_row, m);
  if (dst < 0 || dst + n > S) return kBadIndex;
  for (int64_t i = 0; i < n; ++i)
    if (src_row[i] >= S) return kBadIndex;
  for (int64_t i = n; i < m; ++i)  // padding must stay padding
    if (src_row[i] >= 0) return kBadIndex;
  return kOk;
}

}  // namespace hass
