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
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

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
constexpr int NR = 3;
constexpr int MR = 4;  // 3 x 4 accumulators + 3 W vectors + 1 x vector = the 16 registers (4 x 3 spilled)
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

template <typename T, int nr>
inline void rows_of(const T* Wt, const float* x, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, const float* st,
                    const float* bt, Prefetch& pf);

#if defined(__AVX512F__)
inline void vstore_(float* p, vec v) { _mm512_storeu_ps(p, v); }
#else
inline void vstore_(float* p, vec v) { _mm256_storeu_ps(p, v); }
#endif

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
  if constexpr (std::is_same<T, int8_t>::value) {
    if (M > MR) {  // several row blocks: widen the int8 tile to float once (exact), not once per block
      thread_local std::vector<float> wide;
      wide.resize(static_cast<size_t>(nr * K));
      int64_t k = 0;
      for (; k + L <= nr * K; k += L) vstore_(wide.data() + k, vload(Wt + k));
      for (; k < nr * K; ++k) wide[k] = static_cast<float>(Wt[k]);
      rows_of<float, nr>(wide.data(), x, y, M, K, N, n0, st, bt, pf);
      return;
    }
  }
  rows_of<T, nr>(Wt, x, y, M, K, N, n0, st, bt, pf);
}

// the row blocks of x against one W tile (already offset), then the row tail
template <typename T, int nr>
inline void rows_of(const T* Wt, const float* x, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, const float* st,
                    const float* bt, Prefetch& pf) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<T, nr, MR>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf);
  switch (M - m) {  // the row tail: same per-element arithmetic, fewer accumulators
    case 1: tile<T, nr, 1>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
    case 2: tile<T, nr, 2>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
    case 3: tile<T, nr, 3>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
#if defined(__AVX512F__)
    case 4: tile<T, nr, 4>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
    case 5: tile<T, nr, 5>(Wt, x + m * K, y + m * N + n0, K, N, st, bt, pf); break;
#endif
    default: break;
  }
}

template <typename T>
void tile_range(const T* W, const float* x, float* y, int64_t M, int64_t K, int64_t N, const float* sc, const float* b,
                int64_t nr_, int64_t lo, int64_t hi);

// One row of x against W rows [0, nr) (already offset; T float, or int8_t with per-channel scales sc):
// tile<T, nr, 1>'s arithmetic, bit for bit, in the loop shape that streams fastest at one row. Each W vector is
// loaded and used at once (tile's loads-first order holds nr + nr + 1 vectors, 17 registers at nr = 8: a spill
// per step). Not inlined: its own registers hold the nr row pointers (inlined, three were reloaded from the stack
// each step). float32: no software prefetch: the rows are 2-6 KB, the hardware prefetchers follow the nr streams
// and the prefetch instructions only cost issue slots. The 211 matmuls of a B1 step of the default model
// (513 MiB), one process, variants alternating 30-40 rounds: 1 thread 37.1-37.5 vs 41.1-42.3 ms for the 4-row
// tile with the prefetch, 2 threads 25.5-29.7 vs 26.8-31.1; the whole B1 step on 1 thread 45.9 vs 50.8. int8: its
// rows are a quarter as long (9 cache lines at K = 576), too short for the hardware to ramp up on, so the next
// tile is prefetched, L / 8 lines a step (the whole next tile over this one's steps): the 211 int8 matmuls,
// 30 rounds, 1 thread 13.2 vs 19.0 ms for the 4-row tile with its prefetch, 2 threads 8.9 vs 12.2 (without the
// prefetch this 8-row shape was slower: 29.9 vs 17.0).
//
// float32 has a second shape, chosen per process by dense_kernel.py from a measurement at start-up
// (set_one_row_shape): 2-row tiles that prefetch the next tile as they go, nr lines a step (the next 2 rows over
// this tile's steps), so the weights are read almost as one sequential stream, with the prefetch one tile ahead.
// Which is faster depends on the CPU's prefetchers: on the AMD EPYC with AVX-512 of 2026-12-03 the 211 matmuls of
// a B1 step took 11.4 / 14.9 / 10.0 ms against 14.4 / 16.6 / 10.5 for the 8-row tiles (2 threads, three runs of 60
// rounds alternating; 1 thread 17.8 / 18.3 / 17.3 vs 21.9 / 20.3 / 18.7), where the older AMD favoured 8 rows (above).
// Bit for bit the same results: each y[n] is the same accumulator chain in either shape.
template <typename T, int nr, bool prefetch>
__attribute__((noinline)) void one_row_tile(const T* __restrict W, const float* __restrict x, float* __restrict y,
                                            int64_t K, const float* __restrict sc, const float* __restrict b,
                                            const char* pf, const char* pf_end) {
  // cache lines of the next tile to fetch per vector step: int8 L / 8 (the 8-row tile), float32 nr * L / 16
  constexpr int lines = std::is_same<T, int8_t>::value ? L / 8 : std::max(1, nr * L / 16);
  vec acc[nr];
  for (int i = 0; i < nr; ++i) acc[i] = vzero();
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    if constexpr (prefetch) {
      for (int p = 0; p < lines && pf < pf_end; ++p, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
    }
    const vec xv = vload(x + k);
    for (int i = 0; i < nr; ++i) acc[i] = vfma(vload(W + i * K + k), xv, acc[i]);
  }
  for (int i = 0; i < nr; ++i) {
    float s = vsum(acc[i]);
    for (int64_t t = k; t < K; ++t) s = std::fma(static_cast<float>(W[i * K + t]), x[t], s);
    if (sc != nullptr) s *= sc[i];
    if (b != nullptr) s += b[i];
    y[i] = s;
  }
}

