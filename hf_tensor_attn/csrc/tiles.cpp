// The tile loops of `ops.exact.tiled` (`_python_tiles` and the loop of `_backward`), compiled: the same tiles and the
// same products as the Python loops (their GEMMs on the plain streams, see below), without the interpreter between
// them. A windowed pass does one tile per
// 16-query block, and the Python and dispatch time of its fifteen-odd small ops per block was about a quarter of the
// forward (docs/profile_attention.md).
//
// Built on first use by `ops.extension` (torch.utils.cpp_extension), for the vector instructions torch uses on this
// CPU and with OpenMP where torch has it. GEMMs are ATen ops (MKL); the per-(query, row key) products and sums and
// one pass per tile for the shift by the per-query reference (m, or lse and D), exp and masks are plain loops that
// the compiler vectorises. Heads are independent: where they divide evenly among torch's threads each thread runs
// the whole loop for its heads (`on_threads`), otherwise each step is split over the heads with at::parallel_for
// (`for_heads`). Differences from the Python loops: the shifts are
// subtracted in that pass instead of by a ones column in the GEMMs (whose operands are then the plain streams),
// every score is clamped at the exp floor, masked pairs are zeroed after exp instead of set to the floor before it,
// the forward's row sums are column sums of P instead of a ones column in vc, and the forward has no running max:
// it reports an allowed score more than a ceiling over its reference, and the caller runs the Python loops instead.
// Registered as torch.ops.hf_tensor_attn_cpu.forward_tiles and .backward_tiles, with two decode steps: .decode_step
// (the four-matrix one-query step) and .poly_step (the `poly` cache's step), each described where it is defined.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

// exp(x) for the tile passes, x clamped to [lo, hi] first. The float version is Cephes' expf (x = n ln2 + r with
// |r| <= ln2 / 2, a polynomial in r, 2^n written into the exponent bits) in plain arithmetic that the compiler
// vectorises along a tile row: ATen's vectorised exp cannot be called per row from here, and as ATen passes the
// shift, clamp and exp read and wrote the whole tile once more each. Relative error at most 2e-7 (test_extension.py
// checks [-50, 40] against float64); n stays in [-126, 127] over [lo, hi], so 2^n is a normal float.
template <typename scalar_t>
inline scalar_t exp_clamped(scalar_t x, scalar_t lo, scalar_t hi) {
  x = x < lo ? lo : x;  // NaN stays NaN: a NaN input must reach the output (`tiled._forward_op` checks for it)
  x = x > hi ? hi : x;
  return std::exp(x);
}

template <>
inline float exp_clamped<float>(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Adding 1.5 * 2^23 rounds x / ln2 to the integer n and leaves n in the low bits of t, read from there for 2^n
  // (unsigned arithmetic: a NaN gives some exponent, and p is NaN anyway).
  const float t = x * 1.44269504088896341f + 12582912.0f, n = t - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4B400000u + 127u) << 23;  // t's bits are those of 1.5 * 2^23 plus n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The largest argument the backward's pass clamps to, under exp's overflow: its allowed scores minus their log-sum-exp
// are at most 0, masked entries may exceed it (later keys) and are zeroed anyway. The forward's pass clamps at the
// caller's ceiling instead and reports allowed arguments above it (see exp_scores).
template <typename scalar_t>
constexpr scalar_t exp_ceiling() { return std::is_same_v<scalar_t, float> ? scalar_t(88) : scalar_t(709); }

// The queries [lo, hi) of a block [t0, t0 + bq) that may use column key `key`: b <= t and, with a column window,
// t - b < w_col; none for a padded key. All of them when the column block is not masked.
inline std::pair<int64_t, int64_t> column_users(int64_t key, int64_t bq, int64_t t0, int64_t w_col, bool col_masked,
                                                const bool* col_pad) {
  if (!col_masked) return {0, bq};
  if (col_pad != nullptr && col_pad[key]) return {bq, bq};
  const int64_t lo = std::clamp<int64_t>(key - t0, 0, bq);
  return {lo, w_col > 0 ? std::clamp<int64_t>(key - t0 + w_col, lo, bq) : bq};
}

// The forward's pass over one head's column-major score tile p [bc, bq * ba] (row b = column key b, entry (t, j) of
// a row = query t, row key j): P = exp(max(p - m, floor)) where the pair is allowed, exactly 0 where it is not (set,
// never multiplied: a masked score may be infinite, a later key's), and sums [bq * ba] += the rows of P (sum_b P per
// (t, j)) while each row is in cache. m [bq * ba]: query t's reference score at every (t, j), so that the loops run
// over whole rows (per-query runs of ba = 32 entries cost more in loop overhead than in exp). `row_ok` [bq * ba] is
// false where row key j is later than t, before 0 or padding (nullptr: all allowed).
// Returns whether an allowed pair's p - m exceeded `hi` (clamped to it meanwhile): the caller then discards the
// result and takes the loops that move m (`tiled._python_tiles`). Counting here replaces a bound on every score
// computed before the loop, which cost several percent of a windowed forward, and is exact where the bound is not.
template <typename scalar_t>
bool exp_scores(scalar_t* __restrict__ p, int64_t bc, int64_t bq, int64_t ba, int64_t t0, int64_t col_start,
                int64_t w_col, bool col_masked, const bool* col_pad, const bool* row_ok, const scalar_t* __restrict__ m,
                scalar_t* __restrict__ sums, scalar_t floor, scalar_t hi) {
  const int64_t n = bq * ba;
  const auto* __restrict__ ok = reinterpret_cast<const uint8_t*>(row_ok);  // gcc vectorises byte loads, not bools
  int over = 0;  // an int OR over the row vectorises with the rest (a bool does not)
  for (int64_t b = 0; b < bc; ++b, p += n) {
    const auto [lo_t, hi_t] = column_users(col_start + b, bq, t0, w_col, col_masked, col_pad);
    std::fill(p, p + lo_t * ba, scalar_t(0));
    std::fill(p + hi_t * ba, p + n, scalar_t(0));
    if (ok != nullptr) {
      for (int64_t i = lo_t * ba; i < hi_t * ba; ++i) {
        const scalar_t x = p[i] - m[i], e = exp_clamped(x, floor, hi);  // computed either way: a select vectorises
        over |= ok[i] & (x > hi);
        p[i] = ok[i] ? e : scalar_t(0);
        sums[i] += p[i];
      }
    } else {
      for (int64_t i = lo_t * ba; i < hi_t * ba; ++i) {
        const scalar_t x = p[i] - m[i];
        over |= x > hi;
        p[i] = exp_clamped(x, floor, hi);
        sums[i] += p[i];
      }
    }
  }
  return over != 0;
}

// The backward's pass over one head's tiles s = S and dp = dP ([bc, bq * ba] each, as in exp_scores): s becomes
// P = exp(max(s - lse, floor)) and dp becomes dS = P * (dp - D) on the allowed pairs, both exactly 0 elsewhere.
// lse, D [bq * ba]: query t's log-sum-exp and <dO_t, o_t> at every (t, j), as m in exp_scores.
template <typename scalar_t>
void exp_score_grads(scalar_t* __restrict__ s, scalar_t* __restrict__ dp, int64_t bc, int64_t bq, int64_t ba,
                     int64_t t0, int64_t col_start, int64_t w_col, bool col_masked, const bool* col_pad,
                     const bool* row_ok, const scalar_t* __restrict__ lse, const scalar_t* __restrict__ D,
                     scalar_t floor) {
  const int64_t n = bq * ba;
  const scalar_t hi = exp_ceiling<scalar_t>();
  const auto* __restrict__ ok = reinterpret_cast<const uint8_t*>(row_ok);
  for (int64_t b = 0; b < bc; ++b, s += n, dp += n) {
    const auto [lo_t, hi_t] = column_users(col_start + b, bq, t0, w_col, col_masked, col_pad);
    for (scalar_t* x : {s, dp}) {
      std::fill(x, x + lo_t * ba, scalar_t(0));
      std::fill(x + hi_t * ba, x + n, scalar_t(0));
    }
    if (ok != nullptr) {
      for (int64_t i = lo_t * ba; i < hi_t * ba; ++i) {
        const scalar_t e = exp_clamped(s[i] - lse[i], floor, hi), P = ok[i] ? e : scalar_t(0);
        s[i] = P;
        dp[i] = ok[i] ? P * (dp[i] - D[i]) : scalar_t(0);
      }
    } else {
      for (int64_t i = lo_t * ba; i < hi_t * ba; ++i) {
        const scalar_t P = exp_clamped(s[i] - lse[i], floor, hi);
        s[i] = P;
        dp[i] = P * (dp[i] - D[i]);
      }
    }
  }
}

// out [BH, bq * ba]: x [BH, Tq] of query start + t at every entry (t, j) (the per-query shifts of the exp passes).
template <typename scalar_t>
void spread_rows(scalar_t* out, const scalar_t* x, int64_t Tq, int64_t start, int64_t BH, int64_t bq, int64_t ba) {
  for (int64_t h = 0; h < BH; ++h) {
    for (int64_t t = 0; t < bq; ++t, out += ba) std::fill(out, out + ba, x[h * Tq + start + t]);
  }
}

