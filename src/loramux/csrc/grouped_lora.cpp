// Grouped LoRA for CPU decode steps: one call per wrapped layer adds every group's delta.
//
// Semantics (ops.py's reference loop, for the plain-LoRA groups of one layer):
//
//     for each group g, for each token t in tokens[starts[g]:ends[g]]:   # x: (N, d_in), y: (N, d_out)
//         h = A[g] @ x[t]            # (r_g,)      A[g]: (r_g, d_in), contiguous
//         y[t] += h @ B_t[g]         # (d_out,)    B_t[g]: (r_g, d_out), contiguous, pre-scaled
//
// Why: a decode step has a few tokens per adapter, so each group is two tiny matmuls. Through
// torch each costs a dispatch and an MKL call tuned for large shapes (measured ~6-12 GB/s on
// these shapes); here one call streams every group's A and B once, split over torch's OpenMP
// threads by (group, rank rows) and (group, column block).
//
// Every output element is computed by exactly one task, in a fixed order (A rows: 16-float
// lanes then a fixed tree; B rows in rank order), so a token's result does not depend on the
// other tokens of the call, on the number of threads, or on how groups are split: the engine's
// "same tokens mixed as alone" guarantee holds bit for bit.
#include <c10/core/InferenceMode.h>
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang vector type: AVX on x86, 2x NEON on ARM

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// x[i] . a over n floats for N tokens at once, each in one fixed order (two 8-lane accumulators, a fixed
// reduction tree, the tail): token i's result is the same for every N. N tokens share each load of a and
// give the core 2N independent FMA chains: one token's two chains left the FMA units waiting on their
// latency (the shrink ran at ~6 GB/s of A with 4 tokens per adapter).
template <int N>
inline void dots(const float* const* x, const float* a, int64_t n, float* out) {
  v8 acc0[N], acc1[N];
  for (int i = 0; i < N; ++i) acc0[i] = acc1[i] = v8{0};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const v8 a0 = load8(a + k), a1 = load8(a + k + 8);
    for (int i = 0; i < N; ++i) {
      acc0[i] += load8(x[i] + k) * a0;
      acc1[i] += load8(x[i] + k + 8) * a1;
    }
  }
  for (; k + 8 <= n; k += 8) {
    const v8 a0 = load8(a + k);
    for (int i = 0; i < N; ++i) acc0[i] += load8(x[i] + k) * a0;
  }
  for (int i = 0; i < N; ++i) {
    const v8 s8 = acc0[i] + acc1[i];
    float s = ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7]));
    for (int64_t t = k; t < n; ++t) s += x[i][t] * a[t];
    out[i] = s;
  }
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// y[q][lo:hi] = (((y[q] + h[q][j] B0) + h[q][j+1] B1) + h[q][j+2] B2) + h[q][j+3] B3 for N tokens q, B0..B3 the
// rank rows j..j+3 of B_t: each 8 columns of B are loaded once for the N tokens (one token per pass read
// them N times); per element the same operations in the same order as for one token alone.
// ``ahead``: the next four rows (same columns), a cache line of each fetched every 16 columns while these are
// read, for 2+ tokens (B arrays are small, 18-400 KB, so the hardware prefetcher barely starts on each; measured
// on a B16 step's 210 layers, 1 thread: 10.9-11.7 vs 11.8-12.6 ms; with one token the extra instructions cost
// more than the wait, and prefetching A in the shrink did not pay either).
template <int N>
inline void expand4(float* const* y, const float* const* h, int64_t j, const float* const* b, int64_t lo, int64_t hi,
                    const float* const* ahead) {
  float h0[N], h1[N], h2[N], h3[N];
  for (int q = 0; q < N; ++q) h0[q] = h[q][j], h1[q] = h[q][j + 1], h2[q] = h[q][j + 2], h3[q] = h[q][j + 3];
  int64_t c = lo;
  for (; c + 8 <= hi; c += 8) {
    if (N > 1 && ((c - lo) & 15) == 0)
      for (int row = 0; row < 4; ++row) __builtin_prefetch(ahead[row] + c, 0, 3);
    const v8 b0 = load8(b[0] + c), b1 = load8(b[1] + c), b2 = load8(b[2] + c), b3 = load8(b[3] + c);
    for (int q = 0; q < N; ++q)
      store8(y[q] + c, (((load8(y[q] + c) + h0[q] * b0) + h1[q] * b1) + h2[q] * b2) + h3[q] * b3);
  }
  for (; c < hi; ++c)
    for (int q = 0; q < N; ++q) y[q][c] = (((y[q][c] + h0[q] * b[0][c]) + h1[q] * b[1][c]) + h2[q] * b[2][c]) + h3[q] * b[3][c];
}

