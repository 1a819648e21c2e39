// The operator schemas of the hass library (torch.ops.hass.*) and the Python module hass_ext._C.
// Kernels register themselves per device: csrc/cpu/*.cpp for CPU, csrc/cuda_ops.cpp for CUDA.
// The module is deliberately not a pybind11 module: importing it only loads the registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(hass, m) {
  // Move the accepted entries of every cache into contiguous slots, in place.
  // caches: tensors [B,H,S,D] or [lead,B,H,S,D]; src_slots [B,m] int64 (-1 pads); dst_start [B] int64.
  m.def("compact_kv(Tensor(a!)[] caches, Tensor src_slots, Tensor dst_start) -> ()");
  // Tree-masked attention of n tree-node queries over [prefix ++ tree] keys (csrc/include/hass/attention.h).
  // q [B,Hq,n,d]; k, v [B,Hkv,L,d] (tree nodes last); tree_mask [B,n,n] bool; prefix_lens [B] int64 or None.
  m.def("tree_attention(Tensor q, Tensor k, Tensor v, Tensor tree_mask, Tensor? prefix_lens, float scale) -> Tensor");
  // HASS alignment attention at step F = k_levels.size(0): q [B,Hq,T,d]; k_levels, v_levels [F,B,Hkv,T,d].
  // Returns (out [B,Hq,T,d], lse [B,Hq,T] fp32); leaky selects the HASS reference's leaky softmax.
  m.def("align_attention(Tensor q, Tensor k_levels, Tensor v_levels, float scale, bool leaky) -> (Tensor, Tensor)");
  m.def("align_attention_backward(Tensor grad_out, Tensor q, Tensor k_levels, Tensor v_levels, Tensor out, "
        "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "hass_ext compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
