// mlsae native SAE kernels: a plain C ABI over raw pointers (no torch headers, so it compiles
// in about a second), loaded with ctypes by mlsae/sae/native.py. Every kernel has a pure-torch
// twin in mlsae/sae/kernels.py that the tests compare it with.
//
// Shapes: n rows (samples), k slots per row, d features, m latents. Index matrices are int64
// [n, k]; an "entry" e = r * k + s is slot s of row r. All float data is fp32 except the
// top-k input, which may be bf16 (dtype code 1). Threads: built with -fopenmp, the OpenMP
// runtime already loaded by torch (same soname, so the same pool: its workers, still spinning
// after torch's last op, take the work at once instead of competing with new threads for the
// cores); without OpenMP, plain std::threads per call. Work is split in dynamic chunks.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

namespace {

// body(t) for every t in [0, nt), on up to nt threads (the caller is one of them).
template <class F>
void run_threads(int nt, F&& body) {
  if (nt <= 1) {
    body(0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int got = omp_get_num_threads();  // the runtime may grant fewer than asked
    for (int t = omp_get_thread_num(); t < nt; t += got) body(t);
  }
#else
  std::vector<std::thread> ts;
  int t = 1;
  for (; t < nt; ++t) {
    try {
      ts.emplace_back(body, t);
    } catch (...) {
      break;  // no more threads: the rest run here
    }
  }
  for (int u = t; u < nt; ++u) body(u);
  body(0);
  for (auto& th : ts) th.join();
#endif
}

// body(begin, end) over [0, n) in chunks, on up to nthreads threads.
template <class F>
void parallel_chunks(i64 n, i64 chunk, int nthreads, F&& body) {
  if (n <= 0) return;
  chunk = std::max<i64>(chunk, 1);
  std::atomic<i64> next(0);
  auto worker = [&](int) {
    for (;;) {
      i64 b = next.fetch_add(chunk);
      if (b >= n) break;
      body(b, std::min(n, b + chunk));
    }
  };
  run_threads((int)std::min<i64>(std::max(nthreads, 1), (n + chunk - 1) / chunk), worker);
}

// Total order of torch.topk: NaN is larger than every number.
inline bool gt(float a, float b) { return a > b || (a != a && b == b); }

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8 ld8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void st8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }

// Prefetch a row of d floats (one hint per 64-byte line).
inline void prefetch_row(const float* p, i64 d) {
  for (i64 c = 0; c < d; c += 16) __builtin_prefetch(p + c, 0, 3);
}

inline float dot(const float* __restrict a, const float* __restrict b, i64 d) {
  v8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  i64 c = 0;
  for (; c + 32 <= d; c += 32) {
    s0 += ld8(a + c) * ld8(b + c);
    s1 += ld8(a + c + 8) * ld8(b + c + 8);
    s2 += ld8(a + c + 16) * ld8(b + c + 16);
    s3 += ld8(a + c + 24) * ld8(b + c + 24);
  }
  for (; c + 8 <= d; c += 8) s0 += ld8(a + c) * ld8(b + c);
  v8 s = (s0 + s1) + (s2 + s3);
  float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

inline float bf16_to_f(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Min-heap of (value, index) under gt: the root is the smallest kept value.
inline void sift_down(float* hv, i64* hi, int k, int pos) {
  float v = hv[pos];
  i64 id = hi[pos];
  for (;;) {
    int c = 2 * pos + 1;
    if (c >= k) break;
    if (c + 1 < k && gt(hv[c], hv[c + 1])) ++c;
    if (!gt(v, hv[c])) break;
    hv[pos] = hv[c];
    hi[pos] = hi[c];
    pos = c;
  }
  hv[pos] = v;
  hi[pos] = id;
}

#if defined(__AVX512F__)
inline unsigned ge16(const float* p, float thr) {  // bit i: p[i] >= thr
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(thr), _CMP_GE_OQ);
}
#elif defined(__AVX2__)
inline unsigned ge8(__m256 a, float thr) {
  return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(thr), _CMP_GE_OQ));
}
inline unsigned ge16(const float* p, float thr) {
  return ge8(_mm256_loadu_ps(p), thr) | (ge8(_mm256_loadu_ps(p + 8), thr) << 8);
}
#else
inline unsigned ge16(const float* p, float thr) {
  unsigned mask = 0;
  for (int i = 0; i < 16; ++i) mask |= (unsigned)(p[i] >= thr) << i;
  return mask;
}
#endif

