/*
 * _convert.c -- conversions between Python and the C core, both ways:
 * the argument converters declared in _coremodule.h (Python objects in, C
 * values out, one helper per kind of argument) and raise_status (a core
 * status in, a Python exception out).
 */
#include "_coremodule.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>

#define POINTER_MAX ((long long)(INTPTR_MAX < LLONG_MAX ? INTPTR_MAX : LLONG_MAX))

void raise_status(core_state *st, ad_status s, const ad_err *err)
{
    PyObject *exc_type = NULL, *msg = NULL, *exc = NULL, *attr = NULL;
    const char *text = (err != NULL && err->msg[0] != '\0') ? err->msg : ad_status_name(s);
    const char *arg = (err != NULL) ? err->arg : NULL;

    switch (s) {
    case AD_ETYPE: exc_type = PyExc_TypeError; break;
    case AD_EINVAL: exc_type = PyExc_ValueError; break;
    case AD_ENOMEM: exc_type = PyExc_MemoryError; break;
    case AD_ETIMEDOUT: exc_type = PyExc_TimeoutError; break;
    case AD_EIO: exc_type = PyExc_OSError; break;
    case AD_EPEERGONE:
        exc_type = (st != NULL && st->peer_error != NULL) ? st->peer_error
                   : (st != NULL && st->error != NULL) ? st->error : PyExc_RuntimeError;
        break;
    default:
        exc_type = (st != NULL && st->error != NULL) ? st->error : PyExc_RuntimeError;
        break;
    }

    /* Messages may carry text from another process (a peer's error record)
     * or be cut mid-character by the record's size: never let decoding
     * them be the error. */
    msg = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
    if (msg != NULL && arg != NULL && strstr(text, arg) == NULL)
        Py_SETREF(msg, PyUnicode_FromFormat("%s: %U", arg, msg));
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
    if (s == AD_EPEERGONE) {
        /* The peer's rank when the core knows it (AsyncDiffPeerError.rank). */
        Py_CLEAR(attr);
        attr = (err != NULL && err->peer >= 0) ? PyLong_FromLong(err->peer) : Py_NewRef(Py_None);
        if (attr == NULL || PyObject_SetAttrString(exc, "rank", attr) < 0)
            goto error;
    }

    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    /* fall through: the references below are ours either way */
error:
    /* On an early failure the error raised while building the exception
     * (usually MemoryError) stays set, which is the best we can do. */
    Py_CLEAR(attr);
    Py_CLEAR(exc);
    Py_CLEAR(msg);
}

/*
 * The integer conversion behind ad_conv_int and the items of item lists,
 * whose names are made up on the fly ("sends[2] peer").  Returns 0, or -1
 * with an exception set.
 */
static int int_value(PyObject *obj, const char *name, long long lo, long long hi,
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
        PyErr_Format(PyExc_ValueError, "%s is out of range (must fit in [%lld, %lld])", name,
                     lo, hi);
        goto error;
    }
    Py_DECREF(index);
    *out = v;
    return 0;
error:
    Py_CLEAR(index);
    return -1;
}

int ad_conv_int(PyObject *obj, void *arg)
{
    ad_int_arg *a = (ad_int_arg *)arg;
    return int_value(obj, a->name, a->lo, a->hi, &a->value) == 0;
}

int ad_conv_flag(PyObject *obj, void *arg)
{
    ad_flag_arg *a = (ad_flag_arg *)arg;
    long long v;

    if (PyBool_Check(obj)) {
        a->value = (obj == Py_True);
        return 1;
    }
    if (PyArray_IsScalar(obj, Bool)) {
        int truth = PyObject_IsTrue(obj);
        if (truth < 0)
            return 0;
        a->value = truth;
        return 1;
    }
    if (!PyLong_Check(obj) && !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a bool, not %.200s", a->name,
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    if (int_value(obj, a->name, INT_MIN, INT_MAX, &v) < 0)
        return 0;
    a->value = (int)v;
    return 1;
}

int ad_conv_seconds(PyObject *obj, void *arg)
{
    ad_seconds_arg *a = (ad_seconds_arg *)arg;
    double v;

    if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyLong_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a number of seconds, not %.200s", a->name,
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred())
        return 0;
    if (!(v >= 0.0) || v > 1e9) {
        PyErr_Format(PyExc_ValueError, "%s must be finite and >= 0 seconds", a->name);
        return 0;
    }
    a->value = v;
    return 1;
}

