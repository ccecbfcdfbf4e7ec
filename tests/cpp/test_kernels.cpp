// Checks the CPU kernels of orthrus_kernels without torch: each op against a naive double-precision
// reference in float32 / float16 / bfloat16, bitwise row invariance (a row's result equals the same row of
// any other row count, and causal row m equals a one-row call at cache_len + m), the same bits on the
// built-in thread pool and on a serial parallel-for, and accept. Random inputs each run; the seed is
// printed and ORTHRUS_TEST_SEED=<seed> replays it. Exit status 1 on any failure.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/cpu_common.h"
#include "orthrus/kernels.h"

using orthrus::DType;

namespace {

int failures = 0;
int checks = 0;

void report(bool passed, const std::string& name, const std::string& detail = "") {
  ++checks;
  if (!passed) ++failures;
  std::printf("%s  %-58s %s\n", passed ? "ok  " : "FAIL", name.c_str(), detail.c_str());
}

const char* dtype_name(DType dtype) {
  return dtype == DType::kFloat32 ? "float32" : dtype == DType::kFloat16 ? "float16" : "bfloat16";
}

// Relative error allowed against the double reference: the result's rounding plus fp32 slack.
double tolerance(DType dtype) {
  return dtype == DType::kFloat32 ? 2e-5 : dtype == DType::kFloat16 ? 1.0 / 512 : 1.0 / 64;
}

// Tensor data in one storage dtype, with double views of what is actually stored.
struct Buffer {
  DType dtype;
  std::vector<uint8_t> bytes;

  Buffer(DType type, size_t count) : dtype(type), bytes(count * orthrus::cpu::element_bytes(type)) {}
  size_t size() const { return bytes.size() / orthrus::cpu::element_bytes(dtype); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }

  double get(size_t i) const {
    if (dtype == DType::kFloat32) return reinterpret_cast<const float*>(bytes.data())[i];
    const uint16_t raw = reinterpret_cast<const uint16_t*>(bytes.data())[i];
    return dtype == DType::kFloat16 ? orthrus::cpu::float16_to_float(raw) : orthrus::cpu::bfloat16_to_float(raw);
  }
  void set(size_t i, double value) {
    const float narrow = float(value);
    if (dtype == DType::kFloat32) {
      reinterpret_cast<float*>(bytes.data())[i] = narrow;
    } else {
      reinterpret_cast<uint16_t*>(bytes.data())[i] = dtype == DType::kFloat16
                                                          ? orthrus::cpu::float_to_float16(narrow)
                                                          : orthrus::cpu::float_to_bfloat16(narrow);
    }
  }
  void fill(double value) {
    for (size_t i = 0; i < size(); ++i) set(i, value);
  }
  bool same_bits(const Buffer& other, size_t offset, size_t other_offset, size_t count) const {
    const size_t width = orthrus::cpu::element_bytes(dtype);
    return std::memcmp(bytes.data() + offset * width, other.bytes.data() + other_offset * width,
                       count * width) == 0;
  }
};

std::mt19937_64 rng;

int64_t uniform_int(int64_t low, int64_t high) { return std::uniform_int_distribution<int64_t>(low, high)(rng); }

Buffer random_buffer(DType dtype, size_t count, double scale = 1.0) {
  Buffer buffer(dtype, count);
  std::normal_distribution<double> normal(0.0, scale);
  for (size_t i = 0; i < count; ++i) buffer.set(i, normal(rng));
  return buffer;
}

// Tracks the worst |actual - expected| / bound over a check.
struct ErrorMeter {
  double worst = 0;
  bool finite = true;
  void add(double actual, double expected, double magnitude, double relative) {
    if (!std::isfinite(actual)) finite = false;
    worst = std::max(worst, std::abs(actual - expected) / (relative * magnitude));
  }
  bool passed() const { return finite && worst <= 1.0; }
  std::string detail() const {
    char text[64];
    std::snprintf(text, sizeof(text), "worst error %.3f of tolerance", worst);
    return finite ? text : "non-finite result";
  }
};

// ---- linear ----------------------------------------------------------------------------------------------

void test_linear(DType dtype) {
  const int64_t rows = 64, in_features = uniform_int(1, 300), out_features = uniform_int(1, 150);
  const int64_t x_stride = in_features + uniform_int(0, 5);
  const Buffer x = random_buffer(dtype, rows * x_stride);
  const Buffer w = random_buffer(dtype, out_features * in_features);
  Buffer y(dtype, rows * out_features);
  orthrus::linear_cpu(dtype, x.data(), x_stride, w.data(), y.data(), rows, out_features, in_features);

  ErrorMeter meter;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < out_features; ++n) {
      double sum = 0, magnitude = 0;
      for (int64_t k = 0; k < in_features; ++k) {
        sum += x.get(m * x_stride + k) * w.get(n * in_features + k);
        magnitude += std::abs(x.get(m * x_stride + k) * w.get(n * in_features + k));
      }
      meter.add(y.get(m * out_features + n), sum, magnitude + 1e-30, tolerance(dtype));
    }
  const std::string shape = " [" + std::to_string(out_features) + "x" + std::to_string(in_features) + "]";
  report(meter.passed(), std::string("linear ") + dtype_name(dtype) + shape + " vs reference", meter.detail());

