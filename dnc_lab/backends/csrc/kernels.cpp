// The native DNC kernels for the CPU: one memory step (one write head), forward and backward,
// and the link matrix alone (for recomputing it in backward).
//
// The same equations as dnc_lab/addressing.py and memory.memory_step (which stay the reference;
// tests/test_native.py checks values and gradients against them in float64), written as loops
// over one batch element at a time. Why: in PyTorch a memory step is ~500 small ATen ops whose
// fixed cost (~10 us each) dwarfs their arithmetic; here it is one call forward and one backward,
// and the B*N^2 link-matrix work is done in a single pass over the matrix each way.
//
// Built on first use by dnc_lab/backends/native.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes with raw pointers to contiguous tensors; no PyTorch headers, so it builds in seconds.
//
// Shapes, per batch element (B of them, contiguous, batch-major), symbols as in the paper:
//   xi   [S]      the raw interface vector, fields in memory.interface_sizes order:
//                 k^r [R*W], beta^r [R], k^w [W], beta^w [1], e [W], v [W], f [R], g^a [1],
//                 g^w [1], pi [R*3] (backward, forward, content per read head), then the fields of
//                 the variants switched on (below)
//   M    [N, W]   memory          L  [N, N]  link matrix      p  [N]  precedence
//   wr   [R, N]   read weights    ww [N]     write weights    u  [N]  usage
//   reads [R, W]
// The saved buffer ("aux", Dims::aux() floats per element, plus N ints for the sort order) holds
// what backward needs that is not an input or output.
//
// Csordas & Schmidhuber's variants (ICLR 2019; addressing.py has the equations), each switched on
// by a bit of `variants` (native.variant_bits; the plain DNC is 0 and computes what it always did).
// Their raw fields follow pi in this order, each only when its variant is on:
//   masked_lookup   every content lookup compares k o m with M[n] o m, m = mask_min + (1 - mask_min)
//                   sigma(raw) (addressing.masked_content_weighting): R*W + W raw fields m^r [R, W], m^w [W];
//   link_sharpness  forward/backward weightings sharpened per read head, S(d, s) = d^s / sum d^s with
//                   s = oneplus(raw) (addressing.sharpen): 2R raw fields s^f [R], s^b [R];
//   deallocation    M_{t-1} scaled row by row by the retention vector psi before erase and write
//                   (addressing.deallocate): no fields, psi is the usage's.
// The variants' helpers are functions of their own (noinline): inside forward_one/backward_one
// they made the compiler inline less of the plain step, which measurably slowed it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <numeric>
#include <vector>

namespace {

constexpr double EPSILON = 1e-6;  // addressing.EPSILON

// The bits of the `variants` argument (native.variant_bits).
constexpr int LINK_SHARPNESS = 1;
constexpr int DEALLOCATION = 2;
constexpr int MASKED_LOOKUP = 4;

struct Dims {
    int64_t N, W, R;
    int variants = 0;      // the bits above
    double mask_min = 0;  // the masks' floor (masked_lookup)
    bool sharp() const { return variants & LINK_SHARPNESS; }
    bool dealloc() const { return variants & DEALLOCATION; }
    bool masked() const { return variants & MASKED_LOOKUP; }
    int64_t plain_S() const { return R * W + R + W + 1 + W + W + R + 1 + 1 + 3 * R; }
    int64_t S() const { return plain_S() + (masked() ? R * W + W : 0) + (sharp() ? 2 * R : 0); }
    // aux layout (offsets in elements)
    int64_t cw() const { return 0; }               // [N] write content weights c^w
    int64_t cos_w() const { return N; }            // [N] cosine(k^w, M_{t-1}[n])
    int64_t norm_prev() const { return 2 * N; }    // [N] |M_{t-1}[n]| (masked_lookup: |M_{t-1}[n] o m^w|)
    int64_t alloc() const { return 3 * N; }        // [N] allocation weights a
    int64_t sorted() const { return 4 * N; }       // [N] usage in ascending order
    int64_t before() const { return 5 * N; }       // [N] exclusive cumulative product of sorted usage
    int64_t norm_new() const { return 6 * N; }     // [N] |M_t[n]| (masked_lookup: 0, see masked_norms)
    int64_t fwd() const { return 7 * N; }          // [R, N] forward weightings f = L w^r_{t-1}
    int64_t bwd() const { return (7 + R) * N; }    // [R, N] backward weightings b = L^T w^r_{t-1}
    int64_t cr() const { return (7 + 2 * R) * N; } // [R, N] read content weights c^r
    int64_t cos_r() const { return (7 + 3 * R) * N; }  // [R, N]
    int64_t key_norms() const { return (7 + 4 * R) * N; }  // [R + 1] |k^r_i|, then |k^w|
    int64_t plain_aux() const { return (7 + 4 * R) * N + R + 1; }
    // The variants' part, after the plain DNC's (fwd() and bwd() then hold the sharpened weightings).
    int64_t fwd_raw() const { return plain_aux(); }         // [R, N] f before sharpening (link_sharpness)
    int64_t bwd_raw() const { return plain_aux() + R * N; } // [R, N] b before sharpening
    int64_t masked_norms() const { return plain_aux() + (sharp() ? 2 * R * N : 0); }  // [R, N] |M_t[n] o m^r_i|
    int64_t aux() const { return masked_norms() + (masked() ? R * N : 0); }
};

// Per-thread working memory, reused for every batch element: no allocation inside the loop.
template <typename T>
struct Scratch {
    std::vector<T> buffer;
    size_t used = 0;
    explicit Scratch(const Dims& d)
        : buffer(static_cast<size_t>(2 * d.N * d.W + 8 * d.R * d.N + 16 * d.N + 8 * d.W + d.R * d.W + 16 * d.R + 64 +
                                     (d.sharp() ? 4 * d.R : 0) + (d.dealloc() ? 2 * d.N : 0) +
                                     (d.masked() ? 6 * (d.R + 1) * d.W : 0))) {}
    void reset() { used = 0; }
    T* take(int64_t n) {
        T* out = buffer.data() + used;
        used += static_cast<size_t>(n);
        return out;
    }
    T* zeros(int64_t n) {
        T* out = take(n);
        std::fill(out, out + n, T(0));
        return out;
    }
    T* copy(const T* from, int64_t n) {
        T* out = take(n);
        std::copy(from, from + n, out);
        return out;
    }
};

template <typename T>
struct Gates {
    // The interface after the paper's nonlinearities; the keys and the write vector, which have
    // none, point into the raw vector.
    T *beta_r, *e, *f, *pi;  // [R], [W], [R], [3R]
    T beta_w, ga, gw;
    const T *read_keys, *write_key, *write_vector;  // [R, W], [W], [W]
    // The variants' fields (null when off).
    const T* variant_raw = nullptr;  // where they start in xi
    T *s_f = nullptr, *s_b = nullptr;  // [R], [R] sharpness exponents oneplus(.) (link_sharpness)
    T *mask_r = nullptr, *mask_w = nullptr;  // [R, W], [W] lookup masks (masked_lookup)
};

// ---- Vectors ------------------------------------------------------------------------------------
// Explicit 32-byte vectors (GCC/Clang vector extensions: AVX2 on x86-64). Loops over a row load
// and store through `load`/`store`, which zero-pad the last, partial vector: padding adds nothing
// to any sum.

template <typename T>
struct Vec {
    static constexpr int lanes = 32 / sizeof(T);
    typedef T type __attribute__((vector_size(32)));
    typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type index_type;
    typedef index_type index __attribute__((vector_size(32)));
};

// n <= lanes elements from p; the other lanes are zero.
template <typename V, typename T>
inline V load(const T* p, int64_t n) {
    V v = {};
    if (n == static_cast<int64_t>(sizeof(V) / sizeof(T)))
        std::memcpy(&v, p, sizeof(V));
    else
        std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(T));
    return v;
}

template <typename V, typename T>
inline void store(T* p, V v, int64_t n) {
    if (n == static_cast<int64_t>(sizeof(V) / sizeof(T)))
        std::memcpy(p, &v, sizeof(V));
    else
        std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(T));
}