constexpr int kOneRowTile = 8;  // W rows per tile at one row of x (float32's other shape: 2, see one_row_tile)

// float32's one-row shape for this process: false 8-row tiles, true 2-row tiles prefetching the next (set_one_row_shape).
// Read once per matmul call (tile_rows), and the tiles run by the rows per tile that read gave, so a call that
// overlaps a change (the start-up measurement, another model wrapped meanwhile) still covers every output.
std::atomic<bool> g_two_row_tiles{false};

// W tiles [lo, hi) of `rows` W rows each against one row of x, prefetching the next tile within [lo, hi) if `prefetch`
template <typename T, int rows, bool prefetch>
inline void one_row_tiles(const T* W, const float* x, float* y, int64_t K, int64_t N, const float* sc, const float* b,
                          int64_t lo, int64_t hi) {
  const char* pf_end = reinterpret_cast<const char*>(W + std::min<int64_t>(N, hi * rows) * K);
  for (int64_t tt = lo; tt < hi; ++tt) {
    const int64_t n0 = tt * rows;
    const T* Wt = W + n0 * K;
    const char* pf = reinterpret_cast<const char*>(Wt + rows * K);
    const float* st = sc != nullptr ? sc + n0 : nullptr;
    const float* bt = b != nullptr ? b + n0 : nullptr;
    switch (std::min<int64_t>(rows, N - n0)) {  // cases above `rows` never occur
      case 8: one_row_tile<T, rows < 8 ? rows : 8, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 7: one_row_tile<T, rows < 7 ? rows : 7, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 6: one_row_tile<T, rows < 6 ? rows : 6, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 5: one_row_tile<T, rows < 5 ? rows : 5, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 4: one_row_tile<T, rows < 4 ? rows : 4, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 3: one_row_tile<T, rows < 3 ? rows : 3, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 2: one_row_tile<T, rows < 2 ? rows : 2, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      case 1: one_row_tile<T, 1, prefetch>(Wt, x, y + n0, K, st, bt, pf, pf_end); break;
      default: break;
    }
  }
}

// W rows per one-row tile: int8 8, float32 8 or 2 (this process's shape)
template <typename T>
inline int64_t one_row_tile_rows() {
  return std::is_same<T, float>::value && g_two_row_tiles.load(std::memory_order_relaxed) ? 2 : kOneRowTile;
}

// W tiles [lo, hi) of nr_ rows (one_row_tile_rows<T>() as the call read it) against one row of x
template <typename T>
inline void one_row_range(const T* W, const float* x, float* y, int64_t K, int64_t N, const float* sc, const float* b,
                          int64_t nr_, int64_t lo, int64_t hi) {
  if constexpr (std::is_same<T, int8_t>::value) {
    one_row_tiles<T, kOneRowTile, true>(W, x, y, K, N, sc, b, lo, hi);
  } else if (nr_ == 2) {
    one_row_tiles<T, 2, true>(W, x, y, K, N, sc, b, lo, hi);
  } else {
    one_row_tiles<T, kOneRowTile, false>(W, x, y, K, N, sc, b, lo, hi);
  }
}

// W rows per tile for M rows of x: one row: one_row_tile_rows; two rows: 4 (8 accumulators fit, and the int8 widening
// per FMA is the larger cost); more: NR. The tile shape never changes a result: each y[m, n] is the same
// accumulator chain.
template <typename T>
inline int64_t tile_rows(int64_t M) {
  return M == 1 ? one_row_tile_rows<T>() : M <= 2 ? 4 : NR;
}

template <typename T>
void gemm(const T* W, const float* x, float* y, int64_t M, int64_t K, int64_t N, const float* sc, const float* b,
          int threads) {
  const int64_t nr_ = tile_rows<T>(M);
  const int64_t tiles = (N + nr_ - 1) / nr_;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t T_ = omp_get_num_threads(), t = omp_get_thread_num();
    tile_range(W, x, y, M, K, N, sc, b, nr_, tiles * t / T_, tiles * (t + 1) / T_);  // a contiguous chunk of W
  }
}

// One matrix's W tiles [lo, hi) of nr_ rows each (a thread's share), prefetching within that share
template <typename T>
void tile_range(const T* W, const float* x, float* y, int64_t M, int64_t K, int64_t N, const float* sc, const float* b,
                int64_t nr_, int64_t lo, int64_t hi) {
  if (M == 1) return one_row_range(W, x, y, K, N, sc, b, nr_, lo, hi);  // nr_ is one_row_tile_rows<T>()
  const T* pf_end = W + std::min(N, hi * nr_) * K;
  for (int64_t tt = lo; tt < hi; ++tt) {
    const int64_t n0 = tt * nr_;
    switch (std::min<int64_t>(nr_, N - n0)) {
      case 1: rows<T, 1>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
      case 2: rows<T, 2>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
      case 3: rows<T, 3>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
      case 4: rows<T, 4>(W, x, y, M, K, N, n0, sc, b, pf_end); break;
      default: break;
    }
  }
}

// Several matrices with the same input (q/k/v, gate/up) in one parallel region: their tiles are split over
// the threads as one range, so no matrix is too small to share and the threads meet once, not once per matrix.
// T: float, or int8_t with per-channel scales (scs[g], else nullptr).
template <typename T>
void gemm_group(const std::vector<const T*>& Ws, const std::vector<float*>& ys, const std::vector<int64_t>& Ns,
                const std::vector<const float*>& scs, const std::vector<const float*>& bs, const float* x, int64_t M,
                int64_t K, int threads) {
  const int64_t nr_ = tile_rows<T>(M);
  const int64_t G = static_cast<int64_t>(Ws.size());
  std::vector<int64_t> first(G + 1, 0);  // first[g]: global index of matrix g's first tile
  for (int64_t g = 0; g < G; ++g) first[g + 1] = first[g] + (Ns[g] + nr_ - 1) / nr_;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t T_ = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = first[G] * t / T_, hi = first[G] * (t + 1) / T_;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t a = std::max(lo, first[g]), e = std::min(hi, first[g + 1]);
      if (a < e) tile_range<T>(Ws[g], x, ys[g], M, K, Ns[g], scs[g], bs[g], nr_, a - first[g], e - first[g]);
    }
  }
}

