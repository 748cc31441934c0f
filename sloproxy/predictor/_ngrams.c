/* Compiled hashing of a prompt window's word and character n-grams (features.window_ngrams).
 *
 * Why C: the numpy version is a dozen array operations of a microsecond each plus a Python-level
 * tokeniser; on the proxy's request path, where every request is featurised, that was a tenth of
 * the CPU the proxy spent per request under the `slo` policy. This file computes exactly what
 * features._window_ngrams_numpy computes, in one pass and without a Python object per token;
 * tests/test_predictor_ngrams.py checks the two give identical results. When no C compiler was
 * there at install time, the package runs the numpy version (same features, slower).
 *
 * window_ngrams(window_bytes, cue_table) -> (words, chars, n_tokens, first_token, hits)
 *   words       bytes: int64 word n-gram buckets (unigrams, first-line unigrams, bigrams,
 *               first-line bigrams), each the full 64-bit hash masked to WORD_BITS
 *   chars       bytes: int64 char 3/4/5-gram buckets of the first CHAR_WINDOW bytes, offset by WORD_DIM
 *   n_tokens    how many word tokens the window has
 *   first_token the first token (bytes), or None
 *   hits        [(position in words, full hash)] where cue_table[bucket] != 0 (cue candidates)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Keep in step with features.py (FEATURE_SPEC_VERSION covers both). */
#define WORD_BITS 18
#define CHAR_BITS 18
#define WORD_DIM ((uint64_t)1 << WORD_BITS)
#define CHAR_WINDOW 768
#define FIRST_LINE_BYTES 300
#define BIGRAM_MUL UINT64_C(1000003)
#define BIGRAM_ADD UINT64_C(0x9E3779B9)
#define FIRST_SALT UINT64_C(0x5BD1E995)

static const uint64_t CHAR_MASKS[3] = {(UINT64_C(1) << 24) - 1, (UINT64_C(1) << 32) - 1, (UINT64_C(1) << 40) - 1};
static const uint64_t CHAR_MULS[3] = {UINT64_C(0x9E3779B97F4A7C15), UINT64_C(0xC2B2AE3D27D4EB4F),
                                      UINT64_C(0x165667B19E3779F9)};

/* Byte classes of the tokeniser (features.tokenize): runs of WORD bytes are tokens, every PUNCT
 * byte is a token of its own, SPACE bytes (what bytes.split() splits on) separate tokens. */
enum { WORD = 0, PUNCT = 1, SPACE = 2 };
static unsigned char byte_class[256];
static uint32_t crc_table[256];

static void init_tables(void) {
    for (int b = 0; b < 256; b++) {
        int wordish = (b >= 'a' && b <= 'z') || (b >= '0' && b <= '9') || b == '\'' || b >= 128;
        if (b == ' ' || b == '\t' || b == '\n' || b == '\r' || b == 0x0b || b == 0x0c)
            byte_class[b] = SPACE;
        else if (wordish || b < 0x21 || b == 0x7f)
            byte_class[b] = WORD;
        else
            byte_class[b] = PUNCT;
        uint32_t c = (uint32_t)b;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[b] = c;
    }
}

/* CRC-32 as zlib.crc32 computes it (the hash the numpy version and the cue tables use). */
static inline uint64_t crc32_of(const unsigned char *p, Py_ssize_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return (uint64_t)(c ^ 0xFFFFFFFFu);
}

/* Record a cue candidate: its position among the word n-grams and its full hash. */
static int append_hit(PyObject *hits, Py_ssize_t position, uint64_t full) {
    PyObject *hit = Py_BuildValue("(nK)", position, (unsigned long long)full);
    if (hit == NULL)
        return -1;
    int failed = PyList_Append(hits, hit);
    Py_DECREF(hit);
    return failed;
}

