/* tallow:v1 — the host functions a tallow WebAssembly function imports
 * (docs/functions-abi.md). Pointers are offsets in the module's memory,
 * lengths are bytes; negative results are the TALLOW_E* errors. Outputs of
 * unknown size: call with cap = 0 to learn the length, then with a buffer
 * that large. Build as a WASI reactor exporting handle():
 *   clang --target=wasm32-wasi -mexec-model=reactor -Wl,--export=handle ... */
#ifndef TALLOW_H
#define TALLOW_H
#include <stdint.h>

#define TALLOW_IMPORT(name) __attribute__((import_module("tallow"), import_name(#name)))

enum {
  TALLOW_OK = 0, TALLOW_EINVALID = -1, TALLOW_EBOUNDS = -2, TALLOW_ENOT_FOUND = -3,
  TALLOW_ENO_SUCH_STORE = -4, TALLOW_EACCESS_DENIED = -5, TALLOW_ESTORE_FULL = -6,
  TALLOW_EKEY_TOO_LARGE = -7, TALLOW_EVALUE_TOO_LARGE = -8, TALLOW_EUNAVAILABLE = -9,
  TALLOW_ELIMIT = -10, TALLOW_EIO = -11, TALLOW_ENOT_INTEGER = -12,
};

/* request */
TALLOW_IMPORT(req_method) int32_t tallow_req_method(char *buf, int32_t cap);
TALLOW_IMPORT(req_path) int32_t tallow_req_path(char *buf, int32_t cap);
TALLOW_IMPORT(req_query) int32_t tallow_req_query(char *buf, int32_t cap);
TALLOW_IMPORT(req_header) int32_t tallow_req_header(const char *name, int32_t name_len, char *buf, int32_t cap);
TALLOW_IMPORT(req_headers) int32_t tallow_req_headers(char *buf, int32_t cap);
TALLOW_IMPORT(req_body_len) int32_t tallow_req_body_len(void);
TALLOW_IMPORT(req_body_read) int32_t tallow_req_body_read(int32_t offset, void *buf, int32_t cap);
/* response */
TALLOW_IMPORT(resp_status) int32_t tallow_resp_status(int32_t status);
TALLOW_IMPORT(resp_header) int32_t tallow_resp_header(const char *name, int32_t name_len, const char *value, int32_t value_len);
TALLOW_IMPORT(resp_write) int32_t tallow_resp_write(const void *data, int32_t len);
/* key-value stores */
TALLOW_IMPORT(kv_open) int32_t tallow_kv_open(const char *name, int32_t name_len);
TALLOW_IMPORT(kv_get) int32_t tallow_kv_get(int32_t h, const void *key, int32_t key_len, void *buf, int32_t cap);
TALLOW_IMPORT(kv_set) int32_t tallow_kv_set(int32_t h, const void *key, int32_t key_len, const void *value, int32_t value_len);
TALLOW_IMPORT(kv_delete) int32_t tallow_kv_delete(int32_t h, const void *key, int32_t key_len);
TALLOW_IMPORT(kv_exists) int32_t tallow_kv_exists(int32_t h, const void *key, int32_t key_len);
TALLOW_IMPORT(kv_get_keys) int32_t tallow_kv_get_keys(int32_t h, void *buf, int32_t cap);
TALLOW_IMPORT(kv_increment) int32_t tallow_kv_increment(int32_t h, const void *key, int32_t key_len, int64_t delta, int64_t *out);
/* models and ops (granted per function in tallow.toml: host_functions) */
TALLOW_IMPORT(embed_text) int32_t tallow_embed_text(const char *text, int32_t len, float *buf, int32_t cap_bytes);
TALLOW_IMPORT(classify_text) int32_t tallow_classify_text(const char *text, int32_t len, char *json, int32_t cap);
TALLOW_IMPORT(preprocess_image) int32_t tallow_preprocess_image(const void *img, int32_t len, float *buf, int32_t cap_bytes);
/* diagnostics: level 0 debug, 1 info, 2 warning, 3 error */
TALLOW_IMPORT(log) int32_t tallow_log(int32_t level, const char *msg, int32_t len);

#endif