// Below this many W bytes a second thread's wake-up costs more than it saves (~20 us at 33 GB/s).
constexpr int64_t kMinBytesPerThread = 256 * 1024;

// An int8 weight byte costs about as much time as a float32 weight (4 bytes): the int8 kernel at 1-2 rows is bound
// by its widening and FMA chains (~13 GB/s of int8 per core with W in cache), not by the stream. Counting it as
// 1 byte kept q/o (332 KB int8) on one thread: all int8 matmuls of a B1 step, 2 threads, 11.8 vs 13.3 ms.
constexpr int64_t kInt8Work = 4;

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

// [F.linear(x, W, b) for W, b in zip(weights, biases)] with one read of x and one parallel region, through the
// kernel when x has at most max_rows rows and every W is a contiguous float32 (N_i, K) matrix; else one
// decode_linear per matrix. Each output element is the same accumulator chain as decode_linear's, bit for bit.
std::vector<at::Tensor> decode_linear_group(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                            const std::vector<c10::optional<at::Tensor>>& biases, int64_t max_rows) {
  TORCH_CHECK(weights.size() == biases.size() && !weights.empty(), "decode_linear_group: one bias (or None) per weight");
  const int64_t K = x.dim() >= 1 ? x.size(-1) : -1;
  bool kernel = K > 0 && x.device().type() == at::kCPU && x.scalar_type() == at::kFloat;
  int64_t bytes = 0;
  for (size_t g = 0; g < weights.size() && kernel; ++g) {
    const at::Tensor& W = weights[g];
    kernel = W.dim() == 2 && W.size(1) == K && W.device().type() == at::kCPU && W.scalar_type() == at::kFloat &&
             W.is_contiguous() && !needs_grad(x, W, biases[g]) && (!biases[g].has_value() || float_vector(biases[g], W.size(0)));
    bytes += kernel ? W.numel() * 4 : 0;
  }
  const int64_t M = K > 0 ? x.numel() / K : 0;
  std::vector<at::Tensor> out;
  if (!kernel || M > max_rows || M == 0) {
    for (size_t g = 0; g < weights.size(); ++g) out.push_back(decode_linear(x, weights[g], biases[g], max_rows));
    return out;
  }
  const at::Tensor xc = x.contiguous();
  std::vector<const float*> Ws, bs;
  std::vector<float*> ys;
  std::vector<int64_t> Ns;
  for (size_t g = 0; g < weights.size(); ++g) {
    const int64_t N = weights[g].size(0);
    out.push_back(at::empty(out_shape(x, N), x.options()));
    Ws.push_back(weights[g].data_ptr<float>());
    bs.push_back(biases[g].has_value() ? biases[g]->data_ptr<float>() : nullptr);
    ys.push_back(out.back().data_ptr<float>());
    Ns.push_back(N);
  }
  gemm_group<float>(Ws, ys, Ns, std::vector<const float*>(Ws.size(), nullptr), bs, xc.data_ptr<float>(), M, K,
                    threads_for(bytes));
  return out;
}

// q (N, K) int8 times scale (N,) per row, as float32 in one pass: the same products as torch's
// q.to(float) * scale[:, None] (one fp32 multiply each), without its intermediate float copy of q.
static at::Tensor dequantized(const at::Tensor& q, const at::Tensor& scale) {
  const int64_t N = q.size(0), K = q.size(1);
  at::Tensor w = at::empty({N, K}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const int8_t* row = qp + n * K;
      float* out = wp + n * K;
      const float s = sp[n];
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(row[k]) * s;
    }
  });
  return w;
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
  if (needs_grad(x, scale, b) || x.device().type() != at::kCPU || x.scalar_type() != at::kFloat) {
    return at::linear(x, q.to(x.scalar_type()) * scale.unsqueeze(1).to(x.scalar_type()), b);
  }
  if (M > max_rows || M == 0) return at::linear(x, dequantized(q, scale), b);  // prefill: MKL on a float copy
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  gemm<int8_t>(q.data_ptr<int8_t>(), xc.data_ptr<float>(), y.data_ptr<float>(), M, K, N, scale.data_ptr<float>(),
               b.has_value() ? b->data_ptr<float>() : nullptr, threads_for(N * K * kInt8Work));
  return y;
}