static PyObject *window_ngrams(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer text, cues;
    if (!PyArg_ParseTuple(args, "y*y*", &text, &cues))
        return NULL;
    PyObject *result = NULL, *words_obj = NULL, *chars_obj = NULL, *hits = NULL, *first = NULL;
    uint64_t *hashes = NULL;
    const unsigned char *s = text.buf;
    const unsigned char *table = cues.buf;
    Py_ssize_t n = text.len;
    if (cues.len < (Py_ssize_t)WORD_DIM) {
        PyErr_SetString(PyExc_ValueError, "cue_table must have WORD_DIM entries");
        goto done;
    }

    /* The first line's tokens are those that start before its end (read up to FIRST_LINE_BYTES). */
    Py_ssize_t line_end = n < FIRST_LINE_BYTES ? n : FIRST_LINE_BYTES;
    const unsigned char *newline = memchr(s, '\n', (size_t)line_end);
    if (newline != NULL)
        line_end = newline - s;

    /* Tokenise and hash: at most one token per byte. */
    hashes = PyMem_Malloc(sizeof(uint64_t) * (size_t)(n > 0 ? n : 1));
    if (hashes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t n_tok = 0, n_first = 0, i = 0, first_start = -1, first_len = 0;
    while (i < n) {
        unsigned char k = byte_class[s[i]];
        if (k == SPACE) {
            i++;
            continue;
        }
        Py_ssize_t start = i++;
        if (k == WORD)
            while (i < n && byte_class[s[i]] == WORD)
                i++;
        if (first_start < 0) {
            first_start = start;
            first_len = i - start;
        }
        if (start < line_end)
            n_first++;
        hashes[n_tok++] = crc32_of(s + start, i - start);
    }

    Py_ssize_t n_words = n_tok + n_first + (n_tok > 0 ? n_tok - 1 : 0) + (n_first > 0 ? n_first - 1 : 0);
    words_obj = PyBytes_FromStringAndSize(NULL, n_words * 8);
    hits = PyList_New(0);
    if (words_obj == NULL || hits == NULL)
        goto done;
    int64_t *words = (int64_t *)PyBytes_AS_STRING(words_obj);
    Py_ssize_t w = 0;
    for (Py_ssize_t t = 0; t < n_tok; t++, w++) {
        uint64_t full = hashes[t];
        words[w] = (int64_t)(full & (WORD_DIM - 1));
        if (table[words[w]] && append_hit(hits, w, full) < 0)
            goto done;
    }
    /* The other blocks, in the numpy version's order; full hashes wrap around at 64 bits. */
    for (int block = 1; block < 4; block++) {
        Py_ssize_t count = block == 1 ? n_first : block == 2 ? (n_tok > 0 ? n_tok - 1 : 0) : (n_first > 0 ? n_first - 1 : 0);
        for (Py_ssize_t t = 0; t < count; t++, w++) {
            uint64_t full;
            if (block == 1)
                full = hashes[t] ^ FIRST_SALT;
            else if (block == 2)
                full = (hashes[t] * BIGRAM_MUL) ^ (hashes[t + 1] + BIGRAM_ADD);
            else
                full = ((hashes[t] ^ FIRST_SALT) * BIGRAM_MUL) ^ (hashes[t + 1] + BIGRAM_ADD);
            words[w] = (int64_t)(full & (WORD_DIM - 1));
            if (table[words[w]] && append_hit(hits, w, full) < 0)
                goto done;
        }
    }

    /* Char n-grams: the n bytes at a position, read little-endian, multiply-shift hashed per order. */
    Py_ssize_t m = n < CHAR_WINDOW ? n : CHAR_WINDOW;
    Py_ssize_t per_order[3] = {m >= 3 ? m - 2 : 0, m >= 4 ? m - 3 : 0, m >= 5 ? m - 4 : 0};
    chars_obj = PyBytes_FromStringAndSize(NULL, (per_order[0] + per_order[1] + per_order[2]) * 8);
    if (chars_obj == NULL)
        goto done;
    int64_t *chars = (int64_t *)PyBytes_AS_STRING(chars_obj);
    Py_ssize_t c = 0;
    for (int order = 0; order < 3; order++) {
        for (Py_ssize_t p = 0; p < per_order[order]; p++) {
            uint64_t gram = 0;
            Py_ssize_t width = order + 3;
            for (Py_ssize_t b = width - 1; b >= 0; b--)
                gram = (gram << 8) | s[p + b];
            chars[c++] = (int64_t)(((gram & CHAR_MASKS[order]) * CHAR_MULS[order]) >> (64 - CHAR_BITS)) + (int64_t)WORD_DIM;
        }
    }

    if (first_start >= 0) {
        first = PyBytes_FromStringAndSize((const char *)s + first_start, first_len);
        if (first == NULL)
            goto done;
    } else {
        first = Py_NewRef(Py_None);
    }
    result = Py_BuildValue("(OOnOO)", words_obj, chars_obj, n_tok, first, hits);
done:
    PyMem_Free(hashes);
    Py_XDECREF(words_obj);
    Py_XDECREF(chars_obj);
    Py_XDECREF(first);
    Py_XDECREF(hits);
    PyBuffer_Release(&text);
    PyBuffer_Release(&cues);
    return result;
}

/* The sum numpy's add.reduce gives over the gathered values w[idx[0]], ..., w[idx[n-1]] (float64,
 * contiguous): pairwise summation with eight accumulators over blocks of up to 128 values and
 * halving above that, numpy's own order, added to the reduction's identity (+0.0, which turns a
 * sum of -0.0s into +0.0), so the text score matches TextModel's numpy version bit for bit
 * (tests/test_predictor_ngrams.py compares them). */
#define PAIRWISE_BLOCK 128
static double pairwise_gather(const double *w, const int64_t *idx, Py_ssize_t n) {
    if (n < 8) {
        double res = -0.0;
        for (Py_ssize_t i = 0; i < n; i++)
            res += w[idx[i]];
        return res;
    }
    if (n <= PAIRWISE_BLOCK) {
        double r[8];
        for (int j = 0; j < 8; j++)
            r[j] = w[idx[j]];
        Py_ssize_t i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += w[idx[i + j]];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += w[idx[i]];
        return res;
    }
    Py_ssize_t half = n / 2;
    half -= half % 8;
    return pairwise_gather(w, idx, half) + pairwise_gather(w, idx + half, n - half);
}

/* One block's share of the text score: the sum of its buckets' weights over sqrt(its size). */
static int block_score(Py_buffer *ids, const double *w, Py_ssize_t n_weights, double *score) {
    Py_ssize_t n = ids->len / (Py_ssize_t)sizeof(int64_t);
    if (ids->len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "bucket ids must be whole int64 values");
        return -1;
    }
    const int64_t *idx = ids->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= n_weights) {
            PyErr_Format(PyExc_ValueError, "bucket %lld is outside the %zd weights", (long long)idx[i], n_weights);
            return -1;
        }
    }
    if (n > 0)
        *score += (0.0 + pairwise_gather(w, idx, n)) / sqrt((double)n);
    return 0;
}