template <typename T, typename V>
inline T sum_lanes(V v) {
    T s = 0;
    for (int k = 0; k < Vec<T>::lanes; ++k) s += v[k];
    return s;
}


// exp(x) for every lane: x = n ln2 + r with |r| <= ln2/2, e^r from its Taylor polynomial (degree 7
// for float, 13 for double: well under one ulp), times 2^n built in the exponent bits. Within an
// ulp or two of std::exp, whose scalar calls would otherwise dominate the softmaxes and the LSTM.
// Below the smallest normal result it returns 0; above the largest finite, +inf; NaN stays NaN.
template <typename T, typename V>
inline V vexp(V x) {
    using I = typename Vec<T>::index;
    using index_type = typename Vec<T>::index_type;
    constexpr bool single = sizeof(T) == 4;
    constexpr int degree = single ? 7 : 13;
    constexpr int mantissa_bits = single ? 23 : 52;
    constexpr index_type exponent_bias = single ? 127 : 1023;
    // Beyond these, e^x is not a normal number (the last ~1.5 below `lowest` are flushed to 0).
    const T lowest = single ? T(-86.5) : T(-707.0), highest = single ? T(88.7228) : T(709.7827);
    const T ln2_hi = single ? T(0.693359375) : T(6.93147180369123816490e-01);
    const T ln2_lo = single ? T(-2.12194440e-4) : T(1.90821492927058770002e-10);
    const T log2e = T(1.44269504088896340736);
    V clamped = x < lowest ? V{} + lowest : x;
    clamped = clamped > highest ? V{} + highest : clamped;
    const V scaled = clamped * log2e;
    const I n = __builtin_convertvector(scaled + (scaled < T(0) ? V{} - T(0.5) : V{} + T(0.5)), I);  // round
    const V nf = __builtin_convertvector(n, V);
    const V r = (clamped - nf * ln2_hi) - nf * ln2_lo;
    T inverse_factorials[degree + 1];
    inverse_factorials[0] = 1;
    for (int k = 1; k <= degree; ++k) inverse_factorials[k] = inverse_factorials[k - 1] / T(k);
    V p = V{} + inverse_factorials[degree];
    for (int k = degree - 1; k >= 0; --k) p = p * r + inverse_factorials[k];
    // 2^n as 2^(n-1) * 2, so that n = 128 (float) or 1024 (double) still has an exponent field.
    const V two_to_n_minus_1 = (V)((n + (exponent_bias - 1)) << mantissa_bits);
    V result = p * two_to_n_minus_1 * T(2);
    const auto is_number = x == x;
    result = x < lowest ? V{} : result;
    result = x > highest ? V{} + std::numeric_limits<T>::infinity() : result;
    return is_number ? result : x;
}

// exp over an array, in place.
template <typename T>
inline void exp_in_place(T* values, int64_t n) {
    using V = typename Vec<T>::type;
    constexpr int K = Vec<T>::lanes;
    for (int64_t j = 0; j < n; j += K) {
        const int64_t m = std::min<int64_t>(K, n - j);
        store(values + j, vexp<T>(load<V>(values + j, m)), m);
    }
}

// weights = softmax(beta * cos) over N cells, given top = max_n beta * cos[n] (subtracted for stability).
template <typename T>
inline void softmax_of_scaled(const T* cos, T beta, T top, T* weights, int64_t N) {
    for (int64_t n = 0; n < N; ++n) weights[n] = beta * cos[n] - top;
    exp_in_place(weights, N);
    T sum = 0;
    for (int64_t n = 0; n < N; ++n) sum += weights[n];
    for (int64_t n = 0; n < N; ++n) weights[n] /= sum;
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

// torch.nn.functional.softplus with its default threshold 20 (identity above it), and its slope.
template <typename T>
inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <typename T>
inline T softplus_slope(T x) { return x > T(20) ? T(1) : sigmoid(x); }

template <typename T>
Gates<T> parse(const Dims& d, const T* xi, Scratch<T>& scratch) {
    const int64_t W = d.W, R = d.R;
    Gates<T> g;
    const T* beta_r = xi + R * W;
    const T* beta_w = beta_r + R + W;
    const T* erase = beta_w + 1;
    const T* free = erase + 2 * W;
    const T* modes = free + R + 2;
    g.beta_r = scratch.take(R);
    g.f = scratch.take(R);
    g.e = scratch.take(W);
    g.pi = scratch.take(3 * R);
    for (int64_t r = 0; r < R; ++r) {
        g.beta_r[r] = T(1) + softplus(beta_r[r]);
        g.f[r] = sigmoid(free[r]);
        const T* m = modes + 3 * r;
        T top = std::max(m[0], std::max(m[1], m[2]));
        T z0 = std::exp(m[0] - top), z1 = std::exp(m[1] - top), z2 = std::exp(m[2] - top);
        T sum = z0 + z1 + z2;
        g.pi[3 * r] = z0 / sum;
        g.pi[3 * r + 1] = z1 / sum;
        g.pi[3 * r + 2] = z2 / sum;
    }
    for (int64_t w = 0; w < W; ++w) g.e[w] = sigmoid(erase[w]);
    g.read_keys = xi;
    g.write_key = beta_r + R;
    g.write_vector = erase + W;
    g.beta_w = T(1) + softplus(beta_w[0]);
    g.ga = sigmoid(free[R]);
    g.gw = sigmoid(free[R + 1]);
    g.variant_raw = modes + 3 * R;  // their order: memory.interface_sizes
    const T* raw = g.variant_raw;
    if (d.masked()) {
        const T floor = T(d.mask_min), span = T(1) - T(d.mask_min);
        g.mask_r = scratch.take(R * W);
        g.mask_w = scratch.take(W);
        for (int64_t k = 0; k < R * W; ++k) g.mask_r[k] = floor + span * sigmoid(raw[k]);
        for (int64_t w = 0; w < W; ++w) g.mask_w[w] = floor + span * sigmoid(raw[R * W + w]);
        raw += R * W + W;
    }
    if (d.sharp()) {
        g.s_f = scratch.take(R);
        g.s_b = scratch.take(R);
        for (int64_t r = 0; r < R; ++r) {
            g.s_f[r] = T(1) + softplus(raw[r]);
            g.s_b[r] = T(1) + softplus(raw[R + r]);
        }
    }
    return g;
}

// Link-distribution sharpening (addressing.sharpen) of one weighting d [N] with exponent s:
// out = x^s / sum x^s with x = (d + eps) / max(d + eps). A weighting of zeros becomes uniform.
template <typename T>
__attribute__((noinline)) void sharpen(int64_t N, const T* d, T s, T* out) {
    T top = -INFINITY;
    for (int64_t n = 0; n < N; ++n) top = std::max(top, d[n] + T(EPSILON));
    T sum = 0;
    for (int64_t n = 0; n < N; ++n) {
        out[n] = std::pow((d[n] + T(EPSILON)) / top, s);
        sum += out[n];
    }
    for (int64_t n = 0; n < N; ++n) out[n] /= sum;
}

// Backward of `sharpen`: S = softmax(s log x), so with z = s log x, dz = S (grad - sum grad S),
// d/ds = sum dz log x and d/dd = s dz / x (the max is detached and cancels). grad [N] holds
// dLoss/dS and is overwritten with dLoss/dd; returns dLoss/ds.
template <typename T>
__attribute__((noinline)) T sharpen_backward(int64_t N, const T* d, T s, const T* sharpened, T* grad) {
    T top = -INFINITY, dot = 0;
    for (int64_t n = 0; n < N; ++n) {
        top = std::max(top, d[n] + T(EPSILON));
        dot += grad[n] * sharpened[n];
    }
    T grad_s = 0;
    for (int64_t n = 0; n < N; ++n) {
        const T x = d[n] + T(EPSILON);
        const T grad_z = sharpened[n] * (grad[n] - dot);
        grad_s += grad_z * std::log(x / top);
        grad[n] = s * grad_z / x;
    }
    return grad_s;
}

// Content weighting c = softmax(beta * cos(k, M[n])) over cells; also keeps the cosines and the
// key norm. row_norms [N] are |M[n]| = sqrt(sum M[n]^2 + eps), computed by the caller.
template <typename T>
void content(const Dims& d, const T* M, const T* row_norms, const T* key, T beta, T* cos, T* weights,
             T* key_norm) {
    const int64_t N = d.N, W = d.W;
    T kk = 0;
    for (int64_t w = 0; w < W; ++w) kk += key[w] * key[w];
    const T nk = std::sqrt(kk + T(EPSILON));
    *key_norm = nk;
    T top = -INFINITY;
    for (int64_t n = 0; n < N; ++n) {
        const T* row = M + n * W;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t w = 0; w < W; ++w) dot += row[w] * key[w];
        cos[n] = dot / (nk * row_norms[n]);
        top = std::max(top, beta * cos[n]);
    }
    softmax_of_scaled(cos, beta, top, weights, N);
}