// [int8_linear(x, q_i, scale_i, b_i)] in one parallel region (as decode_linear_group for float32): the kernel when x
// has at most max_rows rows and no autograd is involved, else one int8_linear per matrix; the same bits either way.
std::vector<at::Tensor> int8_linear_group(const at::Tensor& x, const std::vector<at::Tensor>& qs,
                                          const std::vector<c10::optional<at::Tensor>>& scales,
                                          const std::vector<c10::optional<at::Tensor>>& bs, int64_t max_rows) {
  const int64_t K = x.dim() >= 1 ? x.size(-1) : -1;
  const int64_t M = K > 0 ? x.numel() / K : 0;
  bool kernel = K > 0 && M > 0 && M <= max_rows && x.device().type() == at::kCPU && x.scalar_type() == at::kFloat;
  int64_t bytes = 0;
  for (size_t g = 0; g < qs.size() && kernel; ++g) {
    const at::Tensor& q = qs[g];
    kernel = q.dim() == 2 && q.size(1) == K && q.scalar_type() == at::kChar && q.is_contiguous() &&
             q.device().type() == at::kCPU && float_vector(scales[g], q.size(0)) && !needs_grad(x, *scales[g], bs[g]) &&
             (!bs[g].has_value() || float_vector(bs[g], q.size(0)));
    bytes += kernel ? q.numel() : 0;
  }
  std::vector<at::Tensor> out;
  if (!kernel) {
    for (size_t g = 0; g < qs.size(); ++g) out.push_back(int8_linear(x, qs[g], *scales[g], bs[g], max_rows));
    return out;
  }
  const at::Tensor xc = x.contiguous();
  std::vector<const int8_t*> Ws;
  std::vector<const float*> scs, bps;
  std::vector<float*> ys;
  std::vector<int64_t> Ns;
  for (size_t g = 0; g < qs.size(); ++g) {
    const int64_t N = qs[g].size(0);
    out.push_back(at::empty(out_shape(x, N), x.options()));
    Ws.push_back(qs[g].data_ptr<int8_t>());
    scs.push_back(scales[g]->data_ptr<float>());
    bps.push_back(bs[g].has_value() ? bs[g]->data_ptr<float>() : nullptr);
    ys.push_back(out.back().data_ptr<float>());
    Ns.push_back(N);
  }
  gemm_group<int8_t>(Ws, ys, Ns, scs, bps, xc.data_ptr<float>(), M, K, threads_for(bytes * kInt8Work));
  return out;
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

// Attention of one new token per row over its cached keys/values (a decode step), grouped-query aware:
//
//     for each row b, query head h (kv head g = h / rep):          # q: (B, Hq, 1, D), k/v: (B, Hkv, Lk, D)
//         s[l] = dot(q[b, h], k[b, g, l]) * scale (+ mask[b, l])   # mask: (Bm, 1, 1, Lk) bool (True = attend,
//         p = softmax(s)                                           #   False = left out) or float (added);
//         out[b, 0, h] = sum_l p[l] * v[b, g, l]                   #   Bm is 1 or B. out: (B, 1, Hq, D)
//
// Why: torch's CPU flash-attention kernel is built for long queries; with one query row it pays its
// block set-up per (row, head) (0.5-1.4 ms per layer at B16 on the default model, several times the
// memory time of its keys and values). Here each (row, query head) is one task, and the query heads sharing a
// kv head run one after another on a thread, which reads that head's keys and values from memory once.
// Keys/values may be strided views (the engine's KV buffers: rows, heads and positions strided, head dim
// contiguous).
//
// Determinism: each (b, h) is computed by one thread in a fixed order (each dot product in vector steps + the
// fixed lane tree, then the D tail; the softmax and the value sum in position order), so a row's result does
// not depend on the other rows or on the thread count. A row with every position left out gets zeros.
namespace {

constexpr int kDotBlock = 4;  // positions whose dot products run side by side (independent FMA chains)

inline float dot_tail(const float* a, const float* b, int64_t d, int64_t D, float s) {
  for (; d < D; ++d) s = std::fma(a[d], b[d], s);
  return s;
}

// scores s[l] = q . k[l] for l < Lk (unscaled); kls: stride between positions
inline void scores(const float* qh, const float* kb, int64_t kls, int64_t Lk, int64_t D, float* s) {
  const int64_t DV = D / L * L;
  int64_t l = 0;
  for (; l + kDotBlock <= Lk; l += kDotBlock) {
    vec acc[kDotBlock];
    for (int i = 0; i < kDotBlock; ++i) acc[i] = vzero();
    for (int64_t d = 0; d < DV; d += L) {
      const vec qv = vload(qh + d);
      for (int i = 0; i < kDotBlock; ++i) acc[i] = vfma(qv, vload(kb + (l + i) * kls + d), acc[i]);
    }
    for (int i = 0; i < kDotBlock; ++i) s[l + i] = dot_tail(qh, kb + (l + i) * kls, DV, D, vsum(acc[i]));
  }
  for (; l < Lk; ++l) {
    vec acc = vzero();
    for (int64_t d = 0; d < DV; d += L) acc = vfma(vload(qh + d), vload(kb + l * kls + d), acc);
    s[l] = dot_tail(qh, kb + l * kls, DV, D, vsum(acc));
  }
}

#if defined(__AVX512F__)
inline vec vset1(float f) { return _mm512_set1_ps(f); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vfnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vec vclamp(vec x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, vset1(lo)), vset1(hi)); }
inline vec vround(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {  // 2^n for integral n in [-126, 127], through the exponent bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vec vzero_below(vec y, vec x, float lo) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset1(lo), _CMP_GE_OQ), y); }
#else
inline vec vset1(float f) { return _mm256_set1_ps(f); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vfnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline vec vclamp(vec x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, vset1(lo)), vset1(hi)); }
inline vec vround(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vec vzero_below(vec y, vec x, float lo) { return _mm256_and_ps(y, _mm256_cmp_ps(x, vset1(lo), _CMP_GE_OQ)); }
#endif

// exp(x) per lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n), within
// ~2 ulp of std::exp; 0 below -87.34 (where expf leaves the normal floats) and for -inf (a left-out position).
// Why not std::exp: one scalar call per (row, query head, position), 18k per layer at B16 x 129 positions, was
// most of the attention kernel's time. Lane-wise, so a position's value does not depend on which lane it is in.
inline vec vexp(vec x) {
  constexpr float kLo = -87.3365478515625f, kHi = 88.3762626647949f;
  const vec xc = vclamp(x, kLo, kHi);
  const vec n = vround(vmul(xc, vset1(1.44269504088896341f)));
  const vec r = vfnma(n, vset1(-2.12194440e-4f), vfnma(n, vset1(0.693359375f), xc));  // x - n ln2, ln2 in two parts
  vec p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vadd(vfma(p, vmul(r, r), r), vset1(1.0f));  // p r^2 + r + 1
  return vzero_below(vmul(p, vpow2(n)), x, kLo);
}

// s[l] = exp(s[l] - mx) for l < n, and their sum in position order (the tail through the same lanes)
inline float exp_shifted(float* s, int64_t n, float mx) {
  const vec m = vset1(mx);
  int64_t l = 0;
  for (; l + L <= n; l += L) vstore(s + l, vexp(vsub(vload(s + l), m)));
  if (l < n) {
    float tail[L];
    for (int i = 0; i < L; ++i) tail[i] = l + i < n ? s[l + i] - mx : -INFINITY;
    vstore(tail, vexp(vload(tail)));
    for (int64_t i = 0; l + i < n; ++i) s[l + i] = tail[i];
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += s[i];
  return sum;
}

// o[:D] = sum_l p[l] * v[l] in position order; NV = D / L vectors kept in registers
template <int NV>
inline void weighted_sum(const float* p, const float* vb, int64_t vls, int64_t Lk, float* o) {
  vec acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = vzero();
  for (int64_t l = 0; l < Lk; ++l) {
    if (p[l] == 0.0f) continue;
    const vec pv = vset1(p[l]);
    const float* vl = vb + l * vls;
    for (int i = 0; i < NV; ++i) acc[i] = vfma(pv, vload(vl + i * L), acc[i]);
  }
  for (int i = 0; i < NV; ++i) vstore(o + i * L, acc[i]);
}

inline void weighted_sum_any(const float* p, const float* vb, int64_t vls, int64_t Lk, int64_t D, float* o) {
  switch (D % L == 0 ? D / L : 0) {
    case 1: return weighted_sum<1>(p, vb, vls, Lk, o);
    case 2: return weighted_sum<2>(p, vb, vls, Lk, o);
    case 4: return weighted_sum<4>(p, vb, vls, Lk, o);
    case 8: return weighted_sum<8>(p, vb, vls, Lk, o);
    case 16: return weighted_sum<16>(p, vb, vls, Lk, o);
    default: break;
  }
  for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;  // any other D: the same order, one lane at a time
  for (int64_t l = 0; l < Lk; ++l) {
    if (p[l] == 0.0f) continue;
    const float* vl = vb + l * vls;
    for (int64_t d = 0; d < D; ++d) o[d] = std::fma(p[l], vl[d], o[d]);
  }
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: q (B, Hq, 1, D), k/v (B, Hkv, L, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Lk && k.size(3) == D && v.size(3) == D &&
              Hkv > 0 && Hq % Hkv == 0, "decode_attention: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: the head dim must be contiguous");
  const bool has_mask = mask.has_value() && mask->defined();
  const bool bool_mask = has_mask && mask->scalar_type() == at::kBool;
  if (has_mask) {
    TORCH_CHECK(mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == B) && mask->size(1) == 1 && mask->size(2) == 1 &&
                mask->size(3) == Lk && (bool_mask || mask->scalar_type() == at::kFloat),
                "decode_attention: mask must be (1 or B, 1, 1, L) bool or float32, got ", mask->sizes(), " ", mask->scalar_type());
  }
  const int64_t rep = Hq / Hkv;
  at::Tensor out = at::empty({B, 1, Hq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool* mb = bool_mask ? mask->data_ptr<bool>() : nullptr;
  const float* mf = has_mask && !bool_mask ? mask->data_ptr<float>() : nullptr;
  const int64_t ms0 = has_mask && mask->size(0) > 1 ? mask->stride(0) : 0, ms3 = has_mask ? mask->stride(3) : 0;
  const float sc = static_cast<float>(scale);
  // Tasks are (row, query head) pairs in row-major order, ~128 KiB of K/V reads each chunk: a thread's chunk runs the
  // query heads of one kv head one after another, so their shared keys and values are read from memory once. Split by
  // query head rather than by kv head so that a B1 step's few kv heads (3 on the default model) still spread over
  // the threads (by kv head they were one serial task with the other thread waiting). Measured on the default model
  // (whole decode_stack call, 2 threads, 60-80 rounds alternating in one process, same bits asserted): B1 int8 3.76 vs
  // 3.99 ms and 4.80 vs 5.00, B1 fp32 9.88 vs 9.98, B4 12.66 vs 12.84, B16 26.54 vs 26.46 (no change).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Lk * D));
  at::parallel_for(0, B * Hq, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(static_cast<size_t>(Lk));
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / Hq, h = task % Hq, g = h / rep;
      const float* kb = kp + b * k.stride(0) + g * k.stride(1);
      const float* vb = vp + b * v.stride(0) + g * v.stride(1);
      {
        float* oh = op + (b * Hq + h) * D;
        scores(qp + b * q.stride(0) + h * q.stride(1), kb, k.stride(2), Lk, D, s.data());
        float mx = -INFINITY;
        for (int64_t l = 0; l < Lk; ++l) {
          float x = s[l] * sc;
          if (mb != nullptr) x = mb[b * ms0 + l * ms3] ? x : -INFINITY;
          else if (mf != nullptr) x += mf[b * ms0 + l * ms3];
          s[l] = x;
          mx = std::max(mx, x);
        }
        if (mx == -INFINITY) {  // every position left out
          for (int64_t d = 0; d < D; ++d) oh[d] = 0.0f;
          continue;  // the next task
        }
        const float sum = exp_shifted(s.data(), Lk, mx);  // left-out positions (-inf) get 0 and add nothing
        weighted_sum_any(s.data(), vb, v.stride(2), Lk, D, oh);
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; ++d) oh[d] *= inv;
      }
    }
  });
  return out;
}

// Rotary position embedding of one token per row, transformers' ``apply_rotary_pos_emb`` (rotate_half form):
//
//     out[b, 0, h, d] = x[d] * cos[b, d] - x[d + D/2] * sin[b, d]      for d <  D/2     # x = x[b, 0, h, :]
//     out[b, 0, h, d] = x[d] * cos[b, d] + x[d - D/2] * sin[b, d]      for d >= D/2     # x: (B, 1, H, D)
//                                                                                       # cos/sin: (1 or B, 1, D)
// Why: in Python that is ~15 ATen ops per layer (slices, neg, cat, 4 mul, 2 add, for q and k), ~450 dispatches
// a step of the default model. The same products and sums as transformers' (q * cos) + (rotate_half(q) * sin),
// each rounded once (-ffp-contract=off, (-a) * b = -(a * b) exactly), so the result equals it bit for bit.
namespace {

void rotate_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(2), D = x.size(3), half = D / 2;
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t cs = cos.size(0) == 1 ? 0 : D;  // a shared (1, 1, D) position, or one per row
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cp + b * cs;
    const float* s = sp + b * cs;
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = xp + (b * H + h) * D;
      float* o = op + (b * H + h) * D;
      for (int64_t d = 0; d < half; ++d) o[d] = xr[d] * c[d] - xr[d + half] * s[d];
      for (int64_t d = half; d < D; ++d) o[d] = xr[d] * c[d] + xr[d - half] * s[d];
    }
  }
}

}  // namespace

