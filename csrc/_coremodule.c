/*
 * _coremodule.c -- the one file of the C core that talks to Python.
 *
 * Everything else in csrc/ is plain C that returns an ad_status (status.h).
 * This file converts Python arguments to C values, calls the core, and turns a
 * failure status into a Python exception in exactly one place
 * (raise_status).
 *
 * Shape of the module (PEP 489 multi-phase init):
 *   - all mutable state lives in the module state (core_state): the
 *     AsyncDiffError exception and the heap types; the static tables below
 *     (method table, type specs, struct-sequence description) are constant;
 *   - types are heap types made from specs in the exec slot;
 *   - NumPy's C API is imported in the exec slot.  (NumPy keeps its API
 *     table in a file-level pointer set up by import_array; that is NumPy's
 *     own mechanism and the only such pointer here.)
 *
 * Other parts of the project (transports) add their bindings in the sections
 * marked "MORE BINDINGS".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h> /* NCCL section: access() */

#include "gpu.h"  /* NCCL section */
#include "nccl.h" /* NCCL section */
#include "partition.h"
#include "schedule.h"
#include "shm.h"
#include "status.h"

/* ------------------------------------------------------------------------ */
/* Module state                                                             */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject *error;             /* asyncdiff._core.AsyncDiffError */
    PyTypeObject *schedule_type; /* Schedule */
    PyTypeObject *plan_type;     /* Plan (struct sequence) */
    PyTypeObject *shm_type;      /* ShmTransport */
    PyTypeObject *nccl_type;     /* NcclTransport (NCCL section) */
    /* MORE BINDINGS: transport types and objects go here; add them to
     * core_traverse and core_clear as well. */
} core_state;

static inline core_state *get_state(PyObject *module)
{
    return (core_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------ */
/* Status -> exception (the only place that does this)                      */
/* ------------------------------------------------------------------------ */

/*
 * Raise the Python exception for a failed core call.  The message is the
 * core's message; when the core named an argument that the message does not
 * mention, "arg: " is put in front so that the argument is always named.
 * The exception gets two attributes: `status` (the status's short name, see
 * ad_status_name) and `argument` (the argument's name or None).
 */
static void raise_status(core_state *st, ad_status s, const ad_err *err)
{
    PyObject *exc_type = NULL, *msg = NULL, *exc = NULL, *attr = NULL;
    const char *text = (err != NULL && err->msg[0] != '\0') ? err->msg
                                                          : ad_status_name(s);
    const char *arg = (err != NULL) ? err->arg : NULL;

    switch (s) {
    case AD_ETYPE: exc_type = PyExc_TypeError; break;
    case AD_EINVAL: exc_type = PyExc_ValueError; break;
    case AD_ENOMEM: exc_type = PyExc_MemoryError; break;
    case AD_ETIMEDOUT: exc_type = PyExc_TimeoutError; break;
    case AD_EIO: exc_type = PyExc_OSError; break;
    default:
        exc_type = (st != NULL && st->error != NULL) ? st->error
                                                     : PyExc_RuntimeError;
        break;
    }

    if (arg != NULL && strstr(text, arg) == NULL)
        msg = PyUnicode_FromFormat("%s: %s", arg, text);
    else
        msg = PyUnicode_FromString(text);
    if (msg == NULL)
        goto error;

    if (s == AD_EIO && err != NULL && err->sys_errno != 0)
        /* OSError(errno, text) picks the matching subclass by itself
         * (FileNotFoundError, ...). */
        exc = PyObject_CallFunction(exc_type, "iO", err->sys_errno, msg);
    else
        exc = PyObject_CallOneArg(exc_type, msg);
    if (exc == NULL)
        goto error;

    attr = PyUnicode_FromString(ad_status_name(s));
    if (attr == NULL || PyObject_SetAttrString(exc, "status", attr) < 0)
        goto error;
    Py_CLEAR(attr);
    attr = (arg != NULL) ? PyUnicode_FromString(arg) : Py_NewRef(Py_None);
    if (attr == NULL || PyObject_SetAttrString(exc, "argument", attr) < 0)
        goto error;

    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    /* fall through: the references below are ours either way */
error:
    /* On an early failure the error raised while building the exception
     * (usually MemoryError) stays set, which is the best we can do. */
    Py_CLEAR(attr);
    Py_CLEAR(exc);
    Py_CLEAR(msg);
}

/* ------------------------------------------------------------------------ */
/* Argument conversion                                                      */
/* ------------------------------------------------------------------------ */

/*
 * Convert an integer argument: Python int or anything with __index__ (NumPy
 * integers), never bool or float.  Values outside [lo, hi] (the C type's
 * range; the core checks the real bounds) give ValueError naming `name`.
 * Returns 0 on success, -1 with an exception set.
 */
static int int_arg(PyObject *obj, const char *name, long long lo, long long hi,
                   long long *out)
{
    PyObject *index = NULL;
    int overflow = 0;
    long long v;

    if (PyBool_Check(obj) || PyArray_IsScalar(obj, Bool)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not bool", name);
        goto error;
    }
    if (!PyLong_Check(obj) && !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.200s", name,
                     Py_TYPE(obj)->tp_name);
        goto error;
    }
    index = PyNumber_Index(obj);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be an int, not %.200s", name,
                         Py_TYPE(obj)->tp_name);
        }
        goto error;
    }
    v = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (v == -1 && PyErr_Occurred())
        goto error;
    if (overflow != 0 || v < lo || v > hi) {
        /* The value itself is not printed: it may be astronomically long. */
        PyErr_Format(PyExc_ValueError, "%s is out of range (must fit in [%lld, %lld])",
                     name, lo, hi);
        goto error;
    }
    Py_DECREF(index);
    *out = v;
    return 0;
error:
    Py_CLEAR(index);
    return -1;
}

/* A flag: bool, NumPy bool, or the ints 0 / 1 (other ints are passed on for
 * the core to reject by value).  Strings and the like are a TypeError. */
