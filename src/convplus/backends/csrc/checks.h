// Argument checks of the kernel entry points. Every failed check raises c10::Error (a RuntimeError in Python)
// whose message names the entry point and the argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string_view>
#include <vector>

namespace convplus::detail {

// The checks of one call of the entry point ``function``.
class ArgumentChecks {
 public:
  explicit ArgumentChecks(const char* function) : function_(function) {}

  // Raises with the message "<function>: <message...>" unless ok.
  template <typename... Message>
  void require(bool ok, const Message&... message) const {
    TORCH_CHECK(ok, function_, ": ", message...);
  }

  // name: a CPU tensor of dtype float32 or float64, the dtype every other floating argument must have; contiguous
  // unless any_strides.
  void floating(const char* name, const at::Tensor& t, bool any_strides = false) const {
    on_cpu(name, t);
    const auto dtype = t.scalar_type();
    require(dtype == at::kFloat || dtype == at::kDouble, name, " must have dtype float32 or float64, got ",
            dtype_name(t));
    if (!any_strides) contiguous(name, t);
  }

  // name: a CPU tensor of the dtype of the tensor reference (named reference_name); contiguous unless any_strides.
  void like(const char* name, const at::Tensor& t, const char* reference_name, const at::Tensor& reference,
            bool any_strides = false) const {
    on_cpu(name, t);
    require(t.scalar_type() == reference.scalar_type(), name, " must have dtype ", dtype_name(reference),
            " (that of ", reference_name, "), got ", dtype_name(t));
    if (!any_strides) contiguous(name, t);
  }

  // name: a contiguous CPU int64 tensor.
  void index(const char* name, const at::Tensor& t) const {
    on_cpu(name, t);
    require(t.scalar_type() == at::kLong, name, " must have dtype int64, got ", dtype_name(t));
    contiguous(name, t);
  }

  // name has `dims` dims, described by layout, e.g. "(BK, D, T, H, X)".
  void rank(const char* name, const at::Tensor& t, int64_t dims, const char* layout) const {
    require(t.dim() == dims, name, " must be a ", dims, "-d tensor ", layout, ", got shape ", t.sizes());
  }

  // name has exactly the sizes `shape`, described by layout.
  void shape(const char* name, const at::Tensor& t, const std::vector<int64_t>& shape, const char* layout) const {
    require(t.sizes() == c10::IntArrayRef(shape), name, " must have shape ", layout, " = ", c10::IntArrayRef(shape),
            ", got ", t.sizes());
  }

 private:
  static std::string_view dtype_name(const at::Tensor& t) { return c10::getDtypeNames(t.scalar_type()).first; }

  void on_cpu(const char* name, const at::Tensor& t) const {
    require(t.device().is_cpu() && t.layout() == at::kStrided, name, " must be a dense CPU tensor, got a ",
            t.layout(), " tensor on ", t.device());
  }

  void contiguous(const char* name, const at::Tensor& t) const {
    require(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
  }

  const char* function_;
};

}  // namespace convplus::detail