static PyObject *text_score(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer words, chars, weights;
    double bias;
    if (!PyArg_ParseTuple(args, "y*y*y*d", &words, &chars, &weights, &bias))
        return NULL;
    PyObject *result = NULL;
    double score = bias;
    if (weights.len % (Py_ssize_t)sizeof(double) != 0) {
        PyErr_SetString(PyExc_ValueError, "weights must be whole float64 values");
        goto done;
    }
    Py_ssize_t n_weights = weights.len / (Py_ssize_t)sizeof(double);
    if (block_score(&words, weights.buf, n_weights, &score) < 0 || block_score(&chars, weights.buf, n_weights, &score) < 0)
        goto done;
    result = PyFloat_FromDouble(score);
done:
    PyBuffer_Release(&words);
    PyBuffer_Release(&chars);
    PyBuffer_Release(&weights);
    return result;
}

static PyMethodDef methods[] = {
    {"window_ngrams", window_ngrams, METH_VARARGS,
     "window_ngrams(window_bytes, cue_table) -> (words, chars, n_tokens, first_token, hits)"},
    {"text_score", text_score, METH_VARARGS,
     "text_score(word_ids, char_ids, weights, bias) -> bias + each block's weight sum over sqrt(its size)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_ngrams",
    .m_doc = "Compiled n-gram hashing of a prompt window.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__ngrams(void) {
    init_tables();
    return PyModule_Create(&module);
}