int ad_conv_str(PyObject *obj, void *arg)
{
    ad_str_arg *a = (ad_str_arg *)arg;
    const char *text;
    Py_ssize_t len;

    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.200s", a->name,
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    text = PyUnicode_AsUTF8AndSize(obj, &len);
    if (text == NULL)
        return 0;
    if ((size_t)len != strlen(text)) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", a->name);
        return 0;
    }
    a->value = text;
    return 1;
}

int ad_conv_stream(PyObject *obj, void *stream_out)
{
    long long v;
    if (int_value(obj, "stream", 0, POINTER_MAX, &v) < 0)
        return 0;
    *(void **)stream_out = (void *)(intptr_t)v;
    return 1;
}

int ad_conv_nccl_id(PyObject *obj, void *id_out)
{
    Py_buffer id = {0};
    int ok = 0;

    if (PyUnicode_Check(obj) || PyObject_GetBuffer(obj, &id, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "unique_id must be bytes (%d of them), not %.200s",
                     AD_NCCL_UNIQUE_ID_BYTES, Py_TYPE(obj)->tp_name);
        return 0;
    }
    if (id.len != AD_NCCL_UNIQUE_ID_BYTES) {
        PyErr_Format(PyExc_ValueError, "unique_id must be exactly %d bytes, got %zd",
                     AD_NCCL_UNIQUE_ID_BYTES, id.len);
        goto done;
    }
    memcpy(id_out, id.buf, AD_NCCL_UNIQUE_ID_BYTES);
    ok = 1;
done:
    PyBuffer_Release(&id);
    return ok;
}

void ad_array_clear(ad_array_arg *a)
{
    Py_CLEAR(a->array);
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

    if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError))
        return;
    new_type = PyErr_ExceptionMatches(PyExc_TypeError) ? PyExc_TypeError : PyExc_ValueError;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyErr_Format(new_type, "%s cannot be converted to a numeric array: %S", name,
                 value != NULL ? value : Py_None);
    PyErr_Fetch(&ignored, &new_value, &new_tb);
    PyErr_NormalizeException(&ignored, &new_value, &new_tb);
    if (new_value != NULL && value != NULL) {
        PyException_SetCause(new_value, Py_NewRef(value));   /* steals */
        PyException_SetContext(new_value, Py_NewRef(value)); /* steals */
    }
    PyErr_Restore(ignored, new_value, new_tb);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* What an array argument may hold. */
enum { HOLD_REAL, HOLD_INT, HOLD_INT_OR_BOOL };

/*
 * `obj` as an array of `ndim` dimensions for argument `name`, element type
 * not decided yet.  An empty list becomes float64 in NumPy: when integers
 * are wanted it is let through to the size checks.
 */
static PyArrayObject *array_of(PyObject *obj, const char *name, int ndim, int hold)
{
    static const char *const what[] = {"real numbers", "integers", "booleans or integers"};
    PyArrayObject *arr = NULL;
    int tn, ok;

    arr = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (arr == NULL) {
        rename_conversion_error(name);
        goto error;
    }
    tn = PyArray_TYPE(arr);
    if (hold != HOLD_REAL && PyArray_SIZE(arr) == 0 && PyTypeNum_ISFLOAT(tn))
        tn = NPY_INT64;
    if (PyTypeNum_ISBOOL(tn))
        ok = hold == HOLD_INT_OR_BOOL;
    else
        ok = PyTypeNum_ISINTEGER(tn) || (hold == HOLD_REAL && PyTypeNum_ISFLOAT(tn));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must hold %s, got dtype %S", name, what[hold],
                     (PyObject *)PyArray_DESCR(arr));
        goto error;
    }
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %s, got an array with %d dimensions", name,
                     ndim == 1 ? "one-dimensional" : "two-dimensional", PyArray_NDIM(arr));
        goto error;
    }
    return arr;
error:
    Py_CLEAR(arr);
    return NULL;
}

/* A C-contiguous copy of an integer (or bool) array as int64 or, for
 * unsigned types, uint64: every integer type converts exactly to one. */