// Per (sequence, tile): true where row entry (t, j) of the tile may be used (see exp_scores). Row keys are a block
// [row_start, row_start + ba) shared by the queries, or, with a row window, key t - w_row + 1 + row_start + j.
void row_mask(bool* ok, int64_t bq, int64_t ba, int64_t t0, int64_t row_start, int64_t w_row, const bool* pad) {
  for (int64_t t = 0; t < bq; ++t) {
    for (int64_t j = 0; j < ba; ++j) {
      const int64_t key = w_row > 0 ? t0 + t - w_row + 1 + row_start + j : row_start + j;
      const bool allowed = key >= 0 && key <= t0 + t && (pad == nullptr || !pad[key]);
      ok[t * ba + j] = allowed;
    }
  }
}

// Runs f(h) for every head h < BH on torch's intra-op threads (`ops.extension` builds with OpenMP where torch uses
// it, and the OpenMP calls then go to torch's own runtime and its thread pool); serially in a build without OpenMP
// and inside on_threads' parallel region (at::parallel_for does not nest).
template <typename F>
void for_heads(int64_t BH, const F& f) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) f(h);
  });
}

// The per-(query, row key) steps of a tile, as loops over a head dimension of d contiguous values. As ATen
// ops (a broadcast mul, then a mul and a sum over the row keys) they were a fifth of a windowed forward:
// TensorIterator's setup and a fork and join per op weigh more than the few hundred kB each one touches, and the
// sums wrote a [BH, bq, ba, d] product only to read it back. `rows` maps (t, a) to a row of the row stream
// (`Plan::row_index`; negative before the first key); x and y are [heads, rows, width] contiguous.

// out [BH, bq, ba, width] = y[h, start + t] * x[h, rows(t, a)]
template <typename scalar_t, typename Rows>
void mul_rows(scalar_t* out, const Tensor& y, int64_t start, const Tensor& x, int64_t BH, int64_t bq, int64_t ba,
              Rows rows) {
  const int64_t width = y.size(2);
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  for_heads(BH, [&](int64_t h) {
    scalar_t* o = out + h * bq * ba * width;
    for (int64_t t = 0; t < bq; ++t) {
      const scalar_t* yt = yp + (h * y.size(1) + start + t) * width;
      for (int64_t a = 0; a < ba; ++a, o += width) {
        const int64_t row = rows(t, a);
        if (row < 0) {  // a window reaching before the first key: a zero row (its scores are masked)
          std::fill(o, o + width, scalar_t(0));
          continue;
        }
        const scalar_t* xa = xp + (h * x.size(1) + row) * width;
        for (int64_t k = 0; k < width; ++k) o[k] = yt[k] * xa[k];
      }
    }
  });
}

// For every entry (t, a) of a tile, one row of dst += p[h, (t, a)] * one row of src: dst's row is query start + t
// and src's the row key rows(t, a) (the sums over the row keys: num, dq), or, with `to_keys`, the other way round
// (the row-key gradients). p [BH, bq * ba, d] contiguous, src [BH, ., d]. Queries of a head share row
// keys, so only the heads run in parallel.
template <bool to_keys, typename scalar_t, typename Rows>
void add_products(Tensor& dst, const scalar_t* p, const Tensor& src, int64_t start, int64_t BH, int64_t bq,
                  int64_t ba, Rows rows) {
  const int64_t d = dst.size(2);
  scalar_t* dp = dst.data_ptr<scalar_t>();
  const scalar_t* sp = src.data_ptr<scalar_t>();
  for_heads(BH, [&](int64_t h) {
    const scalar_t* ph = p + h * bq * ba * d;
    for (int64_t t = 0; t < bq; ++t) {
      for (int64_t a = 0; a < ba; ++a, ph += d) {
        const int64_t key = rows(t, a);
        if (key < 0) continue;  // no key there: masked, p is zero
        scalar_t* out = dp + (h * dst.size(1) + (to_keys ? key : start + t)) * d;
        const scalar_t* other = sp + (h * src.size(1) + (to_keys ? start + t : key)) * d;
        for (int64_t k = 0; k < d; ++k) out[k] += ph[k] * other[k];
      }
    }
  });
}

// The plan of `tiles.pack` (blocks [nb, 7], rows and cols [n, 3]), its largest block sizes, and the masks and row
// views every tile of either pass needs.
struct Plan {
  at::TensorAccessor<int64_t, 2> B, R, C;
  int64_t max_bq = 1, max_ba = 1, max_bc = 1;
  int64_t w_row, w_col, heads, Tk;
  const bool* pad;  // [B, Tk], true at padding; nullptr without

  Plan(const Tensor& blocks, const Tensor& rows, const Tensor& cols, int64_t w_row, int64_t w_col,
       const Tensor& pad, int64_t heads, int64_t Tk)
      : B(blocks.accessor<int64_t, 2>()), R(rows.accessor<int64_t, 2>()), C(cols.accessor<int64_t, 2>()),
        w_row(w_row), w_col(w_col), heads(heads), Tk(Tk), pad(pad.numel() ? pad.data_ptr<bool>() : nullptr) {
    for (int64_t i = 0; i < blocks.size(0); ++i) max_bq = std::max(max_bq, B[i][1] - B[i][0]);
    for (int64_t i = 0; i < rows.size(0); ++i) max_ba = std::max(max_ba, R[i][1] - R[i][0]);
    for (int64_t i = 0; i < cols.size(0); ++i) max_bc = std::max(max_bc, C[i][1] - C[i][0]);
  }

  int64_t blocks() const { return B.size(0); }

  const bool* pad_of(int64_t h) const { return pad ? pad + (h / heads) * Tk : nullptr; }

  // The keys of the row stream that tile (t0, r) pairs with its queries: with a row window, query t's offsets j are
  // keys t0 + t - w_row + 1 + row_start + j (negative where the window starts before the sequence); without, the
  // block's keys row_start + j, shared by the queries.
  auto row_index(int64_t t0, int64_t r) const {
    const int64_t first = w_row > 0 ? t0 + R[r][0] - (w_row - 1) : R[r][0], step = w_row > 0 ? 1 : 0;
    return [first, step](int64_t t, int64_t a) { return first + step * t + a; };
  }

  // The row masks of tile (bi, r) for the sequences of heads [h0, h0 + BH) into ok [sequences, bq * ba] (heads of a
  // sequence share theirs; mask_of finds a head's), or nullptr when no row entry is masked.
  bool* row_masks(Tensor& ok_buf, int64_t h0, int64_t BH, int64_t t0, int64_t bq, int64_t r) const {
    if (R[r][2] == 0) return nullptr;
    const int64_t row_start = R[r][0], ba = R[r][1] - row_start;
    bool* ok = ok_buf.data_ptr<bool>();
    for (int64_t seq = h0 / heads; seq * heads < h0 + BH; ++seq) {  // none for no heads
      row_mask(ok + (seq - h0 / heads) * bq * ba, bq, ba, t0, row_start, w_row, pad_of(seq * heads));
    }
    return ok;
  }

  // Head h0 + h's row mask in what row_masks wrote for heads from h0 (n = bq * ba entries each).
  const bool* mask_of(const bool* ok, int64_t h0, int64_t h, int64_t n) const {
    return ok ? ok + ((h0 + h) / heads - h0 / heads) * n : nullptr;
  }

  // exp_scores on the tiles p [BH, bc, bq * ba] of column block c for heads [h0, h0 + BH), on torch's threads; m and
  // sums [BH, bq * ba], sums zeroed first when `first`; over[h] set for a head whose arguments exceeded `hi`.
  template <typename scalar_t>
  void exp_scores(scalar_t* p, const bool* ok, int64_t h0, int64_t BH, int64_t t0, int64_t bq, int64_t ba, int64_t c,
                  const scalar_t* m, scalar_t* sums, bool first, scalar_t floor, scalar_t hi, uint8_t* over) const {
    const int64_t bc = C[c][1] - C[c][0], n = bq * ba;
    for_heads(BH, [&](int64_t h) {
      if (first) std::fill(sums + h * n, sums + (h + 1) * n, scalar_t(0));
      over[h] |= ::exp_scores(p + h * bc * n, bc, bq, ba, t0, C[c][0], w_col, C[c][2] != 0, pad_of(h0 + h),
                              mask_of(ok, h0, h, n), m + h * n, sums + h * n, floor, hi);
    });
  }

  // exp_score_grads on the tiles s and dp [BH, bc, bq * ba] of column block c for heads [h0, h0 + BH), on torch's
  // threads; lse and D [BH, bq * ba].
  template <typename scalar_t>
  void exp_score_grads(scalar_t* s, scalar_t* dp, const bool* ok, int64_t h0, int64_t BH, int64_t t0, int64_t bq,
                       int64_t ba, int64_t c, const scalar_t* lse, const scalar_t* D, scalar_t floor) const {
    const int64_t bc = C[c][1] - C[c][0], n = bq * ba;
    for_heads(BH, [&](int64_t h) {
      ::exp_score_grads(s + h * bc * n, dp + h * bc * n, bc, bq, ba, t0, C[c][0], w_col, C[c][2] != 0,
                        pad_of(h0 + h), mask_of(ok, h0, h, n), lse + h * n, D + h * n, floor);
    });
  }
};

