/* emu_runtime.cpp - a CPU emulation of the CUDA runtime, cuBLAS and the thread model, enough
 * to run tidald's CUDA backend (engine/cuda/) and its parity tests on a machine without a GPU.
 *
 * Work runs synchronously when queued; a stream being captured records it instead, and a
 * graph launch runs the records. Blocks run one at a time, their threads as ucontext fibers
 * switched only at __syncthreads() and warp operations (see emu_device.h). Device memory is
 * host memory. This is a test harness: it checks the kernels' logic and indexing, not their
 * speed or their behaviour under real concurrency.
 */
#include "emu_device.h"
#include "include/cublas_v2.h"

#include <atomic>
#include <stdio.h>
#include <stdlib.h>
#include <vector>

dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;
void *emu_dyn_smem;

/* ---- fibers ---- */

/* A context switch of our own (x86-64 System V): save the callee-saved registers on the
 * current stack, store its pointer in *from, load to and restore. ucontext's swapcontext
 * would make a system call per switch, and a block switches at every warp operation. */
extern "C" void emu_swap(void **from, void *to);
__asm__(".text\n"
        ".globl emu_swap\n"
        ".type emu_swap,@function\n"
        "emu_swap:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size emu_swap, .-emu_swap\n");

enum { F_RUN, F_BLOCK_BAR, F_WARP_BAR, F_DONE };
enum { STACK = 128 * 1024, MAX_THREADS = 1024 };

struct fiber_t {
    void *sp;
    int state;
};

static fiber_t fibers[MAX_THREADS];
static char *stacks;
static void *sched_sp;
static int cur, n_threads;
static const std::function<void()> *body;
static uint64_t slots[MAX_THREADS / 32][32], snap[MAX_THREADS / 32][32];

static void yield_to_scheduler() {
    emu_swap(&fibers[cur].sp, sched_sp);
}

static void fiber_main() {
    (*body)();
    fibers[cur].state = F_DONE;
    yield_to_scheduler(); /* never resumed */
    abort();
}

/* A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment. */
static void *fresh_stack(int t) {
    uintptr_t top = ((uintptr_t)(stacks + (size_t)(t + 1) * STACK)) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;                             /* fiber_main's return address: never used */
    *--sp = (void *)fiber_main;                  /* popped by emu_swap's ret */
    for (int i = 0; i < 6; i++) *--sp = nullptr; /* rbp rbx r12-r15 */
    return sp;
}

void __syncthreads() {
    fibers[cur].state = F_BLOCK_BAR;
    yield_to_scheduler();
}

const uint64_t *emu_warp_exchange(uint64_t v) {
    int w = cur / 32;
    slots[w][cur % 32] = v;
    fibers[cur].state = F_WARP_BAR;
    yield_to_scheduler();
    return snap[w];
}

static void set_tid(int t) {
    emu_threadIdx = dim3(t % emu_blockDim.x, t / emu_blockDim.x % emu_blockDim.y,
                         t / (emu_blockDim.x * emu_blockDim.y));
}

