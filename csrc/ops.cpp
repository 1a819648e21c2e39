// The operator schemas of the hass library (torch.ops.hass.*) and the Python module hass_ext._C.
// Kernels register themselves per device: csrc/cpu/*.cpp for CPU, csrc/cuda_ops.cpp for CUDA.
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
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "hass_ext compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
