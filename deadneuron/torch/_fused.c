/* Fused CPU loops for SineReLU (deadneuron/torch/fused.py loads this module; the eager path is the fallback).

One pass per direction over raw float32/float64 buffers: load z, one transcendental, select, store; the same
maths as the eager path in sinerelu.py (same clamp before the transcendental, same branch choice, nan and inf
as the numpy reference). Plain C and the CPython API only, no torch headers, so it builds with any compiler
at install time (setup.py, optional: without it SineReLU stays on the eager path).

Speed: on glibc/x86-64 the loops call glibc's vector sin/cos (libmvec) through `#pragma omp declare simd`
(-fopenmp-simd, no OpenMP runtime), one clone per instruction set picked at load time (target_clones). Large
calls are split over `threads` POSIX threads that live for that call only: nothing runs between calls, so a
fork (DataLoader workers) never inherits a busy pool. The GIL is released while the loops run.
`out` may be `z` (in place): each element is read before it is written, and `omp simd` vouches for the rest.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define HAVE_PTHREADS 1
#endif

#if defined(__GLIBC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* libmvec's vector variants (_ZGV*_sinf, ...): the vectorizer calls them instead of a scalar loop. */
#pragma omp declare simd notinbranch
extern float sinf(float);
#pragma omp declare simd notinbranch
extern float cosf(float);
#pragma omp declare simd notinbranch
extern double sin(double);
#pragma omp declare simd notinbranch
extern double cos(double);
#define CLONES __attribute__((target_clones("default", "avx2", "arch=skylake-avx512")))
#else
#define CLONES
#endif

#define QUARTER_PI 0.78539816339744830962

/* Piecewise: z > 0 ? z : k*sin(min(z, 0) - pi/4). The sine sees 0 for z > 0 (never sin(+inf) = nan), and a
   nan z stays nan (it is not > 0, so it reaches the sine as itself). */
#define DEFINE_LOOPS(T, SIN, COS, SUFFIX)                                                                        \
    CLONES static void forward_piecewise_##SUFFIX(const T *z, T *out, Py_ssize_t n, T k) {     \
        _Pragma("omp simd") for (Py_ssize_t i = 0; i < n; i++) {                                                 \
            T x = z[i];                                                                                          \
            T s = k * SIN((x > 0 ? (T)0 : x) - (T)QUARTER_PI);                                                   \
            out[i] = x > 0 ? x : s;                                                                              \
        }                                                                                                        \
    }                                                                                                            \
    /* Max form: max(k*sin(z - pi/4), z), nan when either is nan (torch.maximum, np.maximum). */                \
    CLONES static void forward_max_##SUFFIX(const T *z, T *out, Py_ssize_t n, T k) {           \
        _Pragma("omp simd") for (Py_ssize_t i = 0; i < n; i++) {                                                 \
            T x = z[i];                                                                                          \
            T s = k * SIN(x - (T)QUARTER_PI);                                                                    \
            out[i] = x >= s ? x : s;                                                                             \
        }                                                                                                        \
    }                                                                                                            \
    /* grad * (z on the linear branch ? 1 : k*cos(min(z, crossing) - pi/4)); the linear branch is z > 0            \
       (piecewise, crossing = 0) or z >= crossing (max form). */                                                 \
    CLONES static void backward_##SUFFIX(const T *z, const T *g, T *out, Py_ssize_t n, \
                                         T k, T crossing, int inclusive) {                                       \
        if (inclusive) {                                                                                         \
            _Pragma("omp simd") for (Py_ssize_t i = 0; i < n; i++) {                                             \
                T x = z[i];                                                                                      \
                int linear = x >= crossing;                                                                      \
                T slope = k * COS((linear ? crossing : x) - (T)QUARTER_PI);                                      \
                out[i] = linear ? g[i] : g[i] * slope;                                                           \
            }                                                                                                    \
        } else {                                                                                                 \
            _Pragma("omp simd") for (Py_ssize_t i = 0; i < n; i++) {                                             \
                T x = z[i];                                                                                      \
                int linear = x > crossing;                                                                       \
                T slope = k * COS((linear ? crossing : x) - (T)QUARTER_PI);                                      \
                out[i] = linear ? g[i] : g[i] * slope;                                                           \
            }                                                                                                    \
        }                                                                                                        \
    }

DEFINE_LOOPS(float, sinf, cosf, f32)
DEFINE_LOOPS(double, sin, cos, f64)