static int flag_arg(PyObject *obj, const char *name, int *out)
{
    long long v;
    if (PyBool_Check(obj)) {
        *out = (obj == Py_True);
        return 0;
    }
    if (PyArray_IsScalar(obj, Bool)) {
        int truth = PyObject_IsTrue(obj);
        if (truth < 0)
            return -1;
        *out = truth;
        return 0;
    }
    if (!PyLong_Check(obj) && !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a bool, not %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (int_arg(obj, name, INT_MIN, INT_MAX, &v) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

/*
 * Chain a conversion failure: the TypeError/ValueError NumPy raised becomes
 * the __cause__ of our own exception (same type) whose message names the
 * argument.  Other exceptions (MemoryError, KeyboardInterrupt...) pass as is.
 */
static void rename_conversion_error(const char *name)
{
    PyObject *type = NULL, *value = NULL, *tb = NULL, *new_value = NULL;
    PyObject *new_type, *new_tb = NULL, *ignored = NULL;

    if (!PyErr_ExceptionMatches(PyExc_TypeError) &&
        !PyErr_ExceptionMatches(PyExc_ValueError))
        return;
    new_type = PyErr_ExceptionMatches(PyExc_TypeError) ? PyExc_TypeError
                                                       : PyExc_ValueError;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyErr_Format(new_type, "%s cannot be converted to a numeric array: %S", name,
                 value != NULL ? value : Py_None);
    PyErr_Fetch(&ignored, &new_value, &new_tb);
    PyErr_NormalizeException(&ignored, &new_value, &new_tb);
    if (new_value != NULL && value != NULL) {
        PyException_SetCause(new_value, Py_NewRef(value)); /* steals */
        PyException_SetContext(new_value, Py_NewRef(value)); /* steals */
    }
    PyErr_Restore(ignored, new_value, new_tb);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/*
 * Turn `obj` into a 1-D array for argument `name` without deciding the
 * element type yet.  `want_int`: 1 -> integers only (no bool), 0 -> integers
 * or floats (no bool, complex, strings, objects, dates).
 */
static PyArrayObject *vector_arg(PyObject *obj, const char *name, int want_int)
{
    PyArrayObject *arr = NULL;
    int tn;

    arr = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (arr == NULL) {
        rename_conversion_error(name);
        goto error;
    }
    tn = PyArray_TYPE(arr);
    /* An empty list becomes float64; let it through to the size checks. */
    if (want_int && PyArray_SIZE(arr) == 0 && PyTypeNum_ISFLOAT(tn))
        tn = NPY_INT64;
    if (PyTypeNum_ISBOOL(tn) ||
        !(PyTypeNum_ISINTEGER(tn) || (!want_int && PyTypeNum_ISFLOAT(tn)))) {
        PyErr_Format(PyExc_TypeError, "%s must hold %s, got dtype %S", name,
                     want_int ? "integers" : "real numbers",
                     (PyObject *)PyArray_DESCR(arr));
        goto error;
    }
    if (PyArray_NDIM(arr) != 1) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be one-dimensional, got an array with %d dimensions",
                     name, PyArray_NDIM(arr));
        goto error;
    }
    return arr;
error:
    Py_CLEAR(arr);
    return NULL;
}

/* Costs as a private, contiguous float64 copy (safe to read without the GIL). */
static PyArrayObject *costs_arg(PyObject *obj, const char *name)
{
    PyArrayObject *natural = NULL, *result = NULL;

    natural = vector_arg(obj, name, 0);
    if (natural == NULL)
        goto error;
    result = (PyArrayObject *)PyArray_FromArray(
        natural, PyArray_DescrFromType(NPY_DOUBLE),
        NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY | NPY_ARRAY_FORCECAST);
    if (result == NULL)
        goto error;
    Py_DECREF(natural);
    return result;
error:
    Py_CLEAR(natural);
    Py_CLEAR(result);
    return NULL;
}

/*
 * An assignment as a new int32 array.  Values that do not fit int32 cannot
 * be valid component numbers; they are refused here with the same wording
 * the core uses for values outside [0, n).
 */
static PyArrayObject *assign_arg(PyObject *obj, const char *name, int n)
{
    PyArrayObject *natural = NULL, *wide = NULL, *result = NULL;
    npy_intp len;
    int is_signed;

    natural = vector_arg(obj, name, 1);
    if (natural == NULL)
        goto error;
    /* (a float64 array here is empty, see vector_arg: signed is fine) */
    is_signed = !PyTypeNum_ISUNSIGNED(PyArray_TYPE(natural));
    /* Every integer type converts exactly to int64 or to uint64. */
    wide = (PyArrayObject *)PyArray_FromArray(
        natural, PyArray_DescrFromType(is_signed ? NPY_INT64 : NPY_UINT64),
        NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (wide == NULL)
        goto error;
    len = PyArray_DIM(wide, 0);
    result = (PyArrayObject *)PyArray_SimpleNew(1, &len, NPY_INT32);
    if (result == NULL)
        goto error;
    {
        int32_t *dst = (int32_t *)PyArray_DATA(result);
        for (npy_intp i = 0; i < len; i++) {
            if (is_signed) {
                int64_t v = ((const int64_t *)PyArray_DATA(wide))[i];
                if (v < INT32_MIN || v > INT32_MAX) {
                    PyErr_Format(PyExc_ValueError,
                                 "%s values must be in [0, %d), got %s[%zd] = %lld",
                                 name, n, name, (Py_ssize_t)i, (long long)v);
                    goto error;
                }
                dst[i] = (int32_t)v;
            } else {
                uint64_t v = ((const uint64_t *)PyArray_DATA(wide))[i];
                if (v > INT32_MAX) {
                    PyErr_Format(PyExc_ValueError,
                                 "%s values must be in [0, %d), got %s[%zd] = %llu",
                                 name, n, name, (Py_ssize_t)i,
                                 (unsigned long long)v);
                    goto error;
                }
                dst[i] = (int32_t)v;
            }
        }
    }
    Py_DECREF(natural);
    Py_DECREF(wide);
    return result;
error:
    Py_CLEAR(natural);
    Py_CLEAR(wide);
    Py_CLEAR(result);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Partition functions                                                      */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(partition_doc,
"partition(costs, n) -> numpy.ndarray[int32]\n"
"\n"
"Split the blocks, in order, into n non-empty contiguous components so that\n"
"the largest component cost is as small as possible (exact optimum).\n"
"costs: 1-D sequence of finite numbers >= 0, one per block.  Returns the\n"
"component of each block.  A component's cost is P[j] - P[i] with the\n"
"prefix sums P of the costs as float64.  Ties: later components take as\n"
"many trailing blocks as they can.");

static PyObject *core_partition(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"costs", "n", NULL};
    core_state *st = get_state(module);
    PyObject *costs_obj = NULL, *n_obj = NULL;
    PyArrayObject *costs = NULL;
    PyObject *out = NULL;
    long long n = 0;
    npy_intp nblocks;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:partition", kwlist,
                                     &costs_obj, &n_obj))
        goto error;
    if (int_arg(n_obj, "n", INT_MIN, INT_MAX, &n) < 0)
        goto error;
    costs = costs_arg(costs_obj, "costs");
    if (costs == NULL)
        goto error;
    nblocks = PyArray_DIM(costs, 0);
    out = PyArray_SimpleNew(1, &nblocks, NPY_INT32);
    if (out == NULL)
        goto error;
    {
        const double *c = (const double *)PyArray_DATA(costs);
        int32_t *a = (int32_t *)PyArray_DATA((PyArrayObject *)out);
        /* Both arrays are private to this call: safe without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        s = ad_partition_minmax(c, (size_t)nblocks, (int)n, a, NULL, &err);
        Py_END_ALLOW_THREADS
    }
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    Py_DECREF(costs);
    return out;
error:
    Py_CLEAR(costs);
    Py_CLEAR(out);
    return NULL;
}

PyDoc_STRVAR(validate_assignment_doc,
"validate_assignment(assign, n) -> None\n"
"\n"
"Check that every entry of assign is a component number in [0, n) and that\n"
"every component has at least one block (components need not be\n"
"contiguous).  Raises ValueError naming the problem otherwise.");

static PyObject *core_validate_assignment(PyObject *module, PyObject *args,
                                          PyObject *kwargs)
{
    static char *kwlist[] = {"assign", "n", NULL};
    core_state *st = get_state(module);
    PyObject *assign_obj = NULL, *n_obj = NULL;
    PyArrayObject *assign = NULL;
    long long n = 0;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:validate_assignment",
                                     kwlist, &assign_obj, &n_obj))
        goto error;
    if (int_arg(n_obj, "n", INT_MIN, INT_MAX, &n) < 0)
        goto error;
    assign = assign_arg(assign_obj, "assign", (int)n);
    if (assign == NULL)
        goto error;
    s = ad_assignment_validate((const int32_t *)PyArray_DATA(assign),
                               (size_t)PyArray_DIM(assign, 0), (int)n, &err);
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    Py_DECREF(assign);
    Py_RETURN_NONE;
error:
    Py_CLEAR(assign);
    return NULL;
}

PyDoc_STRVAR(cost_summary_doc,
"cost_summary(costs, assign, n) -> (per_component, max, mean)\n"
"\n"
"Cost of each component of an assignment (numpy float64 array of length n),\n"
"the largest of them and their mean.  A component's cost is the sum over\n"
"its maximal runs of consecutive blocks of P[end] - P[start]; for the output\n"
"of partition() the max equals the optimum bit for bit.");

static PyObject *core_cost_summary(PyObject *module, PyObject *args,
                                   PyObject *kwargs)
{
    static char *kwlist[] = {"costs", "assign", "n", NULL};
    core_state *st = get_state(module);
    PyObject *costs_obj = NULL, *assign_obj = NULL, *n_obj = NULL;
    PyArrayObject *costs = NULL, *assign = NULL;
    PyObject *per = NULL, *result = NULL;
    long long n = 0;
    npy_intp ncomp;
    double mx = 0.0, mean = 0.0;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:cost_summary", kwlist,
                                     &costs_obj, &assign_obj, &n_obj))
        goto error;
    if (int_arg(n_obj, "n", INT_MIN, INT_MAX, &n) < 0)
        goto error;
    costs = costs_arg(costs_obj, "costs");
    if (costs == NULL)
        goto error;
    assign = assign_arg(assign_obj, "assign", (int)n);
    if (assign == NULL)
        goto error;
    if (PyArray_DIM(assign, 0) != PyArray_DIM(costs, 0)) {
        PyErr_Format(PyExc_ValueError,
                     "assign has %zd entries but costs has %zd: one per block is needed",
                     (Py_ssize_t)PyArray_DIM(assign, 0),
                     (Py_ssize_t)PyArray_DIM(costs, 0));
        goto error;
    }
    if (n < 1 || n > PyArray_DIM(costs, 0)) {
        /* No sane size for the output: let the core's own argument checks
         * (which come before it touches per_component) word the error. */
        s = ad_cost_summary((const double *)PyArray_DATA(costs),
                            (const int32_t *)PyArray_DATA(assign),
                            (size_t)PyArray_DIM(costs, 0), (int)n, NULL, NULL,
                            NULL, &err);
        if (s == AD_OK)
            s = ad_err_set(&err, AD_EINTERNAL, NULL, "cost_summary: bad n accepted");
        raise_status(st, s, &err);
        goto error;
    }
    ncomp = (npy_intp)n;
    per = PyArray_SimpleNew(1, &ncomp, NPY_DOUBLE);
    if (per == NULL)
        goto error;
    s = ad_cost_summary((const double *)PyArray_DATA(costs),
                        (const int32_t *)PyArray_DATA(assign),
                        (size_t)PyArray_DIM(costs, 0), (int)n,
                        (double *)PyArray_DATA((PyArrayObject *)per), &mx, &mean,
                        &err);
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    result = Py_BuildValue("(Odd)", per, mx, mean);
    if (result == NULL)
        goto error;
    Py_DECREF(costs);
    Py_DECREF(assign);
    Py_DECREF(per);
    return result;
error:
    Py_CLEAR(costs);
    Py_CLEAR(assign);
    Py_CLEAR(per);
    Py_CLEAR(result);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Plan: a struct sequence                                                  */
/* ------------------------------------------------------------------------ */

static PyStructSequence_Field plan_fields[] = {
    {"warmup", "True during the warm-up calls (k < warm_up)"},
    {"sync", "before the forward, replace every cached block output by its owner's"},
    {"compute_all", "this rank computes every block (warm-up)"},
    {"compute_component", "component this rank computes in the async phase, -1 none"},
    {"store", "store the outputs of the blocks computed now as cached outputs"},
    {"publish", "other ranks read this rank's stored outputs of its own component at a later sync"},
    {"exchange", "same on all ranks: this call has a transport event"},
    {"timestep_index", "index into the timesteps for the denoiser's timestep argument"},
    {"result_rank", "rank whose denoiser output replaces every rank's output, -1 none"},
    {NULL, NULL},
};
#define PLAN_NFIELDS 9

static PyStructSequence_Desc plan_desc = {
    "asyncdiff._core.Plan",
    "What one rank does at one denoiser call (see SPEC section 3).",
    plan_fields,
    PLAN_NFIELDS,
};

/* ------------------------------------------------------------------------ */
/* Schedule: heap type                                                      */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int model_n;
    int stride;
    int warm_up;
    int time_shift;
    long steps;
} ScheduleObject;

static PyObject *schedule_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model_n", "stride", "warm_up", "time_shift",
                             "steps", NULL};
    PyObject *n_obj, *stride_obj, *warm_obj, *ts_obj, *steps_obj;
    ScheduleObject *self = NULL;
    long long n, stride, warm, steps;
    int ts;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO:Schedule", kwlist,
                                     &n_obj, &stride_obj, &warm_obj, &ts_obj,
                                     &steps_obj))
        goto error;
    if (int_arg(n_obj, "model_n", INT_MIN, INT_MAX, &n) < 0 ||
        int_arg(stride_obj, "stride", INT_MIN, INT_MAX, &stride) < 0 ||
        int_arg(warm_obj, "warm_up", INT_MIN, INT_MAX, &warm) < 0 ||
        flag_arg(ts_obj, "time_shift", &ts) < 0 ||
        int_arg(steps_obj, "steps", LONG_MIN, LONG_MAX, &steps) < 0)
        goto error;
    s = ad_schedule_validate((int)n, (int)stride, (int)warm, ts, (long)steps, &err);
    if (s != AD_OK) {
        /* Schedule cannot be subclassed, so `type` is ours. */
        raise_status((core_state *)PyType_GetModuleState(type), s, &err);
        goto error;
    }
    self = (ScheduleObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto error;
    self->model_n = (int)n;
    self->stride = (int)stride;
    self->warm_up = (int)warm;
    self->time_shift = ts;
    self->steps = (long)steps;
    return (PyObject *)self;
error:
    Py_CLEAR(self);
    return NULL;
}

