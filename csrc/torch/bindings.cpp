// Torch bindings of the Orthrus kernels (module orthrus_ext). They validate every argument (a bad one
// raises ValueError / TypeError naming it), allocate outputs and workspaces with the torch allocator, and
// call the torch-free kernels of orthrus/kernels.h on the CPU or on the current CUDA stream.
//
// Device-side scalars (positions_start, dst_start, cache_len, next_anchor) are 1-element tensors
// on the data's device so that CUDA graphs can replay with new values. On the CPU their values are also
// range-checked here; on CUDA reading them would synchronize (and break graph capture), so the caller
// guarantees their ranges there.

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "orthrus/kernels.h"

#ifdef ORTHRUS_WITH_CUDA
// c10 rather than ATen/cuda: the stream and the device guard are all that is needed, without pulling in
// the cuBLAS / cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using orthrus::DType;
using orthrus::kMaxBlockRows;

// ---- argument checks ------------------------------------------------------------------------------------

// Error messages are assembled here from text, numbers included: on the H100 image of 2026-11-22 (torch
// 2.11+cu130, Python 3.12) formatting a number through std::ostream inside this module (as TORCH_CHECK's
// message arguments are) crashed in libstdc++'s locale code (SIGSEGV in basic_ostream::_M_insert<long>),
// so that a bad argument killed the interpreter instead of raising.
std::string message_piece(const char* text) { return text; }
std::string message_piece(const std::string& text) { return text; }
std::string message_piece(c10::ScalarType type) { return c10::toString(type); }
std::string message_piece(const c10::Device& device) { return device.str(); }
std::string message_piece(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", value);
  return buffer;
}
template <typename Integer, std::enable_if_t<std::is_integral_v<Integer>, int> = 0>
std::string message_piece(Integer value) {
  return std::to_string(value);
}
std::string message_piece(at::IntArrayRef values) {
  std::string text = "[";
  for (size_t i = 0; i < values.size(); ++i) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + "]";
}

template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  std::string text;
  (text += ... += message_piece(pieces));
  return text;
}

#define ORTHRUS_CHECK_VALUE(condition, ...) TORCH_CHECK_VALUE(condition, message(__VA_ARGS__))
#define ORTHRUS_CHECK_TYPE(condition, ...) TORCH_CHECK_TYPE(condition, message(__VA_ARGS__))
#define ORTHRUS_CHECK(condition, ...) TORCH_CHECK(condition, message(__VA_ARGS__))

void check_defined(const at::Tensor& tensor, const char* name) {
  ORTHRUS_CHECK_VALUE(tensor.defined(), name, " must be a tensor, got None");
}

// The device every argument of a call must share; CUDA tensors need a CUDA build.
c10::Device checked_device(const at::Tensor& anchor, const char* name) {
  check_defined(anchor, name);
  const c10::Device device = anchor.device();
#ifdef ORTHRUS_WITH_CUDA
  ORTHRUS_CHECK_VALUE(device.is_cpu() || device.is_cuda(), name, " must be on the CPU or a CUDA device, got ",
                      device);
#else
  ORTHRUS_CHECK_VALUE(device.is_cpu(), name, " is on ", device,
                      " but orthrus_ext was built without CUDA (only CPU tensors are supported)");
#endif
  return device;
}

void check_device(const at::Tensor& tensor, const char* name, c10::Device device) {
  check_defined(tensor, name);
  ORTHRUS_CHECK_VALUE(tensor.device() == device, name, " must be on ", device, " like the other arguments, got ",
                      tensor.device());
}

DType kernel_dtype(const at::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      ORTHRUS_CHECK_TYPE(tensor.device().is_cpu(), name,
                         " is float32, which the CUDA kernels do not support (use float16 or bfloat16)");
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      ORTHRUS_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", tensor.scalar_type());
  }
}

void check_dtype(const at::Tensor& tensor, const char* name, at::ScalarType expected) {
  ORTHRUS_CHECK_TYPE(tensor.scalar_type() == expected, name, " must be ", expected, ", got ",
                     tensor.scalar_type());
}

void check_dim(const at::Tensor& tensor, const char* name, int64_t dims) {
  ORTHRUS_CHECK_VALUE(tensor.dim() == dims, name, " must have ", dims, " dimensions, got shape ", tensor.sizes());
}

void check_size(const at::Tensor& tensor, const char* name, int64_t dim, int64_t expected, const char* what) {
  ORTHRUS_CHECK_VALUE(tensor.size(dim) == expected, name, ".shape[", dim, "] must be ", expected, " (", what,
                      "), got shape ", tensor.sizes());
}

void check_contiguous(const at::Tensor& tensor, const char* name) {
  ORTHRUS_CHECK_VALUE(tensor.is_contiguous(), name, " must be contiguous, got strides ", tensor.strides());
}

void check_rows(int64_t rows, const char* name, const c10::Device& device) {
  ORTHRUS_CHECK_VALUE(rows >= 1, name, " must have at least one row");
  ORTHRUS_CHECK_VALUE(device.is_cpu() || rows <= kMaxBlockRows, name, " has ", rows,
                      " rows; the CUDA kernels take at most ", kMaxBlockRows);
}

// A contiguous [size] tensor on `device` of `dtype`; size_source says where the size comes from.
void check_vector(const at::Tensor& tensor, const char* name, c10::Device device, at::ScalarType dtype, int64_t size,
                  const char* size_source) {
  check_device(tensor, name, device);
  check_dtype(tensor, name, dtype);
  check_dim(tensor, name, 1);
  check_size(tensor, name, 0, size, size_source);
  check_contiguous(tensor, name);
}

