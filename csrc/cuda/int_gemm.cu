// Integer GEMM and convolution on CUDA: int8 or packed-int4 operands on int8 tensor cores
// (mma.sync m16n8k32 s8, sm_80+), exact int32 accumulation, and the dequantizing epilogue of
// the CPU kernels (csrc/cpu/int_gemm.cpp) applied as each accumulator leaves the registers:
//   out = relu?(float(acc - x_zero[m] * rowsum[n]) * (x_scale[m] * w_scale[n]) + bias[n])
// with the same float32 operations in the same order (no FMA contraction: -fmad=false and _rn
// intrinsics), so results match the CPU backend bit for bit. uint8 activations never reach
// these kernels: the Python op shifts them (and their zero point) by -128 to int8 first.
//
// Kernels:
//  - gemm_tiled: 128 x 128 output tile per block of 8 warps (2 x 4 warps of 64 x 32), K in
//    steps of 64 through a 4-stage cp.async pipeline in shared memory. Operands are rows of
//    bytes with K contiguous (A: M x K, B: N x K, the nn.Linear weight layout), int8 or
//    packed int4; packed tiles stay packed in shared memory (half the bytes) and are unpacked
//    to int8 as the fragments are loaded into registers. Ragged M / N / K edges are
//    zero-filled by the loads (cp.async src-size < 16); rows whose base or stride is not
//    16-byte aligned take a byte-wise load into shared memory instead.
//  - gemv_w4a8 (M <= 4, int8 activations, packed int4 weights; with SYNQ_CUDA_GEMV=1 until
//    it has run on a GPU): a dp4a GEMV, one warp per two weight rows, 16-byte weight loads
//    four deep per row and lane.
//  - gemm_small_m (M <= 16, and the other operand kinds at M <= 4): the weights stream once from global memory straight into MMA
//    fragments (16-byte loads, several in flight per warp), the activations' 16 rows are the
//    A operand (rows >= M are zero); warps split K and add their partial tiles in shared
//    memory. Weight-bandwidth bound, which is what batch-1 inference is.
//  - quantized_conv2d: the same tiled kernel with an implicit-GEMM A loader (M = output
//    pixels, K = C/groups * kh * kw, padded positions holding the zero point); the K order is
//    (c, ky, kx) for inputs whose channels are not contiguous and (ky, kx, c) for
//    channels-last ones, whose 16 consecutive channels then come in one 16-byte load (the
//    weight is permuted to match). groups on blockIdx.z. C/groups == 1 (depthwise) runs a
//    direct kernel, one output element per thread.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

namespace synq {
namespace {

// ---------------------------------------------------------------------------------------
// PTX wrappers.
//
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 D = A (16 x 32) * B (32 x 8) + C, one warp.
// Lane l: g = l / 4 ("groupID"), t = l % 4 ("threadID_in_group"). Each .b32 register of A
// and B packs 4 consecutive k values, lowest k in the lowest byte (PTX ISA, "Matrix fragments
// for mma.m16n8k32"):
//   A: a0 = A[g    ][4t .. 4t+3]      a1 = A[g + 8][4t .. 4t+3]
//      a2 = A[g    ][16+4t .. 16+4t+3] a3 = A[g + 8][16+4t .. 16+4t+3]
//   B: b0 = B[4t .. 4t+3][g]           b1 = B[16+4t .. 16+4t+3][g]     (B[k][n] = W[n][k])
//   C/D: c0 = D[g][2t]  c1 = D[g][2t+1]  c2 = D[g+8][2t]  c3 = D[g+8][2t+1]
// The sum over k does not care which physical k sits in a logical slot, as long as A and B
// use the same assignment; gemm_small_m relies on that (see there).
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

// ldmatrix.x4: four 8 x 8 matrices of 16-bit elements (here: 8 rows x 16 bytes each). Lanes
// 8j .. 8j+7 give the row addresses of matrix j; afterwards register j of lane l holds row
// l / 4, 32-bit word l % 4 of matrix j, i.e. bytes 4(l%4) .. 4(l%4)+3 of row g: exactly the
// a0..a3 / b0, b1 pattern above when matrix j is the right 8-row x 16-k block.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// 16-byte asynchronous copy global -> shared; the (16 - src_bytes) last bytes are zero-filled
// (src_bytes = 0: nothing is read, 16 zeros written). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four int4 values in the low 16 bits (element i in bits 4i .. 4i+3, the pack_int4 layout)
// to four int8 in bytes 0..3. Signed: a nibble with bit 3 set gets 0xF0 or-ed in (bit 3 of
// each byte times 0x1E is 0xF0 in that byte, no carry between bytes).
__device__ __forceinline__ uint32_t unpack_int4x4(uint32_t v, bool is_signed) {
  uint32_t x = (v & 0xFu) | ((v << 4) & 0xF00u) | ((v << 8) & 0xF0000u) |
               ((v << 12) & 0xF000000u);
  if (is_signed) x |= (x & 0x08080808u) * 0x1Eu;
  return x;
}

// ---------------------------------------------------------------------------------------
// Operands and epilogue.

// Rows of bytes with unit column stride: int8 values, or packed int4 (row_bytes = ceil(K/2)).
struct Operand {
  const uint8_t* p;
  int64_t ld;         // bytes between rows
  int64_t rows;
  int64_t row_bytes;  // valid bytes per row
  bool vec16;         // p and ld 16-byte aligned: 16-byte loads allowed
};

enum OutKind : int { kOutInt32 = 0, kOutFloat = 1, kOutHalf = 2, kOutBFloat16 = 3 };

// Writes one accumulator. Linear (P == 0): out[m * ldo + n]. Convolution (P > 0): m = b * P
// + p (image, output pixel), n the output channel, out[b * sob + n * soc + p * sop].
struct Epilogue {
  void* out;
  int kind;
  int64_t ldo;
  const float* xs;   // x_scale: [m] if per_row else [0]
  const int32_t* xz; // x_zero: [m] if per_row else [0]
  bool per_row;
  const float* ws;
  const int32_t* rs;
  const float* bias;  // may be null
  bool relu;
  int64_t P, sob, soc, sop;

