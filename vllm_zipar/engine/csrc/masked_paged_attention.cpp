// ZipAR-masked attention over vLLM's paged CPU KV cache: every masked request of a step, every head, in one
// call per layer (vllm_zipar/engine/masked_kernel.py builds and loads it; attention.py calls it).
//
// Why a kernel: the same computation in PyTorch ops costs ~8 dispatches per request per layer, which at
// 16 images in flight is more than the attention itself. This reads each request's keys and values once
// per kv head straight from vLLM's blocks (no copy of the KV), applies the step's visibility mask
// (attention_mask.py builds it once per step) and writes the masked rows of `output`.
//
// Layout (vLLM 0.32 CPU backend, cpu_attn.py): kv_cache is [num_blocks, kv_heads, 2 * block_size, head_dim],
// keys in the first block_size rows, values in the rest. Keys are stored per (block, head) either plain
// ([token][dim]) or transposed ([dim][token], the `vec` ISAs); the caller passes which, found by probing
// vLLM's own cache-write op. Values are plain.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// 16 floats: one AVX-512 register (GCC splits it into two AVX2 ones where needed). GCC's vector extensions
// keep the accumulators below in registers without ISA-specific intrinsics.
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_unaligned __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x16_unaligned __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
// Query rows handled together, so that each key and value vector loaded serves all of them.
constexpr int64_t kRowBlock = 4;

inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16_unaligned*>(p); }

inline f32x16 load16(const at::BFloat16* p) {  // bf16 is the top half of a float
  u32x16 wide = __builtin_convertvector(*reinterpret_cast<const u16x16_unaligned*>(p), u32x16) << 16;
  f32x16 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline f32x16 load16(const at::Half* p) {
  f32x16 out;
  for (int64_t u = 0; u < kLanes; ++u) out[u] = static_cast<float>(p[u]);
  return out;
}

// Scores of kRowBlock query rows against NC * 16 consecutive tokens of a transposed key block
// ([dim][token]): each key row segment is read once, contiguously, and serves every row.
template <int NC, typename T>
inline void score_strip(const T* keys, int64_t block_size, int64_t head_dim, const float* q, float* s,
                        int64_t score_stride) {
  f32x16 acc[kRowBlock][NC] = {};
  for (int64_t i = 0; i < head_dim; ++i) {
    const T* k = keys + i * block_size;
    for (int c = 0; c < NC; ++c) {
      const f32x16 kv = load16(k + c * kLanes);
      for (int r = 0; r < kRowBlock; ++r) acc[r][c] += q[r * head_dim + i] * kv;
    }
  }
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < NC; ++c) std::memcpy(s + r * score_stride + c * kLanes, &acc[r][c], sizeof(f32x16));
}

// acc[row][c] += p[row][t] * value[t][dims c*16 .. c*16+15] over `tokens` values of one block: each value
// row segment is read once, contiguously, and serves every row.
template <int NC, typename T>
inline void value_panel(const T* values, int64_t head_dim, int64_t tokens, const float* p, int64_t score_stride,
                        f32x16 (&acc)[kRowBlock][4]) {
  for (int64_t t = 0; t < tokens; ++t) {
    // A key no row may see (the other stream of a guided image, a proxy, a later row): skip its value row.
    if (p[t] == 0.f && p[score_stride + t] == 0.f && p[2 * score_stride + t] == 0.f &&
        p[3 * score_stride + t] == 0.f)
      continue;
    const T* v = values + t * head_dim;
    for (int c = 0; c < NC; ++c) {
      const f32x16 vv = load16(v + c * kLanes);
      for (int r = 0; r < kRowBlock; ++r) acc[r][c] += p[r * score_stride + t] * vv;
    }
  }
}