struct Task {
  int64_t group, lo, hi;  // shrink: rank rows [lo, hi); expand: output columns [lo, hi)
};

// What both entry points take: one (start, end, A, B_t) per group, x (N, d_in) and y (N, d_out) float32, y
// contiguous (written in place). Returns the group count.
int64_t check_call(const char* who, const at::Tensor& y, const at::Tensor& x, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& ends, const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B_t) {
  const int64_t G = static_cast<int64_t>(A.size());
  TORCH_CHECK(static_cast<int64_t>(B_t.size()) == G && static_cast<int64_t>(starts.size()) == G &&
                  static_cast<int64_t>(ends.size()) == G,
              who, ": A, B_t, starts and ends must have one entry per group");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), who, ": x (N, d_in), y (N, d_out)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && y.is_contiguous(),
              who, ": x and y must be float32, y contiguous");
  return G;
}

}  // namespace

// grouped_lora_add on rows given as raw float32 arrays: y (N, d_out) and x (N, d_in), both contiguous. The decode
// stack's entry (decode_gemm.cpp calls it by address between its matmuls): it has y and x as pointers already, and
// making tensors of them (a view and a reshape a projection) cost ~2 us each there, 210 projections a step.
void grouped_lora_add_raw(float* yp, const float* xp, int64_t N, int64_t d_in, int64_t d_out, const at::Tensor& tokens,
                          const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, const std::vector<at::Tensor>& A,
                          const std::vector<at::Tensor>& B_t) {
  const int64_t G = static_cast<int64_t>(A.size());
  TORCH_CHECK(static_cast<int64_t>(B_t.size()) == G && static_cast<int64_t>(starts.size()) == G &&
                  static_cast<int64_t>(ends.size()) == G,
              "grouped_lora_add: A, B_t, starts and ends must have one entry per group");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(), "grouped_lora_add: tokens must be int64");
  const int64_t* tp = tokens.data_ptr<int64_t>();

  std::vector<const float*> a_ptr(G), b_ptr(G);
  std::vector<int64_t> rank(G), h_off(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    rank[g] = A[g].size(0);
    TORCH_CHECK(A[g].scalar_type() == at::kFloat && A[g].is_contiguous() && A[g].dim() == 2 && A[g].size(1) == d_in,
                "grouped_lora_add: A[", g, "] must be contiguous float32 (r, ", d_in, ")");
    TORCH_CHECK(B_t[g].scalar_type() == at::kFloat && B_t[g].is_contiguous() && B_t[g].dim() == 2 &&
                    B_t[g].size(0) == rank[g] && B_t[g].size(1) == d_out,
                "grouped_lora_add: B_t[", g, "] must be contiguous float32 (", rank[g], ", ", d_out, ")");
    TORCH_CHECK(0 <= starts[g] && starts[g] <= ends[g] && ends[g] <= tokens.numel(), "grouped_lora_add: bad token range");
    for (int64_t i = starts[g]; i < ends[g]; ++i) TORCH_CHECK(0 <= tp[i] && tp[i] < N, "grouped_lora_add: token out of range");
    a_ptr[g] = A[g].data_ptr<float>();
    b_ptr[g] = B_t[g].data_ptr<float>();
    h_off[g + 1] = h_off[g] + (ends[g] - starts[g]) * rank[g];
  }
  std::vector<float> h(h_off[G]);  // h_g: (m_g, r_g) per group, back to back

  // Tasks of roughly equal bytes: 8 rows of A (8 x d_in floats); ~16K floats of B_t.
  std::vector<Task> shrink, expand;
  for (int64_t g = 0; g < G; ++g) {
    if (ends[g] == starts[g]) continue;
    for (int64_t j = 0; j < rank[g]; j += 8) shrink.push_back({g, j, std::min(rank[g], j + 8)});
    const int64_t cols = std::max<int64_t>(64, (16384 / std::max<int64_t>(rank[g], 1)) / 8 * 8);
    for (int64_t c = 0; c < d_out; c += cols) expand.push_back({g, c, std::min(d_out, c + cols)});
  }
  const int64_t n_shrink = static_cast<int64_t>(shrink.size()), n_expand = static_cast<int64_t>(expand.size());
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_expand)));