typedef struct {
    int dtype64, backward, form_max, inclusive;
    const char *z, *g;
    char *out;
    Py_ssize_t n;
    double k, crossing;
} Job;

static void run_job(const Job *job) {
    if (job->dtype64) {
        const double *z = (const double *)job->z;
        double *out = (double *)job->out;
        if (job->backward)
            backward_f64(z, (const double *)job->g, out, job->n, job->k, job->crossing, job->inclusive);
        else if (job->form_max)
            forward_max_f64(z, out, job->n, job->k);
        else
            forward_piecewise_f64(z, out, job->n, job->k);
    } else {
        const float *z = (const float *)job->z;
        float *out = (float *)job->out;
        if (job->backward)
            backward_f32(z, (const float *)job->g, out, job->n, (float)job->k, (float)job->crossing,
                         job->inclusive);
        else if (job->form_max)
            forward_max_f32(z, out, job->n, (float)job->k);
        else
            forward_piecewise_f32(z, out, job->n, (float)job->k);
    }
}

#ifdef HAVE_PTHREADS
static void *thread_main(void *arg) {
    run_job((const Job *)arg);
    return NULL;
}
#endif

#define MAX_THREADS 64
#define ALIGN_ELEMENTS 64 /* split points on 256/512-byte boundaries: no cache line is shared by two threads */

/* Runs `job` over [0, n) on `threads` threads (this one included); falls back to fewer if one cannot start. */
static void run_split(const Job *job, int threads) {
#ifdef HAVE_PTHREADS
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1) {
        Job parts[MAX_THREADS];
        pthread_t ids[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        size_t width = job->dtype64 ? 8 : 4;
        Py_ssize_t share = (job->n + threads - 1) / threads;
        share = (share + ALIGN_ELEMENTS - 1) / ALIGN_ELEMENTS * ALIGN_ELEMENTS;
        int used = 0;
        for (Py_ssize_t start = 0; start < job->n; start += share, used++) {
            Job *part = &parts[used];
            *part = *job;
            part->n = job->n - start < share ? job->n - start : share;
            part->z = job->z + start * width;
            part->g = job->g ? job->g + start * width : NULL;
            part->out = job->out + start * width;
        }
        for (int t = 1; t < used; t++) started[t] = pthread_create(&ids[t], NULL, thread_main, &parts[t]) == 0;
        run_job(&parts[0]);
        for (int t = 1; t < used; t++) {
            if (started[t])
                pthread_join(ids[t], NULL);
            else
                run_job(&parts[t]);
        }
        return;
    }
#endif
    run_job(job);
}

/* forward(z, out, n, k, float64, form_max, threads): out[:n] = SineReLU(z[:n]); addresses as ints (out may be z). */
static PyObject *py_forward(PyObject *self, PyObject *args) {
    unsigned long long z, out;
    Py_ssize_t n;
    double k;
    int dtype64, form_max, threads;
    if (!PyArg_ParseTuple(args, "KKndppi", &z, &out, &n, &k, &dtype64, &form_max, &threads)) return NULL;
    Job job = {dtype64, 0, form_max, 0, (const char *)(uintptr_t)z, NULL, (char *)(uintptr_t)out, n, k, 0.0};
    Py_BEGIN_ALLOW_THREADS run_split(&job, threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* backward(z, g, out, n, k, crossing, float64, inclusive, threads): out[:n] = g * SineReLU'(z); the linear branch
   is z > crossing, or z >= crossing when `inclusive` (the max form). */
static PyObject *py_backward(PyObject *self, PyObject *args) {
    unsigned long long z, g, out;
    Py_ssize_t n;
    double k, crossing;
    int dtype64, inclusive, threads;
    if (!PyArg_ParseTuple(args, "KKKnddppi", &z, &g, &out, &n, &k, &crossing, &dtype64, &inclusive, &threads))
        return NULL;
    Job job = {dtype64, 1, 0, inclusive, (const char *)(uintptr_t)z, (const char *)(uintptr_t)g,
               (char *)(uintptr_t)out, n, k, crossing};
    Py_BEGIN_ALLOW_THREADS run_split(&job, threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", py_forward, METH_VARARGS, "forward(z, out, n, k, float64, form_max, threads)"},
    {"backward", py_backward, METH_VARARGS, "backward(z, g, out, n, k, crossing, float64, inclusive, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused SineReLU loops on raw CPU buffers.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
