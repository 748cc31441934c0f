/* A LightGBM model's trees, walked for one row of float64 features (predictor/compiled_trees.py).
 *
 * Why: the proxy predicts every request with two 100-tree heads. Through LightGBM's C API a
 * prediction is a ctypes call into a library whose trees are spread over many vectors; here the
 * nodes of both heads are small records in one block per head, and the call is a plain method.
 * The walk decides the usual node (numerical; 88% of the packaged heads' nodes) without a
 * branch, from a step record built at load time; categorical and zero-as-missing nodes take
 * LightGBM's full rule (decide()).
 * It computes what LightGBM's Tree::Predict computes (numerical splits with their missing-value
 * rules, categorical splits by bitset, leaf values summed in tree order); tests compare the two
 * on the packaged model over real and random rows, NaNs and categories included.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* decision_type bits, as LightGBM writes them */
#define CATEGORICAL 1
#define DEFAULT_LEFT 2
#define MISSING_ZERO 1
#define MISSING_NAN 2
#define ZERO_THRESHOLD 1e-35f /* LightGBM's kZeroThreshold (a float) */

typedef struct {
    double threshold; /* numerical: the split value; categorical: the global index of its bitset */
    int16_t left;     /* >= 0: a node of the same tree; < 0: ~leaf index within the tree */
    int16_t right;
    uint16_t feature;
    uint8_t decision;
    uint8_t unused;
} Node;

typedef struct {
    int32_t first_node;
    int32_t n_nodes; /* 0: a tree of one leaf */
    int32_t first_leaf;
    int32_t n_leaves;
} Tree;

/* What the walk reads of a node: laid out so that the usual node (numerical, NaN read as zero or
 * sent its default way) decides without a branch: go left iff value <= threshold, or the value is
 * NaN and NaN goes left. ``slot`` picks the value: a node whose missing values are NaN (and a slow
 * one) reads the raw value, NaN kept; the others read it with NaN as zero, as LightGBM's Decision. */
typedef struct {
    double threshold;
    int32_t child[2]; /* [0]: right, [1]: left; as Node's children */
    uint16_t slot;    /* feature, or n_features + feature for the raw value */
    uint8_t nan_left; /* NaN-missing nodes whose default is left */
    uint8_t slow;     /* categorical or zero-as-missing: decided by decide() on the Node */
} Step;

#define MAX_FEATURES 256

typedef struct {
    PyObject_HEAD Node *nodes;
    Step *steps; /* one per node, same indices */
    Tree *trees;
    double *leaves;
    int32_t *cat_bounds;
    uint32_t *cat_bits;
    Py_ssize_t n_trees, n_features, n_nodes, n_leaves, n_cats, n_bits;
} Forest;

static int copy_buffer(PyObject *source, size_t item, void **out, Py_ssize_t *count, const char *name) {
    Py_buffer view;
    if (PyObject_GetBuffer(source, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len % (Py_ssize_t)item != 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of records", name, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    *count = view.len / (Py_ssize_t)item;
    *out = PyMem_Malloc(view.len > 0 ? (size_t)view.len : 1);
    if (*out == NULL) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*out, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return 0;
}

static int child_ok(int16_t child, int32_t parent, Tree tree) {
    return child >= 0 ? child > parent && child < tree.n_nodes : ~child < tree.n_leaves;
}

/* Every index the walk follows must stay inside its arrays, and every walk must end at a leaf
 * (a child's index is above its parent's, as LightGBM numbers nodes), whatever bytes it was given. */
static int check(Forest *f) {
    if (f->n_features < 0 || f->n_features > MAX_FEATURES)
        goto bad;
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        Tree tree = f->trees[t];
        if (tree.first_leaf < 0 || tree.n_leaves < 1 || tree.first_leaf + (Py_ssize_t)tree.n_leaves > f->n_leaves ||
            tree.first_node < 0 || tree.n_nodes < 0 || tree.n_nodes > INT16_MAX ||
            tree.first_node + (Py_ssize_t)tree.n_nodes > f->n_nodes)
            goto bad;
        for (int32_t i = 0; i < tree.n_nodes; i++) {
            Node *node = &f->nodes[tree.first_node + i];
            if (!child_ok(node->left, i, tree) || !child_ok(node->right, i, tree))
                goto bad;
        }
    }
    for (Py_ssize_t i = 0; i < f->n_nodes; i++) {
        Node *node = &f->nodes[i];
        if (node->feature >= f->n_features)
            goto bad;
        if (node->decision & CATEGORICAL) {
            double k = node->threshold;
            if (!(k >= 0 && k < (double)f->n_cats))
                goto bad;
            int32_t lo = f->cat_bounds[(Py_ssize_t)k], hi = f->cat_bounds[(Py_ssize_t)k + 1];
            if (lo < 0 || hi < lo || hi > f->n_bits)
                goto bad;
        }
    }
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "inconsistent tree arrays");
    return -1;
}