// The k largest of row[0..m) into (hv, hi) with a heap: for rows holding NaN and small m.
void topk_heap(const float* row, i64 m, int k, float* hv, i64* hi) {
  for (int j = 0; j < k; ++j) {
    hv[j] = row[j];
    hi[j] = j;
  }
  for (int p = k / 2 - 1; p >= 0; --p) sift_down(hv, hi, k, p);
  for (i64 j = k; j < m; ++j) {
    if (gt(row[j], hv[0])) {
      hv[0] = row[j];
      hi[0] = j;
      sift_down(hv, hi, k, 0);
    }
  }
}

struct TopkScratch {
  std::vector<float> gmax, cand_v;
  std::vector<i64> cand_i;
  std::vector<int> perm;
};

// The k largest of row[0..m) into (hv, hi), in no particular order. The first G*s elements
// are cut into G chunks of length s = 2k; gmax[c] = max_i row[i*s + c] are the maxima of s
// disjoint groups, so the k-th largest group maximum thr is a lower bound of the k-th largest
// element. One vector pass collects the elements >= thr (for Gaussian rows, m = 4608, k = 32:
// about 45), and a selection over those gives the exact top-k.
// next (optional): a row read soon after this one, prefetched line by line during the second
// pass so that its first pass finds it in cache (the rows are read from memory otherwise).
void topk_row(const float* row, i64 m, int k, float* hv, i64* hi, TopkScratch& sc,
              const float* next) {
  const i64 s = 2 * (i64)k, G = m / s;
  if (G < 2 || k < 1) {
    topk_heap(row, m, k, hv, hi);
    return;
  }
  sc.gmax.resize(s);
  float* __restrict g = sc.gmax.data();
  std::memcpy(g, row, sizeof(float) * s);
  const i64 s8 = s - s % 8;
  v8i nan = {};
  for (i64 i = 0; i < G; ++i) {
    const float* __restrict x = row + i * s;
    for (i64 c = 0; c < s8; c += 8) {
      v8 xv = ld8(x + c), gv = ld8(g + c);
      nan |= (xv != xv);
      st8(g + c, xv > gv ? xv : gv);
    }
  }
  bool has_nan = false;
  for (int l = 0; l < 8; ++l) has_nan |= nan[l] != 0;
  for (i64 c = s8; c < s; ++c) {
    for (i64 i = 0; i < G; ++i) {
      float x = row[i * s + c];
      has_nan |= x != x;
      g[c] = x > g[c] ? x : g[c];
    }
  }
  for (i64 j = G * s; j < m; ++j) has_nan |= row[j] != row[j];
  if (has_nan) {
    topk_heap(row, m, k, hv, hi);
    return;
  }
  std::nth_element(g, g + (k - 1), g + s, [](float a, float b) { return a > b; });
  const float thr = g[k - 1];
  sc.cand_v.resize(m);
  sc.cand_i.resize(m);
  float* __restrict cv = sc.cand_v.data();
  i64* __restrict ci = sc.cand_i.data();
  i64 nc = 0, j = 0;
  for (; j + 16 <= m; j += 16) {
    if (next) __builtin_prefetch(next + j, 0, 3);
    unsigned mask = ge16(row + j, thr);
    while (mask) {
      int b = __builtin_ctz(mask);
      mask &= mask - 1;
      cv[nc] = row[j + b];
      ci[nc++] = j + b;
    }
  }
  for (; j < m; ++j) {
    if (row[j] >= thr) {
      cv[nc] = row[j];
      ci[nc++] = j;
    }
  }
  // nc >= k: the maxima of the k top groups are >= thr
  sc.perm.resize(nc);
  int* perm = sc.perm.data();
  for (i64 i = 0; i < nc; ++i) perm[i] = (int)i;
  if (nc > k)
    std::nth_element(perm, perm + (k - 1), perm + nc, [cv](int a, int b) { return cv[a] > cv[b]; });
  for (int i = 0; i < k; ++i) {
    hv[i] = cv[perm[i]];
    hi[i] = ci[perm[i]];
  }
}

