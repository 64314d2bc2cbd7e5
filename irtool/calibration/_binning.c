/* Histogram kernels for irtool.calibration.observers, as an optional compiled module.

   count(values, scale, half, counts) -> (low, high, counted): the values' min and max, and, when every value v
   has floor(v * scale) + half within [0, len(counts)), adds to counts[b] the number of values in bin b: the same
   float32 arithmetic as the numpy path (Histogram._bin_index). scale is a power of two, so v * scale and its floor
   are exact and both paths give the same counts bit for bit. When a value is outside, NaN or infinite, nothing is
   counted (counted is False); with a NaN or an infinity, low and high are NaN.
   numpy needs five passes over the values and three temporaries to bin (multiply, floor, add, cast, then
   bincount, which casts to intp again and scans for the maximum) and two more for the extremes: ~3.8 ns a value
   on the benchmark machine against ~1.2 here, and the binning is the largest cost of histogram calibration
   after ONNX Runtime's inference. The extremes and the range check share one vectorized pass, which leaves the
   counting loop without a check. Four partial histograms let consecutive values that fall in one bin (ReLU's
   zeros) increment different memory instead of waiting on each other. The GIL is released while counting.

   extremes(values) -> (low, high): that first pass alone, for a histogram that has no range yet.

   divergences(mags, cuts, levels, out): observers.kl_divergences for every cut, the same arithmetic as
   observers._PrefixSums in one loop instead of ~40 numpy calls on [cuts, levels] arrays (the entropy search
   cost the ViT of bench/quant_bench.py 0.18 s of a 2.5 s calibration in numpy). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 4
#define WIDE 32

/* floorf is one instruction with SSE4.1 (roundss) and a library call on baseline x86-64 (~3 ns a value, no
   faster than numpy), and the extremes pass runs twice as wide with AVX2: compile clones, which the loader picks
   on CPUs that have them. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__)
#define CLONES __attribute__((target_clones("avx2", "sse4.1", "default")))
#else
#define CLONES
#endif

/* Partial counts are 32-bit (half the cache footprint of 64-bit ones) and flushed every CHUNK values. */
#define CHUNK ((Py_ssize_t)1 << 30)

typedef struct {
    float low, high;
    int finite;
} Extremes;

/* WIDE independent running results: one running min is a chain of dependent operations, and compilers vectorize
   an IEEE min reduction only under -ffast-math, but they do vectorize WIDE of them side by side. A NaN never wins
   a comparison, so it shows only in `poison`, the sum of v * 0, which an infinity makes NaN too. */
CLONES static Extremes extremes_of(const float *values, Py_ssize_t n) {
    float low[WIDE], high[WIDE], poison[WIDE];
    for (int lane = 0; lane < WIDE; lane++) {
        low[lane] = INFINITY;
        high[lane] = -INFINITY;
        poison[lane] = 0.0f;
    }
    Py_ssize_t i = 0;
    for (; i + WIDE <= n; i += WIDE)
        for (int lane = 0; lane < WIDE; lane++) {
            float v = values[i + lane];
            low[lane] = v < low[lane] ? v : low[lane];
            high[lane] = v > high[lane] ? v : high[lane];
            poison[lane] += v * 0.0f;
        }
    for (; i < n; i++) {
        float v = values[i];
        low[0] = v < low[0] ? v : low[0];
        high[0] = v > high[0] ? v : high[0];
        poison[0] += v * 0.0f;
    }
    Extremes out = {INFINITY, -INFINITY, 1};
    for (int lane = 0; lane < WIDE; lane++) {
        out.low = low[lane] < out.low ? low[lane] : out.low;
        out.high = high[lane] > out.high ? high[lane] : out.high;
        out.finite &= poison[lane] == 0.0f;
    }
    if (!out.finite)
        out.low = out.high = NAN;
    return out;
}

