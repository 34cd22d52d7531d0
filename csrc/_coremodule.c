/*
 * _coremodule.c -- the module asyncdiff._core: its definition and PEP 489
 * multi-phase initialisation (the exec slot makes AsyncDiffError,
 * AsyncDiffPeerError and the heap types of _schedule_type.c, _shm_type.c
 * and _nccl_type.c, kept in the module state), and its module-level
 * functions.
 *
 * The core itself is plain C that returns an ad_status; _convert.c holds
 * the argument converters and raise_status (see _coremodule.h).
 */
#define AD_IMPORT_NUMPY
#include "_coremodule.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "gpu.h"
#include "nccl.h"
#include "partition.h"
#include "shm.h"

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
    ad_array_arg costs = {"costs", NULL};
    ad_int_arg n = {"n", INT_MIN, INT_MAX, 0};
    PyObject *out = NULL;
    npy_intp nblocks;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&:partition", kwlist, ad_conv_costs,
                                     &costs, ad_conv_int, &n))
        goto error;
    nblocks = PyArray_DIM(costs.array, 0);
    out = PyArray_SimpleNew(1, &nblocks, NPY_INT32);
    if (out == NULL)
        goto error;
    {
        const double *c = (const double *)PyArray_DATA(costs.array);
        int32_t *a = (int32_t *)PyArray_DATA((PyArrayObject *)out);
        /* Both arrays are private to this call: safe without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        s = ad_partition_minmax(c, (size_t)nblocks, (int)n.value, a, NULL, &err);
        Py_END_ALLOW_THREADS
    }
    if (s != AD_OK) {
        raise_status(ad_module_state(module), s, &err);
        goto error;
    }
    ad_array_clear(&costs);
    return out;
error:
    ad_array_clear(&costs);
    Py_CLEAR(out);
    return NULL;
}

PyDoc_STRVAR(validate_assignment_doc,
"validate_assignment(assign, n) -> None\n"
"\n"
"Check that every entry of assign is a component number in [0, n) and that\n"
"every component has at least one block (components need not be\n"
"contiguous).  Raises ValueError naming the problem otherwise.");

static PyObject *core_validate_assignment(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"assign", "n", NULL};
    ad_array_arg assign = {"assign", NULL};
    ad_int_arg n = {"n", INT_MIN, INT_MAX, 0};
    PyObject *result = NULL;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&:validate_assignment", kwlist,
                                     ad_conv_assign, &assign, ad_conv_int, &n))
        goto error;
    if (ad_assign_to_int32(&assign, (int)n.value) < 0)
        goto error;
    s = ad_assignment_validate((const int32_t *)PyArray_DATA(assign.array),
                               (size_t)PyArray_DIM(assign.array, 0), (int)n.value, &err);
    if (s != AD_OK) {
        raise_status(ad_module_state(module), s, &err);
        goto error;
    }
    result = Py_NewRef(Py_None);
error:
    ad_array_clear(&assign);
    return result;
}

PyDoc_STRVAR(cost_summary_doc,
"cost_summary(costs, assign, n) -> (per_component, max, mean)\n"
"\n"
"Cost of each component of an assignment (numpy float64 array of length n),\n"
"the largest of them and their mean.  A component's cost is the sum over\n"
"its maximal runs of consecutive blocks of P[end] - P[start]; for the output\n"
"of partition() the max equals the optimum bit for bit.");

static PyObject *core_cost_summary(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"costs", "assign", "n", NULL};
    core_state *st = ad_module_state(module);
    ad_array_arg costs = {"costs", NULL}, assign = {"assign", NULL};
    ad_int_arg n = {"n", INT_MIN, INT_MAX, 0};
    PyObject *per = NULL, *result = NULL;
    npy_intp nblocks, ncomp;
    double mx = 0.0, mean = 0.0;
    ad_err err = {0};
    ad_status s;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&:cost_summary", kwlist,
                                     ad_conv_costs, &costs, ad_conv_assign, &assign,
                                     ad_conv_int, &n))
        goto error;
    if (ad_assign_to_int32(&assign, (int)n.value) < 0)
        goto error;
    nblocks = PyArray_DIM(costs.array, 0);
    if (PyArray_DIM(assign.array, 0) != nblocks) {
        PyErr_Format(PyExc_ValueError,
                     "assign has %zd entries but costs has %zd: one per block is needed",
                     (Py_ssize_t)PyArray_DIM(assign.array, 0), (Py_ssize_t)nblocks);
        goto error;
    }
    /* With no sane size for the output (n < 1 or n > blocks) the core's own
     * argument checks, which come before it touches per_component, word the
     * error. */
    ncomp = (n.value >= 1 && n.value <= nblocks) ? (npy_intp)n.value : 0;
    if (ncomp > 0) {
        per = PyArray_SimpleNew(1, &ncomp, NPY_DOUBLE);
        if (per == NULL)
            goto error;
    }
    s = ad_cost_summary((const double *)PyArray_DATA(costs.array),
                        (const int32_t *)PyArray_DATA(assign.array), (size_t)nblocks,
                        (int)n.value,
                        per != NULL ? (double *)PyArray_DATA((PyArrayObject *)per) : NULL,
                        &mx, &mean, &err);
    if (s == AD_OK && per == NULL)
        s = ad_err_set(&err, AD_EINTERNAL, NULL, "cost_summary: bad n accepted");
    if (s != AD_OK) {
        raise_status(st, s, &err);
        goto error;
    }
    result = Py_BuildValue("(Odd)", per, mx, mean);
error:
    ad_array_clear(&costs);
    ad_array_clear(&assign);
    Py_CLEAR(per);
    return result;
}