  // Not inlined: inlined into the 64 unrolled stores of gemm_tiled, the compiler unswitched
  // its run-time branches (kind, P, bias, relu) into dozens of copies of the whole epilogue
  // (76k lines of PTX per kernel, minutes of ptxas); one call per element costs far less.
  __device__ __noinline__ void operator()(int64_t m, int64_t n, int32_t acc) const {
    int64_t off;
    if (P > 0) {
      const int64_t b = m / P;
      off = b * sob + n * soc + (m - b * P) * sop;
    } else {
      off = m * ldo + n;
    }
    if (kind == kOutInt32) {
      static_cast<int32_t*>(out)[off] = acc;
      return;
    }
    const int64_t i = per_row ? m : 0;
    // The CPU kernel's expression, operation by operation (int32 wrap-around included).
    const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(acc) -
                                           static_cast<uint32_t>(xz[i]) *
                                               static_cast<uint32_t>(rs[n]));
    float y = __fmul_rn(__int2float_rn(v), __fmul_rn(xs[i], ws[n]));
    if (bias != nullptr) y = __fadd_rn(y, bias[n]);
    if (relu) y = y < 0.f ? 0.f : y;
    if (kind == kOutFloat) {
      static_cast<float*>(out)[off] = y;
    } else if (kind == kOutHalf) {
      static_cast<__half*>(out)[off] = __float2half_rn(y);
    } else {
      static_cast<__nv_bfloat16*>(out)[off] = __float2bfloat16_rn(y);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Tiled tensor-core GEMM.

constexpr int kThreads = 256;  // 8 warps
constexpr int kBM = 128, kBN = 128, kBK = 64;  // block tile; kBK in K values
constexpr int kStages = 4;
// Shared rows are padded by 16 bytes: a row stride of 80 (int8) or 48 (packed) bytes puts the
// 8 rows read by one ldmatrix phase / one fragment load on 8 distinct groups of 4 banks.
constexpr int kPad = 16;

template <bool PACKED>
struct TileRow {
  static constexpr int bytes = PACKED ? kBK / 2 : kBK;  // bytes of one row per K step
  static constexpr int stride = bytes + kPad;
};

template <bool A_PACKED, bool B_PACKED>
constexpr int stage_bytes() {
  return kBM * TileRow<A_PACKED>::stride + kBN * TileRow<B_PACKED>::stride;
}

// Rows r0 .. r0+R-1, bytes c0 .. c0+TB-1 of `op` into shared memory (row stride `stride`),
// zero past the operand's rows and row_bytes.
template <int R, int TB>
__device__ __forceinline__ void load_rows(const Operand& op, int64_t r0, int64_t c0,
                                          uint8_t* smem, int stride, int tid) {
  constexpr int kChunks = TB / 16;  // 16-byte chunks per row
  for (int i = tid; i < R * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 16;
    uint8_t* dst = smem + r * stride + c;
    const int64_t row = r0 + r, col = c0 + c;
    int64_t avail = row < op.rows ? op.row_bytes - col : 0;
    avail = avail < 0 ? 0 : (avail > 16 ? 16 : avail);
    if (op.vec16) {
      const uint8_t* src = avail > 0 ? op.p + row * op.ld + col : op.p;
      cp_async16(dst, src, static_cast<int>(avail));
    } else {
      const uint8_t* src = op.p + row * op.ld + col;
      uint32_t w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t v = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b)
          if (q * 4 + b < avail) v |= static_cast<uint32_t>(src[q * 4 + b]) << (8 * b);
        w[q] = v;
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// A loader of a plain GEMM: tile rows m0.., K step kt.
template <bool PACKED>
struct RowLoader {
  Operand a;
  __device__ __forceinline__ void operator()(uint8_t* smem, int64_t m0, int kt, int tid) const {
    load_rows<kBM, TileRow<PACKED>::bytes>(a, m0, static_cast<int64_t>(kt) * TileRow<PACKED>::bytes,
                                           smem, TileRow<PACKED>::stride, tid);
  }
};

// A loader of the implicit-GEMM convolution (int8): row m = output pixel (b, oy, ox) of the
// block's group (blockIdx.z), column k = tap (c, ky, kx) in the order below; out-of-image
// taps hold the zero point, k >= K holds 0.
struct ConvLoader {
  const int8_t* x;
  int64_t sxb, sxc, sxh, sxw;  // element strides of x
  int64_t M;                   // B * OH * OW
  int P, OW;                   // OH * OW, OW
  int H, W, Cg, kh, kw, sh, sw, ph, pw, dh, dw, K;
  bool cl_order;  // k = (ky * kw + kx) * Cg + c (channels contiguous), else (c * kh + ky) * kw + kx
  bool vec16;     // cl_order with Cg % 16 == 0: 16 consecutive k are 16 channels of one tap
  const int32_t* xz;

  __device__ __forceinline__ void operator()(uint8_t* smem, int64_t m0, int kt, int tid) const {
    constexpr int kStride = TileRow<false>::stride;
    const int r = tid >> 1;           // 2 threads per tile row, 32 K values each
    const int kofs = (tid & 1) * 32;
    uint8_t* dst = smem + r * kStride + kofs;
    const int64_t m = m0 + r;
    const int k0 = kt * kBK + kofs;
    if (m >= M || k0 >= K) {
      const uint4 z = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(dst) = z;
      *reinterpret_cast<uint4*>(dst + 16) = z;
      return;
    }
    const uint32_t zb = static_cast<uint32_t>(__ldg(xz)) & 0xFFu;
    const int64_t b = m / P;
    const int p = static_cast<int>(m - b * P);
    const int oy = p / OW, ox = p - (p / OW) * OW;
    const int iy0 = oy * sh - ph, ix0 = ox * sw - pw;
    const int8_t* xb = x + b * sxb + static_cast<int64_t>(blockIdx.z) * Cg * sxc;
    if (vec16) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = k0 + 16 * h;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (k < K) {  // K is a multiple of 16 here: the 16 values are all valid or all not
          const int tap = k / Cg, c = k - tap * Cg;
          const int ky = tap / kw, kx = tap - (tap / kw) * kw;
          const int iy = iy0 + ky * dh, ix = ix0 + kx * dw;
          if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
            const int8_t* src = xb + iy * sxh + ix * sxw + c;
            if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
              v = __ldg(reinterpret_cast<const uint4*>(src));
            } else {
              uint32_t q[4];
#pragma unroll
              for (int j = 0; j < 4; ++j)
                q[j] = (static_cast<uint32_t>(static_cast<uint8_t>(src[4 * j]))) |
                       (static_cast<uint32_t>(static_cast<uint8_t>(src[4 * j + 1])) << 8) |
                       (static_cast<uint32_t>(static_cast<uint8_t>(src[4 * j + 2])) << 16) |
                       (static_cast<uint32_t>(static_cast<uint8_t>(src[4 * j + 3])) << 24);
              v = make_uint4(q[0], q[1], q[2], q[3]);
            }
          } else {
            const uint32_t f = zb * 0x01010101u;
            v = make_uint4(f, f, f, f);
          }
        }
        *reinterpret_cast<uint4*>(dst + 16 * h) = v;
      }
      return;
    }
    // Digits of k, stepped one K value at a time (divisions only for the first); one
    // 32-bit shared store per 4 values.
    int c, ky, kx;
    if (cl_order) {
      const int tap = k0 / Cg;
      c = k0 - tap * Cg;
      ky = tap / kw;
      kx = tap - ky * kw;
    } else {
      const int t = k0 / kw;
      kx = k0 - t * kw;
      c = t / kh;
      ky = t - c * kh;
    }
#pragma unroll 1
    for (int q = 0; q < 8; ++q) {
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (k0 + 4 * q + i < K) {
          const int iy = iy0 + ky * dh, ix = ix0 + kx * dw;
          const uint32_t v =
              (iy >= 0 && iy < H && ix >= 0 && ix < W)
                  ? static_cast<uint32_t>(static_cast<uint8_t>(xb[c * sxc + iy * sxh + ix * sxw]))
                  : zb;
          word |= v << (8 * i);
          if (cl_order) {
            if (++c == Cg) { c = 0; if (++kx == kw) { kx = 0; ++ky; } }
          } else {
            if (++kx == kw) { kx = 0; if (++ky == kh) { ky = 0; ++c; } }
          }
        }
      }
      *reinterpret_cast<uint32_t*>(dst + 4 * q) = word;
    }
  }
};

// C[m, n] = sum_k A[m, k] B[n, k] over the block's 128 x 128 tile, then epi(m, z * N + n, C)
// (z = blockIdx.z: the convolution's group; B's rows of group z start at row z * N).
template <bool A_PACKED, bool B_PACKED, class ALoader>
__global__ void __launch_bounds__(kThreads, 2)
    gemm_tiled(ALoader aload, Operand b, int64_t M, int N, int K, bool a_signed, Epilogue epi) {
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int SA = TileRow<A_PACKED>::stride, SB = TileRow<B_PACKED>::stride;
  constexpr int TBB = TileRow<B_PACKED>::bytes;
  constexpr int kStage = stage_bytes<A_PACKED, B_PACKED>();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64 .. +63, cols wn*32 .. +31
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const int64_t z = blockIdx.z;
  b.p += z * N * b.ld;
  const int KT = (K + kBK - 1) / kBK;

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  auto load_stage = [&](int kt) {
    uint8_t* st = smem + (kt % kStages) * kStage;
    aload(st, m0, kt, tid);
    load_rows<kBN, TBB>(b, n0, static_cast<int64_t>(kt) * TBB, st + kBM * SA, SB, tid);
  };

  // Prologue: K steps 0 .. kStages-2 in flight, one commit group each (empty past KT, so
  // that the group count, and with it the wait below, stays uniform).
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    // Groups committed so far: kStages - 1 + kt; allowing kStages - 2 in flight means
    // groups 0 .. kt (K step kt) have landed for this thread; the barrier makes every
    // thread's copies visible and also ends the reads of step kt - 1's stage, which the
    // load below overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    uint8_t* st = smem + (kt % kStages) * kStage;
    if (A_PACKED && (K & 1) && kt == KT - 1) {
      // Odd K: element K (the high nibble of A's last byte) is padding, possibly not zero;
      // clear it so that it cannot meet B's padding nibble.
      const int byte = (K - 1) / 2 - kt * TileRow<A_PACKED>::bytes;
      if (tid < kBM) st[tid * SA + byte] &= 0x0F;
      __syncthreads();
    }
    if (kt + kStages - 1 < KT) load_stage(kt + kStages - 1);
    cp_async_commit();

    const uint8_t* As = st;
    const uint8_t* Bs = st + kBM * SA;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = wm * 64 + mi * 16;
        if constexpr (!A_PACKED) {
          // matrix j = lanes 8j..8j+7: rows r + 8 (j & 1) + (l & 7), k ks + 16 (j >> 1)
          // -> a0 (rows 0-7, k 0-15), a1 (rows 8-15, k 0-15), a2 (rows 0-7, k 16-31), a3.
          ldmatrix_x4(af[mi], As + (r + (lane & 15)) * SA + ks + (lane >> 4) * 16);
        } else {
          // k = ks + 4t .. +3 is packed bytes ks/2 + 2t, +1; k + 16 is 8 bytes further.
          const uint8_t* p0 = As + (r + g) * SA + ks / 2 + 2 * t;
          const uint8_t* p1 = p0 + 8 * SA;
          af[mi][0] = unpack_int4x4(*reinterpret_cast<const uint16_t*>(p0), a_signed);
          af[mi][1] = unpack_int4x4(*reinterpret_cast<const uint16_t*>(p1), a_signed);
          af[mi][2] = unpack_int4x4(*reinterpret_cast<const uint16_t*>(p0 + 8), a_signed);
          af[mi][3] = unpack_int4x4(*reinterpret_cast<const uint16_t*>(p1 + 8), a_signed);
        }
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int r = wn * 32 + np * 16;  // two n8 tiles: rows r .. r+7 and r+8 .. r+15
        if constexpr (!B_PACKED) {
          // matrix j: B rows r + 8 (j >> 1) + (l & 7), k ks + 16 (j & 1)
          // -> b0, b1 of tile 2np, then b0, b1 of tile 2np + 1.
          uint32_t q[4];
          ldmatrix_x4(q, Bs + (r + ((lane >> 4) << 3) + (lane & 7)) * SB + ks +
                             ((lane >> 3) & 1) * 16);
          bf[2 * np][0] = q[0];
          bf[2 * np][1] = q[1];
          bf[2 * np + 1][0] = q[2];
          bf[2 * np + 1][1] = q[3];
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint8_t* p = Bs + (r + 8 * h + g) * SB + ks / 2 + 2 * t;
            bf[2 * np + h][0] = unpack_int4x4(*reinterpret_cast<const uint16_t*>(p), true);
            bf[2 * np + h][1] = unpack_int4x4(*reinterpret_cast<const uint16_t*>(p + 8), true);
          }
        }
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_s8(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int64_t r = m0 + wm * 64 + mi * 16 + g;
      const int c = n0 + wn * 32 + ni * 8 + 2 * t;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t rr = r + (e >> 1) * 8;
        const int cc = c + (e & 1);
        if (rr < M && cc < N) epi(rr, z * N + cc, acc[mi][ni][e]);
      }
    }
}

