// graphopt.MatMulLowBit: schema, shape inference, input validation and threading.
// Kernels live in kernels_*.cc; the schema is documented in runtime_ext/README.md.
#include "matmul_lowbit.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "kernels.h"
#include "ort_util.h"

namespace graphopt_ext {
namespace {

constexpr const char* kOpName = "MatMulLowBit";
enum Input : size_t { kA = 0, kPacked, kScales, kZeroPoints, kBias, kInputCount };

// Multiply-adds below which a node runs single-threaded (about 50 µs of AVX2 work);
// GRAPHOPT_EXT_MIN_PARALLEL_MACS overrides it when a session creates the kernel (tests set
// 0 to send every shape through the thread pool).
constexpr double kMinParallelMacs = 2.0e6;

double min_parallel_macs() {
  const char* text = std::getenv("GRAPHOPT_EXT_MIN_PARALLEL_MACS");
  if (!text || !*text) return kMinParallelMacs;
  char* end = nullptr;
  const double value = std::strtod(text, &end);
  return (end && *end == '\0' && value >= 0.0) ? value : kMinParallelMacs;
}

bool supported_bits(std::int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

struct Attributes {
  std::int64_t k = 0, n = 0, bits = 0, group_size = 0;
  std::int64_t accuracy_level = 0;  // optional: 0 fp32 activations, 4 int8 activations
};

// Validates attribute values; returns an empty string when they are fine.
std::string check_attributes(const Attributes& a) {
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 31;
  if (a.k < 1 || a.k > kMaxDim) return "attribute K=" + std::to_string(a.k) + " must be in [1, 2^31]";
  if (a.n < 1 || a.n > kMaxDim) return "attribute N=" + std::to_string(a.n) + " must be in [1, 2^31]";
  if (!supported_bits(a.bits)) return "attribute bits=" + std::to_string(a.bits) + " must be 2, 3, 4 or 8";
  if (a.group_size < 1) return "attribute group_size=" + std::to_string(a.group_size) + " must be positive";
  if (a.accuracy_level != 0 && a.accuracy_level != 4) {
    return "attribute accuracy_level=" + std::to_string(a.accuracy_level) + " must be 0 (fp32) or 4 (int8 activations)";
  }
  return {};
}

std::int64_t num_groups(const Attributes& a) { return (a.k + a.group_size - 1) / a.group_size; }

std::int64_t num_tiles(const Attributes& a) {
  const auto per_tile = static_cast<std::int64_t>(kTileChannels);
  return (a.n + per_tile - 1) / per_tile;
}

// Bytes of one packed tile: ceil(K / F) word columns of 32 bytes.
std::int64_t tile_bytes(const Attributes& a) {
  const auto per_word = static_cast<std::int64_t>(codes_per_word(static_cast<int>(a.bits)));
  return (a.k + per_word - 1) / per_word * static_cast<std::int64_t>(kColumnBytes);
}

struct Kernel {
  Attributes attrs;
  std::string where;  // "MatMulLowBit node 'name'"
  const KernelSet* kernels = nullptr;
  double min_parallel_macs = kMinParallelMacs;
  bool checked_at_load[kInputCount] = {};  // constant initializers whose shapes were checked
};

// ---------------------------------------------------------------- schema callbacks

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return nullptr; }  // CPU
size_t ORT_API_CALL op_input_count(const OrtCustomOp*) { return kInputCount; }
size_t ORT_API_CALL op_output_count(const OrtCustomOp*) { return 1; }

ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp*, size_t index) {
  return (index == kPacked || index == kZeroPoints) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                                    : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_input_characteristic(const OrtCustomOp*, size_t index) {
  return index >= kZeroPoints ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL op_input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL op_variadic_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_variadic_homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_end_version(const OrtCustomOp*) { return (1 << 30); }

// ---------------------------------------------------------------- shape inference

OrtStatus* read_int_attr(const OrtShapeInferContext* ctx, const char* name, std::int64_t* out) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* status = api().ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (status || !attr) {
    if (status) api().ReleaseStatus(status);
    return make_error(ORT_INVALID_GRAPH, std::string(kOpName) + ": missing int attribute '" + name + "'");
  }
  size_t size = 0;
  status = api().ReadOpAttr(attr, ORT_OP_ATTR_INT, out, sizeof(*out), &size);
  if (status) {
    api().ReleaseStatus(status);
    return make_error(ORT_INVALID_GRAPH, std::string(kOpName) + ": attribute '" + name + "' must be an int");
  }
  return nullptr;
}

OrtStatusPtr ORT_API_CALL op_infer_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  Attributes a;
  GRAPHOPT_RETURN_IF_ERROR(read_int_attr(ctx, "K", &a.k));
  GRAPHOPT_RETURN_IF_ERROR(read_int_attr(ctx, "N", &a.n));
  GRAPHOPT_RETURN_IF_ERROR(read_int_attr(ctx, "bits", &a.bits));
  GRAPHOPT_RETURN_IF_ERROR(read_int_attr(ctx, "group_size", &a.group_size));
  const std::string problem = check_attributes(a);
  if (!problem.empty()) return make_error(ORT_INVALID_GRAPH, std::string(kOpName) + ": " + problem);

  // The context owns the input's info (it must not be released here).
  OrtTensorTypeAndShapeInfo* input = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api().ShapeInferContext_GetInputTypeShape(ctx, kA, &input));
  size_t rank = 0;
  OrtStatus* status = api().GetDimensionsCount(input, &rank);
  std::vector<std::int64_t> dims(rank, 0);
  std::vector<const char*> symbols(rank, nullptr);
  if (!status && rank) status = api().GetDimensions(input, dims.data(), rank);
  if (!status && rank) status = api().GetSymbolicDimensions(input, symbols.data(), rank);
  if (status || rank == 0) return status;  // unknown rank: leave the output unspecified
  std::vector<std::string> names;
  for (size_t i = 0; i + 1 < rank; ++i) names.emplace_back(symbols[i] ? symbols[i] : "");
  if (dims.back() >= 0 && dims.back() != a.k) {
    return make_error(ORT_INVALID_GRAPH, std::string(kOpName) + ": input A has shape " + shape_text(dims) +
                                             ", its last dimension must equal attribute K=" + std::to_string(a.k));
  }
  dims.back() = a.n;
  std::vector<const char*> out_symbols;
  for (const auto& name : names) out_symbols.push_back(name.c_str());
  out_symbols.push_back("");