  bool invariant = true;
  for (int64_t count = 1; count <= rows && invariant; ++count) {
    Buffer part(dtype, count * out_features);
    orthrus::linear_cpu(dtype, x.data(), x_stride, w.data(), part.data(), count, out_features, in_features);
    invariant = part.same_bits(y, 0, 0, count * out_features);
  }
  for (int64_t m = 0; m < rows && invariant; ++m) {
    Buffer one(dtype, out_features);
    const auto* row = static_cast<const uint8_t*>(x.data()) + m * x_stride * orthrus::cpu::element_bytes(dtype);
    orthrus::linear_cpu(dtype, row, x_stride, w.data(), one.data(), 1, out_features, in_features);
    invariant = one.same_bits(y, 0, m * out_features, out_features);
  }
  report(invariant, std::string("linear ") + dtype_name(dtype) + " row invariance (1..64 rows)");

  // The greedy token of each row: the first maximum of the rounded outputs linear_cpu stored.
  std::vector<int64_t> tokens(rows, -1);
  orthrus::linear_argmax_cpu(dtype, x.data(), x_stride, w.data(), tokens.data(), rows, out_features, in_features);
  bool argmax = true;
  for (int64_t m = 0; m < rows; ++m) {
    int64_t best = 0;
    for (int64_t n = 1; n < out_features; ++n) {
      if (y.get(m * out_features + n) > y.get(m * out_features + best)) best = n;
    }
    argmax = argmax && tokens[m] == best;
  }
  report(argmax, std::string("linear_argmax ") + dtype_name(dtype) + " == first maximum of linear");
}

// ---- rms_norm --------------------------------------------------------------------------------------------

