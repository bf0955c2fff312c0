// Sparse 2-D convolution on the CPU: the weight (F, C, KH, KW) viewed as an F × (C·KH·KW) matrix in
// CSR form, so only non-zero taps are computed: a kept kernel of a kernel-pruned layer costs its
// taps, a pattern's 4 of 9, an unstructured survivor's 1, and a zero kernel nothing.
//
// A non-zero in row f, column c·KH·KW + ky·KW + kx, with weight w, is one scaled, shifted add of an
// input plane into the output plane: out[n, f, y, x] += w · xpad[n, c, y·s + ky, x·s + kx]. The
// padded input of one image stays in cache while a thread sweeps its filters; the output plane
// stays in L1 while a filter's non-zeros are added into it.
//
// Threads get whole filters: thread t computes filters part[t] .. part[t+1]-1 of every image, so
// the caller decides the split — by filter count (a static schedule) or by the non-zeros each
// filter carries (a workload-balanced layer makes the two the same). The seconds each thread spent
// are returned, so a split can be measured.
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CHUNK = 64;  // output values kept in registers (4 AVX-512 vectors) while a filter's taps add in

// 16 floats as one value: GCC / Clang vector extensions, one zmm register with AVX-512, two ymm with AVX2.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);  // an unaligned load
  return v;
}

inline v16 splat(float x) { return v16{} + x; }

// Stride 1: every tap is the same shift for the whole plane once the output is laid out on the padded
// input's row pitch (Wp, the last Wp - Wo columns of each row junk). A chunk of CHUNK outputs is
// accumulated over ALL of the filter's non-zeros in registers, loaded and stored once: per non-zero
// one contiguous CHUNK-float load and CHUNK FMAs. xp carries enough extra zero rows at its bottom
// that a chunk's reads past the last output row stay inside the channel's plane.
void rows_s1(const float* xp, float* out, const int64_t* crow, const int64_t* off, const float* val,
             const float* bias, const float* scale, int64_t f0, int64_t f1, int64_t N, int64_t C, int64_t Hp,
             int64_t Wp, int64_t F, int64_t Ho, int64_t Wo) {
  const int64_t L = Ho * Wp, chunks = (L + CHUNK - 1) / CHUNK;
  std::vector<float> pitch(chunks * CHUNK);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = xp + n * C * Hp * Wp;
    for (int64_t f = f0; f < f1; ++f) {
      const float b = bias ? bias[f] : 0.f;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        v16 a0 = splat(scale ? 0.f : b), a1 = a0, a2 = a0, a3 = a0;  // CHUNK = 4 × 16 floats, in registers
        const float* base = xn + ch * CHUNK;
        for (int64_t j = crow[f]; j < crow[f + 1]; ++j) {
          const v16 w = splat(val[j]);
          const float* in = base + off[j];
          a0 += w * load(in);
          a1 += w * load(in + 16);
          a2 += w * load(in + 32);
          a3 += w * load(in + 48);
        }
        if (scale) {  // the epilogue of a BatchNorm folded as a per-filter scale (the weights stay codes)
          const v16 sc = splat(scale[f]), bb = splat(b);
          a0 = a0 * sc + bb;
          a1 = a1 * sc + bb;
          a2 = a2 * sc + bb;
          a3 = a3 * sc + bb;
        }
        float* dst = pitch.data() + ch * CHUNK;
        std::memcpy(dst, &a0, 64);
        std::memcpy(dst + 16, &a1, 64);
        std::memcpy(dst + 32, &a2, 64);
        std::memcpy(dst + 48, &a3, 64);
      }
      float* o = out + (n * F + f) * Ho * Wo;
      for (int64_t y = 0; y < Ho; ++y) std::copy(pitch.data() + y * Wp, pitch.data() + y * Wp + Wo, o + y * Wo);
    }
  }
}