static void schedule_dealloc(PyObject *self)
{
    /* Instances of a heap type hold a reference to their type. */
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *schedule_repr(PyObject *op)
{
    ScheduleObject *self = (ScheduleObject *)op;
    return PyUnicode_FromFormat(
        "Schedule(model_n=%d, stride=%d, warm_up=%d, time_shift=%s, steps=%ld)",
        self->model_n, self->stride, self->warm_up,
        self->time_shift ? "True" : "False", self->steps);
}

/* Match positional + keyword arguments of plan(rank, k) without building a
 * dict: this method runs once per denoiser call per rank. */
static int plan_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                     PyObject **rank, PyObject **k)
{
    *rank = nargs > 0 ? args[0] : NULL;
    *k = nargs > 1 ? args[1] : NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError,
                     "plan() takes 2 arguments (rank, k), %zd given", nargs);
        return -1;
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            PyObject **slot = NULL;
            if (PyUnicode_CompareWithASCIIString(key, "rank") == 0)
                slot = rank;
            else if (PyUnicode_CompareWithASCIIString(key, "k") == 0)
                slot = k;
            if (slot == NULL) {
                PyErr_Format(PyExc_TypeError,
                             "plan() got an unexpected keyword argument %R", key);
                return -1;
            }
            if (*slot != NULL) {
                PyErr_Format(PyExc_TypeError,
                             "plan() got multiple values for argument %R", key);
                return -1;
            }
            *slot = args[nargs + i];
        }
    }
    if (*rank == NULL || *k == NULL) {
        PyErr_Format(PyExc_TypeError, "plan() missing required argument '%s'",
                     *rank == NULL ? "rank" : "k");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(schedule_plan_doc,
"plan(rank, k) -> Plan\n"
"\n"
"What rank `rank` (0 <= rank < world_size) does at denoiser call `k`\n"
"(0 <= k < steps).");

static PyObject *schedule_plan(PyObject *op, PyTypeObject *defining_class,
                               PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    ScheduleObject *self = (ScheduleObject *)op;
    core_state *st = (core_state *)PyType_GetModuleState(defining_class);
    PyObject *rank_obj, *k_obj, *result = NULL;
    long long rank, k;
    ad_plan p;
    ad_err err = {0};
    ad_status s;

    if (st == NULL)
        goto error;
    if (plan_args(args, nargs, kwnames, &rank_obj, &k_obj) < 0)
        goto error;
    if (int_arg(rank_obj, "rank", INT_MIN, INT_MAX, &rank) < 0 ||
        int_arg(k_obj, "k", LONG_MIN, LONG_MAX, &k) < 0)
        goto error;
    s = ad_schedule_plan(self->model_n, self->stride, self->warm_up,
                         self->time_shift, self->steps, (int)rank, (long)k, &p,
                         &err);
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    result = PyStructSequence_New(st->plan_type);
    if (result == NULL)
        goto error;
    {
        /* Field order must match plan_fields. */
        PyObject *items[PLAN_NFIELDS] = {
            PyBool_FromLong(p.warmup),
            PyBool_FromLong(p.sync),
            PyBool_FromLong(p.compute_all),
            PyLong_FromLong(p.compute_component),
            PyBool_FromLong(p.store),
            PyBool_FromLong(p.publish),
            PyBool_FromLong(p.exchange),
            PyLong_FromLong(p.timestep_index),
            PyLong_FromLong(p.result_rank),
        };
        int failed = 0;
        for (int i = 0; i < PLAN_NFIELDS; i++) {
            if (items[i] == NULL)
                failed = 1;
            else
                PyStructSequence_SetItem(result, i, items[i]); /* steals */
        }
        if (failed)
            goto error; /* the struct sequence frees the items it got */
    }
    return result;
error:
    Py_CLEAR(result);
    return NULL;
}

/* Pickling support: Schedule(model_n, stride, warm_up, time_shift, steps). */
static PyObject *schedule_reduce(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    ScheduleObject *self = (ScheduleObject *)op;
    return Py_BuildValue("O(iiiOl)", (PyObject *)Py_TYPE(op), self->model_n,
                         self->stride, self->warm_up,
                         self->time_shift ? Py_True : Py_False, self->steps);
}

#define SCHEDULE_INT_GETTER(field)                                        \
    static PyObject *schedule_get_##field(PyObject *op, void *closure)   \
    {                                                                     \
        (void)closure;                                                    \
        return PyLong_FromLong((long)((ScheduleObject *)op)->field);      \
    }
SCHEDULE_INT_GETTER(model_n)
SCHEDULE_INT_GETTER(stride)
SCHEDULE_INT_GETTER(warm_up)
SCHEDULE_INT_GETTER(steps)
#undef SCHEDULE_INT_GETTER

static PyObject *schedule_get_time_shift(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((ScheduleObject *)op)->time_shift);
}

