// A projection of a few rows on the CPU in float32: y[M, N] = x[M, K] . w[N, K]^T (+ bias), for the few tokens of a
// decode step at low concurrency or a short prefill. Built with decode_attention.cpp by prompt_server/model/native.py.
//
// With few rows a projection is a read of its weight: each weight element meets M rows of x. MKL's products run
// these shapes at about half of memory speed (the default model's 30 layers at 1-8 rows: 50-82 ms on an AVX2 EPYC,
// against about 30 ms to read their weights). Here each task takes 3 consecutive output rows of w, keeps them in
// L1 while 4 rows of x at a time meet them (12 accumulators, 3 weight and 1 input vector: AVX2's 16 registers),
// and prefetches the weight rows ahead, so the weights stream from memory once. Sums run in float32 in 8 lanes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

constexpr int TILE = 3;  // output rows per task
constexpr int ROWS = 4;  // input rows per pass over a tile
// How far ahead of the weight rows being read to prefetch, in bytes: a few tiles ahead, so the next tiles' rows
// arrive while this one is summed (measured: 8-16 KiB ahead doubled the speed at 4-16 rows).
constexpr std::uintptr_t AHEAD = 16384;

// y[m0 .. m0+MB, o0 .. o0+NT] for MB input rows and NT output rows.
template <int MB, int NT>
inline void block(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N, int64_t m0,
                  int64_t o0) {
  v8 acc[MB][NT];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = v8{0, 0, 0, 0, 0, 0, 0, 0};
  const float* wr[NT];
  for (int j = 0; j < NT; ++j) wr[j] = w + (o0 + j) * K;
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = x + (m0 + i) * K;
  for (int64_t k = 0; k < K; k += 8) {
    if ((k & 15) == 0)  // one prefetch per 64-byte line of each weight row (prefetches never fault)
      for (int j = 0; j < NT; ++j)
        __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(wr[j] + k) + AHEAD), 0, 0);
    v8 wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = load(wr[j] + k);
    for (int i = 0; i < MB; ++i) {
      const v8 xv = load(xr[i] + k);
      for (int j = 0; j < NT; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NT; ++j) y[(m0 + i) * N + o0 + j] = hsum(acc[i][j]) + (bias ? bias[o0 + j] : 0.f);
}

// Output rows o0 .. o0+NT for every input row.
template <int NT>
void outputs(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N,
             int64_t o0) {
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS) block<ROWS, NT>(x, w, bias, y, K, N, m, o0);
  switch (M - m) {
    case 3: block<3, NT>(x, w, bias, y, K, N, m, o0); break;
    case 2: block<2, NT>(x, w, bias, y, K, N, m, o0); break;
    case 1: block<1, NT>(x, w, bias, y, K, N, m, o0); break;
    default: break;
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear: x and w must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "linear: x and w must be float32");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear: x must be [M, K] and w [N, K], got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear: x and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "linear: x has ", K, " columns but w has ", w.size(1));
  TORCH_CHECK(K % 8 == 0, "linear: the inner size must be a multiple of 8, not ", K);
  const float* bp = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == N &&
                    b.is_contiguous(),
                "linear: bias must be a contiguous float32 [", N, "] on the CPU, got ", b.sizes());
    bp = b.data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = N / TILE;
  at::parallel_for(0, tiles, 8, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) outputs<TILE>(xp, wp, bp, yp, M, K, N, t * TILE);
  });
  for (int64_t o = tiles * TILE; o < N; ++o) outputs<1>(xp, wp, bp, yp, M, K, N, o);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prompt_server_native, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor", linear);
}
