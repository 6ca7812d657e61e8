// INT8 GEMM kernels compiled for avx512 (flags from CMakeLists.txt by file
// name), plus an AMX-INT8 tile path for CPUs that have it (Sapphire Rapids
// and later; only reached when the dispatcher found AMX usable at run time).
// Everything lands in an anonymous namespace, so this file's copies can never
// be linked into another ISA's code path.
#include <stdlib.h>

#include <new>

#include "common/simd.h"
#include "common/thread_pool.h"
#include "int8_matmul/int8_matmul.h"

namespace tallow {
namespace int8mm {
namespace {
#define TALLOW_I8_AMX 1
#include "int8_matmul/int8_matmul_kernel.h"

// ------------------------------------------------------------------ AMX path
//
// tdpbusd is the tile form of vpdpbusd: C[16 x 16 int32] += A[16 x 64 u8] .
// B[16 k-groups x (16 x 4) s8]. A B tile is 16 consecutive k-groups of one
// packed 16-column block: 16 rows of 64 bytes, stride 64 — exactly our packed
// layout [NB][KB][16][4], so the same packed weights serve both paths.
// Register blocking: 2 A tiles (32 rows) x 2 B tiles (32 columns) -> 4 C tiles.
// The k-groups beyond the last multiple of 16 are added by the VNNI
// micro-kernel on the stored accumulators; the zero-point / dequant epilogue
// is shared with the VNNI path.

constexpr int kAmxMB = 128;  // rows per task (the A buffer is zero padded to a multiple of 16)

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) void amx_begin() {
  TileConfig cfg;
  __builtin_memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // Not _tile_loadconfig: GCC's version tells the compiler it reads only 8
  // bytes, so the rows/colsb stores above get eliminated as dead (SIGILL).
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

// acc[r][c] (row stride kNR int32) = sum over k-groups [0, kb_end) of
// A[row0 + r] . B[block j + c/16], for a 32 x 32 block (TR/TC: second row /
// column tile present).
template <bool TR, bool TC>
__attribute__((target("amx-tile,amx-int8"))) void amx_block(const uint8_t* a, int64_t lda,
                                                            const int8_t* b0, const int8_t* b1,
                                                            int64_t kb_end, int32_t* acc) {
  _tile_zero(0);
  if (TC) _tile_zero(1);
  if (TR) _tile_zero(2);
  if (TR && TC) _tile_zero(3);
  for (int64_t kb = 0; kb < kb_end; kb += 16) {
    _tile_loadd(4, a + kb * 4, lda);
    _tile_loadd(6, b0 + kb * 64, 64);
    if (TC) _tile_loadd(7, b1 + kb * 64, 64);
    _tile_dpbusd(0, 4, 6);
    if (TC) _tile_dpbusd(1, 4, 7);
    if (TR) {
      _tile_loadd(5, a + 16 * lda + kb * 4, lda);
      _tile_dpbusd(2, 5, 6);
      if (TC) _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, acc, kNR * 4);
  if (TC) _tile_stored(1, acc + 16, kNR * 4);
  if (TR) _tile_stored(2, acc + 16 * kNR, kNR * 4);
  if (TR && TC) _tile_stored(3, acc + 16 * kNR + 16, kNR * 4);
}

// Rows [m0, m0 + rows) x column chunk nc with AMX tiles (acc: kAmxMB rows).
void amx_rows(const GemmArgs& g, int64_t m0, int rows, int64_t nc, const int8_t* panel,
              const int32_t* cs, int32_t* acc) {
  const int64_t KB = (g.K + 3) / 4;
  const int64_t KB16 = KB / 16 * 16;
  const int64_t NB = (g.N + 15) / 16;
  const int nbk = static_cast<int>(k_min(kNBK, NB - nc * kNBK));
  const int64_t n0 = nc * kNR;
  const int ncols = static_cast<int>(k_min(kNR, g.N - n0));
  const int64_t bstride = KB * 64;
  for (int64_t ms = m0; ms < m0 + rows; ms += kAmxMB) {
    const int sub = static_cast<int>(k_min(kAmxMB, m0 + rows - ms));
    // Column pairs outer: the pair's B tiles (2 x 16 KiB at K = 1024) stay in
    // L1 while the row tiles sweep over them.
    for (int j = 0; j < nbk; j += 2) {
      const bool two_cols = nbk - j > 1;
      const int8_t* b0 = panel + j * bstride;
      const int8_t* b1 = panel + (j + 1) * bstride;
      for (int r = 0; r < sub; r += 32) {
        const bool two_rows = sub - r > 16;
        const uint8_t* ar = g.a + (ms + r) * g.lda;
        int32_t* c = acc + r * kNR + j * 16;
        if (two_rows && two_cols)
          amx_block<true, true>(ar, g.lda, b0, b1, KB16, c);
        else if (two_rows)
          amx_block<true, false>(ar, g.lda, b0, b1, KB16, c);
        else if (two_cols)
          amx_block<false, true>(ar, g.lda, b0, b1, KB16, c);
        else
          amx_block<false, false>(ar, g.lda, b0, b1, KB16, c);
      }
    }
    if (KB16 < KB) {
      for (int mt = 0; mt < sub; mt += kMR) {
        const int mr = static_cast<int>(k_min(kMR, sub - mt));
        micro_for(mr, nbk)(g.a + (ms + mt) * g.lda, g.lda, panel, bstride, KB16, KB, acc + mt * kNR,
                           KB16 == 0);
      }
    }
    epilogue(g, acc, ms, sub, n0, ncols, cs);
  }
}

void gemm_amx(const GemmArgs& g) { drive(g, &amx_rows, &amx_begin, &amx_end, kAmxMB); }

}  // namespace

extern const IsaKernels kKernelsAvx512;
const IsaKernels kKernelsAvx512 = {kABytes, kS8Offset, &isa_a_from_s8, &isa_quantize_rows,
                                 &isa_quantize_rows_a, &isa_gemm, &isa_quantize_rows_b32,
                                 &isa_gemm_b32, &isa_quantize_rows_u7,
                                 kU7Faster};

}  // namespace int8mm
}  // namespace tallow
