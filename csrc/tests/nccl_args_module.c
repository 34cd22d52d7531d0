/*
 * nccl_args_module.c -- _nccl_args, a test-only extension that
 * tests/test_nccl.py builds (never shipped, never part of asyncdiff._core).
 *
 * check_exchange(world_size, sends, recvs, stream, timeout) runs the part
 * of NcclTransport.exchange that comes before any GPU call -- the same
 * ad_nccl_parse_exchange of csrc/_nccl_type.c: the converters of
 * csrc/_convert.c, then ad_nccl_check_items -- for a communicator of
 * world_size ranks, so that it can be fuzzed on a machine without NCCL.
 * It raises what exchange would raise and returns None otherwise.
 */
#define AD_IMPORT_NUMPY
#include "_coremodule.h"

#include <limits.h>

#include "nccl.h"

static PyObject *check_exchange(PyObject *module, PyObject *args)
{
    ad_int_arg world = {"world_size", INT_MIN, INT_MAX, 0};
    ad_nccl_exchange_args parsed = {0};
    PyObject *rest = NULL, *result = NULL;
    ad_err err = {0};
    ad_status s;
    (void)module;

    if (PyTuple_GET_SIZE(args) < 1) {
        PyErr_SetString(PyExc_TypeError,
                        "check_exchange(world_size, sends, recvs, stream, timeout) "
                        "takes 5 positional arguments");
        goto error;
    }
    if (!ad_conv_int(PyTuple_GET_ITEM(args, 0), &world))
        goto error;
    s = ad_nccl_check_init((int)world.value, 0, 0, 0.0, &err);
    if (s != AD_OK) {
        raise_status(NULL, s, &err);
        goto error;
    }
    rest = PyTuple_GetSlice(args, 1, PyTuple_GET_SIZE(args));
    if (rest == NULL || ad_nccl_parse_exchange(NULL, (int)world.value, rest, NULL, &parsed) < 0)
        goto error;
    result = Py_NewRef(Py_None);
error:
    ad_nccl_exchange_args_clear(&parsed);
    Py_XDECREF(rest);
    return result;
}

static PyMethodDef methods[] = {
    {"check_exchange", check_exchange, METH_VARARGS,
     "check_exchange(world_size, sends, recvs, stream, timeout): exchange's checks"},
    {NULL, NULL, 0, NULL},
};

/* import_array returns from the function it is in on failure. */
static int exec_module(PyObject *module)
{
    (void)module;
    import_array1(-1);
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_nccl_args",
    .m_doc = "Test-only: NcclTransport.exchange's argument checks, without a GPU.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__nccl_args(void)
{
    return PyModuleDef_Init(&module_def);
}
