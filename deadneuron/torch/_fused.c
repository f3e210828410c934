/* Fused CPU loops for SineReLU (deadneuron/torch/fused.py loads this module; the eager path is the fallback).

One pass per direction over raw float32/float64 buffers: load z, one transcendental, select, store; the same
maths as the eager path in sinerelu.py (same clamp before the transcendental, same branch choice, nan and inf
as the numpy reference). Plain C and the CPython API only, no torch headers, so it builds with any compiler
at install time (setup.py, optional: without it SineReLU stays on the eager path).

Speed: float32 on x86-64 CPUs with FMA runs our own vectorized sine (below: ~1.5x-2x fewer cycles than libmvec's
sinf/cosf on this machine, where the transcendental is the whole cost), one build per instruction set (AVX2,
AVX-512) picked at import from the CPU. Elsewhere, for float64, and for any block of inputs the own sine does not
serve (beyond its bound, inf, nan), the loops call glibc's vector sin/cos (libmvec) through `#pragma omp declare
simd` (-fopenmp-simd, no OpenMP runtime), one clone per instruction set picked at load time (target_clones). Large
calls are split over `threads` POSIX threads that live for that call only: nothing runs between calls, so a
fork (DataLoader workers) never inherits a busy pool. The GIL is released while the loops run.
`out` may be `z` (in place): each element is read before it is written, and `omp simd` vouches for the rest.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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
/* Clones by CPU feature: "arch=skylake-avx512" dispatched on the CPU model, so AMD's AVX-512 CPUs (Zen 4) ran the
   AVX2 clone; by feature they get libmvec's AVX-512 variants (float64 here: 0.92 against 1.09-1.17 ns/element). */
#define CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
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

/* Our own float32 sine, for x86-64 CPUs with FMA (AVX2 or AVX-512): it only has to serve the arguments SineReLU makes
   (finite, moderate), so it skips what a general sinf needs; measured here (per element, forward/backward, one
   thread, 150K elements): AVX-512 0.28/0.32 ns against libmvec's AVX-512 0.35/0.47, AVX2 0.37/0.47 against
   libmvec's AVX2 0.45/0.54. Inputs out of its range (below) take the libm loops above, one element at a time.

   S(t, phase) = sin(t + phase*pi/2), phase 0 (sin, forward) or 1 (cos, backward), for |t| <= FAST_BOUND:
   j = the integer nearest t/pi + phase/2, h = j - phase/2, so that t + phase*pi/2 = r + j*pi with r = t - h*pi,
   |r| <= pi/2 plus the rounding of t/pi (< 0.01 at the bound); then S = (-1)^j sin(r).
   - j: y = t/pi (+ 1/2) + 1.5*2^23 rounds to an integer in float (|y - 1.5*2^23| < 2^22), whose lowest mantissa bit
     is j's parity: shifted into the sign bit it gives (-1)^j with no integer conversion.
   - r: Cody-Waite reduction, pi = C1 + C2 + C3 (three floats; what is left is 2.1e-23), each step one FMA.
     r1 = t - h*C1 is exact (for |t| >= 1 both terms are multiples of 2^-23 and |r1| < 2; for |t| < 1 nothing
     cancels: |r| > 0.5); r2 and r3 round once each, so r stays within ~1 ulp of t - h*pi even next to a multiple of
     pi/2, as long as h*2.1e-23 is far below the smallest |r| there (exhaustive check below FAST_BOUND:
     tests/test_sinerelu_sine.py compares every float32 t in range with the float64 sine).
   - sin(r) = r + r^3 (S3 + r^2 (S5 + r^2 (S7 + r^2 S9))): coefficients fitted for this file for the least maximum
     relative error over |r| <= pi/2 + 0.02 (Lawson's iteratively reweighted least squares in float64, then rounded
     to float): 7e-9 (0.06 ulp) before the float evaluation, which adds under 1 ulp.
   FAST_BOUND = 2^16: the tests check every float below it (the rounding trick alone would hold to 2^22). */
#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_OWN_SINE 1
#define FAST_BOUND 65536.0f
#define BLOCK 512
#define IN_RANGE(x, high) ((x) >= -FAST_BOUND && (x) <= (high))
#define MAGIC 0x1.8p23f
#define C1 0x1.921fb6p+1f
#define C2 -0x1.777a5cp-24f
#define C3 -0x1.ee59dap-49f
#define INV_PI 0x1.45f306p-2f
#define S3 -0x1.55554ap-3f
#define S5 0x1.110ea6p-7f
#define S7 -0x1.9f6716p-13f
#define S9 0x1.5d3a4cp-19f

