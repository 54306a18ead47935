// Decode-shaped fp32 linear: y = x @ W.T + b for few rows (M <= max_rows), streaming W once.
//
// Semantics (torch.nn.functional.linear, for x: (..., K) with M = x.numel() / K rows):
//
//     for each row m, each output n:                       # W: (N, K) row-major, as nn.Linear keeps it
//         y[m, n] = dot(x[m, :], W[n, :]) (+ b[n])          # y: (..., N)
//
// Why: in a decode step each of the base model's ~211 matmuls has 1-32 rows. MKL's sgemm reads W at
// ~12 GB/s on this AMD EPYC at such shapes (it is tuned for Intel); a plain reduction streams ~33 GB/s.
// Here W keeps nn.Linear's own (N, K) layout (no copy, tied embeddings and in-place merges keep
// working) and a micro-kernel computes an NR x MR tile of dot products: NR rows of W are loaded once per
// vector step and multiplied with MR rows of x (in L1/L2), so W crosses the memory bus once per call
// whatever M is. Threads (torch's OpenMP pool) split N into contiguous chunks.
//
// Determinism: every y[m, n] is one accumulator over k in vector steps of L lanes (explicit FMA), a
// fixed lane-reduction tree, then the K % L tail with fmaf, then + b[n]; the same instruction sequence
// whatever tile (NR, MR variant), chunk, thread count or batch the row lands in. So a token's result
// does not depend on the rest of the batch or on the number of threads, bit for bit. (Builds for
// different ISAs, L = 8 or 16, give different roundings; one process uses one build.)
//
// Built once per ISA (AVX2+FMA, AVX-512F) by loramux/dense_kernel.py; larger M, other dtypes/devices and
// autograd go to at::linear (MKL), inside this call.
#include <torch/extension.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