// ---------------------------------------------------------------------------------------
// Small M (<= 16): weight streaming.
//
// A warp owns 8 weight rows (n = its group's base + g) and a share of K in chunks: per chunk
// lane (g, t) loads 16 bytes of row n, i.e. KT = 16 (int8) or 32 (packed) K values starting
// at kb = chunk * 4 KT + t KT. Those registers feed KT / 8 MMAs directly, without shared
// memory, using the freedom noted at mma_s8: in MMA j, logical k 4t..4t+3 (b0 / a0 / a1) is
// physical kb + 8j .. +3 and logical 16+4t..+3 (b1 / a2 / a3) is physical kb + 8j + 4 .. +7.
// Both A and B are read with this same map, whose image over t and j is all 4 KT K values
// of the chunk, each once.
constexpr int kSmallM = 16;
constexpr int kSmallNG = 2;  // groups of 8 weight rows per block
constexpr int kSmallKS = 4;  // warps splitting K within a group
constexpr int kSmallU = 4;   // chunks per warp with loads in flight together
static_assert(kSmallNG * kSmallKS * 32 == kThreads, "small-M block shape");

// 16 bytes of weight row n from byte (kb / 2 if packed else kb), zero past the row / K
// (for packed rows, the nibble of element K when K is odd too).
template <bool PACKED>
__device__ __forceinline__ uint4 load_b_chunk(const Operand& b, int64_t n, int kb, int K) {
  constexpr int KT = PACKED ? 32 : 16;
  if (n >= b.rows) return make_uint4(0, 0, 0, 0);
  const uint8_t* src = b.p + n * b.ld + (PACKED ? kb / 2 : kb);
  if (b.vec16 && kb + KT <= K) return __ldg(reinterpret_cast<const uint4*>(src));
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t v = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = 4 * q + i;  // byte j of the chunk
      uint32_t byte = 0;
      if (PACKED) {
        if (kb + 2 * j < K) byte = src[j] & (kb + 2 * j + 1 < K ? 0xFFu : 0x0Fu);
      } else {
        if (kb + j < K) byte = src[j];
      }
      v |= byte << (8 * i);
    }
    w[q] = v;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// K values k .. k+7 of activation row m as int8: lo = k .. k+3, hi = k+4 .. k+7; zero for