// requests: int64 [R, 5] rows (block_table row, first query row, query count, sequence length, mask offset);
// mask: uint8, request r's [count, seq_len] visibility matrix (row-major) at its offset.
template <typename T>
void masked_attention_impl(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
                           const at::Tensor& requests, const at::Tensor& mask, double scale,
                           bool key_transposed, at::Tensor& output) {
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t kv_heads = kv_cache.size(1);
  const int64_t block_size = kv_cache.size(2) / 2;
  const int64_t group = num_heads / kv_heads;
  const int64_t num_requests = requests.size(0);
  const int64_t q_token_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t out_token_stride = output.stride(0);
  const int64_t table_stride = block_table.stride(0);
  const int64_t cache_head_stride = kv_cache.stride(1), cache_block_stride = kv_cache.stride(0);

  const T* q_data = query.data_ptr<T>();
  const T* cache = kv_cache.data_ptr<T>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t* req = requests.data_ptr<int64_t>();
  const uint8_t* visible_all = mask.data_ptr<uint8_t>();
  T* out_data = output.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_requests * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows, scores, totals;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / kv_heads, kvh = unit % kv_heads;
      const int64_t table_row = req[r * 5], first_query = req[r * 5 + 1], count = req[r * 5 + 2];
      const int64_t seq_len = req[r * 5 + 3];
      const uint8_t* visible = visible_all + req[r * 5 + 4];
      const int64_t rows = count * group;  // query rows (query token, head of this kv group)
      const int64_t padded_rows = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;  // padding rows: zeros
      const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
      const int64_t score_stride = num_blocks * block_size;
      const int32_t* blocks = table + table_row * table_stride;
      auto key_block = [&](int64_t b) {
        return cache + static_cast<int64_t>(blocks[b]) * cache_block_stride + kvh * cache_head_stride;
      };

      q_rows.assign(padded_rows * head_dim, 0.f);
      for (int64_t qi = 0; qi < count; ++qi) {
        for (int64_t g = 0; g < group; ++g) {
          const T* src = q_data + (first_query + qi) * q_token_stride + (kvh * group + g) * q_head_stride;
          float* dst = q_rows.data() + (qi * group + g) * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) dst[i] = static_cast<float>(src[i]) * fscale;
        }
      }

      // Scores of every query row against every key: each key read once, block by block.
      scores.assign(padded_rows * score_stride, 0.f);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const T* keys = key_block(b);
        const int64_t tokens = std::min(block_size, seq_len - b * block_size);
        if (key_transposed) {  // strips of up to 64 tokens, 4 rows of scores each, in registers
          for (int64_t t0 = 0; t0 < tokens; t0 += 4 * kLanes) {
            const int64_t chunks = std::min<int64_t>(4, (tokens - t0 + kLanes - 1) / kLanes);
            for (int64_t row0 = 0; row0 < padded_rows; row0 += kRowBlock) {
              const float* q = q_rows.data() + row0 * head_dim;
              float* s = scores.data() + row0 * score_stride + b * block_size + t0;
              const T* k = keys + t0;
              switch (chunks) {
                case 4: score_strip<4>(k, block_size, head_dim, q, s, score_stride); break;
                case 3: score_strip<3>(k, block_size, head_dim, q, s, score_stride); break;
                case 2: score_strip<2>(k, block_size, head_dim, q, s, score_stride); break;
                default: score_strip<1>(k, block_size, head_dim, q, s, score_stride); break;
              }
            }
          }
        } else {  // keys[token][dim]
          for (int64_t t = 0; t < tokens; ++t) {
            const T* k = keys + t * head_dim;
            for (int64_t row = 0; row < rows; ++row) {
              const float* q = q_rows.data() + row * head_dim;
              float dot = 0.f;
              for (int64_t i = 0; i < head_dim; ++i) dot += q[i] * static_cast<float>(k[i]);
              scores[row * score_stride + b * block_size + t] = dot;
            }
          }
        }
      }

      // Masked softmax (unnormalised; invisible keys and the tail of the last block get weight 0).
      totals.assign(padded_rows, 1.f);
      for (int64_t row = 0; row < rows; ++row) {
        const uint8_t* vis = visible + (row / group) * seq_len;
        float* s = scores.data() + row * score_stride;
        // No infinities: the kernel is built with -ffast-math (vectorised exp); every row sees itself.
        float max_score = std::numeric_limits<float>::lowest();
        for (int64_t j = 0; j < seq_len; ++j)
          if (vis[j]) max_score = std::max(max_score, s[j]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < seq_len; ++j) {
          const float p = vis[j] ? std::exp(s[j] - max_score) : 0.f;
          s[j] = p;
          total += p;
        }
        for (int64_t j = seq_len; j < score_stride; ++j) s[j] = 0.f;
        totals[row] = total;
      }

      // Weighted sums of values: panels of up to 64 dims x 4 rows in registers.
      for (int64_t row0 = 0; row0 < padded_rows; row0 += kRowBlock) {
        const float* p = scores.data() + row0 * score_stride;
        for (int64_t d0 = 0; d0 < head_dim; d0 += 4 * kLanes) {
          const int64_t chunks = std::min<int64_t>(4, (head_dim - d0) / kLanes);
          f32x16 acc[kRowBlock][4] = {};
          for (int64_t b = 0; b < num_blocks; ++b) {
            const T* values = key_block(b) + block_size * head_dim + d0;
            // Not past seq_len: the unwritten tail of the last block may hold anything, NaN included.
            const int64_t tokens = std::min(block_size, seq_len - b * block_size);
            const float* pb = p + b * block_size;
            switch (chunks) {
              case 4: value_panel<4>(values, head_dim, tokens, pb, score_stride, acc); break;
              case 3: value_panel<3>(values, head_dim, tokens, pb, score_stride, acc); break;
              case 2: value_panel<2>(values, head_dim, tokens, pb, score_stride, acc); break;
              default: value_panel<1>(values, head_dim, tokens, pb, score_stride, acc); break;
            }
          }
          for (int64_t j = 0; j < kRowBlock && row0 + j < rows; ++j) {
            const int64_t row = row0 + j, qi = row / group, g = row % group;
            T* dst = out_data + (first_query + qi) * out_token_stride + (kvh * group + g) * head_dim + d0;
            const float inv = 1.f / totals[row];
            for (int64_t c = 0; c < chunks; ++c)
              for (int64_t u = 0; u < kLanes; ++u) dst[c * kLanes + u] = static_cast<T>(acc[j][c][u] * inv);
          }
        }
      }
    }
  });
}