static void flush(uint32_t *partial, int64_t *counts, int64_t bins) {
    for (int64_t b = 0; b < bins; b++) {
        int64_t total = 0;
        for (int lane = 0; lane < LANES; lane++)
            total += partial[lane * bins + b];
        counts[b] += total;
    }
    memset(partial, 0, sizeof(uint32_t) * LANES * (size_t)bins);
}

/* Every value's bin must be within [0, bins): the caller checked the extremes. */
CLONES static void count_values(const float *values, Py_ssize_t n, float scale, int64_t half, int64_t *counts,
                                int64_t bins, uint32_t *partial) {
    for (Py_ssize_t start = 0; start < n; start += CHUNK) {
        Py_ssize_t end = n - start < CHUNK ? n : start + CHUNK, i = start;
        for (; i + LANES <= end; i += LANES)
            for (int lane = 0; lane < LANES; lane++)
                partial[lane * bins + (int64_t)floorf(values[i + lane] * scale) + half]++;
        for (; i < end; i++)
            partial[(int64_t)floorf(values[i] * scale) + half]++;
        flush(partial, counts, bins);
    }
}

/* Whether every value lands in a bin: the scaled extremes within [-half, bins - half). Monotone, as the
   scaling and the floor are, so the extremes decide for every value. */
static int inside(Extremes e, float scale, int64_t half, int64_t bins) {
    return e.finite && e.low * scale >= (float)-half && e.high * scale < (float)(bins - half);
}

static int float32_buffer(Py_buffer *values) {
    if (values->itemsize != sizeof(float) || !PyBuffer_IsContiguous(values, 'C')) {
        PyErr_SetString(PyExc_TypeError, "takes contiguous float32 values");
        return 0;
    }
    return 1;
}

static PyObject *count(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer values, counts;
    float scale;
    long long half;
    if (!PyArg_ParseTuple(args, "y*fLw*", &values, &scale, &half, &counts))
        return NULL;
    PyObject *result = NULL;
    if (!float32_buffer(&values))
        goto done;
    if (counts.itemsize != sizeof(int64_t) || !PyBuffer_IsContiguous(&counts, 'C')) {
        PyErr_SetString(PyExc_TypeError, "count() takes contiguous int64 counts");
        goto done;
    }
    Py_ssize_t n = values.len / (Py_ssize_t)sizeof(float);
    int64_t bins = counts.len / (Py_ssize_t)sizeof(int64_t);
    uint32_t *partial = PyMem_RawCalloc((size_t)(LANES * bins), sizeof(uint32_t));
    if (bins && !partial) {
        PyErr_NoMemory();
        goto done;
    }
    Extremes e;
    int counted;
    Py_BEGIN_ALLOW_THREADS
    e = extremes_of((const float *)values.buf, n);
    counted = inside(e, scale, half, bins);
    if (counted)
        count_values((const float *)values.buf, n, scale, (int64_t)half, (int64_t *)counts.buf, bins, partial);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(partial);
    result = Py_BuildValue("ddO", (double)e.low, (double)e.high, counted ? Py_True : Py_False);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&counts);
    return result;
}

static PyObject *extremes(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer values;
    if (!PyArg_ParseTuple(args, "y*", &values))
        return NULL;
    PyObject *result = NULL;
    if (float32_buffer(&values)) {
        Extremes e;
        Py_BEGIN_ALLOW_THREADS
        e = extremes_of((const float *)values.buf, values.len / (Py_ssize_t)sizeof(float));
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("dd", (double)e.low, (double)e.high);
    }
    PyBuffer_Release(&values);
    return result;
}

/* ------------------------------------------------------------------------------------ KL divergences */

typedef struct {
    double *mass, *filled, *mlogm; /* prefix sums, n + 1 each: of the counts, of non-empty bins, of m log m */
    double total;
} Prefix;