std::vector<at::Tensor> decode_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(1) == 1 && k.size(1) == 1 && q.size(0) == k.size(0) &&
              q.size(3) == k.size(3) && q.size(3) % 2 == 0, "decode_rotary: q (B, 1, Hq, D), k (B, 1, Hkv, D), even D; got ",
              q.sizes(), " and ", k.sizes());
  const int64_t B = q.size(0), D = q.size(3);
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes() && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == 1 &&
              cos.size(2) == D, "decode_rotary: cos/sin (1 or B, 1, D), got ", cos.sizes(), " and ", sin.sizes());
  for (const at::Tensor* t : {&q, &k, &cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().type() == at::kCPU, "decode_rotary: float32 CPU tensors only");
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  rotate_rows(qc, cc, sc, qo);
  rotate_rows(kc, cc, sc, ko);
  return {qo, ko};
}

// The linears of one decoder layer around its attention, in two calls a layer instead of ~20 Python-level ones
// (decode_layers.py's fused path: every projection a plain float32 or int8 base linear, no adapter in the batch,
// no hooks). Each linear is decode_linear / decode_linear_group / int8_linear, each other op the ATen op the
// Python forward runs, in the same order: the results are those of the module calls, bit for bit.
namespace {

// F.linear through the kernel: W float32 (N, K), or int8 q (N, K) with its per-channel scales
at::Tensor base_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& b, int64_t max_rows) {
  return scale.has_value() ? int8_linear(x, w, *scale, b, max_rows) : decode_linear(x, w, b, max_rows);
}

