/* Fused multiply-accumulate over one RNS limb: the ciphertext x plaintext products of encrypted
 * scoring, summed with one modular reduction per coefficient instead of one per product.
 *
 * Computes exactly what OpenFHE's EvalMult(ct, pt) per product followed by EvalAddMany computes on
 * ciphertexts of one limb in evaluation (NTT) form: out_c[i] = sum_j ct_j,c[i] * pt_j[i] mod q,
 * for both ciphertext polynomials c = 0, 1, plus an optional ciphertext (or a plaintext with c1 = 0)
 * added to the sum (OpenFHE's EvalAdd). Nothing here
 * is secret or random: the inputs are public ring elements (a ciphertext is public data), and the
 * results are bit-identical to OpenFHE's (the tests compare serialized bytes).
 *
 * Products of two values below q < 2^62 are accumulated in 128 bits (count * q < 2^64 keeps the
 * sum below q * 2^64) and reduced once by Montgomery reduction; the plaintexts are stored
 * multiplied by 2^64 mod q (to_montgomery) so that the reduction's 2^-64 cancels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef unsigned __int128 u128;

static uint64_t neg_inverse(uint64_t q) { /* -q^-1 mod 2^64, q odd (Newton: 6 doublings of 1 bit) */
    uint64_t inv = q;
    for (int i = 0; i < 6; i++) inv *= 2 - q * inv;
    return (uint64_t)0 - inv;
}

static inline uint64_t redc(u128 t, uint64_t q, uint64_t qneg) { /* t * 2^-64 mod q, t < q * 2^64 */
    uint64_t m = (uint64_t)t * qneg;
    uint64_t r = (uint64_t)((t + (u128)m * q) >> 64);
    return r >= q ? r - q : r;
}

static int check_modulus(unsigned long long q, Py_ssize_t count) {
    if (q < 3 || !(q & 1) || q >> 62) {
        PyErr_SetString(PyExc_ValueError, "modulus must be odd and between 3 and 2^62");
        return -1;
    }
    if (count < 0 || (count > 0 && (u128)count * q > (u128)UINT64_MAX)) {
        PyErr_SetString(PyExc_ValueError, "too many products to accumulate for this modulus");
        return -1;
    }
    return 0;
}

/* Word arrays are read and written as uint64_t: a buffer must be 8-byte aligned (numpy allocates
 * so; a view into a serialization at an arbitrary offset is not, and is refused, not misread). */
static int check_aligned(Py_buffer *b, const char *name) {
    if ((uintptr_t)b->buf % _Alignof(uint64_t)) {
        PyErr_Format(PyExc_ValueError, "%s is not 8-byte aligned", name);
        return -1;
    }
    return 0;
}

/* A little-endian host word from any address (pack_planes reads views into serializations). */
static inline uint64_t load_word(const unsigned char *p) {
    uint64_t x;
    memcpy(&x, p, sizeof x);
    return x;
}

static int check_size(Py_buffer *b, Py_ssize_t words, const char *name) {
    if (check_aligned(b, name)) return -1;
    if (b->len != words * (Py_ssize_t)sizeof(uint64_t)) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes; expected %zd", name, b->len,
                     words * (Py_ssize_t)sizeof(uint64_t));
        return -1;
    }
    return 0;
}

/* ct: (2, n, stride) words, the first count of each row used; pt: (groups, n, count); out and add:
 * (groups, 2, n), add may be NULL. Coefficient-major, so that the count products of one coefficient
 * are contiguous and summed in registers (a product-major layout streams 2 * count arrays 64 KiB
 * apart, which alias in L1), and every group is summed while a coefficient's ciphertext words are
 * in L1: the ciphertexts are read from memory once per call, not once per group. */
static void mac_core(uint64_t *out, const uint64_t *ct, const uint64_t *pt, Py_ssize_t groups, Py_ssize_t count,
                     Py_ssize_t stride, Py_ssize_t n, uint64_t q, const uint64_t *add) {
    uint64_t qneg = neg_inverse(q);
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t *a0 = ct + i * stride, *a1 = ct + (n + i) * stride;
        for (Py_ssize_t g = 0; g < groups; g++) {
            const uint64_t *b = pt + (g * n + i) * count;
            u128 s0 = 0, s1 = 0;
            for (Py_ssize_t j = 0; j < count; j++) {
                s0 += (u128)a0[j] * b[j];
                s1 += (u128)a1[j] * b[j];
            }
            uint64_t r0 = redc(s0, q, qneg), r1 = redc(s1, q, qneg);
            uint64_t *o = out + g * 2 * n;
            if (add) {
                const uint64_t *d = add + g * 2 * n;
                r0 += d[i];
                r1 += d[n + i];
                r0 = r0 >= q ? r0 - q : r0;
                r1 = r1 >= q ? r1 - q : r1;
            }
            o[i] = r0;
            o[n + i] = r1;
        }
    }
}

