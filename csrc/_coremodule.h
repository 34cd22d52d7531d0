/*
 * _coremodule.h -- what the binding files of asyncdiff._core share: the
 * module state, how to reach it, the one status -> exception function, the
 * argument converters (_convert.c) and the type specs of the per-type files.
 *
 * Only the binding files (_coremodule.c, _convert.c, _*_type.c) include this
 * header; the core (partition.c, schedule.c, shm*.c, gpu.c, nccl.c) never
 * includes Python.h.
 *
 * NumPy keeps its C API table in one pointer per extension: _coremodule.c
 * defines AD_IMPORT_NUMPY before including this header and fills the table in
 * its exec slot; every other file sees NO_IMPORT_ARRAY.
 */
#ifndef ASYNCDIFF_COREMODULE_H
#define ASYNCDIFF_COREMODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL asyncdiff_core_ARRAY_API
#ifndef AD_IMPORT_NUMPY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "nccl.h"
#include "shm.h"
#include "status.h"

/* Everything the module owns.  Each type's instances reach it through
 * their type (see ad_state_of). */
typedef struct {
    PyObject *error;             /* asyncdiff._core.AsyncDiffError */
    PyObject *peer_error;        /* AsyncDiffPeerError(AsyncDiffError) */
    PyTypeObject *schedule_type; /* Schedule */
    PyTypeObject *plan_type;     /* Plan (struct sequence) */
    PyTypeObject *shm_type;      /* ShmTransport */
    PyTypeObject *nccl_type;     /* NcclTransport */
} core_state;

static inline core_state *ad_module_state(PyObject *module)
{
    return (core_state *)PyModule_GetState(module);
}

/* The state of the module that created `type`.  Our types come from
 * PyType_FromModuleAndSpec and cannot be subclassed, so the type of one of
 * our instances (or the `type` a tp_new receives) is always one of them. */
static inline core_state *ad_type_state(PyTypeObject *type)
{
    return (core_state *)PyType_GetModuleState(type);
}

static inline core_state *ad_state_of(PyObject *self)
{
    return ad_type_state(Py_TYPE(self));
}

/* A transport handle can be used: not gone (`gone` says how it went:
 * "detached", "closed") and not inside the C transport on another thread
 * (`busy`, set while a call runs without the GIL).  0, or -1 with
 * ValueError / RuntimeError set. */
static inline int ad_transport_usable(const void *handle, int busy, const char *gone)
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

/*
 * Raise the Python exception for a failed core call (the only place that
 * turns an ad_status into an exception): AD_ETYPE -> TypeError, AD_EINVAL ->
 * ValueError, AD_ENOMEM -> MemoryError, AD_ETIMEDOUT -> TimeoutError, AD_EIO
 * -> OSError (subclass chosen by errno), AD_EPEERGONE -> st->peer_error
 * (AsyncDiffPeerError, with `rank` = ad_err.peer or None), anything else ->
 * st->error (AsyncDiffError; RuntimeError when st or st->error is NULL).
 * The message always names the argument the core named; the exception
 * carries `status` and `argument` attributes.
 */
void raise_status(core_state *st, ad_status s, const ad_err *err);

/*
 * Argument converters, for the "O&" unit of PyArg_ParseTupleAndKeywords (or
 * called directly by METH_O functions).  Each takes a small struct whose
 * input fields (the argument's name, a range...) the caller sets before
 * parsing and whose output fields the converter fills.  They return 1 on
 * success and 0 with TypeError (wrong kind) or ValueError (bad value) set,
 * the message naming the argument.  Structs that own something (arrays,
 * buffers, item lists) are released by their *_clear function, which is
 * safe on a zero-initialised or already cleared struct: a caller clears
 * them on its one exit path whether or not parsing got that far.
 */

/* An int (or anything with __index__, NumPy integers included; never bool
 * or float) within [lo, hi]: usually the C type's range, the core checking
 * the real bounds. */
typedef struct {
    const char *name;
    long long lo, hi;
    long long value;
} ad_int_arg;
int ad_conv_int(PyObject *obj, void *arg);

/* A flag: bool, NumPy bool or an int; ints other than 0 and 1 are passed on
 * (value) for the core to refuse by value. */
typedef struct {
    const char *name;
    int value;
} ad_flag_arg;
int ad_conv_flag(PyObject *obj, void *arg);

/* A timeout: int or float seconds, finite, >= 0 (and <= 1e9). */
typedef struct {
    const char *name;
    double value;
} ad_seconds_arg;
int ad_conv_seconds(PyObject *obj, void *arg);

