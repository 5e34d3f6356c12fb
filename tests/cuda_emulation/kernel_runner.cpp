// Calls the CUDA launchers (csrc/cuda/launchers.h), built for the CPU with cuda_emulation.h, on the
// cases of a manifest and writes their outputs, which tests/test_cuda_emulation.py compares with
// the float64 reference. Each case runs twice from the same inputs, the second time with blocks and
// threads scheduled in reverse order; outputs that differ in a single bit between the two runs fail
// it (the kernels promise results independent of which block finishes last), as does a launcher
// that returns an error.
//
// Usage: kernel_runner <manifest> <output directory>
// A manifest line is "<op> <case name> key=value ...". Buffers are raw files in memory order, inputs
// named relative to the manifest, outputs written as <output directory>/<case name>.<key>.bin.
//   channel_mean  dtype rows channels spatial channels_last offset x [abs=1] [multiprocessors=<n>
//                 min_block_bytes=<n>] -> mean [negative]
//   equinorm      dtype out_channels group_channels taps groups channels_last exact ratio eps
//                 per_tap_means offset weight mean gain [grad]  -> out stats [grad_weight grad_mean grad_gain]
//   enorm         p c offset dtypes=<dtype>,... tensor<k>=<file> group_sizes=<n>,... entries=<11 ints>;...
//                 coefficients=0|1 deviations=0|1 [multiprocessors=<n> min_block_bytes=<n>]
//                 -> tensor<k> (each tensor after the op) [coefficients] [deviations]
//   tap_mean      dtype rows channels channels_last mode absolute offset dims=<L,k,s,d,before,after,outputs>;x3
//                 x [grad] [multiprocessors=<n> min_block_bytes=<n>]  -> mean negative [plane]
// An enorm entry: tensor columns power counted groups outer channels_per_group inner outer_stride
// channel_stride inner_stride.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/launchers.h"

namespace {

namespace fs = std::filesystem;
using equinorm::cuda::ElementType;

struct TypeInfo {
  ElementType type;
  size_t element_bytes;
  size_t accumulation_bytes;
};

TypeInfo type_info(const std::string& name) {
  if (name == "half") return {ElementType::kHalf, 2, 4};
  if (name == "bfloat16") return {ElementType::kBFloat16, 2, 4};
  if (name == "float") return {ElementType::kFloat, 4, 4};
  if (name == "double") return {ElementType::kDouble, 8, 8};
  throw std::runtime_error("unknown dtype " + name);
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);) parts.push_back(part);
  return parts;
}

std::vector<char> read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path.string());
  return std::vector<char>(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::vector<char>& bytes) {
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) throw std::runtime_error("cannot write " + path.string());
}

// Device memory as a kernel sees it: the allocation ends at the last byte, so one element past it
// is out of bounds for ASan, and `offset_bytes` before the data misalign it.
class Buffer {
 public:
  Buffer(size_t bytes, size_t offset_bytes) : bytes_(bytes) {
    if (posix_memalign(&allocation_, 256, offset_bytes + bytes + (offset_bytes + bytes == 0)) != 0) {
      throw std::runtime_error("out of memory");
    }
    data_ = static_cast<char*>(allocation_) + offset_bytes;
    // All-ones bytes are NaN in every float type: an element no kernel writes cannot pass.
    std::memset(data_, 0xff, bytes);
  }
  Buffer(const std::vector<char>& contents, size_t offset_bytes) : Buffer(contents.size(), offset_bytes) {
    std::memcpy(data_, contents.data(), contents.size());
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(allocation_); }

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  std::vector<char> contents() const { return std::vector<char>(data_, data_ + bytes_); }

 private:
  void* allocation_ = nullptr;
  char* data_ = nullptr;
  size_t bytes_;
};

using Outputs = std::vector<std::pair<std::string, std::vector<char>>>;

class Case {
 public:
  Case(const std::string& line, fs::path directory) : directory_(std::move(directory)) {
    std::istringstream stream(line);
    stream >> op >> name;
    for (std::string field; stream >> field;) {
      const size_t equals = field.find('=');
      if (equals == std::string::npos) throw std::runtime_error("field without '=': " + field);
      fields_[field.substr(0, equals)] = field.substr(equals + 1);
    }
  }

  std::string op, name;

  bool has(const std::string& key) const { return fields_.count(key) > 0; }
  const std::string& text(const std::string& key) const {
    const auto found = fields_.find(key);
    if (found == fields_.end()) throw std::runtime_error("missing field " + key);
    return found->second;
  }
  int64_t integer(const std::string& key) const { return std::stoll(text(key)); }
  double real(const std::string& key) const { return std::stod(text(key)); }
  std::vector<char> input(const std::string& file) const { return read_file(directory_ / file); }

 private:
  fs::path directory_;
  std::map<std::string, std::string> fields_;
};