// Runs a pass's block loop run(begin, end) for heads [begin, end): where the heads divide evenly among torch's
// threads, one group of heads per thread, the whole loop each (one fork and join per call instead of several per
// tile, and each thread's tiles stay in its own core's cache; inside the parallel region ATen and MKL run the GEMMs
// on the calling thread); otherwise once over all heads, each step split over them (so that no thread waits on
// another's extra head).
template <typename F>
void on_threads(int64_t BH, const F& run) {
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || BH % threads != 0) {
    run(0, BH);
    return;
  }
  // torch's thread-local state (below autograd inside this op, grad mode) is the caller's: OpenMP's threads would
  // otherwise run the GEMMs through autograd
  const at::ThreadLocalState state;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    run(begin, end);
  });
}

// forward_impl's block loop for heads [h0, h0 + BH): q, m, kr, kc, vr, vc, num and l are those heads' slices, over
// [BH] their flags. It stops at the first tile with a score over the ceiling: the caller discards the result.
template <typename scalar_t>
void forward_heads(const Tensor& q, const Tensor& m, const Tensor& kr, const Tensor& kc, const Tensor& vr,
                   const Tensor& vc, Tensor& num, Tensor& l, const Plan& plan, int64_t h0, double floor,
                   double ceiling, uint8_t* over) {
  const int64_t BH = q.size(0), Tq = q.size(1), d = q.size(2);
  const auto& B = plan.B;
  const auto& C = plan.C;
  const int64_t n_max = plan.max_bq * plan.max_ba;
  auto opt = q.options();
  // Scratch reused by every tile (a fresh multi-MB tensor per tile costs page faults).
  Tensor qk_buf = at::empty({BH * n_max * d}, opt), pv_buf = at::empty({BH * n_max * d}, opt);
  Tensor s_buf = at::empty({BH * plan.max_bc * n_max}, opt);
  Tensor sums_buf = at::empty({BH * n_max}, opt), m_buf = at::empty({BH * n_max}, opt);
  Tensor ok_buf = at::empty({BH * n_max}, opt.dtype(at::kBool));
  scalar_t* lp = l.data_ptr<scalar_t>();
  scalar_t* m_rows = m_buf.data_ptr<scalar_t>();

  for (int64_t bi = 0; bi < plan.blocks(); ++bi) {
    const int64_t start = B[bi][0], bq = B[bi][1] - start, t0 = B[bi][2];
    for (int64_t r = B[bi][3]; r < B[bi][4]; ++r) {
      const int64_t ba = plan.R[r][1] - plan.R[r][0], n = bq * ba;
      const auto rows = plan.row_index(t0, r);
      Tensor qk = qk_buf.narrow(0, 0, BH * n * d).view({BH, n, d});  // rows (t, a): q_t * kr_a
      mul_rows(qk.data_ptr<scalar_t>(), q, start, kr, BH, bq, ba, rows);
      Tensor qk_cols = qk.transpose(1, 2);
      const bool* ok = plan.row_masks(ok_buf, h0, BH, t0, bq, r);
      Tensor pv = pv_buf.narrow(0, 0, BH * n * d).view({BH, n, d});  // P @ vc
      Tensor sums = sums_buf.narrow(0, 0, BH * n).view({BH, n});  // sum_b P per (t, a), added up by exp_scores
      spread_rows(m_rows, m.data_ptr<scalar_t>(), Tq, start, BH, bq, ba);
      for (int64_t c = B[bi][5]; c < B[bi][6]; ++c) {
        const int64_t col_start = C[c][0], bc = C[c][1] - col_start;
        // scores transposed, [BH, bc, bq*ba]: column-major, so a column key's mask is a run of one tile row
        Tensor s = s_buf.narrow(0, 0, BH * bc * n).view({BH, bc, n});
        at::bmm_out(s, kc.narrow(1, col_start, bc), qk_cols);
        plan.exp_scores(s.data_ptr<scalar_t>(), ok, h0, BH, t0, bq, ba, c, m_rows, sums.data_ptr<scalar_t>(),
                        c == B[bi][5], scalar_t(floor), scalar_t(ceiling), over);
        if (std::any_of(over, over + BH, [](uint8_t x) { return x != 0; })) return;
        Tensor vc_tile = vc.narrow(1, col_start, bc);
        if (c == B[bi][5]) {
          at::bmm_out(pv, s.transpose(1, 2), vc_tile);
        } else {
          pv.baddbmm_(s.transpose(1, 2), vc_tile);
        }
      }
      const scalar_t* sp = sums.data_ptr<scalar_t>();
      for (int64_t h = 0; h < BH; ++h) {
        for (int64_t t = 0; t < bq; ++t, sp += ba) lp[h * Tq + start + t] += std::accumulate(sp, sp + ba, scalar_t(0));
      }
      add_products<false>(num, pv.data_ptr<scalar_t>(), vr, start, BH, bq, ba, rows);  // num_t += (P vc)_(t, a) * vr_a
    }
  }
}

// Inputs as `tiled._forward` prepares them ([BH, T, .] contiguous, compute dtype): q [BH, Tq, d] (scaled), m [BH, Tq]
// (reference scores), kr, kc, vr, vc [BH, Tk, d];
//   blocks [nb, 7] = (start, stop, t0, row_begin, row_end, col_begin, col_end) indexing
//   rows / cols [n, 3] = (start, stop, masked) (`tiles.pack`); pad [B, Tk] bool (True: padding) or empty.
// Returns num [BH, Tq, d] = sum exp(s - m) v1 * v2 and l [BH, Tq] = sum exp(s - m) over the allowed pairs, and
// whether an allowed s - m exceeded `ceiling` (then num and l are incomplete, see exp_scores).
template <typename scalar_t>
std::tuple<Tensor, Tensor, bool> forward_impl(const Tensor& q, const Tensor& m, const Tensor& kr, const Tensor& kc,
                                              const Tensor& vr, const Tensor& vc, const Plan& plan, double floor,
                                              double ceiling) {
  const int64_t BH = q.size(0);
  Tensor num = at::zeros({BH, q.size(1), q.size(2)}, q.options()), l = at::zeros({BH, q.size(1)}, q.options());
  std::vector<uint8_t> over(BH, 0);  // per head: each is written by one thread only
  const auto run = [&](int64_t begin, int64_t end) {
    const auto heads = [&](const Tensor& x) { return x.narrow(0, begin, end - begin); };
    Tensor num_h = heads(num), l_h = heads(l);
    forward_heads<scalar_t>(heads(q), heads(m), heads(kr), heads(kc), heads(vr), heads(vc), num_h, l_h, plan, begin,
                            floor, ceiling, over.data() + begin);
  };
  on_threads(BH, run);
  return {num, l, std::any_of(over.begin(), over.end(), [](uint8_t x) { return x != 0; })};
}