void test_rms_norm(DType dtype) {
  const int64_t rows = 64, dim = uniform_int(1, 300), stride = dim + uniform_int(0, 4);
  const float eps = 1e-6f;
  const Buffer x = random_buffer(dtype, rows * stride);
  const Buffer weight = random_buffer(dtype, dim);
  Buffer y(dtype, rows * dim);
  orthrus::rms_norm_cpu(dtype, x.data(), stride, weight.data(), y.data(), rows, dim, eps);
  ErrorMeter meter;
  for (int64_t m = 0; m < rows; ++m) {
    double squares = 0;
    for (int64_t i = 0; i < dim; ++i) squares += x.get(m * stride + i) * x.get(m * stride + i);
    const double inverse_rms = 1.0 / std::sqrt(squares / dim + eps);
    for (int64_t i = 0; i < dim; ++i) {
      const double expected = x.get(m * stride + i) * inverse_rms * weight.get(i);
      meter.add(y.get(m * dim + i), expected, std::abs(expected) + 1e-3, tolerance(dtype));
    }
  }
  report(meter.passed(), std::string("rms_norm ") + dtype_name(dtype) + " vs reference", meter.detail());
  bool invariant = true;
  for (int64_t count = 1; count <= rows && invariant; ++count) {
    Buffer part(dtype, count * dim);
    orthrus::rms_norm_cpu(dtype, x.data(), stride, weight.data(), part.data(), count, dim, eps);
    invariant = part.same_bits(y, 0, 0, count * dim);
  }
  report(invariant, std::string("rms_norm ") + dtype_name(dtype) + " row invariance (1..64 rows)");

  // embedding_rms_norm: the table's rows gathered, then the same norm bits.
  const int64_t vocab = uniform_int(1, 100);
  const Buffer table = random_buffer(dtype, vocab * dim);
  std::vector<int64_t> tokens(rows);
  for (auto& token : tokens) token = uniform_int(0, vocab - 1);
  Buffer gathered(dtype, rows * dim), normed(dtype, rows * dim), expected(dtype, rows * dim);
  orthrus::embedding_rms_norm_cpu(dtype, tokens.data(), table.data(), vocab, weight.data(), gathered.data(),
                                  normed.data(), rows, dim, eps);
  bool same = true;
  for (int64_t m = 0; m < rows; ++m) same = same && gathered.same_bits(table, m * dim, tokens[m] * dim, dim);
  orthrus::rms_norm_cpu(dtype, gathered.data(), dim, weight.data(), expected.data(), rows, dim, eps);
  report(same && normed.same_bits(expected, 0, 0, rows * dim),
         std::string("embedding_rms_norm ") + dtype_name(dtype) + " == gather then rms_norm");
}

// ---- qk_norm_rope_store ----------------------------------------------------------------------------------

std::vector<float> rope_table(int64_t positions, int64_t head_dim) {
  std::vector<float> table(positions * head_dim);
  const int64_t half = head_dim / 2;
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = p * std::pow(1e6, -2.0 * i / head_dim);
      table[p * head_dim + i] = float(std::cos(angle));
      table[p * head_dim + half + i] = float(std::sin(angle));
    }
  return table;
}

