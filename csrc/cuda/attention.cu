// Attention forward in CUDA C++: FlashAttention-2 with tensor cores, and a
// generic warp kernel with flash-decoding.
//
// Contract: tallow.ops.attention (q [B,H,Lq,D], k/v [B,H,Lk,D], causal
// aligned bottom-right: query i sees keys j <= Lk - Lq + i; mask [B, Lk]
// nonzero = padding; a query that sees no key gives zeros).
//
// Maths (FlashAttention-2, Dao 2023, Algorithm 1), in base 2 with
// s_ij = (scale log2 e) q_i . k_j, per row and tile of keys:
//     m' = max(m, max_j s_ij)   p_ij = 2^(s_ij - m')
//     l' = 2^(m - m') l + sum_j p_ij,   O' = 2^(m - m') O + P V,   out = O / l
//
// attn_wmma (fp16/bf16, D in {16, 32, ..., 128}, the prefill path): a block
// of 4 warps owns 64 queries (16 per warp); K/V tiles of 64 keys are staged in
// shared memory; Q.K^T and P.V run on the tensor cores (nvcuda::wmma
// 16x16x16, fp32 accumulation; mma.sync on sm_80+); the per-row online
// softmax runs on the fp32 score tile in shared memory, P is rounded to the
// input type for P.V (as in FlashAttention-2); O stays in fp32 in shared
// memory.
//
// attn_generic (any dtype incl. fp32, D <= 256, and decode): one warp per
// query row, 8 rows per block sharing K/V tiles of 32 keys in shared memory
// (fp32). Lane j computes s_j for key j of the tile; the lanes own the
// output's D elements for P.V. With splits > 1 (flash-decoding, Dao et al.
// 2023) each split's blocks fold only their part of the key range and writes (m, l, O)
// to the workspace; attn_combine merges the parts:
//     M = max_s m_s,  out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s
#include <mma.h>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace tallow {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ bool visible(const AttnArgs& a, int64_t b, int64_t i, int64_t j) {
  if (j >= a.Lk || i >= a.Lq) return false;
  if (a.causal && j > a.Lk - a.Lq + i) return false;
  if (a.mask != nullptr && a.mask[b * a.mask_sb + j] != 0) return false;
  return true;
}

// ------------------------------------------------------------ generic kernel

constexpr int kGenRows = 8;   // warps (query rows) per block
constexpr int kGenKeys = 32;  // keys per shared tile
constexpr int kMaxD = 256;

template <typename T>
__global__ void __launch_bounds__(kGenRows * 32) attn_generic(AttnArgs a) {
  extern __shared__ float gsm[];
  const int D = (int)a.D;
  const int ldk = D + 1;  // odd stride: lane j reads row j without bank conflicts
  float* Ks = gsm;                          // [32][D+1]
  float* Vs = Ks + kGenKeys * ldk;          // [32][D]
  float* Qs = Vs + kGenKeys * D;            // [8][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // grid (query blocks x splits, H, B): query blocks of one head run side by
  // side (K/V reuse in L2); B and H each up to 65535
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t bh = b * a.H + h;
  const int split = (int)(blockIdx.x % (unsigned)a.splits);
  const int64_t i0 = (int64_t)(blockIdx.x / (unsigned)a.splits) * kGenRows;
  const int64_t i = i0 + warp;
  const T* q = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1];
  const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + h * a.sk[1];
  const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + h * a.sv[1];
  const float qk = a.scale * kLog2e;
  for (int d = lane; d < D; d += 32) Qs[warp * D + d] = i < a.Lq ? to_f32(q[i * a.sq[2] + d]) * qk : 0.f;

  // key range of this split, and the causal limit of the block's last row
  const int64_t chunk = (a.Lk + a.splits - 1) / a.splits;
  const int64_t lo = (int64_t)split * chunk;
  int64_t hi = lo + chunk < a.Lk ? lo + chunk : a.Lk;
  if (a.causal) {
    int64_t last = i0 + kGenRows - 1 < a.Lq - 1 ? i0 + kGenRows - 1 : a.Lq - 1;
    int64_t lim = a.Lk - a.Lq + last + 1;
    if (lim < hi) hi = lim;
  }
  float m = -INFINITY, l = 0.f;
  float o[kMaxD / 32];
