// Library entry point: SessionOptions.register_custom_ops_library calls RegisterCustomOps.
#include <onnxruntime_c_api.h>

#include <mutex>
#include <vector>

#include "matmul_lowbit.h"
#include "ort_util.h"

namespace {

constexpr const char* kDomain = "graphopt";

// Ops and domains live until the process exits: sessions may outlive any owner we pick.
OrtCustomOp& matmul_lowbit_op() {
  static OrtCustomOp op = graphopt_ext::make_matmul_lowbit_op();
  return op;
}

std::mutex& domains_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::vector<OrtCustomOpDomain*>& domains() {
  static std::vector<OrtCustomOpDomain*>* list = new std::vector<OrtCustomOpDomain*>();
  return *list;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest ? oldest->CreateStatus(ORT_FAIL,
                                         "libgraphopt_ext: this ONNX Runtime is older than the headers it was "
                                         "built against (needs C API version 21, ORT 1.21)")
                  : nullptr;
  }
  graphopt_ext::set_api(api);
  std::lock_guard<std::mutex> lock(domains_mutex());
  OrtCustomOpDomain* domain = nullptr;
  GRAPHOPT_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
  OrtStatus* status = api->CustomOpDomain_Add(domain, &matmul_lowbit_op());
  if (!status) status = api->AddCustomOpDomain(options, domain);
  if (status) {
    api->ReleaseCustomOpDomain(domain);
    return status;
  }
  domains().push_back(domain);
  return nullptr;
}