void test_qk_norm_rope_store(DType dtype) {
  const int64_t rows = uniform_int(2, 64), kv_heads = uniform_int(1, 3), q_heads = kv_heads * uniform_int(1, 3);
  const int64_t head_dim = 2 * uniform_int(1, 40), width = (q_heads + 2 * kv_heads) * head_dim;
  const int64_t position = uniform_int(0, 300), dst_rows = rows + uniform_int(0, 20);
  const int32_t position_start = int32_t(position), dst_start = int32_t(uniform_int(0, dst_rows - rows));
  const float eps = 1e-6f;
  // q, k, v are views into one fused projection row, as in the model.
  const Buffer fused = random_buffer(dtype, rows * width);
  const size_t element = orthrus::cpu::element_bytes(dtype);
  const auto* q = static_cast<const uint8_t*>(fused.data());
  const uint8_t* k = q + q_heads * head_dim * element;
  const uint8_t* v = k + kv_heads * head_dim * element;
  Buffer q_weight = random_buffer(dtype, head_dim, 0.3), k_weight = random_buffer(dtype, head_dim, 0.3);
  for (int64_t i = 0; i < head_dim; ++i) {
    q_weight.set(i, 1 + q_weight.get(i));
    k_weight.set(i, 1 + k_weight.get(i));
  }
  const std::vector<float> table = rope_table(position + rows, head_dim);

  auto run = [&](int64_t first_row, int64_t count, Buffer& q_out, Buffer& k_dst, Buffer& v_dst) {
    const int32_t row_position = position_start + int32_t(first_row), row_dst = dst_start + int32_t(first_row);
    const size_t offset = first_row * width * element;
    orthrus::qk_norm_rope_store_cpu(dtype, q + offset, width, k + offset, width, v + offset, width,
                                    q_weight.data(), k_weight.data(), table.data(), &row_position, q_out.data(),
                                    k_dst.data(), v_dst.data(), &row_dst, count, q_heads, kv_heads, head_dim, eps);
  };
  Buffer q_out(dtype, rows * q_heads * head_dim), k_dst(dtype, dst_rows * kv_heads * head_dim),
      v_dst(dtype, dst_rows * kv_heads * head_dim);
  k_dst.fill(NAN);
  v_dst.fill(NAN);
  run(0, rows, q_out, k_dst, v_dst);

  ErrorMeter meter;
  bool v_copied = true, outside_untouched = true;
  const int64_t half = head_dim / 2;
  auto check_head = [&](int64_t source_offset, const Buffer& weight, const Buffer& result, int64_t result_offset,
                        int64_t m) {
    double squares = 0;
    for (int64_t i = 0; i < head_dim; ++i) squares += fused.get(source_offset + i) * fused.get(source_offset + i);
    const double inverse_rms = 1.0 / std::sqrt(squares / head_dim + eps);
    std::vector<double> normed(head_dim);
    double largest = 1e-3;
    for (int64_t i = 0; i < head_dim; ++i) {
      normed[i] = fused.get(source_offset + i) * inverse_rms * weight.get(i);
      largest = std::max(largest, std::abs(normed[i]));
    }
    for (int64_t i = 0; i < half; ++i) {
      const double cos = table[(position + m) * head_dim + i], sin = table[(position + m) * head_dim + half + i];
      meter.add(result.get(result_offset + i), normed[i] * cos - normed[half + i] * sin, largest, tolerance(dtype));
      meter.add(result.get(result_offset + half + i), normed[half + i] * cos + normed[i] * sin, largest,
                tolerance(dtype));
    }
  };
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t h = 0; h < q_heads; ++h)
      check_head(m * width + h * head_dim, q_weight, q_out, (m * q_heads + h) * head_dim, m);
    for (int64_t h = 0; h < kv_heads; ++h) {
      check_head(m * width + (q_heads + h) * head_dim, k_weight, k_dst, ((dst_start + m) * kv_heads + h) * head_dim, m);
      v_copied = v_copied && v_dst.same_bits(fused, ((dst_start + m) * kv_heads + h) * head_dim,
                                             m * width + (q_heads + kv_heads + h) * head_dim, head_dim);
    }
  }
  for (int64_t r = 0; r < dst_rows; ++r)
    if (r < dst_start || r >= dst_start + rows)
      for (int64_t i = 0; i < kv_heads * head_dim; ++i)
        outside_untouched = outside_untouched && std::isnan(k_dst.get(r * kv_heads * head_dim + i)) &&
                            std::isnan(v_dst.get(r * kv_heads * head_dim + i));
  report(meter.passed() && v_copied && outside_untouched,
         std::string("qk_norm_rope_store ") + dtype_name(dtype) + " vs reference",
         meter.detail() + (v_copied ? "" : ", v not copied") + (outside_untouched ? "" : ", wrote outside"));

  bool invariant = true;
  for (int64_t m = 0; m < rows && invariant; ++m) {
    Buffer one_q(dtype, q_heads * head_dim), one_k(dtype, dst_rows * kv_heads * head_dim),
        one_v(dtype, dst_rows * kv_heads * head_dim);
    run(m, 1, one_q, one_k, one_v);
    const int64_t stored = (dst_start + m) * kv_heads * head_dim;
    invariant = one_q.same_bits(q_out, 0, m * q_heads * head_dim, q_heads * head_dim) &&
                one_k.same_bits(k_dst, stored, stored, kv_heads * head_dim) &&
                one_v.same_bits(v_dst, stored, stored, kv_heads * head_dim);
  }
  report(invariant, std::string("qk_norm_rope_store ") + dtype_name(dtype) + " row invariance");
}

// ---- fused forms: bit for bit the separate calls --------------------------------------------------------