PyDoc_STRVAR(mac_doc,
             "mac(out, ciphertexts, plaintexts, groups, count, stride, n, modulus, add=None)\n\n"
             "out[g][c][i] = sum over j < count of ciphertexts[c][i][j] * plaintexts[g][i][j] + add[g][c][i]\n"
             "mod modulus, for g < groups, c = 0, 1 and i < n. Native uint64 words below the modulus: out\n"
             "(groups, 2, n), ciphertexts (2, n, stride), plaintexts (groups, n, count) in Montgomery form,\n"
             "add (groups, 2, n) or None. Releases the GIL.");

static PyObject *mac(PyObject *self, PyObject *args) {
    Py_buffer out, ct, pt, add = {0};
    Py_ssize_t groups, count, stride, n;
    unsigned long long q;
    PyObject *add_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "w*y*y*nnnnK|O:mac", &out, &ct, &pt, &groups, &count, &stride, &n, &q, &add_obj))
        return NULL;
    if (add_obj != Py_None && PyObject_GetBuffer(add_obj, &add, PyBUF_SIMPLE) < 0) goto done;
    if (n <= 0 || groups < 1 || count < 1 || stride < count) {
        PyErr_SetString(PyExc_ValueError, "need n > 0, groups > 0 and 1 <= count <= stride");
        goto done;
    }
    if (check_modulus(q, count) || check_size(&out, groups * 2 * n, "out") ||
        check_size(&ct, 2 * n * stride, "ciphertexts") || check_size(&pt, groups * n * count, "plaintexts") ||
        (add.buf && check_size(&add, groups * 2 * n, "add")))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    mac_core(out.buf, ct.buf, pt.buf, groups, count, stride, n, q, add.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&ct);
    PyBuffer_Release(&pt);
    if (add.buf) PyBuffer_Release(&add);
    return result;
}

/* mac_gather: the history projection's products, read straight from OpenFHE serializations.
 *
 * ciphertext j's c0 and c1 words of this limb are the n little-endian words at byte offsets
 * offsets[2j] and offsets[2j + 1] of blob j (any alignment: loaded by memcpy), so no copy of the
 * ciphertexts and no transposition into mac's coefficient-major layout is made in between. T
 * coefficients of every ciphertext are gathered into a small coefficient-major tile (in L1), then
 * every group is summed as in mac_core. Products are accumulated in runs of at most `run` (run * q
 * < 2^64 keeps a run's 128-bit sum below q * 2^64), each run reduced once and the runs added mod q:
 * any number of ciphertexts in one pass. */
#define GATHER_TILE 8

static void gather_core(uint64_t *out, const unsigned char *const *c0, const unsigned char *const *c1,
                        const uint64_t *pt, Py_ssize_t groups, Py_ssize_t count, Py_ssize_t n, uint64_t q,
                        Py_ssize_t run, uint64_t *tile) {
    uint64_t qneg = neg_inverse(q);
    uint64_t *t0 = tile, *t1 = tile + GATHER_TILE * count;
    for (Py_ssize_t i0 = 0; i0 < n; i0 += GATHER_TILE) {
        Py_ssize_t width = n - i0 < GATHER_TILE ? n - i0 : GATHER_TILE;
        for (Py_ssize_t j = 0; j < count; j++)
            for (Py_ssize_t t = 0; t < width; t++) {
                t0[t * count + j] = load_word(c0[j] + 8 * (i0 + t));
                t1[t * count + j] = load_word(c1[j] + 8 * (i0 + t));
            }
        for (Py_ssize_t t = 0; t < width; t++) {
            Py_ssize_t i = i0 + t;
            const uint64_t *a0 = t0 + t * count, *a1 = t1 + t * count;
            for (Py_ssize_t g = 0; g < groups; g++) {
                const uint64_t *b = pt + (g * n + i) * count;
                uint64_t r0 = 0, r1 = 0;
                for (Py_ssize_t lo = 0; lo < count; lo += run) {
                    Py_ssize_t hi = lo + run < count ? lo + run : count;
                    u128 s0 = 0, s1 = 0;
                    for (Py_ssize_t j = lo; j < hi; j++) {
                        s0 += (u128)a0[j] * b[j];
                        s1 += (u128)a1[j] * b[j];
                    }
                    r0 += redc(s0, q, qneg);
                    r1 += redc(s1, q, qneg);
                    r0 = r0 >= q ? r0 - q : r0;
                    r1 = r1 >= q ? r1 - q : r1;
                }
                out[g * 2 * n + i] = r0;
                out[g * 2 * n + n + i] = r1;
            }
        }
    }
}

