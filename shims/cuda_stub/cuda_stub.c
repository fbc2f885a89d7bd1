/*
 * A stand-in libcuda.so.1 for machines without an NVIDIA driver.
 *
 * Only needed for the CUDA build of Mooncake (`mooncake-transfer-engine`), whose engine.so links
 * libcuda.so.1 directly; scripts/install_pd_cpu.sh installs the CUDA-free build
 * (`mooncake-transfer-engine-non-cuda`) by default and builds this stub only with
 * ELDR_MOONCAKE_VARIANT=cuda. Every driver entry point the Mooncake libraries import reports
 * CUDA_ERROR_NO_DEVICE (100), so any CUDA-memory probe fails cleanly and host memory is used.
 * cuGetErrorString/cuGetErrorName succeed so that error messages print.
 *
 * The list below is checked against the installed wheel at install time (every undefined `cu*`
 * symbol of the .so files in the mooncake package must be exported here); extend it if a newer
 * Mooncake needs more.
 *
 *   cc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o libcuda.so.1 cuda_stub.c
 */

#include <stddef.h>

typedef int CUresult;
#define CUDA_ERROR_NO_DEVICE 100

/* Arguments are ignored: on x86-64 System V a callee that takes none is call-compatible. */
#define NO_DEVICE(name) \
    __attribute__((visibility("default"))) CUresult name(void) { return CUDA_ERROR_NO_DEVICE; }

NO_DEVICE(cuInit)
NO_DEVICE(cuDriverGetVersion)
NO_DEVICE(cuDeviceGet)
NO_DEVICE(cuDeviceGetCount)
NO_DEVICE(cuDeviceGetAttribute)
NO_DEVICE(cuDevicePrimaryCtxRetain)
NO_DEVICE(cuDevicePrimaryCtxRelease_v2)
NO_DEVICE(cuCtxGetDevice)
NO_DEVICE(cuCtxSetCurrent)
NO_DEVICE(cuGetProcAddress)
NO_DEVICE(cuGetProcAddress_v2)
NO_DEVICE(cuMemAddressFree)
NO_DEVICE(cuMemAddressReserve)
NO_DEVICE(cuMemCreate)
NO_DEVICE(cuMemExportToShareableHandle)
NO_DEVICE(cuMemGetAddressRange_v2)
NO_DEVICE(cuMemGetAllocationGranularity)
NO_DEVICE(cuMemGetHandleForAddressRange)
NO_DEVICE(cuMemImportFromShareableHandle)
NO_DEVICE(cuMemMap)
NO_DEVICE(cuMemRelease)
NO_DEVICE(cuMemRetainAllocationHandle)
NO_DEVICE(cuMemSetAccess)
NO_DEVICE(cuMemUnmap)
NO_DEVICE(cuPointerGetAttribute)
NO_DEVICE(cuPointerSetAttribute)

static const char *describe(CUresult error) {
    switch (error) {
    case 0: return "no error";
    case CUDA_ERROR_NO_DEVICE: return "no CUDA-capable device is detected (ELDR libcuda stub)";
    default: return "CUDA driver unavailable (ELDR libcuda stub)";
    }
}

__attribute__((visibility("default"))) CUresult cuGetErrorString(CUresult error, const char **str) {
    if (str != NULL) *str = describe(error);
    return 0;
}

__attribute__((visibility("default"))) CUresult cuGetErrorName(CUresult error, const char **str) {
    if (str != NULL) *str = error == 0 ? "CUDA_SUCCESS" : error == CUDA_ERROR_NO_DEVICE ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN";
    return 0;
}