void test_fused_forms(DType dtype) {
  const int64_t rows = uniform_int(1, 64), in_features = uniform_int(1, 200);
  const int64_t x_stride = in_features + uniform_int(0, 5);
  const Buffer x = random_buffer(dtype, rows * x_stride);
  const size_t element = orthrus::cpu::element_bytes(dtype);

  const int64_t features = uniform_int(1, 100);
  const Buffer gate_up_weight = random_buffer(dtype, 2 * features * in_features);
  Buffer gate_up(dtype, rows * 2 * features), separate(dtype, rows * features), fused(dtype, rows * features);
  orthrus::linear_cpu(dtype, x.data(), x_stride, gate_up_weight.data(), gate_up.data(), rows, 2 * features,
                      in_features);
  orthrus::silu_mul_cpu(dtype, gate_up.data(), 2 * features, separate.data(), rows, features);
  orthrus::linear_silu_mul_cpu(dtype, x.data(), x_stride, gate_up_weight.data(), fused.data(), rows, features,
                               in_features, nullptr, 0.0f);
  report(fused.same_bits(separate, 0, 0, rows * features),
         std::string("linear_silu_mul ") + dtype_name(dtype) + " == linear + silu_mul, bitwise");

  const int64_t kv_heads = uniform_int(1, 3), q_heads = kv_heads * uniform_int(1, 3), head_dim = 2 * uniform_int(1, 40);
  const int64_t width = (q_heads + 2 * kv_heads) * head_dim, dst_rows = rows + uniform_int(0, 20);
  const int32_t position = int32_t(uniform_int(0, 300)), dst_start = int32_t(uniform_int(0, dst_rows - rows));
  const Buffer qkv_weight = random_buffer(dtype, width * in_features);
  const Buffer q_norm = random_buffer(dtype, head_dim), k_norm = random_buffer(dtype, head_dim);
  const std::vector<float> table = rope_table(position + rows, head_dim);
  Buffer qkv(dtype, rows * width);
  orthrus::linear_cpu(dtype, x.data(), x_stride, qkv_weight.data(), qkv.data(), rows, width, in_features);
  const auto* q = static_cast<const uint8_t*>(qkv.data());
  const uint8_t* k = q + q_heads * head_dim * element;
  const uint8_t* v = k + kv_heads * head_dim * element;
  bool same = true;
  Buffer outputs[2][3] = {{Buffer(dtype, rows * q_heads * head_dim), Buffer(dtype, dst_rows * kv_heads * head_dim),
                           Buffer(dtype, dst_rows * kv_heads * head_dim)},
                          {Buffer(dtype, rows * q_heads * head_dim), Buffer(dtype, dst_rows * kv_heads * head_dim),
                           Buffer(dtype, dst_rows * kv_heads * head_dim)}};
  for (auto& form : outputs)
    for (Buffer& buffer : form) buffer.fill(NAN);
  orthrus::qk_norm_rope_store_cpu(dtype, q, width, k, width, v, width, q_norm.data(), k_norm.data(), table.data(),
                                  &position, outputs[0][0].data(), outputs[0][1].data(), outputs[0][2].data(),
                                  &dst_start, rows, q_heads, kv_heads, head_dim, 1e-6f);
  orthrus::linear_qk_norm_rope_store_cpu(dtype, x.data(), x_stride, qkv_weight.data(), rows, in_features,
                                         q_norm.data(), k_norm.data(), table.data(), &position, outputs[1][0].data(),
                                         outputs[1][1].data(), outputs[1][2].data(), &dst_start, q_heads, kv_heads,
                                         head_dim, 1e-6f, nullptr, 0.0f);
  for (int i = 0; i < 3; ++i) same = same && outputs[1][i].same_bits(outputs[0][i], 0, 0, outputs[0][i].size());
  report(same, std::string("linear_qk_norm_rope_store ") + dtype_name(dtype) +
                   " == linear + qk_norm_rope_store, bitwise (q_out, k_dst, v_dst)");
}

// ---- the deferred norm ------------------------------------------------------------------------------------

