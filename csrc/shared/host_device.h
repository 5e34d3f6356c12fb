// Lets one formula compile for the host (CPU kernels, C++ glue) and for the device (CUDA kernels).
#pragma once

#if defined(__CUDACC__)
#define EQUINORM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EQUINORM_HOST_DEVICE inline
#endif