#pragma unroll
  for (int t = 0; t < kMaxD / 32; ++t) o[t] = 0.f;

  for (int64_t j0 = lo; j0 < hi; j0 += kGenKeys) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kGenKeys * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      const int64_t j = j0 + r;
      const bool ok = j < hi;
      Ks[r * ldk + d] = ok ? to_f32(k[j * a.sk[2] + d]) : 0.f;
      Vs[r * D + d] = ok ? to_f32(v[j * a.sv[2] + d]) : 0.f;
    }
    __syncthreads();
    const int64_t j = j0 + lane;
    float s = -INFINITY;
    if (j < hi && visible(a, b, i, j)) {
      float acc = 0.f;
      const float* kr = Ks + lane * ldk;
      const float* qr = Qs + warp * D;
      for (int d = 0; d < D; ++d) acc = fmaf(qr[d], kr[d], acc);
      s = acc;
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float m_sub = m_new == -INFINITY ? 0.f : m_new;
    const float p = exp2f(s - m_sub);
    const float alpha = exp2f(m - m_sub);
    l = l * alpha + warp_sum(p);
    m = m_new;
#pragma unroll
    for (int t = 0; t < kMaxD / 32; ++t) o[t] *= alpha;
    const int nk = (int)(hi - j0 < kGenKeys ? hi - j0 : kGenKeys);
    for (int jj = 0; jj < nk; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
      for (int t = 0; t < kMaxD / 32; ++t) {
        const int d = lane + 32 * t;
        if (d < D) o[t] = fmaf(pj, Vs[jj * D + d], o[t]);
      }
    }
  }
  if (i >= a.Lq) return;
  if (a.splits > 1) {
    float* ws = a.workspace + ((bh * a.Lq + i) * a.splits + split) * (a.D + 2);
    if (lane == 0) {
      ws[0] = m;
      ws[1] = l;
    }
#pragma unroll
    for (int t = 0; t < kMaxD / 32; ++t) {
      const int d = lane + 32 * t;
      if (d < D) ws[2 + d] = o[t];
    }
    return;
  }
  T* out = static_cast<T*>(a.out) + b * a.so[0] + h * a.so[1] + i * a.so[2];
  const float inv = l == 0.f ? 0.f : 1.f / l;
#pragma unroll
  for (int t = 0; t < kMaxD / 32; ++t) {
    const int d = lane + 32 * t;
    if (d < D) out[d] = from_f32<T>(o[t] * inv);
  }
}

template <typename T>
__global__ void attn_combine(AttnArgs a) {
  // one warp per (b*h, i)
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.B * a.H * a.Lq) return;
  const int64_t bh = row / a.Lq, i = row % a.Lq;
  const int64_t b = bh / a.H, h = bh % a.H;
  const float* ws = a.workspace + row * a.splits * (a.D + 2);
  float mx = -INFINITY;
  for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, ws[s * (a.D + 2)]);
  if (mx == -INFINITY) mx = 0.f;
  float l = 0.f;
  for (int s = 0; s < a.splits; ++s) l += exp2f(ws[s * (a.D + 2)] - mx) * ws[s * (a.D + 2) + 1];
  const float inv = l == 0.f ? 0.f : 1.f / l;
  T* out = static_cast<T*>(a.out) + b * a.so[0] + h * a.so[1] + i * a.so[2];
  for (int d = lane; d < a.D; d += 32) {
    float o = 0.f;
    for (int s = 0; s < a.splits; ++s) o += exp2f(ws[s * (a.D + 2)] - mx) * ws[s * (a.D + 2) + 2 + d];
    out[d] = from_f32<T>(o * inv);
  }
}

// ------------------------------------------------------------ tensor-core kernel

constexpr int kBM = 64, kBN = 64, kWarps = 4;

template <int DP>
struct WmmaLayout {
  static constexpr int ldq = DP + 8;  // halves; wmma needs ldm % 8 == 0 and 32-byte aligned rows
  static constexpr int lds = kBN + 4;
  static constexpr int ldp = kBN + 8;
  static constexpr int ldo = DP + 4;
  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = align(q_off + (size_t)kBM * ldq * 2);
  static constexpr size_t v_off = align(k_off + (size_t)kBN * ldq * 2);
  static constexpr size_t s_off = align(v_off + (size_t)kBN * ldq * 2);
  static constexpr size_t p_off = align(s_off + (size_t)kBM * lds * 4);
  static constexpr size_t o_off = align(p_off + (size_t)kBM * ldp * 2);
  static constexpr size_t r_off = align(o_off + (size_t)kBM * ldo * 4);
  static constexpr size_t bytes = align(r_off + (size_t)3 * kBM * 4);
};