void check(cudaError_t status, const char* launcher) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(launcher) + " returned cudaError " + std::to_string(status));
  }
}

// The machine the plans are made for: the launchers' default, or a smaller one named by the case
// (multiprocessors, min_block_bytes) so that small shapes take the many-block paths.
equinorm::cuda::MachineModel machine(const Case& c) {
  equinorm::cuda::MachineModel model = equinorm::cuda::kHopper;
  if (c.has("multiprocessors")) model.multiprocessors = c.integer("multiprocessors");
  if (c.has("min_block_bytes")) model.min_block_bytes = c.integer("min_block_bytes");
  return model;
}

Outputs run_channel_mean(const Case& c) {
  const TypeInfo info = type_info(c.text("dtype"));
  const equinorm::cuda::ChannelMeanShape shape{c.integer("rows"), c.integer("channels"), c.integer("spatial"),
                                               c.integer("channels_last") != 0};
  const size_t offset = static_cast<size_t>(c.integer("offset"));
  const Buffer x(c.input(c.text("x")), offset * info.element_bytes);
  const Buffer mean(static_cast<size_t>(shape.channels) * info.accumulation_bytes, offset * info.accumulation_bytes);
  const equinorm::cuda::MachineModel model = machine(c);
  const size_t workspace_bytes = equinorm::cuda::channel_mean_workspace_bytes(shape, info.type, x.data(), model);
  const Buffer workspace(workspace_bytes, 0);
  const bool abs_statistic = c.has("abs") && c.integer("abs") != 0;
  const Buffer negative(abs_statistic ? static_cast<size_t>(shape.channels) : 0, 0);
  check(equinorm::cuda::launch_channel_mean(shape, info.type, x.data(), mean.data(),
                                            abs_statistic ? static_cast<bool*>(negative.data()) : nullptr,
                                            workspace_bytes > 0 ? workspace.data() : nullptr, workspace_bytes,
                                            nullptr, model),
        "launch_channel_mean");
  if (abs_statistic) return {{"mean", mean.contents()}, {"negative", negative.contents()}};
  return {{"mean", mean.contents()}};
}

// The forward, then (with a grad) the backward from the forward's stats, as the autograd op runs them.
Outputs run_equinorm(const Case& c) {
  const TypeInfo info = type_info(c.text("dtype"));
  const equinorm::cuda::WeightShape shape{c.integer("out_channels"), c.integer("group_channels"), c.integer("taps"),
                                          c.integer("groups"), c.integer("channels_last") != 0,
                                          c.integer("per_tap_means") != 0};
  const size_t offset = static_cast<size_t>(c.integer("offset"));
  const size_t elements = static_cast<size_t>(shape.out_channels * shape.group_channels * shape.taps);
  const size_t channels = static_cast<size_t>(shape.group_channels * shape.groups * (shape.per_tap_means ? shape.taps : 1));
  const size_t outputs = static_cast<size_t>(shape.out_channels);
  const size_t element_offset = offset * info.element_bytes, accumulation_offset = offset * info.accumulation_bytes;
  // stats and grad_mean are double for every element type (csrc/shared/equinorm_math.h).
  const size_t weight_math_bytes = sizeof(double), weight_math_offset = offset * weight_math_bytes;
  // weight_offset: the weight alone off the other buffers' alignment
  const size_t weight_offset = c.has("weight_offset") ? static_cast<size_t>(c.integer("weight_offset")) : offset;
  const Buffer weight(c.input(c.text("weight")), weight_offset * info.element_bytes);
  const Buffer mean(c.input(c.text("mean")), accumulation_offset);
  const Buffer gain(c.input(c.text("gain")), accumulation_offset);
  const Buffer out(elements * info.element_bytes, element_offset);
  const Buffer stats(outputs * 5 * weight_math_bytes, weight_math_offset);
  const equinorm::cuda::MachineModel model = machine(c);
  const size_t forward_bytes = equinorm::cuda::equinorm_weight_workspace_bytes(shape, info.type, model);
  const Buffer forward_workspace(forward_bytes, 0);
  check(equinorm::cuda::launch_equinorm_weight(shape, info.type, weight.data(), mean.data(), gain.data(),
                                               c.real("ratio"), c.real("eps"), c.integer("exact") != 0, out.data(),
                                               stats.data(), forward_bytes > 0 ? forward_workspace.data() : nullptr,
                                               forward_bytes, nullptr, model),
        "launch_equinorm_weight");
  Outputs results{{"out", out.contents()}, {"stats", stats.contents()}};
  if (!c.has("grad")) return results;

  const Buffer grad(c.input(c.text("grad")), element_offset);
  const Buffer grad_weight(elements * info.element_bytes, element_offset);
  const Buffer grad_mean(channels * weight_math_bytes, weight_math_offset);
  const Buffer grad_gain(outputs * info.accumulation_bytes, accumulation_offset);
  const size_t workspace_bytes = equinorm::cuda::equinorm_backward_workspace_bytes(shape, info.type, model);
  const Buffer workspace(workspace_bytes, 0);
  check(equinorm::cuda::launch_equinorm_backward(shape, info.type, grad.data(), weight.data(), mean.data(),
                                                 gain.data(), stats.data(), grad_weight.data(), grad_mean.data(),
                                                 grad_gain.data(), workspace.data(), workspace_bytes, nullptr, model),
        "launch_equinorm_backward");
  results.emplace_back("grad_weight", grad_weight.contents());
  results.emplace_back("grad_mean", grad_mean.contents());
  results.emplace_back("grad_gain", grad_gain.contents());
  return results;
}

