/*
 * _shm_type.c -- asyncdiff._core.ShmTransport: one rank's handle on the
 * shared-memory transport (csrc/shm.c) for Python.
 *
 * Buffers come in through the buffer protocol (NumPy views of tensors), so
 * a wrong size or a read-only buffer is an exception, never a stray write.
 * Every wait and copy runs with the GIL released; `busy` keeps a second
 * thread from detaching the handle while the first one is inside the C
 * transport without the GIL.
 */
#include "_coremodule.h"

#include <limits.h>
#include <stdint.h>

#include "shm.h"

typedef struct {
    PyObject_HEAD
    ad_shm *handle; /* NULL once detached */
    int busy;
} ShmObject;

static int shm_usable(ShmObject *self)
{
    return ad_transport_usable(self->handle, self->busy, "detached");
}

static PyObject *shm_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "world_size", "rank", "create", "timeout", NULL};
    ad_str_arg name = {"name", NULL};
    ad_int_arg world = {"world_size", INT_MIN, INT_MAX, 0};
    ad_int_arg rank = {"rank", INT_MIN, INT_MAX, 0};
    ad_flag_arg create = {"create", 0};
    ad_seconds_arg timeout = {"timeout", 0.0};
    ad_shm *handle = NULL;
    ShmObject *self = NULL;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&O&:ShmTransport", kwlist,
                                     ad_conv_str, &name, ad_conv_int, &world, ad_conv_int, &rank,
                                     ad_conv_flag, &create, ad_conv_seconds, &timeout))
        goto error;
    Py_BEGIN_ALLOW_THREADS
    s = ad_shm_attach(name.value, (int)world.value, (int)rank.value, create.value,
                      timeout.value, &handle, &err);
    Py_END_ALLOW_THREADS
    if (s != AD_OK) {
        raise_status(ad_type_state(type), s, &err);
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

/* publish(seq, items, timeout) and fetch(seq, src, items, timeout), both
 * positional only, share this. */
static PyObject *shm_move(PyObject *op, PyObject *args, PyObject *kwargs, int fetch)
{
    static char *publish_kwlist[] = {"", "", "", NULL};
    static char *fetch_kwlist[] = {"", "", "", "", NULL};
    ShmObject *self = (ShmObject *)op;
    ad_int_arg seq = {"seq", 1, LLONG_MAX, 0};
    ad_int_arg src = {"src", INT_MIN, INT_MAX, -1};
    ad_shm_items_arg items = {fetch, NULL, NULL, 0};
    ad_seconds_arg timeout = {"timeout", 0.0};
    PyObject *result = NULL;
    ad_err err = {0};
    ad_status s;
    int parsed;

    if (fetch)
        parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&:fetch", fetch_kwlist,
                                             ad_conv_int, &seq, ad_conv_int, &src,
                                             ad_conv_shm_items, &items, ad_conv_seconds,
                                             &timeout);
    else
        parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&:publish", publish_kwlist,
                                             ad_conv_int, &seq, ad_conv_shm_items, &items,
                                             ad_conv_seconds, &timeout);
    if (!parsed || shm_usable(self) < 0)
        goto error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (fetch)
        s = ad_shm_fetch(self->handle, (uint64_t)seq.value, (int)src.value, items.items,
                         (size_t)items.n, timeout.value, &err);
    else
        s = ad_shm_publish(self->handle, (uint64_t)seq.value, items.items, (size_t)items.n,
                           timeout.value, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(ad_state_of(op), s, &err);
        goto error;
    }
    result = Py_NewRef(Py_None);
error:
    ad_shm_items_clear(&items);
    return result;
}

static PyObject *shm_publish(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return shm_move(op, args, kwargs, 0);
}

static PyObject *shm_fetch(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return shm_move(op, args, kwargs, 1);
}

/* barrier(timeout) and reserve(nbytes, timeout), positional only. */
static PyObject *shm_collective(PyObject *op, PyObject *args, PyObject *kwargs, int reserve)
{
    static char *barrier_kwlist[] = {"", NULL};
    static char *reserve_kwlist[] = {"", "", NULL};
    ShmObject *self = (ShmObject *)op;
    ad_int_arg nbytes = {"nbytes", 0, LLONG_MAX / 4, 0};
    ad_seconds_arg timeout = {"timeout", 0.0};
    ad_err err = {0};
    ad_status s;
    int parsed;

    if (reserve)
        parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&:reserve", reserve_kwlist,
                                             ad_conv_int, &nbytes, ad_conv_seconds, &timeout);
    else
        parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "O&:barrier", barrier_kwlist,
                                             ad_conv_seconds, &timeout);
    if (!parsed || shm_usable(self) < 0)
        return NULL;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (reserve)
        s = ad_shm_reserve(self->handle, (size_t)nbytes.value, timeout.value, &err);
    else
        s = ad_shm_barrier(self->handle, timeout.value, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(ad_state_of(op), s, &err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *shm_barrier(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return shm_collective(op, args, kwargs, 0);
}

static PyObject *shm_reserve(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return shm_collective(op, args, kwargs, 1);
}

static PyObject *shm_ack(PyObject *op, PyObject *seq_obj)
{
    ShmObject *self = (ShmObject *)op;
    ad_int_arg seq = {"seq", 0, LLONG_MAX, 0};

    if (shm_usable(self) < 0 || !ad_conv_int(seq_obj, &seq))
        return NULL;
    ad_shm_ack(self->handle, (uint64_t)seq.value);
    Py_RETURN_NONE;
}

static PyObject *shm_detach(PyObject *op, PyObject *failed_obj)
{
    ShmObject *self = (ShmObject *)op;
    ad_flag_arg failed = {"failed", 0};

    if (!ad_conv_flag(failed_obj, &failed))
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "transport is in use by another thread");
        return NULL;
    }
    ad_shm_detach(self->handle, failed.value);
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

static PyGetSetDef shm_getset[] = {
    {"capacity", shm_get_capacity, NULL, "bytes in each data buffer", NULL},
    {"attached", shm_get_attached, NULL, "False once detached", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define SHM_METHOD(name, doc) \
    {#name, (PyCFunction)(void (*)(void))shm_##name, METH_VARARGS | METH_KEYWORDS, doc}

static PyMethodDef shm_methods[] = {
    SHM_METHOD(publish, "publish(seq, items, timeout): copy (offset, buffer) items in as event seq"),
    SHM_METHOD(fetch, "fetch(seq, src, items, timeout): copy rank src's items of event seq out"),
    SHM_METHOD(barrier, "barrier(timeout): wait for every rank"),
    SHM_METHOD(reserve, "reserve(nbytes, timeout): collective; data buffers of at least nbytes"),
    {"ack", shm_ack, METH_O, "ack(seq): done reading every event <= seq"},
    {"detach", shm_detach, METH_O, "detach(failed): leave; peers waiting on this rank fail at once"},
    {NULL, NULL, 0, NULL},
};

#undef SHM_METHOD

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

PyType_Spec ad_shm_spec = {
    .name = "asyncdiff._core.ShmTransport",
    .basicsize = sizeof(ShmObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = shm_slots,
};
