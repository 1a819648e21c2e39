// Argument checks of hass::compact_kv, shared by the CPU and CUDA bindings, and the cache geometry both pass to
// their kernels. Every check, the slot values included, runs before the first row moves: a rejected call leaves
// every cache untouched.
#pragma once
#include <ATen/MemoryOverlap.h>

#include <string>
#include <vector>

#include "checks/args.h"
#include "hass/compact_kv.h"

namespace hass_check {

// Geometry of a cache [B,H,S,D] or [lead,B,H,S,D] (checked by compact_kv_args).
inline hass::CacheGeom cache_geom(const at::Tensor& t) {
  const int64_t o = t.dim() - 4;
  hass::CacheGeom g;
  g.lead = o ? t.size(0) : 1;
  g.s_lead = o ? t.stride(0) : 0;
  g.B = t.size(o); g.H = t.size(o + 1); g.S = t.size(o + 2); g.D = t.size(o + 3);
  g.s_b = t.stride(o); g.s_h = t.stride(o + 1); g.s_s = t.stride(o + 2);
  return g;
}

// caches: one device, each [B,H,S,D] or [lead,B,H,S,D] float with a contiguous last dim, none overlapping itself
// or another (where ATen can tell: strided views of one buffer, e.g. the K and V halves of a stacked cache, are
// accepted as they are); src_slots int64 [B,m]; dst_start int64 [B]. Returns each cache's geometry.
inline std::vector<hass::CacheGeom> compact_kv_args(at::TensorList caches, const at::Tensor& src_slots,
                                                    const at::Tensor& dst_start) {
  const Op op{"compact_kv"};
  require(op, !caches.empty(), "caches is empty");
  dims(op, "src_slots", src_slots, 2, "int64 [B, m]");
  dtype_is(op, "src_slots", src_slots, at::kLong);
  const int64_t B = src_slots.size(0);
  dims(op, "dst_start", dst_start, 1, "int64 [B]");
  dtype_is(op, "dst_start", dst_start, at::kLong);
  shape_is(op, "dst_start", dst_start, {B}, "[B] (one entry per row of src_slots)");
  same_device(op, "dst_start", dst_start, src_slots, "src_slots");
  std::vector<hass::CacheGeom> geoms;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    const std::string name = "caches[" + std::to_string(i) + "]";  // no stream formatting on the hot path
    dense(op, name.c_str(), c);
    require(op, c.dim() == 4 || c.dim() == 5, name, " must be [B, H, S, D] or [lead, B, H, S, D], got ",
            describe(c));
    require(op, c.is_floating_point(), name, " must be a floating-point tensor, got ", describe(c));
    same_device(op, name.c_str(), c, src_slots, "src_slots");
    require(op, c.stride(-1) == 1, name, " must be contiguous in its last dim, got strides ",
            c.strides());
    require(op, c.size(c.dim() - 4) == B, name, " has batch ", c.size(c.dim() - 4), " but src_slots has ", B,
            " rows (", describe(c), ")");
    require(op, at::has_internal_overlap(c) != at::MemOverlap::Yes, name,
            " has elements sharing memory (e.g. an expanded tensor); it is written in place");
    for (size_t j = 0; j < i; ++j) {
      const auto o = at::get_overlap_status(caches[j], c);
      require(op, o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial, name,
              " shares memory with caches[", j, "]: each cache is compacted once, in place");
    }
    geoms.push_back(cache_geom(c));
  }
  return geoms;
}

// Slot values, before any move: src_slots[b] holds slots in [0, S) then only -1 padding, and dst_start[b] plus
// the valid entries stays inside [0, S), for the smallest S of the caches. src/dst: host (CPU) tensors.
inline void compact_kv_values(const at::Tensor& src, const at::Tensor& dst, const std::vector<hass::CacheGeom>& g) {
  const Op op{"compact_kv"};
  int64_t S = g.front().S;
  for (const auto& x : g) S = x.S < S ? x.S : S;
  const at::Tensor s = src.contiguous(), d = dst.contiguous();
  const int64_t B = s.size(0), m = s.size(1);
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* dp = d.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < m; ++i)
      require(op, sp[b * m + i] >= -1, "src_slots[", b, ", ", i, "] = ", sp[b * m + i],
              ": slots must be >= 0, or -1 for padding");
    require(op, hass::compact_check_row(sp + b * m, m, dp[b], S) == hass::kOk, "src_slots/dst_start of batch row ",
            b, " address slots outside [0, ", S, ") (or a valid slot follows -1 padding); no cache was changed");
  }
}

}  // namespace hass_check