// A contiguous [rows, columns] tensor on `device` of `dtype`; the sources say where the sizes come from.
void check_matrix(const at::Tensor& tensor, const char* name, c10::Device device, at::ScalarType dtype, int64_t rows,
                  const char* rows_source, int64_t columns, const char* columns_source) {
  check_device(tensor, name, device);
  check_dtype(tensor, name, dtype);
  check_dim(tensor, name, 2);
  check_size(tensor, name, 0, rows, rows_source);
  check_size(tensor, name, 1, columns, columns_source);
  check_contiguous(tensor, name);
}

// A [rows, ...] tensor whose rows may be strided (views into a fused projection) but whose trailing
// dimensions are packed. Returns the row stride in elements.
int64_t checked_row_stride(const at::Tensor& tensor, const char* name) {
  int64_t packed = 1;
  for (int64_t dim = tensor.dim() - 1; dim >= 1; --dim) {
    ORTHRUS_CHECK_VALUE(tensor.size(dim) == 1 || tensor.stride(dim) == packed, name,
                        " must be contiguous except for its row stride (dim 0), got shape ", tensor.sizes(),
                        " and strides ", tensor.strides());
    packed *= tensor.size(dim);
  }
  if (tensor.size(0) == 1) return packed;  // a single row's stride is never used
  ORTHRUS_CHECK_VALUE(tensor.stride(0) >= packed, name, " rows overlap: stride(0) = ", tensor.stride(0),
                      " is less than the row size ", packed);
  return tensor.stride(0);
}

// The CUDA kernels use 16-byte vector accesses.
void check_cuda_alignment(const at::Tensor& tensor, const char* name, int64_t row_stride) {
  if (!tensor.device().is_cuda()) return;
  const auto address = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  ORTHRUS_CHECK_VALUE(address % 16 == 0 && (row_stride * tensor.element_size()) % 16 == 0, name,
                      " must start on a 16-byte boundary and have rows a multiple of 16 bytes apart");
}

// A 1-element int32 / int64 device scalar.
void check_scalar_tensor(const at::Tensor& tensor, const char* name, at::ScalarType dtype, c10::Device device) {
  check_device(tensor, name, device);
  check_dtype(tensor, name, dtype);
  ORTHRUS_CHECK_VALUE(tensor.numel() == 1, name, " must hold exactly one element, got shape ", tensor.sizes());
}

void check_finite(double value, const char* name) {
  ORTHRUS_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", value);
}

#ifdef ORTHRUS_WITH_CUDA
void check_cuda(cudaError_t status, const char* kernel) {
  ORTHRUS_CHECK(status == cudaSuccess, "orthrus ", kernel, " failed: ", cudaGetErrorString(status));
}

at::Tensor cuda_workspace(size_t bytes, c10::Device device) {
  // From the caching allocator on the current stream: safe to allocate during CUDA graph capture.
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}
#endif

// ---- ops -------------------------------------------------------------------------------------------------

// Whether two tensors may have bytes in common. ATen gives up on strided views; then the byte ranges they
// span decide.
bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  if (status != at::MemOverlapStatus::TooHard) return status != at::MemOverlapStatus::No;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    const auto* first = static_cast<const char*>(t.data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::pair{first, first + (last + 1) * t.element_size()};
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

struct LinearShape {
  DType dtype;
  int64_t rows;
  int64_t in_features;
  int64_t out_features;
  int64_t x_row_stride;
};

// The checks every linear form shares: x [rows, in_features] (any row stride), weight [out, in] packed.
LinearShape checked_linear_arguments(const at::Tensor& x, const at::Tensor& weight, c10::Device device) {
  check_device(weight, "weight", device);
  const DType dtype = kernel_dtype(x, "x");
  check_dtype(weight, "weight", x.scalar_type());
  check_dim(x, "x", 2);
  check_dim(weight, "weight", 2);
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  check_rows(rows, "x", device);
  check_size(weight, "weight", 1, in_features, "in_features = x.shape[1]");
  ORTHRUS_CHECK_VALUE(out_features >= 1 && in_features >= 1, "weight must not be empty, got shape ",
                      weight.sizes());
  check_contiguous(weight, "weight");
  // x may be any row-strided view (the kernel falls back to element copies); w is read 16 bytes at a time.
  const int64_t x_row_stride = checked_row_stride(x, "x");
  check_cuda_alignment(weight, "weight", in_features);
  return {dtype, rows, in_features, out_features, x_row_stride};
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, in_features, out_features, x_row_stride] = checked_linear_arguments(x, weight, device);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (device.is_cpu()) {
    orthrus::linear_cpu(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), y.data_ptr(), rows, out_features,
                        in_features);
    return y;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  const size_t workspace_bytes = orthrus::linear_cuda_workspace_bytes(rows, out_features, in_features);
  at::Tensor workspace = cuda_workspace(workspace_bytes, device);
  check_cuda(orthrus::linear_cuda(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), y.data_ptr(), rows,
                                  out_features, in_features, workspace_bytes ? workspace.data_ptr() : nullptr,
                                  workspace_bytes, c10::cuda::getCurrentCUDAStream()),
             "linear");
#endif
  return y;
}

