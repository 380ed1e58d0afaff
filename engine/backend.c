/* backend.c - choosing a backend: the CPU one linked in, or the CUDA one loaded at run time.
 *
 * The CUDA backend is a shared library (libtidald-cuda.so, built from engine/cuda/) linked
 * against the CUDA runtime and cuBLAS. The daemon itself links neither: it probes for the
 * NVIDIA driver (libcuda.so.1) with dlopen and only then loads the library. So one binary
 * runs on a machine with no driver, no CUDA runtime and no GPU (the CPU path), and on a GPU
 * machine it takes the GPU. See docs/DEVELOPING.md, "The CUDA backend".
 */
#define _GNU_SOURCE
#include "backend.h"
#include "../base/err.h"

#include <dlfcn.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CUDA_LIB_NAME "libtidald-cuda.so"

/* How many GPUs the driver sees (0 when there is no driver); why in why[]. */
static int driver_devices(char *why, size_t cap) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(why, cap, "no NVIDIA driver (libcuda.so.1 cannot be loaded)");
        return 0;
    }
    /* the driver API's C signatures: CUresult is an int-sized enum, 0 meaning success */
    int (*cu_init)(unsigned) = (int (*)(unsigned))dlsym(h, "cuInit");
    int (*cu_count)(int *) = (int (*)(int *))dlsym(h, "cuDeviceGetCount");
    int n = 0, rc = -1;
    if (cu_init && cu_count && (rc = cu_init(0)) == 0 && cu_count(&n) != 0) n = 0;
    if (n <= 0) {
        if (rc != 0)
            snprintf(why, cap, "the NVIDIA driver did not initialise (cuInit error %d)", rc);
        else
            snprintf(why, cap, "the NVIDIA driver sees no GPU");
        n = 0;
    }
    /* the handle stays open: the CUDA runtime loads the same library again */
    return n;
}

/* Load libtidald-cuda.so: $TIDALD_CUDA_LIB, next to the executable, ../lib/tidald/ from it,
 * then the loader's search path. */
static void *load_cuda_lib(char *why, size_t cap) {
    const char *env = getenv("TIDALD_CUDA_LIB");
    if (env && *env) {
        void *h = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        if (!h) snprintf(why, cap, "TIDALD_CUDA_LIB=%.100s: %.120s", env, dlerror());
        return h;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = 0;
        const char *dir = dirname(exe);
        const char *rel[] = {"/" CUDA_LIB_NAME, "/../lib/tidald/" CUDA_LIB_NAME};
        for (size_t i = 0; i < sizeof(rel) / sizeof(rel[0]); i++) {
            char path[PATH_MAX + 64];
            snprintf(path, sizeof(path), "%s%s", dir, rel[i]);
            if (access(path, R_OK) != 0) continue;
            void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            if (h) return h;
            snprintf(why, cap, "%.120s: %.120s", path, dlerror());
            return NULL;
        }
    }
    void *h = dlopen(CUDA_LIB_NAME, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        snprintf(why, cap,
                 "this tidald was built without the CUDA backend (%s not found; build with "
                 "nvcc present, or set TIDALD_CUDA_LIB)",
                 CUDA_LIB_NAME);
    return h;
}

static int open_cuda(eng_backend_t **out, char *why, size_t cap) {
    if (driver_devices(why, cap) == 0) return ENG_EUNSUPPORTED;
    void *h = load_cuda_lib(why, cap);
    if (!h) return ENG_EUNSUPPORTED;
    eng_cuda_abi_fn abi = (eng_cuda_abi_fn)dlsym(h, ENG_CUDA_ABI_SYMBOL);
    eng_cuda_create_fn create = (eng_cuda_create_fn)dlsym(h, ENG_CUDA_CREATE_SYMBOL);
    if (!abi || !create || abi() != ENG_CUDA_ABI) {
        snprintf(why, cap, "%s does not match this tidald (backend ABI %d, want %d)", CUDA_LIB_NAME,
                 abi ? abi() : -1, ENG_CUDA_ABI);
        return ENG_EUNSUPPORTED;
    }
    return create(out, 0, why, cap);
}

int eng_backend_open(eng_backend_t **out, eng_device_t dev, int n_threads, char *msg) {
    *out = NULL;
    if (dev == ENG_DEVICE_CUDA || dev == ENG_DEVICE_AUTO) {
        char why[ENG_ERRMSG_LEN] = "";
        int rc = open_cuda(out, why, sizeof(why));
        if (rc == 0) return 0;
        if (dev == ENG_DEVICE_CUDA)
            return eng_fail(msg, rc < 0 ? rc : ENG_EUNSUPPORTED, "--device cuda: %s", why);
        /* AUTO: a GPU that is present but unusable is worth a line; no GPU at all is not */
        if (strncmp(why, "no NVIDIA driver", 16) != 0 && strstr(why, "sees no GPU") == NULL)
            fprintf(stderr, "tidald: warning: GPU not used (%s); running on the CPU\n", why);
    } else if (dev != ENG_DEVICE_CPU) {
        return eng_fail(msg, ENG_EINVAL, "unknown device %d", (int)dev);
    }
    return eng_cpu_backend_create(out, n_threads, msg);
}
