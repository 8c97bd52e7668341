// The tile loops of `ops.tiled` (`_python_tiles` and the loop of `_backward`), compiled: the same tiles, the same
// batched GEMMs, exp and products as the Python loops, without the interpreter between them. A windowed pass does
// one tile per 16-query block, and the Python and dispatch time of its fifteen-odd small ops per block was about a
// quarter of the forward (docs/profile_attention.md).
//
// Built on first use by `ops.extension` (torch.utils.cpp_extension). Every numeric step is an ATen op (MKL GEMMs,
// vectorised exp), so it needs no SIMD code of its own; only the masks are plain loops. One difference from the
// Python loops: masked pairs are zeroed after exp instead of set to the exp floor before it.
// Registered as torch.ops.hf_tensor_attn_cpu.forward_tiles and .backward_tiles.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

namespace {

using at::Tensor;

// Zeroes the exp'ed scores of one head's column-major tile p [bc, bq * ba] that its queries may not use:
//   column key b (row b of the tile): query t needs b <= t and, with a column window, t - b < w_col;
//   padded column keys: the whole row;
//   row entries (t, j): `row_ok` [bq * ba], false where key a is later than t, before 0 or padding (nullptr: all ok).
// Set, never multiplied: a masked score may be infinite (a later key's), and exp gives inf there, inf * 0 NaN.
template <typename scalar_t>
void zero_masked(scalar_t* p, int64_t bc, int64_t bq, int64_t ba, int64_t t0, int64_t col_start, int64_t w_col,
                 bool col_masked, const bool* col_pad, const bool* row_ok) {
  const int64_t n = bq * ba;
  for (int64_t b = 0; b < bc; ++b) {
    scalar_t* row = p + b * n;
    int64_t lo = 0, hi = bq;  // queries [lo, hi) of the block may use key b
    if (col_masked) {
      const int64_t key = col_start + b;
      lo = std::clamp<int64_t>(key - t0, 0, bq);
      if (w_col > 0) hi = std::clamp<int64_t>(key - t0 + w_col, lo, bq);
      if (col_pad != nullptr && col_pad[key]) lo = hi = bq;
    }
    std::fill(row, row + lo * ba, scalar_t(0));
    std::fill(row + hi * ba, row + n, scalar_t(0));
    if (row_ok != nullptr) {
      for (int64_t i = lo * ba; i < hi * ba; ++i) row[i] = row_ok[i] ? row[i] : scalar_t(0);
    }
  }
}

// Per (head, tile): true where row entry (t, j) of the tile may be used (see zero_masked). Row keys are a block
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

// acc [BH, bq, ba_max, d] per (query, row key) of a query block, summed over the row keys at the block's end: the
// only row block of the block writes a * b ([BH, bq, ba, d]) into it; with several, each adds into its first ba.
void add_row_products(Tensor& acc, const Tensor& a, const Tensor& b, bool several_rows) {
  if (several_rows) {
    acc.narrow(2, 0, a.size(2)).addcmul_(a, b);
  } else {
    at::mul_out(acc, a, b);
  }
}

// The plan of `_tiles.pack` (blocks [nb, 8], rows and cols [n, 3]), its largest block sizes, and the masks and row
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

  // The widest row block of query block bi.
  int64_t block_rows(int64_t bi) const {
    int64_t ba = 1;
    for (int64_t r = B[bi][3]; r < B[bi][4]; ++r) ba = std::max(ba, R[r][1] - R[r][0]);
    return ba;
  }

  const bool* pad_of(int64_t h) const { return pad ? pad + (h / heads) * Tk : nullptr; }

  // A row-stream tensor x [BH, Tk', width] as a tile of query block (t0, bq) and row block r sees it: with a row
  // window, query t's offsets j are rows t + row_start + j of x (which has w_row - 1 leading rows), a Hankel view
  // [BH, bq, ba, width]; without, the block's keys [BH, 1, ba, width], shared by the queries.
  Tensor rows_of(const Tensor& x, int64_t t0, int64_t bq, int64_t r) const {
    const int64_t row_start = R[r][0], ba = R[r][1] - row_start, width = x.size(2);
    if (w_row > 0) {
      return x.as_strided({x.size(0), bq, ba, width}, {x.stride(0), width, width, 1},
                          x.storage_offset() + (t0 + row_start) * width);
    }
    return x.narrow(1, row_start, ba).unsqueeze(1);
  }