static PyObject *schedule_get_world_size(PyObject *op, void *closure)
{
    ScheduleObject *self = (ScheduleObject *)op;
    (void)closure;
    return PyLong_FromLong(ad_schedule_world_size(self->model_n, self->stride));
}

static PyGetSetDef schedule_getset[] = {
    {"model_n", schedule_get_model_n, NULL, "number of components N", NULL},
    {"stride", schedule_get_stride, NULL, "stride S (1 or 2)", NULL},
    {"warm_up", schedule_get_warm_up, NULL, "number of warm-up calls W", NULL},
    {"time_shift", schedule_get_time_shift, NULL, "time shift on/off", NULL},
    {"steps", schedule_get_steps, NULL, "denoiser calls per pipeline call L", NULL},
    {"world_size", schedule_get_world_size, NULL, "ranks needed: N + S - 1", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef schedule_methods[] = {
    {"plan", (PyCFunction)(void (*)(void))schedule_plan,
     METH_METHOD | METH_FASTCALL | METH_KEYWORDS, schedule_plan_doc},
    {"__reduce__", schedule_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(schedule_doc,
"Schedule(model_n, stride, warm_up, time_shift, steps)\n"
"\n"
"The asynchronous schedule of SPEC section 3 for one pipeline call of\n"
"`steps` denoiser calls.  Immutable; plan(rank, k) says what a rank does.");

static PyType_Slot schedule_slots[] = {
    {Py_tp_new, schedule_new},
    {Py_tp_dealloc, schedule_dealloc},
    {Py_tp_repr, schedule_repr},
    {Py_tp_getset, schedule_getset},
    {Py_tp_methods, schedule_methods},
    {Py_tp_doc, (void *)schedule_doc},
    {0, NULL},
};

static PyType_Spec schedule_spec = {
    .name = "asyncdiff._core.Schedule",
    .basicsize = sizeof(ScheduleObject),
    .itemsize = 0,
    /* Not a base type: tp_new relies on `type` being exactly this one. */
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = schedule_slots,
};

/* ------------------------------------------------------------------------ */
/* MORE BINDINGS: transports (shared memory, NCCL, ...) go below this line. */
/* Put their functions in core_methods and their types in core_state,      */
/* created in core_exec.                                                    */
/* ------------------------------------------------------------------------ */

/* ------------------------------------------------------------------------ */
/* ShmTransport: csrc/shm.c for Python                                      */
/* ------------------------------------------------------------------------ */

/*
 * One rank's handle on the shared-memory transport.  Buffers come in through
 * the buffer protocol (NumPy views of tensors), so a wrong size or a
 * read-only buffer is an exception, never a stray write.  Every wait and copy
 * runs with the GIL released; `busy` keeps a second thread from detaching the
 * handle while the first one is inside the C transport without the GIL.
 */
typedef struct {
    PyObject_HEAD
    ad_shm *handle; /* NULL once detached */
    int busy;
} ShmObject;

/* A non-negative finite timeout in seconds (int or float). */
static int timeout_arg(PyObject *obj, double *out)
{
    double v;
    if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyLong_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "timeout must be a number of seconds, not %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    if (!(v >= 0.0) || v > 1e9) {
        PyErr_SetString(PyExc_ValueError, "timeout must be finite and >= 0 seconds");
        return -1;
    }
    *out = v;
    return 0;
}

/* A transport handle can be used: not gone (`gone` says how it went) and not
 * inside the C transport on another thread.  Shared by every transport type. */
static int handle_usable(const void *handle, int busy, const char *gone)
{
    if (handle == NULL) {
        PyErr_Format(PyExc_ValueError, "transport is %s", gone);
        return -1;
    }
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "transport is in use by another thread");
        return -1;
    }
    return 0;
}

static int shm_usable(ShmObject *self)
{
    return handle_usable(self->handle, self->busy, "detached");
}

static PyObject *shm_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "world_size", "rank", "create", "timeout", NULL};
    const char *name;
    PyObject *world_obj, *rank_obj, *create_obj, *timeout_obj;
    long long world, rank;
    int create;
    double timeout;
    ad_shm *handle = NULL;
    ShmObject *self = NULL;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOOOO:ShmTransport", kwlist, &name,
                                     &world_obj, &rank_obj, &create_obj, &timeout_obj))
        goto error;
    if (int_arg(world_obj, "world_size", INT_MIN, INT_MAX, &world) < 0 ||
        int_arg(rank_obj, "rank", INT_MIN, INT_MAX, &rank) < 0 ||
        flag_arg(create_obj, "create", &create) < 0 || timeout_arg(timeout_obj, &timeout) < 0)
        goto error;
    Py_BEGIN_ALLOW_THREADS
    s = ad_shm_attach(name, (int)world, (int)rank, create, timeout, &handle, &err);
    Py_END_ALLOW_THREADS
    if (s != AD_OK) {
        raise_status((core_state *)PyType_GetModuleState(type), s, &err);
        goto error;
    }
    self = (ShmObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto error;
    self->handle = handle;
    handle = NULL;
    return (PyObject *)self;
error:
    ad_shm_detach(handle, 1);
    Py_CLEAR(self);
    return NULL;
}