// [F.linear(x, W_i, b_i)]: one grouped call when every W is float32, else one call each
std::vector<at::Tensor> base_linears(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                     const std::vector<c10::optional<at::Tensor>>& scales,
                                     const std::vector<c10::optional<at::Tensor>>& bs, int64_t max_rows) {
  TORCH_CHECK(ws.size() == scales.size() && ws.size() == bs.size(), "decode block: one scale and one bias (or None) per weight");
  bool all_float = true, all_int8 = true;
  for (const auto& s : scales) {
    all_float = all_float && !s.has_value();
    all_int8 = all_int8 && s.has_value();
  }
  if (all_float) return decode_linear_group(x, ws, bs, max_rows);
  if (all_int8) return int8_linear_group(x, ws, scales, bs, max_rows);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < ws.size(); ++i) out.push_back(base_linear(x, ws[i], scales[i], bs[i], max_rows));
  return out;
}

// One projection's adapters for the batch, as ops.py's kernel path hands them to grouped_lora_add: (tokens, starts,
// ends, A, B_t); None where the projection has nothing to add.
using Lora = std::optional<std::tuple<at::Tensor, std::vector<int64_t>, std::vector<int64_t>, std::vector<at::Tensor>,
                                      std::vector<at::Tensor>>>;
// grouped_lora.cpp's grouped_lora_add_raw: (y, x, rows, d_in, d_out, tokens, starts, ends, A, B_t)
using LoraAdd = void (*)(float*, const float*, int64_t, int64_t, int64_t, const at::Tensor&, const std::vector<int64_t>&,
                         const std::vector<int64_t>&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&);

// y += the adapters' deltas for input x, in place (y: (B, 1, d_out) fresh and contiguous, x: (B, 1, d_in)): what
// LoraLayer.add_adapters does for a decode step whose groups are all plain LoRA, through the same code
at::Tensor add_lora(at::Tensor y, const at::Tensor& x, const Lora& lora, int64_t lora_add) {
  if (lora.has_value()) {
    TORCH_CHECK(lora_add != 0, "decode block: adapters without grouped_lora_add_raw's address");
    const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();  // (block inputs are: no copy, no new tensor)
    const int64_t d_in = xc.size(-1), d_out = y.size(-1), rows = xc.numel() / d_in;
    TORCH_CHECK(y.is_contiguous() && y.scalar_type() == at::kFloat && xc.scalar_type() == at::kFloat && y.numel() == rows * d_out,
                "decode block: LoRA rows must be contiguous float32 x (", rows, ", ", d_in, ") and y (", rows, ", ", d_out, ")");
    const auto& [tokens, starts, ends, A, B_t] = *lora;
    reinterpret_cast<LoraAdd>(lora_add)(y.data_ptr<float>(), xc.data_ptr<float>(), rows, d_in, d_out, tokens, starts, ends,
                                        A, B_t);
  }
  return y;
}