constexpr i64 CB = 32;  // columns per block: rows x 128 bytes of the table per pass
// out[j, :] = sum over p in [seg[j], seg[j+1]) of w[p] * table[rowoff[p] + (0..d)] for j < nseg;
// out is [nseg, d], or [d, nseg] if transposed. Column-blocked: for each block of CB columns,
// the table's slice (rows x CB floats) is what the gathers touch, so it stays in L2 while
// every segment is summed into registers. Threads own contiguous segment ranges holding
// about equal numbers of entries; each walks the column blocks in the same order.
void seg_axpy(i64 nseg, const i64* seg, const i64* rowoff, const float* w, const float* table,
              i64 d, float* out, bool transposed, int nthreads) {
  constexpr i64 LB = 16;  // segments per transposed store: one 64-byte line per output row
  const i64 total = seg[nseg];
  int nt = (int)std::max<i64>(1, std::min<i64>(nthreads, (nseg + LB - 1) / LB));
  std::vector<i64> bounds(nt + 1, nseg);
  bounds[0] = 0;
  for (int t = 1; t < nt; ++t) {  // split at a multiple of LB with ~t/nt of the entries
    const i64 want = total * t / nt;
    i64 j = std::lower_bound(seg, seg + nseg + 1, want) - seg;
    bounds[t] = std::min(nseg, std::max(bounds[t - 1], (j / LB) * LB));
  }
  auto work = [&](int t) {
    const i64 j0 = bounds[t], j1 = bounds[t + 1];
    float buf[LB * CB];
    for (i64 c0 = 0; c0 < d; c0 += CB) {
      const i64 cw = std::min<i64>(CB, d - c0);
      for (i64 jb = j0; jb < j1; jb += LB) {
        const i64 je = std::min(j1, jb + LB);
        for (i64 j = jb; j < je; ++j) {
          float* __restrict o = transposed ? buf + (j - jb) * CB : out + j * d + c0;
          const i64 p0 = seg[j], p1 = seg[j + 1];
          if (cw == CB) {
            v8 acc[CB / 8] = {};
            for (i64 p = p0; p < p1; ++p) {
              const float* __restrict tp = table + rowoff[p] + c0;
              const float wp = w[p];
              const v8 wv = {wp, wp, wp, wp, wp, wp, wp, wp};
              for (int q = 0; q < CB / 8; ++q) acc[q] += wv * ld8(tp + 8 * q);
            }
            for (int q = 0; q < CB / 8; ++q) st8(o + 8 * q, acc[q]);
          } else {
            float acc[CB] = {};
            for (i64 p = p0; p < p1; ++p) {
              const float* __restrict tp = table + rowoff[p] + c0;
              for (i64 c = 0; c < cw; ++c) acc[c] += w[p] * tp[c];
            }
            for (i64 c = 0; c < cw; ++c) o[c] = acc[c];
          }
        }
        if (transposed) {
          for (i64 c = 0; c < cw; ++c) {
            float* __restrict dst = out + (c0 + c) * nseg + jb;
            for (i64 jj = 0; jj < je - jb; ++jj) dst[jj] = buf[jj * CB + c];
          }
        }
      }
    }
  };
  run_threads(nt, work);
}

}  // namespace