  // The row masks of tile (bi, r) for every sequence of the batch into ok [BH / heads, bq * ba] (heads of a sequence
  // share theirs), or nullptr when no row entry is masked.
  bool* row_masks(Tensor& ok_buf, int64_t BH, int64_t t0, int64_t bq, int64_t r) const {
    if (R[r][2] == 0) return nullptr;
    const int64_t row_start = R[r][0], ba = R[r][1] - row_start;
    bool* ok = ok_buf.data_ptr<bool>();
    for (int64_t h = 0; h < BH; h += heads) {
      row_mask(ok + (h / heads) * bq * ba, bq, ba, t0, row_start, w_row, pad_of(h));
    }
    return ok;
  }

  // Zeroes the masked entries of the exp'ed tiles p [BH, bc, bq * ba] of column block c.
  template <typename scalar_t>
  void zero(scalar_t* p, const bool* ok, int64_t BH, int64_t t0, int64_t bq, int64_t ba, int64_t c) const {
    const bool col_masked = C[c][2] != 0;
    if (!col_masked && ok == nullptr) return;
    const int64_t bc = C[c][1] - C[c][0], n = bq * ba;
    for (int64_t h = 0; h < BH; ++h) {
      zero_masked(p + h * bc * n, bc, bq, ba, t0, C[c][0], w_col, col_masked, pad_of(h),
                  ok ? ok + (h / heads) * n : nullptr);
    }
  }
};

// Inputs as `tiled._forward` prepares them ([BH, T, .] contiguous, compute dtype):
//   q_aug [BH, Tq, d+1] = [q * scale, -m]; kc1 [BH, Tk, d+1] = [kc, 1]; vc1 [BH, Tk, d+1] = [vc, 1];
//   kr1 [BH, Tk', d+1] = [kr, 1] and vr [BH, Tk', d], with w_row - 1 zero rows in front when w_row > 0;
//   blocks [nb, 8] = (start, stop, t0, row_begin, row_end, col_begin, col_end, clamp) indexing
//   rows / cols [n, 3] = (start, stop, masked) (`_tiles.pack`); pad [B, Tk] bool (True: padding) or empty.
// Returns num [BH, Tq, d] = sum exp(s - m) v1 * v2 and l [BH, Tq] = sum exp(s - m) over the allowed pairs.
template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const Tensor& q_aug, const Tensor& kr1, const Tensor& kc1, const Tensor& vr,
                                        const Tensor& vc1, const Plan& plan, double floor) {
  const int64_t BH = q_aug.size(0), Tq = q_aug.size(1), d1 = q_aug.size(2), d = d1 - 1;
  const auto& B = plan.B;
  const auto& C = plan.C;
  const int64_t n_max = plan.max_bq * plan.max_ba;
  auto opt = q_aug.options();
  Tensor num = at::zeros({BH, Tq, d}, opt), l = at::zeros({BH, Tq}, opt);
  // Scratch reused by every tile (a fresh multi-MB tensor per tile costs page faults).
  Tensor qk_buf = at::empty({BH * n_max * d1}, opt), pv_buf = at::empty({BH * n_max * d1}, opt);
  Tensor s_buf = at::empty({BH * plan.max_bc * n_max}, opt), acc_buf = at::empty({BH * n_max * d}, opt);
  Tensor ok_buf = at::empty({BH * n_max}, opt.dtype(at::kBool));

  for (int64_t bi = 0; bi < plan.blocks(); ++bi) {
    const int64_t start = B[bi][0], bq = B[bi][1] - start, t0 = B[bi][2], ba_max = plan.block_rows(bi);
    const bool several_rows = B[bi][4] - B[bi][3] > 1, clamp = B[bi][7] != 0;
    // sum_b P vc_b * vr_a per (t, a), summed over a at the end of the block
    Tensor acc = acc_buf.narrow(0, 0, BH * bq * ba_max * d).view({BH, bq, ba_max, d});
    if (several_rows) acc.zero_();
    Tensor l_block = l.narrow(1, start, bq);
    for (int64_t r = B[bi][3]; r < B[bi][4]; ++r) {
      const int64_t ba = plan.R[r][1] - plan.R[r][0], n = bq * ba;
      Tensor qk = qk_buf.narrow(0, 0, BH * n * d1).view({BH, bq, ba, d1});  // rows (t, a): [q_t * kr_a, -m_t]
      at::mul_out(qk, q_aug.narrow(1, start, bq).unsqueeze(2), plan.rows_of(kr1, t0, bq, r));
      Tensor qk_cols = qk.view({BH, n, d1}).transpose(1, 2);
      const bool* ok = plan.row_masks(ok_buf, BH, t0, bq, r);
      Tensor pv = pv_buf.narrow(0, 0, BH * n * d1).view({BH, n, d1});  // [P @ vc, row sums of P]
      for (int64_t c = B[bi][5]; c < B[bi][6]; ++c) {
        const int64_t col_start = C[c][0], bc = C[c][1] - col_start;
        // (s - m) transposed, [BH, bc, bq*ba]: column-major, so a column key's mask is a run of one tile row
        Tensor s = s_buf.narrow(0, 0, BH * bc * n).view({BH, bc, n});
        at::bmm_out(s, kc1.narrow(1, col_start, bc), qk_cols);
        if (clamp) s.clamp_min_(floor);  // keeps exp off its slow path for scores far under the reference
        s.exp_();
        plan.zero(s.data_ptr<scalar_t>(), ok, BH, t0, bq, ba, c);
        Tensor vc_tile = vc1.narrow(1, col_start, bc);
        if (c == B[bi][5]) {
          at::bmm_out(pv, s.transpose(1, 2), vc_tile);
        } else {
          pv.baddbmm_(s.transpose(1, 2), vc_tile);
        }
      }
      Tensor pv4 = pv.view({BH, bq, ba, d1});
      l_block.add_(pv4.select(3, d).sum(2));  // the ones column of vc1 summed P over b; now over a
      add_row_products(acc, pv4.narrow(3, 0, d), plan.rows_of(vr, t0, bq, r), several_rows);
    }
    Tensor num_block = num.narrow(1, start, bq);
    at::sum_out(num_block, acc, {2});
  }
  return {num, l};
}

