// The Python module nasops._C. Importing it runs the TORCH_LIBRARY blocks of
// the other translation units; build_info() tells nasops.backends() what was
// compiled in.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nasops compiled kernels (ops live under torch.ops.nasops)";
  m.def("build_info", []() {
    py::dict info;
#ifdef NASOPS_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