equinorm::cuda::EnormEntry enorm_entry(const std::string& record, const std::vector<std::unique_ptr<Buffer>>& tensors,
                                       const std::vector<TypeInfo>& types) {
  const std::vector<std::string> fields = split(record, ',');
  if (fields.size() != 11) throw std::runtime_error("an enorm entry has 11 fields: " + record);
  std::vector<int64_t> v;
  for (const std::string& field : fields) v.push_back(std::stoll(field));
  const size_t tensor = static_cast<size_t>(v[0]);
  equinorm::cuda::EnormEntry entry;
  entry.data = tensors.at(tensor)->data();
  entry.type = types.at(tensor).type;
  entry.columns = v[1] != 0;
  entry.power = static_cast<int>(v[2]);
  entry.counted = v[3] != 0;
  entry.groups = v[4];
  entry.outer = v[5];
  entry.channels_per_group = v[6];
  entry.inner = v[7];
  entry.outer_stride = v[8];
  entry.channel_stride = v[9];
  entry.inner_stride = v[10];
  return entry;
}

Outputs run_enorm(const Case& c) {
  const size_t offset = static_cast<size_t>(c.integer("offset"));
  std::vector<std::unique_ptr<Buffer>> tensors;
  std::vector<TypeInfo> types;
  for (const std::string& dtype : split(c.text("dtypes"), ',')) {
    types.push_back(type_info(dtype));
    const std::string file = c.text("tensor" + std::to_string(tensors.size()));
    tensors.push_back(std::make_unique<Buffer>(c.input(file), offset * types.back().element_bytes));
  }
  std::vector<int64_t> group_sizes;
  for (const std::string& size : split(c.text("group_sizes"), ',')) group_sizes.push_back(std::stoll(size));
  std::vector<equinorm::cuda::EnormEntry> entries;
  for (const std::string& record : split(c.text("entries"), ';')) {
    entries.push_back(enorm_entry(record, tensors, types));
  }

  const int64_t groups = static_cast<int64_t>(group_sizes.size());
  const equinorm::cuda::EnormEntry& last_group_first_entry = entries.at(entries.size() - group_sizes.back());
  const int64_t channels = last_group_first_entry.columns
                               ? last_group_first_entry.channels_per_group * last_group_first_entry.groups
                               : last_group_first_entry.outer;
  const Buffer coefficients(static_cast<size_t>(channels) * sizeof(double), 0);
  const Buffer deviations(static_cast<size_t>(groups) * sizeof(double), 0);
  const equinorm::cuda::MachineModel model = machine(c);
  const size_t workspace_bytes =
      equinorm::cuda::enorm_workspace_bytes(entries.data(), group_sizes.data(), groups, model);
  const Buffer workspace(workspace_bytes, 0);
  // enorm_group_ asks for the coefficients only, enorm_cycle_ for the deviations only.
  const bool wants_coefficients = c.integer("coefficients") != 0, wants_deviations = c.integer("deviations") != 0;
  check(equinorm::cuda::launch_enorm(entries.data(), group_sizes.data(), groups, c.real("p"), c.real("c"),
                                     wants_coefficients ? static_cast<double*>(coefficients.data()) : nullptr,
                                     wants_deviations ? static_cast<double*>(deviations.data()) : nullptr,
                                     workspace.data(), workspace_bytes, nullptr, model),
        "launch_enorm");
  Outputs results;
  if (wants_coefficients) results.emplace_back("coefficients", coefficients.contents());
  if (wants_deviations) results.emplace_back("deviations", deviations.contents());
  for (size_t k = 0; k < tensors.size(); ++k) {
    results.emplace_back("tensor" + std::to_string(k), tensors[k]->contents());
  }
  return results;
}

