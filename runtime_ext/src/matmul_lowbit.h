// graphopt.MatMulLowBit custom-op definition.
#pragma once

#include <onnxruntime_c_api.h>

namespace graphopt_ext {

// The op's callback table (C API; every callback reports errors as OrtStatus).
OrtCustomOp make_matmul_lowbit_op();

}  // namespace graphopt_ext