static int forest_init(Forest *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"nodes", "trees", "leaves", "cat_bounds", "cat_bits", "n_features", NULL};
    PyObject *nodes, *trees, *leaves, *bounds, *bits;
    Py_ssize_t n_features;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOn", names, &nodes, &trees, &leaves, &bounds, &bits,
                                     &n_features))
        return -1;
    if (self->nodes != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Forest is initialised once");
        return -1;
    }
    Py_ssize_t n_bounds;
    if (copy_buffer(nodes, sizeof(Node), (void **)&self->nodes, &self->n_nodes, "nodes") < 0 ||
        copy_buffer(trees, sizeof(Tree), (void **)&self->trees, &self->n_trees, "trees") < 0 ||
        copy_buffer(leaves, sizeof(double), (void **)&self->leaves, &self->n_leaves, "leaves") < 0 ||
        copy_buffer(bounds, sizeof(int32_t), (void **)&self->cat_bounds, &n_bounds, "cat_bounds") < 0 ||
        copy_buffer(bits, sizeof(uint32_t), (void **)&self->cat_bits, &self->n_bits, "cat_bits") < 0)
        return -1;
    self->n_cats = n_bounds > 0 ? n_bounds - 1 : 0;
    self->n_features = n_features;
    if (check(self) < 0)
        return -1;
    self->steps = PyMem_Malloc(sizeof(Step) * (size_t)(self->n_nodes > 0 ? self->n_nodes : 1));
    if (self->steps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < self->n_nodes; i++) {
        const Node *node = &self->nodes[i];
        int missing = (node->decision >> 2) & 3;
        Step *step = &self->steps[i];
        step->threshold = node->threshold;
        step->child[0] = node->right;
        step->child[1] = node->left;
        step->slow = (node->decision & CATEGORICAL) || missing == MISSING_ZERO;
        step->slot = (uint16_t)(node->feature + (missing == MISSING_NAN || step->slow ? n_features : 0));
        step->nan_left = missing == MISSING_NAN && (node->decision & DEFAULT_LEFT);
    }
    return 0;
}

