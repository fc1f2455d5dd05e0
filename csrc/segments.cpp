// peft_fast._C: mixed-adapter batch ops, registered as torch.ops.peft_fast_C.*
// (the namespace `peft_fast` belongs to the Python custom ops of peft_fast/ops.py).
//
// CPU kernels in plain C++ (counting sort, row copies with at::parallel_for), autograd for
// gather/scatter, and Meta kernels for them so they trace under torch.compile. The fake of
// segment_metadata (its `active` output has a data-dependent length) is registered in Python
// by peft_fast/_segments.py. CUDA kernels live in segments_cuda.cu.
//
// Light headers only (per-operator ATen headers, torch/library.h, the autograd Function
// header; no ATen/ATen.h, no torch/extension.h, no pybind11) to keep the build short: the
// module has no Python functions, importing it just runs the registrations below.
#include <Python.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "segments.h"

namespace peft_fast_C {

// ------------------------------------------------------------------------------ checks
// Python's spelling ("torch.float32"), so errors read the same on both paths.
static const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return c10::toString(t);
  }
}

void check_segment_args(const at::Tensor& adapter_idx, int64_t n_adapters) {
  TORCH_CHECK_TYPE(adapter_idx.scalar_type() == at::kInt || adapter_idx.scalar_type() == at::kLong,
                   "segment_metadata: adapter_idx must be int32 or int64, got ",
                   dtype_name(adapter_idx.scalar_type()));
  TORCH_CHECK_VALUE(adapter_idx.dim() == 1, "segment_metadata: adapter_idx must be 1-D [T], got shape ",
                    adapter_idx.sym_sizes());
  TORCH_CHECK_VALUE(n_adapters >= 0, "segment_metadata: n_adapters must be >= 0, got ", n_adapters);
}

void throw_adapter_out_of_range(int64_t value, int64_t position, int64_t n_adapters) {
  TORCH_CHECK_VALUE(false, "segment_metadata: adapter index ", value, " at position ", position,
                    " is out of range [-1, ", n_adapters, ") for n_adapters=", n_adapters,
                    " (-1 means no adapter)");
  abort();  // unreachable: TORCH_CHECK_VALUE(false, ...) always throws
}

static bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

static void check_row_index(const char* op, const at::Tensor& index, const char* data_name, const at::Tensor& data) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
                   dtype_name(index.scalar_type()));
  TORCH_CHECK_VALUE(index.dim() == 1, op, ": index must be 1-D, got shape ", index.sym_sizes());
  TORCH_CHECK_VALUE(index.device() == data.device(), op, ": index is on ", index.device(), " but ", data_name,
                    " is on ", data.device());
}

void check_gather_args(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK_VALUE(x.dim() == 2, "gather_rows: x must be 2-D [T, K], got shape ", x.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "gather_rows: x must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(x.scalar_type()));
  check_row_index("gather_rows", index, "x", x);
}

void check_scatter_args(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK_VALUE(out.dim() == 2, "scatter_add_rows: out must be 2-D [T, N], got shape ", out.sym_sizes());
  TORCH_CHECK_VALUE(src.dim() == 2, "scatter_add_rows: src must be 2-D [T', N], got shape ", src.sym_sizes());
  TORCH_CHECK_TYPE(is_supported_float(out.scalar_type()),
                   "scatter_add_rows: out must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(out.scalar_type()));
  TORCH_CHECK_TYPE(src.scalar_type() == out.scalar_type(), "scatter_add_rows: src dtype ",
                   dtype_name(src.scalar_type()), " does not match out dtype ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(src.device() == out.device(), "scatter_add_rows: src is on ", src.device(),
                    " but out is on ", out.device());
  check_row_index("scatter_add_rows", index, "out", out);
  TORCH_CHECK_VALUE(src.sym_size(1) == out.sym_size(1), "scatter_add_rows: src has ", src.sym_size(1),
                    " columns but out has ", out.sym_size(1));
  TORCH_CHECK_VALUE(index.sym_size(0) == src.sym_size(0), "scatter_add_rows: index has ", index.sym_size(0),
                    " entries but src has ", src.sym_size(0), " rows");
}

// Every row index in [0, n_rows); CPU only (CUDA kernels assert on the device instead).
static void check_rows_in_range_cpu(const char* op, const char* what, const int64_t* index, int64_t n,
                                    int64_t n_rows) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = index[i];
    TORCH_CHECK_INDEX(v >= 0 && v < n_rows, op, ": index ", v, " at position ", i, " is out of range for ",
                      what, " with ", n_rows, " rows");
  }
}

// About this many elements per parallel chunk: below it, threads cost more than they save.
constexpr int64_t kGrainElems = 32768;