// A consumer's deferred norm (orthrus/kernels.h): square_sums float32 [rows, ceil(in_features / 64)] as
// linear_add_deferred_norm returns them, or None; the kernels' pointer (null for None).
const float* checked_square_sums(const std::optional<at::Tensor>& square_sums, double norm_eps, int64_t rows,
                                 int64_t in_features, c10::Device device) {
  if (!square_sums.has_value() || !square_sums->defined()) return nullptr;
  const at::Tensor& sums = *square_sums;
  check_device(sums, "square_sums", device);
  check_dtype(sums, "square_sums", at::kFloat);
  check_dim(sums, "square_sums", 2);
  check_size(sums, "square_sums", 0, rows, "x.shape[0]");
  check_size(sums, "square_sums", 1, orthrus::square_sum_columns(in_features), "ceil(x.shape[1] / 64)");
  check_contiguous(sums, "square_sums");
  check_finite(norm_eps, "norm_eps");
  ORTHRUS_CHECK_VALUE(norm_eps >= 0, "norm_eps must be non-negative, got ", norm_eps);
  ORTHRUS_CHECK_VALUE(device.is_cpu() || in_features <= 8192,
                      "the CUDA kernels take square_sums for at most 8192 input features, got ", in_features);
  return sums.data_ptr<float>();
}

// silu_mul(linear(x, weight)) for weight = [gate | up] rows, with a deferred norm's row scale when
// square_sums is given.
at::Tensor linear_silu_mul(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& square_sums,
                           double norm_eps) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, in_features, out_features, x_row_stride] = checked_linear_arguments(x, weight, device);
  ORTHRUS_CHECK_VALUE(out_features % 2 == 0, "weight must have an even number of rows ([gate | up]), got shape ",
                      weight.sizes());
  const float* const sums = checked_square_sums(square_sums, norm_eps, rows, in_features, device);
  const int64_t features = out_features / 2;
  at::Tensor y = at::empty({rows, features}, x.options());
  if (device.is_cpu()) {
    orthrus::linear_silu_mul_cpu(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), y.data_ptr(), rows, features,
                                 in_features, sums, static_cast<float>(norm_eps));
    return y;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::linear_silu_mul_cuda(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), y.data_ptr(), rows,
                                           features, in_features, sums, static_cast<float>(norm_eps),
                                           c10::cuda::getCurrentCUDAStream()),
             "linear_silu_mul");
#endif
  return y;
}

// residual += linear(x, weight) in place; returns (weighted, square_sums): the deferred RMSNorm of the
// updated residual with norm_weight (orthrus/kernels.h), for linear_silu_mul / linear_qk_norm_rope_store.
std::tuple<at::Tensor, at::Tensor> linear_add_deferred_norm(const at::Tensor& x, const at::Tensor& weight,
                                                            at::Tensor& residual, const at::Tensor& norm_weight) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, in_features, out_features, x_row_stride] = checked_linear_arguments(x, weight, device);
  check_matrix(residual, "residual", device, x.scalar_type(), rows, "x.shape[0]", out_features, "weight.shape[0]");
  // Other CTAs may still read x while the residual is written.
  ORTHRUS_CHECK_VALUE(!may_share_memory(residual, x), "residual must not share memory with x");
  check_vector(norm_weight, "norm_weight", device, x.scalar_type(), out_features, "weight.shape[0]");

  at::Tensor weighted = at::empty({rows, out_features}, x.options());
  at::Tensor square_sums =
      at::empty({rows, orthrus::square_sum_columns(out_features)}, x.options().dtype(at::kFloat));
  if (device.is_cpu()) {
    orthrus::linear_add_deferred_norm_cpu(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), residual.data_ptr(),
                                          norm_weight.data_ptr(), weighted.data_ptr(), square_sums.data_ptr<float>(),
                                          rows, out_features, in_features);
    return {weighted, square_sums};
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::linear_add_deferred_norm_cuda(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(),
                                                    residual.data_ptr(), norm_weight.data_ptr(), weighted.data_ptr(),
                                                    square_sums.data_ptr<float>(), rows, out_features, in_features,
                                                    c10::cuda::getCurrentCUDAStream()),
             "linear_add_deferred_norm");
#endif
  return {weighted, square_sums};
}

// linear(x, weight).argmax(-1): int64 [rows]. On CUDA the logits are never written.
at::Tensor linear_argmax(const at::Tensor& x, const at::Tensor& weight) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, in_features, out_features, x_row_stride] = checked_linear_arguments(x, weight, device);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  if (device.is_cpu()) {
    orthrus::linear_argmax_cpu(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), out.data_ptr<int64_t>(), rows,
                               out_features, in_features);
    return out;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  const size_t workspace_bytes = orthrus::linear_argmax_cuda_workspace_bytes(rows, out_features);
  at::Tensor workspace = cuda_workspace(workspace_bytes, device);
  check_cuda(orthrus::linear_argmax_cuda(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(),
                                         out.data_ptr<int64_t>(), rows, out_features, in_features,
                                         workspace.data_ptr(), workspace_bytes, c10::cuda::getCurrentCUDAStream()),
             "linear_argmax");
#endif
  return out;
}

struct NormShape {
  DType dtype;
  int64_t rows;
  int64_t dim;
};

// The norm weight ([dim], the normalised rows' dtype) and eps (finite, non-negative).
void check_norm_weight_and_eps(const at::Tensor& weight, at::ScalarType dtype, int64_t dim, const char* dim_source,
                               double eps, c10::Device device) {
  check_vector(weight, "weight", device, dtype, dim, dim_source);
  check_finite(eps, "eps");
  ORTHRUS_CHECK_VALUE(eps >= 0, "eps must be non-negative, got ", eps);
}