  OrtTensorTypeAndShapeInfo* output = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api().CreateTensorTypeAndShapeInfo(&output));
  status = api().SetTensorElementType(output, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (!status) status = api().SetDimensions(output, dims.data(), dims.size());
  if (!status) status = api().SetSymbolicDimensions(output, out_symbols.data(), out_symbols.size());
  if (!status) status = api().ShapeInferContext_SetOutputTypeShape(ctx, 0, output);
  api().ReleaseTensorTypeAndShapeInfo(output);
  return status;
}

// ---------------------------------------------------------------- kernel creation

OrtStatus* kernel_int_attr(const OrtKernelInfo* info, const std::string& where, const char* name,
                           std::int64_t* out) {
  OrtStatus* status = api().KernelInfoGetAttribute_int64(info, name, out);
  if (status) {
    api().ReleaseStatus(status);
    return make_error(ORT_INVALID_ARGUMENT, where + ": missing or non-int attribute '" + name + "'");
  }
  return nullptr;
}

std::string node_name(const OrtKernelInfo* info) {
  size_t size = 0;
  OrtStatus* status = api().KernelInfo_GetNodeName(info, nullptr, &size);
  if (status) {
    api().ReleaseStatus(status);
    return {};
  }
  std::string name(size, '\0');
  status = api().KernelInfo_GetNodeName(info, name.data(), &size);
  if (status) {
    api().ReleaseStatus(status);
    return {};
  }
  name.resize(std::strlen(name.c_str()));
  return name;
}

OrtStatus* expect_shape(const std::string& where, const char* input, const TensorInfo& info,
                        ONNXTensorElementDataType type, const char* type_name,
                        const std::vector<std::int64_t>& dims) {
  if (info.type != type || info.dims != dims) {
    return make_error(ORT_INVALID_ARGUMENT, where + ": input " + input + " must be " + type_name +
                                                shape_text(dims) + ", got shape " + shape_text(info.dims) +
                                                (info.type != type ? " of another element type" : ""));
  }
  return nullptr;
}

