// The operator schemas of the hass library (torch.ops.hass.*) and the Python module hass_ext._C.
// Kernels register themselves per device: csrc/cpu/*.cpp for CPU, csrc/cuda/*_ops.cpp for CUDA; both validate
// every argument through the one check function of each op in csrc/checks/<op>.h.
// The module is deliberately not a pybind11 module: importing it only loads the registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(hass, m) {
  // Move the accepted entries of every cache into contiguous slots, in place.
  // caches: tensors [B,H,S,D] or [lead,B,H,S,D]; src_slots [B,m] int64 (-1 pads); dst_start [B] int64.
  m.def("compact_kv(Tensor(a!)[] caches, Tensor src_slots, Tensor dst_start) -> ()");
  // Tree verification / rejection sampling (hass/verify_tree.h). uniforms [B,n] float32, when given, replace
  // the generator's stream (u[:,c] decides child node c, u[:,0] draws the final token).
  m.def("verify_tree(Tensor target_logits, Tensor draft_tokens, Tensor parents, float temperature=0.0, "
        "float top_p=1.0, int top_k=0, Tensor? uniforms=None, Generator? generator=None) -> (Tensor, Tensor, Tensor)");
  // Tree-masked attention of n tree-node queries over [prefix ++ tree] keys (csrc/include/hass/attention.h).
  // q [B,Hq,n,d]; k, v [B,Hkv,L,d] (tree nodes last); tree_mask [B,n,n] bool; prefix_lens [B] int64 or None.
  m.def("tree_attention(Tensor q, Tensor k, Tensor v, Tensor tree_mask, Tensor? prefix_lens, float scale) -> Tensor");
  // HASS alignment attention at step F = k_levels.size(0): q [B,Hq,T,d]; k_levels, v_levels [F,B,Hkv,T,d].
  // Returns (out [B,Hq,T,d], lse [B,Hq,T] fp32); leaky selects the HASS reference's leaky softmax.
  m.def("align_attention(Tensor q, Tensor k_levels, Tensor v_levels, float scale, bool leaky) -> (Tensor, Tensor)");
  m.def("align_attention_backward(Tensor grad_out, Tensor q, Tensor k_levels, Tensor v_levels, Tensor out, "
        "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  // HASS top-K ranking distillation loss (csrc/include/hass/distill_loss.h). draft/target logits [N,V]
  // (float32/bfloat16/float16), loss_mask float32 [N]. Returns the scalar losses ce and topk, plus what the
  // backward pass needs: row_stats float32 [N,5] = (draft max, draft log-sum, target max, target log-sum,
  // P_K) and topk_idx int64 [N,K] (masked rows: zeros and -1; they are never read).
  m.def("distill_loss(Tensor draft_logits, Tensor target_logits, Tensor loss_mask, int topk) -> "
        "(Tensor ce, Tensor topk_loss, Tensor row_stats, Tensor topk_idx)");
  // Gradient of grad_ce * ce + grad_topk * topk w.r.t. draft_logits (grad_* are 0-dim float32 tensors).
  m.def("distill_loss_backward(Tensor grad_ce, Tensor grad_topk, Tensor draft_logits, Tensor target_logits, "
        "Tensor loss_mask, Tensor row_stats, Tensor topk_idx) -> Tensor");
  // One vocabulary chunk of an online softmax: logits [N,C] are columns col0..col0+C of the full rows.
  // state float32 [N,2] = (running max, sum exp(x - max)); topk_val/topk_idx [N,K] a running top-K of the
  // logits (K may be 0; empty slots -inf/-1). Returns exp(logits - new max) (empty unless want_exp), the
  // rescale factor alpha [N] = exp(old max - new max) for accumulators, and the updated state and top-K.
  // y = x @ weight.T + bias for a few rows x (decode steps, tree verification) on CPUs, fp32
  // (csrc/include/hass/small_linear.h): each weight row streamed once for all rows; a row's result does not depend
  // on the other rows. x [..., K], weight [N, K], bias [N] or None -> [..., N].
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // small_linear for bf16/fp16 x and weight of one dtype, K % 8 == 0, on tensor cores on CUDA (mma with fp32
  // accumulation in an order fixed by N and K: still row-invariant); on the CPU it is small_linear.
  m.def("small_linear_tc(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("online_softmax_chunk(Tensor logits, Tensor state, Tensor topk_val, Tensor topk_idx, int col0, "
        "bool want_exp) -> (Tensor exp, Tensor alpha, Tensor new_state, Tensor new_topk_val, Tensor new_topk_idx)");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "hass_ext compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
