// The only file that includes pybind11: it exposes build information to Python. The ops
// themselves are registered with TORCH_LIBRARY (registration.cpp and each kernel file), so
// loading this module is what makes torch.ops.smoe_ops.* available.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#define SMOE_STR_(...) #__VA_ARGS__
#define SMOE_STR(...) SMOE_STR_(__VA_ARGS__)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = std::string(SMOE_STR(SMOE_OPS_VERSION));
  std::vector<std::string> backends{"cpu"};
  std::vector<std::string> cuda_archs;
#ifdef SMOE_OPS_WITH_CUDA
  backends.push_back("cuda");
  // setup.py passes TORCH_CUDA_ARCH_LIST as a comma-separated list, e.g. 8.0,9.0.
  std::string archs = SMOE_STR(SMOE_OPS_CUDA_ARCHS);
  for (size_t start = 0; start < archs.size();) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    // Stringizing may put a space after each comma.
    while (start < end && archs[start] == ' ') ++start;
    if (end > start) cuda_archs.push_back(archs.substr(start, end - start));
    start = end + 1;
  }
#endif
  info["backends"] = backends;
  info["cuda_archs"] = cuda_archs;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "smoe_ops compiled kernels; the ops live in torch.ops.smoe_ops";
  m.def("build_info", &build_info, "version, compiled backends and CUDA architectures");
}