extern "C" {

int mlsae_abi_version() { return 4; }

// 1 if the kernels run on the OpenMP runtime (built with -fopenmp), 0 with std::threads.
int mlsae_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Row-wise top-k of pre [rows, m] (row stride ld elements; dtype 0 = fp32, 1 = bf16) into
// vals f32 [rows, k] and idx i64 [rows, k] (contiguous), in no particular order. With ncols > 0
// also gout f32 [rows, ncols] = pre[:, cols] (AuxK's dead columns), gathered while the row is in
// cache instead of a second strided pass over pre.
void mlsae_topk(const void* pre, int dtype, i64 rows, i64 m, i64 ld, int k, float* vals,
                i64* idx, const i64* cols, i64 ncols, float* gout, int nthreads) {
  if (k <= 0 && ncols <= 0) return;
  constexpr i64 AHEAD = 2;  // rows prefetched ahead (fp32 only): 19 -> 14 ms for 4,096 x 4,608
  parallel_chunks(rows, 64, nthreads, [&](i64 b, i64 e) {
    TopkScratch sc;
    std::vector<float> conv(dtype == 1 ? m : 0);
    for (i64 r = b; r < e; ++r) {
      const float* row = (const float*)pre + r * ld;
      const float* next = dtype == 0 && r + AHEAD < e ? row + AHEAD * ld : nullptr;
      if (dtype == 1) {  // bf16 -> f32 (exact)
        const uint16_t* h = (const uint16_t*)pre + r * ld;
        for (i64 j = 0; j < m; ++j) conv[j] = bf16_to_f(h[j]);
        row = conv.data();
      }
      if (k > 0) topk_row(row, m, k, vals + r * k, idx + r * k, sc, next);
      float* __restrict go = gout + r * ncols;
      for (i64 c = 0; c < ncols; ++c) go[c] = row[cols[c]];
    }
  });
}

// out[r, s] = g[r, :] . table[idx[r, s], :]: g f32 [n, d], table f32 [m, d], out f32 [n, k].
void mlsae_row_dots(const float* g, const i64* idx, i64 n, int k, const float* table, i64 d,
                    float* out, int nthreads) {
  parallel_chunks(n, 32, nthreads, [&](i64 b, i64 e) {
    for (i64 r = b; r < e; ++r) {
      const float* __restrict gr = g + r * d;
      const i64* ir = idx + r * k;
      for (int s = 0; s < k; ++s) {
        if (s + 2 < k) prefetch_row(table + ir[s + 2] * d, d);
        out[r * k + s] = dot(gr, table + ir[s] * d, d);
      }
    }
  });
}

// Counting sort of the entries of idx [n, k] (values in [0, m)) by latent: offsets [m + 1],
// order [n * k] = entry ids, latent by latent, ascending within a latent (stable).
// Returns 0, or -1 if an index is out of range.
int mlsae_segments(const i64* idx, i64 n, int k, i64 m, i64* offsets, i64* order) {
  const i64 nk = n * (i64)k;
  std::memset(offsets, 0, sizeof(i64) * (m + 1));
  for (i64 e = 0; e < nk; ++e) {
    i64 j = idx[e];
    if (j < 0 || j >= m) return -1;
    ++offsets[j + 1];
  }
  for (i64 j = 0; j < m; ++j) offsets[j + 1] += offsets[j];
  std::vector<i64> pos(offsets, offsets + m);
  for (i64 e = 0; e < nk; ++e) order[pos[idx[e]]++] = e;
  return 0;
}

// out[j, :] = sum over entries e of latent j of w[e] * table[e / k, :] for every j in [0, m)
// (zero rows for latents without entries). w f32 [n * k] per entry, table f32 [n, d].
// transposed = 0: out is [m, d]; 1: out is [d, m] (the layout of an encoder weight [d, m]).
// colsum (optional, [m]): sum of w over each latent's entries.
void mlsae_segment_sum(const i64* offsets, const i64* order, int k, const float* w,
                       const float* table, i64 m, i64 d, float* out, int transposed,
                       float* colsum, int nthreads) {
  const i64 nk = offsets[m];
  std::vector<i64> rowoff(nk);
  std::vector<float> we(nk);
  for (i64 p = 0; p < nk; ++p) {
    const i64 e = order[p];
    rowoff[p] = (e / k) * d;
    we[p] = w[e];
  }
  if (colsum) {
    for (i64 j = 0; j < m; ++j) {
      float cs = 0.f;
      for (i64 p = offsets[j]; p < offsets[j + 1]; ++p) cs += we[p];
      colsum[j] = cs;
    }
  }
  seg_axpy(m, offsets, rowoff.data(), we.data(), table, d, out, transposed != 0, nthreads);
}

}  // extern "C"
