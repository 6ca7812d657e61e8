;; The image example in WAT: preprocess_image(body) -> the [3,224,224] f32 tensor,
;; then embed_text(query string) -> a vector; answers [tensor_len i32][vec_len i32]
;; [first 4 tensor floats][first vector float].
(module
  (import "tallow" "req_body_len" (func $blen (result i32)))
  (import "tallow" "req_body_read" (func $bread (param i32 i32 i32) (result i32)))
  (import "tallow" "req_query" (func $query (param i32 i32) (result i32)))
  (import "tallow" "preprocess_image" (func $pre (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "embed_text" (func $embed (param i32 i32 i32 i32) (result i32)))
  (import "tallow" "resp_write" (func $write (param i32 i32) (result i32)))
  (memory (export "memory") 40)
  (func (export "handle") (result i32)
    (local $n i32) (local $t i32) (local $q i32) (local $v i32)
    (local.set $n (call $bread (i32.const 0) (i32.const 65536) (i32.const 1000000)))
    (local.set $t (call $pre (i32.const 65536) (local.get $n) (i32.const 1200000) (i32.const 0)))
    (if (i32.gt_s (local.get $t) (i32.const 0)) (then
      (local.set $t (call $pre (i32.const 65536) (local.get $n) (i32.const 1200000) (local.get $t)))))
    (local.set $q (call $query (i32.const 1024) (i32.const 1024)))
    (local.set $v (call $embed (i32.const 1024) (local.get $q) (i32.const 2000000) (i32.const 65536)))
    (i32.store (i32.const 100) (local.get $t))
    (i32.store (i32.const 104) (local.get $v))
    (drop (call $write (i32.const 100) (i32.const 8)))
    (drop (call $write (i32.const 1200000) (i32.const 16)))
    (drop (call $write (i32.const 2000000) (i32.const 4)))
    (i32.const 0)))