// Inputs as `tiled._backward` prepares them: q_aug [BH, Tq, d+1] = [q * scale, -lse], g_aug [BH, Tq, d+1] =
// [dO, -D]; kr1, vr1 [BH, Tk', d+1] = [kr, 1], [vr, 1] (padded as in the forward); col_stack [3BH, Tk, d+1] =
// [kc, 1; vc, 1; kc, 1]; gq [2BH, Tq, d] = [dO; q]; the plan and pad as in the forward.
// Returns dq [BH, Tq, d], [dvr; dkr] [2BH, Tk', d] (with the forward's w_row - 1 leading rows when w_row > 0) and
// [dvc; dkc] [2BH, Tk, d].
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& q_aug, const Tensor& g_aug, const Tensor& kr1,
                                                 const Tensor& vr1, const Tensor& col_stack, const Tensor& gq,
                                                 const Plan& plan, double floor) {
  const int64_t BH = q_aug.size(0), Tq = q_aug.size(1), d1 = q_aug.size(2), d = d1 - 1, Tk = col_stack.size(1);
  const auto& B = plan.B;
  const auto& C = plan.C;
  const int64_t n_max = plan.max_bq * plan.max_ba;
  auto opt = q_aug.options();
  Tensor dq = at::zeros({BH, Tq, d}, opt), dvk = at::zeros({2 * BH, Tk, d}, opt);
  Tensor dvkr = at::zeros({2 * BH, kr1.size(1), d}, opt);
  Tensor left_buf = at::empty({2 * BH * n_max * d1}, opt), tile_buf = at::empty({2 * BH * plan.max_bc * n_max}, opt);
  Tensor rp_buf = at::empty({2 * BH * n_max * d}, opt), dq_buf = at::empty({BH * n_max * d}, opt);
  Tensor dvk_buf = at::empty({2 * BH * plan.max_bc * d}, opt);
  Tensor ok_buf = at::empty({BH * n_max}, opt.dtype(at::kBool));
  // Windowed row gradients: key t + j of the padded rows gets the contributions (t, j), the anti-diagonals of a
  // [bq, ba] grid. Written through a view whose row t starts t entries into a [bq, ba + bq] buffer, a sum over t
  // adds them up (as `tiled._RowGrad`); the entries outside the view stay zero.
  Tensor skew_buf = at::zeros({2 * BH * plan.max_bq * (plan.max_ba + plan.max_bq) * d}, opt);
  int64_t skew_bq = 0, skew_ba = 0;  // the view last written: another shape's view covers other entries

  for (int64_t bi = 0; bi < plan.blocks(); ++bi) {
    const int64_t start = B[bi][0], bq = B[bi][1] - start, t0 = B[bi][2], ba_max = plan.block_rows(bi);
    const bool several_rows = B[bi][4] - B[bi][3] > 1, clamp = B[bi][7] != 0;
    Tensor dq_b = dq_buf.narrow(0, 0, BH * bq * ba_max * d).view({BH, bq, ba_max, d});  // per (t, a)
    if (several_rows) dq_b.zero_();
    Tensor gq_b = gq.narrow(1, start, bq).unsqueeze(2);  // [2BH, bq, 1, d]
    for (int64_t r = B[bi][3]; r < B[bi][4]; ++r) {
      const int64_t row_start = plan.R[r][0], ba = plan.R[r][1] - row_start, n = bq * ba;
      Tensor k_rows = plan.rows_of(kr1, t0, bq, r);  // [BH, bq or 1, ba, d+1]
      // Rows (t, a) of [q*kr, -lse; dO*vr, -D]: against [kc, 1; vc, 1] they give S - lse and dP - D; their first d
      // columns are the operands of the column gradients (dkc, dvc).
      Tensor left = left_buf.narrow(0, 0, 2 * BH * n * d1).view({2, BH, bq, ba, d1});
      Tensor left_q = left[0], left_g = left[1];
      at::mul_out(left_q, q_aug.narrow(1, start, bq).unsqueeze(2), k_rows);
      at::mul_out(left_g, g_aug.narrow(1, start, bq).unsqueeze(2), plan.rows_of(vr1, t0, bq, r));
      Tensor left2 = left.view({2 * BH, n, d1});
      Tensor left_cols = left2.transpose(1, 2);  // [2BH, d+1, n]
      Tensor q_rows = left2.narrow(0, 0, BH).narrow(2, 0, d), g_rows = left2.narrow(0, BH, BH).narrow(2, 0, d);
      const bool* ok = plan.row_masks(ok_buf, BH, t0, bq, r);
      Tensor row_products = rp_buf.narrow(0, 0, 2 * BH * n * d).view({2 * BH, n, d});  // [P @ vc; dS @ kc]
      for (int64_t c = B[bi][5]; c < B[bi][6]; ++c) {
        const int64_t col_start = C[c][0], bc = C[c][1] - col_start;
        Tensor tile = tile_buf.narrow(0, 0, 2 * BH * bc * n).view({2 * BH, bc, n});  // transposed, as the forward
        at::bmm_out(tile, col_stack.narrow(0, 0, 2 * BH).narrow(1, col_start, bc), left_cols);
        Tensor s = tile.narrow(0, 0, BH), dp = tile.narrow(0, BH, BH);
        if (clamp) s.clamp_min_(floor);
        s.exp_();
        plan.zero(s.data_ptr<scalar_t>(), ok, BH, t0, bq, ba, c);
        dp.mul_(s);  // s is P, dp becomes dS = P * (dP - D)
        Tensor vk = col_stack.narrow(0, BH, 2 * BH).narrow(1, col_start, bc).narrow(2, 0, d);  // [vc; kc]
        if (c == B[bi][5]) {
          at::bmm_out(row_products, tile.transpose(1, 2), vk);
        } else {
          row_products.baddbmm_(tile.transpose(1, 2), vk);
        }
        // [dvc; dkc] += [P @ (dO * vr); dS @ (q * kr)]: two GEMMs into one buffer, then one add (a batched
        // baddbmm_ into the strided slice of dvk runs as one small addmm per matrix, slower)
        Tensor dvk_tile = dvk_buf.narrow(0, 0, 2 * BH * bc * d).view({2 * BH, bc, d});
        Tensor dvc_tile = dvk_tile.narrow(0, 0, BH), dkc_tile = dvk_tile.narrow(0, BH, BH);
        at::bmm_out(dvc_tile, s, g_rows);
        at::bmm_out(dkc_tile, dp, q_rows);
        dvk.narrow(1, col_start, bc).add_(dvk_tile);
      }
      Tensor products = row_products.view({2 * BH, bq, ba, d});
      if (plan.w_row > 0) {  // [dvr; dkr] of key t + j (padded rows) += products[t, j] * [dO_t; q_t]
        const int64_t width = ba + bq;
        Tensor buf = skew_buf.narrow(0, 0, 2 * BH * bq * width * d).view({2 * BH, bq, width, d});
        if (bq != skew_bq || ba != skew_ba) {
          buf.zero_();
          skew_bq = bq, skew_ba = ba;
        }
        Tensor view = buf.as_strided({2 * BH, bq, ba, d}, {bq * width * d, (width + 1) * d, d, 1},
                                     buf.storage_offset());
        at::mul_out(view, products, gq_b);
        dvkr.narrow(1, t0 + row_start, width - 1).add_(buf.sum(1).narrow(1, 0, width - 1));
      } else {
        dvkr.narrow(1, row_start, ba).add_((products * gq_b).sum(1));
      }
      add_row_products(dq_b, products.narrow(0, BH, BH), k_rows.narrow(3, 0, d), several_rows);
    }
    Tensor dq_block = dq.narrow(1, start, bq);
    at::sum_out(dq_block, dq_b, {2});
  }
  return {dq, dvkr, dvk};
}