// m >= M or past K.
template <bool PACKED>
__device__ __forceinline__ uint2 load_a8(const Operand& a, int m, int k, int K,
                                         bool a_signed) {
  if (m >= a.rows) return make_uint2(0, 0);
  const uint8_t* row = a.p + m * a.ld;
  if (k + 8 <= K) {
    if (PACKED) {
      const uint8_t* src = row + k / 2;  // k is a multiple of 8: 4-byte offset
      if ((reinterpret_cast<uintptr_t>(src) & 3) == 0) {
        const uint32_t v = __ldg(reinterpret_cast<const uint32_t*>(src));
        return make_uint2(unpack_int4x4(v & 0xFFFFu, a_signed), unpack_int4x4(v >> 16, a_signed));
      }
    } else {
      const uint8_t* src = row + k;
      if ((reinterpret_cast<uintptr_t>(src) & 7) == 0) return __ldg(reinterpret_cast<const uint2*>(src));
    }
  }
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int kk = k + i;
    uint32_t v = 0;
    if (kk < K) {
      if (PACKED) {
        uint32_t nib = (row[kk >> 1] >> ((kk & 1) * 4)) & 0xFu;
        if (a_signed) nib |= (nib & 8u) * 0x1Eu;  // sign-extend to 8 bits
        v = nib & 0xFFu;
      } else {
        v = row[kk];
      }
    }
    w[i >> 2] |= v << (8 * (i & 3));
  }
  return make_uint2(w[0], w[1]);
}

