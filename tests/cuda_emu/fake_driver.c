/* fake_driver.c - stands in for the NVIDIA driver (libcuda.so.1) when the CUDA backend's tests
 * run on the CPU emulation: the two entry points engine/backend.c probes, reporting one
 * device. Only ever on LD_LIBRARY_PATH for `make cuda-emu-test`. */
int cuInit(unsigned flags);
int cuDeviceGetCount(int *n);

int cuInit(unsigned flags) {
    (void)flags;
    return 0;
}

int cuDeviceGetCount(int *n) {
    *n = 1;
    return 0;
}