// backward_impl's block loop for heads [h0, h0 + BH): every argument is those heads' slice.
template <typename scalar_t>
void backward_heads(const Tensor& q, const Tensor& dout, const Tensor& lse, const Tensor& D, const Tensor& kr,
                    const Tensor& vr, const Tensor& kc, const Tensor& vc, Tensor& dq, Tensor& dkr, Tensor& dkc,
                    Tensor& dvr, Tensor& dvc, const Plan& plan, int64_t h0, double floor) {
  const int64_t BH = q.size(0), Tq = q.size(1), d = q.size(2), Tk = kc.size(1);
  const auto& B = plan.B;
  const auto& C = plan.C;
  const int64_t n_max = plan.max_bq * plan.max_ba;
  auto opt = q.options();
  Tensor left_buf = at::empty({2 * BH * n_max * d}, opt), tile_buf = at::empty({2 * BH * plan.max_bc * n_max}, opt);
  Tensor rp_buf = at::empty({2 * BH * n_max * d}, opt);
  Tensor dvk_buf = at::empty({2 * BH * plan.max_bc * d}, opt);
  Tensor ok_buf = at::empty({BH * n_max}, opt.dtype(at::kBool));
  Tensor shift_buf = at::empty({2 * BH * n_max}, opt);
  scalar_t* lse_rows = shift_buf.data_ptr<scalar_t>();
  scalar_t* D_rows = lse_rows + BH * n_max;

  for (int64_t bi = 0; bi < plan.blocks(); ++bi) {
    const int64_t start = B[bi][0], bq = B[bi][1] - start, t0 = B[bi][2];
    for (int64_t r = B[bi][3]; r < B[bi][4]; ++r) {
      const int64_t ba = plan.R[r][1] - plan.R[r][0], n = bq * ba;
      const auto rows = plan.row_index(t0, r);
      // Rows (t, a) of q * kr and dO * vr: against kc and vc they give S and dP, and they are the operands of the
      // column gradients (dkc, dvc).
      Tensor left = left_buf.narrow(0, 0, 2 * BH * n * d).view({2 * BH, n, d});
      Tensor q_rows = left.narrow(0, 0, BH), g_rows = left.narrow(0, BH, BH);
      mul_rows(q_rows.data_ptr<scalar_t>(), q, start, kr, BH, bq, ba, rows);
      mul_rows(g_rows.data_ptr<scalar_t>(), dout, start, vr, BH, bq, ba, rows);
      const bool* ok = plan.row_masks(ok_buf, h0, BH, t0, bq, r);
      spread_rows(lse_rows, lse.data_ptr<scalar_t>(), Tq, start, BH, bq, ba);
      spread_rows(D_rows, D.data_ptr<scalar_t>(), Tq, start, BH, bq, ba);
      Tensor row_products = rp_buf.narrow(0, 0, 2 * BH * n * d).view({2 * BH, n, d});
      Tensor pv = row_products.narrow(0, 0, BH), dsk = row_products.narrow(0, BH, BH);  // P @ vc, dS @ kc
      for (int64_t c = B[bi][5]; c < B[bi][6]; ++c) {
        const int64_t col_start = C[c][0], bc = C[c][1] - col_start;
        const Tensor kc_tile = kc.narrow(1, col_start, bc), vc_tile = vc.narrow(1, col_start, bc);
        Tensor tile = tile_buf.narrow(0, 0, 2 * BH * bc * n).view({2 * BH, bc, n});  // transposed, as the forward
        Tensor s = tile.narrow(0, 0, BH), dp = tile.narrow(0, BH, BH);
        at::bmm_out(s, kc_tile, q_rows.transpose(1, 2));
        at::bmm_out(dp, vc_tile, g_rows.transpose(1, 2));
        plan.exp_score_grads(s.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), ok, h0, BH, t0, bq, ba, c, lse_rows,
                             D_rows, scalar_t(floor));  // s is P, dp is dS = P * (dP - D)
        if (c == B[bi][5]) {
          at::bmm_out(pv, s.transpose(1, 2), vc_tile);
          at::bmm_out(dsk, dp.transpose(1, 2), kc_tile);
        } else {
          pv.baddbmm_(s.transpose(1, 2), vc_tile);
          dsk.baddbmm_(dp.transpose(1, 2), kc_tile);
        }
        // dvc += P @ (dO * vr), dkc += dS @ (q * kr): GEMMs into a buffer, then a loop adds them in (a batched
        // baddbmm_ into the strided slice of dvc runs as one small addmm per matrix, slower; an ATen add_ costs a
        // TensorIterator setup for a few tens of kB per head)
        Tensor dvk_tile = dvk_buf.narrow(0, 0, 2 * BH * bc * d).view({2 * BH, bc, d});
        Tensor dvc_tile = dvk_tile.narrow(0, 0, BH), dkc_tile = dvk_tile.narrow(0, BH, BH);
        at::bmm_out(dvc_tile, s, g_rows);
        at::bmm_out(dkc_tile, dp, q_rows);
        const scalar_t* tile_grads = dvk_tile.data_ptr<scalar_t>();
        scalar_t *dvc_p = dvc.data_ptr<scalar_t>(), *dkc_p = dkc.data_ptr<scalar_t>();
        for_heads(BH, [&](int64_t h) {
          for (const auto& [out, in] : {std::pair{dvc_p, tile_grads}, std::pair{dkc_p, tile_grads + BH * bc * d}}) {
            scalar_t* __restrict__ o = out + (h * Tk + col_start) * d;
            const scalar_t* __restrict__ x = in + h * bc * d;
            for (int64_t i = 0; i < bc * d; ++i) o[i] += x[i];
          }
        });
      }
      // dvr_a += (P @ vc)_(t, a) * dO_t; dkr_a += (dS @ kc)_(t, a) * q_t; dq_t += sum_a (dS @ kc)_(t, a) * kr_a
      add_products<true>(dvr, pv.data_ptr<scalar_t>(), dout, start, BH, bq, ba, rows);
      add_products<true>(dkr, dsk.data_ptr<scalar_t>(), q, start, BH, bq, ba, rows);
      add_products<false>(dq, dsk.data_ptr<scalar_t>(), kr, start, BH, bq, ba, rows);
    }
  }
}

// Inputs as `tiled._backward` prepares them: q [BH, Tq, d] (scaled), dout [BH, Tq, d], lse and D [BH, Tq]
// (D_t = <dO_t, o_t>), kr, vr, kc, vc [BH, Tk, d]; the plan and pad as in the forward.
// Returns the gradients of q, kr, kc, vr and vc.
template <typename scalar_t>
std::vector<Tensor> backward_impl(const Tensor& q, const Tensor& dout, const Tensor& lse, const Tensor& D,
                                  const Tensor& kr, const Tensor& vr, const Tensor& kc, const Tensor& vc,
                                  const Plan& plan, double floor) {
  const int64_t BH = q.size(0);
  Tensor dq = at::zeros_like(q), dkr = at::zeros_like(kr), dkc = at::zeros_like(kc), dvr = at::zeros_like(vr);
  Tensor dvc = at::zeros_like(vc);
  const auto run = [&](int64_t begin, int64_t end) {
    const auto heads = [&](const Tensor& x) { return x.narrow(0, begin, end - begin); };
    Tensor dq_h = heads(dq), dkr_h = heads(dkr), dkc_h = heads(dkc), dvr_h = heads(dvr), dvc_h = heads(dvc);
    backward_heads<scalar_t>(heads(q), heads(dout), heads(lse), heads(D), heads(kr), heads(vr), heads(kc), heads(vc),
                             dq_h, dkr_h, dkc_h, dvr_h, dvc_h, plan, begin, floor);
  };
  on_threads(BH, run);
  return {dq, dkr, dkc, dvr, dvc};
}

// The loops index raw memory from these shapes and the plan: a wrong argument must fail here, not read past a buffer.
void check_inputs(const char* name, std::initializer_list<std::pair<const Tensor*, std::vector<int64_t>>> shapes,
                  const Tensor& blocks, const Tensor& rows, const Tensor& cols, const Tensor& pad, int64_t w_row,
                  int64_t heads, double floor) {
  const Tensor& first = *shapes.begin()->first;
  // exp_clamped<float> writes 2^n into a float's exponent: n >= -126, so arguments down to about -87.3 only
  const double lowest = first.scalar_type() == at::kFloat ? -87.0 : -708.0;
  TORCH_CHECK(lowest <= floor && floor <= 0, name, ": floor must be in [", lowest, ", 0] for ", first.scalar_type(),
              ", got ", floor);
  const int64_t BH = first.size(0), Tq = first.size(1);
  const int64_t Tk = (shapes.begin() + 1)->first->size(1);  // the second is a key stream
  TORCH_CHECK(heads >= 1 && BH % heads == 0, name, ": heads must divide the batch*heads dimension");
  for (const auto& [t, shape] : shapes) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == first.scalar_type(),
                name, ": inputs must be contiguous CPU tensors of one dtype");
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), name, ": an input of shape ", t->sizes(), " where ",
                at::IntArrayRef(shape), " was expected");
  }
  TORCH_CHECK(pad.numel() == 0 || (pad.scalar_type() == at::kBool && pad.is_contiguous() && pad.dim() == 2 &&
                                   pad.size(0) * heads == BH && pad.size(1) == Tk),
              name, ": pad must be empty or a contiguous bool tensor [B, Tk]");
  for (const Tensor* t : {&blocks, &rows, &cols}) {
    const int64_t width = t == &blocks ? 7 : 3;
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->is_contiguous() && t->size(1) == width, name,
                ": the plan must be contiguous int64 tables [n, 7], [n, 3], [n, 3]");
  }
  const auto B = blocks.accessor<int64_t, 2>(), R = rows.accessor<int64_t, 2>(), C = cols.accessor<int64_t, 2>();
  const int64_t row_end = w_row > 0 ? w_row : Tk;  // row blocks are window offsets or keys
  for (int64_t i = 0; i < B.size(0); ++i) {
    const bool ok = 0 <= B[i][0] && B[i][0] < B[i][1] && B[i][1] <= Tq && 0 <= B[i][2] &&
                    B[i][2] + B[i][1] - B[i][0] <= Tk && 0 <= B[i][3] && B[i][3] <= B[i][4] && B[i][4] <= R.size(0) &&
                    0 <= B[i][5] && B[i][5] <= B[i][6] && B[i][6] <= C.size(0) &&
                    (B[i][3] == B[i][4] || B[i][5] < B[i][6]);  // rows need columns: their sums come from them
    TORCH_CHECK(ok, name, ": query block ", i, " of the plan is out of range");
  }
  for (int64_t i = 0; i < R.size(0); ++i) {
    TORCH_CHECK(0 <= R[i][0] && R[i][0] < R[i][1] && R[i][1] <= row_end, name, ": row block ", i, " out of range");
  }
  for (int64_t i = 0; i < C.size(0); ++i) {
    TORCH_CHECK(0 <= C[i][0] && C[i][0] < C[i][1] && C[i][1] <= Tk, name, ": column block ", i, " out of range");
  }
}