// linear_add_deferred_norm updates the residual exactly as linear + add_rms_norm, and a consumer given its
// sums projects what the consumer would project from add_rms_norm's normalised rows.
void test_deferred_norm(DType dtype) {
  const int64_t rows = uniform_int(1, 64), in_features = uniform_int(1, 200), dim = uniform_int(1, 200);
  const int64_t features = uniform_int(1, 100);
  const float eps = 1e-6f;
  const Buffer x = random_buffer(dtype, rows * in_features), w = random_buffer(dtype, dim * in_features);
  const Buffer norm_weight = random_buffer(dtype, dim), gate_up_weight = random_buffer(dtype, 2 * features * dim);
  Buffer residual = random_buffer(dtype, rows * dim), separate_residual = residual;
  Buffer weighted(dtype, rows * dim), delta(dtype, rows * dim), normed(dtype, rows * dim);
  std::vector<float> square_sums(size_t(rows * orthrus::square_sum_columns(dim)));
  orthrus::linear_add_deferred_norm_cpu(dtype, x.data(), in_features, w.data(), residual.data(), norm_weight.data(),
                                        weighted.data(), square_sums.data(), rows, dim, in_features);
  orthrus::linear_cpu(dtype, x.data(), in_features, w.data(), delta.data(), rows, dim, in_features);
  orthrus::add_rms_norm_cpu(dtype, separate_residual.data(), delta.data(), norm_weight.data(), normed.data(), rows,
                            dim, eps);
  report(residual.same_bits(separate_residual, 0, 0, rows * dim),
         std::string("linear_add_deferred_norm ") + dtype_name(dtype) + " residual == linear + add_rms_norm, bitwise");

  Buffer deferred(dtype, rows * features), direct(dtype, rows * features);
  orthrus::linear_silu_mul_cpu(dtype, weighted.data(), dim, gate_up_weight.data(), deferred.data(), rows, features,
                               dim, square_sums.data(), eps);
  orthrus::linear_silu_mul_cpu(dtype, normed.data(), dim, gate_up_weight.data(), direct.data(), rows, features, dim,
                               nullptr, 0.0f);
  // Both round the normalised input differently (the deferred form never rounds it), so they agree to the
  // rounding of dim terms, measured against the terms' magnitude.
  ErrorMeter meter;
  for (int64_t m = 0; m < rows; ++m) {
    double magnitude = 0;
    for (int64_t k = 0; k < dim; ++k) magnitude = std::max(magnitude, std::abs(normed.get(m * dim + k)));
    for (int64_t i = 0; i < features; ++i)
      meter.add(deferred.get(m * features + i), direct.get(m * features + i),
                magnitude * magnitude * std::sqrt(double(dim)) + 1.0, 32 * tolerance(dtype));
  }
  report(meter.passed(), std::string("linear_silu_mul ") + dtype_name(dtype) + " of a deferred norm vs of rms_norm",
         meter.detail());
}

// ---- attention -------------------------------------------------------------------------------------------

struct AttentionCase {
  DType dtype;
  int64_t rows, q_heads, kv_heads, head_dim, cache_len, cache_rows;
  float scale;
  Buffer q, k_cache, v_cache, k_block, v_block;
};

AttentionCase make_attention_case(DType dtype, int64_t rows) {
  const int64_t kv_heads = uniform_int(1, 3), q_heads = kv_heads * uniform_int(1, 4);
  const int64_t dims[] = {8, 16, 20, 32, 64, 128};
  const int64_t head_dim = dims[uniform_int(0, 5)], cache_len = uniform_int(0, 100);
  const int64_t cache_rows = cache_len + rows + uniform_int(0, 10);
  const int64_t cache_size = cache_rows * kv_heads * head_dim, block_size = rows * kv_heads * head_dim;
  AttentionCase c{dtype,      rows,
                  q_heads,    kv_heads,
                  head_dim,   cache_len,
                  cache_rows, float(1 / std::sqrt(head_dim)),
                  random_buffer(dtype, rows * q_heads * head_dim),
                  random_buffer(dtype, cache_size),
                  random_buffer(dtype, cache_size),
                  random_buffer(dtype, block_size),
                  random_buffer(dtype, block_size)};
  // Rows past what any call may read are poison.
  for (int64_t i = (cache_len + rows) * kv_heads * head_dim; i < cache_rows * kv_heads * head_dim; ++i) {
    c.k_cache.set(i, NAN);
    c.v_cache.set(i, NAN);
  }
  return c;
}