// The masks and row views index raw memory from these shapes: a wrong argument must fail here, not read past a buffer.
void check_inputs(const char* name, std::initializer_list<const Tensor*> tensors, const Tensor& blocks,
                  const Tensor& rows, const Tensor& cols, const Tensor& pad, const Tensor& row_stream,
                  const Tensor& col_stream, int64_t BH, int64_t w_row, int64_t heads) {
  const auto dtype = (*tensors.begin())->scalar_type();
  const int64_t Tk = col_stream.size(1);
  TORCH_CHECK(heads >= 1 && BH % heads == 0, name, ": heads must divide the batch*heads dimension");
  TORCH_CHECK(row_stream.size(1) == Tk + std::max<int64_t>(w_row - 1, 0), name,
              ": the row stream must have w_row - 1 leading rows before its Tk keys");
  TORCH_CHECK(pad.numel() == 0 || (pad.dim() == 2 && pad.size(0) * heads == BH && pad.size(1) == Tk), name,
              ": pad must be [B, Tk]");
  for (const Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                name, ": inputs must be contiguous CPU tensors of one dtype");
  }
  for (const Tensor* t : {&blocks, &rows, &cols}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->is_contiguous(),
                name, ": the plan must be contiguous 2-D int64 tensors");
  }
  TORCH_CHECK(pad.numel() == 0 || (pad.scalar_type() == at::kBool && pad.is_contiguous()),
              name, ": pad must be empty or a contiguous bool tensor");
}