// (num, l, whether an allowed score exceeded m + ceiling: then num and l are not usable).
std::tuple<Tensor, Tensor, bool> forward_tiles(const Tensor& q, const Tensor& m, const Tensor& kr, const Tensor& kc,
                                               const Tensor& vr, const Tensor& vc, int64_t w_row, int64_t w_col,
                                               const Tensor& blocks, const Tensor& rows, const Tensor& cols,
                                               const Tensor& pad, int64_t heads, double floor, double ceiling) {
  const int64_t BH = q.size(0), Tq = q.size(1), Tk = kr.size(1), d = q.size(2);
  check_inputs("forward_tiles", {{&q, {BH, Tq, d}}, {&kr, {BH, Tk, d}}, {&m, {BH, Tq}}, {&kc, {BH, Tk, d}},
                                 {&vr, {BH, Tk, d}}, {&vc, {BH, Tk, d}}},
               blocks, rows, cols, pad, w_row, heads, floor);
  // exp of the ceiling must be finite, and a query's sum of up to Tk * Tk such terms should be too (the caller's job)
  const double highest = q.scalar_type() == at::kFloat ? 88.0 : 709.0;
  TORCH_CHECK(0 < ceiling && ceiling <= highest, "forward_tiles: ceiling must be in (0, ", highest, "] for ",
              q.scalar_type(), ", got ", ceiling);
  std::tuple<Tensor, Tensor, bool> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "forward_tiles", [&] {
    result = forward_impl<scalar_t>(q, m, kr, kc, vr, vc, Plan(blocks, rows, cols, w_row, w_col, pad, heads, Tk),
                                    floor, ceiling);
  });
  return result;
}

std::vector<Tensor> backward_tiles(const Tensor& q, const Tensor& dout, const Tensor& lse, const Tensor& D,
                                   const Tensor& kr, const Tensor& vr, const Tensor& kc, const Tensor& vc,
                                   int64_t w_row, int64_t w_col, const Tensor& blocks, const Tensor& rows,
                                   const Tensor& cols, const Tensor& pad, int64_t heads, double floor) {
  const int64_t BH = q.size(0), Tq = q.size(1), Tk = kr.size(1), d = q.size(2);
  check_inputs("backward_tiles", {{&q, {BH, Tq, d}}, {&kr, {BH, Tk, d}}, {&dout, {BH, Tq, d}}, {&lse, {BH, Tq}},
                                  {&D, {BH, Tq}}, {&vr, {BH, Tk, d}}, {&kc, {BH, Tk, d}}, {&vc, {BH, Tk, d}}},
               blocks, rows, cols, pad, w_row, heads, floor);
  std::vector<Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "backward_tiles", [&] {
    result = backward_impl<scalar_t>(q, dout, lse, D, kr, vr, kc, vc,
                                     Plan(blocks, rows, cols, w_row, w_col, pad, heads, Tk), floor);
  });
  return result;
}


// ---- The one-query decode step of `ops.exact.decode` (its Python form: `_decode_in_place`) ----
//
// Work items are tiles (sequence, key/value head, block of rows a, block of columns b). A tile's scores
// [G * rows, cols] (the G query heads of the group as rows of one GEMM) stay in the core's L2 between the GEMM that
// writes them, the max and exp passes and the GEMM against V2 that reads them, beside the K2 and V2 rows they use,
// where the torch ops' step sends all i^2 scores through memory. Each tile has its own shift (the max over its
// allowed scores), sum and output, Σ_a v1_a (P V2)_a over its rows (linear in P, so tiles of columns add up); they
// are combined at the end as FlashAttention combines blocks. Consecutive tiles share their columns, so a thread's
// K2 and V2 rows stay in its cache while it goes down the rows.

// A tile: at most 512 columns and 64K scores (256 KiB in fp32), with K2 and V2's 2 x 128 KiB beside them within an
// L2 of 1 MiB and more; at least 64 rows where there are, so that each GEMM is big enough to run near its peak
// (docs/bench_cache.md measures the step against torch.mm).
constexpr int64_t kDecodeTileCols = 512, kDecodeTileScores = int64_t(1) << 16, kDecodeMinRows = 64;
constexpr int64_t kDecodeSmallTile = int64_t(1) << 19;  // multiply-adds of a tile's product run as plain loops
constexpr int64_t kDecodeSerial = int64_t(1) << 18;  // multiply-adds of a step below which it stays on one thread

template <typename scalar_t>
struct DecodeStreams {  // one stream [B, H_kv, n, D]: base pointer and strides (the last dimension is contiguous)
  const scalar_t* p;
  int64_t sb, sh, sn;
  DecodeStreams(const Tensor& t, int64_t first)
      : p(t.data_ptr<scalar_t>() + first * t.stride(2)), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)) {}
  const scalar_t* at(int64_t b, int64_t h, int64_t row) const { return p + b * sb + h * sh + row * sn; }
};

// The two products of a small tile as loops: below about 2^19 multiply-adds an ATen GEMM costs more in dispatch and
// views than these loops take, and a decode step at short context is a few such tiles. Results are built four rows at a
// time, in runs of kRun entries held in four named local arrays across the whole sum (fixed-length loops the compiler
// keeps in vector registers): one vector multiply-add per term, four independent chains of them (a chain waits for
// its previous add; the vector units can start a new one each cycle), and each load of K2 or V2 shared by the four
// rows. Named arrays rather than one [4][kRun] array: GCC vectorised the latter across its rows, with shuffles, and
// ran slower than one row at a time. A last block of fewer than four rows repeats its last row.
constexpr int64_t kRun = 16;

// r_i[l] += x_i * y[l] for the four runs of a block of rows
template <typename scalar_t>
inline void add_runs(scalar_t* __restrict__ r0, scalar_t* __restrict__ r1, scalar_t* __restrict__ r2,
                     scalar_t* __restrict__ r3, scalar_t x0, scalar_t x1, scalar_t x2, scalar_t x3,
                     const scalar_t* __restrict__ y) {
  for (int64_t l = 0; l < kRun; ++l) {
    r0[l] += x0 * y[l];
    r1[l] += x1 * y[l];
    r2[l] += x2 * y[l];
    r3[l] += x3 * y[l];
  }
}

// s [R, c] = kq [R, D] K2^T, K2's rows `stride` apart; k2t [D, c rounded up to kRun] is scratch for K2 transposed
// (zeros past c).
template <typename scalar_t>
void small_scores(scalar_t* __restrict__ s, const scalar_t* __restrict__ kq, const scalar_t* k2, int64_t stride,
                  int64_t R, int64_t c, int64_t D, scalar_t* __restrict__ k2t) {
  const int64_t width = (c + kRun - 1) / kRun * kRun;
  for (int64_t j = 0; j < D; ++j) {
    for (int64_t b = 0; b < width; ++b) k2t[j * width + b] = b < c ? k2[b * stride + j] : scalar_t(0);
  }
  for (int64_t a = 0; a < R; a += 4) {
    const int64_t last = R - 1;  // rows past the end repeat it (computed twice, stored once)
    const scalar_t *q0 = kq + a * D, *q1 = kq + std::min(a + 1, last) * D, *q2 = kq + std::min(a + 2, last) * D,
                   *q3 = kq + std::min(a + 3, last) * D;
    for (int64_t b0 = 0; b0 < width; b0 += kRun) {
      scalar_t r0[kRun] = {}, r1[kRun] = {}, r2[kRun] = {}, r3[kRun] = {};
      for (int64_t j = 0; j < D; ++j) {
        const scalar_t* __restrict__ k = k2t + j * width + b0;
        add_runs(r0, r1, r2, r3, q0[j], q1[j], q2[j], q3[j], k);
      }
      const int64_t n = std::min(kRun, c - b0);
      const scalar_t* runs[4] = {r0, r1, r2, r3};
      for (int64_t i = 0; i < 4 && a + i < R; ++i) std::copy(runs[i], runs[i] + n, s + (a + i) * c + b0);
    }
  }
}

// pv [R, D] = p [R, c] V2, V2's rows `stride` apart.
template <typename scalar_t>
void small_values(scalar_t* __restrict__ pv, const scalar_t* __restrict__ p, const scalar_t* v2, int64_t stride,
                  int64_t R, int64_t c, int64_t D) {
  const int64_t runs = D / kRun * kRun;
  for (int64_t a = 0; a < R; a += 4) {
    const int64_t last = R - 1;
    const scalar_t *p0 = p + a * c, *p1 = p + std::min(a + 1, last) * c, *p2 = p + std::min(a + 2, last) * c,
                   *p3 = p + std::min(a + 3, last) * c;
    for (int64_t d0 = 0; d0 < runs; d0 += kRun) {
      scalar_t r0[kRun] = {}, r1[kRun] = {}, r2[kRun] = {}, r3[kRun] = {};
      for (int64_t b = 0; b < c; ++b) {
        const scalar_t* __restrict__ v = v2 + b * stride + d0;
        add_runs(r0, r1, r2, r3, p0[b], p1[b], p2[b], p3[b], v);
      }
      const scalar_t* sums[4] = {r0, r1, r2, r3};
      for (int64_t i = 0; i < 4 && a + i < R; ++i) std::copy(sums[i], sums[i] + kRun, pv + (a + i) * D + d0);
    }
  }
  for (int64_t a = 0; a < R; ++a) {
    for (int64_t d = runs; d < D; ++d) {  // a head dimension that is not a multiple of kRun: the rest one by one
      scalar_t sum = 0;
      for (int64_t b = 0; b < c; ++b) sum += p[a * c + b] * v2[b * stride + d];
      pv[a * D + d] = sum;
    }
  }
}