namespace {

#if defined(__AVX512F__)
constexpr int L = 16;  // lanes
constexpr int NR = 4;  // W rows per tile
constexpr int MR = 6;  // x rows per tile (4 x 6 accumulators + 4 W vectors of 32 registers)
typedef __m512 vec;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const int8_t* p) {  // 16 int8 -> 16 floats, exact
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec v) {  // fixed tree: 16 -> 8 -> 4 -> 2 -> 1
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int L = 8;
constexpr int NR = 4;
constexpr int MR = 3;  // 4 x 3 accumulators + 4 W vectors = 16 registers; x comes from memory in the FMA
typedef __m256 vec;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const int8_t* p) {  // 8 int8 -> 8 floats, exact
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec v) {  // fixed tree: 8 -> 4 -> 2 -> 1
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#else
#error "decode_gemm.cpp needs AVX2+FMA or AVX-512F (loramux/dense_kernel.py builds it only for those)"
#endif

// Software prefetch of the next W tile, spread over the current tile's vector steps: without it the
// first x block of a tile waits on DRAM and the others compute with the bus idle (measured at M=16:
// memory time + compute time instead of the larger of the two).
struct Prefetch {
  const char* next;
  const char* end;
  int64_t lines, steps, credit;  // `lines` cache lines spread evenly over `steps` vector steps
  inline void step() {
    credit += lines;
    for (; credit >= steps && next < end; credit -= steps, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// y[j, i] = (x[j] . W[i]) (* s[i]) (+ b[i]) for i < nr, j < mr; W, x, y, s, b already offset to the tile.
// T: float, or int8_t for the weight-only int8 base (s: per-output-channel scales; int8 -> float is exact,
// so the dot product is the fp32 one of the dequantized-without-scale weights, scaled once at the end).
template <typename T, int nr, int mr>
inline void tile(const T* __restrict W, const float* __restrict x, float* __restrict y, int64_t K, int64_t N,
                 const float* __restrict sc, const float* __restrict b, Prefetch& pf) {
  vec acc[nr][mr];
  for (int i = 0; i < nr; ++i)
    for (int j = 0; j < mr; ++j) acc[i][j] = vzero();
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    pf.step();
    vec w[nr];
    for (int i = 0; i < nr; ++i) w[i] = vload(W + i * K + k);
    for (int j = 0; j < mr; ++j) {
      const vec xv = vload(x + j * K + k);
      for (int i = 0; i < nr; ++i) acc[i][j] = vfma(w[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < nr; ++i) {
    for (int j = 0; j < mr; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s = std::fma(static_cast<float>(W[i * K + t]), x[j * K + t], s);
      if (sc != nullptr) s *= sc[i];
      if (b != nullptr) s += b[i];
      y[j * N + i] = s;
    }
  }
}

// every x row block against W rows [n0, n0 + nr), prefetching W rows [n0 + nr, pf_end)
template <typename T, int nr>
inline void rows(const T* W, const float* x, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, const float* sc,
                 const float* b, const T* pf_end) {
  const T* Wt = W + n0 * K;
  const float* st = sc != nullptr ? sc + n0 : nullptr;
  const float* bt = b != nullptr ? b + n0 : nullptr;
  const T* pf_lo = std::min(Wt + nr * K, pf_end);
  const T* pf_hi = std::min(Wt + 2 * nr * K, pf_end);
  const int64_t lines = (pf_hi - pf_lo) * static_cast<int64_t>(sizeof(T)) / 64 + 1;
  const int64_t steps = std::max<int64_t>(1, (M + MR - 1) / MR * (K / L));
  Prefetch pf{reinterpret_cast<const char*>(pf_lo), reinterpret_cast<const char*>(pf_hi), lines, steps, 0};
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<T, nr, MR>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf);
  switch (M - m) {  // the row tail: same per-element arithmetic, fewer accumulators
    case 1: tile<T, nr, 1>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
    case 2: tile<T, nr, 2>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
#if defined(__AVX512F__)
    case 3: tile<T, nr, 3>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
    case 4: tile<T, nr, 4>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
    case 5: tile<T, nr, 5>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
#endif
    default: break;
  }
}

template <typename T>
void gemm(const T* W, const float* x, float* y, int64_t M, int64_t K, int64_t N, const float* sc, const float* b,
          int threads) {
  const int64_t tiles = (N + NR - 1) / NR;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t T_ = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = tiles * t / T_, hi = tiles * (t + 1) / T_;  // a contiguous chunk of W per thread
    const T* pf_end = W + std::min(N, hi * NR) * K;
    for (int64_t tt = lo; tt < hi; ++tt) {
      const int64_t n0 = tt * NR;
      switch (std::min<int64_t>(NR, N - n0)) {
        case NR: rows<T, NR>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
        case 1: rows<T, 1>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
        case 2: rows<T, 2>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
        case 3: rows<T, 3>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
        default: break;
      }
    }
  }
}

// Below this many W bytes a second thread's wake-up costs more than it saves (~20 us at 33 GB/s).
constexpr int64_t kMinBytesPerThread = 256 * 1024;

int threads_for(int64_t bytes) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), bytes / kMinBytesPerThread)));
}

bool needs_grad(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b) {
  return at::GradMode::is_enabled() && (x.requires_grad() || W.requires_grad() || (b.has_value() && b->requires_grad()));
}

bool float_vector(const c10::optional<at::Tensor>& v, int64_t n) {
  return v->device().type() == at::kCPU && v->scalar_type() == at::kFloat && v->is_contiguous() && v->dim() == 1 && v->size(0) == n;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

}  // namespace

// torch.nn.functional.linear(x, W, b), through the kernel when x has at most max_rows rows
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t max_rows) {
  const int64_t K = W.dim() == 2 ? W.size(1) : -1;
  if (needs_grad(x, W, b) || K <= 0 || x.dim() < 1 || x.size(-1) != K || x.device().type() != at::kCPU ||
      W.device().type() != at::kCPU || x.scalar_type() != at::kFloat || W.scalar_type() != at::kFloat || !W.is_contiguous() ||
      (b.has_value() && !float_vector(b, W.size(0)))) {
    return at::linear(x, W, b);
  }
  const int64_t M = x.numel() / K, N = W.size(0);
  if (M > max_rows || M == 0) return at::linear(x, W, b);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  gemm<float>(W.data_ptr<float>(), xc.data_ptr<float>(), y.data_ptr<float>(), M, K, N, nullptr,
              b.has_value() ? b->data_ptr<float>() : nullptr, threads_for(N * K * 4));
  return y;
}

