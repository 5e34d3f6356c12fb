// The Python module equinorm_kernels._C: what this build contains.
// Kernels register themselves with the dispatcher (TORCH_LIBRARY blocks) when this library loads;
// the module itself only reports how it was built, so Python can check it matches the running torch.
#include <Python.h>

#ifndef EQUINORM_WITH_CUDA
#define EQUINORM_WITH_CUDA 0
#endif
#ifndef EQUINORM_CUDA_ARCH_LIST
#define EQUINORM_CUDA_ARCH_LIST ""
#endif

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of equinorm_kernels (build information; ops are in torch.ops.equinorm_kernels).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", EQUINORM_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", EQUINORM_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "cuda_arch_list", EQUINORM_CUDA_ARCH_LIST) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