template <bool A_PACKED, bool B_PACKED>
__global__ void __launch_bounds__(kThreads)
    gemm_small_m(Operand a, Operand b, int N, int K, bool a_signed, Epilogue epi) {
  constexpr int KT = B_PACKED ? 32 : 16;  // K values per lane per chunk
  constexpr int CK = 4 * KT;              // K values per chunk
  __shared__ int red[kSmallKS][kSmallNG][kSmallM][8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ng = warp % kSmallNG, ks = warp / kSmallNG;
  const int64_t nbase = static_cast<int64_t>(blockIdx.x) * (8 * kSmallNG) + ng * 8;
  const int64_t n = nbase + g;
  const int nchunks = (K + CK - 1) / CK;
  int acc[4] = {0, 0, 0, 0};
  for (int c0 = ks; c0 < nchunks; c0 += kSmallKS * kSmallU) {
    uint4 w[kSmallU];
#pragma unroll
    for (int u = 0; u < kSmallU; ++u) {
      const int c = c0 + u * kSmallKS;
      w[u] = c < nchunks ? load_b_chunk<B_PACKED>(b, n, c * CK + t * KT, K)
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kSmallU; ++u) {
      const int c = c0 + u * kSmallKS;
      if (c >= nchunks) break;  // warp-uniform
      const int kb = c * CK + t * KT;
      const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
      for (int j = 0; j < KT / 8; ++j) {
        uint32_t b0, b1;
        if (B_PACKED) {  // word j = K values kb + 8j .. +7 as 8 nibbles
          b0 = unpack_int4x4(words[j] & 0xFFFFu, true);
          b1 = unpack_int4x4(words[j] >> 16, true);
        } else {  // words 2j, 2j+1 = K values kb + 8j .. +3, +4 .. +7
          b0 = words[2 * j];
          b1 = words[2 * j + 1];
        }
        const uint2 lo = load_a8<A_PACKED>(a, g, kb + 8 * j, K, a_signed);
        const uint2 hi = load_a8<A_PACKED>(a, g + 8, kb + 8 * j, K, a_signed);
        const uint32_t af[4] = {lo.x, hi.x, lo.y, hi.y};
        mma_s8(acc, af, b0, b1);
      }
    }
  }
  red[ks][ng][g][2 * t] = acc[0];
  red[ks][ng][g][2 * t + 1] = acc[1];
  red[ks][ng][g + 8][2 * t] = acc[2];
  red[ks][ng][g + 8][2 * t + 1] = acc[3];
  __syncthreads();
  for (int i = tid; i < kSmallNG * kSmallM * 8; i += kThreads) {
    const int gi = i / (kSmallM * 8), m = (i / 8) % kSmallM, j = i % 8;
    int s = 0;
#pragma unroll
    for (int q = 0; q < kSmallKS; ++q) s += red[q][gi][m][j];
    const int64_t nn = static_cast<int64_t>(blockIdx.x) * (8 * kSmallNG) + gi * 8 + j;
    if (m < a.rows && nn < N) epi(m, nn, s);
  }
}

// ---------------------------------------------------------------------------------------
// W4A8 GEMV: packed int4 weights, M <= kGemvM rows of int8 activations (batch-1 inference,
// bound by the weight bytes). gemm_small_m's 16-row MMA wasted 15/16 of each product at
// M = 1 and ran at 0.5 TB/s of weight (H200, 1 x 4096 x 4096: 16.8 us). Here one warp owns
// kGemvRows weight rows; lane l takes 16-byte chunks l, l + 32, .. of each (32 K values a
// chunk: the warp reads 512 contiguous bytes of a row at a time), kGemvU chunks per row in
// flight, and multiplies them by the same 32 K values of each activation row with dp4a
// (four int8 products per instruction, exact int32 sums). The lanes' sums meet by shuffles.
constexpr int kGemvM = 4;     // activation rows up to which the GEMV runs
constexpr int kGemvRows = 2;  // weight rows per warp
constexpr int kGemvU = 4;     // chunks per row and lane in flight

// K values k .. k+31 of activation row m as 8 words of 4 int8 (word i: k + 4i .. k + 4i + 3),
// zero past K. vec: the row's bytes k .. k+31 may be read as two 16-byte loads.
__device__ __forceinline__ void load_x32(const Operand& a, int m, int k, int K, bool vec,
                                         uint32_t (&x)[8]) {
  const uint8_t* src = a.p + static_cast<int64_t>(m) * a.ld + k;
  if (vec) {
    const uint4 lo = __ldg(reinterpret_cast<const uint4*>(src));
    const uint4 hi = __ldg(reinterpret_cast<const uint4*>(src) + 1);
    x[0] = lo.x, x[1] = lo.y, x[2] = lo.z, x[3] = lo.w;
    x[4] = hi.x, x[5] = hi.y, x[6] = hi.z, x[7] = hi.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t v = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (k + 4 * i + q < K) v |= static_cast<uint32_t>(src[4 * i + q]) << (8 * q);
    x[i] = v;
  }
}

template <int M>
__global__ void __launch_bounds__(kThreads)
    gemv_w4a8(Operand a, Operand b, int N, int K, Epilogue epi) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 =
      (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5)) * kGemvRows;
  if (n0 >= N) return;  // the whole warp: nothing below synchronizes the block
  const int nchunks = (K + 31) / 32;
  int acc[kGemvRows][M];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0;
  for (int c0 = 0; c0 < nchunks; c0 += 32 * kGemvU) {
    uint4 w[kGemvU][kGemvRows];
#pragma unroll
    for (int u = 0; u < kGemvU; ++u) {
      const int c = c0 + 32 * u + lane;
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r)  // zero past the rows, K and for c >= nchunks
        w[u][r] = c < nchunks ? load_b_chunk<true>(b, n0 + r, 32 * c, K)
                              : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kGemvU; ++u) {
      const int k = 32 * (c0 + 32 * u + lane);
      if (k >= K) break;  // per lane (no warp-wide operation in this loop)
      const bool vec = a.vec16 && k + 32 <= K;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        uint32_t x[8];
        load_x32(a, m, k, K, vec, x);
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
          // word j of the chunk: K values k + 8j .. k + 8j + 7, two per byte, low nibble first
          const uint32_t words[4] = {w[u][r].x, w[u][r].y, w[u][r].z, w[u][r].w};
          int s = acc[r][m];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            s = __dp4a(static_cast<int>(unpack_int4x4(words[j] & 0xFFFFu, true)),
                       static_cast<int>(x[2 * j]), s);
            s = __dp4a(static_cast<int>(unpack_int4x4(words[j] >> 16, true)),
                       static_cast<int>(x[2 * j + 1]), s);
          }
          acc[r][m] = s;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        acc[r][m] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][m], off);
      // every lane holds every sum now; lane r * M + m writes this one
      if (lane == r * M + m && n0 + r < N) epi(m, n0 + r, acc[r][m]);
    }
}