static void run_block() {
    for (int t = 0; t < n_threads; t++) {
        fibers[t].sp = fresh_stack(t);
        fibers[t].state = F_RUN;
    }
    for (;;) {
        bool ran = false;
        for (int t = 0; t < n_threads; t++) {
            if (fibers[t].state != F_RUN) continue;
            cur = t;
            set_tid(t);
            emu_swap(&sched_sp, fibers[t].sp);
            ran = true;
        }
        /* open the barriers every live participant has reached */
        bool opened = false;
        for (int w = 0; w * 32 < n_threads; w++) {
            int live = 0, at = 0;
            for (int l = 0; l < 32 && w * 32 + l < n_threads; l++) {
                int s = fibers[w * 32 + l].state;
                live += s != F_DONE;
                at += s == F_WARP_BAR;
            }
            if (at && at == live) {
                if (live != 32 && w * 32 + 32 <= n_threads) {
                    fprintf(stderr, "emu: warp operation with exited lanes (warp %d)\n", w);
                    abort();
                }
                memcpy(snap[w], slots[w], sizeof(snap[w]));
                for (int l = 0; l < 32 && w * 32 + l < n_threads; l++)
                    if (fibers[w * 32 + l].state == F_WARP_BAR) fibers[w * 32 + l].state = F_RUN;
                opened = true;
            }
        }
        int live = 0, at = 0;
        for (int t = 0; t < n_threads; t++) {
            live += fibers[t].state != F_DONE;
            at += fibers[t].state == F_BLOCK_BAR;
        }
        if (!live) return;
        if (at && at == live) {
            for (int t = 0; t < n_threads; t++)
                if (fibers[t].state == F_BLOCK_BAR) fibers[t].state = F_RUN;
            opened = true;
        }
        if (!ran && !opened) {
            fprintf(stderr,
                    "emu: deadlock in block (%u,%u,%u): threads wait at different "
                    "barriers\n",
                    emu_blockIdx.x, emu_blockIdx.y, emu_blockIdx.z);
            abort();
        }
    }
}

void emu_run_grid(dim3 g, dim3 b, size_t shm, const std::function<void()> &fn) {
    n_threads = (int)(b.x * b.y * b.z);
    if (n_threads < 1 || n_threads > MAX_THREADS) {
        fprintf(stderr, "emu: block of %d threads\n", n_threads);
        abort();
    }
    if (!stacks && !(stacks = (char *)malloc((size_t)MAX_THREADS * STACK))) abort();
    static std::vector<unsigned char> dyn;
    dyn.assign(shm ? shm : 1, 0xff); /* uninitialised shared memory reads as NaN */
    emu_dyn_smem = dyn.data();
    emu_gridDim = g;
    emu_blockDim = b;
    body = &fn;
    for (unsigned z = 0; z < g.z; z++)
        for (unsigned y = 0; y < g.y; y++)
            for (unsigned x = 0; x < g.x; x++) {
                emu_blockIdx = dim3(x, y, z);
                run_block();
            }
}

/* ---- streams, capture, graphs ---- */

struct emu_stream {
    bool capturing;
    std::vector<std::function<void()>> rec;
};
struct emu_graph {
    std::vector<std::function<void()>> ops;
};
struct emu_event {
    int dummy;
};

bool emu_capturing(cudaStream_t st) {
    return st && st->capturing;
}
void emu_record(cudaStream_t st, std::function<void()> fn) {
    st->rec.push_back(std::move(fn));
}

/* Queue host-side work on a stream: now, or into the recording. */
static cudaError_t enqueue(cudaStream_t st, std::function<void()> fn) {
    if (emu_capturing(st)) {
        emu_record(st, std::move(fn));
        return cudaSuccess;
    }
    fn();
    return cudaSuccess;
}

static cudaError_t last_error = cudaSuccess;