/* A str without NUL characters; value points into the str object, which
 * the caller's arguments keep alive. */
typedef struct {
    const char *name;
    const char *value;
} ad_str_arg;
int ad_conv_str(PyObject *obj, void *arg);

/* A CUDA stream handle: an int in [0, INTPTR_MAX] (0 is the legacy default
 * stream).  The argument is always called "stream". */
int ad_conv_stream(PyObject *obj, void *stream_out /* void ** */);

/* The 128 bytes of an NCCL unique id from any bytes-like object (not str).
 * The argument is always called "unique_id". */
int ad_conv_nccl_id(PyObject *obj, void *id_out /* unsigned char[128] */);

/* A NumPy array made from the argument (owned: ad_array_clear). */
typedef struct {
    const char *name;
    PyArrayObject *array;
} ad_array_arg;
void ad_array_clear(ad_array_arg *a);

/* Costs: a 1-D sequence of real numbers (not bool, complex, strings...),
 * as a private C-contiguous float64 copy (safe to read without the GIL). */
int ad_conv_costs(PyObject *obj, void *arg);

/* An assignment (a component number per block or unit): a 1-D sequence of
 * integers (not bool or float).  The converter checks kind and shape;
 * ad_assign_to_int32 then replaces the array by an int32 copy once `n`, the
 * number of components, is known: a value that does not fit int32 is a
 * ValueError worded like the core's "values must be in [0, n)". */
int ad_conv_assign(PyObject *obj, void *arg);
int ad_assign_to_int32(ad_array_arg *a, int n);

/* A 2-D matrix of 0/1 entries of bool or integer dtype, as a private
 * C-contiguous uint8 copy (any other value is a ValueError). */
int ad_conv_matrix01(PyObject *obj, void *arg);

/* The items of a shm publish (writable = 0) or fetch (writable = 1): a
 * sequence of (offset, buffer) pairs; each buffer is held (buffer protocol,
 * C-contiguous, writable for a fetch) until ad_shm_items_clear. */
typedef struct {
    int writable;
    ad_shm_item *items;
    Py_buffer *views;
    Py_ssize_t n;
} ad_shm_items_arg;
int ad_conv_shm_items(PyObject *obj, void *arg);
void ad_shm_items_clear(ad_shm_items_arg *a);

/* The sends (sending = 1) or receives of an NCCL exchange: a sequence of
 * (peer, pointer, nbytes) tuples of ints; name is "sends" or "recvs".  The
 * matching array (sends or recvs) holds n items, PyMem-allocated. */
typedef struct {
    const char *name;
    int sending;
    ad_nccl_send *sends;
    ad_nccl_recv *recvs;
    Py_ssize_t n;
} ad_nccl_items_arg;
int ad_conv_nccl_items(PyObject *obj, void *arg);
void ad_nccl_items_clear(ad_nccl_items_arg *a);

/*
 * The arguments of NcclTransport.exchange(sends, recvs, stream, timeout)
 * (positional only), parsed and checked (ad_nccl_check_items) for a
 * communicator of `world` ranks, as exchange does before it touches the
 * GPU.  Returns 0, or -1 with an exception set; the caller clears the
 * struct either way (ad_nccl_exchange_args_clear).  Defined in _nccl_type.c;
 * the test-only extension of csrc/tests/nccl_args_module.c calls it too.
 */
typedef struct {
    ad_nccl_items_arg sends, recvs;
    void *stream;
    ad_seconds_arg timeout;
} ad_nccl_exchange_args;
int ad_nccl_parse_exchange(core_state *st, int world, PyObject *args, PyObject *kwargs,
                           ad_nccl_exchange_args *out);
void ad_nccl_exchange_args_clear(ad_nccl_exchange_args *a);

/* Load the GPU libraries (once per process) with the GIL released: the first
 * call opens libraries and initialises the CUDA runtime.  In _nccl_type.c. */
ad_status ad_gpu_load_nogil(ad_err *err);

/* The types, each defined in its own file and created by the exec slot of
 * _coremodule.c. */
extern PyType_Spec ad_schedule_spec;         /* _schedule_type.c */
extern PyStructSequence_Desc ad_plan_desc;   /* _schedule_type.c */
extern PyType_Spec ad_shm_spec;              /* _shm_type.c */
extern PyType_Spec ad_nccl_spec;             /* _nccl_type.c */

#endif /* ASYNCDIFF_COREMODULE_H */