// The checks both norms share: x [rows, dim] and weight [dim] alike, eps finite and non-negative.
NormShape checked_norm_arguments(const at::Tensor& x, const at::Tensor& weight, double eps, c10::Device device) {
  const DType dtype = kernel_dtype(x, "x");
  check_dim(x, "x", 2);
  const int64_t rows = x.size(0), dim = x.size(1);
  check_rows(rows, "x", device);
  ORTHRUS_CHECK_VALUE(dim >= 1, "x must have at least one column");
  check_norm_weight_and_eps(weight, x.scalar_type(), dim, "x.shape[1]", eps, device);
  return {dtype, rows, dim};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, dim] = checked_norm_arguments(x, weight, eps, device);
  const int64_t x_row_stride = checked_row_stride(x, "x");  // unaligned rows take the element-wise path

  at::Tensor y = at::empty({rows, dim}, x.options());
  if (device.is_cpu()) {
    orthrus::rms_norm_cpu(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), y.data_ptr(), rows, dim,
                          static_cast<float>(eps));
    return y;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::rms_norm_cuda(dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), y.data_ptr(), rows,
                                    dim, static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
             "rms_norm");
#endif
  return y;
}

// x is the residual stream, updated in place; returns the normalised rows.
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, dim] = checked_norm_arguments(x, weight, eps, device);
  check_matrix(delta, "delta", device, x.scalar_type(), rows, "x.shape[0]", dim, "x.shape[1]");
  check_contiguous(x, "x");
  ORTHRUS_CHECK_VALUE(!x.is_same(delta), "delta must not be x itself");

  at::Tensor y = at::empty({rows, dim}, x.options());
  if (device.is_cpu()) {
    orthrus::add_rms_norm_cpu(dtype, x.data_ptr(), delta.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, dim,
                              static_cast<float>(eps));
    return y;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::add_rms_norm_cuda(dtype, x.data_ptr(), delta.data_ptr(), weight.data_ptr(), y.data_ptr(), rows,
                                        dim, static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
             "add_rms_norm");
#endif
  return y;
}