template <typename scalar_t>
Tensor decode_impl(const Tensor& q, const Tensor& k1, const Tensor& k2, const Tensor& v1, const Tensor& v2,
                   const Tensor& real, const Tensor& bias1, const Tensor& bias2, int64_t n1, int64_t n2,
                   double scale_d, double floor_d) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), H_kv = k1.size(1), Tk = k1.size(2), G = H / H_kv;
  const int64_t cols = std::min(n2, kDecodeTileCols);
  const int64_t rows = std::clamp<int64_t>(kDecodeTileScores / (G * cols), std::min(kDecodeMinRows, n1), n1);
  const int64_t row_tiles = (n1 + rows - 1) / rows, col_tiles = (n2 + cols - 1) / cols;
  const int64_t per_head = row_tiles * col_tiles, items = B * H_kv * per_head;
  const scalar_t floor = scalar_t(floor_d), ninf = -std::numeric_limits<scalar_t>::infinity();
  // The windows keep the last n1 (n2) positions of each stream: the streams start there.
  const DecodeStreams<scalar_t> K1(k1, Tk - n1), K2(k2, Tk - n2), V1(v1, Tk - n1), V2(v2, Tk - n2);
  const auto opt = q.options();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const int64_t qb = q.stride(0), qh = q.stride(1);
  const scalar_t scale = scalar_t(scale_d);
  // real [B, Tk], true at a real token (read as bytes: the compiler vectorises byte loads, not bools); row b's masks
  // of the windows start at ok1 + b * Tk and ok2 + b * Tk
  const auto* ok1 = real.numel() ? reinterpret_cast<const uint8_t*>(real.data_ptr<bool>()) + (Tk - n1) : nullptr;
  const auto* ok2 = real.numel() ? reinterpret_cast<const uint8_t*>(real.data_ptr<bool>()) + (Tk - n2) : nullptr;
  // Log-weights of the rows, bias1 / bias2 [B, H_kv, Tk] (or none): added to every score of their row (column); -inf
  // takes a row (column) out, as a mask does.
  const bool biased = bias1.numel() || bias2.numel();
  const scalar_t* b1p = bias1.numel() ? bias1.data_ptr<scalar_t>() + (Tk - n1) : nullptr;
  const scalar_t* b2p = bias2.numel() ? bias2.data_ptr<scalar_t>() + (Tk - n2) : nullptr;
  // Per tile and query head of its group: the shift, the sum of exp(score - shift) and the output [D].
  std::vector<scalar_t> shifts(items * G), sums(items * G), outs(items * G * D);
  // P V2, or K2's tile transposed for small_scores
  const int64_t pv_size = std::max(G * rows * D, D * ((cols + kRun - 1) / kRun * kRun));
  const int64_t per_thread = G * rows * (D + cols) + pv_size + 2 * cols;
  std::vector<scalar_t> scratch(at::get_num_threads() * per_thread);  // one part per thread number
  // A biased tile's row and column masks and its column biases (0 where masked), per thread number
  std::vector<uint8_t> tile_ok(biased ? at::get_num_threads() * (rows + cols) : 0);
  std::vector<scalar_t> tile_bias(biased ? at::get_num_threads() * cols : 0);
  const auto run = [&](int64_t begin, int64_t end, int64_t thread) {
    scalar_t* kq = scratch.data() + thread * per_thread;  // [G * rows, D]
    scalar_t* pv = kq + G * rows * D;  // [G * rows, D]
    scalar_t* s = pv + pv_size;  // [G * rows, cols]
    scalar_t* cm = s + G * rows * cols;  // [cols]
    scalar_t* cs = cm + cols;  // [cols]
    int64_t columns = -1;
    Tensor k2_t, v2_c;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H_kv * per_head), h = item / per_head % H_kv, tile = item % per_head;
      const int64_t a0 = tile % row_tiles * rows, c0 = tile / row_tiles * cols;
      const int64_t r = std::min(rows, n1 - a0), c = std::min(cols, n2 - c0), R = G * r;
      const uint8_t* row_ok = ok1 ? ok1 + b * Tk + a0 : nullptr;
      const uint8_t* __restrict__ col_ok = ok2 ? ok2 + b * Tk + c0 : nullptr;
      const scalar_t* row_bias = b1p ? b1p + (b * H_kv + h) * Tk + a0 : nullptr;
      scalar_t* col_bias = nullptr;
      if (biased) {  // the tile's masks: the token's and its log-weight's
        uint8_t* rm = tile_ok.data() + thread * (rows + cols);
        uint8_t* cmask = rm + rows;
        col_bias = tile_bias.data() + thread * cols;
        const scalar_t* b2 = b2p ? b2p + (b * H_kv + h) * Tk + c0 : nullptr;
        for (int64_t a = 0; a < r; ++a) rm[a] = (!row_ok || row_ok[a]) && !(row_bias && row_bias[a] == ninf);
        for (int64_t col = 0; col < c; ++col) {
          cmask[col] = (!col_ok || col_ok[col]) && !(b2 && b2[col] == ninf);
          col_bias[col] = b2 && cmask[col] ? b2[col] : scalar_t(0);
        }
        row_ok = rm, col_ok = cmask;
      }
      if (R * c * D > kDecodeSmallTile && item / row_tiles != columns) {  // the tile's K2 and V2 rows [c, D]
        columns = item / row_tiles;
        k2_t = k2.select(0, b).select(0, h).narrow(0, Tk - n2 + c0, c).t();
        v2_c = v2.select(0, b).select(0, h).narrow(0, Tk - n2 + c0, c);
      }
      for (int64_t g = 0; g < G; ++g) {  // kq[(g, a)] = k1_a * (scale q_g)
        const scalar_t* __restrict__ qg = qp + b * qb + (h * G + g) * qh;
        for (int64_t a = 0; a < r; ++a) {
          const scalar_t* __restrict__ k = K1.at(b, h, a0 + a);
          scalar_t* __restrict__ o = kq + (g * r + a) * D;
          for (int64_t j = 0; j < D; ++j) o[j] = k[j] * (scale * qg[j]);
        }
      }
      const bool small = R * c * D <= kDecodeSmallTile;
      Tensor s_t, pv_t;
      if (small) {
        small_scores(s, kq, K2.at(b, h, c0), K2.sn, R, c, D, pv);  // pv is free until the second product
      } else {
        s_t = at::from_blob(s, {R, c}, opt), pv_t = at::from_blob(pv, {R, D}, opt);
        at::mm_out(s_t, at::from_blob(kq, {R, D}, opt), k2_t);  // scores [R, c]
      }
      // Per query head g: the max over its allowed scores, then P = exp(max(score - max, floor)) on them and 0
      // elsewhere. Column-wise running maxima and sums (cm, cs) keep both passes elementwise, which the compiler
      // vectorises (a scalar running max or sum is a chain it does not). A NaN score is skipped by the max and
      // reaches the sum; a +inf one makes the shift +inf and its head's output NaN, as in the reference.
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* sg = s + g * r * c;
        std::fill(cm, cm + c, ninf);
        for (int64_t a = 0; a < r; ++a) {
          if (row_ok && !row_ok[a]) continue;
          scalar_t* __restrict__ row = sg + a * c;
          if (col_bias) {
            const scalar_t ba = row_bias ? row_bias[a] : scalar_t(0);
            for (int64_t j = 0; j < c; ++j) row[j] += ba + col_bias[j];
          }
          if (col_ok) {
            for (int64_t j = 0; j < c; ++j) cm[j] = (col_ok[j] && row[j] > cm[j]) ? row[j] : cm[j];
          } else {
            for (int64_t j = 0; j < c; ++j) cm[j] = row[j] > cm[j] ? row[j] : cm[j];
          }
        }
        const scalar_t m = *std::max_element(cm, cm + c);
        const scalar_t shift = m == ninf ? scalar_t(0) : m;  // -inf: nothing allowed in this tile
        std::fill(cs, cs + c, scalar_t(0));
        for (int64_t a = 0; a < r; ++a) {
          scalar_t* __restrict__ row = sg + a * c;
          if (row_ok && !row_ok[a]) {  // exactly 0, never a product with what the score holds
            std::fill(row, row + c, scalar_t(0));
            continue;
          }
          if (col_ok) {
            for (int64_t j = 0; j < c; ++j) {
              const scalar_t e = exp_clamped(row[j] - shift, floor, scalar_t(0));
              row[j] = col_ok[j] ? e : scalar_t(0);
              cs[j] += row[j];
            }
          } else {
            for (int64_t j = 0; j < c; ++j) {
              row[j] = exp_clamped(row[j] - shift, floor, scalar_t(0));
              cs[j] += row[j];
            }
          }
        }
        shifts[item * G + g] = m;
        sums[item * G + g] = std::accumulate(cs, cs + c, scalar_t(0));
      }
      if (small) {
        small_values(pv, s, V2.at(b, h, c0), V2.sn, R, c, D);
      } else {
        at::mm_out(pv_t, s_t, v2_c);  // P V2 [R, D]
      }
      for (int64_t g = 0; g < G; ++g) {  // out_g = sum_a v1_a * pv[(g, a)] over the allowed a
        scalar_t* __restrict__ o = outs.data() + (item * G + g) * D;
        std::fill(o, o + D, scalar_t(0));
        for (int64_t a = 0; a < r; ++a) {
          if (row_ok && !row_ok[a]) continue;
          const scalar_t* __restrict__ v = V1.at(b, h, a0 + a);
          const scalar_t* __restrict__ x = pv + (g * r + a) * D;
          for (int64_t j = 0; j < D; ++j) o[j] += v[j] * x[j];
        }
      }
    }
  };
  // A step of a few small tiles runs on the calling thread: waking the others (and copying torch's thread-local state
  // to them) costs more than the tiles.
  if (items * G * rows * cols * D <= kDecodeSerial || at::get_num_threads() == 1) {
    run(0, items, 0);
  } else {
    const at::ThreadLocalState state;  // the caller's (grad mode, below autograd) for the GEMMs on other threads
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      run(begin, end, at::get_thread_num());
    });
  }
  Tensor out = at::empty({B, H, 1, D}, opt);
  scalar_t* op = out.data_ptr<scalar_t>();
  for (int64_t bh = 0; bh < B * H_kv; ++bh) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t first = bh * per_head;
      scalar_t top = ninf;
      for (int64_t k = 0; k < per_head; ++k) top = std::max(top, shifts[(first + k) * G + g]);
      scalar_t* __restrict__ o = op + (bh * G + g) * D;
      std::fill(o, o + D, scalar_t(0));
      scalar_t denom = 0;
      for (int64_t k = 0; k < per_head; ++k) {
        const int64_t at_k = (first + k) * G + g;
        if (shifts[at_k] == ninf) continue;  // no allowed pair in that tile: it holds nothing
        const scalar_t w = std::exp(shifts[at_k] - top);  // NaN when top is +inf (a +inf score): so is the output
        denom += w * sums[at_k];
        const scalar_t* __restrict__ x = outs.data() + at_k * D;
        for (int64_t j = 0; j < D; ++j) o[j] += w * x[j];
      }
      // No allowed pair at all (a pad query) gives 0, not NaN; a NaN sum stays NaN.
      const scalar_t inverse = scalar_t(1) / (denom > 0 || std::isnan(denom) ? denom : scalar_t(1));
      for (int64_t j = 0; j < D; ++j) o[j] *= inverse;
    }
  }
  return out;
}