extern "C" {

cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int dev) {
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "tidald CPU emulation of device %d", dev);
    p->major = 9;
    p->minor = 0;
    p->totalGlobalMem = (size_t)4 << 30;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int dev) {
    (void)dev;
    *v = a == cudaDevAttrMemoryClockRate ? 1000000 : 1024;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) {
    (void)dev;
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    (void)flags;
    *s = new emu_stream();
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    delete s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    return emu_capturing(s) ? cudaErrorStreamCapture : cudaSuccess;
}
cudaError_t cudaMalloc(void **p, size_t n) {
    *p = malloc(n ? n : 1);
    if (*p) memset(*p, 0xa5, n); /* device memory starts as garbage */
    return *p ? cudaSuccess : (last_error = cudaErrorMemoryAllocation);
}
cudaError_t cudaFree(void *p) {
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **p, size_t n) {
    *p = malloc(n ? n : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFreeHost(void *p) {
    free(p);
    return cudaSuccess;
}
/* Bytes copied from the device to the host so far: tests read it (dlsym) to check what a
 * step brings back, e.g. one id per greedy token instead of a vocabulary of logits. */
static std::atomic<unsigned long long> d2h_bytes{0};
__attribute__((visibility("default"))) unsigned long long emu_d2h_bytes(void) {
    return d2h_bytes.load();
}
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k) {
    if (k == cudaMemcpyDeviceToHost) d2h_bytes += n;
    memcpy(d, s, n);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    if (emu_capturing(st)) return last_error = cudaErrorStreamCapture; /* not used in graphs */
    if (k == cudaMemcpyDeviceToHost) d2h_bytes += n;
    memcpy(d, s, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st) {
    return enqueue(st, [=]() { memset(d, v, n); });
}
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total) {
    *free_b = (size_t)3 << 30;
    *total = (size_t)4 << 30;
    return cudaSuccess;
}
cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : "emulated CUDA error";
}
cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = new emu_event();
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t st) {
    (void)e, (void)st;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    (void)e;
    return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    (void)a, (void)b;
    *ms = 1.0f;
    return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t st, cudaStreamCaptureMode m) {
    (void)m;
    if (st->capturing) return cudaErrorStreamCapture;
    st->capturing = true;
    st->rec.clear();
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t st, cudaGraph_t *g) {
    if (!st->capturing) return cudaErrorStreamCapture;
    st->capturing = false;
    *g = new emu_graph{std::move(st->rec)};
    st->rec.clear();
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long flags) {
    (void)flags;
    *e = new emu_graph{g->ops};
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t st) {
    if (emu_capturing(st)) return cudaErrorStreamCapture;
    for (auto &op : e->ops) op();
    return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
    delete e;
    return cudaSuccess;
}
cudaError_t emu_func_set_attribute(void) {
    return cudaSuccess;
}

/* ---- cuBLAS: column-major GEMM, FP32 accumulation ---- */

struct emu_blas {
    cudaStream_t st;
};

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = new emu_blas{nullptr};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t st) {
    h->st = st;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes) {
    (void)h, (void)ws, (void)bytes;
    return CUBLAS_STATUS_SUCCESS;
}

static float load(cudaDataType_t t, const void *p, size_t i) {
    if (t == CUDA_R_16F) return eng_f16_to_f32(((const uint16_t *)p)[i]);
    if (t == CUDA_R_16BF) return eng_bf16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* C = alpha op(A) op(B) + beta C, column-major */
static cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, float alpha, const void *A, cudaDataType_t at, int lda,
                           const void *B, cudaDataType_t bt, int ldb, float beta, float *C,
                           int ldc) {
    return enqueue(h->st,
                   [=]() {
                       for (int j = 0; j < n; j++)
                           for (int i = 0; i < m; i++) {
                               float acc = 0;
                               for (int p = 0; p < k; p++) {
                                   size_t ai = ta == CUBLAS_OP_N ? (size_t)p * lda + i
                                                                 : (size_t)i * lda + p;
                                   size_t bi = tb == CUBLAS_OP_N ? (size_t)j * ldb + p
                                                                 : (size_t)p * ldb + j;
                                   acc += load(at, A, ai) * load(bt, B, bi);
                               }
                               float *c = C + (size_t)j * ldc + i;
                               *c = alpha * acc + (beta != 0 ? beta * *c : 0);
                           }
                   }) == cudaSuccess
               ? CUBLAS_STATUS_SUCCESS
               : CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda,
                           const float *B, int ldb, const float *beta, float *C, int ldc) {
    return gemm(h, ta, tb, m, n, k, *alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, *beta, C, ldc);
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType_t at,
                            int lda, const void *B, cudaDataType_t bt, int ldb, const void *beta,
                            void *C, cudaDataType_t ct, int ldc, cublasComputeType_t comp,
                            cublasGemmAlgo_t algo) {
    (void)algo;
    if (ct != CUDA_R_32F || comp != CUBLAS_COMPUTE_32F || at != bt)
        return CUBLAS_STATUS_INVALID_VALUE;
    return gemm(h, ta, tb, m, n, k, *(const float *)alpha, A, at, lda, B, bt, ldb,
                *(const float *)beta, (float *)C, ldc);
}

} /* extern "C" */