// Checks B_packed, scales, zero_points and bias (those present) against the attributes.
OrtStatus* check_weights(const std::string& where, const Attributes& at, const TensorInfo* infos,
                         const bool* present) {
  const std::int64_t groups = num_groups(at);
  const std::int64_t tiles = num_tiles(at);
  const auto lanes = static_cast<std::int64_t>(kTileChannels);
  if (present[kPacked]) {
    GRAPHOPT_RETURN_IF_ERROR(expect_shape(where, "B_packed", infos[kPacked], ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                          "uint8", {tiles, tile_bytes(at)}));
  }
  if (present[kScales]) {
    GRAPHOPT_RETURN_IF_ERROR(expect_shape(where, "scales", infos[kScales], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                          "float32", {tiles, groups, lanes}));
  }
  if (present[kZeroPoints]) {
    GRAPHOPT_RETURN_IF_ERROR(expect_shape(where, "zero_points", infos[kZeroPoints],
                                          ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8", {tiles, groups, lanes}));
  }
  if (present[kBias]) {
    GRAPHOPT_RETURN_IF_ERROR(
        expect_shape(where, "bias", infos[kBias], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32", {at.n}));
  }
  return nullptr;
}

OrtStatus* a_shape_error(const std::string& where, const Attributes& at, const std::vector<std::int64_t>& dims) {
  return make_error(ORT_INVALID_ARGUMENT, where + ": input A has shape " + shape_text(dims) +
                                              ", its last dimension must equal attribute K=" + std::to_string(at.k));
}

// Load-time checks: A's static last dimension and the weights that are initializers
// (constant[i] tells which: compute() need not look at their shapes again).
OrtStatus* check_at_load(const OrtKernelInfo* info, const std::string& where, const Attributes& at,
                         bool* constant) {
  size_t count = 0;
  GRAPHOPT_RETURN_IF_ERROR(api().KernelInfo_GetInputCount(info, &count));
  if (count >= 1) {
    OrtTypeInfo* type_info = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(api().KernelInfo_GetInputTypeInfo(info, kA, &type_info));
    const OrtTensorTypeAndShapeInfo* tensor = nullptr;
    OrtStatus* status = api().CastTypeInfoToTensorInfo(type_info, &tensor);
    size_t rank = 0;
    std::vector<std::int64_t> dims;
    if (!status && tensor) status = api().GetDimensionsCount(tensor, &rank);
    if (!status && tensor && rank) {
      dims.assign(rank, 0);
      status = api().GetDimensions(tensor, dims.data(), rank);
    }
    api().ReleaseTypeInfo(type_info);
    GRAPHOPT_RETURN_IF_ERROR(status);
    if (!dims.empty() && dims.back() >= 0 && dims.back() != at.k) return a_shape_error(where, at, dims);
  }
  TensorInfo infos[kInputCount];
  bool present[kInputCount] = {};
  for (size_t i = kPacked; i < kInputCount && i < count; ++i) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    GRAPHOPT_RETURN_IF_ERROR(api().KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value));
    if (is_constant && value) {
      GRAPHOPT_RETURN_IF_ERROR(tensor_info(value, &infos[i]));
      present[i] = true;
    }
  }
  GRAPHOPT_RETURN_IF_ERROR(check_weights(where, at, infos, present));
  for (size_t i = 0; i < kInputCount; ++i) constant[i] = present[i];
  return nullptr;
}

OrtStatusPtr ORT_API_CALL op_create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                           void** kernel_out) {
  *kernel_out = nullptr;
  const std::string where = std::string(kOpName) + " node '" + node_name(info) + "'";
  Attributes a;
  GRAPHOPT_RETURN_IF_ERROR(kernel_int_attr(info, where, "K", &a.k));
  GRAPHOPT_RETURN_IF_ERROR(kernel_int_attr(info, where, "N", &a.n));
  GRAPHOPT_RETURN_IF_ERROR(kernel_int_attr(info, where, "bits", &a.bits));
  GRAPHOPT_RETURN_IF_ERROR(kernel_int_attr(info, where, "group_size", &a.group_size));
  OrtStatus* optional = api().KernelInfoGetAttribute_int64(info, "accuracy_level", &a.accuracy_level);
  if (optional) {  // absent: fp32 activations
    api().ReleaseStatus(optional);
    a.accuracy_level = 0;
  }
  const std::string problem = check_attributes(a);
  if (!problem.empty()) return make_error(ORT_INVALID_ARGUMENT, where + ": " + problem);
  bool constant[kInputCount] = {};
  GRAPHOPT_RETURN_IF_ERROR(check_at_load(info, where, a, constant));
  Kernel* kernel = new (std::nothrow) Kernel{a, where, &select_kernels(), min_parallel_macs(), {}};
  if (!kernel) return make_error(ORT_FAIL, where + ": out of memory");
  for (size_t i = 0; i < kInputCount; ++i) kernel->checked_at_load[i] = constant[i];
  *kernel_out = kernel;
  return nullptr;
}

void ORT_API_CALL op_destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// ---------------------------------------------------------------- compute

// The input (null when absent) and, unless skip_info (a constant already checked at load),
// its type and shape.
OrtStatus* input_info(OrtKernelContext* ctx, size_t count, size_t index, bool skip_info, const OrtValue** value,
                      TensorInfo* info) {
  *value = nullptr;
  if (index >= count) return nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api().KernelContext_GetInput(ctx, index, value));
  if (*value && !skip_info) GRAPHOPT_RETURN_IF_ERROR(tensor_info(*value, info));
  return nullptr;
}

