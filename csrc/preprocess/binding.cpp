// pybind11 bindings of the preprocess op: the resample + crop + normalise
// stage for a batch of decoded images (decoding stays in Python/Pillow).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/array_checks.h"
#include "common/thread_pool.h"
#include "preprocess/preprocess_dispatch.h"

namespace py = pybind11;

namespace tallow {
namespace {

constexpr const char* kOp = "preprocess";

struct Batch {
  std::vector<preprocess::ImageJob> jobs;
  std::vector<std::string> errors;  // per job, empty = ok
  int64_t resize, crop;
  const float* lut;
};

void run_range(void* ctx, int64_t begin, int64_t end) {
  auto* b = static_cast<Batch*>(ctx);
  const int64_t n_out = 3 * b->crop * b->crop;
  for (int64_t i = begin; i < end; ++i) {
    const preprocess::ImageJob& job = b->jobs[(size_t)i];
    try {
      if (job.src == nullptr) {
        std::memset(job.out, 0, sizeof(float) * (size_t)n_out);
      } else {
        preprocess::run(job, b->resize, b->crop, b->lut);
      }
    } catch (const std::exception& e) {  // exceptions must not leave parallel_for
      b->errors[(size_t)i] = e.what();
      std::memset(job.out, 0, sizeof(float) * (size_t)n_out);
    }
  }
}

// images: list of uint8 arrays of shape (H, W, 3) with any strides (views of
// flips/rotations/grayscale broadcasts are fine) or None (row zero-filled);
// out: float32 [N, 3, crop, crop] C-contiguous, written in place;
// lut: float32 [3, 256], the normalisation table.
// Returns one entry per image: None, or the message of a failure of that
// image alone (its row is zero-filled); argument errors raise.
py::list resample_batch(py::list images, py::array out, py::array lut, int64_t resize, int64_t crop,
                        bool parallel) {
  if (crop < 1) throw py::value_error(std::string(kOp) + ": crop must be >= 1, got " + std::to_string(crop));
  if (resize < crop)
    throw py::value_error(std::string(kOp) + ": resize must be >= crop, got resize=" + std::to_string(resize) +
                          " and crop=" + std::to_string(crop));
  check_array<float>(kOp, "out", out, 4);
  check_dim(kOp, "out", out, 0, (py::ssize_t)images.size());
  check_dim(kOp, "out", out, 1, 3);
  check_dim(kOp, "out", out, 2, crop);
  check_dim(kOp, "out", out, 3, crop);
  if (!out.writeable()) throw py::value_error(std::string(kOp) + ": out must be writeable");
  check_array<float>(kOp, "lut", lut, 2);
  check_dim(kOp, "lut", lut, 0, 3);
  check_dim(kOp, "lut", lut, 1, 256);

  Batch b;
  b.resize = resize;
  b.crop = crop;
  b.lut = static_cast<const float*>(lut.data());
  float* out_base = static_cast<float*>(out.mutable_data());
  std::vector<py::array> keep;  // the arrays stay referenced while the GIL is released
  keep.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    preprocess::ImageJob job{};
    job.out = out_base + (int64_t)i * 3 * crop * crop;
    py::handle item = images[i];
    if (!item.is_none()) {
      if (!py::isinstance<py::array>(item))
        throw py::type_error(std::string(kOp) + ": image " + std::to_string(i) + " must be a numpy array, got " +
                             std::string(py::str(item.get_type().attr("__name__"))));
      py::array a = py::reinterpret_borrow<py::array>(item);
      const std::string name = "image " + std::to_string(i);
      check_array<uint8_t>(kOp, name.c_str(), a, 3, /*contiguous=*/false);
      check_dim(kOp, name.c_str(), a, 2, 3);
      if (a.shape(0) < 1 || a.shape(1) < 1)
        throw py::value_error(std::string(kOp) + ": " + name + " is empty, shape " + shape_str(a));
      if (a.shape(0) > (1 << 30) || a.shape(1) > (1 << 30) / 3)
        throw py::value_error(std::string(kOp) + ": " + name + " is too large, shape " + shape_str(a));
      job.src = static_cast<const uint8_t*>(a.data());
      job.in_h = a.shape(0);
      job.in_w = a.shape(1);
      job.stride_y = a.strides(0);
      job.stride_x = a.strides(1);
      job.stride_c = a.strides(2);
      keep.push_back(a);
    }
    b.jobs.push_back(job);
  }
  b.errors.assign(b.jobs.size(), std::string());
  {
    py::gil_scoped_release release;
    const int64_t n = (int64_t)b.jobs.size();
    if (parallel && n > 1) parallel_for(n, 1, run_range, &b);
    else run_range(&b, 0, n);
  }
  py::list result;
  for (const std::string& e : b.errors) {
    if (e.empty()) result.append(py::none());
    else result.append(py::str(e));
  }
  return result;
}

}  // namespace

void register_preprocess(py::module_& m) {
  m.def("preprocess_resample", &resample_batch, py::arg("images"), py::arg("out"), py::arg("lut"),
        py::arg("resize"), py::arg("crop"), py::arg("parallel") = true,
        "Resize (Pillow's antialiased bilinear, bit-exact), center-crop and normalise decoded uint8 "
        "(H, W, 3) images into out[N, 3, crop, crop] through lut[3, 256]; None rows are zero-filled. "
        "Runs across images in tallow's thread pool with the GIL released. Returns a list with None "
        "or an error message per image (failed rows are zero-filled).");
  m.def("preprocess_geometry", [](int64_t h, int64_t w, int64_t resize, int64_t crop) {
    const preprocess::Geometry g = preprocess::geometry(h, w, resize, crop);
    return py::make_tuple(g.out_h, g.out_w, g.top, g.left);
  }, py::arg("height"), py::arg("width"), py::arg("resize"), py::arg("crop"),
     "(resized_h, resized_w, top, left) of torchvision's Resize(resize) + CenterCrop(crop).");
}

}  // namespace tallow