// The start of a forward pass: returns (x, y) = (table[tokens], rms_norm(table[tokens])), x being the
// residual stream the layers then update in place.
std::tuple<at::Tensor, at::Tensor> embedding_rms_norm(const at::Tensor& tokens, const at::Tensor& table,
                                                      const at::Tensor& weight, double eps) {
  const c10::Device device = checked_device(tokens, "tokens");
  check_device(table, "table", device);
  check_dtype(tokens, "tokens", at::kLong);
  check_dim(tokens, "tokens", 1);
  check_contiguous(tokens, "tokens");
  const int64_t rows = tokens.size(0);
  check_rows(rows, "tokens", device);
  const DType dtype = kernel_dtype(table, "table");
  check_dim(table, "table", 2);
  check_contiguous(table, "table");
  const int64_t vocab = table.size(0), dim = table.size(1);
  ORTHRUS_CHECK_VALUE(vocab >= 1 && dim >= 1, "table must not be empty, got shape ", table.sizes());
  check_norm_weight_and_eps(weight, table.scalar_type(), dim, "table.shape[1]", eps, device);

  at::Tensor x = at::empty({rows, dim}, table.options());
  at::Tensor y = at::empty({rows, dim}, table.options());
  if (device.is_cpu()) {
    const int64_t* const ids = tokens.data_ptr<int64_t>();
    for (int64_t m = 0; m < rows; ++m) {
      ORTHRUS_CHECK_VALUE(ids[m] >= 0 && ids[m] < vocab, "tokens[", m, "] = ", ids[m],
                          " is outside the table's rows [0, ", vocab, ")");
    }
    orthrus::embedding_rms_norm_cpu(dtype, ids, table.data_ptr(), vocab, weight.data_ptr(), x.data_ptr(),
                                    y.data_ptr(), rows, dim, static_cast<float>(eps));
    return {x, y};
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::embedding_rms_norm_cuda(dtype, tokens.data_ptr<int64_t>(), table.data_ptr(), vocab,
                                              weight.data_ptr(), x.data_ptr(), y.data_ptr(), rows, dim,
                                              static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
             "embedding_rms_norm");
#endif
  return {x, y};
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  const c10::Device device = checked_device(gate_up, "gate_up");
  const DType dtype = kernel_dtype(gate_up, "gate_up");
  check_dim(gate_up, "gate_up", 2);
  const int64_t rows = gate_up.size(0), columns = gate_up.size(1);
  check_rows(rows, "gate_up", device);
  ORTHRUS_CHECK_VALUE(columns >= 2 && columns % 2 == 0, "gate_up must have an even, non-zero number of columns, got ",
                      columns);
  const int64_t row_stride = checked_row_stride(gate_up, "gate_up");
  at::Tensor y = at::empty({rows, columns / 2}, gate_up.options());
  if (device.is_cpu()) {
    orthrus::silu_mul_cpu(dtype, gate_up.data_ptr(), row_stride, y.data_ptr(), rows, columns / 2);
    return y;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::silu_mul_cuda(dtype, gate_up.data_ptr(), row_stride, y.data_ptr(), rows, columns / 2,
                                    c10::cuda::getCurrentCUDAStream()),
             "silu_mul");
#endif
  return y;
}

// Where qk_norm_rope_store's heads go: per-head norm weights, the RoPE table and the k / v destinations
// ([dst_rows, kv_heads, head_dim]), for values of `anchor`'s dtype on `device`.
struct HeadTargets {
  const at::Tensor& q_norm_weight;
  const at::Tensor& k_norm_weight;
  const at::Tensor& rope_cos_sin;
  const at::Tensor& positions_start;
  const at::Tensor& k_dst;
  const at::Tensor& v_dst;
  const at::Tensor& dst_start;
  double eps;
};

void check_head_targets(const HeadTargets& t, const at::Tensor& anchor, const char* anchor_name, int64_t kv_heads,
                        int64_t head_dim, c10::Device device) {
  const std::pair<const at::Tensor*, const char*> same_dtype[] = {{&t.q_norm_weight, "q_norm_weight"},
                                                                 {&t.k_norm_weight, "k_norm_weight"},
                                                                 {&t.k_dst, "k_dst"},
                                                                 {&t.v_dst, "v_dst"}};
  for (const auto& [tensor, name] : same_dtype) {
    check_device(*tensor, name, device);
    ORTHRUS_CHECK_TYPE(tensor->scalar_type() == anchor.scalar_type(), name, " must be ", anchor.scalar_type(),
                       " like ", anchor_name, ", got ", tensor->scalar_type());
  }
  check_device(t.rope_cos_sin, "rope_cos_sin", device);
  check_dtype(t.rope_cos_sin, "rope_cos_sin", at::kFloat);
  check_scalar_tensor(t.positions_start, "positions_start", at::kInt, device);
  check_scalar_tensor(t.dst_start, "dst_start", at::kInt, device);
  for (const auto& [tensor, name] : {std::pair{&t.q_norm_weight, "q_norm_weight"}, {&t.k_norm_weight, "k_norm_weight"}}) {
    check_dim(*tensor, name, 1);
    check_size(*tensor, name, 0, head_dim, "head_dim");
    check_contiguous(*tensor, name);
  }
  check_dim(t.rope_cos_sin, "rope_cos_sin", 2);
  check_size(t.rope_cos_sin, "rope_cos_sin", 1, head_dim, "head_dim: cos in the first half, sin in the second");
  check_contiguous(t.rope_cos_sin, "rope_cos_sin");
  check_dim(t.k_dst, "k_dst", 3);
  check_dim(t.v_dst, "v_dst", 3);
  check_size(t.k_dst, "k_dst", 1, kv_heads, "kv_heads");
  check_size(t.k_dst, "k_dst", 2, head_dim, "head_dim");
  ORTHRUS_CHECK_VALUE(t.v_dst.sizes() == t.k_dst.sizes(), "v_dst must have the shape of k_dst ", t.k_dst.sizes(),
                      ", got ", t.v_dst.sizes());
  check_contiguous(t.k_dst, "k_dst");
  check_contiguous(t.v_dst, "v_dst");
  check_finite(t.eps, "eps");
  ORTHRUS_CHECK_VALUE(t.eps >= 0, "eps must be non-negative, got ", t.eps);
  check_cuda_alignment(t.k_dst, "k_dst", kv_heads * head_dim);
  check_cuda_alignment(t.v_dst, "v_dst", kv_heads * head_dim);
}

// On the CPU the device scalars are host values: the rows they address must exist.
void check_host_positions(const HeadTargets& t, int64_t rows) {
  const int64_t position = t.positions_start.item<int32_t>(), destination = t.dst_start.item<int32_t>();
  ORTHRUS_CHECK_VALUE(position >= 0 && position + rows <= t.rope_cos_sin.size(0), "positions_start = ", position,
                      " with ", rows, " rows is outside rope_cos_sin (", t.rope_cos_sin.size(0), " positions)");
  ORTHRUS_CHECK_VALUE(destination >= 0 && destination + rows <= t.k_dst.size(0), "dst_start = ", destination, " with ",
                      rows, " rows is outside k_dst / v_dst (", t.k_dst.size(0), " rows)");
}

// q, k, v: [rows, heads, head_dim] row-strided views.
at::Tensor qk_norm_rope_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight,
                              const at::Tensor& rope_cos_sin, const at::Tensor& positions_start,
                              const at::Tensor& k_dst, const at::Tensor& v_dst, const at::Tensor& dst_start,
                              double eps) {
  const c10::Device device = checked_device(q, "q");
  const DType dtype = kernel_dtype(q, "q");
  for (const auto& [tensor, name] : {std::pair{&k, "k"}, {&v, "v"}}) {
    check_device(*tensor, name, device);
    check_dtype(*tensor, name, q.scalar_type());
  }
  for (const auto& [tensor, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) check_dim(*tensor, name, 3);
  const int64_t rows = q.size(0), q_heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  check_rows(rows, "q", device);
  ORTHRUS_CHECK_VALUE(q_heads >= 1 && kv_heads >= 1, "q and k need at least one head, got shapes ", q.sizes(),
                      " and ", k.sizes());
  ORTHRUS_CHECK_VALUE(head_dim >= 2 && head_dim % 2 == 0, "q.shape[2] (head_dim) must be even and positive, got ",
                      head_dim);
  check_size(k, "k", 0, rows, "rows = q.shape[0]");
  check_size(k, "k", 2, head_dim, "head_dim = q.shape[2]");
  ORTHRUS_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const HeadTargets targets{q_norm_weight, k_norm_weight, rope_cos_sin, positions_start, k_dst, v_dst, dst_start, eps};
  check_head_targets(targets, q, "q", kv_heads, head_dim, device);
  const int64_t q_row_stride = checked_row_stride(q, "q");
  const int64_t k_row_stride = checked_row_stride(k, "k");
  const int64_t v_row_stride = checked_row_stride(v, "v");
  check_cuda_alignment(q, "q", q_row_stride);
  check_cuda_alignment(k, "k", k_row_stride);
  check_cuda_alignment(v, "v", v_row_stride);

  at::Tensor q_out = at::empty({rows, q_heads, head_dim}, q.options());
  if (device.is_cpu()) {
    check_host_positions(targets, rows);
    orthrus::qk_norm_rope_store_cpu(dtype, q.data_ptr(), q_row_stride, k.data_ptr(), k_row_stride, v.data_ptr(),
                                    v_row_stride, q_norm_weight.data_ptr(), k_norm_weight.data_ptr(),
                                    rope_cos_sin.data_ptr<float>(), positions_start.data_ptr<int32_t>(),
                                    q_out.data_ptr(), k_dst.data_ptr(), v_dst.data_ptr(),
                                    dst_start.data_ptr<int32_t>(), rows, q_heads, kv_heads, head_dim,
                                    static_cast<float>(eps));
    return q_out;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::qk_norm_rope_store_cuda(
                 dtype, q.data_ptr(), q_row_stride, k.data_ptr(), k_row_stride, v.data_ptr(), v_row_stride,
                 q_norm_weight.data_ptr(), k_norm_weight.data_ptr(), rope_cos_sin.data_ptr<float>(),
                 positions_start.data_ptr<int32_t>(), q_out.data_ptr(), k_dst.data_ptr(), v_dst.data_ptr(),
                 dst_start.data_ptr<int32_t>(), rows, q_heads, kv_heads, head_dim, static_cast<float>(eps),
                 c10::cuda::getCurrentCUDAStream()),
             "qk_norm_rope_store");
#endif
  return q_out;
}

// qk_norm_rope_store of the heads of linear(x, weight), weight = the fused [q | k | v] projection; the head
// counts come from k_dst ([dst_rows, kv_heads, head_dim]) and the weight's rows.
at::Tensor linear_qk_norm_rope_store(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& q_norm_weight,
                                     const at::Tensor& k_norm_weight, const at::Tensor& rope_cos_sin,
                                     const at::Tensor& positions_start, const at::Tensor& k_dst,
                                     const at::Tensor& v_dst, const at::Tensor& dst_start, double eps,
                                     const std::optional<at::Tensor>& square_sums, double norm_eps) {
  const c10::Device device = checked_device(x, "x");
  const auto [dtype, rows, in_features, out_features, x_row_stride] = checked_linear_arguments(x, weight, device);
  const float* const sums = checked_square_sums(square_sums, norm_eps, rows, in_features, device);
  check_defined(k_dst, "k_dst");
  check_dim(k_dst, "k_dst", 3);
  const int64_t kv_heads = k_dst.size(1), head_dim = k_dst.size(2);
  ORTHRUS_CHECK_VALUE(kv_heads >= 1 && head_dim >= 2 && head_dim % 2 == 0,
                      "k_dst must be [rows, kv_heads >= 1, even head_dim], got shape ", k_dst.sizes());
  ORTHRUS_CHECK_VALUE(out_features % head_dim == 0 && out_features / head_dim > 2 * kv_heads, "weight has ",
                      out_features, " rows; a fused q | k | v projection of ", kv_heads, " kv heads of ", head_dim,
                      " needs (q_heads + 2 * ", kv_heads, ") * ", head_dim, " rows with q_heads >= 1");
  const int64_t q_heads = out_features / head_dim - 2 * kv_heads;
  ORTHRUS_CHECK_VALUE(device.is_cpu() || head_dim == 64 || head_dim == 128,
                      "the CUDA kernels take head_dim 64 or 128, got ", head_dim);
  const HeadTargets targets{q_norm_weight, k_norm_weight, rope_cos_sin, positions_start, k_dst, v_dst, dst_start, eps};
  check_head_targets(targets, x, "x", kv_heads, head_dim, device);

  at::Tensor q_out = at::empty({rows, q_heads, head_dim}, x.options());
  if (device.is_cpu()) {
    check_host_positions(targets, rows);
    orthrus::linear_qk_norm_rope_store_cpu(
        dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), rows, in_features, q_norm_weight.data_ptr(),
        k_norm_weight.data_ptr(), rope_cos_sin.data_ptr<float>(), positions_start.data_ptr<int32_t>(),
        q_out.data_ptr(), k_dst.data_ptr(), v_dst.data_ptr(), dst_start.data_ptr<int32_t>(), q_heads, kv_heads,
        head_dim, static_cast<float>(eps), sums, static_cast<float>(norm_eps));
    return q_out;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::linear_qk_norm_rope_store_cuda(
                 dtype, x.data_ptr(), x_row_stride, weight.data_ptr(), rows, in_features, q_norm_weight.data_ptr(),
                 k_norm_weight.data_ptr(), rope_cos_sin.data_ptr<float>(), positions_start.data_ptr<int32_t>(),
                 q_out.data_ptr(), k_dst.data_ptr(), v_dst.data_ptr(), dst_start.data_ptr<int32_t>(), q_heads,
                 kv_heads, head_dim, static_cast<float>(eps), sums, static_cast<float>(norm_eps),
                 c10::cuda::getCurrentCUDAStream()),
             "linear_qk_norm_rope_store");
#endif
  return q_out;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& cache_len, const std::optional<at::Tensor>& k_block,
                     const std::optional<at::Tensor>& v_block, bool causal, double scale) {
  const c10::Device device = checked_device(q, "q");
  const DType dtype = kernel_dtype(q, "q");
  for (const auto& [tensor, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_device(*tensor, name, device);
    check_dtype(*tensor, name, q.scalar_type());
  }
  check_scalar_tensor(cache_len, "cache_len", at::kInt, device);
  check_dim(q, "q", 3);
  check_dim(k_cache, "k_cache", 3);
  const int64_t rows = q.size(0), q_heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(1);
  const int64_t cache_rows = k_cache.size(0);
  check_rows(rows, "q", device);
  check_contiguous(q, "q");
  ORTHRUS_CHECK_VALUE(q_heads >= 1 && head_dim >= 1, "q must have heads and head_dim, got shape ", q.sizes());
  ORTHRUS_CHECK_VALUE(device.is_cpu() || head_dim == 64 || head_dim == 128,
                      "q.shape[2] (head_dim) must be 64 or 128 on CUDA, got ", head_dim);
  ORTHRUS_CHECK_VALUE(kv_heads >= 1 && q_heads % kv_heads == 0, "k_cache.shape[1] (kv_heads = ", kv_heads,
                      ") must divide q.shape[1] (q_heads = ", q_heads, ")");
  check_size(k_cache, "k_cache", 2, head_dim, "head_dim = q.shape[2]");
  ORTHRUS_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ",
                      k_cache.sizes(), ", got ", v_cache.sizes());
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  check_finite(scale, "scale");
  check_cuda_alignment(q, "q", q_heads * head_dim);
  check_cuda_alignment(k_cache, "k_cache", kv_heads * head_dim);
  check_cuda_alignment(v_cache, "v_cache", kv_heads * head_dim);

  const void* k_block_data = nullptr;
  const void* v_block_data = nullptr;
  if (causal) {
    ORTHRUS_CHECK_VALUE(!k_block.has_value() && !v_block.has_value(),
                        "k_block and v_block must be None when causal=True (the block's keys are read from the "
                        "cache at rows [cache_len, cache_len + rows))");
  } else {
    ORTHRUS_CHECK_VALUE(k_block.has_value() && v_block.has_value(),
                        "k_block and v_block are required when causal=False");
    for (const auto& [tensor, name] : {std::pair{&*k_block, "k_block"}, {&*v_block, "v_block"}}) {
      check_device(*tensor, name, device);
      check_dtype(*tensor, name, q.scalar_type());
      check_dim(*tensor, name, 3);
      check_size(*tensor, name, 0, rows, "rows = q.shape[0]");
      check_size(*tensor, name, 1, kv_heads, "kv_heads = k_cache.shape[1]");
      check_size(*tensor, name, 2, head_dim, "head_dim = q.shape[2]");
      check_contiguous(*tensor, name);
      check_cuda_alignment(*tensor, name, kv_heads * head_dim);
    }
    k_block_data = k_block->data_ptr();
    v_block_data = v_block->data_ptr();
  }

  at::Tensor out = at::empty({rows, q_heads, head_dim}, q.options());
  if (device.is_cpu()) {
    const int64_t length = cache_len.item<int32_t>();
    const int64_t needed = causal ? length + rows : length;
    ORTHRUS_CHECK_VALUE(length >= 0 && needed <= cache_rows, "cache_len = ", length, " with ", rows,
                        causal ? " block rows stored in the cache" : " cached rows", " exceeds k_cache (",
                        cache_rows, " rows)");
    orthrus::attention_cpu(dtype, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           cache_len.data_ptr<int32_t>(), k_block_data, v_block_data, out.data_ptr(), rows,
                           q_heads, kv_heads, head_dim, causal, static_cast<float>(scale));
    return out;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  // The keys a row may see never exceed the cache plus (bidirectional) the block.
  const int64_t max_keys = causal ? cache_rows : cache_rows + rows;
  const size_t workspace_bytes = orthrus::attention_cuda_workspace_bytes(rows, q_heads, kv_heads, head_dim, max_keys);
  at::Tensor workspace = cuda_workspace(workspace_bytes, device);
  check_cuda(orthrus::attention_cuda(dtype, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                     cache_len.data_ptr<int32_t>(), k_block_data, v_block_data, out.data_ptr(),
                                     rows, q_heads, kv_heads, head_dim, causal, static_cast<float>(scale),
                                     max_keys, workspace_bytes ? workspace.data_ptr() : nullptr, workspace_bytes,
                                     c10::cuda::getCurrentCUDAStream()),
             "attention");
#endif
  return out;
}

void accept(const at::Tensor& drafts, const at::Tensor& targets, const at::Tensor& cache_len,
            const at::Tensor& emitted, const at::Tensor& next_anchor) {
  const c10::Device device = checked_device(targets, "targets");
  check_device(drafts, "drafts", device);
  check_dtype(targets, "targets", at::kLong);
  check_dtype(drafts, "drafts", at::kLong);
  check_dim(targets, "targets", 1);
  check_dim(drafts, "drafts", 1);
  const int64_t rows = targets.size(0);
  check_rows(rows, "targets", device);
  check_size(drafts, "drafts", 0, rows - 1, "targets.shape[0] - 1");
  check_contiguous(targets, "targets");
  check_contiguous(drafts, "drafts");
  check_scalar_tensor(cache_len, "cache_len", at::kInt, device);
  check_device(emitted, "emitted", device);
  check_dtype(emitted, "emitted", at::kLong);
  check_dim(emitted, "emitted", 1);
  check_size(emitted, "emitted", 0, rows + 1, "targets.shape[0] + 1 (the count, then the tokens)");
  check_contiguous(emitted, "emitted");
  // The kernel reads drafts and targets while it writes emitted.
  for (const auto& [input, name] : {std::pair{&drafts, "drafts"}, std::pair{&targets, "targets"}}) {
    ORTHRUS_CHECK_VALUE(at::get_overlap_status(emitted, *input) == at::MemOverlapStatus::No,
                        "emitted must not share memory with ", name);
  }
  check_scalar_tensor(next_anchor, "next_anchor", at::kLong, device);

  if (device.is_cpu()) {
    orthrus::accept_cpu(drafts.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), rows,
                        cache_len.data_ptr<int32_t>(), emitted.data_ptr<int64_t>(), next_anchor.data_ptr<int64_t>());
    return;
  }
#ifdef ORTHRUS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(orthrus::accept_cuda(drafts.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), rows,
                                  cache_len.data_ptr<int32_t>(), emitted.data_ptr<int64_t>(),
                                  next_anchor.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
             "accept");
