// Argument checks shared by every op's CPU and CUDA binding (csrc/checks/<op>.h build on these).
//
// The ops are public (torch.ops.hass.*, torch.compile), so each binding validates every argument before it
// touches memory: a bad call is a one-line error naming the op and the argument, never a crash or garbage.
// Errors are RuntimeError (c10::Error); an op whose Python API documents ValueError sets Op::value_errors.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <string>

namespace hass_check {

struct Op {
  const char* name;
  bool value_errors = false;  // raise ValueError (c10::ValueError) instead of RuntimeError
};

[[noreturn]] inline void fail(const Op& op, const std::string& msg) {
  if (op.value_errors) TORCH_CHECK_VALUE(false, op.name, ": ", msg);
  TORCH_CHECK(false, op.name, ": ", msg);
}

// require(op, cond, message parts...): the message is only built when cond is false.
template <typename... Args>
inline void require(const Op& op, bool ok, const Args&... args) {
  if (C10_UNLIKELY(!ok)) fail(op, c10::str(args...));
}

// describe(t): a tensor's shape, dtype and device for an error message. Formatted only when the message is built
// (inside require's failure branch), so a passing check formats nothing: checks run on every op call.
struct Described {
  const at::Tensor& t;
};
inline std::ostream& operator<<(std::ostream& os, const Described& d) {
  return os << "shape " << d.t.sizes() << ", dtype " << d.t.scalar_type() << ", device " << d.t.device();
}
inline Described describe(const at::Tensor& t) { return {t}; }

// A defined, dense (strided) tensor: every kernel reads strides and raw data pointers.
inline void dense(const Op& op, const char* name, const at::Tensor& t) {
  require(op, t.defined(), name, " is an undefined tensor");
  require(op, t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ", t.layout());
}

inline void dims(const Op& op, const char* name, const at::Tensor& t, int64_t want, const char* shape) {
  dense(op, name, t);
  require(op, t.dim() == want, name, " must be ", shape, ", got ", describe(t));
}

inline void dtype_in(const Op& op, const char* name, const at::Tensor& t, std::initializer_list<at::ScalarType> ok) {
  bool found = false;
  for (const auto s : ok) found = found || t.scalar_type() == s;
  if (C10_LIKELY(found)) return;
  std::string names;
  for (const auto s : ok) {
    names += names.empty() ? "" : " or ";
    names += c10::toString(s);
  }
  fail(op, c10::str(name, " must have dtype ", names, ", got ", describe(t)));
}

inline void dtype_is(const Op& op, const char* name, const at::Tensor& t, at::ScalarType want) {
  dtype_in(op, name, t, {want});
}

// float32, bfloat16 or float16: the element types of every float kernel.
inline void float_dtype(const Op& op, const char* name, const at::Tensor& t) {
  dtype_in(op, name, t, {at::kFloat, at::kBFloat16, at::kHalf});
}

inline void same_device(const Op& op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                        const char* ref_name) {
  require(op, t.device() == ref.device(), name, " must be on ", ref_name, "'s device ", ref.device(), ", got ",
          t.device());
}

inline void shape_is(const Op& op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                     const char* what) {
  require(op, t.sizes() == want, name, " must be ", what, " = ", want, ", got ", describe(t));
}

// dim d of t equals `want` (named want_name in the message).
inline void size_is(const Op& op, const char* name, const at::Tensor& t, int64_t d, int64_t want,
                    const char* want_name) {
  require(op, t.size(d) == want, name, ".shape[", d, "] must be ", want_name, " = ", want, ", got ", describe(t));
}

// A size the CUDA kernels keep in a 32-bit int.
inline void fits_int32(const Op& op, const char* what, int64_t v) {
  require(op, v <= INT32_MAX, what, " = ", v, " exceeds the CUDA kernels' 32-bit limit");
}

inline void finite(const Op& op, const char* name, double v) {
  require(op, std::isfinite(v), name, " must be a finite number, got ", v);
}

// Host copy of a small index/value tensor for value checks (a device-to-host copy for CUDA tensors).
inline at::Tensor host_contiguous(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

}  // namespace hass_check
