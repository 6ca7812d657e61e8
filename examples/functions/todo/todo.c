/* The seed's Todo REST API (a Spin HTTP component on Spin's key-value
 * store), as a tallow:v1 function in C (wasi-libc).
 *
 *   GET    /todos        -> 200 [ {id, title, done}, ... ] (by id)
 *   POST   /todos        {"title": "...", "done": false}  -> 201 the todo
 *   GET    /todos/ID     -> 200 the todo | 404
 *   PUT    /todos/ID     {"title"?: "...", "done"?: bool} -> 200 the todo | 404
 *   DELETE /todos/ID     -> 204 | 404
 *
 * Todos live in the "default" store under "todo:<id>"; ids come from an
 * atomic kv_increment of "next_id". Build: make -C examples/functions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../tallow.h"

#define MAX_BODY 65536
#define MAX_TITLE 1024

static int32_t store;

static void header(const char *name, const char *value) {
  tallow_resp_header(name, (int32_t)strlen(name), value, (int32_t)strlen(value));
}

static void reply(int status, const char *json) {
  tallow_resp_status(status);
  if (json) {
    header("content-type", "application/json");
    tallow_resp_write(json, (int32_t)strlen(json));
  }
}

static void error(int status, const char *message) {
  char buf[512];
  snprintf(buf, sizeof buf, "{\"error\":{\"message\":\"%s\",\"type\":\"todo_error\",\"param\":null,\"code\":%d}}",
           message, status);
  reply(status, buf);
}

/* The string value of "key" in a flat JSON object, unescaped into out; 1 if found. */
static int json_string(const char *json, const char *key, char *out, size_t cap) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *p = strstr(json, pat);
  if (!p) return 0;
  p += strlen(pat);
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
  if (*p++ != ':') return 0;
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
  if (*p++ != '"') return 0;
  size_t n = 0;
  while (*p && *p != '"') {
    char c = *p++;
    if (c == '\\' && *p) {
      c = *p++;
      if (c == 'n') c = '\n'; else if (c == 't') c = '\t';
    }
    if (n + 1 >= cap) return 0;
    out[n++] = c;
  }
  if (*p != '"') return 0;
  out[n] = 0;
  return 1;
}

/* 1/0 for "key": true/false, -1 when absent. */
static int json_bool(const char *json, const char *key) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *p = strstr(json, pat);
  if (!p) return -1;
  p += strlen(pat);
  while (*p == ' ' || *p == ':' || *p == '\t') p++;
  if (strncmp(p, "true", 4) == 0) return 1;
  if (strncmp(p, "false", 5) == 0) return 0;
  return -1;
}

/* JSON-escapes s into out. */
static void escape(const char *s, char *out, size_t cap) {
  size_t n = 0;
  for (; *s && n + 7 < cap; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') { out[n++] = '\\'; out[n++] = (char)c; }
    else if (c == '\n') { out[n++] = '\\'; out[n++] = 'n'; }
    else if (c < 0x20) n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
    else out[n++] = (char)c;
  }
  out[n] = 0;
}

static char *read_body(void) {
  int32_t len = tallow_req_body_len();
  if (len < 0 || len > MAX_BODY) return NULL;
  char *buf = malloc((size_t)len + 1);
  int32_t off = 0, n;
  while ((n = tallow_req_body_read(off, buf + off, len - off)) > 0) off += n;
  buf[off] = 0;
  return buf;
}

/* The stored JSON of todo id (malloc'd), or NULL. */
static char *load(long id) {
  char key[32];
  int klen = snprintf(key, sizeof key, "todo:%ld", id);
  int32_t n = tallow_kv_get(store, key, klen, NULL, 0);
  if (n < 0) return NULL;
  char *buf = malloc((size_t)n + 1);
  tallow_kv_get(store, key, klen, buf, n);
  buf[n] = 0;
  return buf;
}

static int save(long id, const char *title, int done, char *out, size_t cap) {
  char key[32], esc[MAX_TITLE * 6 + 1];
  int klen = snprintf(key, sizeof key, "todo:%ld", id);
  escape(title, esc, sizeof esc);
  int n = snprintf(out, cap, "{\"id\":%ld,\"title\":\"%s\",\"done\":%s}", id, esc, done ? "true" : "false");
  return tallow_kv_set(store, key, klen, out, n);
}