// Weight-only int8: y = (x @ q.T) * scale + b with q (N, K) int8 and scale (N,) float32 per output channel.
// Above max_rows rows (prefill) the weight is dequantized for the call and MKL does the matmul.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& b,
                       int64_t max_rows) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.device().type() == at::kCPU,
              "int8_linear: q must be a contiguous (N, K) int8 CPU tensor");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(float_vector(scale, N), "int8_linear: scale must be a contiguous float32 (", N, ",) CPU tensor");
  TORCH_CHECK(!b.has_value() || float_vector(b, N), "int8_linear: bias must be a contiguous float32 (", N, ",) CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "int8_linear: x must end with ", K, " features, got ", x.sizes());
  const int64_t M = x.numel() / K;
  if (needs_grad(x, scale, b) || x.device().type() != at::kCPU || x.scalar_type() != at::kFloat || M > max_rows || M == 0) {
    return at::linear(x, q.to(x.scalar_type()) * scale.unsqueeze(1).to(x.scalar_type()), b);
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  gemm<int8_t>(q.data_ptr<int8_t>(), xc.data_ptr<float>(), y.data_ptr<float>(), M, K, N, scale.data_ptr<float>(),
               b.has_value() ? b->data_ptr<float>() : nullptr, threads_for(N * K));
  return y;
}

// RMSNorm as transformers' Llama family writes it (LlamaRMSNorm.forward and its copies), in one call:
//
//     y = w * (x * rsqrt(mean(x^2, -1) + eps))           # x: (..., K) float32, w: (K,)
//
// Why: in a decode step those are 7 tiny ATen ops per norm (pow, sum, div, add, rsqrt, mul, mul), ~61 norms
// per step of the default model: ~430 dispatches that cost more than the arithmetic. Each row's sum of
// squares runs in a fixed order (L lanes, a fixed tree, the tail), so a row's result does not depend on
// the batch. Anything else (grad, other dtypes) takes the same formula through ATen.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t K = w.numel();
  if (at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad())) {
    const at::Tensor xf = x.to(at::kFloat);
    return w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  }
  if (x.device().type() != at::kCPU || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat ||
      w.device().type() != at::kCPU || !w.is_contiguous() || w.dim() != 1 || x.dim() < 1 || x.size(-1) != K || K == 0) {
    const at::Tensor xf = x.to(at::kFloat);
    return w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t M = x.numel() / K;
  const float e = static_cast<float>(eps), inv_k = 1.0f / static_cast<float>(K);
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      const float* xr = xp + m * K;
      float* yr = yp + m * K;
      vec acc = vzero();
      int64_t k = 0;
      for (; k + L <= K; k += L) {
        const vec v = vload(xr + k);
        acc = vfma(v, v, acc);
      }
      float ss = vsum(acc);
      for (; k < K; ++k) ss = std::fma(xr[k], xr[k], ss);
      const float r = 1.0f / std::sqrt(ss * inv_k + e);
      for (int64_t t = 0; t < K; ++t) yr[t] = wp[t] * (xr[t] * r);
    }
  });
  return y;
}

int64_t lanes() { return L; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_linear", &decode_linear, "F.linear(x, W, b); the streaming kernel for at most max_rows rows of x");
  m.def("int8_linear", &int8_linear, "F.linear(x, q * scale[:, None], b) for int8 q; the kernel for at most max_rows rows");
  m.def("rms_norm", &rms_norm, "w * (x * rsqrt(mean(x^2, -1) + eps)), transformers' LlamaRMSNorm in one call");
  m.def("lanes", &lanes, "vector width in floats of this build (8: AVX2, 16: AVX-512)");
}
