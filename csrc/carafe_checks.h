// Argument checks of the carafe_kernels ops, shared by the CPU and CUDA glue (the kernels themselves
// are torch-free and include only carafe_common.h). The Python side of the same contract is
// carafe_kernels/contract.py: the same limits (tests/test_registry.py compares them through the
// _native_limits op). Direct torch.ops calls skip the Python validation, so every shape the kernels
// index with is checked here.
//
// Written against PyTorch's stable ABI (torch/csrc/stable, torch/headeronly; docs/design.md#the-build):
// no at::/c10:: library calls. What that costs: the stable ABI has no c10::ValueError/TypeError, a
// kernel can only throw standard C++ exceptions, and torch's Python binding maps std::invalid_argument
// to ValueError and no standard exception to TypeError. So every failed check here, a wrong dtype too,
// is a ValueError whose message names the argument; the Python entry points (carafe_kernels.functional
// and the fake kernels, contract.py) raise TypeError for a dtype before the op is reached.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/DeviceType.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "carafe_common.h"

namespace carafe {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Formatting of the values the messages show, as torch prints them: [1, 9, 6, 6], cuda:0, float32.
struct Sizes {
  std::vector<int64_t> v;
};
inline Sizes sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return Sizes{std::vector<int64_t>(s.begin(), s.end())};
}
inline std::ostream& operator<<(std::ostream& os, const Sizes& s) {
  os << '[';
  for (size_t i = 0; i < s.v.size(); ++i) os << (i ? ", " : "") << s.v[i];
  return os << ']';
}

struct DeviceName {
  torch::headeronly::DeviceType type;
  int32_t index;
};
inline DeviceName device_of(const Tensor& t) {
  const auto d = t.device();
  return DeviceName{d.type(), d.index()};
}
inline std::ostream& operator<<(std::ostream& os, const DeviceName& d) {
  switch (d.type) {
    case torch::headeronly::DeviceType::CPU: os << "cpu"; break;
    case torch::headeronly::DeviceType::CUDA: os << "cuda"; break;
    default: os << "device type " << static_cast<int>(d.type); break;
  }
  if (d.index >= 0) os << ':' << d.index;
  return os;
}
inline bool operator==(const DeviceName& a, const DeviceName& b) { return a.type == b.type && a.index == b.index; }

struct DtypeName {
  ScalarType t;
};
inline std::ostream& operator<<(std::ostream& os, const DtypeName& d) {
  switch (d.t) {
    case ScalarType::Float: return os << "float32";
    case ScalarType::Double: return os << "float64";
    case ScalarType::Half: return os << "float16";
    case ScalarType::BFloat16: return os << "bfloat16";
    default: return os << torch::headeronly::toString(d.t);
  }
}

// Throws std::invalid_argument (a ValueError in Python) with the parts of the message concatenated.
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}
#define CARAFE_CHECK(cond, ...) \
  do {                          \
    if (!(cond)) ::carafe::fail(__VA_ARGS__); \
  } while (0)

inline bool supported_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// The product of `factors`, or a ValueError naming `op` when it overflows int64.
inline int64_t checked_mul(const char* op, std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t f : factors) CARAFE_CHECK(!__builtin_mul_overflow(product, f, &product), op,
                                         ": shape arithmetic overflows int64");
  return product;
}