// ------------------------------------------------------------------------------ CPU
// Counting sort: one pass counts (and validates), one pass places each token after the
// earlier tokens of its group, so the order is stable. O(T + n_adapters).
static MetadataOut segment_metadata_cpu(const at::Tensor& adapter_idx, int64_t n_adapters) {
  check_segment_args(adapter_idx, n_adapters);
  const at::Tensor idx = adapter_idx.contiguous();
  const int64_t T = idx.size(0);
  const auto opts = idx.options().dtype(at::kLong);
  at::Tensor order = at::empty({T}, opts);
  std::vector<int64_t> next(n_adapters + 1, 0);  // bin 0 is "-1" (base model)

  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "segment_metadata_cpu", [&] {
    const index_t* p = idx.const_data_ptr<index_t>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = static_cast<int64_t>(p[t]);
      if (v < -1 || v >= n_adapters) throw_adapter_out_of_range(v, t, n_adapters);
      ++next[v + 1];
    }
    int64_t run = 0;  // counts -> exclusive prefix sums (first slot of each bin)
    for (int64_t b = 0; b <= n_adapters; ++b) {
      const int64_t c = next[b];
      next[b] = run;
      run += c;
    }
    int64_t* o = order.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) o[next[static_cast<int64_t>(p[t]) + 1]++] = t;
  });

  // After placement next[b] is the end of bin b, so bin a+1 (adapter a) spans
  // [next[a], next[a+1]).
  at::Tensor counts = at::empty({n_adapters}, opts);
  at::Tensor starts = at::empty({n_adapters}, opts);
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* s = starts.data_ptr<int64_t>();
  int64_t n_active = 0;
  for (int64_t a = 0; a < n_adapters; ++a) {
    s[a] = next[a];
    c[a] = next[a + 1] - next[a];
    n_active += c[a] > 0;
  }
  at::Tensor active = at::empty({n_active}, opts);
  int64_t* act = active.data_ptr<int64_t>();
  for (int64_t a = 0, j = 0; a < n_adapters; ++a)
    if (c[a] > 0) act[j++] = a;
  return {order, counts, starts, active};
}

static at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_gather_args(x, index);
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.size(0), K = x.size(1);
  at::Tensor out = at::empty({n, K}, x.options());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  check_rows_in_range_cpu("gather_rows", "x", ip, n, x.size(0));
  if (n == 0 || K == 0) return out;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrainElems / K), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* src = xp + ip[i] * s0;
        scalar_t* dst = op + i * K;
        if (s1 == 1) {
          std::memcpy(dst, src, K * sizeof(scalar_t));
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k] = src[k * s1];
        }
      }
    });
  });
  return out;
}