static int prefix_sums(const double *mags, Py_ssize_t n, Prefix *p) {
    p->mass = PyMem_RawMalloc(sizeof(double) * 3 * (size_t)(n + 1));
    if (!p->mass)
        return 0;
    p->filled = p->mass + n + 1;
    p->mlogm = p->filled + n + 1;
    p->mass[0] = p->filled[0] = p->mlogm[0] = 0.0;
    for (Py_ssize_t b = 0; b < n; b++) {
        double m = mags[b];
        p->mass[b + 1] = p->mass[b] + m;
        p->filled[b + 1] = p->filled[b] + (m > 0.0);
        p->mlogm[b + 1] = p->mlogm[b] + (m > 0.0 ? m * log(m) : 0.0);
    }
    p->total = p->mass[n];
    return 1;
}

/* One cut's divergence, as observers._PrefixSums.divergences computes it (see there for the algebra). */
static double divergence(const Prefix *p, const double *mags, int64_t cut, int64_t levels) {
    double unclipped = p->mass[cut], chunk_terms = 0.0, last_density = 0.0;
    if (!(unclipped > 0.0))
        return INFINITY;
    /* Chunk j ends at ceil((j + 1) * cut / levels): its quotient and remainder by levels advance by those of cut
       (an integer division per chunk was half the time of this loop). */
    int64_t step = cut / levels, carry = cut % levels, end = (cut + levels - 1) / levels,
            rest = (cut + levels - 1) % levels, start = 0;
    for (int64_t j = 0; j < levels; j++) {
        double sums = p->mass[end] - p->mass[start], used = p->filled[end] - p->filled[start];
        double density = (sums > 0.0 ? sums : 1.0) / ((used > 1.0 ? used : 1.0) * unclipped);
        last_density = density;
        if (sums > 0.0)
            chunk_terms += sums * log(density);
        start = end;
        end += step;
        rest += carry;
        if (rest >= levels) {
            rest -= levels;
            end++;
        }
    }
    double last = mags[cut - 1], total = p->total;
    double q_last = last > 0.0 ? last_density : 0.0;
    if (q_last < 1e-12)
        q_last = 1e-12;
    double p_last = (last + total - unclipped) / total;
    double body = (p->mlogm[cut - 1] - log(total) * p->mass[cut - 1]) / total;
    body -= (chunk_terms - (last > 0.0 ? last * log(last_density) : 0.0)) / total;
    double tail = p_last > 0.0 ? p_last * log(p_last / q_last) : 0.0;
    return body + tail;
}

static PyObject *divergences(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer mags, cuts, out;
    long long levels;
    if (!PyArg_ParseTuple(args, "y*y*Lw*", &mags, &cuts, &levels, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = mags.len / (Py_ssize_t)sizeof(double), count = cuts.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *cut = cuts.buf;
    if (mags.itemsize != sizeof(double) || cuts.itemsize != sizeof(int64_t) || out.itemsize != sizeof(double) ||
        out.len != (Py_ssize_t)sizeof(double) * count || !PyBuffer_IsContiguous(&mags, 'C') ||
        !PyBuffer_IsContiguous(&cuts, 'C') || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_TypeError, "divergences() takes float64 mags, int64 cuts and a float64 out per cut");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (levels < 1 || cut[i] < levels || cut[i] > n) {
            PyErr_Format(PyExc_ValueError, "cut %lld outside [levels, bins]", (long long)cut[i]);
            goto done;
        }
    Prefix p;
    if (!prefix_sums(mags.buf, n, &p)) {
        PyErr_NoMemory();
        goto done;
    }
    double *divs = out.buf;
    for (Py_ssize_t i = 0; i < count; i++)
        divs[i] = p.total > 0.0 ? divergence(&p, mags.buf, cut[i], levels) : INFINITY;
    PyMem_RawFree(p.mass);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&mags);
    PyBuffer_Release(&cuts);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS, "count(values, scale, half, counts) -> (low, high, counted)"},
    {"extremes", extremes, METH_VARARGS, "extremes(values) -> (low, high), NaN for both when one is not finite"},
    {"divergences", divergences, METH_VARARGS, "divergences(mags, cuts, levels, out): KL divergence per cut"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_binning", NULL, -1, methods};

PyMODINIT_FUNC PyInit__binning(void) { return PyModule_Create(&module); }