// ---------------------------------------------------------------------------------------
// Depthwise-style convolution (C / groups == 1): one output element per thread, in the
// output's memory order (coalesced stores).
__global__ void __launch_bounds__(kThreads)
    conv_direct(const int8_t* x, int64_t sxb, int64_t sxc, int64_t sxh, int64_t sxw,
                const int8_t* w, int64_t total, int Cout, int Og, int P, int OW, int H, int W,
                int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                bool channels_last, const int32_t* xz_ptr, Epilogue epi) {
  const int32_t xz = __ldg(xz_ptr);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b;
    int co, p;
    if (channels_last) {
      co = static_cast<int>(idx % Cout);
      const int64_t rest = idx / Cout;
      p = static_cast<int>(rest % P);
      b = rest / P;
    } else {
      p = static_cast<int>(idx % P);
      const int64_t rest = idx / P;
      co = static_cast<int>(rest % Cout);
      b = rest / Cout;
    }
    const int c = co / Og;  // the group's only input channel
    const int oy = p / OW, ox = p - (p / OW) * OW;
    const int iy0 = oy * sh - ph, ix0 = ox * sw - pw;
    const int8_t* xc = x + b * sxb + c * sxc;
    const int8_t* wc = w + static_cast<int64_t>(co) * kh * kw;
    int acc = 0;
    for (int ky = 0; ky < kh; ++ky) {
      const int iy = iy0 + ky * dh;
      const bool yin = iy >= 0 && iy < H;
      for (int kx = 0; kx < kw; ++kx) {
        const int ix = ix0 + kx * dw;
        const int v = (yin && ix >= 0 && ix < W) ? static_cast<int>(xc[iy * sxh + ix * sxw]) : xz;
        acc += v * static_cast<int>(wc[ky * kw + kx]);
      }
    }
    epi(b * P + p, co, acc);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                  const char* who) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), who, name, " must be a CUDA tensor on ",
              ref.device(), ", got ", t.device());
}

void check_arch(const char* who) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, who, "needs an sm_80 or newer GPU (int8 tensor-core MMA), got ",
              props->name, " (sm_", props->major, props->minor, ")");
}

void check_operand(const at::Tensor& t, const char* name, bool packed, int64_t K,
                   const char* who) {
  TORCH_CHECK(t.dim() == 2, who, name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == (packed ? at::kByte : at::kChar), who, name, " must be ",
              packed ? "uint8 (packed int4)" : "int8", ", got ", t.scalar_type());
  TORCH_CHECK(t.size(1) == (packed ? (K + 1) / 2 : K), who, name, " has ", t.size(1),
              " columns, K = ", K, " needs ", packed ? (K + 1) / 2 : K);
}