// q [B, H, 1, D]; k1, k2, v1, v2 [B, H_kv, Tk, D] (views of a cache's buffers: any strides, a contiguous last
// dimension, q's too); real [B, Tk] contiguous bool (true: a real token) or empty; w1, w2 the windows (0: none).
// Padded values must be finite (the caller zeroes them). Returns [B, H, 1, D], `naive_tensor_attention` of the one
// query, which is the last position. bias1, bias2: empty or contiguous [B, H_kv, Tk] of q's dtype, log-weights of
// the rows of stream 1 (2), finite or -inf (the row is absent): pair (a, b) then weighs exp(score + bias1_a + bias2_b).
Tensor decode_step(const Tensor& q, const Tensor& k1, const Tensor& k2, const Tensor& v1, const Tensor& v2,
                   const Tensor& real, const Tensor& bias1, const Tensor& bias2, int64_t w1, int64_t w2, double scale,
                   double floor) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.stride(3) == 1 && q.device().is_cpu(),
              "decode_step: q must be a CPU tensor [B, H, 1, D] with a contiguous last dimension, got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t H_kv = k1.dim() == 4 ? k1.size(1) : 0, Tk = k1.dim() == 4 ? k1.size(2) : 0;
  TORCH_CHECK(H_kv >= 1 && H % H_kv == 0 && Tk >= 1, "decode_step: k1 must be [B, H_kv, Tk, D] with Tk >= 1 and "
              "H_kv dividing the ", H, " query heads, got ", k1.sizes());
  for (const Tensor* t : {&k1, &k2, &v1, &v2}) {
    TORCH_CHECK(t->dim() == 4 && t->sizes() == at::IntArrayRef({B, H_kv, Tk, D}) && t->stride(3) == 1 &&
                t->device().is_cpu() && t->scalar_type() == q.scalar_type(),
                "decode_step: the streams must be CPU tensors [B, H_kv, Tk, D] of q's dtype with a contiguous last "
                "dimension, got ", t->sizes());
  }
  TORCH_CHECK(real.numel() == 0 || (real.scalar_type() == at::kBool && real.is_contiguous() &&
                                    real.sizes() == at::IntArrayRef({B, Tk}) && real.device().is_cpu()),
              "decode_step: real must be empty or a contiguous bool tensor [B, Tk], got ", real.sizes());
  for (const Tensor* t : {&bias1, &bias2}) {
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == q.scalar_type() && t->is_contiguous() &&
                                    t->sizes() == at::IntArrayRef({B, H_kv, Tk}) && t->device().is_cpu()),
                "decode_step: bias1 and bias2 must be empty or contiguous CPU tensors [B, H_kv, Tk] = [", B, ", ",
                H_kv, ", ", Tk, "] of q's dtype, got ", t->sizes());
  }
  TORCH_CHECK(w1 >= 0 && w2 >= 0, "decode_step: windows must be >= 0 (0: none)");
  const double lowest = q.scalar_type() == at::kFloat ? -87.0 : -708.0;  // as in check_inputs
  TORCH_CHECK(lowest <= floor && floor <= 0, "decode_step: floor must be in [", lowest, ", 0], got ", floor);
  const int64_t n1 = w1 > 0 ? std::min(w1, Tk) : Tk, n2 = w2 > 0 ? std::min(w2, Tk) : Tk;
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decode_step", [&] {
    out = decode_impl<scalar_t>(q, k1, k2, v1, v2, real, bias1, bias2, n1, n2, scale, floor);
  });
  return out;
}

// ---- The `poly` cache's decode step (`ops.poly.chunk._decode_step`, compiled) ----
// One new position that is also the query. Per sequence and key/value head: the key features f1 = U2(k1) and
// f2 = U3(k2) are added to the state in place (S1 += f1 v1^T, S2 += f2 v2^T, Z1 += f1, Z2 += f2; skipped for a
// padded token), and the G query heads read the updated state: num_g = sum_m u_gm S1_m * S2_m and
// den_g = sum_m u_gm Z1_m Z2_m, u_g = U1(q_g). As torch ops the [r, Dv] states are read and written several times
// per step (the update, S1 * S2, the readout) and the features take a gather per degree; here each row of S1 and S2
// is read and written once and used while it is in L1. Rows are split into blocks with their own partial num and den,
// summed in block order afterwards, so the result does not depend on the number of threads.
constexpr int64_t kPolyRows = 128;
constexpr int64_t kPolySerial = int64_t(1) << 15;  // state numbers (B H r Dv) below which the step stays on one thread

// f = the r monomials of x: f[0] = 1, f[m] = f[parent[m]] * x[var[m]] (`ops.poly.features`, flattened over degrees)
template <typename scalar_t>
void monomials(scalar_t* f, const scalar_t* x, const int64_t* parent, const int64_t* var, int64_t r) {
  f[0] = 1;
  for (int64_t m = 1; m < r; ++m) f[m] = f[parent[m]] * x[var[m]];
}