static void list(void) {
  int32_t n = tallow_kv_get_keys(store, NULL, 0);
  if (n < 0) { error(500, "cannot list the store"); return; }
  unsigned char *keys = malloc((size_t)n + 1);
  tallow_kv_get_keys(store, keys, n);
  /* ids in order: collect, sort */
  long ids[1024];
  int count = 0;
  for (int32_t off = 0; off + 4 <= n && count < 1024;) {
    uint32_t klen = keys[off] | keys[off + 1] << 8 | keys[off + 2] << 16 | (uint32_t)keys[off + 3] << 24;
    off += 4;
    if (klen > 5 && memcmp(keys + off, "todo:", 5) == 0) {
      char tmp[32] = {0};
      memcpy(tmp, keys + off + 5, klen - 5 < 31 ? klen - 5 : 31);
      ids[count++] = atol(tmp);
    }
    off += (int32_t)klen;
  }
  free(keys);
  for (int i = 1; i < count; i++)
    for (int j = i; j > 0 && ids[j - 1] > ids[j]; j--) { long t = ids[j]; ids[j] = ids[j - 1]; ids[j - 1] = t; }
  tallow_resp_status(200);
  header("content-type", "application/json");
  tallow_resp_write("[", 1);
  for (int i = 0; i < count; i++) {
    char *todo = load(ids[i]);
    if (!todo) continue;
    if (i) tallow_resp_write(",", 1);
    tallow_resp_write(todo, (int32_t)strlen(todo));
    free(todo);
  }
  tallow_resp_write("]", 1);
}

__attribute__((export_name("handle")))
int32_t handle(void) {
  char method[16] = {0}, path[512] = {0};
  if (tallow_req_method(method, sizeof method - 1) < 0) return 1;
  int32_t plen = tallow_req_path(path, sizeof path - 1);
  if (plen < 0 || plen >= (int32_t)sizeof path) { error(414, "path too long"); return 0; }
  store = tallow_kv_open("default", 7);
  if (store < 0) { error(500, "the default key-value store is not granted"); return 0; }

  const char *rest = strncmp(path, "/todos", 6) == 0 ? path + 6 : path;
  if (*rest == '/') rest++;
  char out[MAX_TITLE * 6 + 128];

  if (*rest == 0) {
    if (strcmp(method, "GET") == 0) { list(); return 0; }
    if (strcmp(method, "POST") == 0) {
      char *body = read_body();
      char title[MAX_TITLE];
      if (!body || !json_string(body, "title", title, sizeof title)) {
        free(body);
        error(422, "the body must be a JSON object with a string 'title'");
        return 0;
      }
      int done = json_bool(body, "done") == 1;
      free(body);
      int64_t id;
      int32_t rc = tallow_kv_increment(store, "next_id", 7, 1, &id);
      if (rc < 0) { error(507, "cannot allocate an id"); return 0; }
      rc = save((long)id, title, done, out, sizeof out);
      if (rc == TALLOW_ESTORE_FULL) { error(507, "the todo list is full"); return 0; }
      if (rc < 0) { error(500, "cannot store the todo"); return 0; }
      printf("created todo %ld\n", (long)id);
      char loc[48];
      snprintf(loc, sizeof loc, "/todos/%ld", (long)id);
      header("location", loc);
      reply(201, out);
      return 0;
    }
    error(405, "use GET or POST on /todos");
    return 0;
  }

  char *end;
  long id = strtol(rest, &end, 10);
  if (*end != 0 || id <= 0) { error(404, "no such todo"); return 0; }
  char *todo = load(id);
  if (!todo) { error(404, "no such todo"); return 0; }
  if (strcmp(method, "GET") == 0) {
    reply(200, todo);
  } else if (strcmp(method, "PUT") == 0) {
    char *body = read_body();
    char title[MAX_TITLE];
    if (!body) { free(todo); error(413, "body too large"); return 0; }
    if (!json_string(body, "title", title, sizeof title) && !json_string(todo, "title", title, sizeof title))
      title[0] = 0;
    int done = json_bool(body, "done");
    if (done < 0) done = json_bool(todo, "done") == 1;
    free(body);
    if (save(id, title, done, out, sizeof out) < 0) { free(todo); error(500, "cannot store the todo"); return 0; }
    reply(200, out);
  } else if (strcmp(method, "DELETE") == 0) {
    char key[32];
    int klen = snprintf(key, sizeof key, "todo:%ld", id);
    tallow_kv_delete(store, key, klen);
    reply(204, NULL);
  } else {
    error(405, "use GET, PUT or DELETE on /todos/ID");
  }
  free(todo);
  return 0;
}