struct ParallelJob {
  const LowBitProblem* problem;
  TileRangeKernel run;
  size_t tiles_per_task;
  std::atomic<bool> failed{false};
};

void ORT_API_CALL run_task(void* data, size_t task) {
  auto* job = static_cast<ParallelJob*>(data);
  const size_t begin = task * job->tiles_per_task;
  const size_t end = std::min(job->problem->tiles, begin + job->tiles_per_task);
  try {
    if (begin < end) job->run(*job->problem, begin, end);
  } catch (...) {  // bad_alloc from a scratch buffer; nothing else throws
    job->failed.store(true);
  }
}

OrtStatusPtr compute(const Kernel& kernel, OrtKernelContext* ctx) {
  const Attributes& at = kernel.attrs;
  const std::string& where = kernel.where;
  const OrtValue* values[kInputCount] = {};
  TensorInfo infos[kInputCount];
  size_t count = 0;
  GRAPHOPT_RETURN_IF_ERROR(api().KernelContext_GetInputCount(ctx, &count));
  for (size_t i = 0; i < kInputCount; ++i) {
    GRAPHOPT_RETURN_IF_ERROR(input_info(ctx, count, i, kernel.checked_at_load[i], &values[i], &infos[i]));
  }
  if (!values[kA] || !values[kPacked] || !values[kScales]) {
    return make_error(ORT_INVALID_ARGUMENT, where + ": inputs A, B_packed and scales are required");
  }
  const TensorInfo& a_info = infos[kA];
  if (a_info.dims.empty() || a_info.dims.back() != at.k) return a_shape_error(where, at, a_info.dims);
  const std::int64_t groups = num_groups(at);
  bool unchecked[kInputCount];  // present and not checked at load
  for (size_t i = 0; i < kInputCount; ++i) unchecked[i] = values[i] != nullptr && !kernel.checked_at_load[i];
  GRAPHOPT_RETURN_IF_ERROR(check_weights(where, at, infos, unchecked));

  std::vector<std::int64_t> out_dims = a_info.dims;
  out_dims.back() = at.n;
  size_t m = 1;
  for (size_t i = 0; i + 1 < a_info.dims.size(); ++i) {
    if (a_info.dims[i] < 0) return make_error(ORT_INVALID_ARGUMENT, where + ": negative dimension in A");
    m *= static_cast<size_t>(a_info.dims[i]);
  }
  OrtValue* output = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api().KernelContext_GetOutput(ctx, 0, out_dims.data(), out_dims.size(), &output));
  if (m == 0) return nullptr;

  auto data = [](const OrtValue* v) -> const void* {
    void* p = nullptr;
    OrtStatus* s = api().GetTensorMutableData(const_cast<OrtValue*>(v), &p);
    if (s) {
      api().ReleaseStatus(s);
      return nullptr;
    }
    return p;
  };
  void* y = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api().GetTensorMutableData(output, &y));

  LowBitProblem p;
  p.m = m;
  p.k = static_cast<size_t>(at.k);
  p.n = static_cast<size_t>(at.n);
  p.bits = static_cast<int>(at.bits);
  p.group_size = static_cast<size_t>(std::min(at.group_size, at.k));
  p.groups = static_cast<size_t>(groups);
  p.accuracy_level = static_cast<int>(at.accuracy_level);
  const size_t per_word = codes_per_word(p.bits);
  p.columns = (p.k + per_word - 1) / per_word;
  p.tiles = static_cast<size_t>(num_tiles(at));
  p.packed = static_cast<const std::uint8_t*>(data(values[kPacked]));
  p.scales = static_cast<const float*>(data(values[kScales]));
  p.zero_points = values[kZeroPoints] ? static_cast<const std::uint8_t*>(data(values[kZeroPoints])) : nullptr;
  p.bias = values[kBias] ? static_cast<const float*>(data(values[kBias])) : nullptr;
  p.y = static_cast<float*>(y);
  p.a = static_cast<const float*>(data(values[kA]));
  if (!p.a || !p.packed || !p.scales || !p.y || (values[kZeroPoints] && !p.zero_points) ||
      (values[kBias] && !p.bias)) {
    return make_error(ORT_FAIL, where + ": cannot access tensor data");
  }

  thread_local std::vector<std::uint8_t> workspace;  // operator new: aligned for floats
  try {
    workspace.resize(kernel.kernels->workspace_bytes(p));
  } catch (...) {
    return make_error(ORT_FAIL, where + ": out of memory for the kernel workspace");
  }
  kernel.kernels->prepare(p, workspace.data());

  // Small products run on the calling thread: waking a pool thread costs more than it
  // saves there (and much more when the machine is busy). Otherwise contiguous runs of
  // whole tiles, about 16 tasks, so each thread streams long stretches of B_packed.
  const double macs = static_cast<double>(p.m) * static_cast<double>(p.n) * static_cast<double>(p.k);
  size_t tiles_per_task = p.tiles;
  if (macs >= kernel.min_parallel_macs) tiles_per_task = std::max<size_t>(4, (p.tiles + 15) / 16);
  const size_t tasks = (p.tiles + tiles_per_task - 1) / tiles_per_task;
  ParallelJob job{&p, kernel.kernels->tiles, tiles_per_task};
  if (tasks == 1) {
    run_task(&job, 0);
  } else {
    GRAPHOPT_RETURN_IF_ERROR(api().KernelContext_ParallelFor(ctx, &run_task, tasks, 0, &job));
  }
  if (job.failed.load()) return make_error(ORT_FAIL, where + ": out of memory in the kernel");
  return nullptr;
}