template <typename scalar_t>
Tensor poly_step_impl(const Tensor& S1, const Tensor& S2, const Tensor& Z1, const Tensor& Z2, const Tensor& M1,
                      const Tensor& M2, const Tensor& N, const Tensor& q, const Tensor& k1, const Tensor& k2,
                      const Tensor& v1, const Tensor& v2, const Tensor& real, const Tensor& parent, const Tensor& var,
                      const Tensor& weight, double scale_d) {
  const int64_t B = S1.size(0), H = S1.size(1), r = S1.size(2), Dv = S1.size(3), G = q.size(2), Dk = q.size(4);
  const int64_t BH = B * H, blocks = (r + kPolyRows - 1) / kPolyRows, items = BH * blocks;
  scalar_t *s1p = S1.data_ptr<scalar_t>(), *s2p = S2.data_ptr<scalar_t>();
  scalar_t *z1p = Z1.data_ptr<scalar_t>(), *z2p = Z2.data_ptr<scalar_t>();
  scalar_t *m1p = M1.data_ptr<scalar_t>(), *m2p = M2.data_ptr<scalar_t>(), *np = N.data_ptr<scalar_t>();
  const scalar_t* rp = real.data_ptr<scalar_t>();
  const int64_t rs = real.stride(0);  // real [B, 1, 1, 1] may be a view of a wider mask
  // q, k1, k2, v1, v2 may be strided views (the halves of a cache's k1 | k2): row (b, h[, g]) starts at at(...)
  const auto at = [H](const Tensor& t, int64_t bh, int64_t g = 0) {
    return t.data_ptr<scalar_t>() + bh / H * t.stride(0) + bh % H * t.stride(1) + g * t.stride(2);
  };
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const int64_t *pp = parent.data_ptr<int64_t>(), *vp = var.data_ptr<int64_t>();
  const scalar_t scale = scalar_t(scale_d);
  const int64_t per_head = (2 + G) * r;  // f1, f2, then u of each query head
  std::vector<scalar_t> features(BH * per_head), partial(items * G * (Dv + 1));
  const bool serial = BH * r * Dv <= kPolySerial || at::get_num_threads() == 1;
  const auto over = [&](int64_t n, const auto& f) {
    if (serial) {
      f(0, n);
    } else {
      at::parallel_for(0, n, 1, f);
    }
  };
  over(BH, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      scalar_t* f = features.data() + bh * per_head;
      if (rp[bh / H * rs] != 0) {
        const scalar_t *a = at(k1, bh), *c = at(k2, bh);
        monomials(f, a, pp, vp, r);
        monomials(f + r, c, pp, vp, r);
        for (int64_t j = 0; j < Dk; ++j) {
          m1p[bh * Dk + j] = std::max(m1p[bh * Dk + j], std::abs(a[j]));
          m2p[bh * Dk + j] = std::max(m2p[bh * Dk + j], std::abs(c[j]));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* __restrict__ u = f + (2 + g) * r;
        monomials(u, at(q, bh, g), pp, vp, r);
        for (int64_t m = 0; m < r; ++m) u[m] *= wp[m];
      }
    }
  });
  over(items, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(Dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, m0 = item % blocks * kPolyRows, m1 = std::min(r, m0 + kPolyRows);
      const bool add = rp[bh / H * rs] != 0;
      const scalar_t *f1 = features.data() + bh * per_head, *f2 = f1 + r, *u = f2 + r;
      const scalar_t *__restrict__ a = at(v1, bh), *__restrict__ c = at(v2, bh);
      scalar_t* __restrict__ num = partial.data() + item * G * (Dv + 1);  // [G, Dv], then den [G]
      scalar_t* den = num + G * Dv;
      scalar_t *z1 = z1p + bh * r, *z2 = z2p + bh * r;
      for (int64_t m = m0; m < m1; ++m) {
        scalar_t* __restrict__ x = s1p + (bh * r + m) * Dv;
        scalar_t* __restrict__ y = s2p + (bh * r + m) * Dv;
        if (add) {
          const scalar_t e1 = f1[m], e2 = f2[m];
          for (int64_t d = 0; d < Dv; ++d) {
            x[d] += e1 * a[d];
            y[d] += e2 * c[d];
            p[d] = x[d] * y[d];
          }
          z1[m] += e1;
          z2[m] += e2;
        } else {
          for (int64_t d = 0; d < Dv; ++d) p[d] = x[d] * y[d];
        }
        const scalar_t zz = z1[m] * z2[m];
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t w = u[g * r + m];
          scalar_t* __restrict__ o = num + g * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] += w * p[d];
          den[g] += w * zz;
        }
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) np[b] += rp[b * rs];
  Tensor out = at::empty({B, H, G, 1, Dv}, q.options());
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  for (int64_t bh = 0; bh < BH; ++bh) {
    const scalar_t n = np[bh / H];
    for (int64_t g = 0; g < G; ++g) {
      scalar_t* __restrict__ o = op + (bh * G + g) * Dv;
      std::fill(o, o + Dv, scalar_t(0));
      scalar_t den = 0;
      for (int64_t k = 0; k < blocks; ++k) {
        const scalar_t* x = partial.data() + (bh * blocks + k) * G * (Dv + 1);
        for (int64_t d = 0; d < Dv; ++d) o[d] += x[g * Dv + d];
        den += x[G * Dv + g];
      }
      // The floor of `ops.poly.common._floor`: count * exp(-R), R = scale sum_j |q_j| max|k1_j| max|k2_j|.
      scalar_t bound = 0;
      const scalar_t* qg = at(q, bh, g);
      for (int64_t j = 0; j < Dk; ++j) bound += std::abs(qg[j]) * m1p[bh * Dk + j] * m2p[bh * Dk + j];
      const scalar_t floor = n * n * std::max(std::exp(-scale * bound), tiny);
      den = std::max(den, floor);
      const scalar_t inverse = scalar_t(1) / (den > 0 ? den : scalar_t(1));  // no pair seen: 0 / 1
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inverse;
    }
  }
  return out;
}

// The state S1, S2 [B, H, r, Dv], Z1, Z2 [B, H, r], M1, M2 [B, H, Dk], N [B, 1] (a `PolyState`, contiguous, updated
// in place); q [B, H, G, 1, Dk]; k1, k2 [B, H, 1, Dk]; v1, v2 [B, H, 1, Dv] (any strides but the last); real
// [B, 1, 1, 1], any strides (1: the new token is real, 0: padding); parent, var [r] int64 and weight [r] the flattened monomial
// tables and query weights. One floating dtype. Returns the G heads' outputs [B, H, G, 1, Dv].
Tensor poly_step(const Tensor& S1, const Tensor& S2, const Tensor& Z1, const Tensor& Z2, const Tensor& M1,
                 const Tensor& M2, const Tensor& N, const Tensor& q, const Tensor& k1, const Tensor& k2,
                 const Tensor& v1, const Tensor& v2, const Tensor& real, const Tensor& parent, const Tensor& var,
                 const Tensor& weight, double scale) {
  TORCH_CHECK(S1.dim() == 4 && q.dim() == 5, "poly_step: S1 must be [B, H, r, Dv] and q [B, H, G, 1, Dk], got ",
              S1.sizes(), " and ", q.sizes());
  const int64_t B = S1.size(0), H = S1.size(1), r = S1.size(2), Dv = S1.size(3), G = q.size(2), Dk = q.size(4);
  TORCH_CHECK(r >= 1, "poly_step: the state needs at least one feature, got r = ", r);
  const std::pair<const Tensor*, std::vector<int64_t>> shapes[] = {
      {&S2, {B, H, r, Dv}}, {&Z1, {B, H, r}}, {&Z2, {B, H, r}}, {&M1, {B, H, Dk}}, {&M2, {B, H, Dk}}, {&N, {B, 1}},
      {&q, {B, H, G, 1, Dk}}, {&k1, {B, H, 1, Dk}}, {&k2, {B, H, 1, Dk}}, {&v1, {B, H, 1, Dv}},
      {&v2, {B, H, 1, Dv}}, {&real, {B, 1, 1, 1}}, {&weight, {r}}};
  for (const Tensor* t : {&S1, &S2, &Z1, &Z2, &M1, &M2, &N, &q, &k1, &k2, &v1, &v2, &real, &weight}) {
    const bool strided = t == &q || t == &k1 || t == &k2 || t == &v1 || t == &v2;  // a contiguous last dimension
    const bool laid_out = t == &real || (strided ? t->stride(-1) == 1 : t->is_contiguous());  // real: any strides
    TORCH_CHECK(laid_out && t->device().is_cpu() &&
                    t->scalar_type() == S1.scalar_type(),
                "poly_step: every tensor must be a CPU tensor of S1's dtype, contiguous (q, k1, k2, v1, v2: in their "
                "last dimension), got ", t->sizes(), " ", t->scalar_type());
  }
  for (const auto& [t, shape] : shapes) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), "poly_step: expected shape ", at::IntArrayRef(shape), ", got ",
                t->sizes());
  }
  for (const Tensor* t : {&parent, &var}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->sizes() == at::IntArrayRef({r}),
                "poly_step: parent and var must be contiguous int64 [r], got ", t->sizes());
  }
  const int64_t* pp = parent.data_ptr<int64_t>();
  const int64_t* vp = var.data_ptr<int64_t>();
  for (int64_t m = 1; m < r; ++m) {  // each feature's parent comes before it: the loop reads no unwritten feature
    TORCH_CHECK(0 <= pp[m] && pp[m] < m && 0 <= vp[m] && vp[m] < Dk, "poly_step: bad monomial table at ", m);
  }
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(S1.scalar_type(), "poly_step", [&] {
    out = poly_step_impl<scalar_t>(S1, S2, Z1, Z2, M1, M2, N, q, k1, k2, v1, v2, real, parent, var, weight, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_tensor_attn_cpu, m) {
  m.def("forward_tiles(Tensor q, Tensor m, Tensor kr, Tensor kc, Tensor vr, Tensor vc, int w_row, int w_col, "
        "Tensor blocks, Tensor rows, Tensor cols, Tensor pad, int heads, float floor, float ceiling) "
        "-> (Tensor, Tensor, bool)");
  m.def("backward_tiles(Tensor q, Tensor dout, Tensor lse, Tensor D, Tensor kr, Tensor vr, Tensor kc, Tensor vc, "
        "int w_row, int w_col, Tensor blocks, Tensor rows, Tensor cols, Tensor pad, int heads, float floor) "
        "-> Tensor[]");
  m.def("decode_step(Tensor q, Tensor k1, Tensor k2, Tensor v1, Tensor v2, Tensor real, Tensor bias1, Tensor bias2, "
        "int w1, int w2, float scale, float floor) -> Tensor");
  m.def("poly_step(Tensor(a!) S1, Tensor(b!) S2, Tensor(c!) Z1, Tensor(d!) Z2, Tensor(e!) M1, Tensor(f!) M2, "
        "Tensor(g!) N, Tensor q, Tensor k1, Tensor k2, Tensor v1, Tensor v2, Tensor real, Tensor parent, Tensor var, "
        "Tensor weight, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_tensor_attn_cpu, CPU, m) {
  m.impl("forward_tiles", &forward_tiles);
  m.impl("backward_tiles", &backward_tiles);
  m.impl("decode_step", &decode_step);
  m.impl("poly_step", &poly_step);
}
