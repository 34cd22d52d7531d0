/*
 * _shm_type.c -- asyncdiff._core.ShmTransport: one rank's handle on the
 * shared-memory transport (csrc/shm.c) for Python.
 *
 * Buffers come in through the buffer protocol (NumPy views of tensors), so
 * a wrong size or a read-only buffer is an exception, never a stray write.
 * fail() and busy() map to ad_shm_fail / ad_shm_set_busy (error records and
 * the heartbeat, docs/design.md §5.1, §8).
 * Every wait and copy runs with the GIL released; `busy` keeps a second
 * thread from detaching the handle while the first one is inside the C
 * transport without the GIL.
 */
#include "_coremodule.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>

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

/* An event tag: an int in [0, 2**64) (pipeline call << 32 | denoiser call
 * k, by convention).  Not bool. */
static int conv_tag(PyObject *obj, void *out)
{
    PyObject *index;
    unsigned long long v;

    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "tag must be an int, not %.200s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    index = PyNumber_Index(obj);
    if (index == NULL)
        return 0;
    v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError) ||
            PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "tag is out of range (must fit in [0, 2**64))");
        }
        return 0;
    }
    *(uint64_t *)out = (uint64_t)v;
    return 1;
}

/* publish(seq, items, timeout, tag=0) and fetch(seq, src, items, timeout,
 * tag=0) share this: the first arguments positional only, tag positional
 * or keyword. */
static PyObject *shm_move(PyObject *op, PyObject *args, PyObject *kwargs, int fetch)
{
    static char *publish_kwlist[] = {"", "", "", "tag", NULL};
    static char *fetch_kwlist[] = {"", "", "", "", "tag", NULL};
    ShmObject *self = (ShmObject *)op;
    ad_int_arg seq = {"seq", 1, LLONG_MAX, 0};
    ad_int_arg src = {"src", INT_MIN, INT_MAX, -1};
    ad_shm_items_arg items = {fetch, NULL, NULL, 0};
    ad_seconds_arg timeout = {"timeout", 0.0};
    uint64_t tag = 0;
    PyObject *result = NULL;
    ad_err err = {0};
    ad_status s;
    int parsed;

    if (fetch)
        parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&|O&:fetch", fetch_kwlist,
                                             ad_conv_int, &seq, ad_conv_int, &src,
                                             ad_conv_shm_items, &items, ad_conv_seconds,
                                             &timeout, conv_tag, &tag);
    else
        parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&|O&:publish", publish_kwlist,
                                             ad_conv_int, &seq, ad_conv_shm_items, &items,
                                             ad_conv_seconds, &timeout, conv_tag, &tag);
    if (!parsed || shm_usable(self) < 0)
        goto error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (fetch)
        s = ad_shm_fetch(self->handle, (uint64_t)seq.value, (int)src.value, tag, items.items,
                         (size_t)items.n, timeout.value, &err);
    else
        s = ad_shm_publish(self->handle, (uint64_t)seq.value, tag, items.items,
                           (size_t)items.n, timeout.value, &err);
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

/* allgather(record, timeout) -> list of bytes, one per rank. */
static PyObject *shm_allgather(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"", "", NULL};
    ShmObject *self = (ShmObject *)op;
    ad_seconds_arg timeout = {"timeout", 0.0};
    Py_buffer rec = {0};
    unsigned char mine[AD_SHM_MAX_RECORD];
    unsigned char *all = NULL;
    size_t lens[AD_SHM_MAX_WORLD];
    size_t n;
    PyObject *obj, *result = NULL;
    ad_err err = {0};
    ad_status s;
    int world;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO&:allgather", kwlist, &obj,
                                     ad_conv_seconds, &timeout))
        return NULL;
    if (PyUnicode_Check(obj) || PyObject_GetBuffer(obj, &rec, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "record must be bytes (at most %d of them), not %.200s",
                     AD_SHM_MAX_RECORD, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (rec.len > AD_SHM_MAX_RECORD) {
        PyErr_Format(PyExc_ValueError, "record must be at most %d bytes, got %zd",
                     AD_SHM_MAX_RECORD, rec.len);
        PyBuffer_Release(&rec);
        return NULL;
    }
    n = (size_t)rec.len;
    memcpy(mine, rec.buf, n); /* our own copy: read without the GIL */
    PyBuffer_Release(&rec);
    if (shm_usable(self) < 0)
        return NULL;
    world = ad_shm_world(self->handle);
    all = PyMem_Malloc((size_t)world * AD_SHM_MAX_RECORD);
    if (all == NULL)
        return PyErr_NoMemory();
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    s = ad_shm_allgather(self->handle, mine, n, all, lens, timeout.value, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(ad_state_of(op), s, &err);
        goto done;
    }
    result = PyList_New(world);
    if (result == NULL)
        goto done;
    for (int r = 0; r < world; r++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)all + (size_t)r * AD_SHM_MAX_RECORD,
                                                (Py_ssize_t)lens[r]);
        if (b == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, r, b);
    }
done:
    PyMem_Free(all);
    return result;
}

/* fail(message): mark this rank failed, leaving `message` for its peers.
 * A detached handle ignores it (error paths may call it late). */
static PyObject *shm_fail(PyObject *op, PyObject *msg_obj)
{
    ShmObject *self = (ShmObject *)op;
    ad_str_arg message = {"message", NULL};

    if (!ad_conv_str(msg_obj, &message))
        return NULL;
    if (self->handle == NULL)
        Py_RETURN_NONE;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "transport is in use by another thread");
        return NULL;
    }
    ad_shm_fail(self->handle, message.value);
    Py_RETURN_NONE;
}

/* busy(flag): this rank is (True) or is not (False) inside a call: its
 * heartbeat runs while it is.  Any thread; a detached handle ignores it. */
static PyObject *shm_set_busy(PyObject *op, PyObject *flag_obj)
{
    ShmObject *self = (ShmObject *)op;
    ad_flag_arg flag = {"flag", 0};

    if (!ad_conv_flag(flag_obj, &flag))
        return NULL;
    if (flag.value != 0 && flag.value != 1) {
        PyErr_Format(PyExc_ValueError, "flag must be True or False, got %d", flag.value);
        return NULL;
    }
    if (self->handle != NULL)
        ad_shm_set_busy(self->handle, flag.value);
    Py_RETURN_NONE;
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
    SHM_METHOD(publish, "publish(seq, items, timeout, tag=0): copy (offset, buffer) items in as "
                        "event seq, stored with its tag (pipeline call << 32 | denoiser call k)"),
    SHM_METHOD(fetch, "fetch(seq, src, items, timeout, tag=0): copy rank src's items of event "
                      "seq out; a different tag is an error on this rank and on its peers"),
    SHM_METHOD(barrier, "barrier(timeout): wait for every rank"),
    SHM_METHOD(reserve, "reserve(nbytes, timeout): collective; data buffers of at least nbytes"),
    SHM_METHOD(allgather, "allgather(record, timeout) -> list[bytes]: collective; every rank's "
                          "record (bytes, at most SHM_MAX_RECORD of them), in rank order"),
    {"ack", shm_ack, METH_O, "ack(seq): done reading every event <= seq"},
    {"fail", shm_fail, METH_O, "fail(message): mark this rank failed; peers' waits raise "
                               "AsyncDiffPeerError with the message (the first one is kept)"},
    {"busy", shm_set_busy, METH_O, "busy(flag): True while this rank is inside a call: its "
                                   "heartbeat then tells peers it is alive, so timeout bounds "
                                   "silence, not a long step"},
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