// Backward of `content`: adds to grad_M [N, W] and grad_key [W], returns d/d beta.
template <typename T>
T content_backward(const Dims& d, const T* M, const T* row_norms, const T* key, T beta, const T* cos,
                   const T* weights, T key_norm, const T* grad_weights, T* grad_M, T* grad_key) {
    const int64_t N = d.N, W = d.W;
    T dot = 0;
    for (int64_t n = 0; n < N; ++n) dot += grad_weights[n] * weights[n];
    T grad_beta = 0, grad_cos_dot_cos = 0;
    for (int64_t n = 0; n < N; ++n) {
        const T grad_z = weights[n] * (grad_weights[n] - dot);  // softmax backward
        grad_beta += grad_z * cos[n];
        const T grad_cos = beta * grad_z;
        grad_cos_dot_cos += grad_cos * cos[n];
        // cos = M[n].k / (|k| |M[n]|):  d/dk = M[n]/(|k||M[n]|) - cos k/|k|^2,
        //                               d/dM[n] = k/(|k||M[n]|) - cos M[n]/|M[n]|^2
        const T* row = M + n * W;
        T* grad_row = grad_M + n * W;
        const T a = grad_cos / (key_norm * row_norms[n]);
        const T b = grad_cos * cos[n] / (row_norms[n] * row_norms[n]);
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
            grad_key[w] += a * row[w];
            grad_row[w] += a * key[w] - b * row[w];
        }
    }
    const T c = grad_cos_dot_cos / (key_norm * key_norm);
    for (int64_t w = 0; w < W; ++w) grad_key[w] -= c * key[w];
    return grad_beta;
}

// Masked content weighting (addressing.masked_content_weighting): c = softmax(beta * cos(k o m, M[n] o m)),
// with (k o m).(M[n] o m) = sum_w k_w m_w^2 M[n,w]. Keeps the cosines, the key norm |k o m| and the
// row norms |M[n] o m| [N] (one per head: they depend on its mask).
template <typename T>
__attribute__((noinline)) void masked_content(const Dims& d, const T* M, const T* key, const T* mask, T beta, T* cos, T* weights,
                    T* key_norm, T* row_norms, Scratch<T>& scratch) {
    const int64_t N = d.N, W = d.W;
    T *mask_sq = scratch.take(W), *masked_key = scratch.take(W);  // m^2, k m^2
    T kk = 0;
    for (int64_t w = 0; w < W; ++w) {
        mask_sq[w] = mask[w] * mask[w];
        masked_key[w] = key[w] * mask_sq[w];
        const T km = key[w] * mask[w];
        kk += km * km;
    }
    const T nk = std::sqrt(kk + T(EPSILON));
    *key_norm = nk;
    T top = -INFINITY;
    for (int64_t n = 0; n < N; ++n) {
        const T* row = M + n * W;
        T dot = 0, sq = 0;
#pragma omp simd reduction(+ : dot, sq)
        for (int64_t w = 0; w < W; ++w) {
            dot += row[w] * masked_key[w];
            sq += row[w] * row[w] * mask_sq[w];
        }
        row_norms[n] = std::sqrt(sq + T(EPSILON));
        cos[n] = dot / (nk * row_norms[n]);
        top = std::max(top, beta * cos[n]);
    }
    softmax_of_scaled(cos, beta, top, weights, N);
}

// Backward of `masked_content`: adds to grad_M [N, W], grad_key [W] and grad_mask [W], returns d/d beta.
// With g_n = dLoss/dcos_n, a_n = g_n / (|k o m| |M[n] o m|), b_n = g_n cos_n / |M[n] o m|^2 and
// c = sum_n g_n cos_n / |k o m|^2:  dM[n,w] = m_w^2 (a_n k_w - b_n M[n,w]),  dk_w = m_w^2 (A_w - c k_w),
// dm_w = m_w (2 k_w A_w - c k_w^2 - B_w), where A_w = sum_n a_n M[n,w] and B_w = sum_n b_n M[n,w]^2.
template <typename T>
__attribute__((noinline)) T masked_content_backward(const Dims& d, const T* M, const T* row_norms, const T* key, const T* mask, T beta,
                          const T* cos, const T* weights, T key_norm, const T* grad_weights, T* grad_M,
                          T* grad_key, T* grad_mask, Scratch<T>& scratch) {
    const int64_t N = d.N, W = d.W;
    T *mask_sq = scratch.take(W), *A = scratch.zeros(W), *B = scratch.zeros(W);
    for (int64_t w = 0; w < W; ++w) mask_sq[w] = mask[w] * mask[w];
    T dot = 0;
    for (int64_t n = 0; n < N; ++n) dot += grad_weights[n] * weights[n];
    T grad_beta = 0, grad_cos_dot_cos = 0;
    for (int64_t n = 0; n < N; ++n) {
        const T grad_z = weights[n] * (grad_weights[n] - dot);  // softmax backward
        grad_beta += grad_z * cos[n];
        const T grad_cos = beta * grad_z;
        grad_cos_dot_cos += grad_cos * cos[n];
        const T* row = M + n * W;
        T* grad_row = grad_M + n * W;
        const T a = grad_cos / (key_norm * row_norms[n]);
        const T b = grad_cos * cos[n] / (row_norms[n] * row_norms[n]);
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
            A[w] += a * row[w];
            B[w] += b * row[w] * row[w];
            grad_row[w] += mask_sq[w] * (a * key[w] - b * row[w]);
        }
    }
    const T c = grad_cos_dot_cos / (key_norm * key_norm);
    for (int64_t w = 0; w < W; ++w) {
        grad_key[w] += mask_sq[w] * (A[w] - c * key[w]);
        grad_mask[w] += mask[w] * (T(2) * key[w] * A[w] - c * key[w] * key[w] - B[w]);
    }
    return grad_beta;
}

template <typename T>
void row_norms(const Dims& d, const T* M, T* norms) {
    for (int64_t n = 0; n < d.N; ++n) {
        const T* row = M + n * d.W;
        T sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t w = 0; w < d.W; ++w) sq += row[w] * row[w];
        norms[n] = std::sqrt(sq + T(EPSILON));
    }
}

// ---- The link matrix: the B*N^2 part --------------------------------------------------------
// Each row of L is visited once forward and once backward, and everything that involves the row
// (the row itself, the forward and backward weightings of all R read heads, and in backward every
// gradient) is computed in that one pass, in vectors. The number of read heads is a template argument from 1 to 8 (a run-time
// loop above that) so that their accumulators stay in registers.

// Which lanes of the vector that starts at column j hold column i (the diagonal of row i): a mask.
template <typename T>
inline typename Vec<T>::index on_diagonal(int64_t j, int64_t i) {
    using index_type = typename Vec<T>::index_type;
    typename Vec<T>::index column;
    for (int k = 0; k < Vec<T>::lanes; ++k) column[k] = static_cast<index_type>(j + k);
    return column == static_cast<index_type>(i);
}