// Checks features and masks (mask_logits when `fused`) of one call on `device` against the contract
// (docs/design.md#the-contract) and the native limits; returns the call's Shape. `down`: the
// content-aware downsampling ops, whose masks and logits alike are (N, G*k*k, ceil(H/s), ceil(W/s)).
inline Shape check_inputs(const char* op, torch::headeronly::DeviceType device, const Tensor& features,
                          const Tensor& masks, bool fused, int64_t k, int64_t G, int64_t s, bool down = false) {
  const char* masks_name = fused ? "mask_logits" : "masks";
  const char* device_name = device == torch::headeronly::DeviceType::CUDA ? "cuda" : "cpu";
  CARAFE_CHECK(features.dim() == 4, op, ": features must be 4-D (N, C, H, W), got shape ", sizes_of(features));
  CARAFE_CHECK(masks.dim() == 4, op, ": ", masks_name, " must be 4-D, got shape ", sizes_of(masks));
  CARAFE_CHECK(features.device().type() == device && device_of(masks) == device_of(features), op, ": the ",
               device_name, " kernels need features and ", masks_name, " on the same ", device_name,
               " device, got ", device_of(features), " and ", device_of(masks));
  const ScalarType dtype = features.scalar_type();
  CARAFE_CHECK(supported_dtype(dtype), op, ": features must be float32, float64, float16 or bfloat16, got ",
               DtypeName{dtype});
  CARAFE_CHECK(masks.scalar_type() == dtype, op, ": features and ", masks_name, " must have the same dtype, got ",
               DtypeName{dtype}, " and ", DtypeName{masks.scalar_type()});
  CARAFE_CHECK(k >= 1 && k % 2 == 1 && k <= kMaxKernelSize, op, ": kernel_size must be odd and in [1, ",
               kMaxKernelSize, "] for the native kernels, got ", k);
  CARAFE_CHECK(s >= 1 && s <= kMaxScaleFactor, op, ": scale_factor must be in [1, ", kMaxScaleFactor,
               "] for the native kernels, got ", s);
  const int64_t N = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  CARAFE_CHECK(G >= 1 && C % G == 0, op, ": group_size=", G, " must be >= 1 and divide the channels of features ",
               sizes_of(features));
  const Shape p{N, C, H, W, k, G, s};
  const Sizes expected{down    ? std::vector<int64_t>{N, checked_mul(op, {G, k, k}), p.down_H(), p.down_W()}
                       : fused ? std::vector<int64_t>{N, checked_mul(op, {G, k, k, s, s}), H, W}
                               : std::vector<int64_t>{N, checked_mul(op, {G, k, k}), checked_mul(op, {H, s}),
                                                      checked_mul(op, {W, s})}};
  CARAFE_CHECK(sizes_of(masks).v == expected.v, op, ": ", masks_name, " must have shape ", expected,
               down ? " (N, G*k*k, ceil(H/s), ceil(W/s))" : fused ? " (N, G*k*k*s*s, H, W)" : " (N, G*k*k, H*s, W*s)",
               " for features ", sizes_of(features), ", kernel_size=", k, ", group_size=", G, ", scale_factor=", s,
               "; got ", sizes_of(masks));
  if (!down) checked_mul(op, {N, C, H, s, W, s});  // the output's element count (the down output is smaller)
  return p;
}

// grad_output of a backward op: the output's shape (N, C, H*s, W*s), or (N, C, ceil(H/s), ceil(W/s))
// when `down`, dtype and device.
inline void check_grad_output(const char* op, const Tensor& grad_output, const Tensor& features, const Shape& p,
                              bool down = false) {
  CARAFE_CHECK(device_of(grad_output) == device_of(features), op, ": grad_output must be on ", device_of(features),
               ", got ", device_of(grad_output));
  CARAFE_CHECK(grad_output.scalar_type() == features.scalar_type(), op, ": grad_output must have the dtype of ",
               "features (", DtypeName{features.scalar_type()}, "), got ", DtypeName{grad_output.scalar_type()});
  const Sizes expected{down ? std::vector<int64_t>{p.N, p.C, p.down_H(), p.down_W()}
                            : std::vector<int64_t>{p.N, p.C, p.Ho(), p.Wo()}};
  CARAFE_CHECK(sizes_of(grad_output).v == expected.v, op, ": grad_output must have the output's shape ",
               down ? "(N, C, ceil(H/s), ceil(W/s))" : "(N, C, H*s, W*s)", " = ", expected, ", got ",
               sizes_of(grad_output));
}

// output_mask of a backward op (bool[2]: grad_features, grad_masks; ATen's convolution_backward style).
// The schema's [2] is not enforced by the dispatcher for every caller, so the length is checked here.
struct OutputMask {
  bool features;
  bool masks;
};
inline OutputMask check_output_mask(const char* op, const std::vector<bool>& output_mask) {
  CARAFE_CHECK(output_mask.size() == 2, op, ": output_mask must have 2 elements (grad_features, grad_masks), got ",
               output_mask.size());
  return {output_mask[0], output_mask[1]};
}

// Tensors for the glue (CPU and CUDA): a new contiguous NCHW tensor of `sizes` on the device of
// `like`, in its dtype unless `dtype` is given; and `t` made contiguous. The latter asks
// is_contiguous() first (one shim call) because torch::stable::contiguous goes through the boxed
// dispatcher even when it has nothing to do.
inline Tensor empty_nchw(const Tensor& like, const std::vector<int64_t>& sizes,
                         std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes.data(), sizes.size()), dtype);
}
inline Tensor contiguous_nchw(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

}  // namespace carafe