void masked_paged_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
                            const at::Tensor& requests, const at::Tensor& mask, double scale,
                            bool key_transposed, at::Tensor output) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [tokens, heads, head_dim], dense rows");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache must be a contiguous 4-d view");
  TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type(), "kv_cache and query dtypes differ");
  TORCH_CHECK(output.dim() == 2 && output.stride(1) == 1 && output.scalar_type() == query.scalar_type(),
              "output must be [tokens, heads * head_dim]");
  TORCH_CHECK(kv_cache.size(3) == query.size(2), "head_dim mismatch");
  TORCH_CHECK(query.size(2) % kLanes == 0 && (kv_cache.size(2) / 2) % kLanes == 0,
              "head_dim and block_size must be multiples of 16");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1, "block_table: int32 rows");
  TORCH_CHECK(requests.scalar_type() == at::kLong && requests.is_contiguous() && requests.size(1) == 5,
              "requests must be int64 [R, 5]");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous(), "mask must be contiguous uint8");
  switch (query.scalar_type()) {
    case at::kFloat:
      masked_attention_impl<float>(query, kv_cache, block_table, requests, mask, scale, key_transposed, output);
      break;
    case at::kBFloat16:
      masked_attention_impl<at::BFloat16>(query, kv_cache, block_table, requests, mask, scale, key_transposed,
                                          output);
      break;
    case at::kHalf:
      masked_attention_impl<at::Half>(query, kv_cache, block_table, requests, mask, scale, key_transposed,
                                      output);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(vllm_zipar, m) {
  m.def(
      "masked_paged_attention(Tensor query, Tensor kv_cache, Tensor block_table, Tensor requests, "
      "Tensor mask, float scale, bool key_transposed, Tensor(a!) output) -> ()");
  m.impl("masked_paged_attention", c10::DispatchKey::CPU, TORCH_FN(masked_paged_attention));
}