// Per-head values held for one row: registers when RC (the number of heads) is known.
template <typename X, int RC>
struct PerHead {
    X fixed[RC > 0 ? RC : 1];
    std::vector<X> dynamic;
    X* data;
    explicit PerHead(int64_t R) : dynamic(RC > 0 ? 0 : R) { data = RC > 0 ? fixed : dynamic.data(); }
    X& operator[](int64_t r) { return data[r]; }
};

// One element-vector of L_t: the same expression wherever a link is computed (forward, recomputed
// in backward), so that the compiler contracts it the same way and recomputed links are bit-equal.
template <typename V, typename T>
inline V link_value(T keep, V ww_j, V prev, T wi, V p_j) {
    return (keep - ww_j) * prev + wi * p_j;
}

// Row i of L_t (zero diagonal), without the directional weightings.
template <typename T>
inline void link_row(int64_t N, int64_t i, const T* L_prev, const T* p_prev, const T* ww, T* row) {
    using V = typename Vec<T>::type;
    constexpr int K = Vec<T>::lanes;
    const T* prev_row = L_prev + i * N;
    const T wi = ww[i], keep = T(1) - wi;
    for (int64_t j = 0; j < N; j += K) {
        const int64_t n = std::min<int64_t>(K, N - j);
        store(row + j, link_value(keep, load<V>(ww + j, n), load<V>(prev_row + j, n), wi, load<V>(p_prev + j, n)), n);
    }
    row[i] = 0;
}

// L_t[i,j] = (1 - ww_i - ww_j) L_{t-1}[i,j] + ww_i p_{t-1}[j] with L_t[i,i] = 0, and from it
// f_r[i] = sum_j L[i,j] wr_{t-1}[r,j] and b_r[j] = sum_i L[i,j] wr_{t-1}[r,i].
template <typename T, int RC>
void link_forward_heads(const Dims& d, const T* L_prev, const T* p_prev, const T* ww, const T* wr_prev, T* L,
                        T* fwd, T* bwd) {
    using V = typename Vec<T>::type;
    constexpr int K = Vec<T>::lanes;
    const int64_t N = d.N, R = RC > 0 ? RC : d.R;
    std::fill(bwd, bwd + R * N, T(0));
    PerHead<V, RC> acc(R);
    PerHead<T, RC> w_ri(R);
    for (int64_t i = 0; i < N; ++i) {
        const T* prev_row = L_prev + i * N;
        T* row = L + i * N;
        const T wi = ww[i], keep = T(1) - wi;
        for (int64_t r = 0; r < R; ++r) {
            acc[r] = V{};
            w_ri[r] = wr_prev[r * N + i];
        }
        for (int64_t j = 0; j < N; j += K) {
            const int64_t n = std::min<int64_t>(K, N - j);
            V l = link_value(keep, load<V>(ww + j, n), load<V>(prev_row + j, n), wi, load<V>(p_prev + j, n));
            l = on_diagonal<T>(j, i) ? V{} : l;
            store(row + j, l, n);
            for (int64_t r = 0; r < R; ++r) {
                T* b_r = bwd + r * N + j;
                acc[r] += l * load<V>(wr_prev + r * N + j, n);
                store(b_r, load<V>(b_r, n) + l * w_ri[r], n);
            }
        }
        for (int64_t r = 0; r < R; ++r) fwd[r * N + i] = sum_lanes<T>(acc[r]);
    }
}

template <typename T>
struct LinkGrads {
    const T* grad_L;    // [N, N] dLoss/dL_t from later steps
    const T* grad_fwd;  // [R, N]
    const T* grad_bwd;  // [R, N]
    T* g_L_prev;        // [N, N] written
    T* g_p_prev;        // [N] added to
    T* g_wr_prev;       // [R, N] added to
    T* grad_ww;         // [N] added to
};

// Backward of link_forward_heads (the equations are in backward_one). L_t is recomputed from
// L_{t-1} rather than saved. col_LG [N] is scratch.
template <typename T, int RC>
void link_backward_heads(const Dims& d, const T* L_prev, const T* p_prev, const T* ww, const T* wr_prev,
                         const LinkGrads<T>& a, T* col_LG) {
    using V = typename Vec<T>::type;
    constexpr int K = Vec<T>::lanes;
    const int64_t N = d.N, R = RC > 0 ? RC : d.R;
    std::fill(col_LG, col_LG + N, T(0));
    PerHead<V, RC> acc(R), gb(R);
    PerHead<T, RC> gf_i(R), w_ri(R);
    for (int64_t i = 0; i < N; ++i) {
        const T* prev_row = L_prev + i * N;
        const T* grad_row = a.grad_L + i * N;
        T* g_prev_row = a.g_L_prev + i * N;
        const T wi = ww[i], keep = T(1) - wi;
        for (int64_t r = 0; r < R; ++r) {
            acc[r] = V{};
            gf_i[r] = a.grad_fwd[r * N + i];
            w_ri[r] = wr_prev[r * N + i];
        }
        V acc_w = {};
        for (int64_t j = 0; j < N; j += K) {
            const int64_t n = std::min<int64_t>(K, N - j);
            const V wwj = load<V>(ww + j, n), lp = load<V>(prev_row + j, n), pj = load<V>(p_prev + j, n);
            // G = dLoss/dL_t[i, j] from every use of L_t: the next step, f_r[i] and b_r[j].
            V G = load<V>(grad_row + j, n);
            for (int64_t r = 0; r < R; ++r) {
                gb[r] = load<V>(a.grad_bwd + r * N + j, n);
                G += gf_i[r] * load<V>(wr_prev + r * N + j, n) + w_ri[r] * gb[r];
            }
            V l = link_value(keep, wwj, lp, wi, pj);
            const auto diagonal = on_diagonal<T>(j, i);
            G = diagonal ? V{} : G;
            l = diagonal ? V{} : l;
            store(g_prev_row + j, (keep - wwj) * G, n);
            acc_w += G * (pj - lp);
            store(col_LG + j, load<V>(col_LG + j, n) + G * lp, n);
            store(a.g_p_prev + j, load<V>(a.g_p_prev + j, n) + G * wi, n);
            for (int64_t r = 0; r < R; ++r) {
                T* gw_r = a.g_wr_prev + r * N + j;
                store(gw_r, load<V>(gw_r, n) + l * gf_i[r], n);
                acc[r] += l * gb[r];
            }
        }
        a.grad_ww[i] += sum_lanes<T>(acc_w);
        for (int64_t r = 0; r < R; ++r) a.g_wr_prev[r * N + i] += sum_lanes<T>(acc[r]);
    }
    for (int64_t j = 0; j < N; ++j) a.grad_ww[j] -= col_LG[j];
}

// Dispatch on the number of read heads.
#define DNC_HEADS_SWITCH(R, CALL) \
    switch (R) {                  \
        case 1: CALL(1); break;   \
        case 2: CALL(2); break;   \
        case 3: CALL(3); break;   \
        case 4: CALL(4); break;   \
        case 5: CALL(5); break;   \
        case 6: CALL(6); break;   \
        case 7: CALL(7); break;   \
        case 8: CALL(8); break;   \
        default: CALL(0); break;  \
    }

template <typename T>
void link_forward(const Dims& d, const T* L_prev, const T* p_prev, const T* ww, const T* wr_prev, T* L, T* fwd,
                  T* bwd) {
#define DNC_LINK_FORWARD(RC) link_forward_heads<T, RC>(d, L_prev, p_prev, ww, wr_prev, L, fwd, bwd)
    DNC_HEADS_SWITCH(d.R, DNC_LINK_FORWARD)
#undef DNC_LINK_FORWARD
}

template <typename T>
void link_backward(const Dims& d, const T* L_prev, const T* p_prev, const T* ww, const T* wr_prev,
                   const LinkGrads<T>& a, Scratch<T>& arena) {
    T* col_LG = arena.take(d.N);
#define DNC_LINK_BACKWARD(RC) link_backward_heads<T, RC>(d, L_prev, p_prev, ww, wr_prev, a, col_LG)
    DNC_HEADS_SWITCH(d.R, DNC_LINK_BACKWARD)
#undef DNC_LINK_BACKWARD
}