static void shm_dealloc(PyObject *op)
{
    ShmObject *self = (ShmObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    /* A handle never detached explicitly leaves as failed: its peers must
     * not wait for it any more. */
    ad_shm_detach(self->handle, 1);
    self->handle = NULL;
    tp->tp_free(op);
    Py_DECREF(tp);
}

/*
 * Parse `items`, a sequence of (offset, buffer) pairs, into C items.  The
 * buffers stay acquired in `views` until release_items.
 */
static int items_arg(PyObject *seq_obj, int writable, ad_shm_item **items_out,
                     Py_buffer **views_out, Py_ssize_t *n_out)
{
    PyObject *seq = NULL;
    ad_shm_item *items = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t n, got = 0;

    seq = PySequence_Fast(seq_obj, "items must be a sequence of (offset, buffer) pairs");
    if (seq == NULL)
        goto error;
    n = PySequence_Fast_GET_SIZE(seq);
    items = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *items);
    views = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *views);
    if (items == NULL || views == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (; got < n; got++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, got);
        long long offset;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "items must hold (offset, buffer) tuples");
            goto error;
        }
        if (int_arg(PyTuple_GET_ITEM(pair, 0), "items offset", 0, LLONG_MAX, &offset) < 0)
            goto error;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 1), &views[got],
                               writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
                                        : PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "items buffer %zd must be a C-contiguous%s buffer",
                         got, writable ? " writable" : "");
            goto error;
        }
        items[got].offset = (size_t)offset;
        items[got].ptr = views[got].buf;
        items[got].nbytes = (size_t)views[got].len;
    }
    Py_DECREF(seq);
    *items_out = items;
    *views_out = views;
    *n_out = n;
    return 0;
error:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(items);
    PyMem_Free(views);
    Py_XDECREF(seq);
    return -1;
}

static void release_items(ad_shm_item *items, Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(items);
    PyMem_Free(views);
}

/* publish(seq, items, timeout) and fetch(seq, src, items, timeout) share this. */
static PyObject *shm_move(ShmObject *self, PyTypeObject *cls, int fetch, PyObject *seq_obj,
                          PyObject *src_obj, PyObject *items_obj, PyObject *timeout_obj)
{
    core_state *st = (core_state *)PyType_GetModuleState(cls);
    long long seq, src = -1;
    double timeout;
    ad_shm_item *items = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t n = 0;
    ad_err err = {0};
    ad_status s;

    if (shm_usable(self) < 0)
        goto error;
    if (int_arg(seq_obj, "seq", 1, LLONG_MAX, &seq) < 0 ||
        (fetch && int_arg(src_obj, "src", INT_MIN, INT_MAX, &src) < 0) ||
        timeout_arg(timeout_obj, &timeout) < 0)
        goto error;
    if (items_arg(items_obj, fetch, &items, &views, &n) < 0)
        goto error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (fetch)
        s = ad_shm_fetch(self->handle, (uint64_t)seq, (int)src, items, (size_t)n, timeout, &err);
    else
        s = ad_shm_publish(self->handle, (uint64_t)seq, items, (size_t)n, timeout, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    release_items(items, views, n);
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    Py_RETURN_NONE;
error:
    return NULL;
}

static PyObject *shm_publish(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames != NULL || nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "publish(seq, items, timeout) takes 3 positional arguments");
        return NULL;
    }
    return shm_move((ShmObject *)op, cls, 0, args[0], NULL, args[1], args[2]);
}

static PyObject *shm_fetch(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames != NULL || nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "fetch(seq, src, items, timeout) takes 4 positional arguments");
        return NULL;
    }
    return shm_move((ShmObject *)op, cls, 1, args[0], args[1], args[2], args[3]);
}

/* barrier(timeout) and reserve(nbytes, timeout). */
static PyObject *shm_collective(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                                Py_ssize_t nargs, PyObject *kwnames, int reserve)
{
    ShmObject *self = (ShmObject *)op;
    core_state *st = (core_state *)PyType_GetModuleState(cls);
    long long nbytes = 0;
    double timeout;
    ad_err err = {0};
    ad_status s;

    if (kwnames != NULL || nargs != (reserve ? 2 : 1)) {
        PyErr_SetString(PyExc_TypeError, reserve ? "reserve(nbytes, timeout) takes 2 positional arguments"
                                                 : "barrier(timeout) takes 1 positional argument");
        return NULL;
    }
    if (shm_usable(self) < 0)
        return NULL;
    if ((reserve && int_arg(args[0], "nbytes", 0, LLONG_MAX / 4, &nbytes) < 0) ||
        timeout_arg(args[reserve ? 1 : 0], &timeout) < 0)
        return NULL;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (reserve)
        s = ad_shm_reserve(self->handle, (size_t)nbytes, timeout, &err);
    else
        s = ad_shm_barrier(self->handle, timeout, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(st, s, &err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *shm_barrier(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames)
{
    return shm_collective(op, cls, args, nargs, kwnames, 0);
}

static PyObject *shm_reserve(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames)
{
    return shm_collective(op, cls, args, nargs, kwnames, 1);
}

static PyObject *shm_ack(PyObject *op, PyObject *seq_obj)
{
    ShmObject *self = (ShmObject *)op;
    long long seq;
    if (shm_usable(self) < 0 || int_arg(seq_obj, "seq", 0, LLONG_MAX, &seq) < 0)
        return NULL;
    ad_shm_ack(self->handle, (uint64_t)seq);
    Py_RETURN_NONE;
}

static PyObject *shm_detach(PyObject *op, PyObject *failed_obj)
{
    ShmObject *self = (ShmObject *)op;
    int failed;
    if (flag_arg(failed_obj, "failed", &failed) < 0)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "transport is in use by another thread");
        return NULL;
    }
    ad_shm_detach(self->handle, failed);
    self->handle = NULL;
    Py_RETURN_NONE;
}

static PyObject *shm_get_capacity(PyObject *op, void *closure)
{
    ShmObject *self = (ShmObject *)op;
    (void)closure;
    return PyLong_FromSize_t(self->handle ? ad_shm_capacity(self->handle) : 0);
}

static PyObject *shm_get_attached(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((ShmObject *)op)->handle != NULL);
}