// Double reference for row m seeing `keys` keys (key j < cache_len from the cache, else from `block`).
void check_attention_row(const AttentionCase& c, const Buffer& out, int64_t m, int64_t keys, bool from_block,
                         ErrorMeter& meter) {
  const int64_t group = c.q_heads / c.kv_heads, kv_width = c.kv_heads * c.head_dim;
  for (int64_t h = 0; h < c.q_heads; ++h) {
    const int64_t head_offset = (h / group) * c.head_dim;
    auto key_value = [&](const Buffer& cache, const Buffer& block, int64_t j, int64_t d) {
      return from_block && j >= c.cache_len ? block.get((j - c.cache_len) * kv_width + head_offset + d)
                                            : cache.get(j * kv_width + head_offset + d);
    };
    std::vector<double> scores(keys);
    double largest = -INFINITY;
    for (int64_t j = 0; j < keys; ++j) {
      double dot = 0;
      for (int64_t d = 0; d < c.head_dim; ++d)
        dot += c.q.get((m * c.q_heads + h) * c.head_dim + d) * key_value(c.k_cache, c.k_block, j, d);
      scores[j] = dot * c.scale;
      largest = std::max(largest, scores[j]);
    }
    double total = 0;
    for (double& score : scores) total += (score = std::exp(score - largest));
    for (int64_t d = 0; d < c.head_dim; ++d) {
      double value = 0, magnitude = 0;
      for (int64_t j = 0; j < keys; ++j) {
        value += scores[j] / total * key_value(c.v_cache, c.v_block, j, d);
        magnitude += scores[j] / total * std::abs(key_value(c.v_cache, c.v_block, j, d));
      }
      meter.add(out.get((m * c.q_heads + h) * c.head_dim + d), value, magnitude + 1e-3, tolerance(c.dtype));
    }
  }
}

void run_attention(const AttentionCase& c, const uint8_t* q, int64_t rows, int32_t cache_len, bool causal,
                   Buffer& out) {
  orthrus::attention_cpu(c.dtype, q, c.k_cache.data(), c.v_cache.data(), &cache_len,
                         causal ? nullptr : c.k_block.data(), causal ? nullptr : c.v_block.data(), out.data(), rows,
                         c.q_heads, c.kv_heads, c.head_dim, causal, c.scale);
}

void test_attention(DType dtype) {
  const std::string name = std::string("attention ") + dtype_name(dtype);
  {
    const AttentionCase c = make_attention_case(dtype, 64);
    const int64_t row_width = c.q_heads * c.head_dim;
    const auto* q = static_cast<const uint8_t*>(c.q.data());
    const size_t row_bytes = row_width * orthrus::cpu::element_bytes(dtype);
    Buffer out(dtype, c.rows * row_width);
    run_attention(c, q, c.rows, int32_t(c.cache_len), true, out);
    ErrorMeter meter;
    for (int64_t m = 0; m < c.rows; ++m) check_attention_row(c, out, m, c.cache_len + m + 1, false, meter);
    report(meter.passed(), name + " causal (d=" + std::to_string(c.head_dim) + ") vs reference", meter.detail());

    bool invariant = true;
    for (int64_t count = 1; count <= c.rows && invariant; ++count) {
      Buffer part(dtype, count * row_width);
      run_attention(c, q, count, int32_t(c.cache_len), true, part);
      invariant = part.same_bits(out, 0, 0, count * row_width);
    }
    for (int64_t m = 0; m < c.rows && invariant; ++m) {
      Buffer one(dtype, row_width);
      run_attention(c, q + m * row_bytes, 1, int32_t(c.cache_len + m), true, one);
      invariant = one.same_bits(out, 0, m * row_width, row_width);
    }
    report(invariant, name + " causal row m == one row at cache_len + m");
  }
  {
    AttentionCase c = make_attention_case(dtype, uniform_int(1, 64));
    const int64_t row_width = c.q_heads * c.head_dim, kv_width = c.kv_heads * c.head_dim;
    for (int64_t i = c.cache_len * kv_width; i < c.cache_rows * kv_width; ++i) {
      c.k_cache.set(i, NAN);  // the block's keys must come from k_block / v_block
      c.v_cache.set(i, NAN);
    }
    const auto* q = static_cast<const uint8_t*>(c.q.data());
    Buffer out(dtype, c.rows * row_width);
    run_attention(c, q, c.rows, int32_t(c.cache_len), false, out);
    ErrorMeter meter;
    for (int64_t m = 0; m < c.rows; ++m) check_attention_row(c, out, m, c.cache_len + c.rows, true, meter);
    report(meter.passed(), name + " bidirectional vs reference", meter.detail());

    // The same keys in the same order through the cache give the same bits.
    for (int64_t i = 0; i < c.rows * kv_width; ++i) {
      c.k_cache.set(c.cache_len * kv_width + i, c.k_block.get(i));
      c.v_cache.set(c.cache_len * kv_width + i, c.v_block.get(i));
    }
    bool same = true;
    const size_t row_bytes = row_width * orthrus::cpu::element_bytes(dtype);
    for (int64_t m = 0; m < c.rows && same; ++m) {
      Buffer one(dtype, row_width);
      run_attention(c, q + m * row_bytes, 1, int32_t(c.cache_len + c.rows - 1), true, one);
      same = one.same_bits(out, 0, m * row_width, row_width);
    }
    report(same, name + " bidirectional row == causal row over the same keys");
  }
}