// Backward of erase and write with deallocation, M = (M_{t-1} psi) (1 - ww e^T) + ww v^T: as the
// plain DNC's (in backward_one) with M_{t-1} psi for M_{t-1}, plus dpsi[n] = sum_w dM'[n,w] M_{t-1}[n,w]
// with dM' = dM (1 - ww e^T). psi = prod_r (1 - f_r wr_{t-1}[r]) is recomputed (R N products).
// A function of its own: in backward_one it made the plain step slower (the compiler inlined less).
template <typename T>
__attribute__((noinline)) void deallocated_write_backward(const Dims& d, const Gates<T>& g, const T* M_prev,
                                                          const T* wr_prev, const T* ww, const T* grad_M,
                                                          T* g_M_prev, T* grad_ww, T* grad_e, T* grad_v,
                                                          T* grad_psi) {
    const int64_t N = d.N, W = d.W, R = d.R;
    for (int64_t n = 0; n < N; ++n) {
        T keep = 1;
        for (int64_t r = 0; r < R; ++r) keep *= T(1) - g.f[r] * wr_prev[r * N + n];
        const T* row_prev = M_prev + n * W;
        const T* grad_row = grad_M + n * W;
        T* g_row_prev = g_M_prev + n * W;
        const T wn = ww[n];
        T acc = 0, acc_psi = 0;
#pragma omp simd reduction(+ : acc, acc_psi)
        for (int64_t w = 0; w < W; ++w) {
            const T kept = row_prev[w] * keep;
            const T grad_kept = grad_row[w] * (T(1) - wn * g.e[w]);
            g_row_prev[w] = grad_kept * keep;
            acc_psi += grad_kept * row_prev[w];
            acc += grad_row[w] * (g.write_vector[w] - kept * g.e[w]);
            grad_e[w] -= grad_row[w] * kept * wn;
            grad_v[w] += grad_row[w] * wn;
        }
        grad_ww[n] += acc;
        grad_psi[n] = acc_psi;
    }
}

template <typename T>
void forward_one(const Dims& d, const T* xi, const T* M_prev, const T* L_prev, const T* p_prev,
                 const T* wr_prev, const T* ww_prev, const T* u_prev, T* reads, T* M, T* L, T* p, T* wr,
                 T* ww, T* u, T* aux, int32_t* order, Scratch<T>& scratch) {
    const int64_t N = d.N, W = d.W, R = d.R;
    const bool masked = d.masked(), sharp = d.sharp(), dealloc = d.dealloc();
    scratch.reset();
    const Gates<T> g = parse(d, xi, scratch);
    const T *read_keys = g.read_keys, *write_key = g.write_key, *write_vector = g.write_vector;

    // Usage: u = (u_{t-1} + ww_{t-1} - u_{t-1} ww_{t-1}) * psi, psi = prod_r (1 - f_r wr_{t-1}[r]).
    T* psi = dealloc ? scratch.take(N) : nullptr;  // kept for deallocation
    for (int64_t n = 0; n < N; ++n) {
        T retention = 1;
        for (int64_t r = 0; r < R; ++r) retention *= T(1) - g.f[r] * wr_prev[r * N + n];
        u[n] = (u_prev[n] + ww_prev[n] - u_prev[n] * ww_prev[n]) * retention;
        if (dealloc) psi[n] = retention;
    }

    // Write content lookup on the previous memory.
    T* norm_prev = aux + d.norm_prev();
    T* cw = aux + d.cw();
    if (masked) {
        masked_content(d, M_prev, write_key, g.mask_w, g.beta_w, aux + d.cos_w(), cw, aux + d.key_norms() + R,
                       norm_prev, scratch);
    } else {
        row_norms(d, M_prev, norm_prev);
        content(d, M_prev, norm_prev, write_key, g.beta_w, aux + d.cos_w(), cw, aux + d.key_norms() + R);
    }

    // Allocation: cells by ascending usage, ties by index (addressing uses a stable sort).
    std::iota(order, order + N, 0);
    if (N <= 64) {  // insertion sort: stable, and faster than std::stable_sort's buffer for small N
        for (int64_t j = 1; j < N; ++j) {
            const int32_t cell = order[j];
            int64_t k = j;
            for (; k > 0 && u[order[k - 1]] > u[cell]; --k) order[k] = order[k - 1];
            order[k] = cell;
        }
    } else {
        std::stable_sort(order, order + N, [u](int32_t a, int32_t b) { return u[a] < u[b]; });
    }
    T* sorted = aux + d.sorted();
    T* before = aux + d.before();
    T* alloc = aux + d.alloc();
    T running = 1;
    for (int64_t j = 0; j < N; ++j) {
        sorted[j] = u[order[j]];
        before[j] = running;
        alloc[order[j]] = (T(1) - sorted[j]) * running;
        running *= sorted[j];
    }

    // Write weights, then erase and write.
    T total_write = 0;
    for (int64_t n = 0; n < N; ++n) {
        ww[n] = g.gw * (g.ga * alloc[n] + (T(1) - g.ga) * cw[n]);
        total_write += ww[n];
    }
    for (int64_t n = 0; n < N; ++n) {
        const T* row_prev = M_prev + n * W;
        T* row = M + n * W;
        const T wn = ww[n];
        if (dealloc) {  // M_{t-1} psi erased and written
            const T keep = psi[n];
#pragma omp simd
            for (int64_t w = 0; w < W; ++w)
                row[w] = (row_prev[w] * keep) * (T(1) - wn * g.e[w]) + wn * write_vector[w];
        } else {
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) row[w] = row_prev[w] * (T(1) - wn * g.e[w]) + wn * write_vector[w];
        }
    }

    // Link matrix, and the directional weightings from it, one row of L at a time:
    // L[i,j] = (1 - ww_i - ww_j) L_{t-1}[i,j] + ww_i p_{t-1}[j], L[i,i] = 0;
    // f_r[i] = sum_j L[i,j] wr_{t-1}[r,j];  b_r[j] = sum_i L[i,j] wr_{t-1}[r,i].
    T* fwd = aux + d.fwd();
    T* bwd = aux + d.bwd();
    if (sharp) {  // the weightings go to fwd_raw/bwd_raw, their sharpened versions to fwd/bwd
        T *fwd_raw = aux + d.fwd_raw(), *bwd_raw = aux + d.bwd_raw();
        link_forward(d, L_prev, p_prev, ww, wr_prev, L, fwd_raw, bwd_raw);
        for (int64_t r = 0; r < R; ++r) {
            sharpen(N, fwd_raw + r * N, g.s_f[r], fwd + r * N);
            sharpen(N, bwd_raw + r * N, g.s_b[r], bwd + r * N);
        }
    } else {
        link_forward(d, L_prev, p_prev, ww, wr_prev, L, fwd, bwd);
    }

    for (int64_t n = 0; n < N; ++n) p[n] = (T(1) - total_write) * p_prev[n] + ww[n];

    // Read heads: content lookups on the new memory, mixed with the directional weightings.
    T* norm_new = aux + d.norm_new();
    if (masked)
        std::fill(norm_new, norm_new + N, T(0));  // unused: each head has its own norms
    else
        row_norms(d, M, norm_new);
    T* cr = aux + d.cr();
    T* cos_r = aux + d.cos_r();
    for (int64_t r = 0; r < R; ++r) {
        if (masked)
            masked_content(d, M, read_keys + r * W, g.mask_r + r * W, g.beta_r[r], cos_r + r * N, cr + r * N,
                           aux + d.key_norms() + r, aux + d.masked_norms() + r * N, scratch);
        else
            content(d, M, norm_new, read_keys + r * W, g.beta_r[r], cos_r + r * N, cr + r * N,
                    aux + d.key_norms() + r);
        const T pb = g.pi[3 * r], pf = g.pi[3 * r + 1], pc = g.pi[3 * r + 2];
        T* w_r = wr + r * N;
        for (int64_t n = 0; n < N; ++n) w_r[n] = pb * bwd[r * N + n] + pf * fwd[r * N + n] + pc * cr[r * N + n];
        T* read = reads + r * W;
        std::fill(read, read + W, T(0));
        for (int64_t n = 0; n < N; ++n) {
            const T* row = M + n * W;
            const T wn = w_r[n];
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) read[w] += wn * row[w];
        }
    }
}

