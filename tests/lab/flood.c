/* A hostile pod for the node lab (tests/node_rollout.rs): it holds as many
 * `GET /drained?timeout=10m` waiters as it can get on each target's admin
 * port, and takes back every one the target closes, at most once a second
 * per slot, until it is stopped. It prints one line per target whenever what
 * it holds changes (at most once a second):
 *   flood 10.244.0.5 held=16 closed=48
 * (held: connections open for at least a second; closed: closed by the
 * target, in total). Built static by scripts/node-build.sh into the
 * `lameduck.test/flood` image.
 *
 *   flood PORT PER_TARGET IP...
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SLOTS 4096

static const char REQUEST[] = "GET /drained?timeout=10m HTTP/1.1\r\nHost: flood\r\n\r\n";

struct slot {
  int target;
  int fd;             /* -1: not connected */
  double opened_at;   /* when the request went out */
  double retry_at;    /* not before this after a close */
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void stop(int sig) { (void)sig; _exit(0); }

/* Connects (bounded by a 1 s send timeout) and sends the request; -1 if either fails. */
static int open_waiter(const struct sockaddr_in *to) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct timeval limit = {.tv_sec = 1};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
  if (connect(fd, (const struct sockaddr *)to, sizeof *to) != 0 ||
      write(fd, REQUEST, sizeof REQUEST - 1) != (ssize_t)(sizeof REQUEST - 1)) {
    close(fd);
    return -1;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: flood PORT PER_TARGET IP...\n");
    return 2;
  }
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  signal(SIGPIPE, SIG_IGN);
  setvbuf(stdout, NULL, _IOLBF, 0);
  int port = atoi(argv[1]), per_target = atoi(argv[2]), targets = argc - 3;
  if (port <= 0 || port > 65535 || per_target <= 0 || (long)per_target * targets > MAX_SLOTS) {
    fprintf(stderr, "flood: bad PORT or PER_TARGET (at most %d slots)\n", MAX_SLOTS);
    return 2;
  }
  struct sockaddr_in *to = calloc((size_t)targets, sizeof *to);
  long *closed = calloc((size_t)targets, sizeof *closed);
  int *shown = calloc((size_t)targets, sizeof *shown);
  long *shown_closed = calloc((size_t)targets, sizeof *shown_closed);
  double *shown_at = calloc((size_t)targets, sizeof *shown_at);
  int slots = per_target * targets;
  struct slot *slot = calloc((size_t)slots, sizeof *slot);
  struct pollfd *pfd = calloc((size_t)slots, sizeof *pfd);
  if (!to || !closed || !shown || !shown_closed || !shown_at || !slot || !pfd) return 1;
  for (int t = 0; t < targets; t++) {
    to[t].sin_family = AF_INET;
    to[t].sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, argv[3 + t], &to[t].sin_addr) != 1) {
      fprintf(stderr, "flood: not an IPv4 address: %s\n", argv[3 + t]);
      return 2;
    }
    shown[t] = -1;
  }
  for (int i = 0; i < slots; i++) slot[i] = (struct slot){.target = i / per_target, .fd = -1};

  for (;;) {
    double t0 = now();
    for (int i = 0; i < slots; i++) {
      if (slot[i].fd < 0 && t0 >= slot[i].retry_at) {
        slot[i].fd = open_waiter(&to[slot[i].target]);
        slot[i].opened_at = now();
        if (slot[i].fd < 0) slot[i].retry_at = t0 + 1.0;
      }
      pfd[i] = (struct pollfd){.fd = slot[i].fd, .events = POLLIN};
    }
    poll(pfd, (nfds_t)slots, 200);
    double t1 = now();
    for (int i = 0; i < slots; i++) {
      if (slot[i].fd < 0 || !(pfd[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      /* An answer or a close: either way the slot is lost. */
      char buf[512];
      ssize_t n = read(slot[i].fd, buf, sizeof buf);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      close(slot[i].fd);
      slot[i].fd = -1;
      slot[i].retry_at = t1 + 1.0;
      closed[slot[i].target]++;
    }
    for (int t = 0; t < targets; t++) {
      int held = 0;
      for (int i = t * per_target; i < (t + 1) * per_target; i++)
        if (slot[i].fd >= 0 && t1 - slot[i].opened_at >= 1.0) held++;
      /* What changed, at most once a second per target. */
      if ((held != shown[t] || closed[t] != shown_closed[t]) && t1 - shown_at[t] >= 1.0) {
        printf("flood %s held=%d closed=%ld\n", argv[3 + t], held, closed[t]);
        shown[t] = held;
        shown_closed[t] = closed[t];
        shown_at[t] = t1;
      }
    }
  }
}