static void forest_dealloc(Forest *self) {
    PyMem_Free(self->nodes);
    PyMem_Free(self->steps);
    PyMem_Free(self->trees);
    PyMem_Free(self->leaves);
    PyMem_Free(self->cat_bounds);
    PyMem_Free(self->cat_bits);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The child LightGBM's Tree::Decision takes at this node for the value fval. */
static inline int16_t decide(const Forest *f, const Node *node, double fval) {
    uint8_t decision = node->decision;
    if (decision & CATEGORICAL) {
        /* NaN, and values past int (LightGBM's cast makes them negative on x86), go right */
        if (isnan(fval) || fval >= 2147483648.0 || fval <= -2147483649.0)
            return node->right;
        int value = (int)fval;
        if (value < 0)
            return node->right;
        int32_t k = (int32_t)node->threshold;
        int32_t lo = f->cat_bounds[k], words = f->cat_bounds[k + 1] - lo;
        int word = value / 32;
        if (word < words && (f->cat_bits[lo + word] >> (value % 32)) & 1)
            return node->left;
        return node->right;
    }
    int missing = (decision >> 2) & 3;
    if (isnan(fval) && missing != MISSING_NAN)
        fval = 0.0;
    if ((missing == MISSING_ZERO && fval >= -ZERO_THRESHOLD && fval <= ZERO_THRESHOLD) ||
        (missing == MISSING_NAN && isnan(fval)))
        return (decision & DEFAULT_LEFT) ? node->left : node->right;
    return fval <= node->threshold ? node->left : node->right;
}

/* One step of a walk from inner node ``at`` of a tree (its steps and nodes start at ``steps`` and
 * ``nodes``): the child taken, a node index or ~leaf. */
static inline int32_t step_from(const Forest *f, const Step *steps, const Node *nodes, int32_t at,
                                const double *values) {
    const Step *step = &steps[at];
    double value = values[step->slot];
    if (step->slow)
        return decide(f, &nodes[at], value);
    return step->child[(value <= step->threshold) | (isnan(value) & step->nan_left)];
}

static PyObject *forest_predict(Forest *self, PyObject *row_obj) {
    Py_buffer row;
    if (PyObject_GetBuffer(row_obj, &row, PyBUF_SIMPLE) < 0)
        return NULL;
    if (row.len < self->n_features * (Py_ssize_t)sizeof(double)) {
        PyBuffer_Release(&row);
        return PyErr_Format(PyExc_ValueError, "the row needs %zd float64 values", self->n_features);
    }
    /* LightGBM reads values within ZERO_THRESHOLD of zero as zero (its row parsing drops them).
     * values[f]: NaN read as zero (what most nodes compare); values[n + f]: NaN kept. */
    Py_ssize_t n = self->n_features;
    double values[2 * MAX_FEATURES];
    const double *raw = row.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        double x = (fabs(raw[i]) > ZERO_THRESHOLD || isnan(raw[i])) ? raw[i] : 0.0;
        values[n + i] = x;
        values[i] = isnan(x) ? 0.0 : x;
    }
    PyBuffer_Release(&row);
    /* Trees are walked four at a time, in step: each step of a walk waits on the node it loads, so
     * walks in step overlap their waits. A walk ends at a leaf (a negative index; past the last
     * tree, a slot starts at one). The leaves are still summed in tree order. */
    const Tree *trees = self->trees;
    const Step *steps = self->steps;
    const Node *nodes = self->nodes;
    double sum = 0.0;
    for (Py_ssize_t t = 0; t < self->n_trees; t += 4) {
        Py_ssize_t left_trees = self->n_trees - t;
        Py_ssize_t first[4];
        int32_t at[4];
        for (int j = 0; j < 4; j++) {
            first[j] = j < left_trees ? trees[t + j].first_node : 0;
            at[j] = j < left_trees && trees[t + j].n_nodes > 0 ? 0 : ~0; /* a one-leaf tree is at leaf 0 */
        }
        int32_t a0 = at[0], a1 = at[1], a2 = at[2], a3 = at[3];
        while ((a0 & a1 & a2 & a3) >= 0) { /* some walk is at an inner node */
            if (a0 >= 0)
                a0 = step_from(self, steps + first[0], nodes + first[0], a0, values);
            if (a1 >= 0)
                a1 = step_from(self, steps + first[1], nodes + first[1], a1, values);
            if (a2 >= 0)
                a2 = step_from(self, steps + first[2], nodes + first[2], a2, values);
            if (a3 >= 0)
                a3 = step_from(self, steps + first[3], nodes + first[3], a3, values);
        }
        at[0] = a0, at[1] = a1, at[2] = a2, at[3] = a3;
        for (int j = 0; j < 4 && j < left_trees; j++)
            sum += self->leaves[trees[t + j].first_leaf + ~at[j]];
    }
    return PyFloat_FromDouble(sum);
}

static PyMethodDef forest_methods[] = {
    {"predict", (PyCFunction)forest_predict, METH_O, "predict(row) -> the sum of the trees' leaf values for one row"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ForestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sloproxy.predictor._trees.Forest",
    .tp_basicsize = sizeof(Forest),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Forest(nodes, trees, leaves, cat_bounds, cat_bits, n_features): a model's trees, walked in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)forest_init,
    .tp_dealloc = (destructor)forest_dealloc,
    .tp_methods = forest_methods,
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_trees",
    .m_doc = "LightGBM trees walked in C for one row.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__trees(void) {
    if (PyType_Ready(&ForestType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Forest", (PyObject *)&ForestType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