PyDoc_STRVAR(shm_unlink_doc,
"shm_unlink(name)\n--\n\n"
"Remove a shared-memory control segment's name (rank 0, once all ranks are\n"
"attached).  A name already gone is not an error.");

static PyObject *core_shm_unlink(PyObject *module, PyObject *name_obj)
{
    ad_str_arg name = {"name", NULL};
    ad_err err = {0};
    ad_status s;

    if (!ad_conv_str(name_obj, &name))
        return NULL;
    s = ad_shm_unlink(name.value, &err);
    if (s != AD_OK) {
        raise_status(ad_module_state(module), s, &err);
        return NULL;
    }
    Py_RETURN_NONE;
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
    int nccl = ad_gpu_load_nogil(NULL) == AD_OK;
    (void)module;
    return Py_BuildValue("{sOsOsO}", "emulate", Py_True, "shm",
                         shm_usable_here() ? Py_True : Py_False, "nccl",
                         nccl ? Py_True : Py_False);
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
    (void)ad_gpu_load_nogil(NULL);
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
        raise_status(ad_module_state(module), s, &err);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)id, AD_NCCL_UNIQUE_ID_BYTES);
}

static PyMethodDef core_methods[] = {
    {"partition", (PyCFunction)(void (*)(void))core_partition, METH_VARARGS | METH_KEYWORDS,
     partition_doc},
    {"validate_assignment", (PyCFunction)(void (*)(void))core_validate_assignment,
     METH_VARARGS | METH_KEYWORDS, validate_assignment_doc},
    {"cost_summary", (PyCFunction)(void (*)(void))core_cost_summary,
     METH_VARARGS | METH_KEYWORDS, cost_summary_doc},
    {"shm_unlink", core_shm_unlink, METH_O, shm_unlink_doc},
    {"transports", core_transports, METH_NOARGS, transports_doc},
    {"gpu_status", core_gpu_status, METH_NOARGS, gpu_status_doc},
    {"nccl_unique_id", core_nccl_unique_id, METH_NOARGS, nccl_unique_id_doc},
    {NULL, NULL, 0, NULL},
};

/* import_array is a macro that returns on failure; keep it in its own
 * function so the exec slot keeps its single exit path. */
static int import_numpy(void)
{
    import_array1(-1);
    return 0;
}

/* Make a heap type from `spec`, keep it in *slot and add it to the module. */
static int add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **slot)
{
    *slot = (PyTypeObject *)PyType_FromModuleAndSpec(module, spec, NULL);
    if (*slot == NULL)
        return -1;
    return PyModule_AddType(module, *slot);
}

