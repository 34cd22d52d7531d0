/*
 * _schedule_type.c -- asyncdiff._core.Schedule (csrc/schedule.c for Python)
 * and Plan, the struct sequence its plan() method returns.
 */
#include "_coremodule.h"

#include <limits.h>

#include "schedule.h"

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
    {"receive", "same on all ranks: this call's transport event delivers the owners' "
                "stored outputs to the ranks that read them"},
    {"result_cached", "same on all ranks: the denoiser output is the replayed final "
                      "block's cached output"},
    {NULL, NULL},
};
#define PLAN_NFIELDS 11

PyStructSequence_Desc ad_plan_desc = {
    "asyncdiff._core.Plan",
    "What one rank does at one denoiser call (see docs/design.md §3).",
    plan_fields,
    PLAN_NFIELDS,
};

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
    static char *kwlist[] = {"model_n", "stride", "warm_up", "time_shift", "steps", NULL};
    ad_int_arg n = {"model_n", INT_MIN, INT_MAX, 0};
    ad_int_arg stride = {"stride", INT_MIN, INT_MAX, 0};
    ad_int_arg warm = {"warm_up", INT_MIN, INT_MAX, 0};
    ad_flag_arg ts = {"time_shift", 0};
    ad_int_arg steps = {"steps", LONG_MIN, LONG_MAX, 0};
    ScheduleObject *self = NULL;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&O&:Schedule", kwlist, ad_conv_int,
                                     &n, ad_conv_int, &stride, ad_conv_int, &warm, ad_conv_flag,
                                     &ts, ad_conv_int, &steps))
        goto error;
    s = ad_schedule_validate((int)n.value, (int)stride.value, (int)warm.value, ts.value,
                             (long)steps.value, &err);
    if (s != AD_OK) {
        raise_status(ad_type_state(type), s, &err);
        goto error;
    }
    self = (ScheduleObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto error;
    self->model_n = (int)n.value;
    self->stride = (int)stride.value;
    self->warm_up = (int)warm.value;
    self->time_shift = ts.value;
    self->steps = (long)steps.value;
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
        self->model_n, self->stride, self->warm_up, self->time_shift ? "True" : "False",
        self->steps);
}

PyDoc_STRVAR(schedule_plan_doc,
"plan(rank, k) -> Plan\n"
"\n"
"What rank `rank` (0 <= rank < world_size) does at denoiser call `k`\n"
"(0 <= k < steps).");

static PyObject *schedule_plan(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"rank", "k", NULL};
    ScheduleObject *self = (ScheduleObject *)op;
    core_state *st = ad_state_of(op);
    ad_int_arg rank = {"rank", INT_MIN, INT_MAX, 0};
    ad_int_arg k = {"k", LONG_MIN, LONG_MAX, 0};
    PyObject *result = NULL;
    ad_plan p;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&:plan", kwlist, ad_conv_int, &rank,
                                     ad_conv_int, &k))
        goto error;
    s = ad_schedule_plan(self->model_n, self->stride, self->warm_up, self->time_shift,
                         self->steps, (int)rank.value, (long)k.value, &p, &err);
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
            PyBool_FromLong(p.receive),
            PyBool_FromLong(p.result_cached),
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

PyDoc_STRVAR(schedule_component_of_doc,
"component_of(rank) -> int\n"
"\n"
"The component rank `rank` (0 <= rank < world_size) computes in the\n"
"asynchronous phase: rank r < model_n computes component r; with stride 2\n"
"the extra rank model_n computes component model_n - 1.");

static PyObject *schedule_component_of(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"rank", NULL};
    ScheduleObject *self = (ScheduleObject *)op;
    ad_int_arg rank = {"rank", INT_MIN, INT_MAX, 0};
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&:component_of", kwlist, ad_conv_int,
                                     &rank))
        return NULL;
    s = ad_schedule_check_rank(self->model_n, self->stride, (int)rank.value, &err);
    if (s != AD_OK) {
        raise_status(ad_state_of(op), s, &err);
        return NULL;
    }
    return PyLong_FromLong(ad_schedule_component_of(self->model_n, self->stride,
                                                    (int)rank.value));
}

/* The rows of a world x units 0/1 matrix as a tuple of tuples of the
 * column indices that hold 1 (in increasing order). */
static PyObject *rows_as_index_tuples(const unsigned char *m, int world, npy_intp units)
{
    PyObject *result = NULL, *row = NULL, *index = NULL;

    result = PyTuple_New(world);
    if (result == NULL)
        goto error;
    for (int r = 0; r < world; r++) {
        const unsigned char *bits = m + (size_t)r * (size_t)units;
        Py_ssize_t count = 0, j = 0;
        for (npy_intp u = 0; u < units; u++)
            count += bits[u];
        row = PyTuple_New(count);
        if (row == NULL)
            goto error;
        for (npy_intp u = 0; u < units; u++) {
            if (!bits[u])
                continue;
            index = PyLong_FromSsize_t((Py_ssize_t)u);
            if (index == NULL)
                goto error;
            PyTuple_SET_ITEM(row, j++, index); /* steals */
            index = NULL;
        }
        PyTuple_SET_ITEM(result, r, row); /* steals */
        row = NULL;
    }
    return result;
error:
    Py_CLEAR(row);
    Py_CLEAR(result);
    return NULL;
}

