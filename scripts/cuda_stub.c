/* A stand-in for the CUDA driver library (libcuda.so.1) on machines without a GPU.
 *
 * sglang-kernel's extension links libcuda.so.1 for one driver call, so it cannot even be
 * imported where no NVIDIA driver is installed, although SGLang's CPU path never calls it.
 * This library satisfies the link; the call answers CUDA_ERROR_NO_DEVICE (100). */
int cuPointerGetAttribute(void *data, int attribute, unsigned long long ptr) {
    (void)data;
    (void)attribute;
    (void)ptr;
    return 100;
}
