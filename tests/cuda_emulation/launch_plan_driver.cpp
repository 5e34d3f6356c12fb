// Prints the launch plans of csrc/cuda/launch_plans.h for the shapes it reads, one JSON object per
// line, for tests/test_cuda_launch_plans.py. A host program: the plans are plain C++.
//
// Input lines (stdin):
//   machine <multiprocessors> <waves> <min_block_bytes> <bytes_in_flight_per_multiprocessor>
//       the model the following plans are made for (the launchers' kHopper until one is given)
//   channel_mean <rows> <channels> <spatial> <channels_last> <element_bytes> <accumulation_bytes>
//       <misalignment_bytes>
//   enorm_energy <group_channels> <entries> then per counted entry: <channels> <values>
//       <channels_adjacent> <element_bytes>
//   enorm_rescale <outer> <row_values> <element_bytes> <misalignment_bytes>
//   equinorm_weight <out_channels> <group_channels> <taps> <groups> <channels_last> <per_tap_means>
//       <element_bytes>
//   tap_mean_columns <rows> <width> <element_bytes>
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
    int64_t adjacent;
    in >> e.channels >> e.values >> adjacent >> e.element_bytes;
    e.channels_adjacent = adjacent != 0;
  }
  const EnergyPlan p = plan_enorm_energy(entries, group_channels, machine);
  std::ostringstream lanes, slices, slice_values, blocks;
  for (size_t k = 0; k < p.entries.size(); ++k) {
    const char* separator = k == 0 ? "" : ", ";
    lanes << separator << p.entries[k].lanes;
    slices << separator << p.entries[k].slices;
    slice_values << separator << p.entries[k].slice_values;
    blocks << separator << p.entries[k].blocks;
  }
  Json json;
  json.field("kernel", "enorm_energy")
      .field("threads", p.threads)
      .field("blocks_per_multiprocessor", p.blocks_per_multiprocessor)
      .field("blocks", p.blocks)
      .field("partial_rows", p.partial_rows)
      .field("finish_blocks", p.finish_blocks)
      .field("finish_lanes", kFinishLanes)
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
      .field("rows_per_block", p.rows_per_block)
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
      .field("column_partial_bytes", p.column_partial_bytes)
      .field("mean_values", p.mean_values)
      .field("reduce_blocks", p.reduce_blocks)
      .field("backward_workspace_bytes", p.backward_workspace_bytes);
  return json.str();
}

std::string tap_mean_columns(std::istringstream& in) {
  int64_t rows, width, element_bytes;
  in >> rows >> width >> element_bytes;
  const TapColumnPlan p = plan_tap_mean_columns(rows, width, element_bytes);
  Json json;
  json.field("kernel", "tap_mean_columns")
      .field("threads", p.threads)
      .field("unroll", p.unroll)
      .field("width", p.width)
      .field("column_blocks", p.column_blocks)
      .field("slots", p.slots)
      .field("rows_per_slot", p.rows_per_slot)
      .field("blocks", p.blocks)
      .field("load_bytes", p.load_bytes);
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
      json = tap_mean_columns(in);
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