#endif
}

bool has_cuda() {
#ifdef ORTHRUS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CPU kernels share torch's intra-op thread pool instead of starting their own.
void torch_parallel_for(int64_t count, int64_t grain, void* context, orthrus::CpuParallelBody body) {
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) { body(context, begin, end); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  orthrus::set_cpu_parallel_for(&torch_parallel_for);
  module.doc() = "Orthrus row-invariant decode kernels (CPU and CUDA)";
  namespace py = pybind11;
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  module.def("linear", &linear, "y = x @ weight.T with fp32 accumulation, row-invariant", py::arg("x"),
             py::arg("weight"), release_gil);
  module.def("linear_argmax", &linear_argmax,
             "linear(x, weight).argmax(-1) (int64, torch.argmax's ties and NaN), bit for bit, without writing the "
             "logits on CUDA",
             py::arg("x"), py::arg("weight"), release_gil);
  module.def("rms_norm", &rms_norm, "RMSNorm of each row of x", py::arg("x"), py::arg("weight"), py::arg("eps"),
             release_gil);
  module.def("embedding_rms_norm", &embedding_rms_norm,
             "(x, y) = (table[tokens], RMSNorm of those rows): the residual stream's start and the first norm",
             py::arg("tokens"), py::arg("table"), py::arg("weight"), py::arg("eps"), release_gil);
  module.def("add_rms_norm", &add_rms_norm, "x += delta in place, then RMSNorm of each row of x",
             py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"), release_gil);
  module.def("silu_mul", &silu_mul, "SwiGLU of [gate | up] rows: silu(gate) * up", py::arg("gate_up"),
             release_gil);
  module.def("linear_silu_mul", &linear_silu_mul,
             "silu_mul(linear(x, weight)) for weight = [gate | up] rows, bit for bit, in one kernel on CUDA; with "
             "square_sums, each row's sums are scaled by the deferred norm first",
             py::arg("x"), py::arg("weight"), py::arg("square_sums") = py::none(), py::arg("norm_eps") = 0.0,
             release_gil);
  module.def("linear_add_deferred_norm", &linear_add_deferred_norm,
             "residual += linear(x, weight) in place; returns (residual * norm_weight, per-64-column sums of "
             "squares of residual): the next RMSNorm, left for linear_silu_mul / linear_qk_norm_rope_store to scale",
             py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("norm_weight"), release_gil);
  module.def("linear_qk_norm_rope_store", &linear_qk_norm_rope_store,
             "qk_norm_rope_store of the q | k | v heads of linear(x, weight), bit for bit, in one kernel on CUDA; "
             "returns q",
             py::arg("x"), py::arg("weight"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
             py::arg("rope_cos_sin"), py::arg("positions_start"), py::arg("k_dst"), py::arg("v_dst"),
             py::arg("dst_start"), py::arg("eps"), py::arg("square_sums") = py::none(), py::arg("norm_eps") = 0.0,
             release_gil);
  module.def("qk_norm_rope_store", &qk_norm_rope_store,
             "Per-head RMSNorm + RoPE of q and k; stores k and v at rows dst_start.. of k_dst / v_dst; returns q",
             py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
             py::arg("rope_cos_sin"), py::arg("positions_start"), py::arg("k_dst"), py::arg("v_dst"),
             py::arg("dst_start"), py::arg("eps"), release_gil);
  module.def("attention", &attention,
             "Row-invariant attention of a block over the KV cache (causal) or cache + block (bidirectional)",
             py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_len"),
             py::arg("k_block").none(true), py::arg("v_block").none(true), py::arg("causal"), py::arg("scale"),
             release_gil);
  module.def("accept", &accept,
             "Longest accepted draft prefix: writes emitted = [count, tokens...] and next_anchor, and advances "
             "cache_len, in place",
             py::arg("drafts"), py::arg("targets"), py::arg("cache_len"), py::arg("emitted"),
             py::arg("next_anchor"), release_gil);
  module.def("has_cuda", &has_cuda, "Whether this build contains the CUDA kernels");
}