OrtStatusPtr ORT_API_CALL op_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    return compute(*static_cast<const Kernel*>(kernel), ctx);
  } catch (const std::exception& e) {
    return make_error(ORT_FAIL, std::string(kOpName) + ": " + e.what());
  } catch (...) {
    return make_error(ORT_FAIL, std::string(kOpName) + ": unknown error");
  }
}

}  // namespace

OrtCustomOp make_matmul_lowbit_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = &op_name;
  op.GetExecutionProviderType = &op_provider;
  op.GetInputType = &op_input_type;
  op.GetInputTypeCount = &op_input_count;
  op.GetOutputType = &op_output_type;
  op.GetOutputTypeCount = &op_output_count;
  op.KernelDestroy = &op_destroy_kernel;
  op.GetInputCharacteristic = &op_input_characteristic;
  op.GetOutputCharacteristic = &op_output_characteristic;
  op.GetInputMemoryType = &op_input_memory;
  op.GetVariadicInputMinArity = &op_variadic_arity;
  op.GetVariadicInputHomogeneity = &op_variadic_homogeneity;
  op.GetVariadicOutputMinArity = &op_variadic_arity;
  op.GetVariadicOutputHomogeneity = &op_variadic_homogeneity;
  op.CreateKernelV2 = &op_create_kernel;
  op.KernelComputeV2 = &op_compute;
  op.InferOutputShapeFn = &op_infer_shape;
  op.GetStartVersion = &op_start_version;
  op.GetEndVersion = &op_end_version;
  return op;
}

}  // namespace graphopt_ext