PyDoc_STRVAR(mac_gather_doc,
             "mac_gather(out, blobs, offsets, plaintexts, groups, count, n, modulus)\n\n"
             "out[g][c][i] = sum over j < count of word i of vector c of blobs[j] * plaintexts[g][i][j] mod\n"
             "modulus, where vector c of blob j is the n little-endian words at byte offset offsets[2j + c].\n"
             "out (groups, 2, n) native words; blobs a sequence of count bytes objects; offsets (count, 2)\n"
             "native int64; plaintexts (groups, n, count) in Montgomery form. Every vector must lie inside\n"
             "its blob (checked) and hold words below the modulus. Releases the GIL.");

static PyObject *mac_gather(PyObject *self, PyObject *args) {
    Py_buffer out, offs, pt;
    PyObject *blobs_obj, *seq = NULL, *result = NULL;
    Py_ssize_t groups, count, n;
    unsigned long long q;
    const unsigned char **c0 = NULL, **c1 = NULL;
    uint64_t *tile = NULL;
    if (!PyArg_ParseTuple(args, "w*Oy*y*nnnK:mac_gather", &out, &blobs_obj, &offs, &pt, &groups, &count, &n, &q))
        return NULL;
    if (n <= 0 || groups < 1 || count < 1) {
        PyErr_SetString(PyExc_ValueError, "need n > 0, groups > 0 and count > 0");
        goto done;
    }
    if (check_modulus(q, 1) || check_size(&out, groups * 2 * n, "out") ||
        check_size(&offs, 2 * count, "offsets") || check_size(&pt, groups * n * count, "plaintexts"))
        goto done;
    seq = PySequence_Fast(blobs_obj, "blobs must be a sequence of bytes");
    if (!seq) goto done;
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        PyErr_SetString(PyExc_ValueError, "blobs must hold count serializations");
        goto done;
    }
    c0 = PyMem_Malloc(sizeof *c0 * (size_t)count);
    c1 = PyMem_Malloc(sizeof *c1 * (size_t)count);
    tile = PyMem_Malloc(sizeof *tile * 2 * GATHER_TILE * (size_t)count);
    if (!c0 || !c1 || !tile) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *o = offs.buf;
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *blob = PySequence_Fast_GET_ITEM(seq, j);
        if (!PyBytes_Check(blob)) { /* immutable: stays valid (seq holds a reference) without the GIL */
            PyErr_SetString(PyExc_TypeError, "blobs must be bytes");
            goto done;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(blob);
        const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(blob);
        for (int c = 0; c < 2; c++) {
            int64_t at = o[2 * j + c];
            if (at < 0 || at > (int64_t)len || (int64_t)len - at < 8 * (int64_t)n) {
                PyErr_Format(PyExc_ValueError, "vector %d of blob %zd lies outside its %zd bytes", c, j, len);
                goto done;
            }
            (c ? c1 : c0)[j] = base + at;
        }
    }
    Py_ssize_t run = (Py_ssize_t)(UINT64_MAX / q);
    Py_BEGIN_ALLOW_THREADS
    gather_core(out.buf, c0, c1, pt.buf, groups, count, n, q, run, tile);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(c0);
    PyMem_Free(c1);
    PyMem_Free(tile);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&pt);
    return result;
}

PyDoc_STRVAR(add_mod_doc,
             "add_mod(out, values, modulus)\n\n"
             "out[i] = out[i] + values[i] mod modulus, in place (native uint64 words below the modulus).");