std::vector<at::Tensor> projections(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                    const std::vector<c10::optional<at::Tensor>>& scales,
                                    const std::vector<c10::optional<at::Tensor>>& bs, const std::vector<Lora>& loras,
                                    int64_t lora_add, int64_t max_rows) {
  std::vector<at::Tensor> ys = base_linears(x, ws, scales, bs, max_rows);
  for (size_t i = 0; i < ys.size(); ++i) add_lora(ys[i], x, loras[i], lora_add);
  return ys;
}

}  // namespace

// q, k, v of one token per row, ready for the KV cache and attention (LlamaAttention.forward up to the cache):
//     h = rms_norm(x); q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T (+ b)     # x: (B, 1, d) -> (B, 1, H, D) each
//     q, k = apply_rotary_pos_emb(q, k, cos, sin)                       # cos/sin: (1 or B, 1, D)
//     (each projection's adapters added to its output before rotary, as LoraLayer does: loras, lora_add)
std::vector<at::Tensor> decode_block_qkv(const at::Tensor& x, const at::Tensor& norm_w, double eps,
                                         const std::vector<at::Tensor>& ws, const std::vector<c10::optional<at::Tensor>>& scales,
                                         const std::vector<c10::optional<at::Tensor>>& bs, const std::vector<Lora>& loras,
                                         int64_t lora_add, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim,
                                         int64_t max_rows) {
  TORCH_CHECK(ws.size() == 3 && loras.size() == 3 && x.dim() == 3 && x.size(1) == 1,
              "decode_block_qkv: x (B, 1, d), 3 weights and 3 adapter sets (q, k, v)");
  const int64_t B = x.size(0);
  std::vector<at::Tensor> qkv = projections(rms_norm(x, norm_w, eps), ws, scales, bs, loras, lora_add, max_rows);
  const at::Tensor q = qkv[0].view({B, 1, -1, head_dim}), k = qkv[1].view({B, 1, -1, head_dim});
  std::vector<at::Tensor> rotated = decode_rotary(q, k, cos, sin);
  return {rotated[0], rotated[1], qkv[2].view({B, 1, -1, head_dim})};
}

// The rest of the layer after attention (LlamaDecoderLayer.forward from o_proj on, LlamaMLP with SiLU):
//     y = residual + o(attn)                          # attn: (B, 1, Hq, D) -> (B, 1, Hq * D) -> (B, 1, d)
//     h = rms_norm(y); out = y + down(silu(gate(h)) * up(h))
at::Tensor decode_block_mlp(const at::Tensor& residual, const at::Tensor& attn, const std::vector<at::Tensor>& ws,
                            const std::vector<c10::optional<at::Tensor>>& scales, const std::vector<c10::optional<at::Tensor>>& bs,
                            const std::vector<Lora>& loras, int64_t lora_add, const at::Tensor& norm_w, double eps,
                            int64_t max_rows) {
  TORCH_CHECK(ws.size() == 4 && scales.size() == 4 && bs.size() == 4 && loras.size() == 4 && residual.dim() == 3,
              "decode_block_mlp: residual (B, 1, d), 4 weights and 4 adapter sets (o, gate, up, down)");
  const int64_t B = residual.size(0);
  const at::Tensor o_in = attn.reshape({B, 1, -1});
  const at::Tensor y = residual + add_lora(base_linear(o_in, ws[0], scales[0], bs[0], max_rows), o_in, loras[0], lora_add);
  const std::vector<at::Tensor> gate_up = projections(rms_norm(y, norm_w, eps), {ws[1], ws[2]}, {scales[1], scales[2]},
                                                      {bs[1], bs[2]}, {loras[1], loras[2]}, lora_add, max_rows);
  const at::Tensor down_in = at::silu(gate_up[0]) * gate_up[1];
  return y + add_lora(base_linear(down_in, ws[3], scales[3], bs[3], max_rows), down_in, loras[3], lora_add);
}

// rows[b, h, column, :] = x[b, 0, h, :] for every row b and kv head h: RowsKV's in-place column write. x: (B, 1, Hkv, D)
// as decode_block_qkv returns k and v (contiguous); rows: (B, Hkv, Lcap, D) with a contiguous head dim. A plain copy of
// B * Hkv runs of D floats: the same values as ATen's copy_ of the transposed view, without its TensorIterator set-up
// (60 calls a step; whole decode_stack call, 2 threads, 80 rounds alternating: B1 fp32 10.44 vs 10.78 ms, int8 4.85 vs
// 4.93, B16 unchanged).
static void write_column(const at::Tensor& rows, const at::Tensor& x, int64_t column) {
  const int64_t B = x.size(0), H = x.size(2), D = x.size(3);
  TORCH_CHECK(rows.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && x.is_contiguous() && rows.dim() == 4 &&
                  rows.size(0) == B && rows.size(1) == H && rows.size(3) == D && rows.stride(3) == 1,
              "decode_stack: KV buffers (B, Hkv, L, D) float32 with a contiguous head dim, for k/v ", x.sizes());
  const float* src = x.data_ptr<float>();
  float* dst = rows.data_ptr<float>() + column * rows.stride(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) std::memcpy(dst + b * rows.stride(0) + h * rows.stride(1), src + (b * H + h) * D, D * sizeof(float));
}

