// The tree-attention kernel for Hopper (bf16/fp16, head dim 64 or 128): see tree_attention_sm90.cu.
#pragma once
#include <cuda_runtime.h>

#include "hass/attention.h"

namespace hass {
namespace cuda {

// Whether tree_attention_sm90 covers this dtype (hass::AttnDtype) and head dim.
bool tree_attention_sm90_covers(int dtype, int D);

// Partial attention of every split of the plan in hass/attention.h (p.splits = prefix chunks of `chunk` keys + 1
// tree split): with p.splits > 1 into p.o_part / p.lse_part (merged by the caller), else straight into p.out.
cudaError_t tree_attention_sm90(const TreeAttnParams& p, int dtype, int chunk, cudaStream_t stream);

}  // namespace cuda
}  // namespace hass