// Backward of forward_one. grad_* inputs are dLoss/d(outputs); writes dLoss/d(inputs) to the
// g_* outputs (overwriting them). The state gradients may alias the grad_* inputs of the same
// state tensor (native.memory_backward relies on it): grad_M, grad_wr, grad_ww and grad_u are
// copied before any result is written, grad_p and grad_L are read element by element just before
// the same element of g_p_prev / g_L_prev is written. The step runs in reverse: reads, read weights, read content,
// memory write, precedence, link + directional weightings, write weights, write content,
// allocation, usage, and last the interface nonlinearities.
template <typename T>
void backward_one(const Dims& d, const T* xi, const T* M_prev, const T* L_prev, const T* p_prev,
                  const T* wr_prev, const T* ww_prev, const T* u_prev, const T* M, const T* wr, const T* ww,
                  const T* aux, const int32_t* order, const T* grad_reads, const T* grad_M_out,
                  const T* grad_L, const T* grad_p, const T* grad_wr_out, const T* grad_ww_out,
                  const T* grad_u_out, T* g_xi, T* g_M_prev, T* g_L_prev, T* g_p_prev, T* g_wr_prev,
                  T* g_ww_prev, T* g_u_prev, Scratch<T>& scratch) {
    const int64_t N = d.N, W = d.W, R = d.R;
    const bool masked = d.masked(), sharp = d.sharp(), dealloc = d.dealloc();
    scratch.reset();
    const Gates<T> g = parse(d, xi, scratch);
    const T *read_keys = g.read_keys, *write_key = g.write_key, *write_vector = g.write_vector;
    const T* fwd = aux + d.fwd();
    const T* bwd = aux + d.bwd();
    const T* cr = aux + d.cr();
    const T* cos_r = aux + d.cos_r();
    const T* norm_new = aux + d.norm_new();
    const T* key_norms = aux + d.key_norms();

    T* grad_M = scratch.copy(grad_M_out, N * W);
    T* grad_wr = scratch.copy(grad_wr_out, R * N);
    T *grad_fwd = scratch.take(R * N), *grad_bwd = scratch.take(R * N), *grad_cr = scratch.take(R * N);
    T *grad_beta_r = scratch.take(R), *grad_pi = scratch.take(3 * R), *grad_read_keys = scratch.zeros(R * W);
    T* grad_mask_r = masked ? scratch.zeros(R * W) : nullptr;
    T* grad_mask_w = masked ? scratch.zeros(W) : nullptr;

    // reads[r] = sum_n wr[r,n] M[n]
    for (int64_t r = 0; r < R; ++r) {
        const T* gr = grad_reads + r * W;
        for (int64_t n = 0; n < N; ++n) {
            const T* row = M + n * W;
            T* grad_row = grad_M + n * W;
            const T wn = wr[r * N + n];
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t w = 0; w < W; ++w) {
                acc += gr[w] * row[w];
                grad_row[w] += wn * gr[w];
            }
            grad_wr[r * N + n] += acc;
        }
    }
    // wr = pi_b b + pi_f f + pi_c c^r, then the read content lookups on M_t.
    for (int64_t r = 0; r < R; ++r) {
        const T pb = g.pi[3 * r], pf = g.pi[3 * r + 1], pc = g.pi[3 * r + 2];
        T sb = 0, sf = 0, sc = 0;
        for (int64_t n = 0; n < N; ++n) {
            const T gw_rn = grad_wr[r * N + n];
            sb += gw_rn * bwd[r * N + n];
            sf += gw_rn * fwd[r * N + n];
            sc += gw_rn * cr[r * N + n];
            grad_bwd[r * N + n] = pb * gw_rn;
            grad_fwd[r * N + n] = pf * gw_rn;
            grad_cr[r * N + n] = pc * gw_rn;
        }
        grad_pi[3 * r] = sb;
        grad_pi[3 * r + 1] = sf;
        grad_pi[3 * r + 2] = sc;
        if (masked)
            grad_beta_r[r] = masked_content_backward(d, M, aux + d.masked_norms() + r * N, read_keys + r * W,
                                                     g.mask_r + r * W, g.beta_r[r], cos_r + r * N, cr + r * N,
                                                     key_norms[r], grad_cr + r * N, grad_M, grad_read_keys + r * W,
                                                     grad_mask_r + r * W, scratch);
        else
            grad_beta_r[r] = content_backward(d, M, norm_new, read_keys + r * W, g.beta_r[r], cos_r + r * N,
                                              cr + r * N, key_norms[r], grad_cr + r * N, grad_M,
                                              grad_read_keys + r * W);
    }

    // Sharpening: grad_fwd and grad_bwd become the gradients of the weightings before it.
    T *grad_s_f = nullptr, *grad_s_b = nullptr;
    if (sharp) {
        grad_s_f = scratch.take(R);
        grad_s_b = scratch.take(R);
        for (int64_t r = 0; r < R; ++r) {
            grad_s_f[r] = sharpen_backward(N, aux + d.fwd_raw() + r * N, g.s_f[r], fwd + r * N, grad_fwd + r * N);
            grad_s_b[r] = sharpen_backward(N, aux + d.bwd_raw() + r * N, g.s_b[r], bwd + r * N, grad_bwd + r * N);
        }
    }

    // M = M_{t-1} (1 - ww e^T) + ww v^T
    T* grad_ww = scratch.copy(grad_ww_out, N);
    T *grad_e = scratch.zeros(W), *grad_v = scratch.zeros(W);
    T* grad_psi_memory = nullptr;
    if (dealloc) {
        grad_psi_memory = scratch.take(N);
        deallocated_write_backward(d, g, M_prev, wr_prev, ww, grad_M, g_M_prev, grad_ww, grad_e, grad_v,
                                   grad_psi_memory);
    } else {
        for (int64_t n = 0; n < N; ++n) {
            const T* row_prev = M_prev + n * W;
            const T* grad_row = grad_M + n * W;
            T* g_row_prev = g_M_prev + n * W;
            const T wn = ww[n];
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t w = 0; w < W; ++w) {
                g_row_prev[w] = grad_row[w] * (T(1) - wn * g.e[w]);
                acc += grad_row[w] * (write_vector[w] - row_prev[w] * g.e[w]);
                grad_e[w] -= grad_row[w] * row_prev[w] * wn;
                grad_v[w] += grad_row[w] * wn;
            }
            grad_ww[n] += acc;
        }
    }

    // p = (1 - sum(ww)) p_{t-1} + ww
    T total_write = 0, grad_p_dot_prev = 0;
    for (int64_t n = 0; n < N; ++n) {
        total_write += ww[n];
        grad_p_dot_prev += grad_p[n] * p_prev[n];
    }
    for (int64_t n = 0; n < N; ++n) {
        const T gp = grad_p[n];  // read once: g_p_prev may be grad_p
        grad_ww[n] += gp - grad_p_dot_prev;
        g_p_prev[n] = (T(1) - total_write) * gp;
    }

    // Link matrix and directional weightings, one row at a time. With G the gradient of L_t
    // (zero on the diagonal) from every use: G[i,j] = grad_L[i,j] + sum_r gf_r[i] wr'[r,j] + gb_r[j] wr'[r,i]:
    //   dL_{t-1}[i,j] = (1 - ww_i - ww_j) G[i,j]
    //   dww_i += sum_j G[i,j] (p'_j - L'[i,j]);  dww_j -= sum_i G[i,j] L'[i,j];  dp'_j += sum_i G[i,j] ww_i
    //   dwr'[r,j] += sum_i L[i,j] gf_r[i];       dwr'[r,i] += sum_j L[i,j] gb_r[j]
    // (primes: step t-1; L_t is recomputed from L_{t-1} row by row rather than saved).
    std::fill(g_wr_prev, g_wr_prev + R * N, T(0));
    link_backward(d, L_prev, p_prev, ww, wr_prev,
                  LinkGrads<T>{grad_L, grad_fwd, grad_bwd, g_L_prev, g_p_prev, g_wr_prev, grad_ww}, scratch);

    // ww = g^w (g^a a + (1 - g^a) c^w)
    const T* alloc = aux + d.alloc();
    const T* cw = aux + d.cw();
    T grad_gw = 0, grad_ga = 0;
    T *grad_alloc = scratch.take(N), *grad_cw = scratch.take(N);
    for (int64_t n = 0; n < N; ++n) {
        grad_gw += grad_ww[n] * (g.ga * alloc[n] + (T(1) - g.ga) * cw[n]);
        const T grad_mixed = g.gw * grad_ww[n];
        grad_ga += grad_mixed * (alloc[n] - cw[n]);
        grad_alloc[n] = g.ga * grad_mixed;
        grad_cw[n] = (T(1) - g.ga) * grad_mixed;
    }

    // Write content lookup on M_{t-1}.
    T* grad_write_key = scratch.zeros(W);
    const T grad_beta_w =
        masked ? masked_content_backward(d, M_prev, aux + d.norm_prev(), write_key, g.mask_w, g.beta_w,
                                             aux + d.cos_w(), cw, key_norms[R], grad_cw, g_M_prev, grad_write_key,
                                             grad_mask_w, scratch)
                   : content_backward(d, M_prev, aux + d.norm_prev(), write_key, g.beta_w, aux + d.cos_w(), cw,
                                      key_norms[R], grad_cw, g_M_prev, grad_write_key);

    // Allocation a[order[j]] = (1 - s_j) P_j with s the sorted usage and P_j = prod_{i<j} s_i.
    // ds_j = P_j (Q_j - ga_j), Q_j = sum_{k>j} ga_k (1 - s_k) prod_{j<i<k} s_i, by the recurrence
    // Q_j = ga_{j+1} (1 - s_{j+1}) + s_{j+1} Q_{j+1}: no division by a usage that may be 0.
    const T* sorted = aux + d.sorted();
    const T* before = aux + d.before();
    T* grad_u = scratch.copy(grad_u_out, N);
    T later = 0;
    for (int64_t j = N - 1; j >= 0; --j) {
        const T ga_j = grad_alloc[order[j]];
        grad_u[order[j]] += before[j] * (later - ga_j);
        later = ga_j * (T(1) - sorted[j]) + sorted[j] * later;
    }

    // Usage u = (u' + ww' - u' ww') psi, psi = prod_r (1 - f_r wr'[r]) (also in the memory with deallocation).
    T* grad_f = scratch.zeros(R);
    T* factors = scratch.take(R);
    for (int64_t n = 0; n < N; ++n) {
        T psi = 1;
        for (int64_t r = 0; r < R; ++r) {
            factors[r] = T(1) - g.f[r] * wr_prev[r * N + n];
            psi *= factors[r];
        }
        const T written = u_prev[n] + ww_prev[n] - u_prev[n] * ww_prev[n];
        const T grad_written = grad_u[n] * psi;
        g_u_prev[n] = grad_written * (T(1) - ww_prev[n]);
        g_ww_prev[n] = grad_written * (T(1) - u_prev[n]);
        T grad_psi = grad_u[n] * written;
        if (dealloc) grad_psi += grad_psi_memory[n];
        for (int64_t r = 0; r < R; ++r) {
            T others = 1;  // prod over the other heads, without dividing by a factor that may be 0
            for (int64_t q = 0; q < R; ++q)
                if (q != r) others *= factors[q];
            grad_f[r] -= grad_psi * others * wr_prev[r * N + n];
            g_wr_prev[r * N + n] -= grad_psi * others * g.f[r];
        }
    }

    // The interface nonlinearities.
    T* gx = g_xi;
    for (int64_t k = 0; k < R * W; ++k) *gx++ = grad_read_keys[k];
    const T* beta_r_raw = xi + R * W;
    for (int64_t r = 0; r < R; ++r) *gx++ = grad_beta_r[r] * softplus_slope(beta_r_raw[r]);
    for (int64_t w = 0; w < W; ++w) *gx++ = grad_write_key[w];
    *gx++ = grad_beta_w * softplus_slope(write_key[W]);
    for (int64_t w = 0; w < W; ++w) *gx++ = grad_e[w] * g.e[w] * (T(1) - g.e[w]);
    for (int64_t w = 0; w < W; ++w) *gx++ = grad_v[w];
    for (int64_t r = 0; r < R; ++r) *gx++ = grad_f[r] * g.f[r] * (T(1) - g.f[r]);
    *gx++ = grad_ga * g.ga * (T(1) - g.ga);
    *gx++ = grad_gw * g.gw * (T(1) - g.gw);
    for (int64_t r = 0; r < R; ++r) {
        const T* pi = g.pi + 3 * r;
        const T* gp = grad_pi + 3 * r;
        const T dot = gp[0] * pi[0] + gp[1] * pi[1] + gp[2] * pi[2];
        for (int k = 0; k < 3; ++k) *gx++ = pi[k] * (gp[k] - dot);
    }
    // The variants' fields, in memory.interface_sizes order.
    const T* raw = g.variant_raw;
    if (masked) {  // m = mask_min + (1 - mask_min) sigma(raw)
        const T span = T(1) - T(d.mask_min);
        for (int64_t k = 0; k < R * W + W; ++k) {
            const T s = sigmoid(raw[k]);
            *gx++ = (k < R * W ? grad_mask_r[k] : grad_mask_w[k - R * W]) * span * s * (T(1) - s);
        }
        raw += R * W + W;
    }
    if (sharp) {
        for (int64_t r = 0; r < R; ++r) *gx++ = grad_s_f[r] * softplus_slope(raw[r]);
        for (int64_t r = 0; r < R; ++r) *gx++ = grad_s_b[r] * softplus_slope(raw[R + r]);
    }
}

