// CPU kernel that turns uint8 images into the model's input: gather a crop of each requested image
// (any input layout) and map its pixels to normalised floats, in one pass, straight into the
// requested memory layout. Used by the in-memory loader's batch step (pipelines/memory.py) and by
// pipelines.normalize for the JPEG loaders' batches. The torch formulation (gather, then
// multiply-add, then a layout copy) makes up to three passes; on FFCV's NHWC batches its
// mixed-layout multiply-add alone took 3-4x as long as FFCV's whole read-crop-resize (measured).
//
// The pixel map is a [C, 256] float table built by the caller with the same torch ops as its own
// path, so both paths give bitwise-equal batches.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace dhm {
namespace {

// Where one sample's crop starts, and the input's strides in elements (any layout: the memory
// loader stores NCHW, FFCV and DALI hand over NHWC).
struct Source {
  const uint8_t* origin;
  int64_t sc, sy, sx;
};

// One crop into [C, H, W].
void copy_planes(const Source& in, float* dst, const float* lut, int64_t c, int64_t height, int64_t width) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* map = lut + ch * 256;
    for (int64_t y = 0; y < height; ++y) {
      const uint8_t* row = in.origin + ch * in.sc + y * in.sy;
      for (int64_t x = 0; x < width; ++x) {
        *dst++ = map[row[x * in.sx]];
      }
    }
  }
}

// One crop into [H, W, C], written in order; kChannels > 0 fixes C at compile time.
template <int kChannels>
void copy_interleaved(const Source& in, float* dst, const float* lut, int64_t c, int64_t height, int64_t width) {
  const int64_t channels = kChannels > 0 ? kChannels : c;
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = in.origin + y * in.sy;
    for (int64_t x = 0; x < width; ++x) {
      const uint8_t* pixel = row + x * in.sx;
      for (int64_t ch = 0; ch < channels; ++ch) {
        *dst++ = lut[ch * 256 + pixel[ch * in.sc]];
      }
    }
  }
}

at::Tensor crop_normalize_cpu(const at::Tensor& images, const at::Tensor& source, const at::Tensor& offsets,
                              int64_t height, int64_t width, const at::Tensor& table, bool channels_last) {
  TORCH_CHECK(images.dim() == 4 && images.scalar_type() == at::kByte,
              "crop_normalize: images must be a uint8 [N, C, H, W] tensor, got ",
              images.scalar_type(), " ", images.sizes());
  const int64_t n = images.size(0), c = images.size(1), hp = images.size(2), wp = images.size(3);
  const int64_t b = source.numel();
  TORCH_CHECK(source.dim() == 1 && source.scalar_type() == at::kLong,
              "crop_normalize: source must be int64 [B], got ", source.scalar_type(), " ", source.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 2 && offsets.size(0) == b &&
                  offsets.size(1) == 2,
              "crop_normalize: offsets must be int64 [B, 2] (row, column), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(height >= 1 && width >= 1 && height <= hp && width <= wp, "crop_normalize: a ", height, "x",
              width, " crop does not fit ", hp, "x", wp, " images");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) == c &&
                  table.size(1) == 256,
              "crop_normalize: table must be float32 [C, 256], got ", table.scalar_type(), " ", table.sizes());
  for (const auto* t : {&images, &source, &offsets, &table}) {
    TORCH_CHECK(t->device().is_cpu(), "crop_normalize: every tensor must be on the CPU");
  }

  const auto src_idx = source.contiguous();
  const auto off = offsets.contiguous();
  const auto lut = table.contiguous();
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({b, c, height, width}, images.options().dtype(at::kFloat), format);

  const int64_t* s_ptr = src_idx.data_ptr<int64_t>();
  const int64_t* o_ptr = off.data_ptr<int64_t>();
  // Check every index before any thread reads pixels.
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(s_ptr[i] >= 0 && s_ptr[i] < n, "crop_normalize: source index ", s_ptr[i], " is out of range [0, ",
                n, ")");
    const int64_t y0 = o_ptr[2 * i], x0 = o_ptr[2 * i + 1];
    TORCH_CHECK(y0 >= 0 && x0 >= 0 && y0 + height <= hp && x0 + width <= wp, "crop_normalize: crop at (", y0,
                ", ", x0, ") leaves the ", hp, "x", wp, " image");
  }

  const uint8_t* img = images.data_ptr<uint8_t>();
  const float* lut_ptr = lut.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t sn = images.stride(0), sc = images.stride(1), sy = images.stride(2), sx = images.stride(3);
  const int64_t sample_out = c * height * width;
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Source in{img + s_ptr[i] * sn + o_ptr[2 * i] * sy + o_ptr[2 * i + 1] * sx, sc, sy, sx};
      float* dst = out_ptr + i * sample_out;
      if (!channels_last) {
        copy_planes(in, dst, lut_ptr, c, height, width);
      } else if (c == 3) {  // RGB and grey: a fixed channel count lets the compiler unroll them
        copy_interleaved<3>(in, dst, lut_ptr, c, height, width);
      } else if (c == 1) {
        copy_interleaved<1>(in, dst, lut_ptr, c, height, width);
      } else {
        copy_interleaved<0>(in, dst, lut_ptr, c, height, width);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace dhm

TORCH_LIBRARY_IMPL(dhm_fast, CPU, m) { m.impl("crop_normalize", &dhm::crop_normalize_cpu); }
