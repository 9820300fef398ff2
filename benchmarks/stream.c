/* Streaming memory bandwidth with all cores.
 *
 * Four kernels in float32, each a plain vectorised loop split over the cores by
 * OpenMP, on arrays far larger than the last-level cache:
 *   copy    a = b           8 bytes per element (STREAM's copy)
 *   triad   a = b + s*c    12 bytes per element (STREAM's triad)
 *   update  c = c + s*b    12 bytes per element, written in place
 *   step    a += s*b, c += s*b, d += s*b, e += s*b
 *                          36 bytes per element: the memory traffic of one AMSGrad
 *                          pass (read p, g, mu, nu, nu_max; write p, mu, nu, nu_max)
 *                          with almost no arithmetic
 * Bytes are counted as STREAM counts them: what the loop reads and writes. A store
 * to a line that was not read first (copy, triad) also makes the processor read that
 * line (write-allocate), which is not counted; the in-place kernels have no such
 * traffic, like an optimizer step whose buffers are donated, so they are the ones to
 * compare a donated step with.
 *
 * Usage: stream ELEMENTS REPETITIONS; prints one JSON object with the best and
 * median rate of each kernel in GB/s (1e9 bytes per second).
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* 2 MiB-aligned and, where the kernel allows it, backed by huge pages: the hardware
 * prefetchers stop at page boundaries, and a large allocation may get huge pages in a
 * program such as XLA's runtime too, so the probe must not be handicapped by small ones. */
static float *allocate(long n) {
  const size_t huge = (size_t)2 << 20;
  size_t bytes = (sizeof(float) * (size_t)n + huge - 1) / huge * huge;
  float *p = aligned_alloc(huge, bytes);
#ifdef MADV_HUGEPAGE
  if (p) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

static int compare(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1L << 25;
  int reps = argc > 2 ? atoi(argv[2]) : 10;
  if (n <= 0 || reps <= 0) return 2;
  float *a = allocate(n), *b = allocate(n), *c = allocate(n), *d = allocate(n);
  float *e = allocate(n);
  double *copy_s = malloc(sizeof(double) * (size_t)reps);
  double *triad_s = malloc(sizeof(double) * (size_t)reps);
  double *update_s = malloc(sizeof(double) * (size_t)reps);
  double *step_s = malloc(sizeof(double) * (size_t)reps);
  if (!a || !b || !c || !d || !e || !copy_s || !triad_s || !update_s || !step_s) return 3;
  const float scale = 3.0f;
  /* First touch by the threads that will use the pages, with values that differ from
   * page to page: a hypervisor may merge identical pages, and reading one merged page
   * over and over would come from the cache. */
#pragma omp parallel for schedule(static)
  for (long i = 0; i < n; ++i) {
    unsigned hash = (unsigned)i * 2654435761u;
    a[i] = 1.0f;
    b[i] = 1.0f + (float)(hash >> 20) * 1e-3f;
    c[i] = 0.5f + (float)((hash >> 8) & 4095u) * 1e-4f;
    d[i] = 0.25f + (float)((hash >> 4) & 4095u) * 1e-4f;
    e[i] = 0.125f + (float)(hash & 4095u) * 1e-4f;
  }
  for (int r = 0; r < reps; ++r) {
    double t = now();
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) a[i] = b[i];
    copy_s[r] = now() - t;
    t = now();
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) a[i] = b[i] + scale * c[i];
    triad_s[r] = now() - t;
    t = now();
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) c[i] = c[i] + scale * b[i];
    update_s[r] = now() - t;
    t = now();
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) {
      const float x = scale * b[i];
      a[i] += x;
      c[i] += x;
      d[i] += x;
      e[i] += x;
    }
    step_s[r] = now() - t;
  }
  double checksum = 0.0;
  for (long i = 0; i < n; i += 4096) checksum += a[i];
  qsort(copy_s, (size_t)reps, sizeof(double), compare);
  qsort(triad_s, (size_t)reps, sizeof(double), compare);
  qsort(update_s, (size_t)reps, sizeof(double), compare);
  qsort(step_s, (size_t)reps, sizeof(double), compare);
  double copy_bytes = 8.0 * (double)n, triad_bytes = 12.0 * (double)n;
  printf(
    "{\"threads\": %d, \"elements\": %ld, \"repetitions\": %d, "
    "\"copy_best_gbs\": %.3f, \"copy_median_gbs\": %.3f, "
    "\"triad_best_gbs\": %.3f, \"triad_median_gbs\": %.3f, "
    "\"update_best_gbs\": %.3f, \"update_median_gbs\": %.3f, "
    "\"step_best_gbs\": %.3f, \"step_median_gbs\": %.3f, \"checksum\": %.1f}\n",
    omp_get_max_threads(), n, reps, copy_bytes / copy_s[0] * 1e-9,
    copy_bytes / copy_s[reps / 2] * 1e-9, triad_bytes / triad_s[0] * 1e-9,
    triad_bytes / triad_s[reps / 2] * 1e-9, triad_bytes / update_s[0] * 1e-9,
    triad_bytes / update_s[reps / 2] * 1e-9, 36.0 * (double)n / step_s[0] * 1e-9,
    36.0 * (double)n / step_s[reps / 2] * 1e-9, checksum + (double)d[n / 2] + (double)e[n / 3]);
  free(a);
  free(b);
  free(c);
  free(d);
  free(e);
  free(step_s);
  free(copy_s);
  free(triad_s);
  free(update_s);
  return 0;
}