// The forward, then (with a grad in the accumulation type) the backward, as the autograd op runs them.
Outputs run_tap_mean(const Case& c) {
  const TypeInfo info = type_info(c.text("dtype"));
  equinorm::cuda::TapMeanShape shape;
  shape.rows = c.integer("rows");
  shape.channels = c.integer("channels");
  shape.channels_last = c.integer("channels_last") != 0;
  shape.mode = static_cast<int>(c.integer("mode"));
  const std::vector<std::string> dims = split(c.text("dims"), ';');
  if (dims.size() != 3) throw std::runtime_error("tap_mean needs 3 dims");
  int64_t plane = 1, taps = 1;
  for (size_t k = 0; k < 3; ++k) {
    const std::vector<std::string> v = split(dims[k], ',');
    if (v.size() != 7) throw std::runtime_error("a tap_mean dim needs 7 values");
    shape.dims[k] = {std::stoll(v[0]), std::stoll(v[1]), std::stoll(v[2]), std::stoll(v[3]),
                     std::stoll(v[4]), std::stoll(v[5]), std::stoll(v[6])};
    plane *= shape.dims[k].length;
    taps *= shape.dims[k].kernel;
  }
  const size_t offset = static_cast<size_t>(c.integer("offset"));
  const Buffer x(c.input(c.text("x")), offset * info.element_bytes);
  const Buffer mean(static_cast<size_t>(shape.channels * taps) * info.accumulation_bytes,
                    offset * info.accumulation_bytes);
  const Buffer negative(static_cast<size_t>(shape.channels), offset);
  std::memset(negative.data(), 0, negative.bytes());  // the op's output starts zeroed (at::zeros)
  const equinorm::cuda::MachineModel model = machine(c);
  const size_t workspace_bytes = equinorm::cuda::tap_mean_workspace_bytes(shape, info.type, model);
  const Buffer workspace(workspace_bytes, 0);
  check(equinorm::cuda::launch_tap_mean(shape, info.type, x.data(), c.integer("absolute") != 0, mean.data(),
                                        negative.data(), workspace.data(), workspace_bytes, nullptr, model),
        "launch_tap_mean");
  Outputs results{{"mean", mean.contents()}, {"negative", negative.contents()}};
  if (!c.has("grad")) return results;
  const ElementType accumulation = info.accumulation_bytes == 8 ? ElementType::kDouble : ElementType::kFloat;
  const Buffer grad(c.input(c.text("grad")), offset * info.accumulation_bytes);
  const Buffer out(static_cast<size_t>(shape.channels * plane) * info.accumulation_bytes,
                   offset * info.accumulation_bytes);
  const size_t backward_bytes = equinorm::cuda::tap_mean_backward_workspace_bytes(shape);
  const Buffer backward_workspace(backward_bytes, 0);
  check(equinorm::cuda::launch_tap_mean_backward(shape, accumulation, grad.data(), out.data(),
                                                 backward_workspace.data(), backward_bytes, nullptr),
        "launch_tap_mean_backward");
  results.emplace_back("plane", out.contents());
  return results;
}

Outputs run(const Case& c) {
  if (c.op == "channel_mean") return run_channel_mean(c);
  if (c.op == "tap_mean") return run_tap_mean(c);
  if (c.op == "equinorm") return run_equinorm(c);
  if (c.op == "enorm") return run_enorm(c);
  throw std::runtime_error("unknown op " + c.op);
}

// While it lives, launches run their blocks and threads last to first (cuda_emulation.h).
class ReverseOrder {
 public:
  ReverseOrder() { setenv("CUDA_EMULATION_ORDER", "reversed", 1); }
  ReverseOrder(const ReverseOrder&) = delete;
  ReverseOrder& operator=(const ReverseOrder&) = delete;
  ~ReverseOrder() { unsetenv("CUDA_EMULATION_ORDER"); }
};

Outputs run_in_reverse_order(const Case& c) {
  const ReverseOrder reverse;
  return run(c);
}

// The first output whose bits differ between the two runs, or "" when none does.
std::string first_difference(const Outputs& first, const Outputs& second) {
  for (size_t k = 0; k < first.size(); ++k) {
    if (first[k].second != second[k].second) return first[k].first;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <manifest> <output directory>\n", argv[0]);
    return 2;
  }
  const fs::path manifest = argv[1], output_directory = argv[2];
  std::ifstream lines(manifest);
  int cases = 0, failures = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.empty()) continue;
    const Case c(line, manifest.parent_path());
    ++cases;
    try {
      const Outputs first = run(c);
      const std::string differs = first_difference(first, run_in_reverse_order(c));
      if (!differs.empty()) {
        throw std::runtime_error(differs + " differs between runs with blocks in order and in reverse order");
      }
      for (const auto& [key, bytes] : first) write_file(output_directory / (c.name + "." + key + ".bin"), bytes);
    } catch (const std::exception& error) {
      ++failures;
      std::fprintf(stderr, "FAIL %s: %s\n", c.name.c_str(), error.what());
    }
  }
  std::printf("%d cases, %d failed\n", cases, failures);
  return failures == 0 && cases > 0 ? 0 : 1;
}
