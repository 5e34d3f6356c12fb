// Prints the launch plans of csrc/cuda/launch_plans.h for the shapes it reads, one JSON object per
// line, for tests/test_cuda_launch_plans.py. A host program: the plans are plain C++.
//
// Input lines (stdin):
//   machine <multiprocessors> <waves> <min_block_bytes> <bytes_in_flight_per_multiprocessor>
//       the model the following plans are made for (the launchers' kHopper until one is given)
//   channel_mean <rows> <channels> <spatial> <channels_last> <element_bytes> <accumulation_bytes>
//       <misalignment_bytes>
//   enorm_energy <group_channels> <entries> then per counted entry: <channels> <values>
//       <layout: 0 strided, 1 adjacent channels, 2 a run per channel> <element_bytes>
//   enorm_rescale <outer> <row_values> <element_bytes> <misalignment_bytes>
//   equinorm_weight <out_channels> <group_channels> <taps> <groups> <channels_last> <per_tap_means>
//       <element_bytes>
//   tap_mean_columns <rows> <width> <element_bytes> <misalignment_bytes>
//   tap_mean_taps <channels> <taps> <plane> <table_entries>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/launch_plans.h"

namespace {

using namespace equinorm::cuda;

// Fields of one JSON object, in order.
class Json {
 public:
  Json& field(const char* key, int64_t value) {
    text_ << (text_.tellp() > 0 ? ", " : "") << '"' << key << "\": " << value;
    return *this;
  }
  Json& field(const char* key, const std::string& value) {
    text_ << (text_.tellp() > 0 ? ", " : "") << '"' << key << "\": \"" << value << '"';
    return *this;
  }
  Json& list(const char* key, const std::string& items) {
    text_ << (text_.tellp() > 0 ? ", " : "") << '"' << key << "\": [" << items << ']';
    return *this;
  }
  std::string str() const { return "{" + text_.str() + "}"; }