template <typename T>
void forward_batch(int64_t B, int64_t N, int64_t W, int64_t R, int variants, double mask_min, int threads,
                   const T* xi, const T* M_prev, const T* L_prev, const T* p_prev, const T* wr_prev,
                   const T* ww_prev, const T* u_prev, T* reads, T* M, T* L, T* p, T* wr, T* ww, T* u, T* aux,
                   int32_t* order) {
    const Dims d{N, W, R, variants, mask_min};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch<T> scratch(d);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            forward_one(d, xi + b * d.S(), M_prev + b * N * W, L_prev + b * N * N, p_prev + b * N, wr_prev + b * R * N,
                 ww_prev + b * N, u_prev + b * N, reads + b * R * W, M + b * N * W, L + b * N * N, p + b * N,
                 wr + b * R * N, ww + b * N, u + b * N, aux + b * d.aux(), order + b * N, scratch);
        }
    }
}

template <typename T>
void backward_batch(int64_t B, int64_t N, int64_t W, int64_t R, int variants, double mask_min, int threads,
                    const T* xi, const T* M_prev, const T* L_prev, const T* p_prev, const T* wr_prev,
                    const T* ww_prev, const T* u_prev, const T* M, const T* wr, const T* ww, const T* aux,
                    const int32_t* order,
                    const T* grad_reads, const T* grad_M, const T* grad_L, const T* grad_p, const T* grad_wr,
                    const T* grad_ww, const T* grad_u, T* g_xi, T* g_M_prev, T* g_L_prev, T* g_p_prev,
                    T* g_wr_prev, T* g_ww_prev, T* g_u_prev) {
    const Dims d{N, W, R, variants, mask_min};
    const int64_t S = d.S();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch<T> scratch(d);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            backward_one(d, xi + b * S, M_prev + b * N * W, L_prev + b * N * N, p_prev + b * N, wr_prev + b * R * N,
                 ww_prev + b * N, u_prev + b * N, M + b * N * W, wr + b * R * N, ww + b * N, aux + b * d.aux(),
                 order + b * N, grad_reads + b * R * W, grad_M + b * N * W, grad_L + b * N * N, grad_p + b * N,
                 grad_wr + b * R * N, grad_ww + b * N, grad_u + b * N, g_xi + b * S, g_M_prev + b * N * W,
                 g_L_prev + b * N * N, g_p_prev + b * N, g_wr_prev + b * R * N, g_ww_prev + b * N,
                 g_u_prev + b * N, scratch);
        }
    }
}

