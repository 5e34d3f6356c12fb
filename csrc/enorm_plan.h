// The rescaling program of the ENorm ops (enorm_group_, enorm_cycle_), decoded and checked once
// for the CPU and CUDA glue.
//
// `entries` is a flat list of records of kEntryFields ints, one record per (tensor, role):
//   tensor index, axis (0: rows = dim 0; 1: columns = input channels), power of d the tensor is
//   multiplied by along that axis, counted (1: its |.|^p enters the row or column energy),
//   conv groups (columns), columns per channel (columns of a Linear after a flatten).
// A tensor read on an axis is viewed as (outer, channels, inner): rows: (C, 1, numel / C);
// columns: (out, in / columns_per_channel, columns_per_channel * kernel taps), channel
// j = group * channels_per_group + i read by the out / groups rows of its group.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "op_checks.h"

namespace equinorm {

constexpr int64_t kEntryFields = 6;

// Element (o, i, t) of an entry's view sits at o * outer_stride + i * channel_stride + t * inner_stride.
struct RescaleEntry {
  int64_t tensor = 0;
  bool columns = false;
  int64_t power = 1;
  bool counted = false;
  int64_t groups = 1;
  int64_t outer = 0, channels_per_group = 0, inner = 0;  // view sizes
  int64_t outer_stride = 0, channel_stride = 0, inner_stride = 0;
  int64_t channels() const { return columns ? channels_per_group * groups : outer; }
  int64_t outer_per_group() const { return outer / groups; }
};

inline bool is_channels_last_weight(const at::Tensor& t) {
  return !t.is_contiguous() && ((t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
}

inline RescaleEntry decode_entry(const at::TensorList tensors, c10::ArrayRef<int64_t> record) {
  RescaleEntry e;
  e.tensor = record[0];
  TORCH_CHECK(e.tensor >= 0 && e.tensor < static_cast<int64_t>(tensors.size()), "entry names tensor ", e.tensor,
              " but only ", tensors.size(), " tensors were given");
  TORCH_CHECK(record[1] == 0 || record[1] == 1, "entry axis must be 0 (rows) or 1 (columns), got ", record[1]);
  e.columns = record[1] == 1;
  e.power = record[2];
  TORCH_CHECK(e.power >= -2 && e.power <= 2, "entry power must be in [-2, 2], got ", e.power);
  e.counted = record[3] != 0;
  e.groups = record[4];
  const int64_t per_channel = record[5];
  const at::Tensor& t = tensors[e.tensor];
  check_floating(t, "tensors[i]");
  TORCH_CHECK(t.numel() > 0 && t.dim() >= 1, "tensors[", e.tensor, "] must be non-empty");
  TORCH_CHECK(t.is_contiguous() || is_channels_last_weight(t), "tensors[", e.tensor,
              "] must be contiguous or channels_last to be rescaled in place");
  if (!e.columns) {
    TORCH_CHECK(e.groups == 1 && per_channel == 1, "a rows entry takes groups = 1 and columns per channel = 1");
    e.outer = t.size(0);
    e.channels_per_group = 1;
    e.inner = t.numel() / t.size(0);
    e.outer_stride = e.inner;  // dim 0 is outermost in both supported layouts
    e.inner_stride = 1;
    return e;
  }
  TORCH_CHECK(t.dim() >= 2, "a columns entry needs a tensor of 2 or more dims, got ", t.sizes());
  TORCH_CHECK(e.groups >= 1 && t.size(0) % e.groups == 0, "entry groups must divide ", t.size(0));
  TORCH_CHECK(per_channel >= 1 && t.size(1) % per_channel == 0, "columns per channel must divide ", t.size(1));
  TORCH_CHECK(per_channel == 1 || (e.groups == 1 && t.dim() == 2),
              "columns per channel > 1 needs a 2-D tensor and groups = 1");
  const int64_t taps = t.numel() / (t.size(0) * t.size(1));
  e.outer = t.size(0);
  e.channels_per_group = t.size(1) / per_channel;
  e.inner = per_channel * taps;
  if (is_channels_last_weight(t)) {  // (out, *kernel, in) in memory
    e.outer_stride = t.size(1) * taps;
    e.channel_stride = 1;
    e.inner_stride = t.size(1);
  } else {
    e.outer_stride = t.size(1) * taps;
    e.channel_stride = e.inner;
    e.inner_stride = 1;
  }
  return e;
}

// The entries of every group, checked: one device, and one channel count per group.
inline std::vector<std::vector<RescaleEntry>> decode_plan(const at::TensorList tensors, c10::ArrayRef<int64_t> entries,
                                                          c10::ArrayRef<int64_t> group_sizes) {
  TORCH_CHECK(entries.size() % kEntryFields == 0, "entries must hold records of ", kEntryFields, " ints, got ",
              entries.size(), " ints");
  for (const auto& t : tensors) check_same_device(tensors[0], t, "tensors[0]", "tensors[i]");
  std::vector<std::vector<RescaleEntry>> plan;
  int64_t record = 0;
  const int64_t records = static_cast<int64_t>(entries.size()) / kEntryFields;
  for (const int64_t size : group_sizes) {
    TORCH_CHECK(size >= 1 && record + size <= records, "group_sizes do not match the ", records, " entries");
    std::vector<RescaleEntry> group;
    for (int64_t k = 0; k < size; ++k, ++record) {
      group.push_back(decode_entry(tensors, entries.slice(record * kEntryFields, kEntryFields)));
      TORCH_CHECK(group.back().channels() == group.front().channels(), "group ", plan.size(), " mixes ",
                  group.front().channels(), " and ", group.back().channels(), " channels");
    }
    bool counts_rows = false, counts_columns = false;
    for (const auto& e : group) (e.columns ? counts_columns : counts_rows) |= e.counted;
    TORCH_CHECK(counts_rows && counts_columns, "group ", plan.size(), " needs counted rows and counted columns");
    plan.push_back(std::move(group));
  }
  TORCH_CHECK(record == records, "group_sizes cover ", record, " of the ", records, " entries");
  return plan;
}

}  // namespace equinorm
