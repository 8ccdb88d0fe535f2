/*
 * Release/acquire 8-byte loads and stores on a writable buffer, for the shared-memory ring.
 *
 * x86-64 keeps stores in order, but ARM64 does not, and a plain memoryview or numpy store gives
 * no ordering guarantee: the consumer could see a published index before the record behind it.
 * These functions use the compiler's __atomic builtins, which emit the right barriers (or none,
 * on x86-64, where plain moves already have acquire/release semantics).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int
get_slot(PyObject *obj, Py_ssize_t off, int writable, Py_buffer *view, uint64_t **slot)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (off < 0 || off + 8 > view->len || (off & 7) != 0 || (((uintptr_t)view->buf) & 7) != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "offset %zd is not an aligned 8-byte slot in a buffer of %zd bytes",
                     off, view->len);
        return -1;
    }
    *slot = (uint64_t *)((char *)view->buf + off);
    return 0;
}

static PyObject *
load_acquire(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t *slot;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "load_acquire(buf, off) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (get_slot(args[0], off, 0, &view, &slot) < 0)
        return NULL;
    uint64_t v = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *
store_release(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t *slot;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "store_release(buf, off, value) takes 3 arguments");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[2]);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (get_slot(args[0], off, 1, &view, &slot) < 0)
        return NULL;
    __atomic_store_n(slot, (uint64_t)v, __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *
store_seq_cst(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t *slot;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "store_seq_cst(buf, off, value) takes 3 arguments");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[2]);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (get_slot(args[0], off, 1, &view, &slot) < 0)
        return NULL;
    __atomic_store_n(slot, (uint64_t)v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load_acquire", (PyCFunction)(void (*)(void))load_acquire, METH_FASTCALL,
     "load_acquire(buf, off) -> int: 8-byte unsigned load with acquire ordering."},
    {"store_release", (PyCFunction)(void (*)(void))store_release, METH_FASTCALL,
     "store_release(buf, off, value): 8-byte unsigned store with release ordering."},
    {"store_seq_cst", (PyCFunction)(void (*)(void))store_seq_cst, METH_FASTCALL,
     "store_seq_cst(buf, off, value): 8-byte store with a full fence (for sleep/wake flags)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_atomic", "Release/acquire 8-byte loads and stores.", -1, methods,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    return PyModule_Create(&module);
}