/* One definition per instruction set: the helpers are inlined into loops built for the same target. */
#define DEFINE_OWN_SINE(ISA, TARGET)                                                                         \
    __attribute__((target(TARGET), always_inline)) static inline float sine_##ISA(float t, int phase) {          \
        float y = phase ? __builtin_fmaf(t, INV_PI, 0.5f) + MAGIC : __builtin_fmaf(t, INV_PI, MAGIC);            \
        float h = (y - MAGIC) - 0.5f * (float)phase;                                                             \
        float r = __builtin_fmaf(-h, C1, t);                                                                     \
        r = __builtin_fmaf(-h, C2, r);                                                                           \
        r = __builtin_fmaf(-h, C3, r);                                                                           \
        float r2 = r * r;                                                                                        \
        float p = __builtin_fmaf(__builtin_fmaf(__builtin_fmaf(S9, r2, S7), r2, S5), r2, S3);                    \
        float s = __builtin_fmaf(r * r2, p, r);                                                                  \
        uint32_t ybits, sbits;                                                                                   \
        memcpy(&ybits, &y, 4);                                                                                   \
        memcpy(&sbits, &s, 4);                                                                                   \
        sbits ^= ybits << 31;                                                                                    \
        memcpy(&s, &sbits, 4);                                                                                   \
        return s;                                                                                                \
    }                                                                                                            \
    /* The blocks: own sine for every lane; returns whether any input was out of range (its lane holds junk). The     \
       range test shares the loop's load (a separate pass over the block cost ~20% of the loop). */                   \
    __attribute__((target(TARGET), always_inline)) static inline int forward_block_##ISA(                             \
        const float *z, float *out, Py_ssize_t n, float k, int form_max) {                                            \
        int bad = 0;                                                                                                  \
        if (form_max) {                                                                                               \
            _Pragma("omp simd reduction(|:bad)") for (Py_ssize_t i = 0; i < n; i++) {                                 \
                float x = z[i];                                                                                       \
                bad |= !(__builtin_fabsf(x) <= FAST_BOUND);                                                           \
                float s = k * sine_##ISA(x - (float)QUARTER_PI, 0);                                                   \
                out[i] = x >= s ? x : s;                                                                              \
            }                                                                                                         \
        } else {                                                                                                      \
            /* x < 0 ? x : 0 is one min instruction; x = -0 gives the same t as before (-pi/4). */                    \
            _Pragma("omp simd reduction(|:bad)") for (Py_ssize_t i = 0; i < n; i++) {                                 \
                float x = z[i];                                                                                       \
                bad |= !(x >= -FAST_BOUND);                                                                           \
                float s = k * sine_##ISA((x < 0.0f ? x : 0.0f) - (float)QUARTER_PI, 0);                               \
                out[i] = x > 0 ? x : s;                                                                               \
            }                                                                                                         \
        }                                                                                                             \
        return bad;                                                                                                   \
    }                                                                                                                 \
    /* min(x, crossing) is the argument on both sides (the linear lanes discard it): one instruction. */              \
    __attribute__((target(TARGET), always_inline)) static inline int backward_block_##ISA(                            \
        const float *z, const float *g, float *out, Py_ssize_t n, float k, float crossing, int inclusive) {           \
        int bad = 0;                                                                                                  \
        if (inclusive) {                                                                                              \
            _Pragma("omp simd reduction(|:bad)") for (Py_ssize_t i = 0; i < n; i++) {                                 \
                float x = z[i];                                                                                       \
                bad |= !(x >= -FAST_BOUND);                                                                           \
                float slope = k * sine_##ISA((x < crossing ? x : crossing) - (float)QUARTER_PI, 1);                   \
                out[i] = x >= crossing ? g[i] : g[i] * slope;                                                         \
            }                                                                                                         \
        } else {                                                                                                      \
            _Pragma("omp simd reduction(|:bad)") for (Py_ssize_t i = 0; i < n; i++) {                                 \
                float x = z[i];                                                                                       \
                bad |= !(x >= -FAST_BOUND);                                                                           \
                float slope = k * sine_##ISA((x < crossing ? x : crossing) - (float)QUARTER_PI, 1);                   \
                out[i] = x > crossing ? g[i] : g[i] * slope;                                                          \
            }                                                                                                         \
        }                                                                                                             \
        return bad;                                                                                                   \
    }                                                                                                                 \
    /* Block by block: the own sine straight into `out` (into a buffer when out is z, so that z stays readable), then,\
       if the block had inputs out of range, each of them alone redoes its element through the libm loops above       \
       (n = 1: the scalar sinf/cosf), so that an element's value never depends on its neighbours. */                  \
    __attribute__((target(TARGET))) static void forward_own_##ISA(const float *z, float *out, Py_ssize_t n,           \
                                                                  float k, int form_max) {                            \
        float high = form_max ? FAST_BOUND : INFINITY, buffer[BLOCK];                                                 \
        for (Py_ssize_t b = 0; b < n; b += BLOCK) {                                                                   \
            Py_ssize_t m = n - b < BLOCK ? n - b : BLOCK;                                                             \
            float *dst = out == z ? buffer : out + b;                                                                 \
            if (forward_block_##ISA(z + b, dst, m, k, form_max)) {                                                    \
                for (Py_ssize_t i = 0; i < m; i++) {                                                                  \
                    if (IN_RANGE(z[b + i], high)) continue;                                                           \
                    if (form_max)                                                                                     \
                        forward_max_f32(z + b + i, dst + i, 1, k);                                                    \
                    else                                                                                              \
                        forward_piecewise_f32(z + b + i, dst + i, 1, k);                                              \
                }                                                                                                     \
            }                                                                                                         \
            if (dst == buffer) memcpy(out + b, buffer, (size_t)m * sizeof(float));                                    \
        }                                                                                                             \
    }                                                                                                                 \
    __attribute__((target(TARGET))) static void backward_own_##ISA(const float *z, const float *g, float *out,        \
                                                                   Py_ssize_t n, float k, float crossing,             \
                                                                   int inclusive) {                                   \
        float buffer[BLOCK];                                                                                          \
        for (Py_ssize_t b = 0; b < n; b += BLOCK) {                                                                   \
            Py_ssize_t m = n - b < BLOCK ? n - b : BLOCK;                                                             \
            float *dst = out == z ? buffer : out + b;                                                                 \
            if (backward_block_##ISA(z + b, g + b, dst, m, k, crossing, inclusive)) {                                 \
                for (Py_ssize_t i = 0; i < m; i++)                                                                    \
                    if (!IN_RANGE(z[b + i], INFINITY))                                                                \
                        backward_f32(z + b + i, g + b + i, dst + i, 1, k, crossing, inclusive);                       \
            }                                                                                                         \
            if (dst == buffer) memcpy(out + b, buffer, (size_t)m * sizeof(float));                                    \
        }                                                                                                             \
    }                                                                                                                 \