static PyArrayObject *widened(PyArrayObject *natural, int *is_signed)
{
    *is_signed = !PyTypeNum_ISUNSIGNED(PyArray_TYPE(natural));
    return (PyArrayObject *)PyArray_FromArray(
        natural, PyArray_DescrFromType(*is_signed ? NPY_INT64 : NPY_UINT64),
        NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
}

int ad_conv_costs(PyObject *obj, void *arg)
{
    ad_array_arg *a = (ad_array_arg *)arg;
    PyArrayObject *natural = array_of(obj, a->name, 1, HOLD_REAL);

    if (natural == NULL)
        return 0;
    a->array = (PyArrayObject *)PyArray_FromArray(
        natural, PyArray_DescrFromType(NPY_DOUBLE),
        NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY | NPY_ARRAY_FORCECAST);
    Py_DECREF(natural);
    return a->array != NULL;
}

int ad_conv_assign(PyObject *obj, void *arg)
{
    ad_array_arg *a = (ad_array_arg *)arg;
    a->array = array_of(obj, a->name, 1, HOLD_INT);
    return a->array != NULL;
}

int ad_assign_to_int32(ad_array_arg *a, int n)
{
    PyArrayObject *wide = NULL, *narrow = NULL;
    npy_intp len;
    int is_signed;

    wide = widened(a->array, &is_signed);
    if (wide == NULL)
        goto error;
    len = PyArray_DIM(wide, 0);
    narrow = (PyArrayObject *)PyArray_SimpleNew(1, &len, NPY_INT32);
    if (narrow == NULL)
        goto error;
    for (npy_intp i = 0; i < len; i++) {
        int32_t *dst = (int32_t *)PyArray_DATA(narrow) + i;
        if (is_signed) {
            int64_t v = ((const int64_t *)PyArray_DATA(wide))[i];
            if (v < INT32_MIN || v > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s values must be in [0, %d), got %s[%zd] = %lld",
                             a->name, n, a->name, (Py_ssize_t)i, (long long)v);
                goto error;
            }
            *dst = (int32_t)v;
        } else {
            uint64_t v = ((const uint64_t *)PyArray_DATA(wide))[i];
            if (v > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s values must be in [0, %d), got %s[%zd] = %llu",
                             a->name, n, a->name, (Py_ssize_t)i, (unsigned long long)v);
                goto error;
            }
            *dst = (int32_t)v;
        }
    }
    Py_DECREF(wide);
    Py_SETREF(a->array, narrow);
    return 0;
error:
    Py_CLEAR(wide);
    Py_CLEAR(narrow);
    return -1;
}

int ad_conv_matrix01(PyObject *obj, void *arg)
{
    ad_array_arg *a = (ad_array_arg *)arg;
    PyArrayObject *natural = NULL, *wide = NULL, *result = NULL;
    npy_intp cols;
    int is_signed;

    natural = array_of(obj, a->name, 2, HOLD_INT_OR_BOOL);
    if (natural == NULL)
        goto error;
    wide = widened(natural, &is_signed);
    if (wide == NULL)
        goto error;
    result = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(wide), NPY_UINT8);
    if (result == NULL)
        goto error;
    cols = PyArray_DIM(wide, 1);
    for (npy_intp i = 0; i < PyArray_SIZE(wide); i++) {
        /* int64 and uint64 agree on 0 and 1; anything else is refused */
        uint64_t v = ((const uint64_t *)PyArray_DATA(wide))[i];
        if (v > 1) {
            if (is_signed)
                PyErr_Format(PyExc_ValueError,
                             "%s values must be 0 or 1, got %s[%zd, %zd] = %lld", a->name,
                             a->name, (Py_ssize_t)(i / cols), (Py_ssize_t)(i % cols),
                             (long long)((const int64_t *)PyArray_DATA(wide))[i]);
            else
                PyErr_Format(PyExc_ValueError,
                             "%s values must be 0 or 1, got %s[%zd, %zd] = %llu", a->name,
                             a->name, (Py_ssize_t)(i / cols), (Py_ssize_t)(i % cols),
                             (unsigned long long)v);
            goto error;
        }
        ((uint8_t *)PyArray_DATA(result))[i] = (uint8_t)v;
    }
    Py_DECREF(natural);
    Py_DECREF(wide);
    a->array = result;
    return 1;
error:
    Py_CLEAR(natural);
    Py_CLEAR(wide);
    Py_CLEAR(result);
    return 0;
}

