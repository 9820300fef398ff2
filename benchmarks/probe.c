/* The memory traffic of one AMSGrad pass, on buffers the caller already has.
 *
 * Built at run time into a shared library (cc -O3 -march=native -shared -fPIC -pthread)
 * and called through ctypes from the JAX worker (after amsgrad_jax.apply_step) and the
 * PyTorch worker (after the fused Adam step), on the very buffers of the step it has just
 * timed: the parameter leaf p, its gradient g and the state mu, nu, nu_max. One call
 * makes one pass
 *
 *   x = g[i] * s;  p[i] += x;  mu[i] += x;  nu[i] += x;  nu_max[i] += x
 *
 * which reads five float32 arrays and writes four of them back in place: 36 bytes per
 * element, the traffic of one AMSGrad step (read p, g, mu, nu, nu_max; write p, mu, nu,
 * nu_max), with one multiply and four adds per element where the step has a few dozen
 * operations. With s = 0 passed at run time (the compiler cannot know it) every value is
 * left as it was: x + 0 = x for every finite x except -0.0, which becomes +0.0 where g is
 * positive (an optimizer's state essentially never holds -0.0, and the step would not be
 * slower for it).
 *
 * The pass is split over `threads` plain POSIX threads, one contiguous part each (the
 * calling thread does the first part), in parts of whole 64-byte lines so that no two
 * threads write the same cache line. Plain threads rather than OpenMP: an OpenMP runtime
 * keeps its idle threads spinning after a parallel region, and they would slow the step
 * that shares the process (PyTorch's own OpenMP threads do so after its step, which is
 * why the PyTorch worker waits for them to sleep before calling this). The threads are
 * started and joined on every call; that costs some tens of microseconds, inside the
 * measured time, so on small arrays the probe's time is an upper bound on the pass's (and
 * a step's fraction of it is flattered).
 */
#include <pthread.h>
#include <time.h>

#define MAX_THREADS 256
#define LINE_FLOATS 16 /* float32 per 64-byte cache line */

typedef struct {
  const float *g;
  float *p, *mu, *nu, *nu_max;
  long begin, end;
  float scale;
} part_t;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void pass(const part_t *part) {
  const float *restrict g = part->g;
  float *restrict p = part->p;
  float *restrict mu = part->mu;
  float *restrict nu = part->nu;
  float *restrict nu_max = part->nu_max;
  const float s = part->scale;
  for (long i = part->begin; i < part->end; ++i) {
    const float x = g[i] * s;
    p[i] += x;
    mu[i] += x;
    nu[i] += x;
    nu_max[i] += x;
  }
}

static void *run(void *argument) {
  pass((const part_t *)argument);
  return 0;
}

/* One pass over the n elements of the five buffers (which must not overlap) on
 * `threads` threads; returns its wall-clock time in seconds, thread start and join
 * included, or -1 for bad arguments. A thread that cannot be started leaves its part
 * to the calling thread. */
double amsgrad_traffic(const float *g, float *p, float *mu, float *nu, float *nu_max, long n,
                       float scale, int threads) {
  if (n < 0 || threads < 1 || !g || !p || !mu || !nu || !nu_max) return -1.0;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  long lines = (n + LINE_FLOATS - 1) / LINE_FLOATS;
  if (threads > lines) threads = lines > 0 ? (int)lines : 1;
  const long chunk = (lines + threads - 1) / threads * LINE_FLOATS;
  part_t parts[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS];
  const double start = now();
  for (int t = 0; t < threads; ++t) {
    long begin = (long)t * chunk, end = begin + chunk;
    if (begin > n) begin = n;
    if (end > n) end = n;
    parts[t] = (part_t){g, p, mu, nu, nu_max, begin, end, scale};
    started[t] = t > 0 && pthread_create(&ids[t], 0, run, &parts[t]) == 0;
  }
  pass(&parts[0]);
  for (int t = 1; t < threads; ++t) {
    if (started[t])
      pthread_join(ids[t], 0);
    else
      pass(&parts[t]);
  }
  return now() - start;
}