static PyObject *core_shm_unlink(PyObject *module, PyObject *name_obj)
{
    ad_err err = {0};
    ad_status s;
    const char *name;
    if (!PyUnicode_Check(name_obj)) {
        PyErr_Format(PyExc_TypeError, "name must be a str, not %.200s", Py_TYPE(name_obj)->tp_name);
        return NULL;
    }
    name = PyUnicode_AsUTF8(name_obj);
    if (name == NULL)
        return NULL;
    s = ad_shm_unlink(name, &err);
    if (s != AD_OK) {
        raise_status(get_state(module), s, &err);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(shm_unlink_doc,
"shm_unlink(name)\n--\n\n"
"Remove a shared-memory control segment's name (rank 0, once all ranks are\n"
"attached).  A name already gone is not an error.");

static PyGetSetDef shm_getset[] = {
    {"capacity", shm_get_capacity, NULL, "bytes in each data buffer", NULL},
    {"attached", shm_get_attached, NULL, "False once detached", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define SHM_METHOD(name, doc) \
    {#name, (PyCFunction)(void (*)(void))shm_##name, METH_METHOD | METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef shm_methods[] = {
    SHM_METHOD(publish, "publish(seq, items, timeout): copy (offset, buffer) items in as event seq"),
    SHM_METHOD(fetch, "fetch(seq, src, items, timeout): copy rank src's items of event seq out"),
    SHM_METHOD(barrier, "barrier(timeout): wait for every rank"),
    SHM_METHOD(reserve, "reserve(nbytes, timeout): collective; data buffers of at least nbytes"),
    {"ack", shm_ack, METH_O, "ack(seq): done reading every event <= seq"},
    {"detach", shm_detach, METH_O, "detach(failed): leave; peers waiting on this rank fail at once"},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(shm_doc,
"ShmTransport(name, world_size, rank, create, timeout)\n--\n\n"
"One rank's handle on the shared-memory transport (csrc/shm.c).  Rank 0\n"
"creates the segment `name`; the others attach to it.");

static PyType_Slot shm_slots[] = {
    {Py_tp_new, shm_new},
    {Py_tp_dealloc, shm_dealloc},
    {Py_tp_getset, shm_getset},
    {Py_tp_methods, shm_methods},
    {Py_tp_doc, (void *)shm_doc},
    {0, NULL},
};

static PyType_Spec shm_spec = {
    .name = "asyncdiff._core.ShmTransport",
    .basicsize = sizeof(ShmObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = shm_slots,
};

/* ======================================================================== */
/* NCCL section: csrc/gpu.c + csrc/nccl.c for Python                        */
/*                                                                          */
/* _core.transports(), _core.gpu_status(), _core.nccl_unique_id() and the   */
/* NcclTransport type.  This is an INTERNAL API: asyncdiff/transport.py     */
/* passes device pointers and sizes as ints (tensor.data_ptr(), nbytes of   */
/* CUDA tensors) and the compute stream as an int                           */
/* (torch.cuda.current_stream().cuda_stream).  What can be checked here is  */
/* checked (types, non-negative ints, ranks in range, sizes > 0, the handle */
/* still open); whether a pointer really is device memory of that size     */
/* cannot be, so other callers must not pass arbitrary numbers.            */
/* ======================================================================== */

/* Load the GPU libraries (at most once per process) without the GIL: the
 * first time this opens libraries and initialises the CUDA runtime. */
static ad_status gpu_load_nogil(ad_err *err)
{
    ad_status s;
    Py_BEGIN_ALLOW_THREADS
    s = ad_gpu_load(err);
    Py_END_ALLOW_THREADS
    return s;
}

/* Shared memory needs a writable /dev/shm on Linux (POSIX shm lives there). */
static int shm_usable_here(void)
{
#ifdef __linux__
    return access("/dev/shm", R_OK | W_OK | X_OK) == 0;
#else
    return 1;
#endif
}

PyDoc_STRVAR(transports_doc,
"transports() -> dict[str, bool]\n--\n\n"
"Which transports can be used in this process: 'emulate' (always), 'shm'\n"
"(POSIX shared memory) and 'nccl' (the CUDA runtime and NCCL load and a CUDA\n"
"device is visible).  gpu_status() says why NCCL is or is not usable.");

static PyObject *core_transports(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = NULL;
    int nccl;
    (void)module;

    nccl = gpu_load_nogil(NULL) == AD_OK;
    out = Py_BuildValue("{sOsOsO}", "emulate", Py_True, "shm",
                        shm_usable_here() ? Py_True : Py_False, "nccl",
                        nccl ? Py_True : Py_False);
    return out;
}

PyDoc_STRVAR(gpu_status_doc,
"gpu_status() -> str\n--\n\n"
"Why the NCCL transport is or is not usable here: which NCCL and CUDA\n"
"runtime were found (file, version, how) and how many devices, or what is\n"
"missing (library not found, symbol missing, no CUDA device).");

static PyObject *core_gpu_status(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    char text[1536];
    (void)module;
    (void)gpu_load_nogil(NULL);
    ad_gpu_describe(text, sizeof text);
    return PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
}

PyDoc_STRVAR(nccl_unique_id_doc,
"nccl_unique_id() -> bytes\n--\n\n"
"A fresh 128-byte NCCL unique id (ncclGetUniqueId).  Rank 0 makes it and\n"
"hands the same bytes to every rank's NcclTransport.");

static PyObject *core_nccl_unique_id(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES];
    ad_err err = {0};
    ad_status s;

    Py_BEGIN_ALLOW_THREADS
    s = ad_nccl_unique_id(id, &err);
    Py_END_ALLOW_THREADS
    if (s != AD_OK) {
        raise_status(get_state(module), s, &err);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)id, AD_NCCL_UNIQUE_ID_BYTES);
}

/*
 * Parse `seq_obj`, a sequence of (peer, pointer, nbytes) tuples of ints,
 * for argument `name` ("sends" or "recvs").  Ranges here are the C types'
 * (pointer and nbytes >= 0); ad_nccl_check_items checks the values.  On
 * success *out is a PyMem array (possibly of length 0) to PyMem_Free.
 */
static int nccl_items_arg(PyObject *seq_obj, const char *name, ad_nccl_recv **out,
                          Py_ssize_t *n_out)
{
    PyObject *seq = NULL;
    ad_nccl_recv *items = NULL;
    Py_ssize_t n;
    char what[64];

    *out = NULL;
    *n_out = 0;
    if (PyUnicode_Check(seq_obj) || PyBytes_Check(seq_obj) || PyByteArray_Check(seq_obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence of (peer, pointer, nbytes) tuples, "
                     "not %.200s", name, Py_TYPE(seq_obj)->tp_name);
        goto error;
    }
    PyOS_snprintf(what, sizeof what, "%s must be a sequence of (peer, pointer, nbytes) tuples",
                  name);
    seq = PySequence_Fast(seq_obj, what);
    if (seq == NULL)
        goto error;
    n = PySequence_Fast_GET_SIZE(seq);
    items = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *items);
    if (items == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        long long peer, ptr, nbytes;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be a (peer, pointer, nbytes) tuple, "
                         "not %.200s", name, i, Py_TYPE(t)->tp_name);
            goto error;
        }
        PyOS_snprintf(what, sizeof what, "%s[%zd] peer", name, i);
        if (int_arg(PyTuple_GET_ITEM(t, 0), what, INT_MIN, INT_MAX, &peer) < 0)
            goto error;
        PyOS_snprintf(what, sizeof what, "%s[%zd] pointer", name, i);
        if (int_arg(PyTuple_GET_ITEM(t, 1), what, 0, (long long)(INTPTR_MAX < LLONG_MAX ? INTPTR_MAX : LLONG_MAX), &ptr) < 0)
            goto error;
        PyOS_snprintf(what, sizeof what, "%s[%zd] nbytes", name, i);
        if (int_arg(PyTuple_GET_ITEM(t, 2), what, 0, LLONG_MAX, &nbytes) < 0)
            goto error;
        items[i].peer = (int)peer;
        items[i].ptr = (void *)(intptr_t)ptr;
        items[i].nbytes = (size_t)nbytes;
    }
    Py_DECREF(seq);
    *out = items;
    *n_out = n;
    return 0;
error:
    PyMem_Free(items);
    Py_XDECREF(seq);
    return -1;
}

/* The send items as the core's const type (same fields). */
static ad_nccl_send *nccl_as_sends(const ad_nccl_recv *items, Py_ssize_t n)
{
    ad_nccl_send *sends = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *sends);
    if (sends == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        sends[i].peer = items[i].peer;
        sends[i].ptr = items[i].ptr;
        sends[i].nbytes = items[i].nbytes;
    }
    return sends;
}

/* A CUDA stream handle as an int >= 0 (0: the legacy default stream). */
static int stream_arg(PyObject *obj, void **out)
{
    long long v;
    if (int_arg(obj, "stream", 0, (long long)(INTPTR_MAX < LLONG_MAX ? INTPTR_MAX : LLONG_MAX), &v) < 0)
        return -1;
    *out = (void *)(intptr_t)v;
    return 0;
}

/*
 * Everything exchange() checks before it touches the GPU: parse sends and
 * recvs, the stream and the timeout, then ad_nccl_check_items.  On success
 * the caller owns *sends and *recvs (PyMem_Free).
 */
static int nccl_exchange_args(core_state *st, int world, PyObject *sends_obj, PyObject *recvs_obj,
                              PyObject *stream_obj, PyObject *timeout_obj, ad_nccl_send **sends,
                              Py_ssize_t *ns, ad_nccl_recv **recvs, Py_ssize_t *nr,
                              void **stream, double *timeout)
{
    ad_nccl_recv *send_items = NULL;
    ad_err err = {0};
    ad_status s;

    *sends = NULL;
    *recvs = NULL;
    if (nccl_items_arg(sends_obj, "sends", &send_items, ns) < 0 ||
        nccl_items_arg(recvs_obj, "recvs", recvs, nr) < 0 || stream_arg(stream_obj, stream) < 0 ||
        timeout_arg(timeout_obj, timeout) < 0)
        goto error;
    *sends = nccl_as_sends(send_items, *ns);
    if (*sends == NULL)
        goto error;
    PyMem_Free(send_items);
    send_items = NULL;
    s = ad_nccl_check_items(world, *sends, (size_t)*ns, *recvs, (size_t)*nr, &err);
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    return 0;
error:
    PyMem_Free(send_items);
    PyMem_Free(*sends);
    PyMem_Free(*recvs);
    *sends = NULL;
    *recvs = NULL;
    return -1;
}