int ad_conv_shm_items(PyObject *obj, void *arg)
{
    ad_shm_items_arg *a = (ad_shm_items_arg *)arg;
    const int flags = a->writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS;
    PyObject *seq = NULL;
    Py_ssize_t n;

    seq = PySequence_Fast(obj, "items must be a sequence of (offset, buffer) pairs");
    if (seq == NULL)
        goto error;
    n = PySequence_Fast_GET_SIZE(seq);
    a->items = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *a->items);
    a->views = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *a->views);
    if (a->items == NULL || a->views == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    /* a->n counts the views held, so that clearing releases exactly those */
    while (a->n < n) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, a->n);
        long long offset;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "items must hold (offset, buffer) tuples");
            goto error;
        }
        if (int_value(PyTuple_GET_ITEM(pair, 0), "items offset", 0, LLONG_MAX, &offset) < 0)
            goto error;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 1), &a->views[a->n], flags) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "items buffer %zd must be a C-contiguous%s buffer",
                         a->n, a->writable ? " writable" : "");
            goto error;
        }
        a->items[a->n].offset = (size_t)offset;
        a->items[a->n].ptr = a->views[a->n].buf;
        a->items[a->n].nbytes = (size_t)a->views[a->n].len;
        a->n++;
    }
    Py_DECREF(seq);
    return 1;
error:
    Py_XDECREF(seq);
    ad_shm_items_clear(a);
    return 0;
}

void ad_shm_items_clear(ad_shm_items_arg *a)
{
    for (Py_ssize_t i = 0; i < a->n; i++)
        PyBuffer_Release(&a->views[i]);
    PyMem_Free(a->items);
    PyMem_Free(a->views);
    a->items = NULL;
    a->views = NULL;
    a->n = 0;
}

/* One (peer, pointer, nbytes) tuple, item i of argument `name`.  Ranges are
 * the C types' (pointer and nbytes >= 0); ad_nccl_check_items checks the
 * values. */
static int nccl_item(PyObject *t, const char *name, Py_ssize_t i, int *peer, void **ptr,
                     size_t *nbytes)
{
    char what[64];
    long long p, q, r;

    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
        PyErr_Format(PyExc_TypeError,
                     "%s[%zd] must be a (peer, pointer, nbytes) tuple, not %.200s", name, i,
                     Py_TYPE(t)->tp_name);
        return -1;
    }
    PyOS_snprintf(what, sizeof what, "%s[%zd] peer", name, i);
    if (int_value(PyTuple_GET_ITEM(t, 0), what, INT_MIN, INT_MAX, &p) < 0)
        return -1;
    PyOS_snprintf(what, sizeof what, "%s[%zd] pointer", name, i);
    if (int_value(PyTuple_GET_ITEM(t, 1), what, 0, POINTER_MAX, &q) < 0)
        return -1;
    PyOS_snprintf(what, sizeof what, "%s[%zd] nbytes", name, i);
    if (int_value(PyTuple_GET_ITEM(t, 2), what, 0, LLONG_MAX, &r) < 0)
        return -1;
    *peer = (int)p;
    *ptr = (void *)(intptr_t)q;
    *nbytes = (size_t)r;
    return 0;
}

int ad_conv_nccl_items(PyObject *obj, void *arg)
{
    ad_nccl_items_arg *a = (ad_nccl_items_arg *)arg;
    PyObject *seq = NULL;
    Py_ssize_t n;
    size_t count;
    char what[96];

    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be a sequence of (peer, pointer, nbytes) tuples, not %.200s",
                     a->name, Py_TYPE(obj)->tp_name);
        goto error;
    }
    PyOS_snprintf(what, sizeof what, "%s must be a sequence of (peer, pointer, nbytes) tuples",
                  a->name);
    seq = PySequence_Fast(obj, what);
    if (seq == NULL)
        goto error;
    n = PySequence_Fast_GET_SIZE(seq);
    count = (size_t)(n > 0 ? n : 1);
    if (a->sending)
        a->sends = PyMem_Calloc(count, sizeof *a->sends);
    else
        a->recvs = PyMem_Calloc(count, sizeof *a->recvs);
    if (a->sends == NULL && a->recvs == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int peer;
        void *ptr;
        size_t nbytes;
        if (nccl_item(PySequence_Fast_GET_ITEM(seq, i), a->name, i, &peer, &ptr, &nbytes) < 0)
            goto error;
        if (a->sending)
            a->sends[i] = (ad_nccl_send){peer, ptr, nbytes};
        else
            a->recvs[i] = (ad_nccl_recv){peer, ptr, nbytes};
    }
    a->n = n;
    Py_DECREF(seq);
    return 1;
error:
    Py_XDECREF(seq);
    ad_nccl_items_clear(a);
    return 0;
}

void ad_nccl_items_clear(ad_nccl_items_arg *a)
{
    PyMem_Free(a->sends);
    PyMem_Free(a->recvs);
    a->sends = NULL;
    a->recvs = NULL;
    a->n = 0;
}
