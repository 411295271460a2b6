// Small helpers over ONNX Runtime's C API (no exceptions cross the library boundary).
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace graphopt_ext {

// The API table, set once by RegisterCustomOps.
const OrtApi& api();
void set_api(const OrtApi* api);

// Returns the status from the enclosing function when expr fails.
#define GRAPHOPT_RETURN_IF_ERROR(expr)      \
  do {                                      \
    OrtStatus* graphopt_status_ = (expr);   \
    if (graphopt_status_) return graphopt_status_; \
  } while (0)

inline OrtStatus* make_error(OrtErrorCode code, const std::string& message) {
  return api().CreateStatus(code, message.c_str());
}

// Shape and element type of a tensor value.
struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<std::int64_t> dims;
};

OrtStatus* tensor_info(const OrtValue* value, TensorInfo* out);

std::string shape_text(const std::vector<std::int64_t>& dims);

}  // namespace graphopt_ext