// ---- accept ----------------------------------------------------------------------------------------------

void test_accept() {
  bool passed = true;
  for (int trial = 0; trial < 100; ++trial) {
    const int64_t rows = uniform_int(1, 64);
    std::vector<int64_t> targets(rows), drafts(rows - 1);
    for (auto& token : targets) token = uniform_int(0, 1000);
    const int64_t accepted = uniform_int(0, rows - 1);
    for (int64_t i = 0; i < rows - 1; ++i) drafts[i] = i < accepted ? targets[i] : targets[i] + (i == accepted);
    int32_t cache_len = int32_t(uniform_int(0, 1000));
    const int32_t start = cache_len;
    std::vector<int64_t> emitted(rows + 1, -1);
    int64_t next_anchor = -1;
    orthrus::accept_cpu(drafts.data(), targets.data(), rows, &cache_len, emitted.data(), &next_anchor);
    passed = passed && emitted[0] == accepted + 1 && std::equal(targets.begin(), targets.end(), emitted.begin() + 1) &&
             next_anchor == targets[accepted] && cache_len == start + accepted + 1;
  }
  report(passed, "accept (100 random blocks)");
}

// ---- threading -------------------------------------------------------------------------------------------

void serial_parallel_for(int64_t count, int64_t, void* context, orthrus::CpuParallelBody body) {
  body(context, 0, count);
}

void test_thread_independence() {
  const int64_t rows = 17, in_features = 130, out_features = 301;
  const Buffer x = random_buffer(DType::kFloat32, rows * in_features);
  const Buffer w = random_buffer(DType::kFloat32, out_features * in_features);
  Buffer pooled(DType::kFloat32, rows * out_features), serial(DType::kFloat32, rows * out_features);
  orthrus::linear_cpu(DType::kFloat32, x.data(), in_features, w.data(), pooled.data(), rows, out_features, in_features);
  orthrus::set_cpu_parallel_for(&serial_parallel_for);
  orthrus::linear_cpu(DType::kFloat32, x.data(), in_features, w.data(), serial.data(), rows, out_features, in_features);
  orthrus::set_cpu_parallel_for(nullptr);
  report(pooled.same_bits(serial, 0, 0, rows * out_features), "linear: thread pool == serial, bitwise");
}

}  // namespace

int main() {
  uint64_t seed = std::random_device{}();
  if (const char* text = std::getenv("ORTHRUS_TEST_SEED")) seed = std::strtoull(text, nullptr, 10);
  rng.seed(seed);
  std::printf("orthrus CPU kernels, ORTHRUS_TEST_SEED=%llu, %s arithmetic\n", static_cast<unsigned long long>(seed),
              orthrus::cpu::use_fused_math() ? "fused (AVX2+FMA)" : "portable");
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    test_linear(dtype);
    test_fused_forms(dtype);
    test_deferred_norm(dtype);
    test_rms_norm(dtype);
    test_qk_norm_rope_store(dtype);
    test_attention(dtype);
  }
  test_accept();
  test_thread_independence();
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