#pragma omp parallel num_threads(threads)
  {
    // shrink: h_g[i, j] = A[g][j] . x[token i]; each row of A is read once for all the group's tokens
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_shrink; ++t) {
      const Task& task = shrink[t];
      const int64_t g = task.group, r = rank[g], m = ends[g] - starts[g];
      float* hg = h.data() + h_off[g];
      for (int64_t j = task.lo; j < task.hi; ++j) {
        const float* aj = a_ptr[g] + j * d_in;
        for (int64_t i = 0; i < m;) {
          const float* xs[4];
          float out[4];
          const int n = static_cast<int>(std::min<int64_t>(4, m - i));
          for (int q = 0; q < n; ++q) xs[q] = xp + tp[starts[g] + i + q] * d_in;
          switch (n) {
            case 4: dots<4>(xs, aj, d_in, out); break;
            case 3: dots<3>(xs, aj, d_in, out); break;
            case 2: dots<2>(xs, aj, d_in, out); break;
            default: dots<1>(xs, aj, d_in, out);
          }
          for (int q = 0; q < n; ++q) hg[(i + q) * r + j] = out[q];
          i += n;
        }
      }
    }  // implicit barrier: every h is complete before any expand task reads it

    // expand: y[token i, lo:hi] += sum_j h_g[i, j] * B_t[g][j, lo:hi], j in rank order, four rows per pass
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_expand; ++t) {
      const Task& task = expand[t];
      const int64_t g = task.group, r = rank[g], m = ends[g] - starts[g];
      const float* b = b_ptr[g];
      for (int64_t i = 0; i < m;) {
        const int n = static_cast<int>(std::min<int64_t>(4, m - i));  // tokens sharing each load of B
        float* ys[4];
        const float* hs[4];
        for (int q = 0; q < n; ++q) {
          ys[q] = yp + tp[starts[g] + i + q] * d_out;
          hs[q] = h.data() + h_off[g] + (i + q) * r;
        }
        int64_t j = 0;
        for (; j + 4 <= r; j += 4) {
          const float* b0 = b + j * d_out;
          const float* rows[4] = {b0, b0 + d_out, b0 + 2 * d_out, b0 + 3 * d_out};
          const float* next = j + 8 <= r ? b0 + 4 * d_out : b0;
          const float* ahead[4] = {next, next + d_out, next + 2 * d_out, next + 3 * d_out};
          switch (n) {
            case 4: expand4<4>(ys, hs, j, rows, task.lo, task.hi, ahead); break;
            case 3: expand4<3>(ys, hs, j, rows, task.lo, task.hi, ahead); break;
            case 2: expand4<2>(ys, hs, j, rows, task.lo, task.hi, ahead); break;
            default: expand4<1>(ys, hs, j, rows, task.lo, task.hi, ahead);
          }
        }
        for (; j < r; ++j) {
          const float* bj = b + j * d_out;
          for (int q = 0; q < n; ++q) {
            const float hj = hs[q][j];
            float* yq = ys[q];
            for (int64_t c = task.lo; c < task.hi; ++c) yq[c] += hj * bj[c];
          }
        }
        i += n;
      }
    }
  }
}

void grouped_lora_add(at::Tensor y, const at::Tensor& x, const at::Tensor& tokens, const std::vector<int64_t>& starts,
                      const std::vector<int64_t>& ends, const std::vector<at::Tensor>& A,
                      const std::vector<at::Tensor>& B_t) {
  check_call("grouped_lora_add", y, x, starts, ends, A, B_t);
  TORCH_CHECK(x.is_contiguous(), "grouped_lora_add: x must be contiguous");
  grouped_lora_add_raw(y.data_ptr<float>(), x.data_ptr<float>(), x.size(0), x.size(1), y.size(1), tokens, starts, ends, A, B_t);
}