PyDoc_STRVAR(nccl_check_exchange_doc,
"_nccl_check_exchange(world_size, sends, recvs, stream, timeout)\n--\n\n"
"Internal, for tests: run the argument checks NcclTransport.exchange runs\n"
"before any GPU call, for a transport of world_size ranks.  Raises what\n"
"exchange would raise; returns None when the arguments are acceptable.");

static PyObject *core_nccl_check_exchange(PyObject *module, PyObject *const *args,
                                          Py_ssize_t nargs)
{
    ad_nccl_send *sends = NULL;
    ad_nccl_recv *recvs = NULL;
    Py_ssize_t ns = 0, nr = 0;
    long long world;
    void *stream;
    double timeout;
    ad_err err = {0};
    ad_status s;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "_nccl_check_exchange(world_size, sends, recvs, stream, timeout) "
                        "takes 5 positional arguments");
        return NULL;
    }
    if (int_arg(args[0], "world_size", INT_MIN, INT_MAX, &world) < 0)
        return NULL;
    s = ad_nccl_check_init((int)world, 0, 0, 0.0, &err);
    if (s != AD_OK) {
        raise_status(get_state(module), s, &err);
        return NULL;
    }
    if (nccl_exchange_args(get_state(module), (int)world, args[1], args[2], args[3], args[4],
                           &sends, &ns, &recvs, &nr, &stream, &timeout) < 0)
        return NULL;
    PyMem_Free(sends);
    PyMem_Free(recvs);
    Py_RETURN_NONE;
}

/*
 * NcclTransport: one rank's communicator.  Like ShmTransport, every wait
 * runs with the GIL released and `busy` keeps a second thread from closing
 * the handle while the first is inside the C transport without the GIL.
 */
typedef struct {
    PyObject_HEAD
    ad_nccl *handle; /* NULL once closed */
    int busy;
} NcclObject;

static int nccl_usable(NcclObject *self)
{
    return handle_usable(self->handle, self->busy, "closed");
}

static PyObject *nccl_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"unique_id", "world_size", "rank", "device", "timeout", NULL};
    core_state *st = (core_state *)PyType_GetModuleState(type);
    PyObject *id_obj, *world_obj, *rank_obj, *device_obj, *timeout_obj;
    Py_buffer id = {0};
    int have_id = 0;
    long long world, rank, device;
    double timeout;
    unsigned char id_bytes[AD_NCCL_UNIQUE_ID_BYTES];
    ad_nccl *handle = NULL;
    NcclObject *self = NULL;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO:NcclTransport", kwlist, &id_obj,
                                     &world_obj, &rank_obj, &device_obj, &timeout_obj))
        goto error;
    if (PyUnicode_Check(id_obj) || PyObject_GetBuffer(id_obj, &id, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "unique_id must be bytes (%d of them), not %.200s",
                     AD_NCCL_UNIQUE_ID_BYTES, Py_TYPE(id_obj)->tp_name);
        goto error;
    }
    have_id = 1;
    if (id.len != AD_NCCL_UNIQUE_ID_BYTES) {
        PyErr_Format(PyExc_ValueError, "unique_id must be exactly %d bytes, got %zd",
                     AD_NCCL_UNIQUE_ID_BYTES, id.len);
        goto error;
    }
    memcpy(id_bytes, id.buf, AD_NCCL_UNIQUE_ID_BYTES);
    PyBuffer_Release(&id);
    have_id = 0;
    if (int_arg(world_obj, "world_size", INT_MIN, INT_MAX, &world) < 0 ||
        int_arg(rank_obj, "rank", INT_MIN, INT_MAX, &rank) < 0 ||
        int_arg(device_obj, "device", INT_MIN, INT_MAX, &device) < 0 ||
        timeout_arg(timeout_obj, &timeout) < 0)
        goto error;
    /* Values first (no library needed), then the libraries. */
    s = ad_nccl_check_init((int)world, (int)rank, (int)device, timeout, &err);
    if (s == AD_OK)
        s = gpu_load_nogil(&err);
    if (s == AD_OK) {
        Py_BEGIN_ALLOW_THREADS
        s = ad_nccl_init(id_bytes, (int)world, (int)rank, (int)device, timeout, &handle, &err);
        Py_END_ALLOW_THREADS
    }
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    self = (NcclObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto error;
    self->handle = handle;
    handle = NULL;
    return (PyObject *)self;
error:
    if (have_id)
        PyBuffer_Release(&id);
    if (handle != NULL) {
        Py_BEGIN_ALLOW_THREADS
        ad_nccl_destroy(handle, 1);
        Py_END_ALLOW_THREADS
    }
    Py_CLEAR(self);
    return NULL;
}

