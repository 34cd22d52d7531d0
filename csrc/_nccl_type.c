/*
 * _nccl_type.c -- asyncdiff._core.NcclTransport: one rank's NCCL
 * communicator (csrc/gpu.c + csrc/nccl.c) for Python.
 *
 * An INTERNAL API: asyncdiff/transport.py passes device pointers and sizes
 * as ints (tensor.data_ptr(), nbytes of CUDA tensors) and the compute
 * stream as an int (torch.cuda.current_stream().cuda_stream).  What can be
 * checked here is checked (types, non-negative ints, ranks in range, sizes
 * > 0, the handle still open); whether a pointer really is device memory of
 * that size cannot be, so other callers must not pass arbitrary numbers.
 *
 * Like ShmTransport, every wait runs with the GIL released and `busy` keeps
 * a second thread from closing the handle while the first is inside the C
 * transport without the GIL.
 */
#include "_coremodule.h"

#include <limits.h>
#include <string.h>

#include "gpu.h"
#include "nccl.h"

/* Hand sys.path to the loader: the pip wheels of NCCL and the CUDA runtime
 * live under one of its folders (docs/design.md §5.3).  Entries that are not
 * str, or not representable as file names, are skipped. */
static void pass_sys_path(void)
{
    enum { MAX_ENTRIES = 64 };
    const char *dirs[MAX_ENTRIES];
    PyObject *keep[MAX_ENTRIES];
    size_t n = 0;
    PyObject *path = PySys_GetObject("path"); /* borrowed; NULL when unset */
    if (path != NULL && PyList_Check(path)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(path) && n < MAX_ENTRIES; i++) {
            PyObject *item = PyList_GET_ITEM(path, i), *encoded;
            if (!PyUnicode_Check(item))
                continue;
            encoded = PyUnicode_EncodeFSDefault(item);
            if (encoded == NULL) {
                PyErr_Clear();
                continue;
            }
            dirs[n] = PyBytes_AS_STRING(encoded);
            keep[n++] = encoded;
        }
    }
    ad_gpu_search_dirs(dirs, n);
    for (size_t i = 0; i < n; i++)
        Py_DECREF(keep[i]);
}

ad_status ad_gpu_load_nogil(ad_err *err)
{
    ad_status s;
    if (ad_gpu_loaded() == NULL)
        pass_sys_path();
    Py_BEGIN_ALLOW_THREADS
    s = ad_gpu_load(err);
    Py_END_ALLOW_THREADS
    return s;
}

int ad_nccl_parse_exchange(core_state *st, int world, PyObject *args, PyObject *kwargs,
                           ad_nccl_exchange_args *out)
{
    static char *kwlist[] = {"", "", "", "", NULL};
    ad_err err = {0};
    ad_status s;

    out->sends = (ad_nccl_items_arg){"sends", 1, NULL, NULL, 0};
    out->recvs = (ad_nccl_items_arg){"recvs", 0, NULL, NULL, 0};
    out->stream = NULL;
    out->timeout = (ad_seconds_arg){"timeout", 0.0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&:exchange", kwlist,
                                     ad_conv_nccl_items, &out->sends, ad_conv_nccl_items,
                                     &out->recvs, ad_conv_stream, &out->stream,
                                     ad_conv_seconds, &out->timeout))
        return -1;
    s = ad_nccl_check_items(world, out->sends.sends, (size_t)out->sends.n, out->recvs.recvs,
                            (size_t)out->recvs.n, &err);
    if (s != AD_OK) {
        raise_status(st, s, &err);
        return -1;
    }
    return 0;
}

void ad_nccl_exchange_args_clear(ad_nccl_exchange_args *a)
{
    ad_nccl_items_clear(&a->sends);
    ad_nccl_items_clear(&a->recvs);
}

typedef struct {
    PyObject_HEAD
    ad_nccl *handle; /* NULL once closed */
    int busy;
} NcclObject;

static int nccl_usable(NcclObject *self)
{
    return ad_transport_usable(self->handle, self->busy, "closed");
}

