// CPU kernel of hass::compact_kv (see csrc/include/hass/compact_kv.h for the semantics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks/compact_kv.h"
#include "hass/compact_kv.h"

namespace {

void compact_kv_cpu(at::TensorList caches, const at::Tensor& src_slots, const at::Tensor& dst_start) {
  const std::vector<hass::CacheGeom> geoms = hass_check::compact_kv_args(caches, src_slots, dst_start);
  const auto src = src_slots.contiguous();
  const auto dst = dst_start.contiguous();
  hass_check::compact_kv_values(src, dst, geoms);
  const int64_t m = src.size(1);
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* dp = dst.data_ptr<int64_t>();
  for (size_t c = 0; c < caches.size(); ++c) {
    const at::Tensor& cache = caches[c];
    const hass::CacheGeom& g = geoms[c];
    const int64_t esize = cache.element_size();
    char* base = static_cast<char*>(cache.data_ptr());
    const int64_t rows = g.lead * g.B * g.H;
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      std::vector<char> tmp(m * g.D * esize);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t l, b, h;
        hass::split_row(g, r, &l, &b, &h);
        const int64_t* s = sp + b * m;
        const int64_t n = hass::compact_count(s, m);
        const size_t row_bytes = g.D * esize;
        for (int64_t i = 0; i < n; ++i)  // gather first: sources may overlap destinations
          std::memcpy(tmp.data() + i * row_bytes, base + hass::cache_offset(g, l, b, h, s[i]) * esize, row_bytes);
        for (int64_t i = 0; i < n; ++i)
          std::memcpy(base + hass::cache_offset(g, l, b, h, dp[b] + i) * esize, tmp.data() + i * row_bytes,
                      row_bytes);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) { m.impl("compact_kv", &compact_kv_cpu); }