PyDoc_STRVAR(schedule_receives_doc,
"receives(owner, reads, final) -> tuple[tuple[int, ...], ...]\n"
"\n"
"What each rank must receive at the events where owners' outputs are\n"
"delivered (plan.receive), for a model cut into U units.  owner: 1-D ints,\n"
"the component in [0, model_n) of each unit (every component owns one at\n"
"least); reads: U x U of 0/1 (bool or integers), reads[u, v] = 1 when unit\n"
"v's output reaches unit u's input through glue code; final: the unit whose\n"
"output is the denoiser output (owned by component model_n - 1).  Returns,\n"
"for each of the world_size ranks, the sorted unit indices it receives:\n"
"what its computed units read less what they compute, with stride 2 the\n"
"final unit too, less the units the rank owns.");

static PyObject *schedule_receives(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"owner", "reads", "final", NULL};
    ScheduleObject *self = (ScheduleObject *)op;
    const int world = ad_schedule_world_size(self->model_n, self->stride);
    ad_array_arg owner = {"owner", NULL}, reads = {"reads", NULL};
    ad_int_arg final = {"final", LONG_MIN, LONG_MAX, 0};
    unsigned char *out = NULL;
    PyObject *result = NULL;
    npy_intp units;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&:receives", kwlist, ad_conv_assign,
                                     &owner, ad_conv_matrix01, &reads, ad_conv_int, &final))
        goto error;
    if (ad_assign_to_int32(&owner, self->model_n) < 0)
        goto error;
    units = PyArray_DIM(owner.array, 0);
    if (units > 0) {
        if ((size_t)units > PY_SSIZE_T_MAX / (size_t)world) {
            PyErr_NoMemory();
            goto error;
        }
        out = PyMem_Malloc((size_t)world * (size_t)units);
        if (out == NULL) {
            PyErr_NoMemory();
            goto error;
        }
    }
    s = ad_schedule_receives(self->model_n, self->stride,
                             (const int32_t *)PyArray_DATA(owner.array), (size_t)units,
                             (const unsigned char *)PyArray_DATA(reads.array),
                             (size_t)PyArray_DIM(reads.array, 0),
                             (size_t)PyArray_DIM(reads.array, 1), (long)final.value, out, &err);
    if (s != AD_OK) {
        raise_status(ad_state_of(op), s, &err);
        goto error;
    }
    result = rows_as_index_tuples(out, world, units);
error:
    PyMem_Free(out);
    ad_array_clear(&owner);
    ad_array_clear(&reads);
    return result;
}

/* Pickling support: Schedule(model_n, stride, warm_up, time_shift, steps). */
static PyObject *schedule_reduce(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    ScheduleObject *self = (ScheduleObject *)op;
    return Py_BuildValue("O(iiiOl)", (PyObject *)Py_TYPE(op), self->model_n, self->stride,
                         self->warm_up, self->time_shift ? Py_True : Py_False, self->steps);
}

#define SCHEDULE_INT_GETTER(field)                                      \
    static PyObject *schedule_get_##field(PyObject *op, void *closure) \
    {                                                                   \
        (void)closure;                                                  \
        return PyLong_FromLong((long)((ScheduleObject *)op)->field);    \
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
    {"plan", (PyCFunction)(void (*)(void))schedule_plan, METH_VARARGS | METH_KEYWORDS,
     schedule_plan_doc},
    {"component_of", (PyCFunction)(void (*)(void))schedule_component_of,
     METH_VARARGS | METH_KEYWORDS, schedule_component_of_doc},
    {"receives", (PyCFunction)(void (*)(void))schedule_receives, METH_VARARGS | METH_KEYWORDS,
     schedule_receives_doc},
    {"__reduce__", schedule_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(schedule_doc,
"Schedule(model_n, stride, warm_up, time_shift, steps)\n"
"\n"
"The asynchronous schedule of docs/design.md §3 for one pipeline call of\n"
"`steps` denoiser calls.  Immutable; plan(rank, k) says what a rank does,\n"
"component_of(rank) which component it computes, receives(owner, reads,\n"
"final) which units' outputs each rank receives.");

static PyType_Slot schedule_slots[] = {
    {Py_tp_new, schedule_new},
    {Py_tp_dealloc, schedule_dealloc},
    {Py_tp_repr, schedule_repr},
    {Py_tp_getset, schedule_getset},
    {Py_tp_methods, schedule_methods},
    {Py_tp_doc, (void *)schedule_doc},
    {0, NULL},
};

PyType_Spec ad_schedule_spec = {
    .name = "asyncdiff._core.Schedule",
    .basicsize = sizeof(ScheduleObject),
    .itemsize = 0,
    /* Not a base type: ad_state_of relies on every instance's type being
     * exactly this one. */
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = schedule_slots,
};