static PyObject *nccl_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"unique_id", "world_size", "rank", "device", "timeout", NULL};
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES];
    ad_int_arg world = {"world_size", INT_MIN, INT_MAX, 0};
    ad_int_arg rank = {"rank", INT_MIN, INT_MAX, 0};
    ad_int_arg device = {"device", INT_MIN, INT_MAX, 0};
    ad_seconds_arg timeout = {"timeout", 0.0};
    ad_nccl *handle = NULL;
    NcclObject *self = NULL;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&O&:NcclTransport", kwlist,
                                     ad_conv_nccl_id, id, ad_conv_int, &world, ad_conv_int,
                                     &rank, ad_conv_int, &device, ad_conv_seconds, &timeout))
        goto error;
    /* Values first (no library needed), then the libraries. */
    s = ad_nccl_check_init((int)world.value, (int)rank.value, (int)device.value, timeout.value,
                           &err);
    if (s == AD_OK)
        s = ad_gpu_load_nogil(&err);
    if (s == AD_OK) {
        Py_BEGIN_ALLOW_THREADS
        s = ad_nccl_init(id, (int)world.value, (int)rank.value, (int)device.value,
                         timeout.value, &handle, &err);
        Py_END_ALLOW_THREADS
    }
    if (s != AD_OK) {
        raise_status(ad_type_state(type), s, &err);
        goto error;
    }
    self = (NcclObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto error;
    self->handle = handle;
    handle = NULL;
    return (PyObject *)self;
error:
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

static PyObject *nccl_exchange(PyObject *op, PyObject *args, PyObject *kwargs)
{
    NcclObject *self = (NcclObject *)op;
    core_state *st = ad_state_of(op);
    ad_nccl_exchange_args a = {0};
    PyObject *result = NULL;
    ad_err err = {0};
    ad_status s;

    if (nccl_usable(self) < 0 ||
        ad_nccl_parse_exchange(st, ad_nccl_world(self->handle), args, kwargs, &a) < 0)
        goto error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    s = ad_nccl_exchange(self->handle, a.sends.sends, (size_t)a.sends.n, a.recvs.recvs,
                         (size_t)a.recvs.n, a.stream, a.timeout.value, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    result = Py_NewRef(Py_None);
error:
    ad_nccl_exchange_args_clear(&a);
    return result;
}

static PyObject *nccl_wait(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"", NULL};
    NcclObject *self = (NcclObject *)op;
    ad_seconds_arg timeout = {"timeout", 0.0};
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&:wait", kwlist, ad_conv_seconds,
                                     &timeout) ||
        nccl_usable(self) < 0)
        return NULL;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    s = ad_nccl_wait(self->handle, timeout.value, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (s != AD_OK) {
        raise_status(ad_state_of(op), s, &err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *nccl_close(PyObject *op, PyObject *abort_obj)
{
    NcclObject *self = (NcclObject *)op;
    ad_flag_arg abort_now = {"abort", 0};
    ad_nccl *handle;

    if (!ad_conv_flag(abort_obj, &abort_now))
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "transport is in use by another thread");
        return NULL;
    }
    handle = self->handle;
    self->handle = NULL;
    if (handle != NULL) {
        Py_BEGIN_ALLOW_THREADS
        ad_nccl_destroy(handle, abort_now.value);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

#define NCCL_INT_GETTER(field, expr, closed_value)                         \
    static PyObject *nccl_get_##field(PyObject *op, void *closure)         \
    {                                                                      \
        ad_nccl *h = ((NcclObject *)op)->handle;                           \
        (void)closure;                                                     \
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
    {"blocking", nccl_get_blocking, NULL,
     "True when NCCL is too old for a non-blocking communicator", NULL},
    {"failed", nccl_get_failed, NULL, "True once aborted after an error", NULL},
    {"closed", nccl_get_closed, NULL, "True once closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef nccl_methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))nccl_exchange, METH_VARARGS | METH_KEYWORDS,
     nccl_exchange_doc},
    {"wait", (PyCFunction)(void (*)(void))nccl_wait, METH_VARARGS | METH_KEYWORDS,
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

PyType_Spec ad_nccl_spec = {
    .name = "asyncdiff._core.NcclTransport",
    .basicsize = sizeof(NcclObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = nccl_slots,
};