// Prefill: groups of many tokens each (a group = one adapter's rows, contiguous in the flat (N, d) views), where
// MKL's large-shape kernels beat the loops above. Through torch the groups run one after another and every
// (128 x 576) @ (576 x r) call is split over the threads, which at rank 8-64 mostly costs the threads'
// fork and join (2 threads: ~1.5x slower than giving each thread whole groups, default model's shapes).
// Here the groups (halved until none costs more than a thread's share) are spread over the threads,
// largest first, and each task makes torch's own two calls for its rows: h = x[t0:t1] @ A.T, then
// y[t0:t1] += h @ B_t; inside the parallel region ATen and MKL run single-threaded. The same calls as
// ops.py's torch path, so the same bits where MKL's result for a row does not depend on the call's row
// count (tests compare the two with torch.equal).
void grouped_lora_add_rows(at::Tensor y, const at::Tensor& x, const std::vector<int64_t>& starts,
                           const std::vector<int64_t>& ends, const std::vector<at::Tensor>& A,
                           const std::vector<at::Tensor>& B_t) {
  const int64_t G = check_call("grouped_lora_add_rows", y, x, starts, ends, A, B_t);
  const int64_t d_in = x.size(1), d_out = y.size(1), N = x.size(0);
  struct Rows {
    int64_t group, t0, t1;
  };
  std::vector<Rows> tasks;
  double total = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(A[g].scalar_type() == at::kFloat && A[g].dim() == 2 && A[g].size(1) == d_in,
                "grouped_lora_add_rows: A[", g, "] must be float32 (r, ", d_in, ")");
    TORCH_CHECK(B_t[g].scalar_type() == at::kFloat && B_t[g].dim() == 2 && B_t[g].size(0) == A[g].size(0) &&
                    B_t[g].size(1) == d_out,
                "grouped_lora_add_rows: B_t[", g, "] must be float32 (", A[g].size(0), ", ", d_out, ")");
    TORCH_CHECK(0 <= starts[g] && starts[g] <= ends[g] && ends[g] <= N, "grouped_lora_add_rows: bad token range");
    if (ends[g] > starts[g]) tasks.push_back({g, starts[g], ends[g]});
  }
  const int threads = std::max(1, at::get_num_threads());
  auto rank_cost = [&](const Rows& t) { return double(t.t1 - t.t0) * double(A[t.group].size(0) * (d_in + d_out)); };
  for (const Rows& t : tasks) total += rank_cost(t);
  // halve the costliest task while it exceeds a thread's share and both halves keep >= 64 rows (MKL's
  // efficiency falls off below that: 64-row pieces measured 1.25x slower than 128-row groups)
  for (bool split = true; split;) {
    split = false;
    auto big = std::max_element(tasks.begin(), tasks.end(), [&](const Rows& a, const Rows& b) { return rank_cost(a) < rank_cost(b); });
    if (big != tasks.end() && rank_cost(*big) > total / threads && big->t1 - big->t0 >= 128) {
      const Rows half{big->group, big->t0 + (big->t1 - big->t0) / 2, big->t1};
      big->t1 = half.t0;
      tasks.push_back(half);
      split = true;
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Rows& a, const Rows& b) { return rank_cost(a) > rank_cost(b); });
  const bool inference = y.is_inference();
  std::exception_ptr failure = nullptr;  // an exception must not leave an OpenMP region: kept, rethrown after it
#pragma omp parallel num_threads(std::min<int>(threads, static_cast<int>(tasks.size())))
  {
    c10::InferenceMode mode(inference);  // per thread: in-place adds to inference tensors need it
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < tasks.size(); ++i) {
      try {
        const Rows& t = tasks[i];
        // (t1 - t0, d_in) @ (d_in, r) -> (t1 - t0, r); (t1 - t0, d_out) += that @ (r, d_out)
        y.narrow(0, t.t0, t.t1 - t.t0).addmm_(at::mm(x.narrow(0, t.t0, t.t1 - t.t0), A[t.group].t()), B_t[t.group]);
      } catch (...) {
#pragma omp critical
        if (!failure) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

// The address of grouped_lora_add_raw, for the decode GEMM extension's layer-block calls (decode_gemm.cpp), which add
// adapters between their matmuls through the code grouped_lora_add runs: the same compiled code, so the same bits.
int64_t grouped_lora_add_raw_address() { return reinterpret_cast<int64_t>(&grouped_lora_add_raw); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_lora_add", &grouped_lora_add, "y[tokens of g] += (x @ A[g].T) @ B_t[g] for every group g, in place",
        pybind11::call_guard<pybind11::gil_scoped_release>());  // streams adapters; touches no Python object
  m.def("grouped_lora_add_rows", &grouped_lora_add_rows,
        "y[starts[g]:ends[g]] += (x[starts[g]:ends[g]] @ A[g].T) @ B_t[g], groups spread over the threads (prefill)");
  m.def("grouped_lora_add_raw_address", &grouped_lora_add_raw_address,
        "the address of grouped_lora_add on raw rows (for decode_gemm's block calls)");
}