template <typename T, int DP>
__global__ void __launch_bounds__(kWarps * 32) attn_wmma(AttnArgs a) {
  using namespace nvcuda;
  using L = WmmaLayout<DP>;
  extern __shared__ __align__(128) unsigned char wsm[];
  T* Qs = reinterpret_cast<T*>(wsm + L::q_off);
  T* Ks = reinterpret_cast<T*>(wsm + L::k_off);
  T* Vs = reinterpret_cast<T*>(wsm + L::v_off);
  float* Ss = reinterpret_cast<float*>(wsm + L::s_off);
  T* Ps = reinterpret_cast<T*>(wsm + L::p_off);
  float* Os = reinterpret_cast<float*>(wsm + L::o_off);
  float* m_row = reinterpret_cast<float*>(wsm + L::r_off);
  float* l_row = m_row + kBM;
  float* a_row = l_row + kBM;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = (int)a.D;
  const int64_t b = blockIdx.z, h = blockIdx.y;  // grid (query blocks, H, B)
  const int64_t i0 = (int64_t)blockIdx.x * kBM;
  const T* q = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1];
  const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + h * a.sk[1];
  const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + h * a.sv[1];
  const T zero = from_f32<T>(0.f);
  for (int idx = threadIdx.x; idx < kBM * DP; idx += blockDim.x) {
    const int r = idx / DP, d = idx % DP;
    Qs[r * L::ldq + d] = (i0 + r < a.Lq && d < D) ? q[(i0 + r) * a.sq[2] + d] : zero;
    Os[r * L::ldo + d] = 0.f;
  }
  if (threadIdx.x < kBM) {
    m_row[threadIdx.x] = -INFINITY;
    l_row[threadIdx.x] = 0.f;
  }
  const float qk = a.scale * kLog2e;
  int64_t hi = a.Lk;
  if (a.causal) {
    const int64_t lim = a.Lk - a.Lq + i0 + kBM;
    if (lim < hi) hi = lim;
  }
  const int wr = warp * 16;  // this warp's first row in the tile

  for (int64_t j0 = 0; j0 < hi; j0 += kBN) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBN * DP; idx += blockDim.x) {
      const int r = idx / DP, d = idx % DP;
      const bool ok = j0 + r < a.Lk && d < D;
      Ks[r * L::ldq + d] = ok ? k[(j0 + r) * a.sk[2] + d] : zero;
      Vs[r * L::ldq + d] = ok ? v[(j0 + r) * a.sv[2] + d] : zero;
    }
    __syncthreads();
    // S = Q K^T for this warp's 16 rows x 64 keys
#pragma unroll
    for (int nt = 0; nt < kBN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kt = 0; kt < DP / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, Qs + wr * L::ldq + kt * 16, L::ldq);
        wmma::load_matrix_sync(fb, Ks + nt * 16 * L::ldq + kt * 16, L::ldq);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Ss + wr * L::lds + nt * 16, acc, L::lds, wmma::mem_row_major);
    }
    __syncwarp();
    // online softmax: 2 lanes per row, 32 columns each
    {
      const int r = wr + (lane >> 1), c0 = (lane & 1) * 32;
      const int64_t i = i0 + r;
      float sv[32];
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < 32; ++c) {
        const int64_t j = j0 + c0 + c;
        const float s = visible(a, b, i, j) ? Ss[r * L::lds + c0 + c] * qk : -INFINITY;
        sv[c] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = m_row[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_sub = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < 32; ++c) {
        const float p = exp2f(sv[c] - m_sub);
        sum += p;
        Ps[r * L::ldp + c0 + c] = from_f32<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      __syncwarp();
      if ((lane & 1) == 0) {
        const float alpha = exp2f(m_old - m_sub);
        a_row[r] = alpha;
        l_row[r] = l_row[r] * alpha + sum;
        m_row[r] = m_new;
      }
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * DP; idx += 32) {
      const int r = wr + idx / DP, d = idx % DP;
      Os[r * L::ldo + d] *= a_row[r];
    }
    __syncwarp();
    // O += P V
#pragma unroll
    for (int dt = 0; dt < DP / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + wr * L::ldo + dt * 16, L::ldo, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < kBN / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, Ps + wr * L::ldp + kt * 16, L::ldp);
        wmma::load_matrix_sync(fb, Vs + kt * 16 * L::ldq + dt * 16, L::ldq);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Os + wr * L::ldo + dt * 16, acc, L::ldo, wmma::mem_row_major);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(a.out) + b * a.so[0] + h * a.so[1];
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = wr + idx / D, d = idx % D;
    const int64_t i = i0 + r;
    if (i >= a.Lq) continue;
    const float l = l_row[r];
    out[i * a.so[2] + d] = from_f32<T>(l == 0.f ? 0.f : Os[r * L::ldo + d] / l);
  }
}

