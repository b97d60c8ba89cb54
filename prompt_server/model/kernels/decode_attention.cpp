// Decode attention on the CPU in float32: one new query per head and row against the row's cached keys and values,
// for grouped-query models (G query heads share each KV head). Built at start by prompt_server/model/native.py.
//
// One task per (row, KV head): the G queries' scores against every cached column the row's mask keeps (columns the
// mask drops are never read), a softmax per query, then the weighted sum of the kept values. Each cached key and
// value is read once for all G queries, where the batched products of torch's own path run a tiny matrix product
// per (row, KV head) at about half of memory speed. The vectors are GCC/Clang vector extensions, so the same source
// builds for AVX2 and for any other target; the sums run in float32 like transformers' eager attention.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));

inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp(x) for the shifted scores of a softmax (x <= 0; exp(-inf) = 0): Cephes' single-precision expf, whose
// polynomial is accurate to about 1 ulp on the reduced range.
inline v8 vexp(v8 x) {
  const v8 lo = splat(-87.33654f);
  const i8 under = x < lo;
  x = x < lo ? lo : x;
  const v8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v8 n = __builtin_convertvector(__builtin_convertvector(fx, i8), v8);
  n = n > fx ? n - splat(1.f) : n;  // floor(fx)
  x = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  const v8 z = x * x;
  v8 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * z + x + splat(1.f);
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;  // 2^n
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return under ? splat(0.f) : y * scale;
}

// scores[g * W + w] -> exp(score - max) in place; -> 1 / sum, per query g.
void softmax_rows(float* scores, int64_t G, int64_t W, float* inv) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * W;
    float mx = -INFINITY;
    for (int64_t w = 0; w < W; ++w) mx = s[w] > mx ? s[w] : mx;
    v8 sum = splat(0.f);
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) {
      const v8 e = vexp(load(s + w) - splat(mx));
      store(s + w, e);
      sum += e;
    }
    if (w < W) {
      float tail[8];
      for (int j = 0; j < 8; ++j) tail[j] = w + j < W ? s[w + j] : -INFINITY;
      const v8 e = vexp(load(tail) - splat(mx));
      for (int64_t j = w; j < W; ++j) s[j] = e[j - w];
      sum += e;
    }
    inv[g] = 1.f / hsum(sum);
  }
}

// How many columns ahead of the one being read to prefetch (2 KiB at head size 64). The keys, then the values, then
// the next task's keys are one stream of prefetches, so that none starts cold: measured on an AVX2 EPYC, the kernel
// went from 1.18-1.27x to 1.05-1.15x the time `sum` takes to read the same keys and values (4-12 columns ahead
// measured alike).
constexpr int64_t AHEAD = 8;

// Column `col` of the [*, D] block at p, which may lie past the block's end (prefetches never fault; the address is
// computed as an integer, not as a pointer past its object).
template <int D>
inline void prefetch_column(const float* p, int64_t col) {
  constexpr std::uintptr_t bytes = D * sizeof(float);
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(col) * bytes;
  for (std::uintptr_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + b), 0, 0);
}

// One (row, KV head) with G and D known at compile time: the accumulators stay in registers.
template <int G, int D>
void attend_fixed(const float* q, const float* k, const float* v, const bool* keep, int64_t W, float scale,
                  float* out, float* scores, const float* next) {
  constexpr int C = D / 8;
  for (int64_t w = 0; w < W; ++w) {
    if (w + AHEAD < W) prefetch_column<D>(k, w + AHEAD);
    else prefetch_column<D>(v, w + AHEAD - W);
    if (!keep[w]) {
      for (int g = 0; g < G; ++g) scores[g * W + w] = -INFINITY;
      continue;
    }
    const float* kr = k + w * D;
    v8 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = splat(0.f);
    for (int c = 0; c < C; ++c) {
      const v8 kc = load(kr + 8 * c);
      for (int g = 0; g < G; ++g) acc[g] += load(q + g * D + 8 * c) * kc;
    }
    for (int g = 0; g < G; ++g) scores[g * W + w] = hsum(acc[g]) * scale;
  }
  float inv[G];
  softmax_rows(scores, G, W, inv);
  // the output in chunks of N vectors per query, so that G x N accumulators fit in the registers
  constexpr int N = 12 / G >= C ? C : (12 / G >= 4 ? 4 : (12 / G >= 2 ? 2 : 1));
  static_assert(C % N == 0, "chunks must tile the head");
  constexpr int64_t BW = 32;  // columns per block: the block's values stay in L1 across the passes
  for (int64_t w0 = 0; w0 < W; w0 += BW) {
    const int64_t w1 = w0 + BW < W ? w0 + BW : W;
    for (int c0 = 0; c0 < C; c0 += N) {
      v8 acc[G][N];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < N; ++c) acc[g][c] = w0 ? load(out + g * D + 8 * (c0 + c)) : splat(0.f);
      for (int64_t w = w0; w < w1; ++w) {
        if (c0 == 0) {
          if (w + AHEAD < W) prefetch_column<D>(v, w + AHEAD);
          else if (next != nullptr) prefetch_column<D>(next, w + AHEAD - W);
        }
        if (!keep[w]) continue;
        const float* vr = v + w * D + 8 * c0;
        for (int c = 0; c < N; ++c) {
          const v8 vc = load(vr + 8 * c);
          for (int g = 0; g < G; ++g) acc[g][c] += splat(scores[g * W + w]) * vc;
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < N; ++c) store(out + g * D + 8 * (c0 + c), acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) store(out + g * D + 8 * c, load(out + g * D + 8 * c) * splat(inv[g]));
}

// Any G and any D that is a multiple of 8.
void attend_any(const float* q, const float* k, const float* v, const bool* keep, int64_t W, float scale,
                float* out, float* scores, int64_t G, int64_t D) {
  const int64_t C = D / 8;
  for (int64_t w = 0; w < W; ++w) {
    const float* kr = k + w * D;
    for (int64_t g = 0; g < G; ++g) {
      if (!keep[w]) {
        scores[g * W + w] = -INFINITY;
        continue;
      }
      v8 acc = splat(0.f);
      for (int64_t c = 0; c < C; ++c) acc += load(q + g * D + 8 * c) * load(kr + 8 * c);
      scores[g * W + w] = hsum(acc) * scale;
    }
  }
  std::vector<float> inv(G);
  softmax_rows(scores, G, W, inv.data());
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      v8 acc = splat(0.f);
      for (int64_t w = 0; w < W; ++w)
        if (keep[w]) acc += splat(scores[g * W + w]) * load(v + w * D + 8 * c);
      store(out + g * D + 8 * c, acc * splat(inv[g]));
    }
  }
}