// Any stride: one scaled, shifted add of an input plane into the output plane per non-zero.
void rows_any(const float* xp, float* out, const int64_t* crow, const int64_t* off, const float* val,
              const float* bias, const float* scale, int64_t f0, int64_t f1, int64_t N, int64_t C, int64_t Hp,
              int64_t Wp, int64_t F, int64_t Ho, int64_t Wo, int64_t s) {
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = xp + n * C * Hp * Wp;
    for (int64_t f = f0; f < f1; ++f) {
      float* o = out + (n * F + f) * Ho * Wo;
      const float b = bias ? bias[f] : 0.f;
      for (int64_t i = 0; i < Ho * Wo; ++i) o[i] = scale ? 0.f : b;
      for (int64_t j = crow[f]; j < crow[f + 1]; ++j) {
        const float w = val[j];
        const float* xc = xn + off[j];
        for (int64_t y = 0; y < Ho; ++y) {
          const float* in = xc + y * s * Wp;
          float* orow = o + y * Wo;
          for (int64_t x = 0; x < Wo; ++x) orow[x] += w * in[x * s];
        }
      }
      if (scale)
        for (int64_t i = 0; i < Ho * Wo; ++i) o[i] = o[i] * scale[f] + b;
    }
  }
}

}  // namespace

// xp: (N, C, Hp, Wp) zero-padded input (stride 1: with enough extra zero rows at the bottom);
// scale (F,) optional: out = scale[f]·Σ + bias[f] (a BatchNorm folded without touching the weights);
// Ho, Wo: the output size. Returns {out (N, F, Ho, Wo), seconds per thread (T,)}.
std::vector<torch::Tensor> csr_conv(torch::Tensor xp, torch::Tensor crow, torch::Tensor col, torch::Tensor val,
                                    c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> scale,
                                    torch::Tensor part, int64_t KH, int64_t KW, int64_t stride, int64_t Ho,
                                    int64_t Wo) {
  TORCH_CHECK(xp.dim() == 4 && xp.scalar_type() == torch::kFloat && xp.is_contiguous(), "xp: contiguous fp32 NCHW");
  TORCH_CHECK(crow.scalar_type() == torch::kLong && part.scalar_type() == torch::kLong, "crow, part: int64");
  TORCH_CHECK(col.scalar_type() == torch::kInt && val.scalar_type() == torch::kFloat, "col: int32, val: fp32");
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous() && val.is_contiguous(), "CSR arrays: contiguous");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == torch::kFloat && bias->is_contiguous()), "bias: fp32");
  TORCH_CHECK(!scale.has_value() || (scale->scalar_type() == torch::kFloat && scale->is_contiguous()), "scale: fp32");
  const int64_t N = xp.size(0), C = xp.size(1), Hp = xp.size(2), Wp = xp.size(3), F = crow.numel() - 1;
  const int64_t T = part.numel() - 1, KK = KH * KW;
  TORCH_CHECK(stride != 1 || (KH - 1 + Ho) * Wp + KW - 1 + CHUNK <= Hp * Wp, "xp: too few extra rows for stride 1");
  auto out = torch::empty({N, F, Ho, Wo}, xp.options());
  auto secs = torch::zeros({T}, torch::kDouble);
  // each non-zero's offset into an image: its channel's plane, shifted by its tap
  const int64_t nnz = col.numel();
  std::vector<int64_t> off(nnz);
  const int32_t* cl = col.data_ptr<int32_t>();
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t c = cl[j] / KK, tap = cl[j] % KK;
    off[j] = c * Hp * Wp + (tap / KW) * Wp + tap % KW;
  }
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* sc = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const int64_t* p = part.data_ptr<int64_t>();
  double* sp = secs.data_ptr<double>();
  const float* x = xp.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* cr = crow.data_ptr<int64_t>();
  const float* v = val.data_ptr<float>();
#pragma omp parallel num_threads(static_cast<int>(T))
  {
    const int t = omp_get_thread_num();
    const auto t0 = std::chrono::steady_clock::now();
    if (stride == 1)
      rows_s1(x, o, cr, off.data(), v, b, sc, p[t], p[t + 1], N, C, Hp, Wp, F, Ho, Wo);
    else
      rows_any(x, o, cr, off.data(), v, b, sc, p[t], p[t + 1], N, C, Hp, Wp, F, Ho, Wo, stride);
    sp[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return {out, secs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("csr_conv", &csr_conv, "sparse conv2d: CSR over filters, one shifted add per non-zero tap");
  m.attr("CHUNK") = CHUNK;
}