 private:
  std::ostringstream text_;
};

std::string channel_mean(std::istringstream& in, const MachineModel& machine) {
  int64_t rows, channels, spatial, channels_last, element_bytes, accumulation_bytes, misalignment;
  in >> rows >> channels >> spatial >> channels_last >> element_bytes >> accumulation_bytes >> misalignment;
  const ChannelMeanPlan p = plan_channel_mean(rows, channels, spatial, channels_last != 0, element_bytes,
                                              accumulation_bytes, misalignment, machine);
  Json json;
  json.field("kernel", "channel_mean")
      .field("mode", p.mode == ChannelMeanMode::kColumns ? "columns" : "planes")
      .field("threads", p.threads)
      .field("blocks_per_multiprocessor", p.blocks_per_multiprocessor)
      .field("unroll", p.unroll)
      .field("vec", p.vec)
      .field("load_bytes", p.load_bytes)
      .field("rows", p.rows)
      .field("channels", p.channels)
      .field("spatial", p.spatial)
      .field("columns", p.columns)
      .field("head", p.head)
      .field("tile_columns", p.tile_columns)
      .field("tile_rows", p.tile_rows)
      .field("rows_per_slot", p.rows_per_slot)
      .field("tiles", p.tiles)
      .field("plane_vectors", p.plane_vectors)
      .field("plane_scalars", p.plane_scalars)
      .field("slot_vectors", p.slot_vectors)
      .field("slot_scalars", p.slot_scalars)
      .field("slots", p.slots)
      .field("blocks", p.blocks)
      .field("finish_levels", p.finish_levels)
      .field("finish_blocks", p.finish_levels > 0 ? p.finish[0].blocks : 0)
      .field("finish_slots_per_block", kFinishSlotsPerBlock)
      .field("workspace_bytes", static_cast<int64_t>(p.workspace_bytes));
  return json.str();
}

std::string enorm_energy(std::istringstream& in, const MachineModel& machine) {
  int64_t group_channels, count;
  in >> group_channels >> count;
  std::vector<EnergyEntry> entries(static_cast<size_t>(std::max<int64_t>(0, count)));
  for (EnergyEntry& e : entries) {
    int64_t layout;
    in >> e.channels >> e.values >> layout >> e.element_bytes;
    e.layout = layout == 2 ? EnergyLayout::kRun : layout == 1 ? EnergyLayout::kAdjacent : EnergyLayout::kStrided;
    // adjacent channels: one conv group, rows `channels` values apart, an aligned base
    e.row_channels = e.channels;
    e.row_stride_gcd = e.channels;
    e.misalignment_bytes = 0;
  }
  const EnergyPlan p = plan_enorm_energy(entries, group_channels, machine);
  std::ostringstream layouts, vec, unroll, load_bytes, unit_channels, units, lanes, slices, slice_values, blocks;
  for (size_t k = 0; k < p.entries.size(); ++k) {
    const char* separator = k == 0 ? "" : ", ";
    const EnergySlices& e = p.entries[k];
    layouts << separator << '"'
            << (e.layout == EnergyLayout::kRun ? "run" : e.layout == EnergyLayout::kAdjacent ? "adjacent" : "strided")
            << '"';
    vec << separator << e.vec;
    unroll << separator << e.unroll;
    load_bytes << separator << e.load_bytes;
    unit_channels << separator << e.unit_channels;
    units << separator << e.units;
    lanes << separator << e.lanes;
    slices << separator << e.slices;
    slice_values << separator << e.slice_values;
    blocks << separator << e.blocks;
  }
  Json json;
  json.field("kernel", "enorm_energy")
      .field("threads", p.threads)
      .field("blocks_per_multiprocessor", p.blocks_per_multiprocessor)
      .field("blocks", p.blocks)
      .field("partial_rows", p.partial_rows)
      .field("finish_blocks", p.finish_blocks)
      .field("finish_lanes", kFinishLanes)
      .list("layouts", layouts.str())
      .list("vec", vec.str())
      .list("unroll", unroll.str())
      .list("load_bytes", load_bytes.str())
      .list("unit_channels", unit_channels.str())
      .list("units", units.str())
      .list("lanes", lanes.str())
      .list("slices", slices.str())
      .list("slice_values", slice_values.str())
      .list("entry_blocks", blocks.str());
  return json.str();
}

std::string enorm_rescale(std::istringstream& in) {
  int64_t outer, row_values, element_bytes, misalignment;
  in >> outer >> row_values >> element_bytes >> misalignment;
  const RescalePlan p = plan_enorm_rescale(outer, row_values, element_bytes, misalignment);
  Json json;
  json.field("kernel", "enorm_rescale")
      .field("threads", p.threads)
      .field("blocks_per_multiprocessor", p.blocks_per_multiprocessor)
      .field("unroll", p.unroll)
      .field("vec", p.vec)
      .field("load_bytes", p.load_bytes)
      .field("values", p.values)
      .field("head", p.head)
      .field("body_vectors", p.body_vectors)
      .field("tail", p.tail)
      .field("block_vectors", p.block_vectors)
      .field("blocks", p.blocks);
  return json.str();
}

std::string equinorm_weight(std::istringstream& in, const MachineModel& machine) {
  int64_t out_channels, group_channels, taps, groups, channels_last, per_tap_means, element_bytes;
  in >> out_channels >> group_channels >> taps >> groups >> channels_last >> per_tap_means >> element_bytes;
  const EquiNormWeightPlan p = plan_equinorm_weight(out_channels, group_channels, taps, groups, channels_last != 0,
                                                    per_tap_means != 0, element_bytes, 0, 0, machine);
  Json json;
  json.field("kernel", "equinorm_weight")
      .field("threads", p.threads)
      .field("team", p.team)
      .field("vec", p.vec)
      .field("rows_per_block", p.rows_per_block)
      .field("blocks_per_multiprocessor", p.blocks_per_multiprocessor)
      .field("row_blocks", p.row_blocks)
      .field("slices", p.slices)
      .field("slice_values", p.slice_values)
      .field("blocks", p.blocks)
      .field("load_bytes", p.load_bytes)
      .field("forward_workspace_bytes", p.forward_workspace_bytes)
      .field("column_vec", p.column_vec)
      .field("column_threads", p.column_threads)
      .field("row_lanes", p.row_lanes)
      .field("column_tiles", p.column_tiles)
      .field("slots", p.slots)
      .field("rows_per_slot", p.rows_per_slot)
      .field("column_blocks", p.column_blocks)
      .field("column_load_bytes", p.column_load_bytes)
      .field("grad_rows_in_flight", p.grad_rows_in_flight)
      .field("column_partial_bytes", p.column_partial_bytes)
      .field("mean_values", p.mean_values)
      .field("reduce_blocks", p.reduce_blocks)
      .field("backward_workspace_bytes", p.backward_workspace_bytes);
  return json.str();
}

std::string tap_mean_columns(std::istringstream& in, const MachineModel& machine) {
  int64_t rows, width, element_bytes, misalignment;
  in >> rows >> width >> element_bytes >> misalignment;
  const TapColumnPlan p = plan_tap_mean_columns(rows, width, element_bytes, misalignment, machine);
  Json json;
  json.field("kernel", "tap_mean_columns")
      .field("threads", p.threads)
      .field("blocks_per_multiprocessor", p.blocks_per_multiprocessor)
      .field("unroll", p.unroll)
      .field("vec", p.vec)
      .field("head", p.head)
      .field("width", p.width)
      .field("column_blocks", p.column_blocks)
      .field("slots", p.slots)
      .field("rows_per_slot", p.rows_per_slot)
      .field("blocks", p.blocks)
      .field("finish_blocks", p.finish_blocks)
      .field("load_bytes", p.load_bytes);
  return json.str();
}

std::string tap_mean_taps(std::istringstream& in, const MachineModel& machine) {
  int64_t channels, taps, plane, table_entries;
  in >> channels >> taps >> plane >> table_entries;
  const TapSumsPlan p = plan_tap_mean_taps(channels, taps, plane, table_entries, machine);
  Json json;
  json.field("kernel", "tap_mean_taps")
      .field("threads", p.threads)
      .field("team", p.team)
      .field("teams_per_block", p.teams_per_block)
      .field("pairs", p.pairs)
      .field("splits", p.splits)
      .field("split_positions", p.split_positions)
      .field("blocks", p.blocks)
      .field("lane_positions", p.lane_positions)
      .field("finish_blocks", p.finish_blocks)
      .field("table_blocks", p.table_blocks)
      .field("grad_blocks", p.grad_blocks);
  return json.str();
}

}  // namespace

int main() {
  MachineModel machine = kHopper;
  for (std::string line; std::getline(std::cin, line);) {
    std::istringstream in(line);
    std::string kind;
    if (!(in >> kind)) continue;
    if (kind == "machine") {
      in >> machine.multiprocessors >> machine.waves >> machine.min_block_bytes >>
          machine.bytes_in_flight_per_multiprocessor;
      continue;
    }
    std::string json;
    if (kind == "channel_mean") {
      json = channel_mean(in, machine);
    } else if (kind == "enorm_energy") {
      json = enorm_energy(in, machine);
    } else if (kind == "enorm_rescale") {
      json = enorm_rescale(in);
    } else if (kind == "equinorm_weight") {
      json = equinorm_weight(in, machine);
    } else if (kind == "tap_mean_columns") {
      json = tap_mean_columns(in, machine);
    } else if (kind == "tap_mean_taps") {
      json = tap_mean_taps(in, machine);
    } else {
      std::fprintf(stderr, "unknown request %s\n", kind.c_str());
      return 2;
    }
    if (in.fail()) {
      std::fprintf(stderr, "malformed request: %s\n", line.c_str());
      return 2;
    }
    std::printf("%s\n", json.c_str());
  }
  return 0;
}
