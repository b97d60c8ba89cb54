// Decode attention on the CPU in float32: one new query per head and row against the row's cached keys and values,
// for grouped-query models (G query heads share each KV head). Built at start by prompt_server/model/native.py.
//
// One task per (row, KV head): the G queries' scores against every cached column the row's mask keeps (columns the
// mask drops are never read), a softmax per query, then the weighted sum of the kept values. Each cached key and
// value is read once for all G queries, where the batched products of torch's own path run a tiny matrix product
// per (row, KV head) at about half of memory speed. The vectors are GCC/Clang vector extensions, so the same source
// builds for AVX2 and for any other target; the sums run in float32 like transformers' eager attention.
//
// Shared pieces: a row's first kept columns hold copies of the keys and values in front of its tokens (its soft
// prompt's or prefix's, a cached prompt head), which rows of one adapter or one head have alike. Given the tensors
// they were copied from, the kernel reads those columns there instead: the same values in the same order (so the
// same result, bit for bit), from one place for every row that shares them, where they stay in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
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

// Where a task reads column w (0 .. W-1 of its window) from: columns [b, e) from the row's pieces, in order (the
// keys/values the row's copies were made from), every other column from the row's slot. No pieces: b = e = 0.
struct Redirect {
  int64_t b = 0, e = 0;
  int64_t count = 0;               // pieces, listed at entry[1], entry[3], ... with their columns after each
  const int64_t* entry = nullptr;  // the row's redirect entry
};

// The address of each of the task's W columns (keys or values, kv = 0 or 1), into `at`: filled once per task, so the
// loops below read through it with no branch. Integers, not pointers, so that no pointer is formed past an object.
template <typename PieceAt>
inline void column_addresses(std::uintptr_t* at, const float* slot, const Redirect& r, int64_t kv, int64_t h,
                             const PieceAt& piece_at, int64_t W, int64_t D) {
  const std::uintptr_t bytes = static_cast<std::uintptr_t>(D) * sizeof(float);
  const std::uintptr_t s = reinterpret_cast<std::uintptr_t>(slot);
  for (int64_t w = 0; w < W; ++w) at[w] = s + static_cast<std::uintptr_t>(w) * bytes;
  int64_t w = r.b;
  for (int64_t j = 0; j < r.count; ++j) {
    const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(piece_at(r.entry[1 + 2 * j], kv, h));
    const int64_t end = w + r.entry[2 + 2 * j];
    for (int64_t c = 0; w < end; ++w, ++c) at[w] = p + static_cast<std::uintptr_t>(c) * bytes;
  }
}

// How the loops below find column w: in the task's slot (every column there, as without pieces), or through the
// addresses column_addresses filled.
template <std::uintptr_t BYTES>
struct InSlot {
  std::uintptr_t base;
  std::uintptr_t operator[](int64_t w) const { return base + static_cast<std::uintptr_t>(w) * BYTES; }
};

struct Listed {
  const std::uintptr_t* at;
  std::uintptr_t operator[](int64_t w) const { return at[w]; }
};

template <typename Cols>
inline const float* column(const Cols& cols, int64_t w) { return reinterpret_cast<const float*>(cols[w]); }

// How many columns ahead of the one being read to prefetch (2 KiB at head size 64). The keys, then the values, then
// the next task's keys are one stream of prefetches, so that none starts cold: measured on an AVX2 EPYC, the kernel
// went from 1.18-1.27x to 1.05-1.15x the time `sum` takes to read the same keys and values (4-12 columns ahead
// measured alike).
constexpr int64_t AHEAD = 8;

// The column of D floats at `at`, which may lie past its block's end (prefetches never fault).
template <int D>
inline void prefetch_at(std::uintptr_t at) {
  constexpr std::uintptr_t bytes = D * sizeof(float);
  for (std::uintptr_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + b), 0, 0);
}

