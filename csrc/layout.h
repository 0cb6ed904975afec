// Memory layouts of (B, C, H, W) maps, shared by every kernel (the rule of
// nasops/ops/_layout.py, which the fake implementations apply too).
//
// The kernels read maps in place when all of them are contiguous (NCHW) or all
// are channels_last-dense (NHWC), and return their results, and the gradients
// of those maps, in that layout. Any other strides are made contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/ArrayRef.h>

namespace nasops {

// Whether the kernels walk `maps` (one shape) in channels_last order: every map
// is channels_last-dense and they are not all contiguous too (both hold when
// C == 1 or H*W == 1, where the two orders are the same memory).
inline bool channels_last_order(c10::ArrayRef<at::Tensor> maps) {
  bool all_nchw = true, all_nhwc = true;
  for (const auto& m : maps) {
    all_nchw = all_nchw && m.is_contiguous();
    all_nhwc = all_nhwc && m.dim() == 4 && m.is_contiguous(at::MemoryFormat::ChannelsLast);
  }
  return all_nhwc && !all_nchw;
}

inline at::MemoryFormat memory_format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace nasops