PyDoc_STRVAR(error_doc,
"Failure reported by the asyncdiff C core that is not a plain argument,\n"
"memory, timeout or OS error (for example a peer process that went away).\n"
"Attributes: status (short status name), argument (name or None).");

PyDoc_STRVAR(peer_error_doc,
"AsyncDiffPeerError(*args, rank=None)\n--\n\n"
"Another rank died, left or failed (its error message, when it left one,\n"
"is in this one's).  Attribute rank: that rank, or None when unknown.");

/* AsyncDiffPeerError.__init__: BaseException's, plus the keyword `rank`
 * (None or an int), so that Python code can raise it like the core does. */
static int peer_error_init(PyObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *rank = Py_None;

    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        rank = PyDict_GetItemString(kwargs, "rank"); /* borrowed */
        if (rank == NULL || PyDict_GET_SIZE(kwargs) != 1) {
            PyErr_SetString(PyExc_TypeError,
                            "AsyncDiffPeerError() takes no keyword arguments but rank");
            return -1;
        }
        if (rank != Py_None && (PyBool_Check(rank) || !PyLong_Check(rank))) {
            PyErr_Format(PyExc_TypeError, "rank must be an int or None, not %.200s",
                         Py_TYPE(rank)->tp_name);
            return -1;
        }
    }
    if (((PyTypeObject *)PyExc_BaseException)->tp_init(self, args, NULL) < 0)
        return -1;
    return PyObject_SetAttrString(self, "rank", rank);
}

static PyType_Slot peer_error_slots[] = {
    {Py_tp_init, peer_error_init},
    {Py_tp_doc, (void *)peer_error_doc},
    {0, NULL},
};

static PyType_Spec peer_error_spec = {
    .name = "asyncdiff._core.AsyncDiffPeerError",
    .basicsize = 0,
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = peer_error_slots,
};

static int core_exec(PyObject *module)
{
    core_state *st = ad_module_state(module);

    if (import_numpy() < 0)
        goto error;
    st->error = PyErr_NewExceptionWithDoc("asyncdiff._core.AsyncDiffError", error_doc,
                                          PyExc_RuntimeError, NULL);
    if (st->error == NULL || PyModule_AddObjectRef(module, "AsyncDiffError", st->error) < 0)
        goto error;
    st->peer_error = PyType_FromModuleAndSpec(module, &peer_error_spec, st->error);
    if (st->peer_error == NULL ||
        PyModule_AddObjectRef(module, "AsyncDiffPeerError", st->peer_error) < 0)
        goto error;
    if (add_type(module, &ad_schedule_spec, &st->schedule_type) < 0)
        goto error;
    st->plan_type = PyStructSequence_NewType(&ad_plan_desc);
    if (st->plan_type == NULL || PyModule_AddType(module, st->plan_type) < 0)
        goto error;
    if (add_type(module, &ad_shm_spec, &st->shm_type) < 0 ||
        add_type(module, &ad_nccl_spec, &st->nccl_type) < 0)
        goto error;
    if (PyModule_AddIntConstant(module, "NCCL_UNIQUE_ID_BYTES", AD_NCCL_UNIQUE_ID_BYTES) < 0 ||
        PyModule_AddIntConstant(module, "SHM_MAX_RECORD", AD_SHM_MAX_RECORD) < 0 ||
        PyModule_AddIntConstant(module, "SHM_MAX_ERROR", AD_SHM_MAX_ERROR) < 0 ||
        PyModule_AddIntConstant(module, "SHM_BEAT_MS", AD_SHM_BEAT_MS) < 0)
        goto error;
    return 0;
error:
    /* Whatever was stored in st is released by core_clear when the failed
     * module is destroyed. */
    return -1;
}

static int core_traverse(PyObject *module, visitproc visit, void *arg)
{
    core_state *st = ad_module_state(module);
    Py_VISIT(st->error);
    Py_VISIT(st->peer_error);
    Py_VISIT(st->schedule_type);
    Py_VISIT(st->plan_type);
    Py_VISIT(st->shm_type);
    Py_VISIT(st->nccl_type);
    return 0;
}

static int core_clear(PyObject *module)
{
    core_state *st = ad_module_state(module);
    Py_CLEAR(st->error);
    Py_CLEAR(st->peer_error);
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
