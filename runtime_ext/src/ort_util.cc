#include "ort_util.h"

namespace graphopt_ext {
namespace {
const OrtApi* g_api = nullptr;
}  // namespace

const OrtApi& api() { return *g_api; }
void set_api(const OrtApi* value) { g_api = value; }

OrtStatus* tensor_info(const OrtValue* value, TensorInfo* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api().GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = api().GetTensorElementType(info, &out->type);
  if (!status) status = api().GetDimensionsCount(info, &rank);
  if (!status) {
    out->dims.assign(rank, 0);
    status = api().GetDimensions(info, out->dims.data(), rank);
  }
  api().ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

std::string shape_text(const std::vector<std::int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(dims[i]);
  }
  return text + "]";
}

}  // namespace graphopt_ext