std::tuple<Tensor, Tensor> forward_tiles(const Tensor& q_aug, const Tensor& kr1, const Tensor& kc1, const Tensor& vr,
                                         const Tensor& vc1, int64_t w_row, int64_t w_col, const Tensor& blocks,
                                         const Tensor& rows, const Tensor& cols, const Tensor& pad, int64_t heads,
                                         double floor) {
  check_inputs("forward_tiles", {&q_aug, &kr1, &kc1, &vr, &vc1}, blocks, rows, cols, pad, kr1, kc1, q_aug.size(0),
               w_row, heads);
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q_aug.scalar_type(), "forward_tiles", [&] {
    result = forward_impl<scalar_t>(q_aug, kr1, kc1, vr, vc1, Plan(blocks, rows, cols, w_row, w_col, pad, heads,
                                                                   kc1.size(1)), floor);
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor> backward_tiles(const Tensor& q_aug, const Tensor& g_aug, const Tensor& kr1,
                                                  const Tensor& vr1, const Tensor& col_stack, const Tensor& gq,
                                                  int64_t w_row, int64_t w_col, const Tensor& blocks,
                                                  const Tensor& rows, const Tensor& cols, const Tensor& pad,
                                                  int64_t heads, double floor) {
  check_inputs("backward_tiles", {&q_aug, &g_aug, &kr1, &vr1, &col_stack, &gq}, blocks, rows, cols, pad, kr1,
               col_stack, q_aug.size(0), w_row, heads);
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q_aug.scalar_type(), "backward_tiles", [&] {
    result = backward_impl<scalar_t>(q_aug, g_aug, kr1, vr1, col_stack, gq,
                                     Plan(blocks, rows, cols, w_row, w_col, pad, heads, col_stack.size(1)), floor);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY(hf_tensor_attn_cpu, m) {
  m.def("forward_tiles(Tensor q_aug, Tensor kr1, Tensor kc1, Tensor vr, Tensor vc1, int w_row, int w_col, "
        "Tensor blocks, Tensor rows, Tensor cols, Tensor pad, int heads, float floor) -> (Tensor, Tensor)");
  m.def("backward_tiles(Tensor q_aug, Tensor g_aug, Tensor kr1, Tensor vr1, Tensor col_stack, Tensor gq, int w_row, "
        "int w_col, Tensor blocks, Tensor rows, Tensor cols, Tensor pad, int heads, float floor) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_tensor_attn_cpu, CPU, m) {
  m.impl("forward_tiles", &forward_tiles);
  m.impl("backward_tiles", &backward_tiles);
}