// One (row, KV head) with G and D known at compile time: the accumulators stay in registers. ka, va: the address of
// each column's key and value (column_addresses); next: the next task's first key column, to prefetch.
template <int G, int D, typename Cols>
void attend_fixed(const float* q, Cols ka, Cols va, const bool* keep, int64_t W, float scale, float* out,
                  float* scores, const float* next) {
  constexpr int C = D / 8;
  constexpr std::uintptr_t bytes = D * sizeof(float);
  for (int64_t w = 0; w < W; ++w) {
    if (w + AHEAD < W) prefetch_at<D>(ka[w + AHEAD]);
    else if (w + AHEAD - W < W) prefetch_at<D>(va[w + AHEAD - W]);
    if (!keep[w]) {
      for (int g = 0; g < G; ++g) scores[g * W + w] = -INFINITY;
      continue;
    }
    const float* kr = column(ka, w);
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
          if (w + AHEAD < W) prefetch_at<D>(va[w + AHEAD]);
          else if (next != nullptr) prefetch_at<D>(reinterpret_cast<std::uintptr_t>(next) +
                                                   static_cast<std::uintptr_t>(w + AHEAD - W) * bytes);
        }
        if (!keep[w]) continue;
        const float* vr = column(va, w) + 8 * c0;
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
void attend_any(const float* q, const std::uintptr_t* ka, const std::uintptr_t* va, const bool* keep, int64_t W,
                float scale, float* out, float* scores, int64_t G, int64_t D) {
  const int64_t C = D / 8;
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t g = 0; g < G; ++g) {
      if (!keep[w]) {
        scores[g * W + w] = -INFINITY;
        continue;
      }
      const float* kr = column(ka, w);
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
        if (keep[w]) acc += splat(scores[g * W + w]) * load(column(va, w) + 8 * c);
      store(out + g * D + 8 * c, acc * splat(inv[g]));
    }
  }
}

// attend_fixed for one shape: reading the slot, and reading listed columns
struct Fixed {
  void (*in_slot)(const float*, std::uintptr_t, std::uintptr_t, const bool*, int64_t, float, float*, float*,
                  const float*) = nullptr;
  void (*listed)(const float*, Listed, Listed, const bool*, int64_t, float, float*, float*, const float*) = nullptr;
};

template <int G, int D>
void attend_in_slot(const float* q, std::uintptr_t k, std::uintptr_t v, const bool* keep, int64_t W, float scale,
                    float* out, float* scores, const float* next) {
  constexpr std::uintptr_t B = D * sizeof(float);
  attend_fixed<G, D>(q, InSlot<B>{k}, InSlot<B>{v}, keep, W, scale, out, scores, next);
}

Fixed fixed_for(int64_t G, int64_t D) {
#define PS_FIXED(g, d) if (G == g && D == d) return Fixed{attend_in_slot<g, d>, attend_fixed<g, d, Listed>};
  PS_FIXED(1, 64) PS_FIXED(2, 64) PS_FIXED(3, 64) PS_FIXED(4, 64) PS_FIXED(5, 64) PS_FIXED(6, 64) PS_FIXED(8, 64)
  PS_FIXED(1, 128) PS_FIXED(2, 128) PS_FIXED(3, 128) PS_FIXED(4, 128) PS_FIXED(5, 128) PS_FIXED(6, 128)
  PS_FIXED(7, 128) PS_FIXED(8, 128)
#undef PS_FIXED
  return Fixed{};
}

