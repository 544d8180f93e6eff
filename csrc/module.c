/* Python bindings of llmwire._native: buffer-protocol arguments, size checks
 * before any work, and the GIL released around every kernel. The Python
 * wrapper (llmwire/quant/_kernels.py) validates arguments first and raises
 * llmwire's own errors; the checks here only keep a misuse from touching
 * memory outside the buffers (ValueError). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kernels.h"

static int check_dtype(int dtype)
{
    if (lw_dtype_size(dtype) == 0) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", dtype);
        return -1;
    }
    return 0;
}

static int check_len(const Py_buffer *buf, const char *name, size_t need)
{
    if ((size_t)buf->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zu", name, buf->len, need);
        return -1;
    }
    return 0;
}

static int check_count(Py_ssize_t n, size_t itemsize)
{
    if (n < 0 || (size_t)n > PY_SSIZE_T_MAX / (itemsize ? itemsize : 1)) {
        PyErr_Format(PyExc_ValueError, "bad element count %zd", n);
        return -1;
    }
    return 0;
}

static int check_block(Py_ssize_t block, int bits)
{
    if (block < 2 || block > LW_MAX_BLOCK || (block & 1) || (bits != 4 && bits != 8)) {
        PyErr_Format(PyExc_ValueError, "bad block size %zd or bits %d", block, bits);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(cast_doc,
"cast(src, src_dtype, dst, dst_dtype, n, nontemporal=False)\n--\n\n"
"Convert n elements between float32 (0), float16 (1) and bfloat16 (2);\n"
"nontemporal writes the output past the CPU caches.");

static PyObject *native_cast(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int src_dtype, dst_dtype;
    Py_ssize_t n;
    int nontemporal = 0;
    if (!PyArg_ParseTuple(args, "y*iw*in|p", &src, &src_dtype, &dst, &dst_dtype, &n,
                          &nontemporal))
        return NULL;
    PyObject *result = NULL;
    if (check_dtype(src_dtype) || check_dtype(dst_dtype) || check_count(n, 4)
        || check_len(&src, "src", (size_t)n * lw_dtype_size(src_dtype))
        || check_len(&dst, "dst", (size_t)n * lw_dtype_size(dst_dtype)))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    lw_cast(src.buf, src_dtype, dst.buf, dst_dtype, (size_t)n, nontemporal);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

PyDoc_STRVAR(quantize_doc,
"quantize(src, src_dtype, n, block, bits, thresholds, rank_to_code, buckets, codes, absmax) -> int\n--\n\n"
"Block-quantize n elements into codes/absmax; return the non-finite count.");

static PyObject *native_quantize(PyObject *self, PyObject *args)
{
    Py_buffer src, thresholds, rank_to_code, buckets, codes, absmax;
    int src_dtype, bits;
    Py_ssize_t n, block;
    if (!PyArg_ParseTuple(args, "y*inniy*y*y*w*w*", &src, &src_dtype, &n, &block, &bits,
                          &thresholds, &rank_to_code, &buckets, &codes, &absmax))
        return NULL;
    PyObject *result = NULL;
    if (check_dtype(src_dtype) || check_count(n, 4) || check_block(block, bits))
        goto done;
    size_t nblocks = ((size_t)n + (size_t)block - 1) / (size_t)block;
    size_t ncodes = bits == 8 ? (size_t)n : ((size_t)n + 1) / 2;
    if (check_len(&src, "src", (size_t)n * lw_dtype_size(src_dtype))
        || check_len(&thresholds, "thresholds", (bits == 8 ? 256u : 15u) * sizeof(float))
        || check_len(&rank_to_code, "rank_to_code", (size_t)1 << bits)
        || check_len(&buckets, "buckets", bits == 8 ? 65536u : 0u)
        || check_len(&codes, "codes", ncodes)
        || check_len(&absmax, "absmax", nblocks * sizeof(float)))
        goto done;
    lw_code_tables tables = {bits, thresholds.buf, rank_to_code.buf, buckets.buf, 1};
    for (int r = 0; r < (1 << bits); r++)
        tables.identity &= ((const uint8_t *)rank_to_code.buf)[r] == r;
    int64_t nonfinite;
    Py_BEGIN_ALLOW_THREADS
    nonfinite = lw_quantize(src.buf, src_dtype, (size_t)n, (size_t)block, &tables,
                            codes.buf, absmax.buf);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(nonfinite);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&thresholds);
    PyBuffer_Release(&rank_to_code);
    PyBuffer_Release(&buckets);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&absmax);
    return result;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(codes, absmax, n, block, bits, code_values, dst, dst_dtype, nontemporal=False)\n--\n\n"
"Restore n elements of dst_dtype from codes and per-block absmax;\n"
"nontemporal writes float32 output past the CPU caches.");

static PyObject *native_dequantize(PyObject *self, PyObject *args)
{
    Py_buffer codes, absmax, code_values, dst;
    Py_ssize_t n, block;
    int bits, dst_dtype, nontemporal = 0;
    if (!PyArg_ParseTuple(args, "y*y*nniy*w*i|p", &codes, &absmax, &n, &block, &bits,
                          &code_values, &dst, &dst_dtype, &nontemporal))
        return NULL;
    PyObject *result = NULL;
    if (check_dtype(dst_dtype) || check_count(n, 4) || check_block(block, bits))
        goto done;
    size_t nblocks = ((size_t)n + (size_t)block - 1) / (size_t)block;
    size_t ncodes = bits == 8 ? (size_t)n : ((size_t)n + 1) / 2;
    if (check_len(&codes, "codes", ncodes)
        || check_len(&absmax, "absmax", nblocks * sizeof(float))
        || check_len(&code_values, "code_values", ((size_t)1 << bits) * sizeof(float))
        || check_len(&dst, "dst", (size_t)n * lw_dtype_size(dst_dtype)))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    lw_dequantize(codes.buf, absmax.buf, (size_t)n, (size_t)block, bits, code_values.buf,
                  dst.buf, dst_dtype, nontemporal);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&absmax);
    PyBuffer_Release(&code_values);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef native_methods[] = {
    {"cast", native_cast, METH_VARARGS, cast_doc},
    {"quantize", native_quantize, METH_VARARGS, quantize_doc},
    {"dequantize", native_dequantize, METH_VARARGS, dequantize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "llmwire._native",
    "C kernels of llmwire (quantize, dequantize, casts); see llmwire/quant/reference.py.",
    -1, native_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
