// The launchers' sizes, taken from the views' shapes and checked against each other before any
// pointer is touched. A mismatch is a bug in the caller (gapkern/ops checks its arguments first):
// std::invalid_argument, a ValueError in Python.
#pragma once

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "gapkern.h"

namespace gapkern {

// `got` must equal `want`: "<name>: expected <want> <dim> (<why>), got <got>".
inline void expect_size(const char* name, const char* dim, int64_t got, int64_t want, const char* why) {
  if (got != want)
    throw std::invalid_argument(std::string("gapkern cuda backend: ") + name + ": expected " + std::to_string(want) +
                                " " + dim + " (" + why + "), got " + std::to_string(got));
}

// A size the kernels index with int.
inline int size_of(const char* name, int64_t n) {
  if (n < 0 || n > INT_MAX)
    throw std::invalid_argument(std::string("gapkern cuda backend: ") + name + ": size " + std::to_string(n) +
                                " is outside [0, " + std::to_string(INT_MAX) + "]");
  return int(n);
}

template <typename M>
inline void expect_shape(const char* name, const M& m, int64_t rows, int64_t cols, const char* rows_why,
                         const char* cols_why) {
  expect_size(name, "rows", m.rows, rows, rows_why);
  expect_size(name, "columns", m.cols, cols, cols_why);
}

// An output view read back by a later launch.
inline Mat readable(const OutMat& m) { return Mat{m.p, m.rows, m.cols, m.s0, m.s1}; }

struct Sizes {
  int B, D, d;
};

// The sizes of a latent step: hidden (B, D) and out (B, D); a head of rank d whose weight has D rows
// (weight_D, weight_d: its shape as (D, d), whatever its layout) and basis (D, d).
inline Sizes latent_sizes(const LatentArgs& a, int64_t weight_D, int64_t weight_d, int64_t basis_D,
                          int64_t basis_d) {
  const Sizes s{size_of("hidden rows", a.hidden.rows), size_of("hidden columns", a.hidden.cols),
                size_of("weight columns", weight_d)};
  expect_size("weight", "rows", weight_D, s.D, "D, the columns of hidden");
  expect_size("basis", "rows", basis_D, s.D, "D, the columns of hidden");
  expect_size("basis", "columns", basis_d, s.d, "d, the rank of weight");
  expect_shape("out", a.out, s.B, s.D, "B, the rows of hidden", "D, the columns of hidden");
  return s;
}

}  // namespace gapkern