// ---- The LSTM cell after its matrix products ------------------------------------------------------
// gates [B, 4H] (W_ih x + b_ih + W_hh h + b_hh, torch's order i, f, g, o), c_prev [B, H] ->
// act [B, 4H] = sigma(i), sigma(f), tanh(g), sigma(o); c = f c_prev + i g; tanh_c = tanh(c); h = o tanh_c.
// tanh(x) = 1 - 2 / (e^{2x} + 1): within a few ulp of std::tanh in absolute terms.

template <typename T, typename V>
inline V vsigmoid(V x) { return T(1) / (T(1) + vexp<T>(-x)); }

template <typename T, typename V>
inline V vtanh(V x) { return T(1) - T(2) / (vexp<T>(x + x) + T(1)); }

template <typename T>
void lstm_forward(int64_t B, int64_t H, const T* gates, const T* c_prev, T* act, T* c, T* tanh_c, T* h) {
    using V = typename Vec<T>::type;
    constexpr int K = Vec<T>::lanes;
    for (int64_t b = 0; b < B; ++b) {
        const T* z = gates + b * 4 * H;
        T* a = act + b * 4 * H;
        for (int64_t k = 0; k < H; k += K) {
            const int64_t m = std::min<int64_t>(K, H - k);
            const V i = vsigmoid<T>(load<V>(z + k, m)), f = vsigmoid<T>(load<V>(z + H + k, m));
            const V g = vtanh<T>(load<V>(z + 2 * H + k, m)), o = vsigmoid<T>(load<V>(z + 3 * H + k, m));
            store(a + k, i, m), store(a + H + k, f, m), store(a + 2 * H + k, g, m), store(a + 3 * H + k, o, m);
            const int64_t at = b * H + k;
            const V cell = f * load<V>(c_prev + at, m) + i * g;
            const V tc = vtanh<T>(cell);
            store(c + at, cell, m), store(tanh_c + at, tc, m), store(h + at, o * tc, m);
        }
    }
}

// dLoss/dgates [B, 4H] and dLoss/dc_prev [B, H] from dLoss/dh and dLoss/dc (of this step's outputs).
template <typename T>
void lstm_backward(int64_t B, int64_t H, const T* act, const T* c_prev, const T* tanh_c, const T* grad_h,
                   const T* grad_c, T* grad_gates, T* grad_c_prev) {
    for (int64_t b = 0; b < B; ++b) {
        const T* a = act + b * 4 * H;
        T* dz = grad_gates + b * 4 * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
            const int64_t n = b * H + k;
            const T i = a[k], f = a[H + k], g = a[2 * H + k], o = a[3 * H + k], tc = tanh_c[n];
            const T dc = grad_c[n] + grad_h[n] * o * (T(1) - tc * tc);
            dz[k] = dc * g * i * (T(1) - i);
            dz[H + k] = dc * c_prev[n] * f * (T(1) - f);
            dz[2 * H + k] = dc * i * (T(1) - g * g);
            dz[3 * H + k] = grad_h[n] * tc * o * (T(1) - o);
            grad_c_prev[n] = dc * f;
        }
    }
}

}  // namespace

extern "C" {

int64_t dnc_interface_size(int64_t N, int64_t W, int64_t R, int variants) { return Dims{N, W, R, variants}.S(); }
int64_t dnc_aux_size(int64_t N, int64_t W, int64_t R, int variants) { return Dims{N, W, R, variants}.aux(); }

#define DNC_DEFINE(SUFFIX, T)                                                                              \
    void dnc_forward_##SUFFIX(int64_t B, int64_t N, int64_t W, int64_t R, int variants, double mask_min,    \
                              int threads,                                                                   \
                              const T* xi,                                                                   \
                              const T* M_prev, const T* L_prev, const T* p_prev, const T* wr_prev,           \
                              const T* ww_prev, const T* u_prev, T* reads, T* M, T* L, T* p, T* wr, T* ww,   \
                              T* u, T* aux, int32_t* order) {                                                \
        forward_batch<T>(B, N, W, R, variants, mask_min, threads, xi, M_prev, L_prev, p_prev, wr_prev, ww_prev, u_prev, reads,   \
                         M, L, p, wr, ww, u, aux, order);                                                    \
    }                                                                                                        \
    void dnc_backward_##SUFFIX(int64_t B, int64_t N, int64_t W, int64_t R, int variants, double mask_min,   \
                               int threads,                                                                  \
                               const T* xi,                                                                  \
                               const T* M_prev, const T* L_prev, const T* p_prev, const T* wr_prev,          \
                               const T* ww_prev, const T* u_prev, const T* M, const T* wr, const T* ww,      \
                               const T* aux, const int32_t* order, const T* grad_reads,                      \
                               const T* grad_M, const T* grad_L, const T* grad_p, const T* grad_wr,          \
                               const T* grad_ww, const T* grad_u, T* g_xi, T* g_M_prev, T* g_L_prev,         \
                               T* g_p_prev, T* g_wr_prev, T* g_ww_prev, T* g_u_prev) {                       \
        backward_batch<T>(B, N, W, R, variants, mask_min, threads, xi, M_prev, L_prev, p_prev, wr_prev, ww_prev, u_prev, M, wr,  \
                          ww, aux, order, grad_reads, grad_M, grad_L, grad_p, grad_wr, grad_ww, grad_u,      \
                          g_xi, g_M_prev, g_L_prev, g_p_prev, g_wr_prev, g_ww_prev, g_u_prev);               \
    }

DNC_DEFINE(f32, float)
DNC_DEFINE(f64, double)

// L_t from L_{t-1} alone (no directional weightings), for recomputing links in backward.
#define DNC_DEFINE_LINK(SUFFIX, T)                                                                          \
    void dnc_link_##SUFFIX(int64_t B, int64_t N, int threads, const T* L_prev, const T* p_prev, const T* ww, \
                           T* L) {                                                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")                  \
        for (int64_t b = 0; b < B; ++b)                                                                      \
            for (int64_t i = 0; i < N; ++i)                                                                  \
                link_row(N, i, L_prev + b * N * N, p_prev + b * N, ww + b * N, L + b * N * N + i * N);      \
    }

DNC_DEFINE_LINK(f32, float)
DNC_DEFINE_LINK(f64, double)

#define DNC_DEFINE_LSTM(SUFFIX, T)                                                                          \
    void dnc_lstm_forward_##SUFFIX(int64_t B, int64_t H, const T* gates, const T* c_prev, T* act, T* c,      \
                                   T* tanh_c, T* h) {                                                        \
        lstm_forward<T>(B, H, gates, c_prev, act, c, tanh_c, h);                                             \
    }                                                                                                        \
    void dnc_lstm_backward_##SUFFIX(int64_t B, int64_t H, const T* act, const T* c_prev, const T* tanh_c,    \
                                    const T* grad_h, const T* grad_c, T* grad_gates, T* grad_c_prev) {       \
        lstm_backward<T>(B, H, act, c_prev, tanh_c, grad_h, grad_c, grad_gates, grad_c_prev);                \
    }                                                                                                        \
    void dnc_exp_##SUFFIX(int64_t n, const T* x, T* out) {                                                   \
        std::copy(x, x + n, out);                                                                            \
        exp_in_place(out, n);                                                                                \
    }

DNC_DEFINE_LSTM(f32, float)
DNC_DEFINE_LSTM(f64, double)


}  // extern "C"