using Fixed = void (*)(const float*, const float*, const float*, const bool*, int64_t, float, float*, float*,
                       const float*);

Fixed fixed_for(int64_t G, int64_t D) {
#define PS_FIXED(g, d) if (G == g && D == d) return attend_fixed<g, d>;
  PS_FIXED(1, 64) PS_FIXED(2, 64) PS_FIXED(3, 64) PS_FIXED(4, 64) PS_FIXED(5, 64) PS_FIXED(6, 64) PS_FIXED(8, 64)
  PS_FIXED(1, 128) PS_FIXED(2, 128) PS_FIXED(3, 128) PS_FIXED(4, 128) PS_FIXED(5, 128) PS_FIXED(6, 128)
  PS_FIXED(7, 128) PS_FIXED(8, 128)
#undef PS_FIXED
  return nullptr;
}

// q [n, KV, G, D] (row order); keys, values [slots, KV, capacity, D], each head's [capacity, D] contiguous;
// rows [n] the rows' slots; keep [slots', W] with unit column stride: which of columns start..start+W-1 each slot
// attends. -> [n, KV, G, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& rows, const at::Tensor& keep, int64_t start, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.scalar_type() == at::kFloat, "q: contiguous float32 [n, KV, G, D]");
  const int64_t n = q.size(0), KV = q.size(1), G = q.size(2), D = q.size(3), W = keep.size(1);
  TORCH_CHECK(D % 8 == 0, "head size must be a multiple of 8");
  for (const at::Tensor* t : {&keys, &values}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->size(1) == KV && t->size(3) == D &&
                    t->stride(3) == 1 && t->stride(2) == D && start >= 0 && start + W <= t->size(2),
                "keys/values: float32 [slots, KV, capacity, D] covering the columns");
  }
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == n && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows: long [n]");
  TORCH_CHECK(keep.dim() == 2 && keep.scalar_type() == at::kBool && keep.stride(1) == 1, "keep: bool [slots, W]");
  auto out = at::empty_like(q);
  const int64_t* slot = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < keep.size(0) && slot[i] < keys.size(0) && slot[i] < values.size(0),
                "rows: slot out of range");
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const bool* mp = keep.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), vs0 = values.stride(0), vs1 = values.stride(1);
  const int64_t ms0 = keep.stride(0);
  const float sc = static_cast<float>(scale);
  const Fixed fixed = fixed_for(G, D);
  at::parallel_for(0, n * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t / KV], h = t % KV;
      const float* qt = qp + t * G * D;
      const float* kt = kp + s * ks0 + h * ks1 + start * D;
      const float* vt = vp + s * vs0 + h * vs1 + start * D;
      const bool* keep_row = mp + s * ms0;
      float* ot = op + t * G * D;
      if (fixed != nullptr) {
        const float* next = nullptr;
        if (t + 1 < end) next = kp + slot[(t + 1) / KV] * ks0 + ((t + 1) % KV) * ks1 + start * D;
        fixed(qt, kt, vt, keep_row, W, sc, ot, scores.data(), next);
      } else {
        attend_any(qt, kt, vt, keep_row, W, sc, ot, scores.data(), G, D);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(prompt_server_native, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor rows, Tensor keep, int start, float scale) "
        "-> Tensor",
        decode_attention);
}