// q [n, KV, G, D] (row order); keys, values [slots, KV, capacity, D], each head's [capacity, D] contiguous;
// rows [n] the rows' slots; keep [slots', W] with unit column stride: which of columns start..start+W-1 each slot
// attends. Shared pieces (optional): pieces, each [L, 2, KV, P, D] float32 with [P, D] blocks contiguous, and
// redirect [n, 1 + 2K] long per row: (the column its pieces start at, then up to K (piece index, columns), a piece
// index of -1 ending the list): the row's columns from that one on are read from those pieces' layer `layer`, in
// order, instead of from its slot (they must hold the same values: the slot's columns are copies of them).
// -> [n, KV, G, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& rows, const at::Tensor& keep, int64_t start, double scale,
                            at::TensorList pieces, const std::optional<at::Tensor>& redirect, int64_t layer) {
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
  for (const at::Tensor& p : pieces) {
    TORCH_CHECK(p.dim() == 5 && p.device().is_cpu() && p.scalar_type() == at::kFloat && p.size(1) == 2 && p.size(2) == KV &&
                    p.size(4) == D && p.stride(4) == 1 && p.stride(3) == D && layer >= 0 && layer < p.size(0),
                "pieces: float32 [L, 2, KV, P, D] on the CPU with [P, D] contiguous, holding layer ", layer);
  }
  // each row's redirect, checked once: its pieces' columns lie in the window
  std::vector<Redirect> redirects(n);
  if (redirect.has_value()) {
    const at::Tensor& rd = *redirect;
    TORCH_CHECK(rd.dim() == 2 && rd.size(0) == n && rd.size(1) >= 3 && rd.size(1) % 2 == 1 &&
                    rd.scalar_type() == at::kLong && rd.is_contiguous(), "redirect: long [n, 1 + 2K]");
    const int64_t stride = rd.size(1);
    const int64_t K = (stride - 1) / 2;
    const int64_t* rp = rd.data_ptr<int64_t>();
    const int64_t count = static_cast<int64_t>(pieces.size());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* e = rp + stride * i;
      Redirect& r = redirects[i];
      int64_t m = 0, total = 0;
      for (; m < K && e[1 + 2 * m] >= 0; ++m) {
        const int64_t idx = e[1 + 2 * m], len = e[2 + 2 * m];
        TORCH_CHECK(idx < count && len > 0 && len <= pieces[idx].size(3),
                    "redirect: row ", i, " names piece ", idx, " for ", len, " columns");
        total += len;
      }
      if (m == 0) continue;
      // compared without forming e[0] - start + total, which a bad e[0] could overflow
      TORCH_CHECK(e[0] >= start && e[0] - start <= W && total <= W - (e[0] - start),
                  "redirect: row ", i, "'s pieces leave the window");
      r.b = e[0] - start;
      r.e = r.b + total;
      r.count = m;
      r.entry = e;
    }
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const bool* mp = keep.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), vs0 = values.stride(0), vs1 = values.stride(1);
  const int64_t ms0 = keep.stride(0);
  const float sc = static_cast<float>(scale);
  const Fixed fixed = fixed_for(G, D);
  // piece j's keys (kv = 0) or values (kv = 1) of KV head h in layer `layer`
  auto piece_at = [&](int64_t j, int64_t kv, int64_t h) -> const float* {
    const at::Tensor& p = pieces[j];
    return p.data_ptr<float>() + layer * p.stride(0) + kv * p.stride(1) + h * p.stride(2);
  };
  at::parallel_for(0, n * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * W);
    std::vector<std::uintptr_t> ka(W), va(W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / KV, s = slot[i], h = t % KV;
      const float* qt = qp + t * G * D;
      const float* kt = kp + s * ks0 + h * ks1 + start * D;
      const float* vt = vp + s * vs0 + h * vs1 + start * D;
      const bool* keep_row = mp + s * ms0;
      float* ot = op + t * G * D;
      const Redirect& r = redirects[i];
      const bool listed = r.e > r.b;
      if (listed) {
        column_addresses(ka.data(), kt, r, 0, h, piece_at, W, D);
        column_addresses(va.data(), vt, r, 1, h, piece_at, W, D);
      }
      if (fixed.in_slot != nullptr) {
        const float* next = nullptr;  // the next task's first key column: its slot's, or its first piece's
        if (t + 1 < end) {
          const int64_t i1 = (t + 1) / KV, h1 = (t + 1) % KV;
          const Redirect& r1 = redirects[i1];
          next = r1.b == 0 && r1.e > 0 ? piece_at(r1.entry[1], 0, h1) : kp + slot[i1] * ks0 + h1 * ks1 + start * D;
        }
        if (listed) {
          fixed.listed(qt, Listed{ka.data()}, Listed{va.data()}, keep_row, W, sc, ot, scores.data(), next);
        } else {
          fixed.in_slot(qt, reinterpret_cast<std::uintptr_t>(kt), reinterpret_cast<std::uintptr_t>(vt), keep_row,
                        W, sc, ot, scores.data(), next);
        }
      } else {
        if (!listed) {
          column_addresses(ka.data(), kt, Redirect{}, 0, h, piece_at, W, D);
          column_addresses(va.data(), vt, Redirect{}, 1, h, piece_at, W, D);
        }
        attend_any(qt, ka.data(), va.data(), keep_row, W, sc, ot, scores.data(), G, D);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(prompt_server_native, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor rows, Tensor keep, int start, float scale, "
        "Tensor[] pieces, Tensor? redirect, int layer) -> Tensor",
        decode_attention);
}