DEFINE_OWN_SINE(avx2, "avx2,fma")
DEFINE_OWN_SINE(avx512, "avx512f,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")

typedef struct {
    void (*forward)(const float *, float *, Py_ssize_t, float, int);
    void (*backward)(const float *, const float *, float *, Py_ssize_t, float, float, int);
} OwnLoops;
static const OwnLoops own_loops[] = {{NULL, NULL}, {forward_own_avx2, backward_own_avx2},
                                     {forward_own_avx512, backward_own_avx512}};
#endif

/* Which float32 loops run: 0 the libmvec loops above, 1 our own sine with AVX2+FMA, 2 with AVX-512 (set at import
   from the CPU; `set_sine` changes it, for tests and benchmarks). */
static int own_sine_level = 0;

static int best_sine_level(void) {
#ifdef HAVE_OWN_SINE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

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
#ifdef HAVE_OWN_SINE
        if (own_sine_level > 0) {
            const OwnLoops *own = &own_loops[own_sine_level];
            if (job->backward)
                own->backward(z, (const float *)job->g, out, job->n, (float)job->k, (float)job->crossing,
                              job->inclusive);
            else
                own->forward(z, out, job->n, (float)job->k, job->form_max);
            return;
        }
#endif
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

/* set_sine(level) -> previous level: -1 leaves it, 0 the libmvec loops, up to best_sine_level() our own sine. */
static PyObject *py_set_sine(PyObject *self, PyObject *args) {
    int level, previous = own_sine_level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    if (level >= 0) own_sine_level = level < best_sine_level() ? level : best_sine_level();
    return PyLong_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"set_sine", py_set_sine, METH_VARARGS, "set_sine(level) -> previous: 0 libmvec, 1 own sine (AVX2), 2 (AVX-512)"},
    {"forward", py_forward, METH_VARARGS, "forward(z, out, n, k, float64, form_max, threads)"},
    {"backward", py_backward, METH_VARARGS, "backward(z, g, out, n, k, crossing, float64, inclusive, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused SineReLU loops on raw CPU buffers.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fused(void) {
    own_sine_level = best_sine_level();
    return PyModule_Create(&module);
}