static void nccl_dealloc(PyObject *op)
{
    NcclObject *self = (NcclObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    /* Never closed: leave as failed (abort), so that peers do not wait. */
    if (self->handle != NULL) {
        ad_nccl *handle = self->handle;
        self->handle = NULL;
        Py_BEGIN_ALLOW_THREADS
        ad_nccl_destroy(handle, 1);
        Py_END_ALLOW_THREADS
    }
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyDoc_STRVAR(nccl_exchange_doc,
"exchange(sends, recvs, stream, timeout)\n--\n\n"
"One event.  sends: (peer, device pointer, nbytes) of bytes to send;\n"
"recvs: (peer, device pointer, nbytes) of buffers to fill.  Items to one\n"
"peer pair with that peer's items in list order.  stream: the compute\n"
"stream handle (int): the transfers start after the work queued on it and\n"
"work queued on it afterwards sees the received bytes (no host sync).\n"
"Waits (bounded by timeout) for the previous exchange to finish first.");

static PyObject *nccl_exchange(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames)
{
    NcclObject *self = (NcclObject *)op;
    core_state *st = (core_state *)PyType_GetModuleState(cls);
    ad_nccl_send *sends = NULL;
    ad_nccl_recv *recvs = NULL;
    Py_ssize_t ns = 0, nr = 0;
    void *stream = NULL;
    double timeout = 0.0;
    ad_err err = {0};
    ad_status s;

    if (kwnames != NULL || nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "exchange(sends, recvs, stream, timeout) takes 4 positional arguments");
        goto error;
    }
    if (nccl_usable(self) < 0)
        goto error;
    if (nccl_exchange_args(st, ad_nccl_world(self->handle), args[0], args[1], args[2], args[3],
                           &sends, &ns, &recvs, &nr, &stream, &timeout) < 0)
        goto error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    s = ad_nccl_exchange(self->handle, sends, (size_t)ns, recvs, (size_t)nr, stream, timeout,
                         &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    PyMem_Free(sends);
    PyMem_Free(recvs);
    Py_RETURN_NONE;
error:
    PyMem_Free(sends);
    PyMem_Free(recvs);
    return NULL;
}

static PyObject *nccl_wait(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    NcclObject *self = (NcclObject *)op;
    core_state *st = (core_state *)PyType_GetModuleState(cls);
    double timeout;
    ad_err err = {0};
    ad_status s;

    if (kwnames != NULL || nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "wait(timeout) takes 1 positional argument");
        return NULL;
    }
    if (nccl_usable(self) < 0 || timeout_arg(args[0], &timeout) < 0)
        return NULL;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    s = ad_nccl_wait(self->handle, timeout, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(st, s, &err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *nccl_close(PyObject *op, PyObject *abort_obj)
{
    NcclObject *self = (NcclObject *)op;
    ad_nccl *handle;
    int abort_now;

    if (flag_arg(abort_obj, "abort", &abort_now) < 0)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "transport is in use by another thread");
        return NULL;
    }
    handle = self->handle;
    self->handle = NULL;
    if (handle != NULL) {
        Py_BEGIN_ALLOW_THREADS
        ad_nccl_destroy(handle, abort_now);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

#define NCCL_INT_GETTER(field, expr, closed_value)                     \
    static PyObject *nccl_get_##field(PyObject *op, void *closure)     \
    {                                                                  \
        ad_nccl *h = ((NcclObject *)op)->handle;                       \
        (void)closure;                                                 \
        return PyLong_FromLong(h != NULL ? (long)(expr) : (closed_value)); \
    }
NCCL_INT_GETTER(world_size, ad_nccl_world(h), 0)
NCCL_INT_GETTER(rank, ad_nccl_rank(h), -1)
NCCL_INT_GETTER(device, ad_nccl_device(h), -1)
#undef NCCL_INT_GETTER

static PyObject *nccl_get_stream(PyObject *op, void *closure)
{
    ad_nccl *h = ((NcclObject *)op)->handle;
    (void)closure;
    return PyLong_FromVoidPtr(h != NULL ? ad_nccl_stream(h) : NULL);
}

static PyObject *nccl_get_blocking(PyObject *op, void *closure)
{
    ad_nccl *h = ((NcclObject *)op)->handle;
    (void)closure;
    return PyBool_FromLong(h != NULL && ad_nccl_is_blocking(h));
}

static PyObject *nccl_get_failed(PyObject *op, void *closure)
{
    ad_nccl *h = ((NcclObject *)op)->handle;
    (void)closure;
    return PyBool_FromLong(h != NULL && ad_nccl_failed(h));
}

static PyObject *nccl_get_closed(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((NcclObject *)op)->handle == NULL);
}

static PyGetSetDef nccl_getset[] = {
    {"world_size", nccl_get_world_size, NULL, "ranks in the communicator (0 once closed)", NULL},
    {"rank", nccl_get_rank, NULL, "this rank (-1 once closed)", NULL},
    {"device", nccl_get_device, NULL, "CUDA device number (-1 once closed)", NULL},
    {"stream", nccl_get_stream, NULL, "the comm stream's cudaStream_t as an int", NULL},
    {"blocking", nccl_get_blocking, NULL, "True when NCCL is too old for a non-blocking communicator", NULL},
    {"failed", nccl_get_failed, NULL, "True once aborted after an error", NULL},
    {"closed", nccl_get_closed, NULL, "True once closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef nccl_methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))nccl_exchange,
     METH_METHOD | METH_FASTCALL | METH_KEYWORDS, nccl_exchange_doc},
    {"wait", (PyCFunction)(void (*)(void))nccl_wait, METH_METHOD | METH_FASTCALL | METH_KEYWORDS,
     "wait(timeout): until every exchange queued so far has finished on the GPU"},
    {"close", nccl_close, METH_O,
     "close(abort): release the communicator; abort=True gives up at once (after an error)"},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(nccl_doc,
"NcclTransport(unique_id, world_size, rank, device, timeout)\n--\n\n"
"One rank's NCCL communicator on CUDA device `device` (csrc/nccl.c), with\n"
"its own CUDA stream.  unique_id: the 128 bytes of nccl_unique_id() made by\n"
"rank 0.  Waits up to `timeout` seconds for the other ranks (non-blocking\n"
"NCCL, 2.14+).  Raises AsyncDiffError when NCCL cannot be used here (the\n"
"message says what is missing).  Internal API: see exchange().");

static PyType_Slot nccl_slots[] = {
    {Py_tp_new, nccl_new},
    {Py_tp_dealloc, nccl_dealloc},
    {Py_tp_getset, nccl_getset},
    {Py_tp_methods, nccl_methods},
    {Py_tp_doc, (void *)nccl_doc},
    {0, NULL},
};

static PyType_Spec nccl_spec = {
    .name = "asyncdiff._core.NcclTransport",
    .basicsize = sizeof(NcclObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = nccl_slots,
};

/* ======================================================================== */
/* End of the NCCL section                                                  */
/* ======================================================================== */

/* ------------------------------------------------------------------------ */
/* Module definition                                                        */
/* ------------------------------------------------------------------------ */

static PyMethodDef core_methods[] = {
    {"partition", (PyCFunction)(void (*)(void))core_partition,
     METH_VARARGS | METH_KEYWORDS, partition_doc},
    {"validate_assignment", (PyCFunction)(void (*)(void))core_validate_assignment,
     METH_VARARGS | METH_KEYWORDS, validate_assignment_doc},
    {"cost_summary", (PyCFunction)(void (*)(void))core_cost_summary,
     METH_VARARGS | METH_KEYWORDS, cost_summary_doc},
    {"shm_unlink", core_shm_unlink, METH_O, shm_unlink_doc},
    /* NCCL section */
    {"transports", core_transports, METH_NOARGS, transports_doc},
    {"gpu_status", core_gpu_status, METH_NOARGS, gpu_status_doc},
    {"nccl_unique_id", core_nccl_unique_id, METH_NOARGS, nccl_unique_id_doc},
    {"_nccl_check_exchange", (PyCFunction)(void (*)(void))core_nccl_check_exchange,
     METH_FASTCALL, nccl_check_exchange_doc},
    /* MORE BINDINGS: module-level functions. */
    {NULL, NULL, 0, NULL},
};

/* import_array is a macro that returns on failure; keep it in its own
 * function so the exec slot keeps its single exit path. */
static int import_numpy(void)
{
    import_array1(-1);
    return 0;
}

PyDoc_STRVAR(error_doc,
"Failure reported by the asyncdiff C core that is not a plain argument,\n"
"memory, timeout or OS error (for example a peer process that went away).\n"
"Attributes: status (short status name), argument (name or None).");

static int core_exec(PyObject *module)
{
    core_state *st = get_state(module);

    if (import_numpy() < 0)
        goto error;

    st->error = PyErr_NewExceptionWithDoc("asyncdiff._core.AsyncDiffError",
                                          error_doc, PyExc_RuntimeError, NULL);
    if (st->error == NULL || PyModule_AddObjectRef(module, "AsyncDiffError",
                                                   st->error) < 0)
        goto error;

    st->schedule_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &schedule_spec, NULL);
    if (st->schedule_type == NULL || PyModule_AddType(module, st->schedule_type) < 0)
        goto error;

    st->plan_type = PyStructSequence_NewType(&plan_desc);
    if (st->plan_type == NULL || PyModule_AddType(module, st->plan_type) < 0)
        goto error;

    st->shm_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &shm_spec, NULL);
    if (st->shm_type == NULL || PyModule_AddType(module, st->shm_type) < 0)
        goto error;

    /* NCCL section */
    st->nccl_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &nccl_spec, NULL);
    if (st->nccl_type == NULL || PyModule_AddType(module, st->nccl_type) < 0)
        goto error;
    if (PyModule_AddIntConstant(module, "NCCL_UNIQUE_ID_BYTES", AD_NCCL_UNIQUE_ID_BYTES) < 0)
        goto error;

    /* MORE BINDINGS: create transport types / constants here. */
    return 0;
error:
    /* Whatever was stored in st is released by core_clear when the failed
     * module is destroyed. */
    return -1;
}

static int core_traverse(PyObject *module, visitproc visit, void *arg)
{
    core_state *st = get_state(module);
    Py_VISIT(st->error);
    Py_VISIT(st->schedule_type);
    Py_VISIT(st->plan_type);
    Py_VISIT(st->shm_type);
    Py_VISIT(st->nccl_type);
    return 0;
}

static int core_clear(PyObject *module)
{
    core_state *st = get_state(module);
    Py_CLEAR(st->error);
    Py_CLEAR(st->schedule_type);
    Py_CLEAR(st->plan_type);
    Py_CLEAR(st->shm_type);
    Py_CLEAR(st->nccl_type);
    return 0;
}

static void core_free(void *module)
{
    (void)core_clear((PyObject *)module);
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* NumPy does not support sub-interpreters. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

PyDoc_STRVAR(core_doc,
"asyncdiff._core -- C core of asyncdiff: partitioner, schedule, transports.");

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncdiff._core",
    .m_doc = core_doc,
    .m_size = sizeof(core_state),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
