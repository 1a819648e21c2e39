// Tree-masked and alignment attention: the math shared by the CPU and CUDA kernels.
//
// Both kernels are flash-style: a query row keeps a running maximum m, a running denominator l and an
// unnormalised output accumulator; key blocks (or single keys) are folded in with online_* below, and
// partial results of disjoint key sets are merged through their log-sum-exp (lse = m + log l).
//
// Tree attention (verification of a token tree): keys [0, prefix_len) are the committed prefix, seen by every
// query; keys [L-n, L) are the n tree nodes, key node j seen by query node i iff bit j of row i of the ancestor
// mask is set. Keys in [prefix_len, L-n) (a right-padded, ragged prefix) are seen by nobody.
//
// Alignment attention (HASS harmonized context alignment, step F): query t sees level-0 keys c <= t-(F-1)
// and, for level i = 1..F-1, the single key c = t-(F-1)+i when c >= 0. The "reference" (leaky) semantics of
// the HASS training code additionally put T-1-t zero logits with zero values into every softmax row, which is
// an online state that starts at m = 0, l = T-1-t instead of m = -inf, l = 0 (align_initial_state).
#pragma once
#include <math.h>

#include "hass/common.h"

namespace hass {

// Largest tree the kernels accept (mask rows are kept as kMaxTreeWords 64-bit words).
constexpr int kMaxTreeNodes = 1024;
constexpr int kMaxTreeWords = kMaxTreeNodes / 64;

// ---- online softmax ---------------------------------------------------------------------------------

// exp(a - b) for a <= b, with exp(-inf - -inf) taken as 0 (an empty state rescales to nothing).
HASS_HD float rescale_factor(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : expf(m_old - m_new);
}

// Probability weight of a score under running maximum m (m is -inf only when the score is -inf too).
HASS_HD float softmax_weight(float s, float m) { return s == -INFINITY ? 0.f : expf(s - m); }

// New running maximum after seeing a block whose maximum is block_max.
HASS_HD float online_max(float m_old, float block_max) { return m_old > block_max ? m_old : block_max; }

// Log-sum-exp of a finished row: -inf for a row that saw no key (its output is defined as 0).
HASS_HD float row_lse(float m, float l) { return l > 0.f ? m + logf(l) : -INFINITY; }

// Merge the partial log-sum-exp values of two disjoint key sets.
HASS_HD float lse_merge(float a, float b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const float mx = a > b ? a : b;
  return mx + logf(expf(a - mx) + expf(b - mx));
}

// Weight of a partial (normalised) output with log-sum-exp `part` inside a merged row with log-sum-exp `total`.
HASS_HD float lse_weight(float part, float total) { return part == -INFINITY ? 0.f : expf(part - total); }

// ---- tree mask bits ---------------------------------------------------------------------------------

HASS_HD int mask_words(int n) { return (n + 63) / 64; }

// Packs one row of a bool [n] ancestor mask into words (bit j of word j/64 = key node j visible).
HASS_HD void mask_pack_row(const bool* row, int n, uint64_t* words) {
  for (int w = 0; w < mask_words(n); ++w) words[w] = 0;
  for (int j = 0; j < n; ++j)
    if (row[j]) words[j >> 6] |= uint64_t(1) << (j & 63);
}

HASS_HD bool mask_bit(const uint64_t* words, int j) { return (words[j >> 6] >> (j & 63)) & 1; }

// Whether key c (of L keys, the last n being tree nodes) is visible to a query whose packed mask row is `words`.
HASS_HD bool tree_key_visible(int64_t c, int64_t prefix_len, int64_t L, int n, const uint64_t* words) {
  const int64_t tree_start = L - n;
  if (c < tree_start) return c < prefix_len;
  return mask_bit(words, static_cast<int>(c - tree_start));
}

// ---- alignment index rule ---------------------------------------------------------------------------

// Last level-0 key visible to query t at alignment step F (negative: none).
HASS_HD int64_t align_level0_last(int64_t t, int F) { return t - (F - 1); }

// The level-i key (i = 1..F-1) visible to query t, or -1 when it would lie before the sequence start.
HASS_HD int64_t align_diag_col(int64_t t, int F, int i) {
  const int64_t c = t - (F - 1) + i;
  return c >= 0 ? c : -1;
}

// The query that sees key c of level i >= 1 (the inverse of align_diag_col), or -1 past the end.
HASS_HD int64_t align_diag_row(int64_t c, int F, int i, int64_t T) {
  const int64_t t = c + (F - 1) - i;
  return t < T ? t : -1;
}

// Initial online-softmax state of row t: empty for the proper masked softmax; for the leaky reference
// semantics, the T-1-t masked-out columns that the reference keeps in its softmax with logit 0.
HASS_HD void align_initial_state(int64_t t, int64_t T, bool leaky, float* m, float* l) {
  if (leaky && T - 1 - t > 0) {
    *m = 0.f;
    *l = static_cast<float>(T - 1 - t);
  } else {
    *m = -INFINITY;
    *l = 0.f;
  }
}

// ---- split-key work partition (CUDA) ----------------------------------------------------------------

// Key tiles [begin, end) of split s when `tiles` key tiles are dealt to `splits` splits as evenly as possible.
HASS_HD void split_range(int tiles, int splits, int s, int* begin, int* end) {
  const int base = tiles / splits, extra = tiles % splits;
  *begin = s * base + (s < extra ? s : extra);
  *end = *begin + base + (s < extra ? 1 : 0);
}

// ---- split plan of tree attention over the prefix (CUDA) ---------------------------------------------
//
// The prefix keys are cut into chunks of tree_chunk_keys() keys, one chunk per split; the tree keys form one
// more split, the last. Splits are merged through their log-sum-exp in split order. The chunk size depends on
// the prefix capacity (L - n, the key count before the tree), the number of (batch, KV head) pairs and the SM
// count only, never on n, so a query row's result does not change with the size of the tree it sits in.

constexpr int kTreeKeyTile = 64;  // keys per shared-memory tile

// Keys per prefix chunk: a multiple of kTreeKeyTile, the smallest that needs at most sms / pairs chunks (one
// wave of CTAs over the SMs), and at least one tile.
HASS_HD int tree_chunk_keys(int64_t prefix_cap, int pairs, int sms) {
  const int64_t target = pairs > 0 && sms / pairs > 1 ? sms / pairs : 1;
  const int64_t tiles = (prefix_cap + kTreeKeyTile - 1) / kTreeKeyTile;
  const int64_t per = (tiles + target - 1) / target;
  return static_cast<int>((per > 0 ? per : 1) * kTreeKeyTile);
}

// Number of chunks that cover `prefix` keys.
HASS_HD int tree_prefix_chunks(int64_t prefix, int chunk) {
  return static_cast<int>((prefix + chunk - 1) / chunk);
}

// ---- rank-order tree attention (CUDA, trees of up to kRankMaxNodes nodes) ----------------------------
//
// The row-invariant path, as on the CPU: a query row's visible keys are numbered by rank (the prefix keys 0 ..
// prefix-1, then the tree keys its mask row shows, in node order), cut into chunks of kRankChunk ranks (one split
// each, merged through their log-sum-exp in chunk order) and, inside a chunk, tiles of kRankTile ranks folded into
// the row's online softmax one after the other. Everything is a function of the row's rank list only, so a tree
// node gets bit for bit what a one-node tree (a decode step) gets over the committed keys, whatever the tree's
// size and the node's place in it.

constexpr int kRankMaxNodes = 128;
constexpr int kRankChunk = 256;
constexpr int kRankTile = 32;  // one key per lane of a warp

// Splits of a rank-order launch: enough chunks for the longest possible rank list (the whole key range L).
HASS_HD int rank_chunks(int64_t L) {
  const int64_t c = (L + kRankChunk - 1) / kRankChunk;
  return static_cast<int>(c > 0 ? c : 1);
}

// ---- kernel parameters (CUDA launch interface) ------------------------------------------------------

enum AttnDtype : int { kAttnF32 = 0, kAttnBF16 = 1, kAttnF16 = 2 };

// A [B, H, S, D] tensor with a contiguous last dim; strides in elements.
struct Strided4 {
  void* p;
  int64_t sb, sh, ss;
};

// A [F, B, H, S, D] tensor (stacked levels) with a contiguous last dim; strides in elements.
struct Strided5 {
  void* p;
  int64_t sl, sb, sh, ss;
};

struct TreeAttnParams {
  Strided4 q, k, v, out;
  const bool* mask;            // [B, n, n] contiguous
  const int64_t* prefix_lens;  // [B] or null (= L - n)
  float* o_part;               // [splits, B*Hq*n, D] partial outputs when splits > 1
  float* lse_part;             // [splits, B*Hq*n]
  int B, Hq, Hkv, n, L, D, splits;
  float scale;
};

struct AlignParams {
  Strided4 q, out, dout, dq;  // out: written by the forward, read by the backward
  Strided5 k, v, dk, dv;
  float* lse;                 // [B, Hq, T] contiguous
  float* delta;               // [B, Hq, T] contiguous, backward workspace (rowsum dO * O)
  int B, Hq, Hkv, T, D, F;
  float scale;
  bool leaky;
};

}  // namespace hass