// Each output row j = out[j] + the src rows with index j, in index order, summed in opmath
// (fp32 for half/bf16) and rounded once: the reference's formula. The contributions are
// grouped per output row first (a stable counting sort), so threads own whole rows: no
// races, no atomics, the same bits for any thread count.
template <typename scalar_t>
static void scatter_add_rows_kernel(scalar_t* rp,                       // [T, N] contiguous, holds out
                                    const scalar_t* sp, int64_t ss0, int64_t ss1,  // src [n, N], strided
                                    const std::vector<int64_t>& row_start,  // [T + 1]
                                    const std::vector<int64_t>& by_row,     // [n]
                                    int64_t T, int64_t N) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, T, std::max<int64_t>(1, kGrainElems / N), [&](int64_t j0, int64_t j1) {
    std::vector<opmath_t> buf;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = row_start[j], e = row_start[j + 1];
      if (b == e) continue;
      scalar_t* r = rp + j * N;
      opmath_t* acc;
      if constexpr (std::is_same_v<opmath_t, scalar_t>) {
        acc = r;  // fp32/fp64: accumulate in place
      } else {
        buf.resize(N);
        acc = buf.data();
        for (int64_t c = 0; c < N; ++c) acc[c] = static_cast<opmath_t>(r[c]);
      }
      for (int64_t k = b; k < e; ++k) {
        const scalar_t* s = sp + by_row[k] * ss0;
        if (ss1 == 1) {
          for (int64_t c = 0; c < N; ++c) acc[c] += static_cast<opmath_t>(s[c]);
        } else {
          for (int64_t c = 0; c < N; ++c) acc[c] += static_cast<opmath_t>(s[c * ss1]);
        }
      }
      if constexpr (!std::is_same_v<opmath_t, scalar_t>) {
        for (int64_t c = 0; c < N; ++c) r[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

static at::Tensor scatter_add_rows_cpu(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index) {
  check_scatter_args(out, src, index);
  at::Tensor res = out.clone(at::MemoryFormat::Contiguous);
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.size(0), T = out.size(0), N = out.size(1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  check_rows_in_range_cpu("scatter_add_rows", "out", ip, n, T);
  if (n == 0 || N == 0) return res;

  // CSR of contributions: by_row[row_start[j] : row_start[j + 1]] are the i with index[i] == j.
  std::vector<int64_t> row_start(T + 1, 0), by_row(n);
  for (int64_t i = 0; i < n; ++i) ++row_start[ip[i] + 1];
  for (int64_t j = 0; j < T; ++j) row_start[j + 1] += row_start[j];
  {
    std::vector<int64_t> next(row_start.begin(), row_start.end() - 1);
    for (int64_t i = 0; i < n; ++i) by_row[next[ip[i]]++] = i;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_add_rows_cpu", [&] {
    scatter_add_rows_kernel<scalar_t>(res.data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), src.stride(0),
                                      src.stride(1), row_start, by_row, T, N);
  });
  return res;
}

// ------------------------------------------------------------------------------ Meta
// Shapes only, with SymInts so torch.compile keeps sizes symbolic.
static at::Tensor gather_rows_meta(const at::Tensor& x, const at::Tensor& index) {
  check_gather_args(x, index);
  return at::empty_symint({index.sym_size(0), x.sym_size(1)}, x.options());
}

static at::Tensor scatter_add_rows_meta(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index) {
  check_scatter_args(out, src, index);
  return at::empty_symint(out.sym_sizes(), out.options());
}

// ------------------------------------------------------------------------------ Autograd
// In C++ rather than torch.library.register_autograd: a Python autograd kernel would run on
// every eager call, grad or no grad (~6 us each). The backward formulas call the ops through
// the dispatcher, so they run on any device, trace under torch.compile, and differentiate
// again (double backward).
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

static at::Tensor call_gather_rows(const at::Tensor& x, const at::Tensor& index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peft_fast_C::gather_rows", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, index);
}

static at::Tensor call_scatter_add_rows(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peft_fast_C::scatter_add_rows", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(out, src, index);
}

// d x[index] / dx: the row gradients scattered back, duplicates accumulating.
class GatherRows : public torch::autograd::Function<GatherRows> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index) {
    ctx->save_for_backward({index});
    ctx->saved_data["n_rows"] = x.sym_size(0);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_gather_rows(x, index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor index = ctx->get_saved_variables()[0];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor zeros = at::zeros_symint({ctx->saved_data["n_rows"].toSymInt(), grad.sym_size(1)},
                                                grad.options());
      grad_x = call_scatter_add_rows(zeros, grad, index);
    }
    return {grad_x, at::Tensor()};
  }
};

// out + scatter(src): d/d out is the identity, d/d src the gradient rows gathered.
class ScatterAddRows : public torch::autograd::Function<ScatterAddRows> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& src,
                            const at::Tensor& index) {
    ctx->save_for_backward({index});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_scatter_add_rows(out, src, index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor index = ctx->get_saved_variables()[0];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_src = ctx->needs_input_grad(1) ? call_gather_rows(grad, index) : at::Tensor();
    return {ctx->needs_input_grad(0) ? grad : at::Tensor(), grad_src, at::Tensor()};
  }
};

static at::Tensor gather_rows_autograd(const at::Tensor& x, const at::Tensor& index) {
  return GatherRows::apply(x, index);
}

static at::Tensor scatter_add_rows_autograd(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index) {
  return ScatterAddRows::apply(out, src, index);
}

}  // namespace peft_fast_C

// ------------------------------------------------------------------------------ registration
TORCH_LIBRARY(peft_fast_C, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("segment_metadata(Tensor adapter_idx, int n_adapters) -> (Tensor order, Tensor counts, Tensor starts, "
        "Tensor active)", tags);
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor", tags);
  m.def("scatter_add_rows(Tensor out, Tensor src, Tensor index) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(peft_fast_C, CPU, m) {
  m.impl("segment_metadata", &peft_fast_C::segment_metadata_cpu);
  m.impl("gather_rows", &peft_fast_C::gather_rows_cpu);
  m.impl("scatter_add_rows", &peft_fast_C::scatter_add_rows_cpu);
}

TORCH_LIBRARY_IMPL(peft_fast_C, Autograd, m) {
  m.impl("gather_rows", &peft_fast_C::gather_rows_autograd);
  m.impl("scatter_add_rows", &peft_fast_C::scatter_add_rows_autograd);
}

TORCH_LIBRARY_IMPL(peft_fast_C, Meta, m) {
  m.impl("gather_rows", &peft_fast_C::gather_rows_meta);
  m.impl("scatter_add_rows", &peft_fast_C::scatter_add_rows_meta);
}

#ifdef PEFT_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(peft_fast_C, CUDA, m) {
  m.impl("segment_metadata", &peft_fast_C::segment_metadata_cuda);
  m.impl("gather_rows", &peft_fast_C::gather_rows_cuda);
  m.impl("scatter_add_rows", &peft_fast_C::scatter_add_rows_cuda);
}
#endif

// An empty Python module: `import peft_fast._C` loads the library, which runs the static
// registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