template <typename T, int DP>
cudaError_t launch_wmma(const AttnArgs& a, cudaStream_t st) {
  const size_t smem = WmmaLayout<DP>::bytes;
  cudaError_t e = cudaFuncSetAttribute(attn_wmma<T, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  dim3 grid((unsigned)ceil_div(a.Lq, kBM), (unsigned)a.H, (unsigned)a.B);
  attn_wmma<T, DP><<<grid, kWarps * 32, smem, st>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wmma_d(const AttnArgs& a, cudaStream_t st, bool* done) {
  *done = true;
  switch (a.D) {
    case 64: return launch_wmma<T, 64>(a, st);
    case 80: return launch_wmma<T, 80>(a, st);
    case 128: return launch_wmma<T, 128>(a, st);
    default: *done = false; return cudaSuccess;
  }
}

template <typename T>
cudaError_t launch_generic(const AttnArgs& a, cudaStream_t st) {
  const size_t smem = (size_t)(kGenKeys * (a.D + 1) + kGenKeys * a.D + kGenRows * a.D) * sizeof(float);
  cudaError_t e = cudaFuncSetAttribute(attn_generic<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  dim3 grid((unsigned)(ceil_div(a.Lq, kGenRows) * a.splits), (unsigned)a.H, (unsigned)a.B);
  attn_generic<T><<<grid, kGenRows * 32, smem, st>>>(a);
  e = cudaGetLastError();
  if (e != cudaSuccess || a.splits <= 1) return e;
  const int64_t rows = a.B * a.H * a.Lq;
  attn_combine<T><<<(unsigned)ceil_div(rows, 4), 128, 0, st>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_t(const AttnArgs& a, cudaStream_t st) {
  if (a.splits <= 1 && a.Lq >= 16) {
    bool done = false;
    cudaError_t e = launch_wmma_d<T>(a, st, &done);
    if (done) return e;
  }
  return launch_generic<T>(a, st);
}

}  // namespace

int attention_splits(int64_t bh, int64_t lq, int64_t lk, int sms) {
  // flash-decoding only for short query blocks that cannot fill the GPU
  if (lq > 4 || sms <= 0) return 1;
  const int64_t blocks = bh * ((lq + kGenRows - 1) / kGenRows);
  if (blocks >= 2 * (int64_t)sms) return 1;
  int64_t by_occupancy = (2 * (int64_t)sms + blocks - 1) / blocks;
  int64_t by_length = lk / (4 * kGenKeys);
  int64_t s = by_occupancy < by_length ? by_occupancy : by_length;
  if (s > 128) s = 128;
  return s < 1 ? 1 : (int)s;
}

int attention_forward(const AttnArgs& a, uintptr_t stream) {
  if (a.D < 1 || a.D > kMaxD) return (int)cudaErrorInvalidValue;
  if (a.splits > 1 && a.workspace == nullptr) return (int)cudaErrorInvalidValue;
  cudaStream_t st = as_stream(stream);
  switch (a.dtype) {
    case kF32: return (int)launch_generic<float>(a, st);
    case kF16: return (int)dispatch_t<__half>(a, st);
    case kBF16: return (int)dispatch_t<__nv_bfloat16>(a, st);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace tallow
