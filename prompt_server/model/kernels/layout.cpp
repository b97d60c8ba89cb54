// A prefill's prefix columns laid out on the CPU: each row's soft prompt and cached prompt head copied into the
// rows' new cache for one layer, and the columns left of a shorter prefix zeroed. Built with decode_attention.cpp by
// prompt_server/model/native.py.
//
// torch's own path is one indexed copy per row, piece and layer (model/batch.py's PrefillInputs.layer_cache): a wave
// of 31 rows behind 100 + 14 prefix columns of the default model is about 1,900 small copies, which ran at about a
// quarter of memory speed on an AVX2 EPYC. Here one call per layer copies every piece's blocks on torch's thread pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

// out [2, slots, KV, C, D] (keys, values), contiguous; pieces[i] [L, 2, KV, P_i, D], each [P_i, D] block contiguous;
// rows[i] / columns[i]: the row piece i belongs to and its first column there; fill[r]: row r's columns 0..fill[r]-1
// are zeroed.
void layout(const at::Tensor& out, at::TensorList pieces, at::IntArrayRef rows, at::IntArrayRef columns,
            at::IntArrayRef fill, int64_t layer) {
  TORCH_CHECK(out.dim() == 5 && out.size(0) == 2 && out.is_contiguous() && out.device().is_cpu(),
              "layout: out must be a contiguous [2, slots, KV, C, D] CPU tensor, got ", out.sizes());
  TORCH_CHECK(pieces.size() == rows.size() && rows.size() == columns.size(),
              "layout: one row and one column per piece");
  const int64_t slots = out.size(1), KV = out.size(2), C = out.size(3), D = out.size(4);
  TORCH_CHECK(static_cast<int64_t>(fill.size()) <= slots, "layout: more rows to fill than slots");
  const int64_t item = out.element_size();
  char* base = static_cast<char*>(out.data_ptr());
  struct Block {
    const char* src;
    char* dst;
    int64_t bytes;
  };
  std::vector<Block> blocks;
  blocks.reserve(pieces.size() * 2 * KV + fill.size() * 2 * KV);
  const int64_t sk = slots * KV * C * D, sr = KV * C * D, sh = C * D;  // out's strides, in elements
  for (size_t i = 0; i < pieces.size(); ++i) {
    const at::Tensor& p = pieces[i];
    TORCH_CHECK(p.dim() == 5 && p.size(1) == 2 && p.size(2) == KV && p.size(4) == D && layer >= 0 &&
                    layer < p.size(0) && p.scalar_type() == out.scalar_type() && p.device().is_cpu(),
                "layout: piece ", i, " must be [L, 2, ", KV, ", P, ", D, "] of out's dtype on the CPU, got ",
                p.sizes());
    TORCH_CHECK(p.stride(4) == 1 && p.stride(3) == D, "layout: piece ", i, "'s [P, D] blocks must be contiguous");
    const int64_t P = p.size(3), r = rows[i], c = columns[i];
    TORCH_CHECK(r >= 0 && r < slots && c >= 0 && c + P <= C, "layout: piece ", i, " (", P, " columns at row ", r,
                " column ", c, ") does not fit out ", out.sizes());
    const char* src = static_cast<const char*>(p.data_ptr()) + layer * p.stride(0) * item;
    for (int64_t kv = 0; kv < 2; ++kv)
      for (int64_t h = 0; h < KV; ++h)
        blocks.push_back({src + (kv * p.stride(1) + h * p.stride(2)) * item,
                          base + (kv * sk + r * sr + h * sh + c * D) * item, P * D * item});
  }
  for (size_t r = 0; r < fill.size(); ++r) {
    TORCH_CHECK(fill[r] >= 0 && fill[r] <= C, "layout: row ", r, " cannot have ", fill[r], " zeroed columns");
    if (fill[r] == 0) continue;
    for (int64_t kv = 0; kv < 2; ++kv)
      for (int64_t h = 0; h < KV; ++h)
        blocks.push_back(
            {nullptr, base + (kv * sk + static_cast<int64_t>(r) * sr + h * sh) * item, fill[r] * D * item});
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) {
      const Block& blk = blocks[j];
      if (blk.src != nullptr) {
        std::memcpy(blk.dst, blk.src, blk.bytes);
      } else {
        std::memset(blk.dst, 0, blk.bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prompt_server_native, m) {
  m.def("layout(Tensor(a!) out, Tensor[] pieces, int[] rows, int[] columns, int[] fill, int layer) -> ()", layout);
}