// A 2-D byte matrix with unit column stride (a copy only when it has another).
at::Tensor rows_view(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

Operand make_operand(const at::Tensor& t, int64_t row_bytes) {
  Operand op;
  op.p = static_cast<const uint8_t*>(t.const_data_ptr());
  op.ld = t.size(0) > 1 ? t.stride(0) : row_bytes;
  op.rows = t.size(0);
  op.row_bytes = row_bytes;
  op.vec16 = reinterpret_cast<uintptr_t>(op.p) % 16 == 0 && op.ld % 16 == 0;
  return op;
}

int out_kind(at::ScalarType st, const char* who) {
  switch (st) {
    case at::kFloat: return kOutFloat;
    case at::kHalf: return kOutHalf;
    case at::kBFloat16: return kOutBFloat16;
    default:
      TORCH_CHECK(false, who, "out_dtype must be float32, float16 or bfloat16, got ", st);
  }
  return kOutFloat;
}

template <bool AP, bool BP, class ALoader>
void launch_tiled(const ALoader& aload, const Operand& b, int64_t M, int N, int groups, int K,
                  bool a_signed, const Epilogue& epi, cudaStream_t stream) {
  constexpr int smem = kStages * stage_bytes<AP, BP>();
  auto kernel = gemm_tiled<AP, BP, ALoader>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t mt = (M + kBM - 1) / kBM, nt = (N + kBN - 1) / kBN;
  TORCH_CHECK(mt <= std::numeric_limits<int>::max() && nt <= 65535 && groups <= 65535,
              "synq int gemm (cuda backend): problem too large for the grid (M = ", M, ", N = ",
              N, ", groups = ", groups, ")");
  const dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt),
                  static_cast<unsigned>(groups));
  kernel<<<grid, kThreads, smem, stream>>>(aload, b, M, N, K, a_signed, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_gemv(const Operand& a, const Operand& b, int64_t M, int N, int K,
                 const Epilogue& epi, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / 32 * kGemvRows;
  const unsigned blocks = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
  switch (M) {
    case 1: gemv_w4a8<1><<<blocks, kThreads, 0, stream>>>(a, b, N, K, epi); break;
    case 2: gemv_w4a8<2><<<blocks, kThreads, 0, stream>>>(a, b, N, K, epi); break;
    case 3: gemv_w4a8<3><<<blocks, kThreads, 0, stream>>>(a, b, N, K, epi); break;
    default: gemv_w4a8<4><<<blocks, kThreads, 0, stream>>>(a, b, N, K, epi); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gemv_w4a8 has compiled (sm_80, sm_90) but not yet run on a GPU: it stays behind
// SYNQ_CUDA_GEMV=1 (read at every call) until the GPU tests and benchmark have run it;
// without it, M <= 4 takes gemm_small_m as before.
bool gemv_enabled() {
  const char* v = std::getenv("SYNQ_CUDA_GEMV");
  return v != nullptr && v[0] == '1';
}

template <bool AP, bool BP>
void launch_gemm(const Operand& a, const Operand& b, int64_t M, int N, int K, bool a_signed,
                 const Epilogue& epi, cudaStream_t stream) {
  if constexpr (!AP && BP) {
    if (M <= kGemvM && gemv_enabled()) return launch_gemv(a, b, M, N, K, epi, stream);
  }
  if (M <= kSmallM) {
    const int64_t blocks = (N + 8 * kSmallNG - 1) / (8 * kSmallNG);
    gemm_small_m<AP, BP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, b, N, K, a_signed, epi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    launch_tiled<AP, BP>(RowLoader<AP>{a}, b, M, N, 1, K, a_signed, epi, stream);
  }
}

void gemm_dispatch(bool a_packed, bool b_packed, const Operand& a, const Operand& b, int64_t M,
                   int N, int K, bool a_signed, const Epilogue& epi, cudaStream_t stream) {
  if (!a_packed && !b_packed) launch_gemm<false, false>(a, b, M, N, K, a_signed, epi, stream);
  else if (!a_packed && b_packed) launch_gemm<false, true>(a, b, M, N, K, a_signed, epi, stream);
  else if (a_packed && b_packed) launch_gemm<true, true>(a, b, M, N, K, a_signed, epi, stream);
  else launch_gemm<true, false>(a, b, M, N, K, a_signed, epi, stream);
}

void check_sizes(int64_t M, int64_t N, int64_t K, const char* who) {
  TORCH_CHECK(N < (int64_t{1} << 31) && K < (int64_t{1} << 30), who, "N = ", N, " or K = ", K,
              " too large");
  (void)M;
}

at::Tensor int_mm_cuda(const at::Tensor& a_, const at::Tensor& b_, int64_t K, bool a_packed,
                       bool a_signed, bool b_packed) {
  const char* who = "synq int gemm (cuda backend): ";
  check_operand(a_, "a", a_packed, K, who);
  check_operand(b_, "b", b_packed, K, who);
  check_device(a_, "a", a_, who);
  check_device(b_, "b", a_, who);
  const c10::cuda::CUDAGuard guard(a_.device());
  const int64_t M = a_.size(0), N = b_.size(0);
  check_sizes(M, N, K, who);
  auto out = at::empty({M, N}, a_.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  check_arch(who);
  const auto a = rows_view(a_), b = rows_view(b_);
  Epilogue epi{};
  epi.out = out.mutable_data_ptr();
  epi.kind = kOutInt32;
  epi.ldo = N;
  gemm_dispatch(a_packed, b_packed, make_operand(a, a_packed ? (K + 1) / 2 : K),
                make_operand(b, b_packed ? (K + 1) / 2 : K), M, static_cast<int>(N),
                static_cast<int>(K), a_signed, epi, at::cuda::getCurrentCUDAStream());
  return out;
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType st, int64_t n,
                  const at::Tensor& ref, const char* who) {
  TORCH_CHECK(t.scalar_type() == st && t.is_contiguous() && t.numel() == n, who, name,
              " must be a contiguous ", st, " tensor of ", n, " elements, got ", t.scalar_type(),
              " ", t.sizes());
  check_device(t, name, ref, who);
}

at::Tensor quantized_linear_cuda(const at::Tensor& x_, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero, const at::Tensor& w_,
                                 const at::Tensor& w_scale, const at::Tensor& w_rowsum,
                                 const std::optional<at::Tensor>& bias, bool relu,
                                 at::ScalarType out_dtype, bool w_packed) {
  const char* who = "synq quantized_linear (cuda backend): ";
  TORCH_CHECK(x_.dim() == 2, who, "x must be 2-D");
  const int64_t K = x_.size(1);
  check_operand(x_, "x", false, K, who);
  check_operand(w_, "w", w_packed, K, who);
  check_device(x_, "x", x_, who);
  check_device(w_, "w", x_, who);
  const int64_t M = x_.size(0), N = w_.size(0);
  check_vector(x_scale, "x_scale", at::kFloat, M, x_, who);
  check_vector(x_zero, "x_zero", at::kInt, M, x_, who);
  check_vector(w_scale, "w_scale", at::kFloat, N, x_, who);
  check_vector(w_rowsum, "w_rowsum", at::kInt, N, x_, who);
  if (bias) check_vector(*bias, "bias", at::kFloat, N, x_, who);
  Epilogue epi{};
  epi.kind = out_kind(out_dtype, who);
  const c10::cuda::CUDAGuard guard(x_.device());
  check_sizes(M, N, K, who);
  auto out = at::empty({M, N}, x_.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  check_arch(who);
  const auto x = rows_view(x_), w = rows_view(w_);
  epi.out = out.mutable_data_ptr();
  epi.ldo = N;
  epi.xs = x_scale.const_data_ptr<float>();
  epi.xz = x_zero.const_data_ptr<int32_t>();
  epi.per_row = true;
  epi.ws = w_scale.const_data_ptr<float>();
  epi.rs = w_rowsum.const_data_ptr<int32_t>();
  epi.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  epi.relu = relu;
  gemm_dispatch(false, w_packed, make_operand(x, K), make_operand(w, w_packed ? (K + 1) / 2 : K),
                M, static_cast<int>(N), static_cast<int>(K), true, epi,
                at::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor quantized_conv2d_cuda(const at::Tensor& x, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero, const at::Tensor& w_,
                                 const at::Tensor& w_scale, const at::Tensor& w_rowsum,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool relu, at::ScalarType out_dtype) {
  const char* who = "synq quantized_conv2d (cuda backend): ";
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kChar, who, "x must be 4-D int8, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w_.dim() == 4 && w_.scalar_type() == at::kChar, who, "w must be 4-D int8");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, who,
              "stride, padding and dilation must have 2 entries");
  check_device(x, "x", x, who);
  check_device(w_, "w", x, who);
  const int64_t Bn = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w_.size(0), kh = w_.size(2), kw = w_.size(3);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && Cout % groups == 0 &&
                  w_.size(1) == C / groups,
              who, "groups = ", groups, " does not fit C = ", C, ", w ", w_.sizes());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              who, "stride and dilation must be >= 1 and padding >= 0");
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1],
                dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH >= 1 && OW >= 1, who, "empty output");
  check_vector(x_scale, "x_scale", at::kFloat, 1, x, who);
  check_vector(x_zero, "x_zero", at::kInt, 1, x, who);
  check_vector(w_scale, "w_scale", at::kFloat, Cout, x, who);
  check_vector(w_rowsum, "w_rowsum", at::kInt, Cout, x, who);
  if (bias) check_vector(*bias, "bias", at::kFloat, Cout, x, who);
  Epilogue epi{};
  epi.kind = out_kind(out_dtype, who);
  const c10::cuda::CUDAGuard guard(x.device());
  // Same rule as synq_kernels.reference.int_gemm.conv_memory_format.
  const auto fmt = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
                       ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
  auto out = at::empty({Bn, Cout, OH, OW}, x.options().dtype(out_dtype), fmt);
  if (out.numel() == 0) return out;
  check_arch(who);
  const int64_t Cg = C / groups, Og = Cout / groups, K = Cg * kh * kw, P = OH * OW;
  const int64_t M = Bn * P;
  // int32 index arithmetic inside the kernels: per-image offsets and K stay well below 2^31.
  TORCH_CHECK(K < (int64_t{1} << 30) && P < (int64_t{1} << 30) && H * W < (int64_t{1} << 30) &&
                  std::abs(x.stride(2)) * H < (int64_t{1} << 30) &&
                  std::abs(x.stride(3)) * W < (int64_t{1} << 30) &&
                  std::abs(x.stride(1)) * C < (int64_t{1} << 30),
              who, "input too large for the kernels' 32-bit offsets");
  epi.out = out.mutable_data_ptr();
  epi.xs = x_scale.const_data_ptr<float>();
  epi.xz = x_zero.const_data_ptr<int32_t>();
  epi.per_row = false;
  epi.ws = w_scale.const_data_ptr<float>();
  epi.rs = w_rowsum.const_data_ptr<int32_t>();
  epi.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  epi.relu = relu;
  epi.P = P;
  epi.sob = out.stride(0);
  epi.soc = out.stride(1);
  epi.sop = fmt == at::MemoryFormat::ChannelsLast ? Cout : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int8_t* xp = x.const_data_ptr<int8_t>();
  if (Cg == 1) {
    const auto w = w_.contiguous();
    const int64_t total = Bn * Cout * P;
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65536);
    conv_direct<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xp, x.stride(0), x.stride(1), x.stride(2), x.stride(3), w.const_data_ptr<int8_t>(),
        total, static_cast<int>(Cout), static_cast<int>(Og), static_cast<int>(P),
        static_cast<int>(OW), static_cast<int>(H), static_cast<int>(W), static_cast<int>(kh),
        static_cast<int>(kw), static_cast<int>(sh), static_cast<int>(sw), static_cast<int>(ph),
        static_cast<int>(pw), static_cast<int>(dh), static_cast<int>(dw),
        fmt == at::MemoryFormat::ChannelsLast, epi.xz, epi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  // Channels contiguous in memory: K ordered (ky, kx, c), the weight permuted to match.
  const bool cl_order = x.stride(1) == 1;
  const auto wmat = (cl_order ? w_.permute({0, 2, 3, 1}) : w_).contiguous().view({Cout, K});
  ConvLoader ld;
  ld.x = xp;
  ld.sxb = x.stride(0);
  ld.sxc = x.stride(1);
  ld.sxh = x.stride(2);
  ld.sxw = x.stride(3);
  ld.M = M;
  ld.P = static_cast<int>(P);
  ld.OW = static_cast<int>(OW);
  ld.H = static_cast<int>(H);
  ld.W = static_cast<int>(W);
  ld.Cg = static_cast<int>(Cg);
  ld.kh = static_cast<int>(kh);
  ld.kw = static_cast<int>(kw);
  ld.sh = static_cast<int>(sh);
  ld.sw = static_cast<int>(sw);
  ld.ph = static_cast<int>(ph);
  ld.pw = static_cast<int>(pw);
  ld.dh = static_cast<int>(dh);
  ld.dw = static_cast<int>(dw);
  ld.K = static_cast<int>(K);
  ld.cl_order = cl_order;
  ld.vec16 = cl_order && Cg % 16 == 0;
  ld.xz = epi.xz;
  Operand b = make_operand(wmat, K);
  b.rows = Og;  // per group; the kernel offsets p by blockIdx.z * Og rows
  launch_tiled<false, false>(ld, b, M, static_cast<int>(Og), static_cast<int>(groups),
                             static_cast<int>(K), true, epi, stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CUDA, m) {
  m.impl("_int_mm", &int_mm_cuda);
  m.impl("_quantized_linear", &quantized_linear_cuda);
  m.impl("_quantized_conv2d", &quantized_conv2d_cuda);
}

}  // namespace synq