// One decode step through a Llama-code model's decoder layers (decode_stack.py): per layer, what the lean layer
// forward does on its block path, in one call, so no Python runs between layers (measured: ~170 us a layer of
// Python between the kernels of a B1 step, cold in cache after each layer's weights stream through):
//     q, k, v = decode_block_qkv(hidden, ...)                          # (B, 1, H, D) each
//     buf_k[i][:B, :, end] = k; buf_v[i][:B, :, end] = v              # RowsKV's in-place column write
//     out = decode_attention(q, buf_k[i][:B, :, start:end+1], ...)    # the live window, new column included
//     hidden = decode_block_mlp(hidden, out, ...)
// The same functions on the same tensors as the lean forward: bit-equal to it. The caller moves the cache's window
// end one column on (RowsKV.advance) after the call.
using Norm = std::tuple<at::Tensor, double>;
using Projections = std::tuple<std::vector<at::Tensor>, std::vector<c10::optional<at::Tensor>>,
                               std::vector<c10::optional<at::Tensor>>, std::vector<Lora>, int64_t>;
using LayerPlan = std::tuple<Norm, Projections, Norm, Projections>;  // decode_layers._block_plan's tuple

at::Tensor decode_stack(at::Tensor hidden, const std::vector<LayerPlan>& plans, const std::vector<at::Tensor>& buf_k,
                        const std::vector<at::Tensor>& buf_v, int64_t start, int64_t end,
                        const c10::optional<at::Tensor>& mask, const at::Tensor& cos, const at::Tensor& sin,
                        const std::vector<int64_t>& head_dims, const std::vector<double>& scalings, int64_t max_rows) {
  const size_t n = plans.size();
  TORCH_CHECK(buf_k.size() == n && buf_v.size() == n && head_dims.size() == n && scalings.size() == n,
              "decode_stack: one KV buffer pair, head dim and scaling per layer plan");
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1, "decode_stack: hidden (B, 1, d)");
  const int64_t B = hidden.size(0);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(buf_k[i].dim() == 4 && buf_v[i].dim() == 4 && buf_k[i].size(0) >= B && buf_v[i].size(0) >= B &&
                    0 <= start && start <= end && end < buf_k[i].size(2) && end < buf_v[i].size(2),
                "decode_stack: layer ", i, "'s KV buffers have no column ", end, " for ", B, " rows");
    const auto& [norm1, qkv, norm2, rest] = plans[i];
    const auto& [ws1, sc1, bs1, lo1, add1] = qkv;
    const std::vector<at::Tensor> q_k_v = decode_block_qkv(hidden, std::get<0>(norm1), std::get<1>(norm1), ws1, sc1, bs1,
                                                           lo1, add1, cos, sin, head_dims[i], max_rows);
    const at::Tensor k_rows = buf_k[i].narrow(0, 0, B), v_rows = buf_v[i].narrow(0, 0, B);  // (B, Hkv, Lcap, D)
    write_column(k_rows, q_k_v[1], end);
    write_column(v_rows, q_k_v[2], end);
    const at::Tensor out = decode_attention(q_k_v[0].transpose(1, 2), k_rows.narrow(2, start, end + 1 - start),
                                            v_rows.narrow(2, start, end + 1 - start), mask, scalings[i]);  // (B, 1, Hq, D)
    const auto& [ws2, sc2, bs2, lo2, add2] = rest;
    hidden = decode_block_mlp(hidden, out, ws2, sc2, bs2, lo2, add2, std::get<0>(norm2), std::get<1>(norm2), max_rows);
  }
  return hidden;
}

int64_t lanes() { return L; }

// float32's one-row tile shape for this process (dense_kernel.py measures both at start-up); results are the same bits
void set_one_row_shape(bool two_row_tiles) { g_two_row_tiles.store(two_row_tiles, std::memory_order_relaxed); }
bool one_row_shape() { return g_two_row_tiles.load(std::memory_order_relaxed); }

// The calls that stream weights run without the GIL (their arguments are converted before and the result after):
// a decode step is ~5-15 ms inside decode_stack, during which the server's event loop thread can send the previous
// token and read new requests instead of waiting for the step to end. Nothing inside touches a Python object.
// The small per-layer helpers (norm, rotary, attention) keep it: releasing and taking it back costs more there.
using without_gil = pybind11::call_guard<pybind11::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_linear", &decode_linear, "F.linear(x, W, b); the streaming kernel for at most max_rows rows of x", without_gil());
  m.def("decode_linear_group", &decode_linear_group, "[F.linear(x, W, b) for each (W, b)], one kernel call for all", without_gil());
  m.def("int8_linear", &int8_linear, "F.linear(x, q * scale[:, None], b) for int8 q; the kernel for at most max_rows rows", without_gil());
  m.def("rms_norm", &rms_norm, "w * (x * rsqrt(mean(x^2, -1) + eps)), transformers' LlamaRMSNorm in one call");
  m.def("decode_attention", &decode_attention, "softmax(q k^T * scale + mask) v for one query token per row (GQA)");
  m.def("decode_rotary", &decode_rotary, "transformers' apply_rotary_pos_emb for one token per row: (q_embed, k_embed)");
  m.def("decode_block_qkv", &decode_block_qkv, "rms_norm, the q/k/v projections and rotary of a decoder layer for one token per row", without_gil());
  m.def("decode_block_mlp", &decode_block_mlp, "residual + o_proj, rms_norm, the SiLU MLP and its residual for one token per row", without_gil());
  m.def("decode_stack", &decode_stack, "a decode step through every decoder layer: block calls, KV column writes, attention", without_gil());
  m.def("set_one_row_shape", &set_one_row_shape, "float32 one-row tiles: False 8 rows, True 2 rows prefetching the next");
  m.def("one_row_shape", &one_row_shape, "the float32 one-row shape set_one_row_shape chose (False: 8-row tiles)");
  m.def("lanes", &lanes, "vector width in floats of this build (8: AVX2, 16: AVX-512)");
}