static PyObject *add_mod(PyObject *self, PyObject *args) {
    Py_buffer out, v;
    unsigned long long q;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*y*K:add_mod", &out, &v, &q)) return NULL;
    if (check_modulus(q, 1) == 0 && check_aligned(&out, "out") == 0 && check_aligned(&v, "values") == 0) {
        if (out.len != v.len || out.len % sizeof(uint64_t)) {
            PyErr_SetString(PyExc_ValueError, "out and values must be the same number of 64-bit words");
        } else {
            uint64_t *o = out.buf;
            const uint64_t *a = v.buf;
            Py_ssize_t len = out.len / (Py_ssize_t)sizeof(uint64_t);
            for (Py_ssize_t i = 0; i < len; i++) {
                uint64_t r = o[i] + a[i];
                o[i] = r >= q ? r - q : r;
            }
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&v);
    return result;
}

PyDoc_STRVAR(to_montgomery_doc,
             "to_montgomery(values, modulus)\n\n"
             "values[i] = values[i] * 2^64 mod modulus, in place (native uint64 words below the modulus).");

static PyObject *to_montgomery(PyObject *self, PyObject *args) {
    Py_buffer v;
    unsigned long long q;
    if (!PyArg_ParseTuple(args, "w*K:to_montgomery", &v, &q)) return NULL;
    if (check_modulus(q, 1) || check_aligned(&v, "values") || v.len % sizeof(uint64_t)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "values must be whole 64-bit words");
        PyBuffer_Release(&v);
        return NULL;
    }
    uint64_t *w = v.buf;
    Py_ssize_t len = v.len / (Py_ssize_t)sizeof(uint64_t);
    Py_BEGIN_ALLOW_THREADS
    uint64_t qneg = neg_inverse(q);
    uint64_t r = ((uint64_t)0 - q) % q;    /* 2^64 mod q */
    uint64_t r2 = (uint64_t)(((u128)r * r) % q); /* 2^128 mod q: redc(v * r2) = v * 2^64 mod q */
    for (Py_ssize_t i = 0; i < len; i++) w[i] = redc((u128)w[i] * r2, q, qneg);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pack_planes_doc,
             "pack_planes(words, bits) -> bytes\n\n"
             "Values below 2^bits (native uint64 words) as cipherfeed.he.wire lays them out: byte planes\n"
             "of 4, 2 and 1 bytes (little-endian) for the low bits // 8 bytes, then one bit plane\n"
             "(little bit order) per remaining bit. Releases the GIL.");

static PyObject *pack_planes(PyObject *self, PyObject *args) {
    Py_buffer v;
    int bits;
    if (!PyArg_ParseTuple(args, "y*i:pack_planes", &v, &bits)) return NULL;
    if (bits < 1 || bits > 64 || v.len % sizeof(uint64_t)) {
        PyErr_SetString(PyExc_ValueError, "bits must be 1..64 and words whole 64-bit words");
        PyBuffer_Release(&v);
        return NULL;
    }
    Py_ssize_t n = v.len / (Py_ssize_t)sizeof(uint64_t), size = 0;
    int widths[8], shifts[8], planes = 0, shift = 0;
    for (int width = 4; width >= 1; width /= 2)
        while (bits - shift >= 8 * width) {
            widths[planes] = width;
            shifts[planes++] = shift;
            size += n * width;
            shift += 8 * width;
        }
    size += (Py_ssize_t)(bits - shift) * ((n + 7) / 8);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) {
        PyBuffer_Release(&v);
        return NULL;
    }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const unsigned char *w = v.buf; /* any alignment: every word goes through load_word */
    Py_BEGIN_ALLOW_THREADS
    for (int p = 0; p < planes; p++) {
        int s = shifts[p];
        if (widths[p] == 4) /* little-endian host assumed by the format: memcpy of the low bytes */
            for (Py_ssize_t i = 0; i < n; i++, o += 4) { uint32_t x = (uint32_t)(load_word(w + 8 * i) >> s); memcpy(o, &x, 4); }
        else if (widths[p] == 2)
            for (Py_ssize_t i = 0; i < n; i++, o += 2) { uint16_t x = (uint16_t)(load_word(w + 8 * i) >> s); memcpy(o, &x, 2); }
        else
            for (Py_ssize_t i = 0; i < n; i++) *o++ = (uint8_t)(load_word(w + 8 * i) >> s);
    }
    for (int bit = shift; bit < bits; bit++) {
        Py_ssize_t full = n / 8;
        for (Py_ssize_t k = 0; k < full; k++) {
            const unsigned char *x = w + 64 * k;
            uint8_t byte = 0;
            for (int j = 0; j < 8; j++) byte |= (uint8_t)((load_word(x + 8 * j) >> bit) & 1) << j;
            *o++ = byte;
        }
        if (n % 8) {
            uint8_t byte = 0;
            for (Py_ssize_t j = 8 * full; j < n; j++)
                byte |= (uint8_t)((load_word(w + 8 * j) >> bit) & 1) << (j - 8 * full);
            *o++ = byte;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return out;
}

static PyMethodDef methods[] = {
    {"pack_planes", pack_planes, METH_VARARGS, pack_planes_doc},
    {"mac", mac, METH_VARARGS, mac_doc},
    {"mac_gather", mac_gather, METH_VARARGS, mac_gather_doc},
    {"add_mod", add_mod, METH_VARARGS, add_mod_doc},
    {"to_montgomery", to_montgomery, METH_VARARGS, to_montgomery_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rnsmac", "One-limb RNS multiply-accumulate.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__rnsmac(void) { return PyModule_Create(&module); }
