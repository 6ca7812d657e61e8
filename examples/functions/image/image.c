/* The seed's WasmEdge image function, as a tallow:v1 function in C:
 *
 *   POST /image-info?text=a%20cat   body: an encoded image (JPEG, PNG, ...)
 *   -> 200 {"tensor":[3,224,224], "channel_mean":[r,g,b], "channel_std":[..],
 *           "text":"a cat", "embedding_dim":384, "embedding_head":[4 floats]}
 *
 * preprocess_image turns the bytes into the normalised ImageNet tensor with
 * tallow.ops.preprocess (the server's kernels); embed_text embeds the query's
 * text with the server's embedder. Both host functions are granted in
 * tallow.toml (host_functions). Build: make -C examples/functions. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../tallow.h"

static void reply(int status, const char *json) {
  tallow_resp_status(status);
  tallow_resp_header("content-type", 12, "application/json", 16);
  tallow_resp_write(json, (int32_t)strlen(json));
}

static int hex(char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* The URL-decoded value of "text=" in the query string. */
static void query_text(char *out, size_t cap) {
  char q[2048] = {0};
  int32_t n = tallow_req_query(q, sizeof q - 1);
  out[0] = 0;
  if (n < 0 || n >= (int32_t)sizeof q) return;
  char *p = strstr(q, "text=");
  if (!p || (p != q && p[-1] != '&')) return;
  p += 5;
  size_t k = 0;
  while (*p && *p != '&' && k + 1 < cap) {
    if (*p == '%' && hex(p[1]) >= 0 && hex(p[2]) >= 0) { out[k++] = (char)(hex(p[1]) * 16 + hex(p[2])); p += 3; }
    else if (*p == '+') { out[k++] = ' '; p++; }
    else out[k++] = *p++;
  }
  out[k] = 0;
}

__attribute__((export_name("handle")))
int32_t handle(void) {
  int32_t len = tallow_req_body_len();
  if (len <= 0) { reply(422, "{\"error\":{\"message\":\"POST an image\",\"type\":\"invalid_request_error\",\"param\":\"body\",\"code\":422}}"); return 0; }
  unsigned char *img = malloc((size_t)len);
  int32_t off = 0, n;
  while ((n = tallow_req_body_read(off, img + off, len - off)) > 0) off += n;

  int32_t need = tallow_preprocess_image(img, len, NULL, 0);
  if (need < 0) {
    free(img);
    reply(need == TALLOW_EUNAVAILABLE ? 503 : 422,
          "{\"error\":{\"message\":\"the body is not an image tallow can decode\",\"type\":\"invalid_request_error\",\"param\":\"body\",\"code\":422}}");
    return 0;
  }
  float *t = malloc((size_t)need);
  tallow_preprocess_image(img, len, t, need);
  free(img);
  int plane = 224 * 224;
  double mean[3], sd[3];
  for (int c = 0; c < 3; c++) {
    double s = 0, s2 = 0;
    for (int i = 0; i < plane; i++) { double v = t[c * plane + i]; s += v; s2 += v * v; }
    mean[c] = s / plane;
    double var = s2 / plane - mean[c] * mean[c];
    sd[c] = sqrt(var > 0 ? var : 0);
  }
  free(t);

  char text[512], esc[1024];
  query_text(text, sizeof text);
  size_t k = 0;
  for (const char *p = text; *p && k + 2 < sizeof esc; p++) {
    if (*p == '"' || *p == '\\') esc[k++] = '\\';
    if ((unsigned char)*p >= 0x20) esc[k++] = *p;
  }
  esc[k] = 0;
  char emb[128] = "null";
  int dim = 0;
  if (text[0]) {
    float vec[4096];
    int32_t bytes = tallow_embed_text(text, (int32_t)strlen(text), vec, sizeof vec);
    if (bytes > 0 && bytes <= (int32_t)sizeof vec) {
      dim = bytes / 4;
      snprintf(emb, sizeof emb, "[%.5f,%.5f,%.5f,%.5f]", vec[0], vec[1], vec[2], vec[3]);
    } else if (bytes < 0) {
      printf("embed_text failed: %d\n", bytes);
    }
  }
  char out[1024];
  snprintf(out, sizeof out,
           "{\"tensor\":[3,224,224],\"channel_mean\":[%.5f,%.5f,%.5f],\"channel_std\":[%.5f,%.5f,%.5f],"
           "\"text\":\"%s\",\"embedding_dim\":%d,\"embedding_head\":%s}",
           mean[0], mean[1], mean[2], sd[0], sd[1], sd[2], esc, dim, emb);
  reply(200, out);
  return 0;
}
